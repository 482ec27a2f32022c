"""`fer-tune report`: an experiment as a person reads it: report.md, its plots, TensorBoard HParams.

Built only from files the experiment folder already holds (report/metrics.json, trials.csv,
history.csv, test_predictions.csv, val_confusion.json, optuna.db, spec.yaml), so it runs at the
end of `fer-tune run` and `fer-tune train`, and again on its own at any time, without Ray.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.errors import UserError
from fer_tune.io import atomic_write_text
from fer_tune.spec import Spec, load_spec

EXPRESSION_COLUMNS = (("accuracy", "Accuracy"), ("f1_macro", "F1-Score"), ("kappa", "Kappa"),
                      ("auc_roc", "AUC-ROC"), ("auc_pr", "AUC-PR"))
AFFECT_COLUMNS = (("rmse", "RMSE"), ("pcc", "Correlation"), ("sagr", "SAGR"), ("ccc", "CCC"))
TOP_TRIALS = 5
TRIAL_METRICS = (("epochs", "epochs"), ("stop_reason", "outcome"), ("best_objective", "best objective"),
                 ("val_expression_accuracy", "val acc"), ("val_expression_f1", "val F1"),
                 ("val_valence_ccc", "val V-CCC"), ("val_arousal_ccc", "val A-CCC"),
                 ("train_accuracy", "train acc"))


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
    metrics_file = out / "report" / "metrics.json"
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
        path = out / "report" / name
        return pd.read_csv(path) if path.is_file() else None

    confusion_file = out / "report" / "val_confusion.json"
    confusions = json.loads(confusion_file.read_text()) if confusion_file.is_file() else {}
    spec = load_spec(out / "spec.yaml") if (out / "spec.yaml").is_file() else load_spec(out / "best" / "config.yaml")
    return Experiment(out, spec, metrics, table("trials.csv"), table("history.csv"),
                      table("test_predictions.csv"), confusions)


def build_report(out: Path) -> Path:
    """Write DIR/report/report.md, its PNG plots and the TensorBoard HParams; return report.md."""
    exp = load_experiment(out)
    report_dir = exp.out / "report"
    plots = write_plots(exp, report_dir)
    importances, why_not = parameter_importances(exp)
    if importances:
        from fer_tune.plots import importances_figure, save

        save(importances_figure(importances), report_dir / "param_importances.png")
        plots.append(("Parameter importances", "param_importances.png"))
    write_tensorboard(exp)
    path = report_dir / "report.md"
    atomic_write_text(path, render_markdown(exp, plots, importances, why_not))
    return path


# --- plots --------------------------------------------------------------------------------------

def write_plots(exp: Experiment, report_dir: Path) -> list[tuple[str, str]]:
    """Every figure the data allow, as (caption, file name)."""
    from sklearn.metrics import confusion_matrix

    from fer_tune import plots

    written = []

    def save(figure, name: str, caption: str) -> None:
        plots.save(figure, report_dir / name)
        written.append((caption, name))

    labels = list(exp.metrics.get("labels", range(len(EXPRESSIONS))))
    names = exp.label_names()
    preds = exp.predictions
    if preds is not None and "expression" in exp.metrics:
        labelled = preds[preds["expression"] >= 0]
        matrix = confusion_matrix(labelled["expression"], labelled["expression_pred"], labels=labels)
        save(plots.confusion_figure(matrix, names, f"test confusion matrix (n={len(labelled)}), row-normalised"),
             "confusion_matrix.png", "Test confusion matrix (rows: true class, normalised)")
    affect = [t for t in ("valence", "arousal") if t in exp.metrics and preds is not None]
    if affect:
        save(plots.affect_scatter_figure(preds, affect, {t: exp.metrics[t]["ccc"] for t in affect}),
             "valence_arousal.png", "Valence and arousal: predicted vs true (test)")
    if exp.history is not None and len(exp.history):
        top = top_trials(exp)
        ids = [str(t) for t in top["trial_id"]] if top is not None else sorted(exp.history["trial_id"].astype(str).unique())
        labels_by_id = {str(row["trial_id"]): trial_label(exp, row) for _, row in top.iterrows()} if top is not None else {}
        save(plots.learning_curves_figure(exp.history, ids, labels_by_id), "learning_curves.png",
             f"Learning curves of the top {len(ids)} trial{'s' if len(ids) > 1 else ''}")
    if exp.is_search and exp.params:
        save(plots.parallel_coordinates_figure(exp.trials, exp.params, "best_objective"),
             "parallel_coordinates.png", "All trials: sampled values and best objective")
    per_class = exp.metrics.get("counts", {}).get("per_class")
    if per_class:
        counts = {EXPRESSIONS[int(k)]: int(v) for k, v in per_class.items()}
        save(plots.class_counts_figure(counts, f"test images per class (n={sum(counts.values())})"),
             "class_counts.png", "Test images per class")
    return written


def top_trials(exp: Experiment, n: int = TOP_TRIALS) -> Optional[pd.DataFrame]:
    if not exp.is_search:
        return None
    ok = exp.trials[exp.trials["stop_reason"] != "errored"]
    return ok.sort_values("best_objective", ascending=False).head(n)


def trial_label(exp: Experiment, row) -> str:
    values = ", ".join(f"{p.split('.')[-1]}={fmt_value(row[p])}" for p in exp.params[:3] if p in row)
    return f"{row['trial_id']} ({values})" if values else str(row["trial_id"])


# --- Optuna --------------------------------------------------------------------------------------

def parameter_importances(exp: Experiment) -> tuple[dict[str, float], str]:
    """fANOVA importances from the search's Optuna study, or ({}, why they cannot be computed)."""
    db = exp.out / "optuna.db"
    if not exp.is_search or not db.is_file():
        return {}, "a single training run has no search to analyse"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=exp.spec.name, storage=f"sqlite:///{db}")
    except KeyError:
        return {}, f"{db} holds no study named {exp.spec.name}"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"needs at least 2 trials that did not error, found {len(complete)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as err:
            return {}, " ".join(str(err).split())[:200]
    if not importances:
        return {}, "no parameter was sampled in every trial"
    return {name: float(value) for name, value in importances.items()}, ""


