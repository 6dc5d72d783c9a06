"""Many slides: ``cerberus infer-wsi``, one slide after another in this process or one slide per Dask worker.

:func:`infer_wsi` expands the inputs (files, folders, glob patterns), skips slides whose completion marker
records this run's settings (:func:`~.slide_plan.slide_key`; the others are redone, with one line naming what changed),
and runs :func:`run_slide` per slide: here (the model loaded once), on a :class:`~dask.distributed.
LocalCluster` of ``workers`` processes, or on a running cluster at ``scheduler``. A slide that fails (missing,
corrupt, no mpp, unreadable mask, out of memory...) is reported with its reason and the others go on; the
returned :class:`CohortSummary` has one :class:`SlideStatus` per slide and renders the final table.

GPUs: each worker process uses one device. On a LocalCluster with ``--device cuda`` and several GPUs, worker
``k`` takes ``cuda:{k mod count}``; on a cluster, start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set
(``docs/wsi.md``).
"""

from __future__ import annotations

import glob
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CerberusError
from .options import RunOptions
from .pool import NO_GUARD, check_output, one_line, output_stems, read_marker, redone_line, spawn_safe

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".png",
                  ".jpg", ".jpeg", ".bmp")
_PREDICTORS: dict = {}  # per process: (model_dir, device, options) -> (predictor, config, id)


@dataclass(frozen=True)
class CohortRun:
    """What every worker of a cohort run needs: the model folder, the output folder and each slide's options
    (the cohort's, without its Dask settings, and on Dask workers without its ``echo``)."""

    model_dir: str
    output: str
    options: RunOptions


@dataclass
class SlideStatus:
    """One slide's outcome: ``status`` is ``done``, ``skipped`` (finished before) or ``failed`` (``reason``)."""

    slide: str
    status: str
    objects: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class CohortSummary:
    output: Path
    rows: list[SlideStatus] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideStatus]:
        return [r for r in self.rows if r.status == "failed"]

    def table(self) -> str:
        """The per-slide status table: slide, status, objects, seconds, reason."""
        head = ("slide", "status", "objects", "seconds", "reason")
        body = [(r.slide, r.status, str(r.objects), f"{r.seconds:.1f}", r.reason) for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        widths[-1] = 0  # the reason is last and not padded
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in (head, *body))


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Slide paths from files, folders (their files with a slide suffix) and glob patterns, in order, without
    repeats. A literal path is kept even when missing (that slide then fails with its reason); a pattern or
    folder that matches nothing, or no input at all, is an error."""
    out: list[Path] = []
    for pat in patterns:
        text = str(pat)
        if any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise CerberusError(f"--input {text!r} matches no file; check the pattern (quote it in the shell)")
            out.extend(found)
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise CerberusError(f"--input {text} holds no slides ({', '.join(SLIDE_SUFFIXES[:6])}, ...)")
            out.extend(found)
        else:
            out.append(Path(text))
    if not out:
        raise CerberusError("no slides given; pass --input with a slide, a folder or a pattern like 'slides/*.svs'")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _worker_device(device: str) -> str:
    """``cuda`` (or ``auto``) on a LocalCluster worker named ``k`` with several GPUs: ``cuda:{k mod count}``."""
    if device not in ("cuda", "auto"):
        return device
    try:
        import torch
        from distributed import get_worker

        name, count = get_worker().name, torch.cuda.device_count()
    except (ImportError, ValueError):
        return device
    return f"cuda:{int(name) % count}" if isinstance(name, int) and count > 1 else device


def _predictor(run: CohortRun, device: str):
    """This process's predictor of ``run`` on ``device`` (one model per process, built once)."""
    o = run.options
    key = (run.model_dir, device, o.input_shape, o.output_shape, o.batch_size, o.precision, o.tta, o.threads,
           o.postproc_workers, o.memory_gb)
    if key not in _PREDICTORS:
        from ..models.checkpoint import load_model
        from .wsi import make_predictor, weights_id

        _PREDICTORS.clear()  # one model per process
        model = load_model(run.model_dir)
        predictor = make_predictor(model, **(o.predictor_settings() | {"device": device}))
        _PREDICTORS[key] = (predictor, model.config, weights_id(model))
    return _PREDICTORS[key]


