import pytest
import torch
import torch.nn.functional as F

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.config import IMAGENET_NORM, PRESETS
from cerberus_histo.errors import ConfigError
from cerberus_histo.models.encoders import ENCODERS, build_encoder

# ResNets at a size that keeps the suite fast; the narrow encoder at the guide's 64x64
SIZES = {"tiny": 64, "resnet18": 48, "resnet34": 48, "resnet50": 32}


def _loss(name: str, logits: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    if logits.ndim == 2:  # patch class
        target = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g)
    else:
        target = torch.randint(0, logits.shape[1], (logits.shape[0], *logits.shape[2:]), generator=g)
    return F.cross_entropy(logits, target)


def _owner(model: Cerberus, param_name: str) -> str:
    """Which part of the model a parameter belongs to: 'encoder', 'bottleneck' or a head name."""
    part = param_name.split(".")[0]
    return param_name.split(".")[1] if part == "heads" else part


def test_registry_covers_required_encoders():
    assert {"resnet18", "resnet34", "resnet50", "tiny"} <= set(ENCODERS)
    with pytest.raises(ConfigError, match="registered encoders"):
        build_encoder("vit_h")


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", "resnet50"])
def test_resnets_use_torchvision_key_names(encoder):
    keys = set(build_encoder(encoder).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var", "layer4.1.bn2.weight"} <= keys
    if encoder == "resnet50":
        assert "layer1.0.conv3.weight" in keys and "layer1.0.downsample.0.weight" in keys


@pytest.mark.parametrize("stem_stride, strides", [(1, (1, 2, 4, 8, 16)), (2, (2, 4, 8, 16, 32))])
def test_encoder_strides(stem_stride, strides):
    enc = build_encoder("resnet18", stem_stride)
    feats = enc(torch.zeros(1, 3, 64, 64))
    assert enc.strides == strides
    assert [f.shape[-1] for f in feats] == [64 // s for s in strides]
    assert [f.shape[1] for f in feats] == list(enc.channels)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_forward_backward_every_encoder_and_preset(encoder, preset):
    size = SIZES.get(encoder, 64)
    model = Cerberus(ModelConfig.preset(preset, encoder=encoder)).train()
    out = model(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert set(out) == set(model.config.head_names)
    for name in out:
        task, head = model.config.head(name)
        n = task.num_outputs(head.kind)
        expected = (2, n) if head.kind == "class" else (2, n, size, size)
        assert tuple(out[name].shape) == expected
        assert torch.isfinite(out[name]).all()
    sum(_loss(k, v) for k, v in out.items()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_each_head_trains_only_its_decoder():
    """A head's loss reaches the encoder, its own decoder and (for dense heads) the bottleneck; nothing else."""
    model = Cerberus(ModelConfig.preset("original", encoder="tiny")).train()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    for head in model.head_names:
        model.zero_grad(set_to_none=True)
        _loss(head, model(x)[head]).backward()
        expected = {"encoder", head} | ({"bottleneck"} if head != "tissue-class" else set())
        for name, p in model.named_parameters():
            got = p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert got == (_owner(model, name) in expected), (head, name)


def test_decoders_of_absent_tasks_are_not_run():
    model = Cerberus(ModelConfig.preset("original", encoder="tiny")).train()
    present = ("gland-inst", "gland-type", "lumen-inst")  # a gland dataset's batch: no nuclei, no tissue
    out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), heads=present)
    assert tuple(out) == present
    sum(_loss(k, v) for k, v in out.items()).backward()
    for name, p in model.named_parameters():
        owner = _owner(model, name)
        if owner in ("nuclei-inst", "nuclei-type", "tissue-class"):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    with pytest.raises(ConfigError, match="no head"):
        model(torch.zeros(1, 3, 32, 32), heads=["mitosis-inst"])


@pytest.mark.parametrize("shape, stem_stride", [((50, 70), 1), ((64, 96), 2), ((30, 30), 2)])
def test_any_input_size_gives_full_resolution_logits(shape, stem_stride):
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", stem_stride=stem_stride)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *shape))
    assert out["nuclei-inst"].shape[-2:] == shape and out["tissue-class"].shape == (1, 9)


def test_patch_class_head_works_with_wide_encoders():
    model = Cerberus(ModelConfig.preset("tissue", encoder="resnet50", class_hidden=64)).eval()
    assert model.heads["tissue-class"].bn1.num_features == 2048
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 144, 144))["tissue-class"].shape == (2, 9)


def test_normalisation_is_declared_in_config():
    plain = Cerberus(ModelConfig.preset("nuclei", encoder="tiny"))
    imagenet = Cerberus(ModelConfig.preset("nuclei", encoder="tiny", norm=IMAGENET_NORM))
    x = torch.full((1, 3, 4, 4), 255.0)
    assert torch.equal(plain.normalise(x), torch.ones_like(x))
    expected = (1 - torch.tensor(IMAGENET_NORM.mean)) / torch.tensor(IMAGENET_NORM.std)
    assert torch.allclose(imagenet.normalise(x)[0, :, 0, 0], expected)
    # uint8 and float inputs give the same result
    u8 = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(plain.normalise(u8), plain.normalise(u8.float()))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        plain(torch.zeros(3, 8, 8))


def test_only_configured_tasks_are_built():
    model = Cerberus(ModelConfig.preset("nuclei", encoder="tiny"))
    assert model.head_names == ("nuclei-inst", "nuclei-type")
    original = Cerberus(ModelConfig.preset("original", encoder="tiny"))
    assert model.num_parameters() < original.num_parameters()


def test_original_preset_parameter_count():
    # The original resnet34 model has 28,377,284 parameters, of which 513,000 are the ImageNet classifier
    # (backbone.fc) that it never uses; Cerberus does not build that layer.
    model = Cerberus(ModelConfig.preset("original"))
    assert model.num_parameters() == 28_377_284 - 513_000


def test_same_seed_same_model():
    torch.manual_seed(3)
    a = Cerberus(ModelConfig.preset("glands", encoder="tiny"))
    torch.manual_seed(3)
    b = Cerberus(ModelConfig.preset("glands", encoder="tiny"))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
