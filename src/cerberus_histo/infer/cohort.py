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
from ..io.files import NoSpaceError
from ..io.locks import held_by
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
    """One slide's outcome: ``status`` is ``done``, ``skipped`` (finished before), ``failed`` (``reason``) or
    ``unreadable``: completed with unreadable regions (now or before; ``reason`` says how many and where they are
    listed)."""

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

    @property
    def unreadable(self) -> list[SlideStatus]:
        """The slides completed with unreadable regions."""
        return [r for r in self.rows if r.status == "unreadable"]

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
    """Predict one slide (what a worker runs); any failure becomes a ``failed`` status with a one-line reason,
    except a write that found no room: that :class:`~cerberus_histo.io.files.NoSpaceError` is raised (it names the
    file; the committed chunks stay for the re-run). ``said``: the cohort has said that the slide is redone with
    other settings (the slide does not say it again)."""
    from ..io.files import no_space_error
    from .wsi import SlideJob, predict_slide

    t0 = time.perf_counter()
    path = Path(path)
    try:
        predictor, config, model_id = _predictor(run, _worker_device(run.options.device))
        job = SlideJob(path, stem, model_id, metadata={"model_dir": str(run.model_dir), "device": str(predictor.device),
                                                        "runtime": predictor.runtime.line()}, redo_line=not said)
        res = predict_slide(predictor, config, job, run.output, run.options)
    except Exception as exc:  # one slide's failure must not stop the others
        if (full := no_space_error(exc, default=run.output)) is not None:
            raise full from None  # but a full disk stops the run: every other slide would fail the same way
        return SlideStatus(path.name, "failed", 0, time.perf_counter() - t0, one_line(exc))
    if res.unreadable:
        return unreadable_status(path.name, res.objects, time.perf_counter() - t0, res.unreadable, res.skipped, stem)
    return SlideStatus(path.name, "skipped" if res.skipped else "done", res.objects, time.perf_counter() - t0)


def unreadable_status(name: str, objects: int, seconds: float, boxes: list, before: bool, stem: str) -> SlideStatus:
    """The status of a slide completed with the unreadable level-0 ``boxes`` (``before``: by an earlier run)."""
    x, y, w, h = boxes[0]
    return SlideStatus(name, "unreadable", objects, seconds,
                       f"completed{' before' if before else ''} with {len(boxes)} unreadable region"
                       f"{'s' if len(boxes) > 1 else ''} (first at level 0 x={x} y={y} {w}x{h} px; all in "
                       f"{stem}_metadata.json); copy the slide again and delete done/{stem}.json to redo it")


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
    LocalCluster the cores are shared between the workers) and stated in the first line of the log. Runs here
    leave a slide that another run on ``output`` holds (:func:`~cerberus_histo.io.locks.held_by`) for last, then
    wait for it (:func:`~.wsi.predict_slide`; skipped once that run finished it): two runs into one folder share
    the slides.
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
            objects = int(sum(v for k, v in counts.items() if k != "tissue"))
            summary_before = done.get("summary")
            boxes = summary_before.get("unreadable_regions") if isinstance(summary_before, dict) else None
            rows[p] = unreadable_status(p.name, objects, 0.0, boxes, True, stems[p]) if boxes else \
                SlideStatus(p.name, "skipped", objects)
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
            later = []  # slides another run on this output folder holds: done last, predict_slide waits for them
            for p in todo:
                if (holder := held_by(output, stems[p])) is not None:
                    echo(f"{p.name} is held by another run ({holder}); doing the others first")
                    later.append(p)
                    continue
                record(p, run_slide(p, stems[p], run, said=p in redo))
            for p in later:  # skipped once the other run has finished it
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
    (``said``: the slides whose redoing was said here).

    At most one slide per worker thread is on the cluster at a time (the next is submitted when one ends, or when
    a worker joins or comes back, looked at every 2 s): the scheduler charges a worker's death to every task it
    holds, so a slide waiting behind one that kills its worker would be charged too. A slide whose worker dies
    (killed, out of memory) is rescheduled by the scheduler and resumes from its partial store; after
    ``distributed.scheduler.allowed-failures`` + 1 deaths (3 + 1 by default, set on the scheduler) it is failed
    with that reason. Each result is taken as soon as its slide ends (a result lives on its worker until then, and
    is recomputed if that worker dies first). Exceptions are ``run_slide``'s to report, so Dask does not retry
    tasks (``retries=0``); a full disk (:class:`~cerberus_histo.io.files.NoSpaceError`) stops the run."""
    import queue

    import dask
    from distributed import Client, KilledWorker, LocalCluster

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
            waiting, futures, ended = list(enumerate(slides)), {}, queue.Queue()

            def submit() -> None:  # fill the cluster's threads (at least one slide in flight)
                while waiting and len(futures) < max(1, sum(client.nthreads().values())):
                    i, p = waiting.pop(0)
                    fut = client.submit(run_slide, str(p), stems[p], run, said=p in said, pure=False, retries=0,
                                        key=f"slide-{i}-{stems[p]}")
                    futures[fut] = p
                    fut.add_done_callback(ended.put)  # taken at once: a result lives on its worker until then

            while waiting or futures:
                submit()
                try:
                    fut = ended.get(timeout=2.0)
                except queue.Empty:  # look again: a worker may have joined or come back
                    continue
                p = futures.pop(fut)
                try:
                    status = fut.result()
                except KilledWorker as exc:  # its workers died while on it, allowed-failures + 1 times
                    last = exc.last_worker
                    worker = last.address if last.name in (None, last.address) else f"{last.name} ({last.address})"
                    status = SlideStatus(p.name, "failed", 0, 0.0, (
                        f"its Dask worker died {exc.allowed_failures + 1} times while on this slide (out of memory? "
                        f"see the log of worker {worker}, the last; lower --memory-gb or give the workers more "
                        "memory); the next run resumes its committed chunks"))
                except NoSpaceError:  # a full disk stops the run, as it does in this process
                    raise
                except Exception as exc:  # the task could not run (e.g. the package missing on a worker)
                    status = SlideStatus(p.name, "failed", 0, 0.0, f"the Dask task failed: {one_line(exc)}")
                record(p, status)
    finally:
        if cluster is not None:
            cluster.close()


__all__ = ["CohortSummary", "SLIDE_SUFFIXES", "SlideStatus", "CohortRun", "expand_inputs", "infer_wsi", "run_slide",
           "unreadable_status"]
