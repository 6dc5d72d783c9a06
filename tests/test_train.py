"""Training runs end to end: the CLI, run folder, exact resume, stage 2, DDP, configs and bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_clean_error, run_cli

from cerberus_histo import Cerberus
from cerberus_histo.data.patches import extract_patches
from cerberus_histo.data.synthetic import write_patches, write_tiles
from cerberus_histo.errors import CerberusError, ConfigError
from cerberus_histo.train.config import TrainConfig
from cerberus_histo.train.datamodule import Source
from cerberus_histo.train.run import train

SMALL = {"batch_size": 2, "class_batch_size": 4, "val_every": 3, "val_max_samples": 4,
         "model": {"encoder": "tiny", "patch_shape": 64, "class_patch_shape": 48}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Three partly-labelled tile datasets (gland, lumen, nuclei) and a tissue-class set, as patches."""
    root = tmp_path_factory.mktemp("train-data")
    out = {}
    for i, task in enumerate(("gland", "lumen", "nuclei")):
        spec = write_tiles(root / task, 6, 96, seed=i, tasks=(task,), name=f"synth-{task}", progress=False)
        extract_patches(spec.root, root / "patches", 96, 48, "mirror", progress=False)
        out[task] = root / "patches" / f"synth-{task}"
    spec = write_patches(root / "tissue", 2, 64, progress=False)
    extract_patches(spec.root, root / "patches", progress=False)
    out["pclass"] = root / "patches" / spec.name
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(SMALL))
    out["params"] = params
    return out


def _sources(data, nuclei_type=True):
    return [Source(data["gland"], ("gland-inst", "gland-type")), Source(data["lumen"], ("lumen-inst",)),
            Source(data["nuclei"], ("nuclei-inst", "nuclei-type") if nuclei_type else ("nuclei-inst",)),
            Source(data["pclass"], ("tissue-class",))]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return Cerberus.load(folder).state_dict()


def test_cli_trains_one_model_from_separately_labelled_sets(data, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--gland-dir", data["gland"], "--gland-type", "--lumen-dir", data["lumen"],
                   "--nuclei", "--nuclei-dir", data["nuclei"], "--nuclei-type", "--pclass", "--pclass-dir",
                   data["pclass"], "--mix-target-in-batch", "--config", data["params"], "--max-steps", "6",
                   "--log-dir", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 6 steps" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 1
    assert set(summary["trained_heads"]) == {"gland-inst", "gland-type", "lumen-inst", "nuclei-inst",
                                             "nuclei-type", "tissue-class"}
    val = summary["validation"]
    for key in ("gland-inst/pq", "lumen-inst/dice", "nuclei-inst/pq", "nuclei-type/f1", "tissue-class/accuracy"):
        assert key in val and 0 <= val[key] <= 1, (key, val)
    # logs, checkpoints (periodic, last, best), configs beside the weights
    assert (run / "csv" / "metrics.csv").read_text().count("train/loss") == 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.ckpt", "best.ckpt", "step-000003.ckpt", "step-000006.ckpt"} <= names
    assert TrainConfig.from_yaml(run / "model" / "train.yaml").max_steps == 6
    # the final model loads and predicts every head
    model = Cerberus.load(run / "model")
    assert model.provenance["trained_with"] == "cerberus train" and model.provenance["steps"] == 6
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert set(out) == set(summary["trained_heads"])
    assert Cerberus.load(run / "model-best").config == model.config


def test_resume_continues_exactly(data, tmp_path):
    cfg = TrainConfig.from_yaml(data["params"]).replace(val_every=2, max_steps=6)
    full = train(_sources(data), tmp_path / "full", cfg, mix=True, progress=False)
    part = train(_sources(data), tmp_path / "part", cfg.replace(max_steps=4), mix=True, progress=False)
    assert part["steps"] == 4 and full["steps"] == 6
    at4 = _state(tmp_path / "part" / "model")
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["cerberus"]["sampler"]["step"] == 4
    assert ckpt["optimizer_states"][0]["state"], "optimizer moments are saved"
    resumed = train(_sources(data), tmp_path / "part", cfg, mix=True, resume="last", progress=False)
    assert resumed["steps"] == 6 and resumed["resumed_from_step"] == 4
    a, b = _state(tmp_path / "full" / "model"), _state(tmp_path / "part" / "model")
    for k in a:  # same batches, augmentation, dropout and optimizer state: identical weights
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(at4[k], a[k]) for k in a)  # and the two resumed steps did train