# --- TensorBoard -----------------------------------------------------------------------------------

def write_tensorboard(exp: Experiment) -> None:
    """HParams (searches) and each trial's best-epoch validation confusion matrix."""
    from fer_tune.tensorboard import HPARAM_METRICS, clear_report_files, write_confusion_image, write_hparams

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

    from fer_tune.tensorboard import REPORT_SUFFIX, log_epoch

    for trial_id, rows in history.groupby(history["trial_id"].astype(str)):
        folder = logdir / trial_id
        for live in folder.glob("events.out.tfevents.*"):
            if not live.name.endswith(REPORT_SUFFIX):
                live.unlink()
        with SummaryWriter(str(folder), filename_suffix=REPORT_SUFFIX) as writer:
            for _, row in rows.sort_values("epoch").iterrows():
                log_epoch(writer, row.to_dict())


# --- markdown --------------------------------------------------------------------------------------

def render_markdown(exp: Experiment, plots: list[tuple[str, str]], importances: dict, why_not: str) -> str:
    m, spec = exp.metrics, exp.spec
    data = m.get("data", {})
    sizes = data.get("sizes", {})
    lines = [f"# fer-tune report: {spec.name}", ""]
    source = f"`{data.get('source', spec.data.source)}`" + (f" at `{data['root']}`" if data.get("root") else "")
    lines.append(f"Data: {source}, {data.get('image_size', spec.data.image_size)} px; split "
                 f"{sizes.get('train', '?')} train / {sizes.get('val', '?')} val / {sizes.get('test', '?')} test images.")
    if data.get("source") == "synthetic":
        lines.append("These are fer-tune's built-in **synthetic** faces, not real photographs.")
    lines += ["", "## Best config", ""]
    lines += how_found(exp)
    lines += ["", f"Re-run it: `fer-tune train {exp.out / 'best' / 'config.yaml'}` (weights: `best/model.pt`).", ""]
    lines += best_values_table(exp)

    lines += ["", f"## Held-out test results ({m.get('test_images', '?')} images)", "",
              f"The test split was read once, after the {'search' if exp.is_search else 'training'}, "
              "with the best epoch's weights. "
              "Brackets: 95 % percentile-bootstrap intervals.", ""]
    lines += test_tables(m)

    lines += ["", "## Overfitting: train vs val vs test accuracy of the best " + ("trial" if exp.is_search else "epoch"), ""]
    lines += gap_table(m)

    if exp.is_search:
        lines += ["", f"## Top {min(TOP_TRIALS, len(top_trials(exp)))} trials", ""]
        lines += trials_table(exp, top_trials(exp))
        errored = exp.trials[exp.trials["stop_reason"] == "errored"]
        lines += ["", f"## Errored trials ({len(errored)})", ""]
        if errored.empty:
            lines.append("None.")
        else:
            lines += ["| trial | " + " | ".join(exp.params) + " | reason |",
                      "|---|" + "---|" * len(exp.params) + "---|"]
            for _, row in errored.iterrows():
                lines.append(f"| {row['trial_id']} | " + " | ".join(fmt_value(row.get(p)) for p in exp.params)
                             + f" | {str(row.get('error') or '').replace('|', '/')} |")
        lines += ["", "## Parameter importances (Optuna, fANOVA)", ""]
        if importances:
            lines += ["Share of the variance of each trial's objective explained by each parameter; trials "
                      "stopped early by ASHA count with the objective they had reached.", "",
                      "| parameter | importance |", "|---|---|"]
            lines += [f"| {name} | {value:.3f} |" for name, value in importances.items()]
        else:
            lines.append(f"Not computed: {why_not}.")

    lines += ["", "## Plots", ""]
    for caption, name in plots:
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    lines += ["TensorBoard: `tensorboard --logdir " + str(exp.out / "tensorboard") + "`"
              + ("; Optuna: `optuna-dashboard sqlite:///" + str(exp.out / "optuna.db") + "`" if exp.is_search else "")]
    return "\n".join(lines) + "\n"


