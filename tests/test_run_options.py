"""One options object for tile and slide runs (issue 28): short signatures, every field checked in one place with a
one-line error naming its option, and settings that a run does not use refused rather than ignored."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from cerberus_histo.errors import CerberusError
from cerberus_histo.infer.cohort import infer_wsi
from cerberus_histo.infer.options import RunOptions
from cerberus_histo.infer.tiles import infer_tiles
from cerberus_histo.infer.wsi import SlideJob, predict_slide


@pytest.mark.parametrize("function", [infer_tiles, infer_wsi, predict_slide], ids=lambda f: f.__name__)
def test_runs_take_at_most_five_parameters(function):
    """Inputs, output and the options: every parameter counts, keyword-only ones and ``**settings`` too."""
    params = inspect.signature(function).parameters
    assert len(params) <= 5, f"{function.__name__}{inspect.signature(function)}"
    assert "options" in params


#: a bad value of every field RunOptions checks itself, and the option its error names
BAD = {
    "mpp": (-1, "--mpp"), "tta": ("yes", "--tta"), "input_shape": (0, "--input-shape"),
    "output_shape": (1.5, "--output-shape"), "postproc_workers": (-1, "--postproc-workers"),
    "centroids_only": ("no", "--centroids-only"), "strict": ("yes", "--strict"), "formats": (("geojson", "pdf"), "--formats"),
    "chunk_size": (32, "--chunk-size"), "margin_um": (float("nan"), "--margin-um"), "mask": (3, "--mask"),
    "workers": (-2, "--workers"), "scheduler": ("", "--scheduler"), "progress": ("maybe", "progress="),
    "echo": ("stderr", "echo="),
}
#: checked and resolved for the machine by runtime.plan_runtime (tests/test_runtime.py checks their messages)
MACHINE = {"device", "precision", "batch_size", "threads", "memory_gb"}


def test_every_field_is_checked():
    assert {f.name for f in fields(RunOptions)} == set(BAD) | MACHINE


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_one_line_naming_the_option(name):
    value, option = BAD[name]
    with pytest.raises(CerberusError) as err:
        RunOptions(**{name: value})
    message = str(err.value)
    assert message.startswith(option) and "\n" not in message, message


def test_workers_and_scheduler_are_one_or_the_other():
    with pytest.raises(CerberusError, match="--workers .* or --scheduler .* not both"):
        RunOptions(workers=2, scheduler="tcp://head:8786")


def test_settings_a_run_does_not_use_are_refused(tmp_path):
    """A tile run has no Dask workers (its post-processing processes are postproc_workers); one slide has no Dask
    workers: such a setting is an error before any work, not silently ignored."""
    with pytest.raises(CerberusError, match=r"tile run .* --workers .* --postproc-workers"):
        infer_tiles(tmp_path / "model", tmp_path, tmp_path / "out", workers=2)
    with pytest.raises(CerberusError, match=r"tile run .* --strict"):
        infer_tiles(tmp_path / "model", tmp_path, tmp_path / "out", strict=True)
    with pytest.raises(CerberusError, match="one slide .* --scheduler"):
        predict_slide(None, None, tmp_path / "s.tif", tmp_path / "out", RunOptions(scheduler="tcp://head:8786"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="unknown run setting"):
        infer_wsi(tmp_path / "model", tmp_path / "s.tif", tmp_path / "out", stem="x")


def test_options_compare_without_echo_and_keep_paths():
    lines: list[str] = []
    opts = RunOptions(mask="masks", echo=lines.append, progress=None)
    assert opts == RunOptions(mask=Path("masks")) and opts.mask == Path("masks") and opts.progress is True
    opts.say("a line")
    assert lines == ["a line"]
    assert opts.replace(workers=3).workers == 3 and opts.replace(workers=3).echo is opts.echo


def test_slide_job():
    job = SlideJob("slides/a.svs")
    assert job.slide == Path("slides/a.svs") and job.stem == "a" and job.redo_line
    assert SlideJob("a.svs", "b", heads=["nuclei-inst"]).heads == ("nuclei-inst",)
    with pytest.raises(CerberusError, match="read_threads"):
        SlideJob("a.svs", read_threads=0)
