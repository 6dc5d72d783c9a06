"""The bad-input corpus (issue 17, item 5): every row of the table in docs/reliability.md ("Bad input") is made here
in a fresh folder and given to its command, which must stop with exit code 2, one ``error: ...`` line holding the
row's message, no traceback, no code run from a pickle, and no new file that a later run would take for a finished
result. The table is the single source: a row without a case below, or a case without a row, fails the test.

The cases run in this process (click's runner, one torch thread, one tiny model shared by the module); a few of them
also run as real processes, to show the same at the process level."""

from __future__ import annotations

import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest
import tifffile
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO, run_cli
from original_net import SETTINGS  # the original release's settings.yml

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.cli import main
from cerberus_histo.data.synthetic import synth_tile, write_tiles

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
DOC = REPO / "docs" / "reliability.md"
#: files a later run (or a user) would take for a finished result: markers, stores, models, datasets, scores
COMPLETE = ("done/*.json", "*.db", "model.yaml", "weights.pt", "dataset.yaml", "evaluation_*.json", "*.geojson",
            "*.ckpt")
#: the log lines the inference commands write before their error line (machine settings, each failed input)
LOG_LINES = {"infer-tile": ("device ", "failed: ", "warning: "), "infer-wsi": ("device ", "failed: ", "warning: ")}
#: rows also run as real processes (``python -m cerberus_histo``)
SUBPROCESS = {("view", "a results folder that does not exist"),
              ("import-original", "a weights.tar that holds Python objects"),
              ("infer-wsi", "a slide without microns-per-pixel"),
              ("extract-patches", "an --out that is a file")}


def read_table(text: str) -> list[tuple[str, str, str]]:
    """``(command, bad input, message fragment)`` of each row of the page's "Bad input" table."""
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"docs/reliability.md: a row of the table is not command | bad input | message: {line}"
        if cells[0] == "command" or set(cells[0]) <= set("-: "):
            continue
        fragment = re.fullmatch(r"`([^`]+)`", cells[2])
        assert fragment, f"docs/reliability.md: the message of {cells[:2]} is not one `fragment`"
        rows.append((cells[0], cells[1], fragment.group(1)))
    return rows


ROWS = read_table(DOC.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Assets:
    """Inputs the cases share (never changed by a case): a tiny model, a tile, a small nuclei dataset, a slide
    without a resolution, a QuPath export and an original release's settings."""

    root: Path
    model: Path
    tile: Path
    dataset: Path
    nompp: Path
    qupath: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("bad-input-assets")
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=0.5)).save(root / "model")
    cv2.imwrite(str(root / "tile.png"), synth_tile(64, seed=0).image[..., ::-1])
    dataset = write_tiles(root / "dataset", 3, 64, seed=1, tasks=("nuclei",), name="d", progress=False).root
    tifffile.imwrite(root / "nompp.tif", np.full((256, 256, 3), 200, np.uint8))
    (root / "qupath").mkdir()
    cv2.imwrite(str(root / "qupath" / "tile1.png"), np.zeros((64, 64, 3), np.uint8))
    (root / "qupath" / "tile1.geojson").write_text("[]")
    return Assets(root, Path(model), root / "tile.png", Path(dataset), root / "nompp.tif", root / "qupath")


# ---- the cases: (command, bad input) -> the arguments after the command, made in a fresh folder -------------
Builder = Callable[[Path, Assets], list]
CASES: dict[tuple[str, str], Builder] = {}


def case(command: str, bad_input: str) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        assert (command, bad_input) not in CASES, (command, bad_input)
        CASES[command, bad_input] = build
        return build
    return register


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _folder(path: Path) -> Path:
    """A new empty folder."""
    path.mkdir(parents=True)
    return path


def _without(path: Path) -> Path:
    """The folder of ``path``, with ``path`` removed."""
    path.unlink()
    return path.parent


def _crop_first_label(folder: Path) -> None:
    """Cut the first nuclei label map of ``folder`` to 40 x 40 (its image stays 64 x 64)."""
    label = sorted(folder.glob("*.npz"))[0]
    arrays = dict(np.load(label))
    arrays["inst_map"] = arrays["inst_map"][:40, :40]
    np.savez(label, **arrays)


