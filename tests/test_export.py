"""Output writers: annotation records, QuPath GeoJSON, TIAToolbox SQLite store, HoVer-Net JSON, label maps,
overlay, summary CSV (no torch in the code under test)."""

import csv
import json
import sqlite3
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape
from skimage.draw import disk, ellipse

from cerberus_histo.config import ModelConfig
from cerberus_histo.data.targets import instance_target, type_target
from cerberus_histo.errors import CerberusError
from cerberus_histo.outputs.geojson import hovernet_dict, write_geojson
from cerberus_histo.outputs.overlay import render_overlay
from cerberus_histo.outputs.records import annotation_records, clip_records, contour_geometries, mask_region
from cerberus_histo.outputs.store import AnnotationStore, decode_geometry, write_store
from cerberus_histo.outputs.summary import summarize, write_summary
from cerberus_histo.outputs.writers import FORMATS, write_outputs
from cerberus_histo.postproc import TaskResult, measure, postprocess

H = W = 256
CELL = 16  # image pixels per tissue class-map cell
NUCLEI = [(230, 20), (230, 45), (230, 70), (240, 100), (20, 200), (30, 230), (120, 20)]  # (y, x)
NUCLEI_TYPES = [1, 2, 3, 4, 5, 6, 2]
STROMA, ABNORMAL, MUSCLE = 5, 1, 4


def onehot(label, n):
    return np.stack([(label == c).astype(np.float32) for c in range(n)])


@pytest.fixture(scope="module")
def config():
    return ModelConfig.preset("original", encoder="tiny")


@pytest.fixture(scope="module")
def class_map():
    cmap = np.full((H // CELL, W // CELL), STROMA)
    cmap[:, 8:] = ABNORMAL
    cmap[:3, :3] = 0  # background corner: not exported
    cmap[6:9, 2:5] = MUSCLE  # an island: a hole in the stroma
    return cmap


@pytest.fixture(scope="module")
def results(class_map):
    """Two glands (classes 1 and 2) with a lumen each, seven typed nuclei, a tissue map at 1/16 resolution."""
    gland = np.zeros((H, W), np.int32)
    lumen = np.zeros_like(gland)
    nuc = np.zeros_like(gland)
    gland[ellipse(70, 80, 35, 50, (H, W))] = 1
    gland[ellipse(170, 180, 55, 45, (H, W))] = 2
    lumen[disk((70, 80), 12, shape=(H, W))] = 1
    lumen[disk((170, 180), 14, shape=(H, W))] = 2
    for i, yx in enumerate(NUCLEI):
        nuc[disk(yx, 5, shape=(H, W))] = i + 1
    tissue = onehot(class_map, 9) * 0.9 + 0.01
    tissue[MUSCLE, 6:9, 2:5] = 0.7  # the island is less sure
    probs = {
        "gland-inst": onehot(instance_target(gland, 11), 3),
        "gland-type": onehot(type_target(gland, [1, 2], [1, 2]), 3),
        "lumen-inst": onehot(instance_target(lumen, 3), 3),
        "nuclei-inst": onehot(instance_target(nuc, 3), 3),
        "nuclei-type": onehot(type_target(nuc, np.arange(1, 8), NUCLEI_TYPES), 7),
        "tissue-class": tissue,
    }
    res = postprocess(probs, 0.5)
    assert len(res["gland"].instances) == 2 and len(res["lumen"].instances) == 2
    assert len(res["nuclei"].instances) == len(NUCLEI)
    return res


@pytest.fixture(scope="module")
def records(results, config):
    return annotation_records(results, config, mpp=0.5)


@pytest.fixture(scope="module")
def odd_results(config):
    """Nuclei whose contours are degenerate or touch themselves: a bow-tie, a single pixel, a 1-px line."""
    inst = np.zeros((40, 40), np.int32)
    inst[2:7, 2:7] = 1
    inst[7, 7] = 1  # joined to the next square only through a corner pixel: the contour touches itself
    inst[8:13, 8:13] = 1
    inst[20, 20] = 2
    inst[30, 5:15] = 3
    inst[25:35, 25:35] = 4
    return {"nuclei": TaskResult(inst, measure(inst, np.where(inst > 0, 2, 0), 7), np.where(inst > 0, 2, 0))}


def features(path):
    return json.loads(Path(path).read_text())["features"]


# ---- records ---------------------------------------------------------------------------------------------
def test_records_match_instances_and_classes(results, records, config):
    nuc = records["nuclei"]
    assert len(nuc) == len(results["nuclei"].instances)
    names = [nuc.class_name(k) for k in range(len(nuc))]
    # each nucleus keeps the type it was drawn with; the centroid tells which one it is
    for k in range(len(nuc)):
        x, y = nuc.centroid[k]
        i = int(np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for yy, xx in NUCLEI]))
        assert names[k] == config.task("nuclei").class_names[NUCLEI_TYPES[i]]
        assert nuc.class_color(k) == list(config.task("nuclei").class_colors[NUCLEI_TYPES[i]])
    assert nuc.object_type == "detection" and records["gland"].object_type == "annotation"
    assert sorted(records["gland"].class_name(k) for k in range(2)) == ["gland", "surface-epi"]
    np.testing.assert_allclose(nuc.measurements["area_um2"], results["nuclei"].instances.area * 0.25)
    assert all(g.is_valid and g.geom_type == "Polygon" for g in nuc.geometry)
    sub = nuc.subset(nuc.class_index == 2)
    assert len(sub) == 2 and set(sub.ids) == set(nuc.ids[nuc.class_index == 2]) and len(sub.contours) == 2
    assert sub.measurements["area_um2"].shape == (2,)


