"""The settings of a tile or slide run, in one validated dataclass (:class:`RunOptions`).

``cerberus infer-tile`` and ``cerberus infer-wsi`` build one from their shared options (:mod:`cerberus_histo.cli`);
:func:`~.tiles.infer_tiles`, :func:`~.wsi.predict_slide` and :func:`~.cohort.infer_wsi` take one. The machine
settings (``device``, ``precision``, ``batch_size``, ``threads``, ``memory_gb``) are checked and resolved by
:func:`~.runtime.plan_runtime`; the others are checked here, with one-line errors that name the option.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import CerberusError

MIN_CHUNK = 64  # model px: a chunk smaller than this is all margin


@dataclass(frozen=True)
class RunOptions:
    """Settings of an inference run; ``None``/``"auto"`` are chosen for the machine (docs/inference.md).

    Attributes:
        mpp: resolution of the images (tiles) or of the slides' level 0 (µm/px); None: the image's metadata
            (slides) or the model's mpp (tiles).
        device, precision, batch_size, threads, memory_gb: the machine settings (:func:`~.runtime.plan_runtime`).
        tta: average the 4 flips of every window.
        input_shape, output_shape: network window side and the central part kept.
        postproc_workers: post-processing processes overlapped with inference (0: in the running process).
        centroids_only: GeoJSON nuclei as points.
        formats: output formats of a tile run (:data:`~cerberus_histo.outputs.writers.FORMATS`).
        chunk_size: chunk side of a slide run in model pixels (>= 64; None: what fits ``memory_gb``).
        margin_um: context around each chunk of a slide run (µm, > 0).
        progress: show progress bars (on stderr, and only when it is a terminal: :mod:`cerberus_histo.progress`).
    """

    mpp: float | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    threads: int | None = None
    memory_gb: float | None = None
    tta: bool = False
    input_shape: int | None = None
    output_shape: int | None = None
    postproc_workers: int | None = None
    centroids_only: bool = False
    formats: tuple[str, ...] = ("geojson", "sqlite", "npz", "hovernet", "overlay", "csv")
    chunk_size: int | None = None
    margin_um: float = 256.0
    progress: bool = True

    def __post_init__(self):
        from ..io.readers import check_mpp
        from ..outputs.writers import check_formats

        if self.mpp is not None:
            object.__setattr__(self, "mpp", check_mpp(self.mpp, "--mpp"))
        object.__setattr__(self, "formats", check_formats(self.formats))
        w = self.postproc_workers
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
            raise CerberusError(f"--postproc-workers (infer-tile: --workers) must be 0 (post-process in this "
                                f"process) or more, got {w!r}")
        c = self.chunk_size
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < MIN_CHUNK):
            raise CerberusError(f"--chunk-size must be at least {MIN_CHUNK} model pixels (e.g. 4096), got {c!r}")
        if not (isinstance(self.margin_um, (int, float)) and self.margin_um > 0):
            raise CerberusError(f"--margin-um must be > 0 (context around each chunk, e.g. 256), got {self.margin_um}")
        for name in ("input_shape", "output_shape"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise CerberusError(f"--{name.replace('_', '-')} must be a positive number of pixels, got {v!r}")

    def replace(self, **changes) -> RunOptions:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def runtime_settings(self) -> dict:
        """The keyword arguments of :func:`~.runtime.plan_runtime` (and :func:`~.wsi.make_predictor`)."""
        return {"device": self.device, "precision": self.precision, "batch_size": self.batch_size,
                "threads": self.threads, "postproc_workers": self.postproc_workers, "memory_gb": self.memory_gb}

    @classmethod
    def from_settings(cls, **settings) -> RunOptions:
        """Options from keyword settings; an unknown name is a ``TypeError`` that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**settings)


__all__ = ["MIN_CHUNK", "RunOptions"]
