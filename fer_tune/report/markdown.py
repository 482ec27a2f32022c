"""report.md: an experiment as a person reads it, and several experiments' test results side by side."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fer_tune.layout import rerun_command
from fer_tune.report.experiment import TOP_TRIALS, Experiment, best_spec, fmt_value, load_experiment, top_trials
from fer_tune.spec import Spec

EXPRESSION_COLUMNS = (("accuracy", "Accuracy"), ("f1_macro", "F1-Score"), ("kappa", "Kappa"),
                      ("auc_roc", "AUC-ROC"), ("auc_pr", "AUC-PR"))

AFFECT_COLUMNS = (("rmse", "RMSE"), ("pcc", "Correlation"), ("sagr", "SAGR"), ("ccc", "CCC"))

TRIAL_METRICS = (("epochs", "epochs"), ("stop_reason", "outcome"), ("best_objective", "best objective"),
                 ("val_expression_accuracy", "val acc"), ("val_expression_f1", "val F1"),
                 ("val_valence_ccc", "val V-CCC"), ("val_arousal_ccc", "val A-CCC"),
                 ("train_accuracy", "train acc"))


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
    if exp.is_search:
        lines += ["", f"## Found recipe vs your recipe (held-out test, {m.get('test_images', '?')} images)", ""]
        lines += comparison_lines(m.get("comparison") or {})
    lines += ["", "## Best config", ""]
    lines += how_found(exp)
    lines += ["", f"Re-run it: `{rerun_command(exp.out)}` (weights: `best/model.pt`).", ""]
    lines += best_values_table(exp)

    lines += ["", f"## Held-out test results ({m.get('test_images', '?')} images)", "",
              f"The test split was read once, after the {'search' if exp.is_search else 'training'}, "
              "with the best epoch's weights. "
              "Brackets: 95 % percentile-bootstrap intervals.", ""]
    lines += test_tables(m)

    lines += ["", "## Overfitting: train vs val vs test accuracy of the best " + ("trial" if exp.is_search else "epoch"), ""]
    lines += gap_table(m)

    if exp.is_search:
        lines += ["", "## Finalists: re-trained at full budget", ""]
        lines += finalist_lines(m)
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


LOWER_IS_BETTER = {"rmse"}


def comparison_lines(c: dict) -> list[str]:
    """The test of the found recipe against yours: each metric, the paired difference, a verdict
    that claims a gain or a loss only when its 95 % interval excludes 0, and McNemar's test."""
    if c.get("note"):
        return [f"Not compared: {c['note']}."]
    if c.get("same"):
        return [f"The winner is your recipe (trial `{c.get('trial')}`): the search found nothing that did better "
                f"on validation, so there is no gain to claim."]
    if "difference" not in c:
        return ["Not compared (this experiment was made before fer-tune compared recipes)."]
    mine = c.get("your_recipe", {})
    retrained = f", trained to full budget as run `{c.get('run')}`" if c.get("run") != c.get("trial") else ""
    lines = [f"Your recipe is the trial that ran the spec's own values (`{c.get('trial')}`{retrained}); "
             "both models were tested once, after the selection, on the same faces. Differences are found minus "
             "yours, with paired 95 % bootstrap intervals (the same resampled faces for both).", "",
             "| metric | your recipe | found recipe | difference [95 % CI] | verdict |", "|---|---|---|---|---|"]
    found = {t: c["difference"][t] for t in c["difference"]}
    for task, columns in (("expression", EXPRESSION_COLUMNS), ("valence", AFFECT_COLUMNS), ("arousal", AFFECT_COLUMNS)):
        if task not in found:
            continue
        for key, name in columns:
            yours = (mine.get(task) or {}).get(key)
            gap = found[task].get(key)
            low, high = (c.get("ci95", {}).get(task, {}).get(key) or [math.nan, math.nan])
            theirs = yours + gap if isinstance(yours, (int, float)) and isinstance(gap, (int, float)) else math.nan
            lines.append(f"| {task} {name} | {fmt_value(yours)} | {fmt_value(theirs)} | "
                         f"{gap:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict(low, high, key in LOWER_IS_BETTER)} |")
    if c.get("mcnemar"):
        n = c["mcnemar"]
        lines += ["", f"McNemar's exact test on expression accuracy: {n['only_b']} test faces only the found recipe "
                      f"got right, {n['only_a']} only yours; p = {n['p_value']:.3g}."]
    return lines


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    if low > 0:
        return "found is worse" if lower_is_better else "found is better"
    if high < 0:
        return "found is better" if lower_is_better else "found is worse"
    return "no clear difference (interval includes 0)"