def test_stage2_changes_only_the_type_head(data, tmp_path):
    cfg = TrainConfig.from_yaml(data["params"]).replace(max_steps=3)
    train([Source(data["nuclei"], ("nuclei-inst",)), Source(data["pclass"], ("tissue-class",))], tmp_path / "s1",
          cfg, progress=False)
    stage1 = _state(tmp_path / "s1" / "model")
    assert not any(k.startswith("heads.nuclei-type.") for k in stage1)
    summary = train([Source(data["nuclei"], ("nuclei-type",))], tmp_path / "s2", cfg, subtype="nuclei",
                    pretrained=str(tmp_path / "s1" / "model"), progress=False)
    assert summary["trained_heads"] == ["nuclei-type"] and "new heads: nuclei-type" in summary["initialisation"]
    stage2 = _state(tmp_path / "s2" / "model")
    fresh = Cerberus(Cerberus.load(tmp_path / "s2" / "model").config)
    torch.manual_seed(cfg.seed)
    changed = set()
    for k, v in stage2.items():
        if k in stage1:
            # everything of stage 1, batch-norm running statistics included, is untouched
            assert torch.equal(v, stage1[k]), k
        else:
            assert k.startswith("heads.nuclei-type.")
            changed.add(k)
    assert changed and any(not torch.equal(stage2[k], fresh.state_dict()[k]) for k in changed
                           if stage2[k].is_floating_point())


def test_subtype_needs_a_model_folder(data, tmp_path):
    with pytest.raises(Exception, match="--pretrained"):
        train([Source(data["nuclei"], ("nuclei-type",))], tmp_path / "x", TrainConfig(**SMALL), subtype="nuclei")


