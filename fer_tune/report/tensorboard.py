"""TensorBoard for an experiment: per-epoch curves of every trial, and the HParams dashboard.

Layout under `DIR/tensorboard/`: one run per trial (`<trial_id>/`, or the folder itself for
`fer-tune train`), so `tensorboard --logdir DIR` lists the trials side by side. Curves are
written while trials run; the HParams summaries and the confusion-matrix images are (re)written
by the report, from files in `DIR/report/`, so `fer-tune report DIR` can always rebuild them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from fer_tune.report.experiment import Experiment

# Files the report writes carry this suffix, so re-running the report replaces them, never the curves.
REPORT_SUFFIX = ".fer-tune-report"
SCALAR_PREFIXES = ("train_", "val_")
SCALAR_KEYS = ("lr", "objective", "best_objective", "epoch_seconds")
HPARAM_METRICS = ("best_objective", "val_expression_accuracy", "val_expression_f1",
                  "val_valence_ccc", "val_arousal_ccc", "train_accuracy", "epochs")


def scalar_tag(key: str) -> Optional[str]:
    """The TensorBoard tag of a loop metric ("val_expression_f1" -> "val/expression_f1"), or None."""
    if key.startswith(SCALAR_PREFIXES):
        return key.replace("_", "/", 1)
    return key if key in SCALAR_KEYS else None


def log_epoch(writer, metrics: dict) -> None:
    """One epoch's loop metrics as scalars at step = epoch."""
    for key, value in metrics.items():
        tag = scalar_tag(key)
        if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(tag, float(value), int(metrics["epoch"]))
    writer.flush()


def hparam_value(value: Any):
    """A value the hparams plugin accepts: python float or str (numpy scalars, bools fixed), or
    None where the trial has no value (a conditional parameter it did not sample)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def clear_report_files(logdir: Path) -> None:
    """Remove what an earlier report wrote (HParams, images) anywhere under `logdir`."""
    for old in logdir.rglob(f"events.out.tfevents.*{REPORT_SUFFIX}"):
        old.unlink()


def write_hparams(logdir: Path, trials: list[dict], params: list[str]) -> None:
    """The HParams dashboard: one experiment summary at the root, one session per trial folder.

    `trials`: dicts with trial_id, status, the sampled `params` and the HPARAM_METRICS. The
    experiment summary lists every value seen as the discrete domain of text parameters,
    which is what lets the dashboard filter on them.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    names = [*params, "status"]
    rows = [{name: hparam_value(t.get(name)) for name in names} for t in trials]
    discrete, template = {}, {}
    for name in names:
        seen = [row[name] for row in rows if row[name] is not None]
        if any(isinstance(v, str) for v in seen):  # text, or text mixed with numbers: all as text
            for row in rows:
                row[name] = None if row[name] is None else str(row[name])
            discrete[name] = sorted({row[name] for row in rows if row[name] is not None})
        if seen:
            template[name] = next(row[name] for row in rows if row[name] is not None)
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    metric_tags = {f"hparams/{m}": 0.0 for m in HPARAM_METRICS}

    exp, _, _ = hparams(template, metric_tags, hparam_domain_discrete=discrete)
    with SummaryWriter(str(logdir), filename_suffix=REPORT_SUFFIX) as root:
        root.file_writer.add_summary(exp)
    for trial, row in zip(trials, rows):
        folder = logdir / str(trial["trial_id"])
        values = {m: v for m in HPARAM_METRICS
                  if isinstance(v := hparam_value(trial.get(m)), float) and math.isfinite(v)}
        _, ssi, sei = hparams(row, {f"hparams/{m}": v for m, v in values.items()},
                              hparam_domain_discrete={k: v for k, v in discrete.items() if k in row})
        with SummaryWriter(str(folder), filename_suffix=REPORT_SUFFIX) as writer:
            writer.file_writer.add_summary(ssi)
            writer.file_writer.add_summary(sei)
            for m, v in values.items():
                writer.add_scalar(f"hparams/{m}", v)


def write_confusion_image(folder: Path, matrix, labels: list[str], step: int, title: str) -> None:
    """The best epoch's validation confusion matrix as an image in one run's folder."""
    from torch.utils.tensorboard import SummaryWriter

    from fer_tune.report.figures import confusion_figure  # deferred: see build_report

    figure = confusion_figure(matrix, labels, title)
    with SummaryWriter(str(folder), filename_suffix=REPORT_SUFFIX) as writer:
        writer.add_figure("val/confusion_matrix", figure, global_step=int(step), close=True)


def write_tensorboard(exp: Experiment) -> None:
    """HParams (searches) and each trial's best-epoch validation confusion matrix."""
    logdir = exp.out / "tensorboard"
    logdir.mkdir(parents=True, exist_ok=True)
    clear_report_files(logdir)
    if exp.is_search:
        if exp.history is not None:
            write_curves(logdir, exp.history)
        rows = []
        for _, row in exp.trials.iterrows():
            rows.append({"trial_id": row["trial_id"], "status": row["stop_reason"],
                         **{p: row.get(p) for p in exp.params},
                         **{m: row.get(m) for m in HPARAM_METRICS}})
        write_hparams(logdir, rows, exp.params)
    labels = exp.label_names()
    for trial_id, confusion in exp.confusions.items():
        folder = logdir / trial_id if exp.is_search else logdir
        matrix = [[confusion["matrix"][i][j] for j in exp.metrics.get("labels", range(8))]
                  for i in exp.metrics.get("labels", range(8))]
        write_confusion_image(folder, matrix, labels, confusion["epoch"],
                              f"val confusion, best epoch {confusion['epoch']}")


def write_curves(logdir: Path, history: pd.DataFrame) -> None:
    """Each trial's curves from history.csv, replacing the ones logged live during the search.

    The live ones come from Tune's results, which can miss a trial's last epoch; history.csv
    is completed from the trial's checkpoint, so the curves end where training did.
    """
    from torch.utils.tensorboard import SummaryWriter

    for trial_id, rows in history.groupby(history["trial_id"].astype(str)):
        folder = logdir / trial_id
        for live in folder.glob("events.out.tfevents.*"):
            if not live.name.endswith(REPORT_SUFFIX):
                live.unlink()
        with SummaryWriter(str(folder), filename_suffix=REPORT_SUFFIX) as writer:
            for _, row in rows.sort_values("epoch").iterrows():
                log_epoch(writer, row.to_dict())
