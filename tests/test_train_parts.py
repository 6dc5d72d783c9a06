import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.train.losses import masked_mean, multitask_loss, type_dice
from cerberus_histo.train.sampling import TaskBatchSampler


def _batch(model, n=4, size=32, has=None, seed=0):
    """Random targets for every head; ``has[head]`` says which samples are labelled."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)}
    for name in model.head_names:
        task, head = model.config.head(name)
        k = task.num_outputs(head.kind)
        shape = (n,) if head.kind == "class" else (n, size, size)
        batch[f"target/{name}"] = torch.randint(0, k, shape, generator=g)
        batch[f"has/{name}"] = torch.ones(n, dtype=torch.bool) if has is None else has[name]
        if head.kind == "inst":
            batch[f"weight/{name}"] = 1 + torch.rand(shape, generator=g)
    return batch


def test_masked_mean_ignores_unlabelled_samples():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])) == pytest.approx(2.0)
    assert masked_mean(torch.tensor([5.0]), torch.tensor([False])) == 0


def test_inst_loss_is_weighted_ce():
    model = Cerberus(ModelConfig.preset("nuclei", encoder="tiny"))
    batch = _batch(model)
    logits = model(batch["image"], heads=["nuclei-inst"])
    total, parts = multitask_loss(model.config, logits, batch)
    ce = F.cross_entropy(logits["nuclei-inst"], batch["target/nuclei-inst"], reduction="none")
    expected = (ce * batch["weight/nuclei-inst"]).flatten(1).mean(1).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)  # loss weight 1.0, ce weight 1.0


def test_type_dice_by_hand():
    target = torch.tensor([[[0, 1], [1, 2]]])
    logits = torch.full((1, 3, 2, 2), -30.0)
    for y in range(2):
        for x in range(2):
            logits[0, target[0, y, x], y, x] = 30.0  # perfect prediction
    assert type_dice(logits, target, torch.tensor([True])).item() == pytest.approx(0, abs=1e-6)
    wrong = logits[:, [0, 2, 1]]  # classes 1 and 2 swapped
    assert type_dice(wrong, target, torch.tensor([True])).item() == pytest.approx(2.0, abs=1e-3)


def test_every_decoder_gets_gradients_only_with_its_labels():
    """Type decoders included (the original's never trained); heads without labels in the batch get none."""
    model = Cerberus(ModelConfig.preset("original", encoder="tiny")).train()
    heads = model.head_names
    n = 4
    for labelled in (("gland-inst", "gland-type", "lumen-inst"), ("nuclei-inst", "nuclei-type"), ("tissue-class",)):
        model.zero_grad(set_to_none=True)
        has = {h: torch.tensor([h in labelled] * n) for h in heads}
        batch = _batch(model, n, has=has)
        present = [h for h in heads if has[h].any()]
        total, _ = multitask_loss(model.config, model(batch["image"], heads=present), batch)
        total.backward()
        for name, p in model.named_parameters():
            part = name.split(".")[1] if name.startswith("heads.") else name.split(".")[0]
            if part in heads:
                got = p.grad is not None and bool(p.grad.abs().sum() > 0)
                assert got == (part in labelled), (labelled, name)


def test_partly_labelled_batch_counts_only_labelled_samples():
    model = Cerberus(ModelConfig.preset("nuclei", encoder="tiny")).eval()
    full = _batch(model, 4)
    has = {h: torch.tensor([True, True, False, False]) for h in model.head_names}
    part = {**full, **{f"has/{h}": v for h, v in has.items()}}
    with torch.no_grad():
        logits = model(full["image"])
        half = {k: v[:2] for k, v in full.items()}
        a, _ = multitask_loss(model.config, logits, part)
        b, _ = multitask_loss(model.config, {k: v[:2] for k, v in logits.items()}, half)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)  # the unlabelled samples change nothing


def test_sampler_composition():
    s = TaskBatchSampler([50, 7, 20], class_size=30, batch_size=6, class_batch_size=12, seed=1, num_batches=400)
    batches = list(s)
    cls = [b for b in batches if len(b) == 12]
    seg = [b for b in batches if len(b) == 6]
    assert 0.25 < len(cls) / len(batches) < 0.35  # p_seg 0.7
    assert all(min(b) >= 77 for b in cls)  # classification batches hold only classification samples
    assert all(max(b) < 77 for b in seg)
    ranges = [(0, 50), (50, 57), (57, 77)]
    assert all(all(any(lo <= i < hi for i in b) for lo, hi in ranges) for b in seg)  # mixed: every dataset
    small = [i for b in seg for i in b if 50 <= i < 57]
    assert set(small) == set(range(50, 57)) and max(np.bincount(small)) - min(np.bincount(small)[50:]) <= 1


