"""``cerberus demo``: the whole pipeline on synthetic data (:mod:`.run`) and its report and scores (:mod:`.report`)."""

from .run import STAGES, DemoSettings, quick_settings, run_demo

__all__ = ["STAGES", "DemoSettings", "quick_settings", "run_demo"]
