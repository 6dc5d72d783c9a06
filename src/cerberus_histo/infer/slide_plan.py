"""Stage 1 of a slide run (:mod:`.wsi`): the slide and its settings, and the plan of its chunks.

:class:`SlideJob` is one slide of a run; :func:`mask_for` finds its tissue mask; :func:`slide_key` is the settings
that made a finished slide (recorded in its marker) and :func:`redo_reasons` compares them with a re-run's, before
the slide is opened. :func:`plan_slide` opens the frame: the tissue mask (loaded or computed), the chunks on one
slide-wide window grid (:mod:`.chunks`), those with tissue, and the run's key (:class:`SlidePlan`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from .chunks import Chunk, dense_channels, plan_chunks, tissue_chunks
from .options import RunOptions
from .pool import changed_settings, file_id, run_key

MASK_MPP, MASK_MAX_SIDE = 8.0, 2048  # computed tissue masks: 8 um/px, at most 2048 px per side
DEFAULT_CHUNK = 4096  # model px, for a predictor without a runtime (and so without a memory budget)


# ---- a finished slide: the settings that made it -----------------------------------------------------------
#: how chunks are laid out and post-processed, in the run key: 2 = the margin on the cell grid, each window once
CHUNKING = 2
FINISHED = ("files", "summary", "counts")  # what the marker of a finished slide holds


def mask_id(mask: str | Path | Callable[[], Path | None] | None) -> str:
    """The tissue mask in a slide's settings: ``computed`` (``mask`` None: computed from the slide alone), else
    ``sha1:`` and the hash of the user's mask file (``mask``: its path, or a function giving it), so another
    file or new contents at the same path are another mask; ``unavailable`` when the file cannot be found or
    read (the slide then runs, and fails with the reason)."""
    try:
        if callable(mask):
            mask = mask()
        if mask is None:
            return "computed"
        return file_id(mask)
    except (CerberusError, OSError):
        return "unavailable"


def slide_key(predictor, config, model_id: str, options: RunOptions, slide_name: str,
              mask: str | Path | Callable[[], Path | None] | None, heads: Sequence[str],
              precision: str | None = None) -> dict:
    """The settings that made a finished slide, recorded in its marker (``settings``) and compared with a
    re-run's (:func:`redo_reasons`): a :func:`~.pool.run_key` of the model (config and ``model_id``), the window,
    ``tta``, the precision used (``precision``: the one the run's workers will use, default the predictor's),
    the trusted ``heads``, and the slide's own: its name, ``--mpp`` as given (None: the slide's metadata),
    the processing mpp, ``--margin-um``, the mask (:func:`mask_id`) and ``--centroids-only``.

    It is the part of the partial store's key (:func:`plan_slide`) that is known before the slide is opened,
    plus ``centroids_only`` (which shapes the GeoJSON, not the store): deciding to skip a finished slide loads
    nothing, opens no slide and computes no mask, and a cohort's parent process decides it for its Dask workers
    (whose chunk it cannot know). Left out, and so not a reason to redo a finished slide: the chunking (chunks merge
    as one pass, docs/wsi.md, and the automatic chunk follows the machine's memory like the batch size), the
    slide's size and metadata mpp (a slide replaced by another under the same name is not noticed), and the
    computed mask (it depends on the slide alone). The partial store keeps the whole key: a partial result is
    resumed only when everything, the chunking included, is the same."""
    geometry = predictor.geometry
    return run_key(config, model_id, window=[geometry.input_shape, int(geometry.output_shape)],
                   tta=getattr(predictor, "tta", False),
                   precision=getattr(predictor, "precision", "") if precision is None else precision,
                   slide=slide_name, mpp=options.mpp, processing_mpp=predictor.mpp, margin_um=options.margin_um,
                   mask=mask_id(mask), heads=list(heads), centroids_only=bool(options.centroids_only))


def redo_reasons(done: dict | None, key: dict) -> list[str] | None:
    """How a slide's completion marker ``done`` (:func:`~.pool.read_marker`) stands to this run's settings
    ``key`` (:func:`slide_key`): None when it is no finished slide's marker (the slide runs: resumed, or from the
    start), ``[]`` when the slide was finished with these settings (it is skipped), else the settings that
    changed (:func:`~.pool.changed_settings`; ``not recorded`` for the marker of an earlier version): the slide is
    done again."""
    if done is None or not set(FINISHED) <= set(done):
        return None
    return changed_settings(done.get("settings"), key)


# ---- stage 1: plan ---------------------------------------------------------------------------------------
@dataclass
class SlidePlan:
    """What a slide run does: the slide's frame, its tissue mask and its chunks.

    ``scale``: level-0 px per model px; ``cell``: model px per tissue-class cell; ``size``: the slide in model px ``(width, height)``; ``mask`` at
    ``mask_mpp`` (``user_mask``: given by the user, so every record is clipped to ``region``, the mask in level-0
    pixels); ``chunks`` (all) and ``tissue`` (those run); ``fit``: whether one chunk covers the slide along x / y
    (then windows are fitted to it as for tiles); ``chunk_px`` as rounded to whole windows, ``margin_px`` (post-processed around each chunk) to whole cells;
    ``run``: the settings that key the run's partial store.
    """

    slide_mpp: float
    dimensions: tuple[int, int]
    scale: float
    cell: int
    size: tuple[int, int]
    mask: np.ndarray
    mask_mpp: float
    user_mask: bool
    region: object | None
    chunks: list[Chunk]
    tissue: list[Chunk]
    fit: tuple[bool, bool]
    chunk_px: int
    margin_px: int
    run: dict

    def chunk_region(self, chunk: Chunk):
        """The user's mask around ``chunk``'s extended region (level-0 px), or None without a user mask."""
        if self.region is None:
            return None
        import shapely

        x0, y0, x1, y1 = (v * self.scale for v in chunk.ext)
        return shapely.clip_by_rect(self.region, x0, y0, x1, y1)


def _load_or_compute_mask(reader, mask, echo: Callable[[str], None]) -> tuple[np.ndarray, float]:
    from ..io.tissue import load_mask, tissue_mask

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mask is not None:
            out = load_mask(mask, reader)
        else:  # 8 um/px, coarser for slides over MASK_MAX_SIDE mask pixels: bounded memory
            side_um = max(reader.dimensions) * reader.mpp
            out = tissue_mask(reader, max(MASK_MPP, side_um / MASK_MAX_SIDE))
    for w in caught:
        echo(f"warning: {w.message}")
    return out


def plan_slide(predictor, config, reader, options: RunOptions, mask: Path | None, model_id: str, name: str,
               echo: Callable[[str], None], heads: tuple[str, ...] | None = None) -> SlidePlan:
    """Stage 1: the slide's frame, tissue mask (``mask``: the user's file, or None to compute one) and chunks;
    ``heads`` (the trusted heads, default every head of ``config``) are part of the run's settings."""
    import shapely

    from ..outputs.records import mask_region

    slide_mpp, geometry = reader.mpp, predictor.geometry
    out_side = int(geometry.output_shape)
    scale = predictor.mpp / slide_mpp  # level-0 px per model px
    width, height = (max(1, round(v / scale)) for v in reader.dimensions)
    tmask, mask_mpp = _load_or_compute_mask(reader, mask, echo)
    region = None
    if mask is not None:
        w0, h0 = reader.dimensions
        region = shapely.clip_by_rect(mask_region(tmask, mask_mpp / slide_mpp), 0, 0, w0, h0)
    cell = int(predictor.cell)
    margin_px = math.ceil(options.margin_um / predictor.mpp / cell) * cell  # post-processed around each chunk
    chunk_size, runtime = options.chunk_size, getattr(predictor, "runtime", None)
    if chunk_size is None and runtime is None:
        chunk_size = DEFAULT_CHUNK
    elif chunk_size is None:  # the network region: the margin on the window grid
        chunk_size = replace(runtime, postproc_workers=postproc_workers(predictor, options)).chunk_for(
            width, height, out_side, math.ceil(margin_px / out_side) * out_side, dense_channels(config, predictor.heads))
    chunks = plan_chunks(width, height, out_side, chunk_size, margin_px, cell)
    chunk_px = max(1, math.ceil(chunk_size / out_side)) * out_side  # as plan_chunks rounds them
    run = run_key(config, model_id, window=[geometry.input_shape, out_side], tta=getattr(predictor, "tta", False),
                  precision=getattr(predictor, "precision", ""), slide=name, size=list(reader.dimensions),
                  mpp=slide_mpp, processing_mpp=predictor.mpp, chunks=len(chunks), chunk=chunk_px,
                  margin_um=options.margin_um, chunking=CHUNKING, mask=hashlib.sha1(np.packbits(tmask).tobytes()).hexdigest(),
                  heads=list(config.head_names if heads is None else heads))
    return SlidePlan(slide_mpp, tuple(reader.dimensions), scale, int(predictor.cell), (width, height), tmask, mask_mpp, mask is not None,
                     region, chunks, tissue_chunks(chunks, tmask, mask_mpp, slide_mpp, scale),
                     (width <= chunks[0].core[2], height <= chunks[0].core[3]), chunk_px, margin_px,
                     run)  # as the store gives it back (lists, not tuples)


