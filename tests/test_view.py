"""``cerberus view``: the HTTP API on results the real pipeline wrote (a slide and a tile), the store's fast reads,
the overlay tiles, safety (static files only, read-only, local hosts) and the one-line errors before a server
starts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import assert_clean_error, run_cli, slide_model
from PIL import Image

from cerberus_histo import ModelConfig
from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.outputs.store import AnnotationStore
from cerberus_histo.view import make_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette 1.x prefers httpx2 (Python >= 3.11) to httpx
    from starlette.testclient import TestClient

WINDOW = ("--input-shape", "192", "--output-shape", "128")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ---- results made by the real pipeline ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny model at 4 um/px, a 2100 x 1600 synthetic slide and its infer-wsi result, and a 400 x 320 PNG tile
    cut from it with its infer-tile result."""
    root = tmp_path_factory.mktemp("view")
    model = slide_model(root / "tiny")
    slide = write_synthetic_slide(root / "synth.tif", 2100, 1600, seed=2, field=512, offset=128, n_fields=3,
                                  tile=256, progress=False)
    proc = run_cli("infer-wsi", "--model", model, "--input", slide, "--output", root / "wsi", *WINDOW,
                   "--postproc-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import openslide

    with openslide.open_slide(str(slide)) as osr:
        rgb = osr.read_region((600, 500), 0, (400, 320)).convert("RGB")
    (root / "tiles").mkdir()
    rgb.save(root / "tiles" / "t0.png")
    proc = run_cli("infer-tile", "--model", model, "--input", root / "tiles" / "t0.png", "--output", root / "tile",
                   "--mpp", "0.5", *WINDOW, "--postproc-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "slide": slide, "wsi": root / "wsi", "tile": root / "tile", "png": root / "tiles" / "t0.png",
            "files": _files(root / "wsi")}


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def client(built) -> TestClient:
    return TestClient(make_app(built["wsi"]))


def _png(resp) -> Image.Image:
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png", resp.text[:200]
    return Image.open(io.BytesIO(resp.content))


def _nucleus(db: Path):
    """A nucleus polygon that contains its own centroid: (x, y, class name)."""
    with AnnotationStore(db, readonly=True) as store:
        for a in store.query((0, 0, 1e9, 1e9)):
            g = a.geometry
            if a.properties["task"] == "nuclei" and g.geom_type == "Polygon" and g.area > 30:
                c = g.centroid
                if g.contains(c):
                    return c.x, c.y, a.properties["type"]
    pytest.fail("no nucleus polygon in the store")


# ---- the API ----------------------------------------------------------------------------------------------
def test_items_and_info(client, built):
    items = client.get("/api/items").json()["items"]
    assert items == [{"id": "0", "name": "synth", "kind": "slide", "width": 2100, "height": 1600, "mpp": 0.5}]
    info = client.get("/api/items/0").json()
    assert info["dzi"] == "/api/items/0/image.dzi" and info["tile_size"] == 254 and info["overlap"] == 1
    assert info["summary"] == json.loads((built["wsi"] / "synth_summary.json").read_text())
    tasks = [t["task"] for t in info["tasks"]]
    assert tasks == sorted(tasks) and set(tasks) <= {"gland", "lumen", "nuclei", "tissue"} and "nuclei" in tasks
    with AnnotationStore(built["wsi"] / "synth.db", readonly=True) as store:
        for t in info["tasks"]:
            assert sum(c["count"] for c in t["classes"]) == store.count(t["task"])
            for c in t["classes"]:
                assert len(c["color"]) == 3 and all(0 <= v <= 255 for v in c["color"])
    assert client.get("/api/items/1").status_code == 404
    assert client.get("/api/items/x").status_code == 404


def test_dzi_and_image_tiles(client):
    root = ET.fromstring(client.get("/api/items/0/image.dzi").text)
    assert root.get("TileSize") == "254" and root.get("Overlap") == "1" and root.get("Format") == "jpeg"
    size = root.find("{*}Size")
    assert (size.get("Width"), size.get("Height")) == ("2100", "1600")
    top = 12  # ceil(log2(2100)) + 1 levels
    for level, col, row, expected in ((top, 0, 0, (255, 255)), (top, 8, 6, (2100 - 8 * 254 + 1, 1600 - 6 * 254 + 1)),
                                      (top - 3, 0, 0, (255, 200)), (0, 0, 0, (1, 1))):
        r = client.get(f"/api/items/0/image_files/{level}/{col}_{row}.jpeg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "JPEG" and im.size == expected, (level, col, row, im.size)
    for bad in ("12/9_0", "12/0_7", "13/0_0"):
        assert client.get(f"/api/items/0/image_files/{bad}.jpeg").status_code == 404
        assert client.get(f"/api/items/0/overlay_files/{bad}.png").status_code == 404


def test_overlay_tiles_draw_objects_in_their_place(client, built):
    x, y, cls = _nucleus(built["wsi"] / "synth.db")
    col, row = int(x) // 254, int(y) // 254
    url = f"/api/items/0/overlay_files/12/{col}_{row}.png"
    image = Image.open(io.BytesIO(client.get(url.replace("overlay", "image").replace(".png", ".jpeg")).content))
    full = _png(client.get(url))
    assert full.mode == "RGBA" and full.size == image.size
    a_full = np.asarray(full)
    no_nuclei = np.asarray(_png(client.get(url + "?hide=nuclei")))
    nothing = np.asarray(_png(client.get(url + "?hide=tissue,gland,lumen,nuclei")))
    assert (a_full[..., 3] > 0).sum() > (no_nuclei[..., 3] > 0).sum() and not nothing[..., 3].any()
    # the nucleus is drawn at its centroid, in its class colour
    only = np.asarray(_png(client.get(url + "?hide=tissue,gland,lumen")))
    u, v = int(round(x)) - (col * 254 - (1 if col else 0)), int(round(y)) - (row * 254 - (1 if row else 0))
    info = client.get("/api/items/0").json()
    colour = next(c["color"] for t in info["tasks"] if t["task"] == "nuclei" for c in t["classes"]
                  if c["name"] == (cls or "unclassified"))
    assert only[v, u, 3] > 0 and only[v, u, :3].tolist() == colour
    # hiding the nucleus's class takes it away
    hidden = np.asarray(_png(client.get(url + f"?hide=tissue,gland,lumen,nuclei:{cls or 'unclassified'}")))
    assert hidden[v, u, 3] == 0
    # a zoomed-out tile covers the whole slide: nuclei as dots from the centroid cache, same size as the image
    low = client.get("/api/items/0/overlay_files/5/0_0.png")
    assert _png(low).size == Image.open(io.BytesIO(client.get("/api/items/0/image_files/5/0_0.jpeg").content)).size


def test_overlay_from_polygons_matches_the_rasters(built, monkeypatch):
    """Zoomed in further than an item's rasters (tissue classes, outlines: at most RASTER_SIDE px a side), tissue
    regions and outlines are drawn from their polygons; both roads give the same tile."""
    from cerberus_histo.view import render

    fine = make_app(built["wsi"]).state.viewer.overlays[0]  # 2100 px <= RASTER_SIDE: rasters at 1 px per px
    top = fine.levels - 1
    addresses = [(top, c, r) for c in range(9) for r in range(7)]
    want = [fine.tile(*a) for a in addresses]
    monkeypatch.setattr(render, "RASTER_SIDE", 256)  # rasters at 16 level-0 px per px
    coarse = make_app(built["wsi"]).state.viewer.overlays[0]
    got = [coarse.tile(*a) for a in addresses]
    drawn = sum(int((w[..., 3] > 0).sum()) for w in want)
    differ = sum(int((g != w).any(axis=2).sum()) for g, w in zip(got, want, strict=True))
    assert drawn > 10000 and differ <= 0.01 * drawn, (differ, drawn)
    # and further out both use the rasters: tiles of every level come out
    for level in range(top - 6, top):
        assert coarse.tile(level, 0, 0).shape == fine.tile(level, 0, 0).shape


def test_object_lookup(client, built):
    x, y, cls = _nucleus(built["wsi"] / "synth.db")
    obj = client.get(f"/api/items/0/object?x={x}&y={y}").json()["object"]
    assert obj["task"] == "nuclei" and obj["class"] == (cls or "unclassified") and obj["area_um2"] > 0
    assert set(obj) == {"task", "class", "probability", "area_um2", "parent_gland", "id"}
    assert client.get("/api/items/0/object?x=-500&y=-500").json() == {"object": None}
    assert client.get("/api/items/0/object?x=abc&y=1").status_code == 400
    assert client.get("/api/items/0/object?x=1").status_code == 400


def test_tile_result(built):
    c = TestClient(make_app(built["tile"]))
    assert c.get("/api/items").json()["items"] == [{"id": "0", "name": "t0", "kind": "tile", "width": 400,
                                                   "height": 320, "mpp": 0.5}]
    info = c.get("/api/items/0").json()
    s = info["summary"]
    assert s["analysed_area_um2"] == pytest.approx(400 * 320 * 0.25)
    marker = json.loads((built["tile"] / "done" / "t0.json").read_text())
    assert {t: n for t, n in s["counts"].items() if t != "tissue"} == marker["counts"]
    top = 9  # ceil(log2(400)) + 1 levels
    im = Image.open(io.BytesIO(c.get(f"/api/items/0/image_files/{top}/1_1.jpeg").content))
    ov = _png(c.get(f"/api/items/0/overlay_files/{top}/1_1.png"))
    assert im.size == ov.size == (400 - 254 + 1, 320 - 254 + 1)


def test_static_files_only_and_local_hosts(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/index.html").status_code == 200
    assert page.headers["cache-control"] == client.get("/static/viewer.js").headers["cache-control"] == "no-cache"
    for path in ("/static/../items.py", "/static/..%2fitems.py", "/static/%2e%2e/%2e%2e/cli.py",
                 "/static/%2e%2e%2f%2e%2e%2fcli.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd"):
        r = client.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert b"import" not in r.content and b"root:" not in r.content
    assert client.get("/api/items", headers={"host": "evil.example"}).status_code == 400
    assert client.post("/api/items").status_code == 405


def test_results_are_left_as_they_were(client, built):
    """Read-only: after every request the tests made, the result folder holds the same files, byte for byte."""
    for path in ("/api/items/0", "/api/items/0/overlay_files/12/3_3.png", "/api/items/0/object?x=900&y=700"):
        assert client.get(path).status_code == 200
    assert _files(built["wsi"]) == built["files"]


# ---- the store's fast reads -----------------------------------------------------------------------------------
def test_store_centroids_shapes_and_class_counts(built):
    db = built["wsi"] / "synth.db"
    config = None
    with AnnotationStore(db, readonly=True) as store:
        config = ModelConfig.from_dict(store.metadata["model"])
        names = config.task("nuclei").class_names
        recs = [r for r in store.records(config, task="nuclei")]
        cx = np.concatenate([r.centroid for r in recs])
        ci = np.concatenate([r.class_index for r in recs])
        x, y, cls = store.centroids("nuclei", class_names=names)
        assert np.array_equal(np.stack([x, y], 1), cx) and np.array_equal(cls, ci)
        box = (500.0, 400.0, 1200.0, 1000.0)
        bx, by, _ = store.centroids("nuclei", box, names)
        inbox = [r.subset(np.ones(len(r), bool)) for r in store.records(config, task="nuclei", box=box)]
        assert len(bx) == sum(len(r) for r in inbox)
        kinds, geoms = store.shapes("nuclei", box, names)
        assert len(geoms) == len(bx) and all(shapely.intersects(shapely.box(*box).buffer(1e-3), geoms))
        assert np.array_equal(store.centroids("nuclei", class_names=())[2], np.full(len(x), -1))
        counts = store.class_counts()
        assert sum(counts["nuclei"].values()) == store.count("nuclei") == len(x)
        assert sum(n for c in counts.values() for n in c.values()) == store.count()


# ---- errors before the server starts, and the command itself ---------------------------------------------------
def _copy_result(src: Path, dst: Path, stem: str) -> Path:
    dst.mkdir(parents=True)
    (dst / "done").mkdir()
    for p in src.glob(f"{stem}*"):
        shutil.copy(p, dst / p.name)
    shutil.copy(src / "done" / f"{stem}.json", dst / "done" / f"{stem}.json")
    return dst


def test_cli_errors_are_one_line(built, tmp_path):
    assert_clean_error(run_cli("view", tmp_path / "missing"), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("view", tmp_path / "empty"), "no finished result")
    # a .db that is not SQLite, and an SQLite file without the store's tables
    bad = tmp_path / "bad"
    (bad / "done").mkdir(parents=True)
    (bad / "x.db").write_text("not a database")
    (bad / "done" / "x.json").write_text("{}")
    assert_clean_error(run_cli("view", bad), "not an annotation store", "sqlite")
    (bad / "x.db").unlink()
    con = sqlite3.connect(bad / "x.db")
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    assert_clean_error(run_cli("view", bad / "x.db"), "not an annotation store", "tables")
    # the slide moved: say --slide; --slide to it works, a slide of another size is refused
    moved = _copy_result(built["wsi"], tmp_path / "moved", "synth")
    meta = json.loads((moved / "synth_metadata.json").read_text())
    meta["slide"] = str(tmp_path / "gone" / "synth.tif")
    (moved / "synth_metadata.json").write_text(json.dumps(meta))
    assert_clean_error(run_cli("view", moved), "not found", "--slide")
    assert TestClient(make_app(moved, slide=built["slide"])).get("/api/items").status_code == 200
    assert_clean_error(run_cli("view", moved, "--slide", built["png"]), "400 x 320", "2100 x 1600")
    # a tile image of another size
    assert_clean_error(run_cli("view", built["tile"], "--slide", built["slide"]), "2100 x 1600", "400 x 320")
    # --slide with several results
    two = _copy_result(built["wsi"], tmp_path / "two", "synth")
    for p in list(two.glob("synth*")) + [two / "done" / "synth.json"]:
        shutil.copy(p, p.with_name(p.name.replace("synth", "other")))
    assert TestClient(make_app(two)).get("/api/items").json()["items"][1]["name"] == "synth"
    assert_clean_error(run_cli("view", two, "--slide", built["slide"]), "--slide", "2")
    assert_clean_error(run_cli("view", built["png"]), "neither a result folder nor a .db")


def test_cli_serves_until_interrupted(built):
    proc = subprocess.Popen([sys.executable, "-m", "cerberus_histo", "view", str(built["wsi"]), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        m = re.fullmatch(r"Cerberus viewer: (http://127\.0\.0\.1:(\d+)/)\n", line)
        assert m and int(m.group(2)) > 0, line
        with urllib.request.urlopen(m.group(1) + "api/items", timeout=30) as resp:
            assert json.loads(resp.read())["items"][0]["name"] == "synth"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "stopped" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
