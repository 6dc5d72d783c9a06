"""The demo's report: the printed tables and the ``index.md`` / ``index.html`` pages of a run's results (the
scores themselves come from :mod:`.scores`). No torch."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path

from ..io.files import atomic_write_bytes
from .scores import HEADLINE, TASKS


# ---- printing --------------------------------------------------------------------------------------------
def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def timing_rows(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for r in report["stages"]:
        rows.append((r["stage"], f"{r['seconds']:.1f}", "skipped (done before)" if r["skipped"] else ""))
    return rows


def print_results(report: dict) -> None:
    res = report["results"]
    print("\nstage                    seconds")
    for stage, secs, note in timing_rows(report):
        print(f"  {stage:<22}{secs:>8}  {note}")
    print(f"  {'total':<22}{report['total_seconds_if_run_now']:>8.1f}"
          + (f"  (this run: {report['total_seconds']:.1f} s)" if any(r["skipped"] for r in report["stages"]) else ""))
    if "train" in res:
        t = res["train"]
        print(f"\ntrained {t['steps']} steps in {t['seconds']:.0f} s ({t['samples_per_second']:.1f} samples/s, "
              f"{t['precision']}), {t['parameters']:,} parameters")
    if "evaluate" in res:
        e = res["evaluate"]
        print(f"\nheld-out synthetic tiles ({len(e['tiles'])}), predicted vs truth:")
        for task in TASKS:
            m = e["metrics"][task]
            cells = "  ".join(f"{label} {_num(m.get(key))}" for label, key in HEADLINE[task])
            print(f"  {task:<7} {cells}" + (f"  (never trained: {', '.join(m['untrained'])})" if m.get("untrained")
                                            else ""))
    if "wsi" in res:
        w = res["wsi"]
        ev = w.get("evaluation", {})
        counts = ", ".join(f"{k} {v}" for k, v in w["counts"].items())
        print(f"\nslide: {counts} in {w['seconds']:.0f} s; nuclei detection F1 {_num(ev.get('nuclei_detection_f1'))}, "
              f"type F1 {_num(ev.get('nuclei_type_f1'))}, tissue map pixel accuracy {_num(ev.get('tissue_accuracy'))} "
              "against the slide's truth")


# ---- the index pages -------------------------------------------------------------------------------------
class _Page:
    """Builds the same page as Markdown and as HTML."""

    def __init__(self):
        self.md: list[str] = []
        self.html: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{_inline(text)}</p>")

    def code(self, text: str) -> None:
        self.md.append(f"```\n{text}\n```\n")
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: list[str], rows: list[list[str]], links: dict[tuple[int, int], str] | None = None) -> None:
        """``links[(row, col)]`` makes that cell a link (cell text = link text)."""
        links = links or {}
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for i, row in enumerate(rows):
            cells = [f"[{c}]({_url(links[i, j])})" if (i, j) in links else c for j, c in enumerate(row)]
            self.md.append("| " + " | ".join(cells) + " |")
        self.md.append("")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = []
        for i, row in enumerate(rows):
            cells = [f'<a href="{html.escape(_url(links[i, j]))}">{html.escape(c)}</a>' if (i, j) in links
                     else html.escape(c) for j, c in enumerate(row)]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        self.html.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")

    def image(self, path: str, caption: str, width: int | None = None) -> None:
        self.md.append(f"![{caption}]({_url(path)})\n")
        style = f' style="max-width:{width}px"' if width else ""
        self.html.append(f'<figure><a href="{html.escape(_url(path))}"><img src="{html.escape(_url(path))}" '
                         f'alt="{html.escape(caption)}"{style}></a><figcaption>{html.escape(caption)}</figcaption></figure>')

    def links(self, items: list[tuple[str, str]]) -> None:
        """A bullet list of (path, description)."""
        self.md.extend(f"- [{p}]({_url(p)}){': ' + d if d else ''}" for p, d in items)
        self.md.append("")
        lis = "".join(f'<li><a href="{html.escape(_url(p))}">{html.escape(p)}</a>{": " + _inline(d) if d else ""}</li>'
                      for p, d in items)
        self.html.append(f"<ul>{lis}</ul>")


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML, the rest escaped."""
    import re

    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _url(path: str) -> str:
    from urllib.parse import quote

    return quote(path)


WSI_FILES = {"store": "every object, TIAToolbox SQLiteStore (level-0 pixels)", "geojson": "every object, for QuPath",
             "summary_json": "counts and areas per class, nuclei per tissue class", "summary_csv": "the same as CSV",
             "thumbnail": "overlay picture", "mask": "tissue mask", "tissue": "tissue-class map, one pixel per cell",
             "metadata": "mpp, model, window, software versions", "marker": "completion marker (written last)"}

