"""Resolution carried from the data to the model: resampling, extraction at the model's mpp, training at one mpp."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import yaml
from conftest import assert_clean_error, run_cli

from cerberus_histo import Cerberus
from cerberus_histo.data.dataset import Annotation, load_dataset
from cerberus_histo.data.patches import extract_patches, load_patch, windows
from cerberus_histo.data.resolution import resample_annotation, resample_map, scaled_shape
from cerberus_histo.data.synthetic import write_patches, write_tiles
from cerberus_histo.errors import CerberusError
from cerberus_histo.train.config import TrainConfig
from cerberus_histo.train.datamodule import Source
from cerberus_histo.train.run import train


def _set_mpp(root, mpp, per_image: dict | None = None):
    """Declare another resolution for a dataset folder (and per-image ones in mpps.csv)."""
    spec = load_dataset(root)
    if per_image:
        (root / "mpps.csv").write_text("Filename,Mpp\n" + "".join(f"{n},{m}\n" for n, m in per_image.items()))
    dataclasses.replace(spec, mpp=mpp, mpp_csv="mpps.csv" if per_image else None).save()
    return load_dataset(root)


def test_nearest_resampling_keeps_ids_and_drops_vanished_instances():
    inst = np.zeros((40, 40), np.int32)
    inst[2:22, 2:22] = 7  # a large object survives halving
    inst[30, 30] = 9  # a one-pixel object falls between the sampled pixel centres
    ann = Annotation(inst, np.array([7, 9]), np.array([2, 5]))
    half = resample_annotation(ann, (20, 20))
    assert half.inst_map.shape == (20, 20) and set(np.unique(half.inst_map)) == {0, 7}
    assert half.ids.tolist() == [7] and half.classes.tolist() == [2]
    double = resample_map(inst, (80, 80))
    assert set(np.unique(double)) == {0, 7, 9} and (double == 9).sum() == 4
    assert scaled_shape((1000, 1000), 0.25, 0.5) == (500, 500) and scaled_shape((775, 522), 0.62, 0.5) == (961, 647)


def test_extraction_brings_images_to_the_model_mpp_per_image(tmp_path):
    spec = write_tiles(tmp_path / "d", 3, 96, seed=1, tasks=("nuclei",), name="d", progress=False)
    names = spec.names()
    _set_mpp(tmp_path / "d", 0.25, {names[0]: 1.0})  # one image at 1 um/px, the others at 0.25
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = extract_patches(tmp_path / "d", tmp_path / "p", 48, 48, "valid", progress=False, mpp=0.5)
    assert not [w for w in caught if "from the model's" in str(w.message)]  # 2x away is still near enough
    assert report.mpp == 0.5
    meta = json.loads((tmp_path / "p" / "d" / "patches.json").read_text())
    assert meta["mpp"] == 0.5 and meta["image_mpp_range"] == [0.25, 1.0]
    # 96 px at 0.25 -> 48 px at 0.5: one 48-px window; 96 px at 1.0 -> 192 px: 16 windows
    counts = {n: len(json.loads(m.read_text())["patches"]) for n in names
              for m in (tmp_path / "p" / "d").rglob(f"done/{n}.json")}
    assert counts[names[0]] == 16 and all(counts[n] == 1 for n in names[1:])
    patch = load_patch(next((tmp_path / "p" / "d").rglob(f"{names[1]}-0000.npz")))
    assert patch["image"].shape == (48, 48, 3) and patch["nuclei_inst"].shape == (48, 48)


def test_far_resolution_warns_and_other_settings_are_refused(tmp_path):
    spec = write_tiles(tmp_path / "d", 2, 64, seed=2, tasks=("nuclei",), name="d", progress=False)
    _set_mpp(spec.root, 0.2)
    with pytest.warns(UserWarning, match=r"0.2 um/px, 2.50x from the model's 0.5"):
        extract_patches(spec.root, tmp_path / "p", 16, 16, "valid", progress=False, mpp=0.5)
    with pytest.raises(CerberusError, match="would mix two patch sets"):
        extract_patches(spec.root, tmp_path / "p", 16, 16, "valid", progress=False, mpp=0.25)
    with pytest.raises(CerberusError, match="would mix two patch sets"):
        extract_patches(spec.root, tmp_path / "p", 24, 16, "valid", progress=False, mpp=0.5)
    proc = run_cli("extract-patches", "--config", spec.root, "--out", tmp_path / "q", "--win-size", "16",
                   "--step-size", "16")
    assert proc.returncode == 0 and proc.stderr.startswith("warning: dataset 'd' is at 0.2 um/px"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_model_trained_from_three_resolutions_is_saved_at_one(tmp_path):
    """Datasets at 0.25, 0.5 and 0.62 um/px (MoNuSeg, Lizard, GlaS) train one model at its mpp, 0.5."""
    sets = {}
    for i, (task, mpp) in enumerate((("nuclei", 0.25), ("lumen", 0.5), ("gland", 0.62))):
        spec = write_tiles(tmp_path / task, 4, 96, seed=i, tasks=(task,), name=f"s-{task}", progress=False)
        sets[task] = _set_mpp(spec.root, mpp)
    tissue = write_patches(tmp_path / "tissue", 2, 64, progress=False)
    sources = [Source(sets["nuclei"].root, ("nuclei-inst",)), Source(sets["lumen"].root, ("lumen-inst",)),
               Source(sets["gland"].root, ("gland-inst",)), Source(tissue.root, ("tissue-class",))]
    cfg = TrainConfig(batch_size=2, class_batch_size=4, max_steps=2, val_every=2, val_max_samples=2,
                      model={"encoder": "tiny", "patch_shape": 32, "class_patch_shape": 32})
    train(sources, tmp_path / "run", cfg, fold=0, progress=False)
    assert Cerberus.load(tmp_path / "run" / "model").config.mpp == 0.5
    saved = yaml.safe_load((tmp_path / "run" / "train.yaml").read_text())
    assert [(s["heads"], s["mpp"], s["dataset_mpp"]) for s in saved["sources"]] == [
        (["nuclei-inst"], 0.5, [0.25, 0.25]), (["lumen-inst"], 0.5, [0.5, 0.5]), (["gland-inst"], 0.5, [0.62, 0.62]),
        (["tissue-class"], 0.5, [0.5, 0.5])]
    assert TrainConfig.from_yaml(tmp_path / "run" / "train.yaml").sources == saved["sources"]
    for task in ("nuclei", "lumen", "gland"):  # 96 px tiles brought to 0.5 um/px, then cut into 164-px windows
        expected = len(windows(scaled_shape((96, 96), sets[task].mpp, 0.5), 2 * 32 + 100, 32, "mirror")[1])
        markers = list((tmp_path / "run" / "patches" / f"s-{task}").rglob("done/*.json"))
        assert len(markers) == 4
        for marker in markers:
            done = json.loads(marker.read_text())
            assert done["image_mpp"] == sets[task].mpp and len(done["patches"]) == expected, (task, done)


def test_patch_folder_at_another_mpp_is_refused(tmp_path):
    spec = write_tiles(tmp_path / "d", 3, 64, seed=3, tasks=("nuclei",), name="d", progress=False)
    extract_patches(spec.root, tmp_path / "p", 32, 32, "valid", progress=False, mpp=0.25)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"batch_size": 2, "model": {"encoder": "tiny", "patch_shape": 32}}))
    assert_clean_error(run_cli("train", "--nuclei-dir", tmp_path / "p" / "d", "--config", params, "--max-steps",
                               "1", "--log-dir", tmp_path / "r"), "0.25 um/px", "--mpp 0.5")


def test_contour_kernel_keeps_its_size_in_microns():
    """The target's contour band is the original's at 0.5 um/px and the same width in microns elsewhere, rounded
    as post-processing's erosion (1.5 um: 3 px at 0.5, 7 px at 0.25) so that the two stay consistent."""
    from cerberus_histo.postproc.instances import NucleiParams, _kernel
    from cerberus_histo.tasks import GLAND, NUCLEI

    assert NUCLEI.kernel_px(0.5) == 3 and GLAND.kernel_px(0.5) == 11
    assert NUCLEI.kernel_px(0.25) == 7 and GLAND.kernel_px(0.25) == 23 and NUCLEI.kernel_px(4.0) == 1
    for mpp in (0.25, 0.3, 0.5, 1.0):
        assert _kernel(NucleiParams().erosion_um, mpp).shape[0] == NUCLEI.kernel_px(mpp)
