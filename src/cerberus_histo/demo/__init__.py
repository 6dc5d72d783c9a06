"""``cerberus demo``: the whole pipeline on synthetic data.

- :mod:`.run`: :func:`run_demo`, which runs the stages into one folder, skipping those done before;
- :mod:`.stages`: the stages (synthesise data, extract patches, train, ..., infer slide) and :data:`STAGES`;
- :mod:`.machine`: :class:`DemoSettings` (the quick and full presets) and the machine (device, precision, threads);
- :mod:`.scores`: the metrics of the held-out tiles and the slide, and pictures of truth next to prediction;
- :mod:`.report`: the printed results and the ``index.md`` / ``index.html`` pages.
"""

from .machine import DemoSettings, quick_settings
from .run import run_demo
from .stages import STAGES

__all__ = ["STAGES", "DemoSettings", "quick_settings", "run_demo"]
