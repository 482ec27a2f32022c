"""`fer-tune report`: an experiment as a person reads it: report.md, its plots, TensorBoard HParams.

Built only from files the experiment folder already holds (`fer_tune.report.experiment`), so it
runs at the end of `fer-tune run` and `fer-tune train`, and again on its own at any time, without
Ray. The package's modules: `experiment` (the report files, written and read back), `figures`
(matplotlib), `importances` (Optuna's fANOVA), `tensorboard` and `markdown`.
"""

from __future__ import annotations

from pathlib import Path

from fer_tune.errors import one_line
from fer_tune.io import atomic_write_text
from fer_tune.layout import REPORT_DIR
from fer_tune.report.experiment import load_experiment, write_history
from fer_tune.report.importances import evaluator, load_study, parameter_importances
from fer_tune.report.markdown import compare_experiments, render_markdown

__all__ = ["build_report", "write_report", "compare_experiments", "write_history", "load_experiment"]


def build_report(out: Path) -> Path:
    """Write DIR/report/report.md, its PNG plots and the TensorBoard HParams; return report.md."""
    # deferred: matplotlib costs a second that training and the search driver (which import this
    # package for write_history and TensorBoard's log_epoch) never need before the report
    from fer_tune.report.figures import importances_figure, save, write_plots
    from fer_tune.report.tensorboard import write_tensorboard

    exp = load_experiment(out)
    report_dir = exp.out / REPORT_DIR
    plots = write_plots(exp, report_dir)
    importances, why_not = parameter_importances(exp)
    if importances:
        save(importances_figure(load_study(exp), evaluator()), report_dir / "param_importances.png")
        plots.append(("Parameter importances", "param_importances.png"))
    write_tensorboard(exp)
    path = report_dir / "report.md"
    atomic_write_text(path, render_markdown(exp, plots, importances, why_not))
    return path


def write_report(out: Path, say=print) -> None:
    """The markdown report and plots; a failure here is reported but never undoes the run."""
    try:
        path = build_report(out)
    except Exception as err:  # noqa: BLE001 - the experiment itself is already safely written
        reason = f"{type(err).__name__}: {one_line(err)}" if str(err).strip() else type(err).__name__
        say(f"warning: the report could not be written ({reason}); "
            f"retry with `fer-tune report {out}`")
        return
    say(f"report: {path}")
