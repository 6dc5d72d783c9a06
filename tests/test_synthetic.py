import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from scipy import ndimage as ndi

from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.synthetic import (
    CONNECTIVE,
    EOSINOPHIL,
    EPITHELIAL,
    LYMPHOCYTE,
    NEUTROPHIL,
    PLASMA,
    SURFACE_EPI,
    synth_patch,
    synth_tile,
    write_patches,
    write_tiles,
)
from cerberus_histo.data.targets import INTERIOR, instance_target

SEEDS = range(12)


@pytest.fixture(scope="module")
def tiles():
    return [synth_tile(320, seed) for seed in SEEDS]


def test_deterministic_given_seed():
    a, b, c = synth_tile(192, 5), synth_tile(192, 5), synth_tile(192, 6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.nuclei_inst, b.nuclei_inst)
    assert not np.array_equal(a.image, c.image)


def test_labels_are_consistent(tiles):
    for t in tiles:
        assert t.image.shape == (320, 320, 3) and t.image.dtype == np.uint8
        for inst, classes in ((t.nuclei_inst, t.nuclei_class), (t.gland_inst, t.gland_class),
                              (t.lumen_inst, t.lumen_parent)):
            assert set(np.unique(inst)[1:]) == set(classes)  # every id painted, every painted id listed
        assert set(t.nuclei_class.values()) <= set(range(1, 7))
        assert set(t.gland_class.values()) <= {1, 2}
        assert t.tissue.max() <= 8
        for lid, gid in t.lumen_parent.items():  # each lumen lies inside its gland
            assert np.all(t.gland_inst[t.lumen_inst == lid] == gid)
        assert not np.any((t.nuclei_inst > 0) & (t.lumen_inst > 0))  # no nucleus in a lumen
        for gid, cls in t.gland_class.items():  # glands hold epithelial nuclei
            inside = np.unique(t.nuclei_inst[t.gland_inst == gid])[1:]
            assert inside.size and all(t.nuclei_class[n] == EPITHELIAL for n in inside)
            if cls == SURFACE_EPI:
                assert not np.any(t.lumen_inst[t.gland_inst == gid])


def test_all_classes_occur(tiles):
    nuclei = set().union(*(t.nuclei_class.values() for t in tiles))
    glands = set().union(*(t.gland_class.values() for t in tiles))
    tissue = set().union(*(np.unique(t.tissue).tolist() for t in tiles))
    assert nuclei == set(range(1, 7)) and glands == {1, 2} and tissue == set(range(9))
    assert any(len([p for p in t.lumen_parent.values() if p == g]) > 1 for t in tiles for g in t.gland_class)


def test_nucleus_types_differ_in_size_shape_and_colour(tiles):
    stats = {k: [] for k in range(1, 7)}
    for t in tiles:
        grey = t.image.mean(-1)
        green = t.image[..., 1].astype(float)  # eosin absorbs green
        for i, sl in enumerate(ndi.find_objects(t.nuclei_inst)):
            if sl is None:
                continue
            m = t.nuclei_inst[sl] == i + 1
            ys, xs = np.nonzero(m)
            ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]))) if len(ys) > 2 else np.array([1, 1])
            ring = ndi.binary_dilation(m, iterations=3) & ~ndi.binary_dilation(m, iterations=1)
            ring = ring & (t.nuclei_inst[sl] == 0)
            stats[t.nuclei_class[i + 1]].append((m.sum(), np.sqrt(ev[-1] / max(ev[0], 1e-6)), grey[sl][m].mean(),
                                                 green[sl][ring].mean() if ring.any() else np.nan))
    med = {k: np.nanmedian(np.array(v), axis=0) for k, v in stats.items()}
    area, elong, dark, green_ring = ({k: med[k][j] for k in med} for j in range(4))
    assert area[LYMPHOCYTE] < area[EPITHELIAL] and area[NEUTROPHIL] < area[EPITHELIAL]
    assert elong[CONNECTIVE] > 3 and elong[LYMPHOCYTE] < 1.3 and elong[CONNECTIVE] > elong[EPITHELIAL]
    assert dark[LYMPHOCYTE] < dark[EPITHELIAL] and dark[LYMPHOCYTE] < dark[PLASMA]
    assert green_ring[EOSINOPHIL] < green_ring[LYMPHOCYTE] - 30  # red granular cytoplasm around eosinophils