def test_lumina_never_get_a_gland_class_and_name_their_gland(records, config):
    lum, gland = records["lumen"], records["gland"]
    gland_classes = set(config.task("gland").class_names)
    for k in range(len(lum)):
        assert lum.class_name(k) == "lumen" and lum.class_name(k) not in gland_classes
        parent = int(lum.measurements["parent_gland"][k])
        holder = [int(i) for i, g in zip(gland.ids, gland.geometry, strict=True) if g.contains(lum.geometry[k])]
        assert holder == [parent]
    assert "type_prob" not in lum.measurements and not lum.has_types
    assert set(lum.measurements["parent_gland"]) == {1.0, 2.0}


def test_tissue_regions_are_exact_cells_with_holes(records, class_map):
    tis = records["tissue"]
    names = [tis.class_name(k) for k in range(len(tis))]
    assert sorted(names) == ["abnormal_epi", "muscle", "stroma"]  # background not exported
    cell_um2 = (CELL * 0.5) ** 2
    for k, name in enumerate(names):
        c = {"abnormal_epi": ABNORMAL, "muscle": MUSCLE, "stroma": STROMA}[name]
        assert tis.geometry[k].is_valid
        assert tis.measurements["area_um2"][k] == pytest.approx((class_map == c).sum() * cell_um2)
    stroma = tis.geometry[names.index("stroma")]
    muscle = tis.geometry[names.index("muscle")]
    assert len(stroma.interiors) == 1 and shapely.Polygon(stroma.interiors[0]).equals(muscle)
    assert muscle.equals(shapely.box(2 * CELL, 6 * CELL, 5 * CELL, 9 * CELL))
    # regions tile the image with the background corner
    union = shapely.union_all(list(tis.geometry) + [shapely.box(0, 0, 3 * CELL, 3 * CELL)])
    assert union.equals(shapely.box(0, 0, W, H))
    prob = dict(zip(names, tis.measurements["class_prob"], strict=True))
    assert prob["muscle"] == pytest.approx(0.7) and prob["stroma"] == pytest.approx(0.91)


def test_tissue_cells_keep_their_size_and_stop_at_the_image_edge(class_map, config):
    """An image whose sides are not multiples of the cell: its last cells reach past it. Given the cell size, the
    regions keep 16-px cells and are cut at the image's edge (neither stretched over the image nor past it)."""
    h, w = H - 5, W - 11  # the class map covers ceil(h / 16) x ceil(w / 16) cells
    res = {"tissue": TaskResult(class_map=class_map, class_prob=np.full(class_map.shape, 0.8))}
    tis = annotation_records(res, config, mpp=0.5, scale=2.0, offset=(100, 50), shape=(h, w), cell=CELL)["tissue"]
    bounds = np.array([g.bounds for g in tis.geometry])
    assert bounds[:, 0].min() >= 100 and bounds[:, 1].min() >= 50
    assert bounds[:, 2].max() == 100 + 2 * w and bounds[:, 3].max() == 50 + 2 * h
    muscle = tis.geometry[[tis.class_name(k) for k in range(len(tis))].index("muscle")]
    assert muscle.equals(shapely.box(100 + 2 * 2 * CELL, 50 + 2 * 6 * CELL, 100 + 2 * 5 * CELL, 50 + 2 * 9 * CELL))
    union = shapely.union_all(list(tis.geometry) + [shapely.box(100, 50, 100 + 2 * 3 * CELL, 50 + 2 * 3 * CELL)])
    assert union.equals(shapely.box(100, 50, 100 + 2 * w, 50 + 2 * h))
    assert np.allclose(tis.measurements["class_prob"], 0.8)