def run_slide(path: str | Path, stem: str, run: CohortRun, said: bool = False) -> SlideStatus:
    """Predict one slide (what a worker runs); any failure becomes a ``failed`` status with a one-line reason.
    ``said``: the cohort has said that the slide is redone with other settings (the slide does not say it again)."""
    from .wsi import SlideJob, predict_slide

    t0 = time.perf_counter()
    path = Path(path)
    try:
        predictor, config, model_id = _predictor(run, _worker_device(run.options.device))
        job = SlideJob(path, stem, model_id, metadata={"model_dir": str(run.model_dir), "device": str(predictor.device),
                                                        "runtime": predictor.runtime.line()}, redo_line=not said)
        res = predict_slide(predictor, config, job, run.output, run.options)
    except Exception as exc:  # one slide's failure must not stop the others
        return SlideStatus(path.name, "failed", 0, time.perf_counter() - t0, one_line(exc))
    return SlideStatus(path.name, "skipped" if res.skipped else "done", res.objects, time.perf_counter() - t0)


def infer_wsi(model_dir: str | Path, inputs: Sequence[str | Path] | str | Path, output: str | Path,
              options: RunOptions | None = None, **settings) -> CohortSummary:
    """Predict every slide of ``inputs`` (files, folders, glob patterns) with the model in ``model_dir`` into
    ``output``.

    ``options`` (a :class:`~.options.RunOptions`), or its fields as keyword ``settings``
    (``infer_wsi(model_dir, ["cohort/*.svs"], "results/", workers=4)``), set the run and each slide's:
    ``workers`` > 0 starts a Dask LocalCluster of that many processes (one slide per worker at a time);
    ``scheduler`` (``tcp://host:8786``) uses a running cluster, whose workers must see the same paths. Without
    either, slides run here one after another. ``mask`` is a mask image (one slide) or a folder of masks named
    after the slides (``{stem}.png``); ``echo`` takes the run's lines (default: stderr). Problems with the options,
    the model or the output folder raise a one-line :class:`CerberusError` before any slide; per-slide problems
    are rows of the summary. Settings left ``None``/``auto`` are chosen for the machine (:mod:`.runtime`; on a
    LocalCluster the cores are shared between the workers) and stated in the first line of the log.
    """
    if options is not None and settings:
        raise TypeError(f"pass settings in options or as keywords, not both: {', '.join(settings)}")
    opts = (options if options is not None else RunOptions.from_settings(**settings)).check_for("cohort")
    echo = opts.say
    workers, scheduler = opts.workers, opts.scheduler
    if workers and not spawn_safe():
        warnings.warn(NO_GUARD.format(what="slides run one after another"), stacklevel=2)
        workers = 0
    remote = bool(workers or scheduler)
    slides = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs)
    if opts.mask is not None and not opts.mask.is_dir() and len(slides) > 1:
        raise CerberusError(f"--mask {opts.mask} is one file but there are {len(slides)} slides; pass a folder of "
                            "masks named after the slides ({stem}.png)")
    output = check_output(Path(output))
    progress = opts.progress  # the cohort's bar; a Dask worker's slide shows none, and its lines go to its stderr
    slide_opts = opts.replace(workers=0, scheduler=None, progress=progress and not remote,
                              echo=None if remote else opts.echo)
    if workers and not scheduler:  # the machine's cores shared between the local workers
        from .runtime import cpu_cores, resolve_device

        share = max(1, cpu_cores() // workers)
        on_cpu = resolve_device(opts.device).type == "cpu"
        threads = opts.threads or (share if on_cpu else 1)
        postproc = opts.postproc_workers
        if postproc is None:
            postproc = max(0, share - threads) if on_cpu else max(1, share - 2)
        slide_opts = slide_opts.replace(threads=threads, postproc_workers=postproc)
    run = CohortRun(str(model_dir), str(output), slide_opts)
    # fail early on a bad model or options, before any slide; state what was chosen
    built = _predictor(run, "cpu" if remote else opts.device)
    predictor = built[0]
    echo("settings are chosen by each Dask worker for its machine (see each slide's metadata)"
         if remote else predictor.runtime.line())
    untrained = [h for h in predictor.model.head_names if h not in predictor.heads]
    if untrained:
        echo(f"heads never trained (not run, nothing written): {', '.join(untrained)}")
    stems = output_stems(slides)
    from ..progress import progress_bar

    summary = CohortSummary(output)
    rows: dict[Path, SlideStatus] = {}
    todo, redo = [], {}
    precision = _workers_precision(predictor, slide_opts, workers, scheduler)
    for p in slides:  # the comparison predict_slide makes, here for every mode (Dask workers get only the others)
        done = read_marker(output, stems[p])
        changed = _redo_reasons(done, built, slide_opts, p, stems[p], precision)
        if changed == []:
            counts = done.get("counts") if isinstance(done.get("counts"), dict) else {}
            rows[p] = SlideStatus(p.name, "skipped", int(sum(v for k, v in counts.items() if k != "tissue")))
            continue
        todo.append(p)
        if changed:
            redo[p] = changed
    if redo:
        echo(redone_line(redo))
    bar = progress_bar(total=len(slides), initial=len(slides) - len(todo), unit="slide", desc="infer-wsi",
                       progress=progress)

    def record(p: Path, status: SlideStatus) -> None:
        rows[p] = status
        if status.status == "failed":
            echo(f"failed: {status.slide}: {status.reason}")
        bar.update()

    try:
        if todo and remote:
            _run_dask(todo, stems, run, workers, scheduler, record, set(redo))
        else:
            for p in todo:
                record(p, run_slide(p, stems[p], run, said=p in redo))
    finally:
        bar.close()
    summary.rows = [rows[p] for p in slides]
    return summary


def _workers_precision(predictor, opts: RunOptions, workers: int, scheduler: str | None) -> str | None:
    """The precision the slides of this run will use: this process's predictor's when they run here; on a
    LocalCluster, the one ``opts.precision`` becomes on ``opts.device`` (the parent's predictor is on the CPU);
    None where a cluster's workers choose it for machines this process cannot see (``--scheduler`` and
    ``--precision auto``, or ``fp16`` that a CPU worker would change)."""
    if not (workers or scheduler):
        return predictor.precision
    if scheduler:
        return opts.precision if opts.precision in ("fp32", "bf16") else None
    from .runtime import resolve_device, resolve_precision

    return resolve_precision(resolve_device(opts.device), opts.precision)[0]


def _redo_reasons(done: dict | None, built: tuple, options: RunOptions, path: Path, stem: str,
                  precision: str | None) -> list[str] | None:
    """:func:`~.slide_plan.redo_reasons` of one slide of the cohort, decided as its :func:`~.wsi.predict_slide` will
    decide it (``built``: this process's ``(predictor, config, model_id)``; ``precision``: the one the slide will
    run in, None when unknown here). Where the precision is unknown and nothing else changed, the slide goes to a
    worker, which compares the precision too: None (nothing to say here)."""
    from ..outputs.records import known_heads
    from .slide_plan import mask_for, redo_reasons, slide_key

    if done is None:
        return None
    predictor, config, model_id = built
    used = precision
    if used is None:  # unknown here: the recorded one, so that every other setting is compared
        settings = done.get("settings")
        used = settings.get("precision", "") if isinstance(settings, dict) else ""
    key = slide_key(predictor, config, model_id, options, path.name, lambda: mask_for(options.mask, path, stem),
                    known_heads(config, predictor.heads), used)
    changed = redo_reasons(done, key)
    return None if changed == [] and precision is None else changed


def _run_dask(slides: list[Path], stems: dict, run: CohortRun, workers: int, scheduler: str | None,
              record: Callable[[Path, SlideStatus], None], said: set[Path] = frozenset()) -> None:
    """One slide per Dask task, on a LocalCluster of ``workers`` processes or the cluster at ``scheduler``
    (``said``: the slides whose redoing was said here)."""
    import dask
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise CerberusError(f"cannot reach the Dask scheduler at {scheduler} ({one_line(exc)}); start it "
                                    "with `dask scheduler` and check the address") from None
        else:
            # non-daemonic workers may start post-processing processes of their own
            with dask.config.set({"distributed.worker.daemon": False}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
            client = Client(cluster)
        with client:
            futures = {client.submit(run_slide, str(p), stems[p], run, said=p in said, pure=False, retries=0,
                                     key=f"slide-{i}-{stems[p]}"): p
                       for i, p in enumerate(slides)}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    status = fut.result()
                except Exception as exc:  # the worker died (out of memory, killed) while on this slide
                    status = SlideStatus(p.name, "failed", 0, 0.0, f"worker lost: {one_line(exc)}")
                record(p, status)
    finally:
        if cluster is not None:
            cluster.close()


__all__ = ["CohortSummary", "SLIDE_SUFFIXES", "SlideStatus", "CohortRun", "expand_inputs", "infer_wsi", "run_slide"]