def finalist_lines(m: dict) -> list[str]:
    finalists = m.get("finalists") or []
    if not finalists:
        return ["None: `search.finalists` is 0, so the best trial as it ran is the winner."]
    lines = ["Each finalist's validation objective over its full-budget runs (one seed each); the winner has the "
             "best mean. Interval: 95 % t interval of the mean.", "",
             "| trial | runs | seeds | mean objective [95 % CI] | each run | |", "|---|---|---|---|---|---|"]
    for f in finalists:
        low, high = f.get("ci95") or [math.nan, math.nan]
        interval = f" [{low:.4f}, {high:.4f}]" if math.isfinite(low) else ""
        lines.append(f"| `{f['trial_id']}` | {f['runs']} | {', '.join(map(str, f['seeds']))} | {f['mean']:.4f}{interval} "
                     f"| {', '.join(f'{v:.4f}' for v in f['objectives'])} | {'winner' if f.get('winner') else ''} |")
    return lines


def how_found(exp: Experiment) -> list[str]:
    m, spec = exp.metrics, exp.spec
    wall = fmt_duration(m.get("wall_seconds"))
    if not exp.is_search:
        return [f"A single training run of `{spec.model.backbone}`: best epoch {m.get('best_epoch')} of "
                f"{m.get('epochs_run', spec.train.epochs)} run ({spec.train.epochs} planned), wall time {wall}."]
    outcomes = exp.trials["stop_reason"].value_counts().to_dict()
    described = ", ".join(f"{n} {reason}" for reason, n in outcomes.items())
    sched = spec.search.scheduler
    scheduler = (f"ASHA (grace {sched.grace(spec.train.epochs)}, reduction factor {sched.reduction_factor:g}"
                 f"{f', {sched.brackets} brackets' if sched.brackets > 1 else ''})"
                 if sched.type == "asha" else "no early stopping")
    best = exp.trials[exp.trials["trial_id"].astype(str) == str(m.get("best_trial"))]
    objective = best["best_objective"].iloc[0] if len(best) else math.nan
    return [f"- Search: {len(exp.trials)} trials ({described}); searcher {spec.search.searcher.type} "
            f"(seed {spec.search.searcher.seed}), {scheduler}.",
            f"- Spent {int(exp.trials['epochs'].sum())} epochs on the trials (at most "
            f"{len(exp.trials) * spec.train.epochs} without early stopping){final_phase_text(m)}; "
            f"wall time {wall}{pieces_text(m)}.",
            f"- Best trial `{m.get('best_trial')}`: val objective {objective:.4f} at epoch {m.get('best_epoch')} "
            f"(objective: {objective_text(spec)})."] + known_recipe_lines(exp)


def final_phase_text(m: dict) -> str:
    if not m.get("final_runs") or "final_epochs" not in m:
        return ""
    return f" and {m['final_epochs']} in the final phase's {m['final_runs']} run(s)"


def pieces_text(m: dict) -> str:
    pieces = m.get("wall_pieces", 1)
    return f" over {pieces} pieces (resumed {pieces - 1} time{'s' if pieces > 2 else ''})" if pieces > 1 else ""


def known_recipe_lines(exp: Experiment) -> list[str]:
    """Where the recipes the search started from ended, beside the winner (trials.csv's `recipe`)."""
    if "recipe" not in exp.trials:
        return []
    lines = []
    for _, row in exp.trials[exp.trials["recipe"].astype(object).fillna("").astype(str) != ""].iterrows():
        outcome = "errored" if row["stop_reason"] == "errored" else f"val objective {row['best_objective']:.4f}"
        lines.append(f"- Started from {row['recipe']}: trial `{row['trial_id']}`, {outcome} "
                     f"({row['stop_reason']} after {int(row['epochs'])} epochs).")
    return lines


def objective_text(spec: Spec) -> str:
    text = " + ".join(f"{w:g}·{name}" for name, w in spec.search.objective.items()) + ", normalised by the weights"
    penalty = spec.search.gap_penalty
    if penalty is not None:
        text += (f", less {penalty.weight:g} × the train − val accuracy gap above "
                 f"{100 * penalty.allowed:g} points")
    return text


def best_values_table(exp: Experiment) -> list[str]:
    best = best_spec(exp)
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
    return best_spec(exp).model.backbone


def with_ci(value, interval) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    if interval and all(isinstance(x, (int, float)) and math.isfinite(x) for x in interval):
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def fmt_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
