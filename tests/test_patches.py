import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from cerberus_histo.data.dataset import load_dataset, write_rgb
from cerberus_histo.data.patches import extract_patches, load_patch, window_starts, windows
from cerberus_histo.data.synthetic import write_patches, write_tiles
from cerberus_histo.data.targets import type_target
from cerberus_histo.errors import CerberusError


def test_window_starts_like_the_original():
    assert window_starts(996, 996, 448) == [0]
    assert window_starts(1500, 996, 448) == [0, 448, 504]  # one more flush with the end
    assert window_starts(1892, 996, 448) == [0, 448, 896]  # no remainder: no extra window
    with pytest.raises(ValueError):
        window_starts(10, 20, 5)


def test_windows_padding():
    pads, origins = windows((300, 1000), 996, 448, "valid")  # smaller than a window: symmetric padding
    assert pads == [(348, 348), (0, 0)] and origins == [(0, 0), (0, 4)]
    pads, origins = windows((1000, 1000), 996, 448, "mirror")
    assert pads == [(274, 274), (274, 274)] and len(origins) == 9
    with pytest.raises(CerberusError, match="mode"):
        windows((10, 10), 4, 2, "tile")
    with pytest.raises(CerberusError, match="step-size"):
        windows((10, 10), 4, 8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_tiles(root / "tiles", 3, 200, seed=1, progress=False)
    return root / "tiles"


def test_patches_equal_the_source_crops(synth, tmp_path):
    report = extract_patches(synth, tmp_path / "p", win_size=128, step_size=64, progress=False)
    spec = load_dataset(synth)
    assert report.images == 3 and report.patches == 3 * 9  # starts 0, 64, 72 per axis
    patch = load_patch(tmp_path / "p" / "synthetic-tiles" / "split_2" / "128_64" / "synth_00001-0004.npz")
    image = spec.read_image("synth_00001")
    assert np.array_equal(patch["image"], image[64:192, 64:192])
    nuc = spec.read_annotation("synth_00001", "nuclei")
    assert np.array_equal(patch["nuclei_inst"], nuc.inst_map[64:192, 64:192])
    assert np.array_equal(patch["nuclei_type"], type_target(nuc.inst_map, nuc.ids, nuc.classes)[64:192, 64:192])
    assert set(patch) == {"image", "gland_inst", "gland_type", "lumen_inst", "nuclei_inst", "nuclei_type",
                          "tissue_class_map"}
    # re-run: finished images are skipped, nothing rewritten
    again = extract_patches(synth, tmp_path / "p", win_size=128, step_size=64, progress=False)
    assert again.skipped_images == 3 and again.patches == 0


def test_patch_markers_follow_the_one_convention(synth, tmp_path):
    """Finished images are marked as tiles and slides are (done/{name}.json, with the settings); an earlier
    version's .done/ marker does not count: that image is extracted again."""
    import json

    extract_patches(synth, tmp_path / "p", win_size=128, step_size=64, progress=False)
    folder = tmp_path / "p" / "synthetic-tiles" / "split_2" / "128_64"
    marker = json.loads((folder / "done" / "synth_00001.json").read_text())
    assert marker["settings"]["win_size"] == 128 and marker["settings"]["step_size"] == 64
    assert marker["settings"]["mode"] == "valid" and len(marker["patches"]) == 9
    assert not list((tmp_path / "p").rglob(".done"))
    (folder / "done" / "synth_00001.json").rename(tmp_path / "old.json")
    (folder / ".done").mkdir()
    (tmp_path / "old.json").rename(folder / ".done" / "synth_00001.json")
    again = extract_patches(synth, tmp_path / "p", win_size=128, step_size=64, progress=False)
    assert again.skipped_images == 2 and again.images == 1 and again.patches == 9


def test_mirror_mode_and_small_images(synth, tmp_path):
    r = extract_patches(synth, tmp_path / "m", win_size=128, step_size=64, mode="mirror", progress=False)
    assert r.patches == 3 * 16  # 200 + 2*32 = 264 -> starts 0, 64, 128, 136
    r = extract_patches(synth, tmp_path / "s", win_size=256, step_size=128, progress=False)
    patch = load_patch(next((tmp_path / "s").rglob("*.npz")))
    assert patch["image"].shape == (256, 256, 3) and r.patches == 3


def test_windows_without_tissue_are_skipped(synth, tmp_path):
    import shutil

    import yaml

    root = tmp_path / "masked"
    shutil.copytree(synth, root)
    for name in ("synth_00000", "synth_00001", "synth_00002"):
        mask = np.zeros((200, 200, 3), np.uint8)
        mask[:50, :50] = 255  # tissue only in the top-left corner
        write_rgb(root / "masks" / f"{name}.png", mask)
    data = yaml.safe_load((root / "dataset.yaml").read_text())
    data["mask_dir"] = "masks"
    (root / "dataset.yaml").write_text(yaml.safe_dump(data))
    r = extract_patches(root, tmp_path / "p", win_size=128, step_size=64, progress=False)
    assert r.patches == 3 and r.empty_windows == 3 * 8


def test_patch_classification_dataset(tmp_path):
    write_patches(tmp_path / "k", 1, 64, progress=False)
    r = extract_patches(tmp_path / "k", tmp_path / "p", progress=False)
    assert r.patches == 9
    patch = load_patch(tmp_path / "p" / "synthetic-patches" / "split_1" / "stroma_00000.npz")
    assert int(patch["tissue_class"]) == 5 and patch["image"].shape == (64, 64, 3)


def test_cli_and_bad_input(synth, tmp_path):
    proc = run_cli("extract-patches", "--config", synth / "dataset.yaml", "--out", tmp_path / "p",
                   "--win-size", "128", "--step-size", "64")
    assert proc.returncode == 0 and "27 patches at 0.5 um/px from 3 images" in proc.stdout, proc.stderr
    assert_clean_error(run_cli("extract-patches", "--config", tmp_path / "none", "--out", tmp_path / "q"),
                       "not found")
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(synth, broken)
    (broken / "labels" / "nuclei" / "synth_00002.npz").unlink()
    assert_clean_error(run_cli("extract-patches", "--config", broken, "--out", tmp_path / "q"),
                       "synth_00002.npz: missing")
    assert not (tmp_path / "q").exists()