def how_found(exp: Experiment) -> list[str]:
    m, spec = exp.metrics, exp.spec
    wall = fmt_duration(m.get("wall_seconds"))
    if not exp.is_search:
        return [f"A single training run of `{spec.model.backbone}`: best epoch {m.get('best_epoch')} of "
                f"{m.get('epochs_run', spec.train.epochs)} run ({spec.train.epochs} planned), wall time {wall}."]
    outcomes = exp.trials["stop_reason"].value_counts().to_dict()
    described = ", ".join(f"{n} {reason}" for reason, n in outcomes.items())
    sched = spec.search.scheduler
    scheduler = (f"ASHA (grace {sched.grace_period}, reduction factor {sched.reduction_factor:g})"
                 if sched.type == "asha" else "no early stopping")
    best = exp.trials[exp.trials["trial_id"].astype(str) == str(m.get("best_trial"))]
    objective = best["best_objective"].iloc[0] if len(best) else math.nan
    return [f"- Search: {len(exp.trials)} trials ({described}); searcher {spec.search.searcher.type} "
            f"(seed {spec.search.searcher.seed}), {scheduler}.",
            f"- Spent {int(exp.trials['epochs'].sum())} epochs in total (at most "
            f"{len(exp.trials) * spec.train.epochs} without early stopping); wall time {wall}.",
            f"- Best trial `{m.get('best_trial')}`: val objective {objective:.4f} at epoch {m.get('best_epoch')} "
            f"(objective: {objective_text(spec)})."]


def objective_text(spec: Spec) -> str:
    return " + ".join(f"{w:g}·{name}" for name, w in spec.search.objective.items()) + ", normalised by the weights"


def best_values_table(exp: Experiment) -> list[str]:
    best = load_spec(exp.out / "best" / "config.yaml") if (exp.out / "best" / "config.yaml").is_file() else exp.spec
    if not exp.spec.space:
        return [f"Backbone `{best.model.backbone}`, lr {best.train.lr:g}, weight decay {best.train.weight_decay:g}, "
                f"dropout {best.model.dropout:g}, augmentation strength {best.augment.strength:g}."]
    values = best.model_dump(mode="json")
    lines = ["| parameter | best value | searched over |", "|---|---|---|"]
    for key, entries in exp.spec.space.items():
        value = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        entries = entries if isinstance(entries, list) else [entries]
        lines.append(f"| {key} | {fmt_value(value)} | {'; '.join(describe_entry(e) for e in entries)} |")
    return lines