def test_scale_and_offset_move_to_level0(results, records, config):
    moved = annotation_records(results, config, mpp=0.25, scale=2.0, offset=(1000, 2000))
    for task, rec in records.items():
        m = moved[task]
        for g0, g1 in zip(rec.geometry, m.geometry, strict=True):
            expect = shapely.transform(g0, lambda c: c * 2 + np.array([1000, 2000]))
            assert g1.equals_exact(expect, 1e-9)
        np.testing.assert_allclose(m.centroid, rec.centroid * 2 + [1000, 2000])
        np.testing.assert_allclose(m.bbox, rec.bbox * 2 + [1000, 2000, 1000, 2000])
        # the same tissue in microns: level-0 mpp 0.25 at scale 2 is the maps' 0.5 µm/px
        np.testing.assert_allclose(m.measurements["area_um2"], rec.measurements["area_um2"])
    assert shapely.union_all(moved["tissue"].geometry).bounds[2:] == (1000 + 2 * W, 2000 + 2 * H)


def test_invalid_and_degenerate_contours(odd_results, config):
    rec = annotation_records(odd_results, config, mpp=0.5)["nuclei"]
    kinds = dict(zip(rec.ids.tolist(), [g.geom_type for g in rec.geometry], strict=True))
    assert kinds == {1: "MultiPolygon", 2: "Point", 3: "Point", 4: "Polygon"}
    assert all(g.is_valid for g in rec.geometry)
    assert rec.geometry[1].equals(shapely.Point(20, 20))
    assert rec.geometry[2].equals(shapely.Point(9.5, 30))  # the line's centroid
    assert contour_geometries([], np.zeros((0, 2))).shape == (0,)


# ---- GeoJSON ---------------------------------------------------------------------------------------------
def test_geojson_is_qupath_feature_collection(tmp_path, records, config):
    path = tmp_path / "a.geojson"
    write_geojson(path, records)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    feats = data["features"]
    assert len(feats) == sum(len(r) for r in records.values())
    by_task = {t: [f for f in feats if f["properties"]["classification"]["name"] in config.task(t).class_names]
               for t in ("gland", "nuclei", "tissue")}
    assert len(by_task["nuclei"]) == len(records["nuclei"]) and len(by_task["gland"]) == 2
    for f in feats:
        g = shape(f["geometry"])
        assert g.is_valid and g.geom_type in ("Polygon", "MultiPolygon")
        props = f["properties"]
        assert props["objectType"] == ("detection" if f in by_task["nuclei"] else "annotation")
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
    nuc_spec = config.task("nuclei")
    for f in by_task["nuclei"]:
        cls = f["properties"]["classification"]
        assert cls["color"] == list(nuc_spec.class_colors[nuc_spec.class_names.index(cls["name"])])
    lumina = [f for f in feats if f["properties"]["classification"]["name"] == "lumen"]
    assert [f["properties"]["measurements"]["parent_gland"] for f in lumina] == [1, 2]
    assert {f["properties"]["classification"]["name"] for f in feats} & {"nolabel", "background"} == set()


def test_geojson_centroids_only(tmp_path, records):
    path = tmp_path / "c.geojson"
    write_geojson(path, records, centroids_only=True)
    feats = features(path)
    nuc = [f for f in feats if f["properties"]["objectType"] == "detection"]
    assert len(nuc) == len(records["nuclei"]) and all(f["geometry"]["type"] == "Point" for f in nuc)
    np.testing.assert_allclose([f["geometry"]["coordinates"] for f in nuc], records["nuclei"].centroid)
    assert all(f["geometry"]["type"] == "Polygon" for f in feats if f not in nuc)  # glands stay polygons


