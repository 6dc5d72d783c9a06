"""`cerberus demo`: the whole pipeline on a tiny budget (every stage, the index page and its links, re-runs), and the
CLI's errors. The real quick demo (`cerberus demo --quick`, ~2 minutes) runs as its own CI step (.ci/run)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import assert_clean_error, run_cli

from cerberus_histo.demo import STAGES, DemoSettings, quick_settings, run_demo
from cerberus_histo.errors import CerberusError

TINY = quick_settings(tiles=3, per_class=3, train_minutes=0.1, max_steps=2, tile_size=320, test_tiles=1,
                      slide_width=1024, slide_height=768, slide_fields=1, chunk=1024, workers=0)




@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, settings=TINY, device="cpu", progress=False)


def _links(text: str) -> list[str]:
    return [unquote(u) for u in re.findall(r"\]\(([^)]+)\)", text)]


def test_every_stage_runs_and_reports(demo):
    out, report = demo
    assert [r["stage"] for r in report["stages"]] == [s.title for s in STAGES]
    assert not any(r["skipped"] for r in report["stages"])
    res = report["results"]
    assert set(res) == {s.key for s in STAGES}
    assert res["train"]["steps"] >= 1 and (out / "train" / "model" / "weights.pt").is_file()
    for task in ("nuclei", "gland", "lumen", "tissue"):
        m = res["evaluate"]["metrics"][task]
        assert m["images"] == 1
        assert all(v is None or 0.0 <= v <= 1.0 for k, v in m.items() if k != "images"), m
    assert set(res["wsi"]["counts"]) >= {"gland", "lumen", "nuclei"}
    assert "nuclei_detection_f1" in res["wsi"]["evaluation"]
    saved = json.loads((out / "demo.json").read_text())
    assert saved["stages"] == report["stages"] and saved["machine"]["cores"] >= 1


def test_index_pages_link_existing_files(demo):
    out, _ = demo
    md = (out / "index.md").read_text()
    links = _links(md)
    assert any(u.endswith("_truth_vs_prediction.png") for u in links)
    assert any(u.endswith("_overlay.png") for u in links) and any(u.endswith(".geojson") for u in links)
    assert any(u.startswith("wsi/") and u.endswith("_thumbnail.png") for u in links)
    missing = [u for u in links if not (out / u).exists()]
    assert not missing, missing
    html = (out / "index.html").read_text()
    assert html.count("<img ") >= 2 and "demo.json" in html
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (out / unquote(src)).is_file(), src


def test_rerun_skips_finished_stages_and_redoes_interrupted_ones(demo):
    out, first = demo
    (out / "done" / "wsi.json").unlink()  # as if the last stage had been interrupted
    again = run_demo(out, settings=TINY, device="cpu", progress=False)
    skipped = {r["stage"]: r["skipped"] for r in again["stages"]}
    assert skipped == {s.title: s.key != "wsi" for s in STAGES}
    assert again["results"]["evaluate"] == first["results"]["evaluate"]
    assert (out / "wsi" / "done").is_dir()


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CerberusError, match="not a demo"):
        run_demo(tmp_path, settings=TINY, device="cpu", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "done").exists()


def test_settings_are_checked():
    with pytest.raises(CerberusError, match="tiles"):
        DemoSettings(tiles=0)
    assert DemoSettings.preset(True).train_minutes < DemoSettings.preset(False).train_minutes


def test_cli_errors(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert_clean_error(run_cli("demo", "--out", afile), "is a file")
    assert_clean_error(run_cli("demo", "--out", tmp_path, "--device", "tpu"), "--device")


def test_cli_help_describes_the_demo():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--fresh" in proc.stdout


def test_readme_and_docs_links_resolve():
    """The first things a new user reads link only to files that exist (anchors are not checked)."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for url in _links(page.read_text()):
            if re.match(r"[a-z]+:", url) or url.startswith("#"):
                continue
            target = (page.parent / url.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(root)} -> {url}")
    assert not broken, broken
    assert (root / "docs" / "demo.jpg").stat().st_size < 300_000