def describe_entry(entry) -> str:
    for kind in ("choice", "uniform", "loguniform", "int"):
        bounds = getattr(entry, kind)
        if bounds is not None:
            text = f"{kind} {list(bounds)}"
            if entry.when:
                text += " when " + ", ".join(f"{k} in {v}" for k, v in entry.when.items())
            return text
    return "?"


def test_tables(m: dict) -> list[str]:
    ci = m.get("ci95", {})
    lines = []
    if "expression" in m:
        lines += ["### Expression", "", "| " + " | ".join(name for _, name in EXPRESSION_COLUMNS) + " |",
                  "|" + "---|" * len(EXPRESSION_COLUMNS),
                  "| " + " | ".join(with_ci(m["expression"].get(k), ci.get("expression", {}).get(k))
                                   for k, _ in EXPRESSION_COLUMNS) + " |", ""]
    affect = [t for t in ("valence", "arousal") if t in m]
    if affect:
        lines += ["### Valence and arousal", "", "| | " + " | ".join(name for _, name in AFFECT_COLUMNS) + " |",
                  "|---|" + "---|" * len(AFFECT_COLUMNS)]
        for task in affect:
            lines.append(f"| {task.capitalize()} | " + " | ".join(
                with_ci(m[task].get(k), ci.get(task, {}).get(k)) for k, _ in AFFECT_COLUMNS) + " |")
        lines.append("")
    if m.get("missing_tasks"):
        lines.append(f"Not measured (the data have no labels for them): {', '.join(m['missing_tasks'])}.")
    return lines


def gap_table(m: dict) -> list[str]:
    train = m.get("train_accuracy")
    val = (m.get("val") or {}).get("expression_accuracy")
    test = (m.get("expression") or {}).get("accuracy")
    if not all(isinstance(x, (int, float)) for x in (train, val, test)):
        return ["Not available (no expression labels)."]
    return ["| train (best epoch) | val | test | train − val | train − test |", "|---|---|---|---|---|",
            f"| {train:.3f} | {val:.3f} | {test:.3f} | {100 * (train - val):+.1f} pts | {100 * (train - test):+.1f} pts |",
            "", "Train accuracy is measured on the augmented training batches of the best epoch, with dropout on."]


def trials_table(exp: Experiment, rows: pd.DataFrame) -> list[str]:
    headers = ["trial", *exp.params, *(name for _, name in TRIAL_METRICS), "train − val"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in rows.iterrows():
        gap = row.get("train_accuracy", math.nan) - row.get("val_expression_accuracy", math.nan)
        cells = [f"`{row['trial_id']}`", *(fmt_value(row.get(p)) for p in exp.params),
                 *(fmt_value(row.get(key)) for key, _ in TRIAL_METRICS),
                 f"{100 * gap:+.1f} pts" if math.isfinite(gap) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- comparing experiments ------------------------------------------------------------------------

def compare_experiments(folders: list[Path]) -> str:
    """The test tables of several experiments side by side (markdown)."""
    exps = [load_experiment(f) for f in folders]
    names = [f"{e.spec.name} (`{e.out}`)" for e in exps]
    lines = ["# fer-tune: test results side by side", "", "| metric | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(exps)]
    lines.append("| backbone | " + " | ".join(f"`{best_backbone(e)}`" for e in exps) + " |")
    lines.append("| data | " + " | ".join(f"{e.metrics.get('data', {}).get('source', '?')}, "
                                          f"{e.metrics.get('test_images', '?')} test images" for e in exps) + " |")
    for task, columns in (("expression", EXPRESSION_COLUMNS), ("valence", AFFECT_COLUMNS), ("arousal", AFFECT_COLUMNS)):
        for key, name in columns:
            cells = [with_ci(e.metrics.get(task, {}).get(key), e.metrics.get("ci95", {}).get(task, {}).get(key))
                     if task in e.metrics else "not measured" for e in exps]
            lines.append(f"| {task} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_backbone(exp: Experiment) -> str:
    config = exp.out / "best" / "config.yaml"
    return (load_spec(config) if config.is_file() else exp.spec).model.backbone


# --- formatting -------------------------------------------------------------------------------------

def with_ci(value, interval) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    if interval and all(isinstance(x, (int, float)) and math.isfinite(x) for x in interval):
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def fmt_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