def test_single_task_batches_and_determinism():
    s = TaskBatchSampler([10, 10], batch_size=4, mix=False, seed=2, num_batches=6)
    batches = list(s)
    assert all(max(b) < 10 for b in batches[0::2]) and all(min(b) >= 10 for b in batches[1::2])
    assert batches == list(TaskBatchSampler([10, 10], batch_size=4, mix=False, seed=2, num_batches=6))
    assert batches != list(TaskBatchSampler([10, 10], batch_size=4, mix=False, seed=3, num_batches=6))


def test_sampler_resumes_exactly():
    a = TaskBatchSampler([13, 5], class_size=9, batch_size=4, seed=7, num_batches=30)
    full = list(a)
    b = TaskBatchSampler([13, 5], class_size=9, batch_size=4, seed=7, num_batches=30)
    first = [b.next_batch() for _ in range(11)]
    c = TaskBatchSampler([13, 5], class_size=9, batch_size=4, seed=7, num_batches=19)
    c.load_state_dict(b.state_dict())
    assert first + list(c) == full
    with pytest.raises(ValueError):
        TaskBatchSampler([], 0)


def test_training_samples_from_patches(tmp_path):
    from cerberus_histo.data.patches import extract_patches
    from cerberus_histo.data.synthetic import write_patches, write_tiles
    from cerberus_histo.train.data import PatchSet, TrainingSet, patch_files

    write_tiles(tmp_path / "tiles", 3, 160, seed=2, progress=False)
    write_patches(tmp_path / "pc", 1, 80, seed=2, progress=False)
    extract_patches(tmp_path / "tiles", tmp_path / "p", win_size=128, step_size=96, progress=False)
    extract_patches(tmp_path / "pc", tmp_path / "p", progress=False)
    cfg = ModelConfig.preset("original", encoder="tiny", patch_shape=96, class_patch_shape=64)
    gland = PatchSet(patch_files(tmp_path / "p" / "synthetic-tiles", [1, 2]), ("gland-inst", "gland-type"), cfg)
    nuclei = PatchSet(patch_files(tmp_path / "p" / "synthetic-tiles", [3]), ("nuclei-inst",), cfg)
    tissue = PatchSet(patch_files(tmp_path / "p" / "synthetic-patches"), ("tissue-class",), cfg)
    data = TrainingSet([gland, nuclei], tissue)
    assert data.seg_sizes == [len(gland), len(nuclei)] and data.class_size == 9
    s = data[(0, 5)]
    assert s["image"].shape == (3, 96, 96) and s["has/gland-inst"] and not s["has/nuclei-inst"]
    assert set(np.unique(s["target/gland-inst"])) <= {0, 1, 2} and s["weight/gland-inst"].min() >= 1
    assert not s["target/nuclei-inst"].any() and not s["has/tissue-class"]
    assert np.array_equal(data[(0, 5)]["image"], s["image"]) and not np.array_equal(data[(0, 6)]["image"], s["image"])
    c = data[(len(data) - 1, 1)]
    assert c["image"].shape == (3, 64, 64) and c["has/tissue-class"]
    assert tissue.files[-1].stem == "stroma_00000" and int(c["target/tissue-class"]) == 5
    sampler = TaskBatchSampler(data.seg_sizes, data.class_size, batch_size=4, seed=0, num_batches=5, with_seeds=True)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
    model = Cerberus(cfg).train()
    for batch in loader:
        present = [h for h in model.head_names if batch[f"has/{h}"].any()]
        total, _ = multitask_loss(cfg, model(batch["image"], heads=present), batch)
        assert torch.isfinite(total)


def test_params_for_heads_this_run_lacks_are_ignored_and_typos_refused():
    """One params.yaml serves runs of several head sets (docs/training.md): known heads the run does not train are
    ignored with a warning; a name that is no head at all is a one-line error."""
    import warnings

    from cerberus_histo.errors import ConfigError
    from cerberus_histo.train.config import TrainConfig
    from cerberus_histo.train.run import _with_overrides

    cfg = ModelConfig.preset("nuclei", encoder="tiny")
    shared = TrainConfig(heads={"gland-inst": {"loss_weight": 1.4}, "nuclei-inst": {"loss_weight": 2.0}},
                 class_weights={"nuclei": [0, 12, 1, 2, 6, 12, 2]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _with_overrides(cfg, shared)
    assert [str(w.message) for w in caught] == ["params: gland-inst not in this run's model; ignored"]
    assert out.task("nuclei").head("inst").loss_weight == 2.0
    with pytest.raises(ConfigError, match="no head or task gland-typ;"):
        _with_overrides(cfg, TrainConfig(heads={"gland-typ": {"loss_weight": 1.0}}))