def test_targets_on_synthetic_labels(tiles):
    t = tiles[1]
    label = instance_target(t.nuclei_inst, 3)
    assert (label == INTERIOR).any() and set(np.unique(label)) <= {0, 1, 2}


def test_patch_classes_differ():
    means = np.array([synth_patch(c, 96, 0).reshape(-1, 3).mean(0) for c in range(9)])
    assert means[0].min() > 220  # background is white
    assert np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(9, 1)].min() > 2
    with pytest.raises(ValueError):
        synth_patch(9)


def test_write_tiles_round_trip_and_rerun(tmp_path):
    spec = write_tiles(tmp_path / "d", 4, 160, seed=3, progress=False)
    loaded = load_dataset(tmp_path / "d")
    assert loaded.tasks == ("gland", "lumen", "nuclei", "tissue") and loaded.mpp == 0.5
    assert loaded.names() == [f"synth_{i:05d}" for i in range(4)] and loaded.names(split=2) == ["synth_00001"]
    tile = synth_tile(160, np.random.default_rng(np.random.SeedSequence([3, 2])))
    img = loaded.read_image("synth_00002")
    assert np.array_equal(img, tile.image)
    nuc = loaded.read_annotation("synth_00002", "nuclei", img.shape[:2])
    assert np.array_equal(nuc.inst_map, tile.nuclei_inst)
    assert dict(zip(nuc.ids.tolist(), nuc.classes.tolist(), strict=True)) == tile.nuclei_class
    assert np.array_equal(loaded.read_annotation("synth_00002", "tissue").class_map, tile.tissue)
    before = {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    write_tiles(tmp_path / "d", 4, 160, seed=3, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()} == before
    assert spec.root == tmp_path / "d"


def test_write_patches(tmp_path):
    write_patches(tmp_path / "p", 2, 96, seed=1, progress=False)
    spec = load_dataset(tmp_path / "p")
    classes = spec.image_classes("tissue")
    assert len(classes) == 18 and sorted(set(classes.values())) == list(range(9))
    assert spec.read_annotation("stroma_00001", "tissue").label == 5
    assert spec.read_image("stroma_00001").shape == (96, 96, 3)


def test_synth_cli(tmp_path):
    proc = run_cli("synth", "tiles", "--out", tmp_path / "t", "--n", "2", "--size", "128")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t" / "dataset.yaml").exists() and len(list((tmp_path / "t" / "images").iterdir())) == 2
    assert_clean_error(run_cli("synth", "tiles", "--out", tmp_path / "x", "--n", "0"), "number of samples")
    assert not (tmp_path / "x" / "dataset.yaml").exists()
    assert_clean_error(run_cli("synth", "patches", "--out", tmp_path / "y", "--size", "16"), "--size")


@pytest.mark.slow
def test_a_model_learns_nuclei_from_the_generator():
    """A few dozen steps of the narrow model on synthetic tiles segment held-out nuclei (foreground Dice)."""
    import torch
    import torch.nn.functional as F

    from cerberus_histo import Cerberus, ModelConfig
    from cerberus_histo.tasks import NUCLEI

    torch.manual_seed(0)

    def batch(seeds):
        tiles = [synth_tile(128, s) for s in seeds]
        x = torch.from_numpy(np.stack([t.image for t in tiles])).permute(0, 3, 1, 2)
        return x, torch.from_numpy(np.stack([instance_target(t.nuclei_inst, 3) for t in tiles])).long()

    x, y = batch(range(100, 116))
    xt, yt = batch(range(900, 904))
    model = Cerberus(ModelConfig(tasks=(NUCLEI.with_heads("inst"),), encoder="tiny"))
    opt = torch.optim.Adam(model.parameters(), 1e-2)

    def dice():
        model.eval()
        with torch.no_grad():
            pred = model(xt)["nuclei-inst"].argmax(1) > 0
        return float(2 * (pred & (yt > 0)).sum() / (pred.sum() + (yt > 0).sum()))

    before = dice()
    for _ in range(50):
        idx = torch.randint(0, len(x), (8,))
        model.train()
        loss = F.cross_entropy(model(x[idx])["nuclei-inst"], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dice()
    assert after > 0.75 and after > before + 0.3, (before, after)
