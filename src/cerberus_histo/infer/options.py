"""The settings of a tile or slide run, in one validated dataclass (:class:`RunOptions`).

``cerberus infer-tile`` and ``cerberus infer-wsi`` build one from their shared options (:mod:`cerberus_histo.cli`);
:func:`~.tiles.infer_tiles`, :func:`~.wsi.predict_slide` and :func:`~.cohort.infer_wsi` take one (the Python
functions also take its fields as keyword arguments and build it). The machine settings (``device``,
``precision``, ``batch_size``, ``threads``, ``memory_gb``) are checked and resolved by
:func:`~.runtime.plan_runtime`; every other field is checked here, once, with a one-line error that names the
option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from os import PathLike
from pathlib import Path

from ..errors import CerberusError

MIN_CHUNK = 64  # model px: a chunk smaller than this is all margin
#: the settings that only some runs use, and what they are (a run given one it does not use is an error)
_ONLY_IN = {"workers": "--workers (the Dask worker processes of infer-wsi; post-processing processes are "
                       "--postproc-workers)",
            "scheduler": "--scheduler (the Dask scheduler of infer-wsi)",
            "strict": "--strict (unreadable regions of a slide fail it; infer-wsi)"}
_UNUSED = {"tiles": ("workers", "scheduler", "strict"), "slide": ("workers", "scheduler"), "cohort": ()}


def _count(value, least: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


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
        mask: slide runs: a tissue mask image of the slide, or a folder of masks named after the slides
            (``{stem}.png``, ``{stem}_mask.png`` or ``{slide name}.png``); None: computed. Tile runs: one mask
            image for every tile, or a folder of masks named after the tiles (the same names); None: no mask.
            Every record is clipped to a given mask (docs/wsi.md, "Masks").
        workers: many slides (:func:`~.cohort.infer_wsi`): a Dask LocalCluster of that many worker processes, one
            slide each at a time (0: slides run one after another in this process).
        scheduler: many slides: the address of a running Dask scheduler (``tcp://host:8786``); not with ``workers``.
        strict: slide runs: a region of the slide that stays unreadable after a retry fails the slide (default: it
            is filled white and recorded, and the rest of the slide is done; docs/reliability.md).
        progress: show progress bars (on stderr, and only when it is a terminal: :mod:`cerberus_histo.progress`).
        echo: where the run's lines go (settings, redone results, failures); None: stderr, above the progress
            bars (:func:`~.pool.echo`). Not compared, and not sent to Dask workers.

    A tile run takes no ``workers`` or ``scheduler``, and one slide no ``workers`` or ``scheduler``
    (:meth:`check_for`).
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
    mask: Path | None = None
    workers: int = 0
    scheduler: str | None = None
    strict: bool = False
    progress: bool = True
    echo: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        from ..io.readers import check_mpp
        from ..outputs.writers import check_formats

        def fail(message: str):
            raise CerberusError(message)

        if self.mpp is not None:
            object.__setattr__(self, "mpp", check_mpp(self.mpp, "--mpp"))
        try:
            object.__setattr__(self, "formats", check_formats(self.formats))
        except (CerberusError, TypeError) as exc:
            fail(f"--formats: {exc}" if isinstance(exc, CerberusError) else
                 f"--formats must be names of output formats (e.g. geojson,npz), got {self.formats!r}")
        for name in ("tta", "centroids_only", "strict", "progress"):
            v = True if name == "progress" and self.progress is None else getattr(self, name)  # None: shown
            if v not in (True, False):
                option = "progress=" if name == "progress" else f"--{name.replace('_', '-')}"
                fail(f"{option} is on or off (True or False), got {v!r}")
            object.__setattr__(self, name, bool(v))
        w = self.postproc_workers
        if w is not None and not _count(w, 0):
            fail(f"--postproc-workers must be 0 (post-process in this process) or more, got {w!r}")
        c = self.chunk_size
        if c is not None and not _count(c, MIN_CHUNK):
            fail(f"--chunk-size must be at least {MIN_CHUNK} model pixels (e.g. 4096), got {c!r}")
        m = self.margin_um
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0):
            fail(f"--margin-um must be > 0 (context around each chunk, e.g. 256), got {m!r}")
        for name in ("input_shape", "output_shape"):
            v = getattr(self, name)
            if v is not None and not _count(v, 1):
                fail(f"--{name.replace('_', '-')} must be a positive number of pixels, got {v!r}")
        if self.mask is not None:
            if not isinstance(self.mask, (str, PathLike)) or not str(self.mask):
                fail(f"--mask must be a mask image or a folder of masks, got {self.mask!r}")
            object.__setattr__(self, "mask", Path(self.mask))
        if not _count(self.workers, 0):
            fail(f"--workers must be 0 (slides run in this process) or a number of Dask worker processes, got "
                 f"{self.workers!r}")
        if self.scheduler is not None and not (isinstance(self.scheduler, str) and self.scheduler.strip()):
            fail(f"--scheduler must be the address of a running Dask scheduler (tcp://host:8786), got "
                 f"{self.scheduler!r}")
        if self.workers and self.scheduler:
            fail("pass --workers (start a local Dask cluster) or --scheduler (use a running one), not both")
        if self.echo is not None and not callable(self.echo):
            fail(f"echo= must be a function that takes one line (None: stderr), got {self.echo!r}")

    def replace(self, **changes) -> RunOptions:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def check_for(self, run: str) -> RunOptions:
        """``self``, when it sets nothing that a ``run`` (``tiles``, ``slide`` or ``cohort``) does not use; else a
        one-line error naming what was given (a setting a run would ignore is a mistake, not a default)."""
        given = [n for n in _UNUSED[run] if getattr(self, n) != _DEFAULTS[n]]
        if given:
            what = {"tiles": "a tile run (infer-tile)", "slide": "one slide (predict_wsi)"}[run]
            raise CerberusError(f"{what} takes no {'; no '.join(_ONLY_IN[n] for n in given)}")
        return self

    def say(self, line: str) -> None:
        """One line of the run's log, to ``echo`` (default: stderr, above the progress bars)."""
        if self.echo is not None:
            self.echo(line)
        else:
            from .pool import echo

            echo(line)

    def predictor_settings(self) -> dict:
        """The keyword arguments of :func:`~.wsi.make_predictor`: the window, ``tta`` and :meth:`runtime_settings`."""
        return {"input_shape": self.input_shape, "output_shape": self.output_shape, "tta": self.tta,
                **self.runtime_settings()}

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


_DEFAULTS = {f.name: f.default for f in fields(RunOptions)}

__all__ = ["MIN_CHUNK", "RunOptions"]
