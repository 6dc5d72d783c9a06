"""The network: encoders, decoders and heads, the :class:`CerberusNet` module, and checkpoints."""

from .checkpoint import import_original, load_encoder_weights, load_model, save_model
from .encoders import ENCODERS, build_encoder, register_encoder
from .net import CerberusNet

__all__ = [
    "CerberusNet", "ENCODERS", "build_encoder", "register_encoder", "import_original", "load_encoder_weights",
    "load_model", "save_model",
]
