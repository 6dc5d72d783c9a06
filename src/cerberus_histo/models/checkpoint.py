"""Model folders: save, load, import the original Cerberus release, load ImageNet encoder weights.

A Cerberus model folder holds ``model.yaml`` (the :class:`ModelConfig` plus provenance) and ``weights.pt``
(a plain state dict). Weight files are only ever read with ``torch.load(..., weights_only=True)``: a file
carrying arbitrary Python objects is refused, never unpickled.

An original Cerberus model folder (TissueImageAnalytics/cerberus) holds ``settings.yml`` and
``weights.tar``, a dict whose key ``desc`` is the state dict (keys may start with ``module.``). Its modules
map one to one onto ours (see :func:`map_original_key`); only the unused ImageNet classifier
``backbone.fc.*`` is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
import yaml

from .._version import __version__
from ..config import ModelConfig
from ..errors import CerberusError
from ..io.files import atomic_write, read_yaml_mapping
from ..tasks import TaskSpec, get_task
from .encoders import ENCODERS, imagenet_state_dict
from .net import CerberusNet

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "weights.pt"
FORMAT = "cerberus-histo model"
FORMAT_VERSION = 1

ORIGINAL_SETTINGS = "settings.yml"
ORIGINAL_WEIGHTS = "weights.tar"
#: original decoder name -> (task, head kind, original output-head name)
ORIGINAL_DECODERS = {
    "Gland": ("gland", "inst", "INST"),
    "Gland#TYPE": ("gland", "type", "TYPE"),
    "Lumen": ("lumen", "inst", "INST"),
    "Nuclei": ("nuclei", "inst", "INST"),
    "Nuclei#TYPE": ("nuclei", "type", "TYPE"),
    "Patch-Class": ("tissue", "class", "OUT"),
}
ORIGINAL_ENCODERS = ("resnet18", "resnet34", "resnet50")


# ---- reading weight files safely ---------------------------------------------------------------------


def read_weights(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, empty, corrupt or unsafe files."""
    return _read_weights(Path(path))[0]


def _read_weights(path: Path) -> tuple[dict, str]:
    """The loaded object and the file's SHA-256, from one read of the file."""
    if not path.is_file():
        raise CerberusError(f"{path}: weights file not found")
    data = path.read_bytes()
    if not data:
        raise CerberusError(f"{path} is empty (0 bytes); copy or re-save the weights file")
    corrupt = f"{path} is truncated, corrupt or not a PyTorch weights file"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols while failing; the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "Unsupported class" in str(exc):
            raise CerberusError(
                f"{path} holds Python objects other than tensors and was not unpickled (weights_only=True); "
                "re-save only the state dict with torch.save(model.state_dict(), path)"
            ) from None
        raise CerberusError(f"{corrupt}; re-copy it or re-save it with torch.save") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise CerberusError(f"{corrupt} ({_first_line(exc)}); re-copy it or re-save it with torch.save") from None
    if not isinstance(obj, dict):
        raise CerberusError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    return obj, hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # the first sentence: torch's zip reader goes on with advice about its own internals, cut off mid-sentence
    return (text[0].split(". ")[0] if text else type(exc).__name__)[:160]


def _tensor_dict(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CerberusError(f"{path} is not a state dict: entry {bad[0]!r} is not a named tensor")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state`` into ``module`` with no missing, unexpected or mis-shaped key, else one clear error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {items[0]})")
        raise CerberusError(f"{source} does not fit {what}: {'; '.join(parts)}; is it a checkpoint of another model?")
    module.load_state_dict(state, strict=True)


# ---- our model folders ------------------------------------------------------------------------------