CSS = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
       "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}"
       "figcaption{color:#555;font-size:90%}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}")


def _listing(out: Path, folder: str, limit: int = 14) -> list[tuple[str, str]]:
    """Every file under ``out/folder`` (relative), or the folder itself when it holds many."""
    root = out / folder
    if not root.exists():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    subdirs = sorted({p.parent for p in files})
    items = []
    for d in subdirs:
        inside = [p for p in files if p.parent == d]
        if len(inside) > limit:
            items.append((str(d.relative_to(out)) + "/", f"{len(inside)} files ({', '.join(sorted({p.suffix for p in inside}))})"))
        else:
            items.extend((str(p.relative_to(out)), _size(p)) for p in inside)
    return items


def _size(p: Path) -> str:
    n = p.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{n} B"


def write_index(out: Path, report: dict) -> None:
    """``index.md`` and ``index.html``: the stages, metrics, pictures and every output file."""
    res, m = report["results"], report["machine"]
    page = _Page()
    page.h(1, "Cerberus demo")
    page.p("One multi-task network (glands, lumina, nuclei, tissue types) trained from scratch on synthetic H&E "
           "data, evaluated on tiles it never saw, and run on tiles and a whole synthetic slide. Every picture links "
           "to its full-size file; every output file is listed at the end.")
    when = time.strftime("%Y-%m-%d %H:%M")
    where = f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
    load = f"; load average {m['load_average'][0]}" if m.get("load_average") else ""
    page.p(f"Mode **{report['mode']}**, seed {report['seed']}, {when}. Machine: {where}; torch {m['torch']} "
           f"({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), device {m['device']}, precision {report['precision']}{load}.")

    page.h(2, "Stages")
    skipped = any(r["skipped"] for r in report["stages"])
    rows = [list(r) for r in timing_rows(report)] + [
        ["total", f"{report['total_seconds_if_run_now']:.1f}", f"this run: {report['total_seconds']:.1f} s" if skipped else ""]]
    page.table(["stage", "seconds", ""], rows)

    if "data" in res:
        d = res["data"]
        page.h(2, "1. Synthetic training data")
        page.p(f"Three partly labelled datasets of {d['tiles_per_dataset']} tiles ({d['tile_size']} px, 0.5 µm/px) "
               f"- one labelled for glands only, one for lumina only, one for nuclei only - and {d['tissue_patches']} "
               "tissue-class patches, like separate real sources. Patches for training:"
               + (" " + ", ".join(f"{k} {v}" for k, v in res["patches"]["patches"].items()) if "patches" in res else ""))
        page.links([(f"{p}/dataset.yaml", "") for p in d["datasets"].values()] + [("data/patches/", "training patches")])

    if "train" in res:
        t = res["train"]
        page.h(2, "2. Training")
        val = t.get("validation", {})
        shown = ", ".join(f"{k} {_num(v)}" for k, v in val.items() if not k.endswith("/dice") and k != "score")
        page.p(f"Encoder `{t['encoder']}`, {t['parameters']:,} parameters, heads {', '.join(t['heads'])}. "
               f"{t['steps']} steps in {t['seconds']:.0f} s ({t['samples_per_second']:.1f} samples/s, {t['precision']}), "
               "mixed-target batches from the four sources; split 1 of each source validated at the end"
               + (f" ({shown})." if shown else ".")
               + (" The quick mode trains for a minute: expect little to be learnt; the full mode (`cerberus demo`) "
                  "trains for 7." if report["mode"] == "quick" else ""))
        page.links([("train/model/model.yaml", "the model folder: `Cerberus.load(\"train/model\")`"),
                    ("train/model/weights.pt", ""), ("train/train.yaml", "the training settings"),
                    ("train/summary.json", ""), ("train/csv/", "losses per step (also train/tensorboard/)")])

    if "evaluate" in res:
        e = res["evaluate"]
        page.h(2, "3. Held-out evaluation")
        page.p(f"{len(e['tiles'])} fresh synthetic tiles (other seeds than the training data), scored with "
               "`cerberus_histo.metrics.evaluate` (what `cerberus evaluate` prints). Objects (truth / predicted): "
               + ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in e["objects_true_pred"].items()) + ".")
        for task in TASKS:
            mt = e["metrics"][task]
            if mt.get("untrained"):
                page.p(f"{task}: head(s) {', '.join(mt['untrained'])} never trained: they write nothing, and what "
                       "needs them is not scored (n/a).")
            page.table([task, "value"], [[label, _num(mt.get(key))] for label, key in HEADLINE[task]])
        page.links([(p, "all metrics, per image") for p in e["files"].values()])
        page.p("Reproduce from the command line:")
        page.code(f"cerberus evaluate --task nuclei --pred {report.get('out', '.')}/tiles "
                  f"--true {report.get('out', '.')}/data/test")
        page.h(3, "Truth next to prediction")
        page.p("Outlines: glands yellow (surface epithelium purple), lumina green, nuclei in their type's colour; "
               "tissue classes tinted.")
        for name, pic in e["pictures"].items():
            page.image(pic, f"{name}: image | truth | prediction")

    if "tiles" in res:
        page.h(2, "4. Tile inference outputs")
        tr = res["tiles"]
        page.p(f"`infer_tiles` ({tr['seconds_per_megapixel']} s per megapixel end to end); the same as:")
        page.code(tr["command"])
        stems = sorted(p.name[:-len("_overlay.png")] for p in (out / "tiles").glob("*_overlay.png"))
        kinds = [("overlay", "_overlay.png"), ("GeoJSON (QuPath)", ".geojson"), ("SQLite (TIAToolbox)", ".db"),
                 ("label maps", ".npz"), ("HoVer-Net JSON", ".json"), ("summary", "_summary.csv"),
                 ("marker", "")]
        rows, links = [], {}
        for i, stem in enumerate(stems):
            row = [stem]
            for j, (label, suffix) in enumerate(kinds, 1):
                rel = f"tiles/done/{stem}.json" if label == "marker" else f"tiles/{stem}{suffix}"
                row.append(label)
                links[i, j] = rel
            rows.append(row)
        page.table(["tile"] + [k for k, _ in kinds], rows, links)
        page.p("How to open them: see docs/outputs.md (QuPath: File > Import objects from file; TIAToolbox: "
               "SQLiteStore(path)); or look at them in your web browser (docs/viewer.md):")
        page.code(f"cerberus view {report.get('out', 'demo-output')}/tiles")

    if "wsi" in res:
        w = res["wsi"]
        s = res.get("slide", {})
        page.h(2, "5. Whole slide")
        ev = w.get("evaluation", {})
        page.p(f"A synthetic {s.get('width')} x {s.get('height')} px slide (0.5 µm/px, pyramidal BigTIFF, "
               f"{s.get('megabytes')} MB) predicted chunk by chunk with `Cerberus.predict_wsi` in {w['seconds']:.0f} s "
               f"(window {w['window']}): " + ", ".join(f"{k} {v}" for k, v in w["counts"].items()) + ". Against the "
               f"slide's ground truth: nuclei detection F1 {_num(ev.get('nuclei_detection_f1'))} (precision "
               f"{_num(ev.get('nuclei_precision'))}, recall {_num(ev.get('nuclei_recall'))}), type F1 "
               f"{_num(ev.get('nuclei_type_f1'))}; tissue map pixel accuracy over the tissue fields "
               f"{_num(ev.get('tissue_accuracy'))}; objects (truth / predicted): "
               + ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in ev.get("objects_true_pred", {}).items()) + ".")
        files = w["files"]
        if "thumbnail" in files:
            page.image(files["thumbnail"], "slide thumbnail with the predicted objects and tissue classes")
        page.links([(files[k], WSI_FILES.get(k, k)) for k in files] + [(s.get("slide", "slide/synthetic-slide.tif"),
                                                      "the slide (open it in QuPath, then import the GeoJSON)")])
        page.p("Look at the slide and its objects in your web browser: zoom in, switch tasks and classes on and "
               "off, click an object for its class, probability and area (docs/viewer.md; Ctrl-C stops the server):")
        page.code(f"cerberus view {report.get('out', 'demo-output')}/wsi")

    page.h(2, "Next")
    model = f"{report.get('out', 'demo-output')}/train/model"
    page.code(f"cerberus info {model}                   # what the model is\n"
              f"cerberus infer-tile --model {model} --input my_tiles/ --output results/\n"
              f"cerberus infer-wsi --model {model} --input my_slide.svs --output results/\n"
              "cerberus view results/         # look at the results in your web browser: docs/viewer.md\n"
              "cerberus train --help          # train on your own data: docs/your-data.md")

    page.h(2, "Every output file")
    items = [("demo.json", "settings, machine, stage timings and every number on this page")]
    for folder in ("data", "train", "tiles", "evaluation", "slide", "wsi"):
        items.extend(_listing(out, folder))
    page.links(items)

    atomic_write_bytes(out / "index.md", "\n".join(page.md).encode())
    doc = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Cerberus demo</title><style>{CSS}</style>"
           f"</head><body>{''.join(page.html)}</body></html>\n")
    atomic_write_bytes(out / "index.html", doc.encode())
