"""Evaluation metrics for the multi-task FER network, with bootstrap confidence intervals.

Tasks
-----
* ``expression``: 8-way classification (ids 0..7), label ``-1`` means "no label".
  Metrics: accuracy, macro F1, Cohen's kappa, macro one-vs-rest AUC-ROC, macro AUC-PR
  (average precision).
* ``valence`` / ``arousal``: regression in [-1, 1], ``NaN`` means "no label".
  Metrics: RMSE, Pearson r (PCC), sign agreement (SAGR), Lin's concordance (CCC).

Samples without a target are masked out per task; a task with no valid samples is
"missing" (listed in ``missing_tasks`` and left out of the metric dicts).

Label sets
----------
``labels`` is the set of class ids the dataset has (default: the classes present in the
valid targets).  Macro F1 and the macro AUCs average over those classes only, and for the
AUCs the probability columns are restricted to ``labels`` and renormalised per row.
The predicted class used by accuracy / F1 / kappa is the argmax over *all* probability
columns, i.e. the model's actual decision: predicting a class the dataset does not have
counts as an error (a false negative of the true class).

Degenerate cases never raise or warn: a per-class AUC needs at least one positive and one
negative among the valid samples, classes where it is undefined are left out of the macro
average and the AUC is NaN when no class qualifies (e.g. only one class present); a class
that is never present and never predicted is left out of macro F1; kappa is NaN when
chance agreement is 1; PCC is NaN for constant input; CCC follows its formula (0 when
the denominator is positive, NaN otherwise).  Non-finite predictions for valid samples
make every metric of that task NaN (so a diverged trial is scored, not crashed).

Bootstrap
---------
``compute_metrics(..., ci=True)`` adds percentile 95 % intervals from ``n_boot`` resamples
(with replacement) of each task's valid samples, seeded and deterministic.  Resamples
where a metric is undefined are skipped (``nanpercentile``).  The resampled metrics are
computed in vectorised form (resample = integer weight vector); they equal the
scikit-learn point metrics evaluated on the resampled arrays.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
    root_mean_squared_error,
)

from fer_tune import TASKS

EXPRESSION_METRICS = ("accuracy", "f1_macro", "kappa", "auc_roc", "auc_pr")
AFFECT_METRICS = ("rmse", "pcc", "sagr", "ccc")

AFFECT_TASKS = TASKS[1:]

_FLAT_NAMES = {"f1_macro": "f1"}
"""Metric names that differ in `flat_metrics` keys."""

_BOOT_CELLS = 4_000_000
"""Max resamples x samples held in memory at once by the bootstrap (chunking)."""

_REL_VAR_EPS = 1e-12
"""A (resampled) variance below this fraction of the mean square counts as zero."""


# --------------------------------------------------------------------------- helpers


def _nan_dict(names: tuple[str, ...]) -> dict[str, float]:
    return {name: float("nan") for name in names}


def _as_float(x: Any) -> float:
    return float(x)


def _resolve_labels(labels, y_valid: np.ndarray, n_columns: int | None) -> np.ndarray:
    """Sorted unique int class ids; validated against the targets and probability columns."""
    if labels is None:
        lab = np.unique(y_valid).astype(np.int64)
    else:
        lab = np.unique(np.asarray(list(labels), dtype=np.int64))
        if lab.size == 0:
            raise ValueError("labels is empty")
    if lab.size and lab.min() < 0:
        raise ValueError(f"labels must be class ids >= 0, got {lab.tolist()}")
    if n_columns is not None and lab.size and lab.max() >= n_columns:
        raise ValueError(
            f"labels {lab.tolist()} include ids >= the {n_columns} probability columns"
        )
    extra = np.setdiff1d(np.unique(y_valid), lab)
    if extra.size:
        raise ValueError(
            f"expression targets contain classes {extra.tolist()} that are not in "
            f"labels {lab.tolist()}"
        )
    return lab


def _check_expression_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"expression targets must be 1-D, got shape {y.shape}")
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("expression targets must be integer class ids (-1 = missing)")
    y = y.astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"expression probabilities must have shape (N, C) with N = {y.shape[0]}, "
            f"got {p.shape}"
        )
    if y.size and (y.min() < -1 or y.max() >= p.shape[1]):
        raise ValueError(
            f"expression targets must be in [-1, {p.shape[1] - 1}], "
            f"got range [{y.min()}, {y.max()}]"
        )
    return y, p


def _check_affect_inputs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"affect targets {y.shape} and predictions {p.shape} differ in length")
    return y, p


def _restricted_scores(probs: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Columns `lab` of `probs`, renormalised to sum to 1 per row (uniform if the row sums to 0)."""
    sub = probs[:, lab]
    tot = sub.sum(axis=1, keepdims=True)
    uniform = np.full_like(sub, 1.0 / max(len(lab), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tot > 0, sub / np.where(tot > 0, tot, 1.0), uniform)


def predicted_classes(probs, labels) -> np.ndarray:
    """The predicted class id of each row, among the classes the dataset has (as the metrics count)."""
    lab = np.asarray(list(labels), dtype=np.int64)
    return lab[np.asarray(probs)[:, lab].argmax(axis=1)]


# ----------------------------------------------------------------- affect (point)


def ccc(y_true, y_pred) -> float:
    """Lin's concordance correlation coefficient, population (ddof=0) moments.

    ``2 cov / (var_y + var_p + (mean_y - mean_p)^2)``; 0 when the covariance is 0 and the
    denominator positive (e.g. constant predictions), NaN when the denominator is 0 or the
    input is empty.
    """
    y, p = _check_affect_inputs(y_true, y_pred)
    if y.size == 0:
        return float("nan")
    my, mp = y.mean(), p.mean()
    dy, dp = y - my, p - mp
    vy, vp = np.mean(dy * dy), np.mean(dp * dp)
    cov = np.mean(dy * dp)
    den = vy + vp + (my - mp) ** 2
    if not den > 0:
        return float("nan")
    return float(2.0 * cov / den)


def sagr(y_true, y_pred) -> float:
    """Sign agreement: fraction of samples with ``(y >= 0) == (p >= 0)`` (0 counts as positive)."""
    y, p = _check_affect_inputs(y_true, y_pred)
    if y.size == 0:
        return float("nan")
    return float(np.mean((y >= 0) == (p >= 0)))


def _pcc(y: np.ndarray, p: np.ndarray) -> float:
    """Pearson r; NaN for constant input or fewer than 2 samples."""
    if y.size < 2:
        return float("nan")
    dy, dp = y - y.mean(), p - p.mean()
    vy, vp = np.mean(dy * dy), np.mean(dp * dp)
    if vy <= _REL_VAR_EPS * np.mean(y * y) or vp <= _REL_VAR_EPS * np.mean(p * p):
        return float("nan")
    r = np.mean(dy * dp) / math.sqrt(vy * vp)
    return float(np.clip(r, -1.0, 1.0))


def affect_metrics(y_true, y_pred) -> dict[str, float]:
    """RMSE, PCC, SAGR and CCC for one regression target; NaN targets are masked out.

    Returns all-NaN metrics when no target is valid or a prediction for a valid target
    is not finite.
    """
    y, p = _check_affect_inputs(y_true, y_pred)
    valid = ~np.isnan(y)
    y, p = y[valid], p[valid]
    if y.size == 0 or not np.all(np.isfinite(p)) or not np.all(np.isfinite(y)):
        return _nan_dict(AFFECT_METRICS)
    return {
        "rmse": _as_float(root_mean_squared_error(y, p)),
        "pcc": _pcc(y, p),
        "sagr": sagr(y, p),
        "ccc": ccc(y, p),
    }


# ------------------------------------------------------------- expression (point)


def _macro_ovr(y: np.ndarray, scores: np.ndarray, lab: np.ndarray, fn) -> float:
    """Mean of the binary metric `fn` over classes with both positives and negatives."""
    vals = []
    for j, k in enumerate(lab):
        pos = y == k
        n_pos = int(pos.sum())
        if n_pos == 0 or n_pos == y.size:
            continue
        vals.append(fn(pos.astype(np.int64), scores[:, j]))
    return float(np.mean(vals)) if vals else float("nan")


def expression_metrics(y_true, probs, labels=None) -> dict[str, float]:
    """Accuracy, macro F1, Cohen's kappa, macro OvR AUC-ROC and macro AUC-PR.

    `y_true`: int class ids, -1 = missing (masked out).  `probs`: (N, C) class
    probabilities (C = 8).  `labels`: the class ids the dataset has (default: those present
    in the valid targets); macro averages run over them and the AUCs use the `labels`
    columns of `probs`, renormalised per row.  All-NaN when no target is valid or a valid
    sample has non-finite probabilities.
    """
    y, p = _check_expression_inputs(y_true, probs)
    valid = y >= 0
    y, p = y[valid], p[valid]
    lab = _resolve_labels(labels, y, p.shape[1])
    if y.size == 0 or not np.all(np.isfinite(p)):
        return _nan_dict(EXPRESSION_METRICS)
    pred = np.argmax(p, axis=1)
    scores = _restricted_scores(p, lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f1 = f1_score(y, pred, labels=lab, average="macro", zero_division=np.nan)
        kappa = cohen_kappa_score(y, pred, replace_undefined_by=np.nan)
        out = {
            "accuracy": _as_float(accuracy_score(y, pred)),
            "f1_macro": _as_float(f1),
            "kappa": _as_float(kappa),
            "auc_roc": _macro_ovr(y, scores, lab, roc_auc_score),
            "auc_pr": _macro_ovr(y, scores, lab, average_precision_score),
        }
    return out


# ------------------------------------------------------------- vectorised bootstrap


def _resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """Multiplicities of resamples `idx` (B, n), transposed to (n, B).

    float32 (exact integer counts below 2**24) unless `n` is larger.
    """
    b = idx.shape[0]
    flat = (np.arange(b, dtype=np.int64)[:, None] * n + idx).ravel()
    counts = np.bincount(flat, minlength=b * n).reshape(b, n)
    dtype = np.float32 if n < 2**24 else np.float64
    return np.ascontiguousarray(counts.T, dtype=dtype)


def _affect_batch(yb: np.ndarray, pb: np.ndarray) -> dict[str, np.ndarray]:
    """Affect metrics of each row of (B, n) resampled targets / predictions."""
    my, mp = yb.mean(axis=1), pb.mean(axis=1)
    dy, dp = yb - my[:, None], pb - mp[:, None]
    vy, vp = (dy * dy).mean(axis=1), (dp * dp).mean(axis=1)
    cov = (dy * dp).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rmse = np.sqrt(((yb - pb) ** 2).mean(axis=1))
        const = (vy <= _REL_VAR_EPS * (yb * yb).mean(axis=1)) | (
            vp <= _REL_VAR_EPS * (pb * pb).mean(axis=1)
        )
        pcc = np.where(const, np.nan, np.clip(cov / np.sqrt(vy * vp), -1.0, 1.0))
        den = vy + vp + (my - mp) ** 2
        ccc_ = np.where(den > 0, 2.0 * cov / np.where(den > 0, den, 1.0), np.nan)
    sagr_ = ((yb >= 0) == (pb >= 0)).mean(axis=1)
    return {"rmse": rmse, "pcc": pcc, "sagr": sagr_, "ccc": ccc_}


class _ExpressionBoot:
    """Expression metrics under many weight vectors (a resample = multiplicity weights).

    Sort orders and score-tie groups are computed once; each call evaluates a (n, B)
    matrix of weights.  Weighted ROC AUC counts positive/negative pairs per score group
    (ties count 1/2) and weighted AP is sum_g (P_g / P) * precision_g over descending score
    groups -- the definitions of `roc_auc_score` / `average_precision_score` applied to the
    resampled (duplicated) samples.
    """

    def __init__(self, y: np.ndarray, probs: np.ndarray, lab: np.ndarray):
        self.lab = lab
        n_cols = probs.shape[1]
        self.n_cols = n_cols
        pred = np.argmax(probs, axis=1)
        self.cell_onehot = np.zeros((n_cols * n_cols, y.size), dtype=np.float32)
        self.cell_onehot[y * n_cols + pred, np.arange(y.size)] = 1.0
        scores = _restricted_scores(probs, lab)
        self.per_class = []
        for k_i, k in enumerate(lab):
            order = np.argsort(-scores[:, k_i], kind="stable")  # descending score
            s = scores[order, k_i]
            pos = y[order] == k
            new_group = np.concatenate(([True], np.diff(s) != 0))
            group = np.cumsum(new_group) - 1
            starts = np.flatnonzero(new_group)
            ends = np.concatenate((starts[1:], [s.size]))  # exclusive
            neg_before = np.concatenate(([0], np.cumsum(~pos)))  # negatives in [0, i)
            pos_before = np.concatenate(([0], np.cumsum(pos)))
            g = group[pos]  # score group of each positive, in descending order
            self.per_class.append(
                (
                    order[pos],  # positive samples
                    order[~pos],  # negative samples
                    neg_before[ends[g]],  # negatives scoring >= this positive
                    neg_before[starts[g]],  # negatives scoring > this positive
                    pos_before[ends[g]],  # positives scoring >= this positive
                )
            )

    def __call__(self, w_t: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics for each column of weights `w_t` (n, B); arrays of shape (B,)."""
        c = self.n_cols
        b = w_t.shape[1]
        conf = (self.cell_onehot.astype(w_t.dtype) @ w_t).astype(np.float64)
        conf = conf.T.reshape(b, c, c)  # [resample, true, predicted]
        total = conf.sum(axis=(1, 2))
        diag = np.einsum("bii->bi", conf)
        rows, cols = conf.sum(axis=2), conf.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = diag.sum(axis=1) / total
            pe = (rows * cols).sum(axis=1) / total**2
            kappa = np.where(pe < 1, (acc - pe) / (1 - pe), np.nan)
            f1_den = rows[:, self.lab] + cols[:, self.lab]
            f1_k = np.where(f1_den > 0, 2 * diag[:, self.lab] / f1_den, np.nan)

        roc = np.full((b, len(self.lab)), np.nan)
        ap = np.full_like(roc, np.nan)
        for j, (pos_idx, neg_idx, neg_ge, neg_gt, pos_ge) in enumerate(self.per_class):
            if pos_idx.size == 0 or neg_idx.size == 0:
                continue
            w_pos = w_t[pos_idx]
            cum_neg = _cumsum0(w_t[neg_idx])  # row m: weight of the first m negatives
            cum_pos = _cumsum0(w_pos)
            p_tot, n_tot = cum_pos[-1], cum_neg[-1]
            w_pos = w_pos.astype(np.float64)
            fp_ge = cum_neg[neg_ge]
            # each positive beats the negatives below its score, ties count 1/2
            beaten = n_tot - 0.5 * (fp_ge + cum_neg[neg_gt])
            tp_ge = cum_pos[pos_ge]
            with np.errstate(divide="ignore", invalid="ignore"):
                prec = np.where(w_pos > 0, tp_ge / np.maximum(tp_ge + fp_ge, 1e-300), 0.0)
                ok = (p_tot > 0) & (n_tot > 0)
                roc[:, j] = np.where(ok, (w_pos * beaten).sum(axis=0) / (p_tot * n_tot), np.nan)
                ap[:, j] = np.where(ok, (w_pos * prec).sum(axis=0) / p_tot, np.nan)
        return {
            "accuracy": acc,
            "f1_macro": _nanmean_rows(f1_k),
            "kappa": kappa,
            "auc_roc": _nanmean_rows(roc),
            "auc_pr": _nanmean_rows(ap),
        }


def _cumsum0(a: np.ndarray) -> np.ndarray:
    """Cumulative sums down axis 0 with a leading zero row, as float64."""
    out = np.empty((a.shape[0] + 1,) + a.shape[1:], dtype=np.float64)
    out[0] = 0.0
    np.cumsum(a, axis=0, out=out[1:])
    return out


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, a, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cnt > 0, tot / np.where(cnt > 0, cnt, 1), np.nan)


def _percentile_ci(samples: np.ndarray) -> list[float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def _bootstrap(n: int, n_boot: int, rng: np.random.Generator, batch_fn, names) -> dict:
    """Percentile 95 % CIs of the metrics `batch_fn(idx)` returns for (b, n) resample indices.

    Resamples are drawn in chunks to bound memory; NaN (undefined) resamples are skipped.
    """
    chunk = max(1, min(n_boot, _BOOT_CELLS // max(n, 1)))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        for name, vals in batch_fn(idx).items():
            parts[name].append(vals)
        done += b
    return {name: _percentile_ci(np.concatenate(parts[name])) for name in names}


# --------------------------------------------------------------------------- public


def compute_metrics(
    targets: dict,
    preds: dict,
    labels=None,
    ci: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """All metrics of all tasks, JSON-ready (plain floats / ints / lists).

    `targets`: {"expression": int (N,) with -1 missing, "valence"/"arousal": float (N,) with
    NaN missing}; a task key absent from `targets` counts as missing.  `preds`:
    {"expression": (N, C) probabilities, "valence"/"arousal": float (N,)}.
    `labels`: class ids the dataset has (see `expression_metrics`).  With `ci`, adds
    "ci95": {task: {metric: [lo, hi]}} from `n_boot` percentile-bootstrap resamples of each
    task's valid samples, seeded by `seed`.
    """
    if ci and int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_boot = int(n_boot)
    out: dict[str, Any] = {}
    missing: list[str] = []
    counts: dict[str, Any] = {}
    ci95: dict[str, dict[str, list[float]]] = {}

    # expression ---------------------------------------------------------------
    y_raw = targets.get("expression")
    if y_raw is not None and preds.get("expression") is None:
        if np.any(np.asarray(y_raw) >= 0):
            raise ValueError("targets have expression labels but preds have no 'expression'")
        y_raw = None
    if y_raw is None:
        y_valid = np.zeros(0, dtype=np.int64)
        lab = _resolve_labels(labels, y_valid, None)
        p = None
    else:
        y_all, p_all = _check_expression_inputs(y_raw, preds["expression"])
        valid = y_all >= 0
        y_valid, p = y_all[valid], p_all[valid]
        lab = _resolve_labels(labels, y_valid, p_all.shape[1])
    counts["expression"] = int(y_valid.size)
    counts["per_class"] = {str(int(k)): int(np.sum(y_valid == k)) for k in lab}
    if y_valid.size == 0:
        missing.append("expression")
    else:
        out["expression"] = expression_metrics(y_valid, p, labels=lab)
        if ci:
            if np.all(np.isfinite(p)):
                boot = _ExpressionBoot(y_valid, p, lab)
                rng = np.random.default_rng([seed, 0])
                n_exp = y_valid.size
                ci95["expression"] = _bootstrap(
                    n_exp,
                    n_boot,
                    rng,
                    lambda idx: boot(_resample_weights(idx, n_exp)),
                    EXPRESSION_METRICS,
                )
            else:
                ci95["expression"] = {m: [float("nan")] * 2 for m in EXPRESSION_METRICS}

    # valence / arousal ---------------------------------------------------------
    for t_i, task in enumerate(AFFECT_TASKS, start=1):
        y_raw = targets.get(task)
        if y_raw is not None and preds.get(task) is None:
            if not np.all(np.isnan(np.asarray(y_raw, dtype=np.float64))):
                raise ValueError(f"targets have {task} values but preds have no {task!r}")
            y_raw = None
        if y_raw is None:
            counts[task] = 0
            missing.append(task)
            continue
        y_all, p_all = _check_affect_inputs(y_raw, preds[task])
        valid = ~np.isnan(y_all)
        y, p_t = y_all[valid], p_all[valid]
        counts[task] = int(y.size)
        if y.size == 0:
            missing.append(task)
            continue
        out[task] = affect_metrics(y, p_t)
        if ci:
            if np.all(np.isfinite(p_t)) and np.all(np.isfinite(y)):
                rng = np.random.default_rng([seed, t_i])
                ci95[task] = _bootstrap(
                    y.size,
                    n_boot,
                    rng,
                    lambda idx, y=y, p_t=p_t: _affect_batch(y[idx], p_t[idx]),
                    AFFECT_METRICS,
                )
            else:
                ci95[task] = {m: [float("nan")] * 2 for m in AFFECT_METRICS}

    out["missing_tasks"] = missing
    out["counts"] = counts
    if ci:
        out["ci95"] = ci95
    return out


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flatten `compute_metrics` output to {prefix + "task_metric": float}.

    E.g. "expression_accuracy", "expression_f1" (for f1_macro), "valence_ccc"; missing
    tasks (and counts / CIs) produce no keys.
    """
    flat: dict[str, float] = {}
    for task, names in (
        ("expression", EXPRESSION_METRICS),
        ("valence", AFFECT_METRICS),
        ("arousal", AFFECT_METRICS),
    ):
        vals = metrics.get(task)
        if not isinstance(vals, dict):
            continue
        for name in names:
            if name in vals:
                flat[f"{prefix}{task}_{_FLAT_NAMES.get(name, name)}"] = float(vals[name])
    return flat


def paired_comparison(targets: dict, preds_a: dict, preds_b: dict, labels=None, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Model B minus model A on the same samples, JSON-ready.

    "difference": {task: {metric: B - A}}; "ci95": the paired 95 % percentile-bootstrap interval of
    each difference (each resample draws the same samples for both models, so what the two share,
    the difficulty of the faces drawn, cancels out); "mcnemar": McNemar's exact test on
    expression correctness ("only_b" samples B gets right and A wrong, "only_a" the reverse,
    two-sided "p_value"). Tasks without targets are left out, as in `compute_metrics`.
    """
    from scipy.stats import binomtest

    a = compute_metrics(targets, preds_a, labels=labels)
    b = compute_metrics(targets, preds_b, labels=labels)
    out: dict[str, Any] = {"difference": {}, "ci95": {}}
    y_raw = targets.get("expression")
    if "expression" in a and y_raw is not None:
        y_all, pa_all = _check_expression_inputs(y_raw, preds_a["expression"])
        _, pb_all = _check_expression_inputs(y_raw, preds_b["expression"])
        valid = y_all >= 0
        y, pa, pb = y_all[valid], pa_all[valid], pb_all[valid]
        lab = _resolve_labels(labels, y, pa_all.shape[1])
        out["difference"]["expression"] = {m: b["expression"][m] - a["expression"][m] for m in EXPRESSION_METRICS}
        if np.all(np.isfinite(pa)) and np.all(np.isfinite(pb)):
            boot_a, boot_b = _ExpressionBoot(y, pa, lab), _ExpressionBoot(y, pb, lab)

            def expression_gap(idx):
                weights = _resample_weights(idx, y.size)
                ma, mb = boot_a(weights), boot_b(weights)
                return {m: mb[m] - ma[m] for m in EXPRESSION_METRICS}

            out["ci95"]["expression"] = _bootstrap(y.size, n_boot, np.random.default_rng([seed, 0]), expression_gap,
                                                   EXPRESSION_METRICS)
        right_a, right_b = pa.argmax(axis=1) == y, pb.argmax(axis=1) == y
        only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
        p_value = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        out["mcnemar"] = {"only_a": only_a, "only_b": only_b, "p_value": float(p_value)}
    for t_i, task in enumerate(AFFECT_TASKS, start=1):
        if task not in a or task not in b:
            continue
        y_all, pa_all = _check_affect_inputs(targets[task], preds_a[task])
        _, pb_all = _check_affect_inputs(targets[task], preds_b[task])
        valid = ~np.isnan(y_all)
        y, pa, pb = y_all[valid], pa_all[valid], pb_all[valid]
        out["difference"][task] = {m: b[task][m] - a[task][m] for m in AFFECT_METRICS}
        if np.all(np.isfinite(pa)) and np.all(np.isfinite(pb)):
            def affect_gap(idx, y=y, pa=pa, pb=pb):
                ma, mb = _affect_batch(y[idx], pa[idx]), _affect_batch(y[idx], pb[idx])
                return {m: mb[m] - ma[m] for m in AFFECT_METRICS}

            out["ci95"][task] = _bootstrap(y.size, n_boot, np.random.default_rng([seed, t_i]), affect_gap,
                                           AFFECT_METRICS)
    return out
