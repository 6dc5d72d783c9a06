"""Cerberus: one multi-task network for glands, lumina, nuclei and tissue types in H&E images.

``from cerberus_histo import Cerberus, ModelConfig`` gives the model and its configuration. Importing the
package itself does not import torch, so post-processing and metrics stay light.
"""

from __future__ import annotations

from ._version import __version__

__all__ = ["Cerberus", "ModelConfig", "TaskSpec", "HeadSpec", "CerberusError", "__version__"]


def __getattr__(name: str):
    if name == "Cerberus":
        from .api import Cerberus

        return Cerberus
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name in ("TaskSpec", "HeadSpec"):
        from . import tasks

        return getattr(tasks, name)
    if name == "CerberusError":
        from .errors import CerberusError

        return CerberusError
    raise AttributeError(f"module 'cerberus_histo' has no attribute {name!r}")