def postproc_workers(predictor, options: RunOptions) -> int:
    if options.postproc_workers is not None:
        return options.postproc_workers
    runtime = getattr(predictor, "runtime", None)
    return 0 if runtime is None else runtime.postproc_workers


# ---- one slide of a run -------------------------------------------------------------------------------------
def mask_for(mask: str | Path | None, slide: Path, stem: str) -> Path | None:
    """The mask of ``slide``: ``mask`` itself when it is a file, ``{mask}/{stem}.png`` (or ``{stem}_mask.png``,
    ``{slide name}.png``) when it is a folder; a folder without the slide's mask is an error for that slide."""
    if mask is None:
        return None
    mask = Path(mask)
    if not mask.is_dir():
        return mask  # a missing or unreadable file is reported by the slide that uses it
    names = (f"{stem}.png", f"{stem}_mask.png", f"{Path(slide).name}.png")
    for name in names:
        if (mask / name).is_file():
            return mask / name
    raise CerberusError(f"no mask for {Path(slide).name} in {mask} (looked for {', '.join(names)})")


@dataclass(frozen=True)
class SlideJob:
    """One slide of a run, and what the run records with it (:func:`~.wsi.predict_slide`); the run's settings are its
    :class:`~.options.RunOptions`.

    Attributes:
        slide: the slide file.
        stem: the name of its outputs (default: the file's stem).
        model_id: identifies the weights (:func:`~.pool.weights_id`), so a partial result of other weights is
            never resumed.
        heads: the model's trusted heads (default: the predictor's ``heads``, which a :class:`~.engine.Predictor`
            takes from the model's provenance, else every head of the config): nothing of another head is kept or
            written (docs/outputs.md), and the metadata lists them as ``trusted_heads``.
        metadata: keys added to ``{stem}_metadata.json``.
        read_threads: threads reading the slide's tiles a chunk ahead of the network.
        on_commit: called with each chunk's index after its records are committed (tests interrupt runs here).
        redo_line: say when a slide finished with other settings is done again (a cohort that said it for all
            its slides passes False).
    """

    slide: Path
    stem: str | None = None
    model_id: str = ""
    heads: tuple[str, ...] | None = None
    metadata: dict | None = field(default=None, compare=False)
    read_threads: int = 2
    on_commit: Callable[[int], None] | None = field(default=None, compare=False)
    redo_line: bool = True

    def __post_init__(self):
        object.__setattr__(self, "slide", Path(self.slide))
        object.__setattr__(self, "stem", self.stem or self.slide.stem)
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))
        t = self.read_threads
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 1):
            raise CerberusError(f"read_threads must be a positive number of threads, got {t!r}")


__all__ = ["DEFAULT_CHUNK", "FINISHED", "MASK_MAX_SIDE", "MASK_MPP", "SlideJob", "SlidePlan", "mask_for", "mask_id",
           "plan_slide", "postproc_workers", "redo_reasons", "slide_key"]