class _Payload:
    """A pickled object that, once unpickled, creates a file: importers must refuse it without unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _original(tmp: Path, weights: dict | bytes | None = None, settings: str | None = None) -> Path:
    """An original release's folder: settings.yml (the release's unless given) and weights.tar (small random
    tensors unless given; ``None`` key absent)."""
    folder = tmp / "release"
    _write(folder / "settings.yml", yaml.safe_dump(SETTINGS) if settings is None else settings)
    if isinstance(weights, bytes):
        _write(folder / "weights.tar", weights)
    else:
        torch.save(weights or {"desc": {"module.conv.weight": torch.zeros(3)}}, folder / "weights.tar")
    return folder


def _infer(a: Assets, tmp: Path, *more) -> list:
    """infer-tile and infer-wsi arguments: the shared model, a fresh --output, on the CPU, in this process; a later
    --model or --output replaces these."""
    return ["--model", a.model, "--output", tmp / "out", "--device", "cpu", "--postproc-workers", "0", *more]


# infer-tile
case("infer-tile", "an image that does not exist")(lambda t, a: _infer(a, t, "--input", t / "gone.png"))
case("infer-tile", "a folder with no images")(
    lambda t, a: _infer(a, t, "--input", _write(t / "empty" / "notes.txt", "x").parent))
case("infer-tile", "a text file named .png")(
    lambda t, a: _infer(a, t, "--input", _write(t / "notes.png", "sample 12, stain batch 3\n")))
case("infer-tile", "a truncated PNG")(
    lambda t, a: _infer(a, t, "--input", _truncated(Path(shutil.copy(a.tile, t / "cut.png")))))
case("infer-tile", "a negative --mpp")(lambda t, a: _infer(a, t, "--input", a.tile, "--mpp", "-0.5"))
case("infer-tile", "an unknown --formats entry")(
    lambda t, a: _infer(a, t, "--input", a.tile, "--formats", "geojson,pdf"))
case("infer-tile", "an --output that is a file")(
    lambda t, a: [*_infer(a, t, "--input", a.tile), "--output", _write(t / "results.txt", "x")])
case("infer-tile", "an empty model folder")(
    lambda t, a: [*_infer(a, t, "--input", a.tile), "--model", _folder(t / "model")])
case("infer-tile", "a truncated weights.pt")(
    lambda t, a: [*_infer(a, t, "--input", a.tile),
                  "--model", _truncated(_copy(a.model, t / "model") / "weights.pt").parent])
case("infer-tile", "a model folder without model.yaml")(
    lambda t, a: [*_infer(a, t, "--input", a.tile),
                  "--model", _without(_copy(a.model, t / "model") / "model.yaml")])

# infer-wsi
case("infer-wsi", "a slide without microns-per-pixel")(lambda t, a: _infer(a, t, "--input", a.nompp))
case("infer-wsi", "a text file named .svs")(
    lambda t, a: _infer(a, t, "--input", _write(t / "slide.svs", "scanner export failed\n")))
case("infer-wsi", "a slide that does not exist")(lambda t, a: _infer(a, t, "--input", t / "gone.svs"))
case("infer-wsi", "a zero --mpp")(lambda t, a: _infer(a, t, "--input", a.nompp, "--mpp", "0"))
case("infer-wsi", "a negative --chunk-size")(
    lambda t, a: _infer(a, t, "--input", a.nompp, "--mpp", "0.5", "--chunk-size", "-1"))
case("infer-wsi", "a negative --margin-um")(
    lambda t, a: _infer(a, t, "--input", a.nompp, "--mpp", "0.5", "--margin-um", "-1"))
case("infer-wsi", "an --output-shape off the encoder stride")(
    lambda t, a: _infer(a, t, "--input", a.nompp, "--mpp", "0.5", "--output-shape", "100"))

# train (each fails before a training step)
case("train", "no data option")(lambda t, a: ["--log-dir", t / "run"])
case("train", "a task flag without its folder")(lambda t, a: ["--nuclei", "--log-dir", t / "run"])
case("train", "a data folder without patches")(
    lambda t, a: ["--nuclei-dir", _folder(t / "patches"), "--log-dir", t / "run"])
case("train", "a params file with an unknown key")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run",
                  "--config", _write(t / "params.yaml", "batch_size: 4\nlearning_rate: 0.1\n")])
case("train", "a params value of the wrong type")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run",
                  "--config", _write(t / "params.yaml", "batch_size: four\n")])
case("train", "a params file that is not YAML")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run",
                  "--config", _write(t / "params.yaml", "batch_size: [4\n")])
case("train", "a --fold the data has no split for")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run", "--fold", "7"])
case("train", "a --pretrained file that is not weights")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run",
                  "--pretrained", _write(t / "resnet34.pth", "<html>download failed</html>")])
case("train", "--resume with no checkpoint")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", t / "run", "--resume"])
case("train", "a --log-dir that is a file")(
    lambda t, a: ["--nuclei-dir", a.dataset, "--log-dir", _write(t / "run", "x")])

# import-dataset
case("import-dataset", "a source folder that does not exist")(lambda t, a: ["glas", t / "GlaS", t / "dst"])
case("import-dataset", "a folder of another format")(lambda t, a: ["lizard", a.dataset, t / "dst"])


@case("import-dataset", "CoNIC arrays of different counts")
def _conic(t: Path, a: Assets) -> list:
    (t / "conic").mkdir()
    np.save(t / "conic" / "images.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(t / "conic" / "labels.npy", np.zeros((3, 32, 32, 2), np.int32))
    return ["conic", t / "conic", t / "dst"]


@case("import-dataset", "a QuPath export that is not JSON")
def _qupath_not_json(t: Path, a: Assets) -> list:
    src = _copy(a.qupath, t / "src")
    (src / "tile1.geojson").write_text("{ cut off here")
    return ["qupath", src, t / "dst"]


case("import-dataset", "a negative --mpp")(lambda t, a: ["qupath", a.qupath, t / "dst", "--mpp", "-1"])
case("import-dataset", "a --map that is neither a mapping nor a file")(
    lambda t, a: ["qupath", a.qupath, t / "dst", "--map", "tumour"])

# extract-patches
case("extract-patches", "a dataset folder that does not exist")(
    lambda t, a: ["--config", t / "dataset", "--out", t / "patches"])
case("extract-patches", "a dataset.yaml that is not YAML")(
    lambda t, a: ["--config", _write(t / "dataset" / "dataset.yaml", "name: [d\n"), "--out", t / "patches"])
case("extract-patches", "a dataset.yaml without annotations")(
    lambda t, a: ["--config", _write(t / "dataset" / "dataset.yaml", "name: d\nmpp: 0.5\n"), "--out", t / "patches"])


@case("extract-patches", "a label map of another size than its image")
def _label_size(t: Path, a: Assets) -> list:
    _crop_first_label(_copy(a.dataset, t / "dataset") / "labels" / "nuclei")
    return ["--config", t / "dataset", "--out", t / "patches", "--win-size", "32", "--step-size", "32"]


@case("extract-patches", "a text file named as a dataset image")
def _text_image(t: Path, a: Assets) -> list:
    sorted((_copy(a.dataset, t / "dataset") / "images").iterdir())[0].write_text("not an image")
    return ["--config", t / "dataset", "--out", t / "patches", "--win-size", "32", "--step-size", "32"]


case("extract-patches", "a negative --win-size")(
    lambda t, a: ["--config", a.dataset, "--out", t / "patches", "--win-size", "-8"])
case("extract-patches", "an --out that is a file")(
    lambda t, a: ["--config", a.dataset, "--out", _write(t / "patches", "x"), "--win-size", "32", "--step-size", "32"])


# evaluate
def _evaluate(t: Path, a: Assets, *more, task: str = "nuclei", pred: Path | None = None) -> list:
    pred = pred or _copy(a.dataset / "labels" / "nuclei", t / "pred")
    return ["--task", task, "--pred", pred, "--true", a.dataset, *more]


case("evaluate", "a prediction folder that does not exist")(lambda t, a: _evaluate(t, a, pred=t / "gone"))
case("evaluate", "a prediction folder without results")(
    lambda t, a: _evaluate(t, a, pred=_folder(t / "pred")))


@case("evaluate", "a prediction of another size than the truth")
def _pred_size(t: Path, a: Assets) -> list:
    args = _evaluate(t, a)
    _crop_first_label(t / "pred")
    return args


@case("evaluate", "a prediction file that is not a label file")
def _pred_text(t: Path, a: Assets) -> list:
    args = _evaluate(t, a)
    sorted((t / "pred").glob("*.npz"))[0].write_text("garbage")
    return args


case("evaluate", "a negative --radius-um")(lambda t, a: _evaluate(t, a, "--radius-um", "-1"))
case("evaluate", "a negative --mpp")(lambda t, a: _evaluate(t, a, "--mpp", "-1"))
case("evaluate", "a --json path that is a folder")(
    lambda t, a: _evaluate(t, a, "--json", _folder(t / "scores")))
case("evaluate", "a task the truth has no labels of")(lambda t, a: _evaluate(t, a, task="gland"))

# view
case("view", "a results folder that does not exist")(lambda t, a: [t / "results"])
case("view", "a folder without finished results")(lambda t, a: [a.dataset])
case("view", "an image instead of a results folder")(lambda t, a: [a.tile])


@case("view", "a .db file that is not SQLite")
def _not_sqlite(t: Path, a: Assets) -> list:
    _write(t / "results" / "done" / "s.json", "{}")
    return [_write(t / "results" / "s.db", "not a database").parent]


case("view", "an empty .db file")(lambda t, a: [_write(t / "results" / "s.db", b"")])

# import-original
case("import-original", "a folder without settings.yml")(
    lambda t, a: [_without(_original(t) / "settings.yml"), t / "dst"])
case("import-original", "a folder without weights.tar")(
    lambda t, a: [_without(_original(t) / "weights.tar"), t / "dst"])
case("import-original", "a settings.yml that is not YAML")(
    lambda t, a: [_original(t, settings="encoder: [resnet34\n"), t / "dst"])
case("import-original", "a weights.tar that holds Python objects")(
    lambda t, a: [_original(t, {"desc": {}, "extra": _Payload(t / "code-ran")}), t / "dst"])
case("import-original", "a truncated weights.tar")(
    lambda t, a: [_truncated(_original(t) / "weights.tar").parent, t / "dst"])
case("import-original", "a weights.tar of another architecture")(lambda t, a: [_original(t), t / "dst"])
case("import-original", "a destination that holds a model")(
    lambda t, a: [_original(t), _copy(a.model, t / "dst")])


# ---- the checks --------------------------------------------------------------------------------------------
def _files(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*") if p.is_file()}


def check(command: str, fragment: str, code: int, stdout: str, stderr: str, new: set[Path], tmp: Path) -> None:
    """Exit code 2; one ``error:`` line, the last, with the fragment; before it only the command's log lines; no
    traceback; no pickle's code run; no new file that looks finished."""
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert fragment in lines[-1], (fragment, lines[-1])
    for line in lines[:-1]:  # e.g. infer-wsi's machine settings and its failed slide, then the error
        assert line.startswith(LOG_LINES.get(command, ())), f"{command}: unexpected stderr line {line!r}"
    assert not (tmp / "code-ran").exists(), "a pickle's code ran"
    finished = sorted(str(p) for p in new if any(PurePath(p).match(g) for g in COMPLETE))
    assert not finished, f"files that look finished after a failed run: {finished}"


