"""The object users hold: :class:`Cerberus`, the network with the verbs ``load``, ``save``, ``predict_tile``,
``predict_wsi`` and ``classify_patches``.

It sits above the network (:mod:`.models`) and the inference code (:mod:`.infer`), which know nothing of it: the
``nn.Module`` (:class:`~.models.net.CerberusNet`) has only its layers and ``forward``, and inference takes any such
network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.checkpoint import load_model, save_model
from .models.net import CerberusNet


class Cerberus(CerberusNet):
    """The Cerberus multi-task model built from a :class:`~cerberus_histo.config.ModelConfig` (see
    :class:`~cerberus_histo.models.net.CerberusNet` for the network and ``forward``).

    A new model is in eval mode, ready to predict (``model.train()`` before training it by hand; ``cerberus train``
    and Lightning do that themselves).

    Example:
        >>> model = Cerberus(ModelConfig.preset("original"))
        >>> logits = model(torch.zeros(1, 3, 448, 448))      # {"gland-inst": 1x3x448x448, ...}
        >>> model.save("my_model"); same = Cerberus.load("my_model")
        >>> result = same.predict_tile(image, mpp=0.5)             # a TilePrediction
    """

    def __init__(self, config):
        super().__init__(config)
        self.eval()

    def save(self, folder: str | Path) -> Path:
        """Write ``model.yaml`` (the config) and ``weights.pt`` (the state dict) into ``folder``."""
        return save_model(self, folder)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Cerberus:
        """Rebuild a model from a folder written by :meth:`save`, or from an original Cerberus model
        folder (``settings.yml`` + ``weights.tar``), which is converted on the fly. Returned in eval mode."""
        return load_model(folder, device, cls=cls)

    def classify_patches(self, patches, head: str = "tissue-class", batch_size: int = 64):
        """Softmax probabilities (``N x C`` float32 NumPy array) of a ``class`` head for RGB patches (an ``N x H x W x
        3`` uint8 array, or a list of equal-sized ``H x W x 3`` arrays) at the model's mpp, ideally of
        ``config.class_patch_shape`` pixels: the patch head as trained, one class per patch. Runs on the model's
        device, in eval mode."""
        from .infer.engine import classify_patches

        return classify_patches(self, patches, head, batch_size)

    def predict_tile(self, image, mpp: float | None = None, **options):
        """Instances, type maps and the tissue map of one RGB image (``H x W x 3`` array; RGBA, grey and 16-bit
        are converted with a warning) as a :class:`~cerberus_histo.infer.results.TilePrediction`, from the model's
        trusted heads only (:attr:`trusted_heads`: a head never trained is not run; docs/outputs.md).

        ``mpp`` is the image's resolution; when it differs from the model's the image is resampled, and the
        result's ``scale`` maps its model-resolution coordinates back to image pixels. ``options`` go to
        :class:`~cerberus_histo.infer.engine.Predictor` (``batch_size``, ``device``, ``precision``, ``tta``,
        ``geometry`` or ``input_shape``/``output_shape`` ...); the model is put in eval mode and moved to
        ``device`` in place, like ``model.to``.
        """
        from .infer.tiles import predict_tile

        return predict_tile(self, image, mpp=mpp, **options)

    def predict_wsi(self, slide, output="cerberus-wsi", **settings):
        """Glands, lumina, nuclei and tissue classes of a whole slide, predicted chunk by chunk with bounded memory
        and written to ``output`` (a folder): the SQLite store (TIAToolbox), QuPath GeoJSON, summary JSON/CSV,
        thumbnail overlay, tissue mask and metadata, all in level-0 pixels. Returns a
        :class:`~cerberus_histo.infer.wsi.WSIResult` (output paths, summary, counts, timings).

        ``settings`` are those of :class:`~cerberus_histo.infer.options.RunOptions`: ``mpp`` overrides the slide's
        level-0 resolution; ``mask`` is a tissue mask image (default: computed); ``chunk_size`` (model px; default:
        the largest the memory budget allows) and ``margin_um`` (256) set the chunking; ``centroids_only``,
        ``progress`` and ``echo`` the outputs and messages; ``batch_size``, ``device``, ``precision``, ``tta``,
        ``threads``, ``postproc_workers``, ``memory_gb``, ``input_shape`` and ``output_shape`` the network's run
        (:func:`~cerberus_histo.infer.wsi.make_predictor`; left out, they are chosen for the machine). A re-run
        resumes an interrupted slide, skips one finished with the same settings and redoes one finished with
        others. See ``docs/wsi.md``; many slides: :func:`~cerberus_histo.infer.cohort.infer_wsi`.
        """
        from .infer.wsi import predict_wsi

        return predict_wsi(self, slide, output, **settings)
