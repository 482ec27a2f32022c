"""An experiment folder's report files: written by `fer-tune run` / `train`, read back by the report.

    report/metrics.json          test metrics of the best model (with intervals), and how it was found
    report/test_predictions.csv  one row per test image: targets and predictions
    report/trials.csv            one row per trial (searches only)
    report/history.csv           one row per trial and epoch
    report/val_confusion.json    each trial's validation confusion matrix at its best epoch

`load_experiment` reads only these files and the saved spec, never the dataset, so the report
can be rebuilt at any time, without Ray, also once the data have moved away.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.errors import UserError
from fer_tune.io import atomic_write_json, atomic_write_text
from fer_tune.layout import BEST_DIR, CONFIG_FILE, REPORT_DIR, SPEC_FILE
from fer_tune.spec import Spec
from fer_tune.specfile import read_spec

TOP_TRIALS = 5


@dataclass
class Experiment:
    """What a finished experiment folder holds, read back."""

    out: Path
    spec: Spec
    metrics: dict
    trials: Optional[pd.DataFrame]       # one row per trial (searches only)
    history: Optional[pd.DataFrame]      # one row per trial and epoch
    predictions: Optional[pd.DataFrame]  # the test split's targets and predictions
    confusions: dict                     # trial id -> {"epoch", "matrix"} of its best val epoch

    @property
    def is_search(self) -> bool:
        return self.trials is not None

    @property
    def params(self) -> list[str]:
        """The sampled parameters, as spec paths (columns of trials.csv)."""
        return [key for key in self.spec.space if self.trials is not None and key in self.trials.columns]

    def label_names(self) -> list[str]:
        return [EXPRESSIONS[i] for i in self.metrics.get("labels", range(len(EXPRESSIONS)))]


def load_experiment(out: Path) -> Experiment:
    out = Path(out)
    metrics_file = out / REPORT_DIR / "metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"{out}: no finished experiment here (no report/metrics.json); "
                        f"give the --out folder of a `fer-tune run` or `fer-tune train` that finished")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{metrics_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if "expression" not in metrics and "valence" not in metrics and "arousal" not in metrics:
        raise UserError(f"{metrics_file}: holds no test metrics; it was not written by fer-tune")

    def table(name: str) -> Optional[pd.DataFrame]:
        path = out / REPORT_DIR / name
        return pd.read_csv(path) if path.is_file() else None

    confusion_file = out / REPORT_DIR / "val_confusion.json"
    confusions = json.loads(confusion_file.read_text()) if confusion_file.is_file() else {}
    spec = read_spec(out / SPEC_FILE) if (out / SPEC_FILE).is_file() else read_spec(out / BEST_DIR / CONFIG_FILE)
    return Experiment(out, spec, metrics, table("trials.csv"), table("history.csv"),
                      table("test_predictions.csv"), confusions)


def top_trials(exp: Experiment, n: int = TOP_TRIALS) -> Optional[pd.DataFrame]:
    if not exp.is_search:
        return None
    ok = exp.trials[exp.trials["stop_reason"] != "errored"]
    return ok.sort_values("best_objective", ascending=False).head(n)


def trial_label(exp: Experiment, row) -> str:
    values = ", ".join(f"{p.split('.')[-1]}={fmt_value(row[p])}" for p in exp.params[:3] if p in row)
    return f"{row['trial_id']} ({values})" if values else str(row["trial_id"])


def best_spec(exp: Experiment) -> Spec:
    """The exported best config (a search's winner), or the experiment's own spec without one."""
    config = exp.out / BEST_DIR / CONFIG_FILE
    return read_spec(config) if config.is_file() else exp.spec


def write_history(report_dir: Path, histories: dict[str, list[dict]], confusions: dict[str, dict]) -> None:
    """Per-epoch metrics of every trial (history.csv) and each one's best val confusion matrix."""
    rows = [{"trial_id": trial_id, **{k: v for k, v in epoch.items() if not isinstance(v, (list, dict))}}
            for trial_id, epochs in histories.items() for epoch in epochs]
    atomic_write_text(report_dir / "history.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_json(report_dir / "val_confusion.json", confusions)


def fmt_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
