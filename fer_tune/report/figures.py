"""The report's figures (matplotlib, drawn off-screen). Each function returns one Figure.

Kept to what a person reads at a glance: counts are annotated on the cells and bars, axes are
labelled in words, and a missing value is shown as missing rather than as zero.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fer_tune import EXPRESSIONS  # noqa: E402
from fer_tune.io import atomic_write  # noqa: E402
from fer_tune.report.experiment import Experiment, top_trials, trial_label  # noqa: E402


def confusion_figure(matrix, labels: list[str], title: str):
    """Row-normalised confusion matrix (each row: where that true class went), counts in cells."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    fig, ax = plt.subplots(figsize=(0.75 * len(labels) + 2.5, 0.75 * len(labels) + 1.5))
    image = ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if rows[i, 0] > 0:
                ax.text(j, i, f"{share[i, j]:.2f}\n({int(counts[i, j])})", ha="center", va="center",
                        fontsize=7, color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [f"{name} (n={int(n)})" for name, n in zip(labels, rows[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return fig


def affect_scatter_figure(predictions: pd.DataFrame, tasks: list[str], ccc: dict[str, float]):
    """Predicted vs true valence/arousal, with the identity line and each task's CCC."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = predictions[predictions[task].notna()]
        ax.scatter(rows[task], rows[f"{task}_pred"], s=8, alpha=0.5)
        ax.plot([-1, 1], [-1, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel=f"true {task}", ylabel=f"predicted {task}",
               title=f"{task}: CCC {ccc.get(task, math.nan):.3f} (n={len(rows)})")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def learning_curves_figure(history: pd.DataFrame, trial_ids: list[str], labels: dict[str, str]):
    """Val objective, and train vs val loss, per epoch for the given trials."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.cm.tab10.colors
    for i, trial_id in enumerate(trial_ids):
        rows = history[history["trial_id"].astype(str) == str(trial_id)].sort_values("epoch")
        colour = colours[i % len(colours)]
        left.plot(rows["epoch"], rows["objective"], marker="o", markersize=3, color=colour,
                  label=labels.get(str(trial_id), str(trial_id)))
        right.plot(rows["epoch"], rows["train_loss"], color=colour, linestyle="--", marker="o", markersize=3)
        right.plot(rows["epoch"], rows["val_loss"], color=colour, marker="o", markersize=3)
    left.set(xlabel="epoch", ylabel="val objective", title="validation objective")
    right.set(xlabel="epoch", ylabel="loss", title="loss: train (dashed) vs val (solid)")
    left.legend(fontsize=7)
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def parallel_coordinates_figure(trials: pd.DataFrame, params: list[str], metric: str):
    """Every trial as a line across its sampled values (scaled per axis) and its objective.

    Numbers are placed on each axis's own [min, max] (log-scaled when the values span over a
    decade), text values on evenly spaced ticks; errored trials are grey and dashed.
    """
    axes_names = [*params, metric]
    scaled, ticks = {}, {}
    errored = trials["stop_reason"].eq("errored") if "stop_reason" in trials else pd.Series(False, index=trials.index)
    for name in axes_names:
        values = trials[name]
        numeric = pd.to_numeric(values, errors="coerce")
        flags = values.dropna().map(lambda v: isinstance(v, (bool, np.bool_))).any()  # a choice of true/false
        if not flags and numeric.notna().sum() == values.notna().sum() and numeric.notna().any():
            # axis range from the healthy trials: a diverged lr of 1e8 must not flatten the others;
            # errored trials' values outside it are drawn at the axis ends
            healthy = numeric[~errored & numeric.notna()]
            low, high = (healthy if len(healthy) else numeric).min(), (healthy if len(healthy) else numeric).max()
            log = low > 0 and high / low > 10
            f = (lambda v: np.log10(v)) if log else (lambda v: v)
            span = (f(high) - f(low)) or 1.0
            scaled[name] = ((f(numeric.clip(lower=low if log else None)) - f(low)) / span).clip(-0.05, 1.05)
            ticks[name] = [(0.0, f"{low:.3g}"), (1.0, f"{high:.3g}")]
        else:
            categories = sorted(values.dropna().astype(str).unique())
            position = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5)
                        for i, c in enumerate(categories)}
            scaled[name] = values.map(lambda v: position.get(str(v), np.nan) if pd.notna(v) else np.nan)
            ticks[name] = [(p, c) for c, p in position.items()]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(axes_names)), 4.8))
    objective = pd.to_numeric(trials[metric], errors="coerce")
    finite = objective[np.isfinite(objective)]
    norm = plt.Normalize(finite.min(), finite.max()) if len(finite) else plt.Normalize(0, 1)
    x = np.arange(len(axes_names))
    for idx in trials.sort_values(metric, na_position="first").index:
        y = [scaled[name].loc[idx] for name in axes_names]
        if errored.loc[idx] or not np.isfinite(objective.loc[idx]):
            ax.plot(x, y, color="grey", linestyle="--", alpha=0.6, linewidth=1)
        else:
            ax.plot(x, y, color=plt.cm.viridis(norm(objective.loc[idx])), alpha=0.85, linewidth=1.6)
    for i, name in enumerate(axes_names):
        ax.axvline(i, color="black", linewidth=0.8)
        for position, text in ticks[name]:
            ax.text(i + 0.03, position, text, fontsize=7, va="center")
    ax.set_xticks(x, axes_names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(f"all trials (colour: {metric}; grey dashed: errored)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=metric, fraction=0.03)
    fig.tight_layout()
    return fig


def importances_figure(study, evaluator):
    """Optuna's own importance plot of the study; with the report's evaluator it draws the table's numbers."""
    import optuna
    from optuna.visualization.matplotlib import plot_param_importances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_param_importances(study, evaluator=evaluator)
    figure = axes.get_figure()
    figure.set_size_inches(6.5, 0.45 * len(axes.get_yticklabels()) + 1.6)
    axes.set_title("parameter importances (fANOVA)")
    figure.tight_layout()
    return figure


def class_counts_figure(counts: dict[str, int], title: str):
    names = list(counts)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, [counts[n] for n in names], color="tab:gray")
    for i, name in enumerate(names):
        ax.text(i, counts[name], str(counts[name]), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="images", title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def save(figure, path) -> None:
    """Write the PNG atomically (a crash never leaves half an image) and free the figure."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(figure)


def write_plots(exp: Experiment, report_dir: Path) -> list[tuple[str, str]]:
    """Every figure the data allow, as (caption, file name)."""
    from sklearn.metrics import confusion_matrix

    written = []

    def save_as(figure, name: str, caption: str) -> None:
        save(figure, report_dir / name)
        written.append((caption, name))

    labels = list(exp.metrics.get("labels", range(len(EXPRESSIONS))))
    names = exp.label_names()
    preds = exp.predictions
    if preds is not None and "expression" in exp.metrics:
        labelled = preds[preds["expression"] >= 0]
        matrix = confusion_matrix(labelled["expression"], labelled["expression_pred"], labels=labels)
        save_as(confusion_figure(matrix, names, f"test confusion matrix (n={len(labelled)}), row-normalised"),
             "confusion_matrix.png", "Test confusion matrix (rows: true class, normalised)")
    affect = [t for t in ("valence", "arousal") if t in exp.metrics and preds is not None]
    if affect:
        save_as(affect_scatter_figure(preds, affect, {t: exp.metrics[t]["ccc"] for t in affect}),
             "valence_arousal.png", "Valence and arousal: predicted vs true (test)")
    if exp.history is not None and len(exp.history):
        top = top_trials(exp)
        ids = [str(t) for t in top["trial_id"]] if top is not None else sorted(exp.history["trial_id"].astype(str).unique())
        labels_by_id = {str(row["trial_id"]): trial_label(exp, row) for _, row in top.iterrows()} if top is not None else {}
        save_as(learning_curves_figure(exp.history, ids, labels_by_id), "learning_curves.png",
             f"Learning curves of the top {len(ids)} trial{'s' if len(ids) > 1 else ''}")
    if exp.is_search and exp.params:
        save_as(parallel_coordinates_figure(exp.trials, exp.params, "best_objective"),
             "parallel_coordinates.png", "All trials: sampled values and best objective")
    per_class = exp.metrics.get("counts", {}).get("per_class")
    if per_class:
        counts = {EXPRESSIONS[int(k)]: int(v) for k, v in per_class.items()}
        save_as(class_counts_figure(counts, f"test images per class (n={sum(counts.values())})"),
             "class_counts.png", "Test images per class")
    return written
