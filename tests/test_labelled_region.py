"""Partly annotated images (issue 18): a labelled region per image (``regions/NAME.png``) travels into the patches
as ``labelled``, through augmentation into the samples, and only its pixels carry a loss."""

import cv2
import numpy as np
import pytest
import torch
import yaml

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.patches import extract_patches, load_patch
from cerberus_histo.data.resolution import resample_map
from cerberus_histo.data.synthetic import write_tiles
from cerberus_histo.train.data import PatchSet
from cerberus_histo.train.datamodule import collate
from cerberus_histo.train.losses import multitask_loss

SIZE = 200


def _with_region(root, regions: dict[str, np.ndarray]):
    """Give the dataset at ``root`` a region folder holding ``regions`` (name -> boolean map)."""
    (root / "regions").mkdir()
    for name, region in regions.items():
        cv2.imwrite(str(root / "regions" / f"{name}.png"), region.astype(np.uint8) * 255)
    data = yaml.safe_load((root / "dataset.yaml").read_text())
    data["region_dir"] = "regions"
    (root / "dataset.yaml").write_text(yaml.safe_dump(data))


def _left(width: int, size: int = SIZE) -> np.ndarray:
    region = np.zeros((size, size), bool)
    region[:, :width] = True
    return region


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Three tiles; ``synth_00000`` is annotated only in its left 50 columns, the others have no region file."""
    root = tmp_path_factory.mktemp("regions")
    write_tiles(root / "plain", 3, SIZE, seed=1, tasks=("nuclei",), name="t", progress=False)
    write_tiles(root / "part", 3, SIZE, seed=1, tasks=("nuclei",), name="t", progress=False)
    _with_region(root / "part", {"synth_00000": _left(50)})
    return root


def _patches(folder):
    return {p.name: load_patch(p) for p in sorted(folder.rglob("*.npz"))}


def test_patches_of_a_partly_annotated_image_carry_labelled(tiles, tmp_path):
    plain = extract_patches(tiles / "plain", tmp_path / "plain", win_size=128, step_size=64, progress=False)
    part = extract_patches(tiles / "part", tmp_path / "part", win_size=128, step_size=64, progress=False)
    assert plain.patches == 3 * 9 and plain.unlabelled_windows == 0  # starts 0, 64, 72 per axis
    # synth_00000: only the windows starting at x = 0 reach its labelled columns 0..49
    assert part.patches == 2 * 9 + 3 and part.unlabelled_windows == 6 and part.empty_windows == 0
    a, b = _patches(tmp_path / "plain"), _patches(tmp_path / "part")
    assert set(b) < set(a)
    spec = load_dataset(tiles / "part")
    region = spec.read_region("synth_00000", (SIZE, SIZE))
    origins = {0: (0, 0), 3: (64, 0), 6: (72, 0)}  # window index -> (y, x): row-major over 3 x 3 windows
    for name, patch in b.items():
        if name.startswith("synth_00000"):
            y, x = origins[int(name[-8:-4])]
            assert patch["labelled"].dtype == np.uint8 and patch["labelled"].shape == (128, 128)
            assert np.array_equal(patch["labelled"], region[y:y + 128, x:x + 128].astype(np.uint8))
            rest = {k: v for k, v in patch.items() if k != "labelled"}
        else:  # fully labelled images: exactly the patches they had without a region folder
            assert "labelled" not in patch
            rest = patch
        assert set(rest) == set(a[name])
        assert all(rest[k].dtype == a[name][k].dtype and np.array_equal(rest[k], a[name][k]) for k in rest)
    assert spec.read_region("synth_00001", (SIZE, SIZE)) is None


def test_labelled_is_resampled_and_padded_like_the_labels(tiles, tmp_path):
    """At another resolution (nearest, like the tissue mask) and with mirror padding, ``labelled`` stays aligned
    with the image's pixels: the patch's map is the resampled region, reflect-padded, cut at the window."""
    from cerberus_histo.data.patches import windows

    extract_patches(tiles / "part", tmp_path / "p", win_size=128, step_size=96, mode="mirror", mpp=0.8,
                    progress=False)
    spec = load_dataset(tiles / "part")
    shape = (125, 125)  # 200 px at 0.5 um/px seen at 0.8
    region = resample_map(spec.read_region("synth_00000", (SIZE, SIZE)), shape).astype(np.uint8)
    pads, origins = windows(shape, 128, 96, "mirror")
    padded = np.pad(region, pads, mode="reflect")
    found = 0
    for path in sorted((tmp_path / "p").rglob("synth_00000-*.npz")):
        y, x = origins[int(path.stem[-4:])]
        patch = load_patch(path)
        assert np.array_equal(patch["labelled"], padded[y:y + 128, x:x + 128])
        assert patch["labelled"].shape == patch["nuclei_inst"].shape
        found += 1
    assert found == len(origins)  # 125 + 2 x 16 = 157 -> starts 0 and 29 per axis, all reach a labelled pixel


def _model_batch(model, n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)}
    for name in model.head_names:
        task, head = model.config.head(name)
        batch[f"target/{name}"] = torch.randint(0, task.num_outputs(head.kind), (n, size, size), generator=g)
        batch[f"has/{name}"] = torch.ones(n, dtype=torch.bool)
        if head.kind == "inst":
            batch[f"weight/{name}"] = 1 + torch.rand((n, size, size), generator=g)
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, parts = multitask_loss(model.config, model(batch["image"]), batch)
    total.backward()
    return total.detach(), {k: v.detach() for k, v in parts.items()}, {
        k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_loss_counts_only_labelled_pixels():
    torch.manual_seed(0)
    model = Cerberus(ModelConfig.preset("nuclei", encoder="tiny")).eval()  # eval: no dropout, batch-independent
    batch = _model_batch(model)
    n, size = 4, 32
    plain = _loss_and_grads(model, batch)
    # everything labelled: exactly today's loss, terms and gradients
    ones = _loss_and_grads(model, {**batch, "labelled": torch.ones(n, size, size)})
    assert torch.equal(ones[0], plain[0]) and all(torch.equal(ones[1][k], plain[1][k]) for k in plain[1])
    assert all(torch.equal(ones[2][k], plain[2][k]) for k in plain[2])

    labelled = torch.zeros(n, size, size)
    labelled[0, :, :12] = 1       # a strip
    labelled[1, 8:24, 8:24] = 1   # a square
    labelled[2] = 1               # all of it
    # sample 3: nothing labelled, so it adds nothing (as has False)
    part = _loss_and_grads(model, {**batch, "labelled": labelled})
    assert not torch.equal(part[0], plain[0])
    # the labels (and separation weights) outside the region change neither the loss nor its gradient
    g = torch.Generator().manual_seed(5)
    other = dict(batch, labelled=labelled)
    outside = labelled == 0
    for name in model.head_names:
        task, head = model.config.head(name)
        noise = torch.randint(0, task.num_outputs(head.kind), (n, size, size), generator=g)
        other[f"target/{name}"] = torch.where(outside, noise, batch[f"target/{name}"])
        if head.kind == "inst":
            other[f"weight/{name}"] = torch.where(outside, 50.0, batch[f"weight/{name}"])
    assert not torch.equal(other["target/nuclei-inst"], batch["target/nuclei-inst"])
    moved = _loss_and_grads(model, other)
    assert torch.equal(moved[0], part[0]) and all(torch.equal(moved[1][k], part[1][k]) for k in part[1])
    assert all(torch.equal(moved[2][k], part[2][k]) for k in part[2])
    # a sample without a labelled pixel is a sample without labels
    has_not = dict(batch, labelled=torch.where(torch.arange(n).view(-1, 1, 1) == 3, 1.0, labelled),
                   **{f"has/{h}": torch.tensor([True, True, True, False]) for h in model.head_names})
    with torch.no_grad():
        a, _ = multitask_loss(model.config, model(batch["image"]), has_not)
    assert a.item() == pytest.approx(part[0].item(), rel=1e-6)


def test_inst_loss_is_the_mean_over_labelled_pixels():
    from cerberus_histo.train.losses import inst_ce

    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    weight = 1 + torch.rand(2, 8, 8)
    labelled = torch.zeros(2, 8, 8)
    labelled[0, :3] = 1
    labelled[1, 2:7, 1:4] = 1
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none") * weight
    expected = (ce[0][labelled[0] > 0].mean() + ce[1][labelled[1] > 0].mean()) / 2
    got = inst_ce(logits, target, torch.tensor([True, True]), weight, labelled)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_labelled_is_augmented_with_the_labels(tmp_path):
    """A patch's ``labelled`` map is warped, cropped and flipped exactly as the label maps; a patch without one
    gives all ones, so both collate into one batch."""
    cfg = ModelConfig.preset("nuclei", encoder="tiny", patch_shape=48)
    rng = np.random.default_rng(0)
    region = np.zeros((128, 128), np.uint8)
    region[20:90, 30:70] = 1
    region[100:, :] = 1
    inst = rng.integers(1, 40, (128, 128)).astype(np.int32)
    np.savez(tmp_path / "part.npz", image=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), nuclei_inst=inst,
             nuclei_type=region.astype(np.int32), labelled=region)
    np.savez(tmp_path / "full.npz", image=rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), nuclei_inst=inst,
             nuclei_type=np.ones((128, 128), np.int32))
    ps = PatchSet([tmp_path / "part.npz", tmp_path / "full.npz"], ("nuclei-inst", "nuclei-type"), cfg)
    for seed in range(4):
        s = ps.sample(0, seed)
        assert s["labelled"].dtype == np.float32 and s["labelled"].shape == (48, 48)
        assert np.array_equal(s["labelled"], s["target/nuclei-type"].astype(np.float32))  # moved together
    assert 0 < ps.sample(0, 1)["labelled"].mean() < 1
    full = ps.sample(1, 0)
    assert np.array_equal(full["labelled"], np.ones((48, 48), np.float32))
    batch = collate([ps.sample(0, 0), full])
    assert batch["labelled"].shape == (2, 48, 48)


def test_training_runs_on_a_partly_annotated_dataset(tmp_path, monkeypatch):
    from cerberus_histo.train import module
    from cerberus_histo.train.config import TrainConfig
    from cerberus_histo.train.datamodule import Source
    from cerberus_histo.train.run import train

    spec = write_tiles(tmp_path / "n", 3, 96, seed=4, tasks=("nuclei",), name="n", progress=False)
    region = np.zeros((96, 96), bool)
    region[10:70, 20:80] = True
    _with_region(spec.root, {"synth_00000": region, "synth_00002": region[::-1]})
    seen = []

    def spy(config, logits, batch):
        seen.append(float(batch["labelled"].mean()))
        return multitask_loss(config, logits, batch)

    monkeypatch.setattr(module, "multitask_loss", spy)
    cfg = TrainConfig(batch_size=2, max_steps=3, val_every=3, val_max_samples=4,
                      model={"encoder": "tiny", "patch_shape": 48})
    summary = train([Source(spec.root, ("nuclei-inst", "nuclei-type"))], tmp_path / "run", cfg, progress=False)
    assert summary["steps"] == 3 and len(seen) == 3 and min(seen) < 1  # the training batches saw the regions
    patches = {p.stem: load_patch(p) for p in (tmp_path / "run" / "patches" / "n").rglob("*.npz")}
    assert any("labelled" in p for k, p in patches.items() if k.startswith("synth_00000"))
    assert not any("labelled" in p for k, p in patches.items() if k.startswith("synth_00001"))


def test_validation_counts_only_the_labelled_pixels():
    """Validation on a partly labelled sample: a prediction outside the labelled region is not a false positive;
    with every pixel labelled the statistics are those of a sample without a region."""
    from cerberus_histo.train.validation import ValidationStats

    config = ModelConfig.preset("original")
    truth = np.zeros((64, 64), np.int32)
    truth[10:20, 10:20] = 1  # one nucleus inside the region (the left half)
    pred = np.zeros((64, 64), np.int32)
    pred[10:20, 10:20] = 1
    pred[40:50, 40:50] = 1  # one outside it, unlabelled there
    probs = np.zeros((1, 3, 64, 64), np.float32)
    probs[0, 0], probs[0, 1] = pred == 0, pred > 0
    batch = {"image": np.zeros((1, 64, 64, 3), np.uint8), "has/nuclei-inst": np.array([True]),
             "target/nuclei-inst": truth[None], "inst/nuclei-inst": truth[None]}
    region = np.zeros((1, 64, 64), np.float32)
    region[:, :, :32] = 1

    def summary(extra):
        stats = ValidationStats(config)
        stats.update({"nuclei-inst": probs}, {**batch, **extra})
        return stats.summary()

    plain, ones, part = summary({}), summary({"labelled": np.ones((1, 64, 64), np.float32)}), summary({"labelled": region})
    assert plain == ones and plain["nuclei-inst/dice"] == pytest.approx(2 * 100 / 300)
    assert part["nuclei-inst/dice"] == 1.0 and part["nuclei-inst/pq"] > plain["nuclei-inst/pq"]