def test_geojson_with_points_and_multipolygons(tmp_path, odd_results, config):
    rec = annotation_records(odd_results, config, mpp=0.5)
    write_geojson(tmp_path / "o.geojson", rec)
    kinds = [shape(f["geometry"]).geom_type for f in features(tmp_path / "o.geojson")]
    assert kinds == ["MultiPolygon", "Point", "Point", "Polygon"]


# ---- SQLite store ----------------------------------------------------------------------------------------
def test_store_schema_is_tiatoolbox(tmp_path, records):
    path = tmp_path / "s.db"
    write_store(path, records, {"mpp": 0.5, "model": "tiny"})
    con = sqlite3.connect(path)
    master = {name: (kind, sql) for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master")}
    assert master["metadata"][0] == "table" and master["annotations"][0] == "table"
    assert "USING rtree(id, min_x, max_x, min_y, max_y)" in master["rtree"][1]
    cols = [(r[1], r[2], r[3], r[5]) for r in con.execute("PRAGMA table_info(annotations)")]
    assert cols == [("id", "INTEGER", 0, 1), ("key", "TEXT", 0, 0), ("objtype", "TEXT", 0, 0),
                    ("cx", "FLOAT", 1, 0), ("cy", "FLOAT", 1, 0), ("geometry", "BLOB", 0, 0),
                    ("properties", "TEXT", 0, 0), ("area", "FLOAT", 1, 0)]
    assert [(r[1], r[2]) for r in con.execute("PRAGMA table_info(metadata)")] == [("key", "TEXT"), ("value", "TEXT")]
    assert "UNIQUE" in master["metadata"][1] and "key TEXT UNIQUE" in master["annotations"][1]
    meta = dict(con.execute("SELECT key, value FROM metadata"))
    assert meta["version"] == '"1.0.1"' and meta["compression"] == '"zlib"' and meta["compression_level"] == "9"
    assert json.loads(meta["mpp"]) == 0.5 and json.loads(meta["model"]) == "tiny"
    n = sum(len(r) for r in records.values())
    assert con.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == n
    assert con.execute("SELECT COUNT(*) FROM rtree").fetchone()[0] == n
    assert con.execute("SELECT COUNT(*) FROM annotations a JOIN rtree r ON a.id = r.id").fetchone()[0] == n


def test_store_rows_decode(tmp_path, records, odd_results, config):
    path = tmp_path / "s.db"
    odd = annotation_records(odd_results, config, mpp=0.5)["nuclei"]
    write_store(path, {"gland": records["gland"], "nuclei": odd})
    con = sqlite3.connect(path)
    rows = con.execute("SELECT a.objtype, a.cx, a.cy, a.geometry, a.properties, a.area, r.min_x, r.max_x, r.min_y, "
                       "r.max_y FROM annotations a JOIN rtree r ON a.id = r.id ORDER BY a.id").fetchall()
    expect = list(records["gland"].geometry) + list(odd.geometry)
    assert [r[0] for r in rows] == ["Polygon", "Polygon", "MultiPolygon", "Point", "Point", "Polygon"]
    for (objtype, cx, cy, blob, _props, area, x0, x1, y0, y1), g in zip(rows, expect, strict=True):
        if objtype == "Point":
            assert blob is None and (cx, cy) == (g.x, g.y)
        else:
            assert shapely.from_wkb(zlib.decompress(blob)).equals_exact(g, 0)
            assert (cx, cy) == pytest.approx((g.centroid.x, g.centroid.y))
        assert area == pytest.approx(g.area)
        assert (x0, y0, x1, y1) == pytest.approx(g.bounds, abs=1e-3)
    props = [json.loads(r[4]) for r in rows]
    assert [p["type"] for p in props[:2]] == [records["gland"].class_name(k) for k in range(2)]
    assert props[0]["task"] == "gland" and props[2]["task"] == "nuclei" and props[2]["id"] == 1
    assert props[0]["area_um2"] == pytest.approx(records["gland"].measurements["area_um2"][0])


def test_store_query_matches_brute_force(tmp_path, records):
    path = tmp_path / "q.db"
    write_store(path, records)
    all_recs = [(r.task, int(i), g) for r in records.values() for i, g in zip(r.ids, r.geometry, strict=True)]
    with AnnotationStore(path) as store:
        assert store.count() == len(all_recs)
        rng = np.random.default_rng(1)
        boxes = [(0, 0, W, H), (100, 100, 101, 101), (200, 0, 256, 60), (-50, -50, -1, -1), (60, 60, 100, 90)]
        for _ in range(20):
            x = np.sort(rng.integers(-20, W + 20, 2))
            y = np.sort(rng.integers(-20, H + 20, 2))
            boxes.append((x[0], y[0], x[1], y[1]))
        hits_total = 0
        for box in boxes:
            got = {(a.properties["task"], a.properties["id"]) for a in store.query(box)}
            q = shapely.box(*box)
            want = {(t, i) for t, i, g in all_recs if shapely.box(*g.bounds).intersects(q)}
            assert got == want, box
            hits_total += len(got)
        assert hits_total > 0
        some = store.query((0, 0, W, H))
        assert some[0].geometry.equals_exact(records["tissue"].geometry[0], 0)


def test_store_append_in_chunks_equals_one_write(tmp_path, records):
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    write_store(one, records)
    with AnnotationStore(two) as store:
        store.append({k: records[k] for k in ("tissue", "gland")})
    with AnnotationStore(two) as store:  # reopened: appends continue after the last id
        assert store.append({k: records[k] for k in ("lumen", "nuclei")}) == len(records["lumen"]) + len(
            records["nuclei"])

    def dump(p):
        con = sqlite3.connect(p)
        return (con.execute("SELECT * FROM annotations ORDER BY id").fetchall(),
                con.execute("SELECT * FROM rtree ORDER BY id").fetchall(),
                con.execute("SELECT * FROM metadata ORDER BY key").fetchall())

    assert dump(one) == dump(two)
    assert len(dump(one)[0]) == sum(len(r) for r in records.values())


def test_store_append_is_all_or_nothing(tmp_path, records):
    path = tmp_path / "t.db"
    con = sqlite3.connect(path)
    with AnnotationStore(path) as store:
        store.append(records["tissue"])  # ids 1..3
        n = store.count()
        # a foreign row takes the key that the 3rd nucleus will want (ids 4, 5 glands, 6.. nuclei)
        con.execute("INSERT INTO annotations VALUES (100, 'nuclei-8', 'Point', 0, 0, NULL, '{}', 0)")
        con.commit()
        store._next_id = 4
        with pytest.raises(sqlite3.IntegrityError):
            store.append({"gland": records["gland"], "nuclei": records["nuclei"]})
        assert store.count() == n + 1  # nothing of the failed append, glands included
        assert store.metadata["version"] == "1.0.1"


def test_store_rejects_other_files(tmp_path):
    bad = tmp_path / "x.db"
    sqlite3.connect(bad).execute("CREATE TABLE other(a)").connection.commit()
    with pytest.raises(CerberusError, match="not an annotation store"):
        AnnotationStore(bad)
    assert decode_geometry(None, 3.0, 4.0).equals(shapely.Point(3, 4))


# ---- HoVer-Net JSON --------------------------------------------------------------------------------------
def test_hovernet_json(records):
    data = json.loads(json.dumps(hovernet_dict(records, mag=20.0)))
    assert set(data) == {"mag", "nuc", "gland", "lumen"} and data["mag"] == 20.0
    nuc = records["nuclei"]
    assert len(data["nuc"]) == len(nuc) and len(data["gland"]) == 2 and len(data["lumen"]) == 2
    for k, i in enumerate(nuc.ids):
        e = data["nuc"][str(i)]
        assert set(e) == {"bbox", "centroid", "contour", "type", "type_prob"}
        x0, y0, x1, y1 = nuc.bbox[k]
        assert e["bbox"] == [[y0, x0], [y1, x1]]  # [[rmin, cmin], [rmax, cmax]]
        assert e["centroid"] == pytest.approx(nuc.centroid[k].tolist())
        assert np.array(e["contour"]).shape[1] == 2 and e["type"] == int(nuc.types[k]) and e["type_prob"] == 1.0
        xs, ys = np.array(e["contour"]).T  # x, y: the contour lies within the bbox
        assert xs.min() == x0 and ys.min() == y0 and xs.max() == x1 - 1 and ys.max() == y1 - 1
    assert all(e["type"] is None and e["type_prob"] is None for e in data["lumen"].values())
    assert sorted(e["parent"] for e in data["lumen"].values()) == [1, 2]
    assert {e["type"] for e in data["gland"].values()} == {1, 2}


# ---- overlay, summary, everything at once ----------------------------------------------------------------
def test_overlay_colours(records, results, config):
    img = np.full((H, W, 3), 200, np.uint8)
    out = render_overlay(img, records, config, class_map=results["tissue"].class_map, cell=CELL)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    gland = records["gland"]
    k = gland.class_names.index("gland")
    x, y = gland.contours[int(np.flatnonzero(gland.class_index == k)[0])][0].astype(int)
    assert tuple(out[y, x]) == config.task("gland").class_colors[k]
    stroma = np.array(config.task("tissue").class_colors[STROMA])
    assert np.abs(out[100, 10].astype(int) - (0.65 * 200 + 0.35 * stroma)).max() <= 1  # tinted
    assert tuple(out[5, 5]) == (200, 200, 200)  # background class left clear
    small = render_overlay(img, records, config, class_map=results["tissue"].class_map, cell=CELL, max_side=64)
    assert small.shape == (64, 64, 3)


def test_summary_counts(tmp_path, records, results, config):
    s = summarize(records, config, analysed_area_um2=H * W * 0.25, class_map=results["tissue"].class_map, cell=CELL)
    write_summary(tmp_path / "s.json", tmp_path / "s.csv", s)
    assert json.loads((tmp_path / "s.json").read_text()) == s
    assert s["lumen"] == {"lumen": {"count": 2, "area_um2": pytest.approx(records["lumen"].measurements["area_um2"]
                                                                           .sum()), "mean_area_um2": pytest.approx(
        records["lumen"].measurements["area_um2"].mean())}}
    assert s["nuclei"]["epithelial"]["count"] == 2 and s["nuclei"]["neutrophil"]["count"] == 1
    assert s["tissue"]["debris"]["count"] == 0 and "background" not in s["tissue"]
    assert sum(v["count"] for v in s["nuclei"].values()) == len(records["nuclei"]) == s["counts"]["nuclei"]
    fractions = [v["fraction"] for v in s["tissue"].values()]
    assert sum(fractions) == pytest.approx(1.0)
    # every nucleus is counted once under the tissue class of the cell under its centroid
    cmap = results["tissue"].class_map
    names = config.task("tissue").class_names
    nuc = records["nuclei"]
    want: dict = {}
    for (x, y), k in zip(nuc.centroid, nuc.class_index, strict=True):
        key = (names[cmap[int(y // CELL), int(x // CELL)]], nuc.class_names[k])
        want[key] = want.get(key, 0) + 1
    got = {(t, c): r["count"] for t, rows in s["nuclei_by_tissue"].items() for c, r in rows.items() if r["count"]}
    assert got == want
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert list(rows[0]) == ["task", "class", "tissue_class", "count", "area_um2", "mean_area_um2"]
    assert rows[0]["task"] == "analysed" and float(rows[0]["area_um2"]) == pytest.approx(H * W * 0.25)
    by_tissue = [r for r in rows if r["task"] == "nuclei" and r["tissue_class"] != "all"]
    assert sum(int(r["count"]) for r in by_tissue) == len(nuc)


def test_clip_records_to_a_mask(records, config):
    mask = np.zeros((H // 8, W // 8), bool)
    mask[:, : W // 16] = True  # the left half, at 8 px per mask pixel
    region = mask_region(mask, 8.0)
    for task, rec in records.items():
        clipped = clip_records(rec, region, 0.25)
        assert shapely.contains(shapely.buffer(region, 1e-6), clipped.geometry).all(), task
        if task != "tissue":  # instances are kept by their centroid
            assert len(clipped) == int((rec.centroid[:, 0] < W / 2).sum())
        cut = ~shapely.contains(region, rec.geometry)
        if cut.any() and len(clipped):
            assert (clipped.measurements["area_um2"] <= rec.measurements["area_um2"].max() + 1e-9).all()


def test_write_outputs_all_formats(tmp_path, results, config):
    img = np.full((2 * H, 2 * W, 3), 180, np.uint8)  # scale 2: the image is twice the maps
    paths = write_outputs(tmp_path / "out", "tile", results, config, mpp=0.25, image=img, scale=2.0,
                          offset=(1000, 2000), metadata={"slide": "s1"})
    names = {k: p.name for k, p in paths.items()}
    assert names == {"geojson": "tile.geojson", "sqlite": "tile.db", "npz": "tile.npz", "hovernet": "tile.json",
                     "overlay": "tile_overlay.png", "csv": "tile_summary.csv"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names.values())  # no .tmp left
    n_nuc = len(results["nuclei"].instances)
    feats = features(paths["geojson"])
    assert sum(f["properties"]["objectType"] == "detection" for f in feats) == n_nuc
    xs = [c[0] for f in feats for c in shapely.get_coordinates(shape(f["geometry"]))]
    assert min(xs) == 1000 and max(xs) == 1000 + 2 * W  # level-0 frame
    with AnnotationStore(paths["sqlite"]) as store:
        meta = store.metadata
        assert meta["mpp"] == 0.25 and meta["processing_mpp"] == 0.5 and meta["slide"] == "s1"
        assert meta["software"]["cerberus_histo"] and meta["model"]["encoder"] == "tiny"
        assert store.count() == len(feats)
    maps = np.load(paths["npz"])
    np.testing.assert_array_equal(maps["nuclei_inst"], results["nuclei"].inst_map)
    np.testing.assert_array_equal(maps["tissue_class"], results["tissue"].class_map)
    assert maps["nuclei_inst"].dtype == np.uint8 and maps["gland_type"].dtype == np.uint8
    assert json.loads(str(maps["meta"]))["scale"] == 2.0
    assert set(maps.files) >= {"gland_inst", "gland_type", "lumen_inst", "nuclei_type", "tissue_prob"}
    assert json.loads(paths["hovernet"].read_text())["mag"] == 40.0
    overlay = cv2.imread(str(paths["overlay"]))
    assert overlay is not None and overlay.shape == img.shape
    rows = list(csv.DictReader(paths["csv"].open()))
    counts = {(r["task"], r["class"]): int(r["count"]) for r in rows if r["tissue_class"] in ("", "all")
              and r["task"] != "analysed"}
    assert sum(v for (t, _), v in counts.items() if t == "nuclei") == n_nuc
    assert counts[("lumen", "lumen")] == 2 and counts[("gland", "gland")] == 1
    only = write_outputs(tmp_path / "b", "t", results, config, mpp=0.5, formats=("csv", "overlay"))
    assert set(only) == {"csv"}  # no image: no overlay


def test_write_outputs_errors(tmp_path, results, config, monkeypatch):
    with pytest.raises(CerberusError, match="unknown output format.*'shp'.*geojson, sqlite"):
        write_outputs(tmp_path, "t", results, config, mpp=0.5, formats=("geojson", "shp"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CerberusError, match=r"cannot write to .*file/out: .*; choose another --output"):
        write_outputs(blocker / "out", "t", results, config, mpp=0.5)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CerberusError) as err:
        write_outputs(tmp_path / "ro", "t", results, config, mpp=0.5)
    assert str(err.value) == f"cannot write to {tmp_path / 'ro'}: permission denied; choose another --output"
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    monkeypatch.setattr("cerberus_histo.outputs.writers.os.access", lambda *a: False)  # an existing read-only folder
    with pytest.raises(CerberusError, match="permission denied; choose another --output"):
        write_outputs(tmp_path, "t", results, config, mpp=0.5, formats=("sqlite",))
    monkeypatch.undo()
    assert list(tmp_path.glob("t*")) == []
    with pytest.raises(CerberusError, match="mpp"):
        annotation_records(results, config, mpp=0)
    assert set(FORMATS) == {"geojson", "sqlite", "npz", "hovernet", "overlay", "csv"}


def test_failed_write_leaves_nothing(tmp_path, records, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(shapely, "to_geojson", boom)
    with pytest.raises(RuntimeError):
        write_geojson(tmp_path / "x.geojson", records)
    monkeypatch.setattr(zlib, "compress", boom)
    with pytest.raises(RuntimeError):
        write_store(tmp_path / "x.db", records)
    assert list(tmp_path.iterdir()) == []
