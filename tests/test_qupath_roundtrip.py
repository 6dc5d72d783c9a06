"""The loop closes (issue 18): a model predicts a synthetic slide, its GeoJSON goes to QuPath and comes back through
``cerberus import-dataset qupath`` as training data whose labels are the predicted instances (within rasterisation),
and ``cerberus train --pretrained`` fine-tunes the same model on it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import shapely
import torch
from conftest import calibrate, run_cli

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.slide import write_synthetic_slide


def _pixels(polygon) -> float:
    """Pixel centres inside or on a polygon whose vertices are pixel centres (Pick's theorem: A + B / 2 + 1, B the
    lattice points on its boundary): the pixels of the instance it was traced from."""
    total = 0.0
    for part in getattr(polygon, "geoms", [polygon]):
        xy = np.asarray(part.exterior.coords, np.int64)
        boundary = int(np.gcd(np.abs(np.diff(xy[:, 0])), np.abs(np.diff(xy[:, 1]))).sum())
        total += shapely.Polygon(part.exterior).area + boundary / 2 + 1
    return total


def test_slide_predictions_come_back_as_training_data_and_train(tmp_path):
    torch.manual_seed(0)
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=0.5, patch_shape=128))
    calibrate(net)
    model = net.eval().save(tmp_path / "model")
    src = tmp_path / "qupath"
    slide = write_synthetic_slide(src / "s.tif", 900, 700, seed=5, field=256, offset=128, n_fields=2, tile=256,
                                  progress=False)
    window = ["--input-shape", "192", "--output-shape", "128", "--postproc-workers", "0"]
    pred = run_cli("infer-wsi", "--model", model, "--input", slide, "--output", tmp_path / "pred", *window)
    assert pred.returncode == 0, pred.stderr[-2000:]
    shutil.copy(tmp_path / "pred" / "s.geojson", src / "s.geojson")  # QuPath: File -> Export objects as GeoJSON
    imp = run_cli("import-dataset", "qupath", src, tmp_path / "data", "--whole-image", "--model", model)
    assert imp.returncode == 0, imp.stderr[-2000:]
    assert "features: nuclei" in imp.stdout

    # every predicted nucleus is an instance of the imported labels, at its place and of its size
    nuclei = [f for f in json.loads((src / "s.geojson").read_text())["features"]
              if f["properties"]["objectType"] == "detection"]
    spec = load_dataset(tmp_path / "data")
    assert spec.mpp == 0.5 and len(nuclei) > 20
    matched, names = 0, spec.names()
    for name in names:  # tiles {stem}_x{X}_y{Y}: level-0 corner, same resolution as the slide here
        x0, y0 = (int(v[1:]) for v in name.split("_")[1:3])
        image = spec.read_image(name)
        ann = spec.read_annotation(name, "nuclei", image.shape[:2])
        assert spec.read_region(name, image.shape[:2]) is None  # --whole-image: every pixel labelled
        classes = dict(zip(ann.ids.tolist(), ann.classes.tolist(), strict=True))
        for f in nuclei:
            geom = shapely.geometry.shape(f["geometry"])
            cx, cy = int(geom.centroid.x) - x0, int(geom.centroid.y) - y0
            if not (0 <= cy < ann.inst_map.shape[0] and 0 <= cx < ann.inst_map.shape[1]):
                continue
            i = int(ann.inst_map[cy, cx])
            area = int((ann.inst_map == i).sum())
            name_of = spec.annotation("nuclei").class_names[classes.get(i, 0)] if i else None
            cls = f["properties"].get("classification", {}).get("name")
            if i and abs(area - _pixels(geom)) <= 0.1 * _pixels(geom) + 1.0 and name_of == cls:
                matched += 1
    assert matched >= 0.95 * len(nuclei), (matched, len(nuclei))

    # fine-tune the model that made the predictions on its corrected predictions
    params = tmp_path / "params.yaml"
    params.write_text("batch_size: 2\nval_max_samples: 2\nnum_workers: 0\n")
    run = tmp_path / "run"
    train = run_cli("train", "--nuclei-dir", tmp_path / "data", "--nuclei-type", "--pretrained", model, "--fold", "0",
                    "--config", params, "--max-steps", "2", "--accelerator", "cpu", "--log-dir", run)
    assert train.returncode == 0, train.stderr[-3000:]
    tuned = Cerberus.load(run / "model")
    before = Cerberus.load(model)
    assert tuned.config.mpp == 0.5 and any(not torch.equal(a, b) for a, b in zip(
        tuned.state_dict().values(), before.state_dict().values(), strict=True))
    assert np.isfinite(json.loads((run / "summary.json").read_text()).get("steps", 2))