def save_atomic(path: str | Path, obj) -> None:
    """``torch.save(obj)`` written atomically (:func:`~cerberus_histo.io.files.atomic_write`): serialised in memory
    first, so a write that finds no room is a one-line error naming ``path`` (``torch.save`` on a file keeps no
    errno) and never a truncated file under ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(buf.getbuffer()))


def save_model(model: CerberusNet, folder: str | Path) -> Path:
    """Write ``model.yaml`` and ``weights.pt`` into ``folder`` (created if needed), each atomically."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CerberusError(f"{folder} exists and is not a folder; choose another output path")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "software": {"cerberus_histo": __version__, "torch": torch.__version__.split("+")[0]},
        "model": model.config.to_dict(),
    }
    if model.provenance:
        meta["provenance"] = model.provenance
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_atomic(folder / WEIGHTS_FILE, state)
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(yaml.safe_dump(meta, sort_keys=False)))
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu", cls: type = CerberusNet) -> CerberusNet:
    """Rebuild a model (a ``cls``, by default the bare network) from a Cerberus model folder or an original
    Cerberus model folder; eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CerberusError(f"{folder}: model folder not found")
    if (folder / CONFIG_FILE).is_file():
        meta = read_yaml_mapping(folder / CONFIG_FILE)
        if meta.get("format") != FORMAT or "model" not in meta:
            raise CerberusError(f"{folder / CONFIG_FILE} is not a Cerberus model description (no 'format: {FORMAT}')")
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
            raise CerberusError(f"{folder} was written by a newer cerberus-histo (or has a bad format_version); "
                                "upgrade the package to load it")
        config = ModelConfig.from_dict(meta["model"])
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CerberusError(f"{weights} is missing: a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        model = cls(config)
        state = _tensor_dict(read_weights(weights), weights)
        load_state_strict(model, state, str(weights), f"the model described in {CONFIG_FILE}")
        model.provenance = dict(meta.get("provenance") or {})
    elif (folder / ORIGINAL_SETTINGS).is_file() or (folder / ORIGINAL_WEIGHTS).is_file():
        model = import_original(folder, cls)
    else:
        raise CerberusError(
            f"{folder} holds no model: expected {CONFIG_FILE} + {WEIGHTS_FILE} (a Cerberus model) "
            f"or {ORIGINAL_SETTINGS} + {ORIGINAL_WEIGHTS} (an original Cerberus release)"
        )
    return model.to(device).eval()


def load_encoder_weights(model: CerberusNet, path: str | Path) -> None:
    """Load a torchvision-format ImageNet state dict (``conv1.weight``, ``layer1.0.conv1.weight`` ...) into
    the encoder. The classifier ``fc.*`` is ignored; any other mismatch is an error."""
    path = Path(path)
    if not ENCODERS[model.config.encoder].imagenet_keys:
        raise CerberusError(f"encoder {model.config.encoder!r} has no ImageNet weights; use resnet18/34/50")
    obj = read_weights(path)
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    state = imagenet_state_dict(_tensor_dict(obj, path))
    load_state_strict(model.encoder, state, str(path), f"the {model.config.encoder} encoder")


# ---- the original Cerberus release ------------------------------------------------------------------

_DEC = re.compile(r"^decoder_head\.(?P<dec>[^.]+)\.(?P<lvl>\d+)\.block\.(?P<layer>\d+)\.(?P<rest>.+)$")
_OUT_BLOCK = re.compile(r"^output_head\.(?P<dec>[^.]+)\.(?P<out>[^.]+)\.x\.0\.block\.0\.(?P<rest>.+)$")
_OUT_CONV = re.compile(r"^output_head\.(?P<dec>[^.]+)\.(?P<out>[^.]+)\.x\.1\.conv\.(?P<rest>.+)$")


def map_original_key(key: str) -> str | None:
    """Our state-dict key for a key of the original ``NetDesc`` (``module.`` already stripped).

    Returns ``None`` for the unused ImageNet classifier ``backbone.fc.*`` and the key unchanged (so that
    it shows up as unexpected) for anything unknown.
    """
    if key.startswith("backbone.fc."):
        return None
    if key.startswith("backbone."):
        return "encoder." + key[len("backbone."):]
    if key == "conv_map.weight":
        return "bottleneck.weight"
    if key.startswith("decoder_head.Patch-Class."):
        return "heads.tissue-class." + key[len("decoder_head.Patch-Class."):]
    for pattern, fmt in ((_DEC, "heads.{h}.blocks.{lvl}.{layer}.{rest}"), (_OUT_BLOCK, "heads.{h}.out.0.{rest}"),
                         (_OUT_CONV, "heads.{h}.out.1.{rest}")):
        m = pattern.match(key)
        if m and m["dec"] in ORIGINAL_DECODERS:
            task, kind, out_name = ORIGINAL_DECODERS[m["dec"]]
            if "out" in m.groupdict() and m["out"] != out_name:
                return key
            return fmt.format(h=f"{task}-{kind}", **{k: v for k, v in m.groupdict().items() if k not in ("dec", "out")})
    return key


def config_from_original_settings(settings: dict, source: str = ORIGINAL_SETTINGS, weight_keys=()) -> ModelConfig:
    """Translate an original ``settings.yml`` into a :class:`ModelConfig` (errors name the bad key).

    Settings written by the original training code lack ``considered_tasks``; the decoders are then taken
    from the weights' keys (``weight_keys``, ``module.`` stripped).
    """
    mk = settings.get("model_kwargs")
    if not isinstance(mk, dict):
        raise CerberusError(f"{source}: no 'model_kwargs' mapping; is this an original Cerberus settings.yml?")
    encoder = mk.get("encoder_backbone_name")
    if encoder not in ORIGINAL_ENCODERS:
        raise CerberusError(
            f"{source}: model_kwargs.encoder_backbone_name {encoder!r} is not supported; "
            f"supported: {', '.join(ORIGINAL_ENCODERS)} (the densenet, mobilenet, unet and dsf encoders are not ported)"
        )
    tasks_listed = mk.get("considered_tasks") or [
        d for d in ORIGINAL_DECODERS if any(k.startswith(f"decoder_head.{d}.") for k in weight_keys)
    ]
    decoders = mk.get("decoder_kwargs") or {}
    if not tasks_listed:
        raise CerberusError(
            f"{source}: model_kwargs.considered_tasks is missing and the weights name no decoder; "
            f"add the decoder names, e.g. [{', '.join(ORIGINAL_DECODERS)}]"
        )
    heads: dict[str, dict[str, int]] = {}
    for dec in tasks_listed:
        if dec not in ORIGINAL_DECODERS:
            raise CerberusError(f"{source}: unknown decoder {dec!r} in considered_tasks; known: {', '.join(ORIGINAL_DECODERS)}")
        task, kind, out_name = ORIGINAL_DECODERS[dec]
        outs = decoders.get(dec, {out_name: None})
        if not isinstance(outs, dict) or set(outs) != {out_name}:
            raise CerberusError(f"{source}: decoder_kwargs.{dec} must be {{{out_name}: channels}}, got {outs!r}")
        heads.setdefault(task, {})[kind] = outs[out_name]
    names = settings.get("type_names") or {}
    dk = settings.get("dataset_kwargs") or {}
    codes = dk.get("req_target_code") or {}
    specs = []
    for task_name in ("gland", "lumen", "nuclei", "tissue"):
        if task_name not in heads:
            continue
        spec = get_task(task_name)
        class_names = tuple(names.get(task_name) or spec.class_names)
        if class_names != spec.class_names:
            spec = _renamed(spec, class_names)
        for kind, channels in heads[task_name].items():
            if kind == "inst" and channels not in (None, 3):
                raise CerberusError(
                    f"{source}: the {task_name} inst head has {channels} outputs; only the 3-class "
                    "IP-ERODED-CONTOUR target (background, interior, contour) is supported"
                )
            if channels is not None and kind != "inst" and channels != len(class_names):
                raise CerberusError(
                    f"{source}: the {task_name} {kind} head has {channels} outputs but type_names.{task_name} "
                    f"lists {len(class_names)} classes"
                )
        code = codes.get(f"{task_name.capitalize()}-INST", "")
        m = re.fullmatch(r"IP-ERODED-CONTOUR-(\d+)", str(code))
        kernel = int(m.group(1)) if m else spec.inst_kernel
        kept = tuple(h for h in spec.heads if h.kind in heads[task_name])
        specs.append(dataclasses.replace(spec, heads=kept, inst_kernel=kernel))
    return ModelConfig(tasks=tuple(specs), encoder=encoder, stem_stride=1,
                       patch_shape=int(dk.get("input_shape", 448)), class_patch_shape=int(dk.get("class_input_shape", 144)))


def _renamed(spec: TaskSpec, class_names: tuple[str, ...]) -> TaskSpec:
    """A built-in task with other class names: colours from a fixed palette, class weights reset to 1."""
    palette = [(0, 0, 0)] + [tuple(int(v) for v in ((i * 97) % 256, (i * 57 + 80) % 256, (i * 151 + 40) % 256))
                             for i in range(1, len(class_names))]
    weights = None if spec.class_weights is None else (0.0,) + (1.0,) * (len(class_names) - 1)
    return dataclasses.replace(spec, class_names=class_names, class_colors=tuple(palette), class_weights=weights)


def import_original(folder: str | Path, cls: type = CerberusNet) -> CerberusNet:
    """Build a network (a ``cls``) from an original model folder (``settings.yml`` + ``weights.tar``)."""
    folder = Path(folder)
    settings_path, weights_path = folder / ORIGINAL_SETTINGS, folder / ORIGINAL_WEIGHTS
    for p in (settings_path, weights_path):
        if not p.is_file():
            raise CerberusError(f"{p} is missing: an original Cerberus model folder holds {ORIGINAL_SETTINGS} and {ORIGINAL_WEIGHTS}")
    obj, sha256 = _read_weights(weights_path)
    if "desc" in obj:
        obj = obj["desc"]
        if not isinstance(obj, dict):
            raise CerberusError(f"{weights_path}: 'desc' is not a state dict")
    original = _tensor_dict(obj, weights_path)
    config = config_from_original_settings(read_yaml_mapping(settings_path), str(settings_path), original.keys())
    state = {}
    for key, value in original.items():
        new = map_original_key(key)
        if new is not None:
            state[new] = value
    model = cls(config)
    if model.bottleneck is None:  # the original builds conv_map even when only the patch head uses the encoder
        state.pop("bottleneck.weight", None)
    load_state_strict(model, state, str(weights_path), f"the architecture in {ORIGINAL_SETTINGS} ({config.encoder}, "
                      f"heads {', '.join(config.head_names)})")
    model.provenance = {"imported_from": str(folder.resolve()), "weights_sha256": sha256}
    return model.eval()

