"""The network: encoders, decoders and heads, the :class:`Cerberus` model, and checkpoints."""

from .checkpoint import import_original, load_encoder_weights, load_model, save_model
from .encoders import ENCODERS, build_encoder, register_encoder
from .net import Cerberus

__all__ = [
    "Cerberus", "ENCODERS", "build_encoder", "register_encoder", "import_original", "load_encoder_weights",
    "load_model", "save_model",
]
