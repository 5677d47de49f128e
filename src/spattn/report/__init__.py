"""``spattn report``: the efficiency-versus-coverage report for a model on a text.

    >>> from spattn.report import ReportConfig, run_report
    >>> results = run_report(ReportConfig.quick_defaults(), "spattn-report")  # doctest: +SKIP

Stages: load the model and text, dense forward on held-out chunks, capture the real attention inputs on
calibration chunks, fit each candidate pattern to each budget and measure it (cost, FLOPs, latency, recall per
layer and head, reachability, perplexity / agreement / KL), then the Pareto frontier, a recommendation per
budget, figures, ``results.json`` and a self-contained ``report.html``.
"""

from spattn.report.config import FAMILIES, SELECTORS, ReportConfig
from spattn.report.pipeline import run_report
from spattn.report.stages import OutputExistsError

__all__ = ["FAMILIES", "SELECTORS", "OutputExistsError", "ReportConfig", "run_report"]