def test_every_row_has_a_case_and_every_case_a_row():
    rows = [(c, b) for c, b, _ in ROWS]
    assert len(rows) == len(set(rows)), "a row is listed twice"
    assert not set(rows) - set(CASES), f"rows of docs/reliability.md without a case here: {set(rows) - set(CASES)}"
    assert not set(CASES) - set(rows), f"cases without a row in docs/reliability.md: {set(CASES) - set(rows)}"
    assert SUBPROCESS <= set(rows)
    commands = {"infer-tile", "infer-wsi", "train", "import-dataset", "extract-patches", "evaluate", "view",
                "import-original"}
    per_command = {c: sum(r[0] == c for r in rows) for c in commands}
    assert len(rows) >= 30 and min(per_command.values()) >= 2, per_command
    assert {r[0] for r in rows} == commands


@pytest.mark.parametrize("command, bad_input, fragment", ROWS, ids=[f"{c}: {b}" for c, b, _ in ROWS])
def test_bad_input_is_one_clean_error(command, bad_input, fragment, assets, tmp_path):
    args = [str(x) for x in CASES[command, bad_input](tmp_path, assets)]
    before = _files(tmp_path, assets.root)
    result = CliRunner().invoke(main, [command, *args])
    detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert isinstance(result.exception, SystemExit), detail
    check(command, fragment, result.exit_code, result.stdout, result.stderr, _files(tmp_path, assets.root) - before,
          tmp_path)


@pytest.mark.parametrize("command, bad_input", sorted(SUBPROCESS), ids=[f"{c}: {b}" for c, b in sorted(SUBPROCESS)])
def test_bad_input_in_a_real_process(command, bad_input, assets, tmp_path):
    fragment = next(f for c, b, f in ROWS if (c, b) == (command, bad_input))
    args = CASES[command, bad_input](tmp_path, assets)
    before = _files(tmp_path, assets.root)
    proc = run_cli(command, *args)
    check(command, fragment, proc.returncode, proc.stdout, proc.stderr, _files(tmp_path, assets.root) - before,
          tmp_path)
