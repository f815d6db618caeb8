"""`moon demo` and `moon ablate`: the end-to-end job on the built-in product world.

world → learned detector + crops → MOON and the baselines trained on equal budgets → MBE-style
evaluation → a report (markdown + self-contained HTML) with plots, galleries and timings. Every
stage is cached by its inputs, so a re-run reuses finished work.
"""

from moon.demo.pipeline import DemoConfig, ModelRun, run_demo

__all__ = ["DemoConfig", "ModelRun", "run_demo"]
