import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_clean_error, run_cli
from original_net import OUTPUT_NAMES, SETTINGS, OriginalNet, randomise

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.errors import CerberusError
from cerberus_histo.models.checkpoint import import_original, load_encoder_weights, map_original_key

TSV = Path(__file__).parent / "data" / "original-cerberus-state-dict.tsv"  # a copy of ../shared/reference's list


def _tsv_rows():
    rows = []
    for line in TSV.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return rows


def _write_original(folder: Path, state: dict, settings: dict = SETTINGS, prefix: str = "module.") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.yml").write_text(yaml.safe_dump(settings))
    desc = {prefix + k: v for k, v in state.items()}
    # released/training checkpoints also carry optimizer state: plain containers and tensors are fine
    torch.save({"desc": desc, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}},
               folder / "weights.tar")
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original-format model folder with random weights, and the network that made it."""
    torch.manual_seed(0)
    net = randomise(OriginalNet())
    folder = _write_original(tmp_path_factory.mktemp("orig") / "cerberus_release", net.state_dict())
    return folder, net


def test_reference_net_has_exactly_the_released_keys():
    rows = _tsv_rows()
    state = OriginalNet().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, s) for k, s, _ in rows]
    assert sum(math.prod(s) for k, s, _ in rows if "running" not in k and "num_batches" not in k) == 28_377_284


def test_checkpoint_with_the_tsv_keys_imports_strictly(tmp_path):
    """A checkpoint with exactly the released keys and shapes maps onto every key of our model, none left over."""
    state = {}
    for key, shape, dtype in _tsv_rows():
        state[key] = torch.zeros(shape, dtype=torch.int64) if dtype == "torch.int64" else torch.randn(shape)
    mapped = {map_original_key(k): v for k, v in state.items()}
    dropped = mapped.pop(None, None)
    assert dropped is not None  # backbone.fc.* only
    assert [k for k in state if map_original_key(k) is None] == ["backbone.fc.weight", "backbone.fc.bias"]
    model = Cerberus(ModelConfig.preset("original"))
    assert set(mapped) == set(model.state_dict())  # no missing, no unexpected
    folder = _write_original(tmp_path / "tsv", state)
    imported = import_original(folder)  # strict: raises on any missing/unexpected/mis-shaped key
    assert torch.equal(imported.state_dict()["bottleneck.weight"], state["conv_map.weight"])
    assert torch.equal(imported.state_dict()["heads.tissue-class.conv2.bias"], state["decoder_head.Patch-Class.conv2.bias"])


@pytest.mark.parametrize("size", [144, 160])
def test_imported_model_reproduces_original_logits(original, size):
    folder, net = original
    model = Cerberus.load(folder)  # an original folder loads directly
    _compare(net, model, size)


@pytest.mark.slow
def test_imported_model_reproduces_original_logits_at_448(original):
    folder, net = original
    _compare(net, Cerberus.load(folder), 448)


def _compare(net, model, size):
    x = torch.randint(0, 256, (2, 3, size, size)).float()
    with torch.no_grad():
        ref = net(x)
        ours = model(x)
    assert set(OUTPUT_NAMES[k] for k in ref) == set(ours)
    for key, value in ref.items():
        mine = ours[OUTPUT_NAMES[key]]
        value = value.flatten(1) if key == "Patch-Class" else value
        assert mine.shape == value.shape
        torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-5)


def test_import_original_cli_and_reload(original, tmp_path):
    folder, net = original
    dst = tmp_path / "converted"
    proc = run_cli("import-original", folder, dst)
    assert proc.returncode == 0, proc.stderr
    assert "resnet34" in proc.stdout and "27,864,284" in proc.stdout
    model = Cerberus.load(dst)
    assert model.provenance["imported_from"].endswith("cerberus_release")
    assert len(model.provenance["weights_sha256"]) == 64
    _compare(net, model, 144)
    assert_clean_error(run_cli("import-original", folder, dst), "--force")
    assert run_cli("import-original", folder, dst, "--force").returncode == 0
    info = run_cli("info", dst)
    assert info.returncode == 0 and "nuclei" in info.stdout and "neutrophil" in info.stdout


def test_import_subset_of_tasks(tmp_path):
    settings = yaml.safe_load(yaml.safe_dump(SETTINGS))
    settings["model_kwargs"]["considered_tasks"] = ["Gland", "Lumen", "Patch-Class"]
    net = randomise(OriginalNet(considered_tasks=settings["model_kwargs"]["considered_tasks"]))
    model = import_original(_write_original(tmp_path / "sub", net.state_dict(), settings, prefix=""))
    assert model.head_names == ("gland-inst", "lumen-inst", "tissue-class")
    _compare(net, model, 144)


@pytest.mark.parametrize("preset, encoder", [("original", "tiny"), ("nuclei", "resnet18"), ("tissue", "tiny")])
def test_save_load_identical(tmp_path, preset, encoder):
    model = Cerberus(ModelConfig.preset(preset, encoder=encoder, stem_stride=2))
    # move BatchNorm statistics away from their defaults
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    model.eval()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.yaml", "weights.pt"]
    again = Cerberus.load(tmp_path / "m")
    assert again.config == model.config and not again.training
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(x), again(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_weights_load_into_encoder(tmp_path):
    """A torchvision-format ImageNet file (with its fc classifier) loads into the encoder."""
    source = Cerberus(ModelConfig.preset("nuclei", encoder="resnet18"))
    state = {k: v for k, v in source.encoder.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    torch.save(state, tmp_path / "resnet18-imagenet.pth")
    model = Cerberus(ModelConfig.preset("original", encoder="resnet18"))
    load_encoder_weights(model, tmp_path / "resnet18-imagenet.pth")
    assert torch.equal(model.encoder.layer4[1].conv2.weight, source.encoder.layer4[1].conv2.weight)
    wrong = Cerberus(ModelConfig.preset("original", encoder="resnet34"))
    with pytest.raises(CerberusError, match="does not fit the resnet34 encoder"):
        load_encoder_weights(wrong, tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(CerberusError, match="no ImageNet weights"):
        load_encoder_weights(Cerberus(ModelConfig.preset("nuclei", encoder="tiny")), tmp_path / "resnet18-imagenet.pth")


# ---- bad input: one line, exit code 2, no traceback --------------------------------------------------------


class _Payload:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def tiny_folder(tmp_path):
    return Cerberus(ModelConfig.preset("nuclei", encoder="tiny")).save(tmp_path / "tiny")


def test_bad_model_folders(tmp_path, tiny_folder):
    assert_clean_error(run_cli("info", tmp_path / "nope"), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("info", tmp_path / "empty"), "holds no model")
    (tiny_folder / "weights.pt").unlink()
    assert_clean_error(run_cli("info", tiny_folder), "weights.pt is missing")


def test_truncated_corrupt_and_empty_weights(tmp_path, tiny_folder):
    weights = tiny_folder / "weights.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("info", tiny_folder), "truncated, corrupt")
    weights.write_bytes(b"\x80\x02 not a checkpoint at all" * 10)
    assert_clean_error(run_cli("info", tiny_folder), "truncated, corrupt")
    weights.write_bytes(b"")
    assert_clean_error(run_cli("info", tiny_folder), "empty")
    (tiny_folder / "model.yaml").write_text("model: [unclosed")
    assert_clean_error(run_cli("info", tiny_folder), "not valid YAML")


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, original):
    folder, net = original
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "settings.yml").write_text((folder / "settings.yml").read_text())
    torch.save({"desc": net.state_dict(), "extra": _Payload(marker)}, evil / "weights.tar")
    proc = run_cli("import-original", evil, tmp_path / "out")
    assert_clean_error(proc, "not unpickled")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_checkpoint_of_another_architecture(tmp_path):
    net18 = OriginalNet(encoder="resnet18")
    folder = _write_original(tmp_path / "r18", net18.state_dict())  # settings say resnet34
    assert_clean_error(run_cli("import-original", folder, tmp_path / "out"), "does not fit", "missing")
    assert not (tmp_path / "out").exists()
    tiny = Cerberus(ModelConfig.preset("nuclei", encoder="tiny")).save(tmp_path / "tiny")
    other = Cerberus(ModelConfig.preset("glands", encoder="tiny")).state_dict()
    torch.save(other, tiny / "weights.pt")
    assert_clean_error(run_cli("info", tiny), "does not fit")


@pytest.mark.parametrize("edit, words", [
    (lambda s: s["model_kwargs"].update(encoder_backbone_name="densenet121"), ["densenet121", "supported"]),
    (lambda s: s["model_kwargs"]["considered_tasks"].append("Mitosis"), ["Mitosis"]),
    (lambda s: s["model_kwargs"]["decoder_kwargs"].update({"Nuclei#TYPE": {"TYPE": 5}}), ["nuclei type", "5 outputs"]),
])
def test_bad_original_settings(tmp_path, original, edit, words):
    folder, _ = original
    settings = yaml.safe_load((folder / "settings.yml").read_text())
    settings["type_names"] = {"nuclei": ["nolabel", "a", "b", "c", "d", "e", "f"]}
    edit(settings)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "settings.yml").write_text(yaml.safe_dump(settings))
    (bad / "weights.tar").write_bytes((folder / "weights.tar").read_bytes())
    assert_clean_error(run_cli("import-original", bad, tmp_path / "out"), *words)


def test_settings_without_considered_tasks_take_the_heads_from_the_weights(tmp_path):
    """The original training code wrote settings.yml without considered_tasks (its bug 10.1.3)."""
    settings = yaml.safe_load(yaml.safe_dump(SETTINGS))
    del settings["model_kwargs"]["considered_tasks"]
    net = randomise(OriginalNet(considered_tasks=["Gland", "Gland#TYPE", "Patch-Class"]))
    model = import_original(_write_original(tmp_path / "trained", net.state_dict(), settings))
    assert model.head_names == ("gland-inst", "gland-type", "tissue-class")
    _compare(net, model, 144)
    only_encoder = {k: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    with pytest.raises(CerberusError, match="considered_tasks is missing"):
        import_original(_write_original(tmp_path / "bare", only_encoder, settings))


def test_original_folder_without_weights(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "settings.yml").write_text(yaml.safe_dump(SETTINGS))
    assert_clean_error(run_cli("import-original", tmp_path / "o", tmp_path / "out"), "weights.tar is missing")