def test_two_process_ddp_ends_with_identical_weights(data, tmp_path):
    run = tmp_path / "ddp"
    proc = run_cli("train", "--nuclei-dir", data["nuclei"], "--pclass-dir", data["pclass"], "--config",
                   data["params"], "--max-steps", "3", "--accelerator", "cpu", "--devices", "2", "--log-dir", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_identical_across_ranks"] is True
    assert summary["steps"] == 3
    Cerberus.load(run / "model")


def test_train_config_validation(tmp_path):
    cfg = TrainConfig(precision="bf16", optimizer={"lr": 0.01}, scheduler={"name": "cosine"})
    assert cfg.precision == "bf16-mixed" and cfg.optimizer.lr == 0.01 and cfg.scheduler.name == "cosine"
    cfg.save(tmp_path / "p.yaml")
    assert TrainConfig.from_yaml(tmp_path / "p.yaml") == cfg
    for bad, words in (({"batch_sise": 4}, "batch_sise"), ({"batch_size": "big"}, "batch_size"),
                       ({"optimizer": {"name": "lbfgs"}}, "optimizer.name"), ({"p_seg": 1.5}, "p_seg"),
                       ({"class_batch_size": 1}, "class_batch_size"), ({"precision": "int8"}, "precision"),
                       ({"optimizer": {"lr": -1}}, "optimizer.lr")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig.from_dict(bad)


@pytest.mark.parametrize("args, words", [
    (("--nuclei",), ("--nuclei", "--nuclei-dir")),
    (("--gland-type",), ("--gland-dir",)),
    ((), ("no data",)),
])
def test_cli_bad_task_flags(tmp_path, args, words):
    assert_clean_error(run_cli("train", *args, "--log-dir", tmp_path / "r"), *words)


@pytest.mark.slow
def test_tiny_model_overfits_nuclei(tmp_path, monkeypatch):
    """It really learns: a tiny model trained on four nuclei patches segments them with PQ > 0.8."""
    import cerberus_histo.train.datamodule as dm

    spec = write_tiles(tmp_path / "n", 3, 128, seed=3, tasks=("nuclei",), name="n", progress=False)
    extract_patches(spec.root, tmp_path / "p", 128, 64, "mirror", progress=False)
    files = sorted((tmp_path / "p" / "n").rglob("*.npz"))[:4]
    monkeypatch.setattr(dm, "fold_files", lambda folder, fold, strict=True: (files, files))  # validate on them
    cfg = TrainConfig(batch_size=4, max_steps=300, val_every=300, val_fraction=1.0, optimizer={"lr": 3e-3},
                      model={"encoder": "tiny", "patch_shape": 64})
    summary = train([Source(tmp_path / "p" / "n", ("nuclei-inst",))], tmp_path / "o", cfg, progress=False)
    assert summary["validation"]["nuclei-inst/pq"] > 0.8, summary["validation"]
    assert summary["samples_per_second"] > 0


def test_dataset_folder_is_extracted_and_bf16_trains(tmp_path):
    """A dataset folder (dataset.yaml) is cut into patches inside the run folder; bf16 autocast runs on CPU."""
    spec = write_tiles(tmp_path / "nuclei", 3, 96, seed=4, tasks=("nuclei",), name="n", progress=False)
    cfg = TrainConfig(**dict(SMALL, model={"encoder": "tiny", "patch_shape": 48}), max_steps=2, precision="bf16")
    summary = train([Source(spec.root, ("nuclei-inst", "nuclei-type"))], tmp_path / "run", cfg, progress=False)
    assert summary["steps"] == 2 and "nuclei-inst/pq" in summary["validation"]
    assert list((tmp_path / "run" / "patches" / "n" / "split_1").rglob("*.npz"))
    assert TrainConfig.from_yaml(tmp_path / "run" / "train.yaml").precision == "bf16-mixed"


def test_fold0_trains_without_validation_under_a_time_cap(data, tmp_path):
    cfg = TrainConfig(**SMALL, max_steps=2, max_minutes=5)
    summary = train([Source(data["nuclei"], ("nuclei-inst",))], tmp_path / "r", cfg, fold=0, progress=False)
    assert summary["steps"] == 2 and summary["validation"] == {}
    assert (tmp_path / "r" / "model" / "weights.pt").is_file() and not (tmp_path / "r" / "model-best").exists()


def test_a_source_without_the_fold_trains_on_all_its_patches(data, tmp_path):
    """GlaS has no split 3 (train, testA, testB -> 1, 2, 3 in the full release, only 1 in a sample): with --fold 3
    it only trains, while the sources that have split 3 validate on it."""
    spec = write_tiles(tmp_path / "one", 2, 96, seed=9, num_splits=1, tasks=("lumen",), name="one", progress=False)
    extract_patches(spec.root, tmp_path / "p", 96, 48, "mirror", progress=False)
    sources = [Source(data["nuclei"], ("nuclei-inst",)), Source(tmp_path / "p" / "one", ("lumen-inst",))]
    with pytest.warns(UserWarning, match="has no split 3: all its patches train"):
        train(sources, tmp_path / "r", TrainConfig(**SMALL, max_steps=2), fold=3, progress=False)
    saved = yaml.safe_load((tmp_path / "r" / "train.yaml").read_text())["sources"]
    assert [s["validated"] for s in saved] == [True, False]
    with pytest.raises(CerberusError, match="split_2"):
        train(sources[1:], tmp_path / "r2", TrainConfig(**SMALL, max_steps=2), fold=2, progress=False)
