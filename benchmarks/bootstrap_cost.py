"""Cost of the expression bootstrap: vectorised weights (today) vs resampling through scikit-learn.

    python benchmarks/bootstrap_cost.py                  # 3,589 faces, 1000 resamples, 3 repeats
    python benchmarks/bootstrap_cost.py --n 3589 --n-boot 1000 --repeats 3

Question (issue "metrics: replace the hand-written bootstrap of weighted AUCs"): is a bootstrap
that, for every resample, draws indices and calls the very same point-metric function
`expression_metrics` (scikit-learn's accuracy_score, f1_score, cohen_kappa_score,
roc_auc_score, average_precision_score) on the resampled arrays within 2x of the time of
today's vectorised `metrics._ExpressionBoot`?  Target: ratio (b) / (a) <= 2.

Data: a FER2013-like test split of `--n` faces (default 3,589), classes 0..6 present out of 8
probability columns (column 7 never a target), class counts in FER2013 PublicTest proportions,
probabilities = float32 softmax of noisy logits with a margin on the true class (accuracy about
2/3), plus valence / arousal targets and correlated predictions; all seeded.

Both arms time the whole `compute_metrics(targets, preds, labels=range(7), ci=True,
n_boot=N)` (point metrics, expression bootstrap, valence and arousal bootstraps):

- (a) as `fer_tune.metrics` is today: resamples -> multiplicity weights -> `_ExpressionBoot`;
- (b) the same call with `_ExpressionBoot` swapped (for the duration of the timing) for a class
  that evaluates `expression_metrics(y[idx_i], probs[idx_i], labels)` for each resample row
  `idx_i`.  Everything else -- seeds, chunking, the index draws, the valence / arousal
  bootstraps, the percentile step -- is the same code, so the time difference is the expression
  bootstrap alone, and both arms see the SAME resamples: their interval bounds must agree to
  floating-point precision (printed, beside the Monte-Carlo scale: how much (a)'s bounds move
  between seeds 0 and 1).

The arms run interleaved, `--repeats` times, after a warm-up; medians are compared.  Then the
exactness check: for the first `--check` resamples of the actual draw (same indices), the
vectorised weights path must equal the scikit-learn point metrics of the resampled arrays to
rel 1e-9 (expression and valence / arousal); the script exits 1 if not.

Measured (2 cores AMD EPYC, numpy 2.4.6, scikit-learn 1.9.1, defaults): (a) 0.63 s, (b) 34.9 s,
ratio 55x -- far over 2x (one roc_auc_score call on 3,589 faces alone is ~2.4 ms, x 7 classes
x 1000 resamples), so `_ExpressionBoot` stays; bounds (a) vs (b) on the same draws differ by
3e-16, per-resample exactness PASS (largest relative difference 6e-16).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

from common import cpu_model, load_average, usable_cores, version  # noqa: E402  (benchmarks/)
from fer_tune import metrics as M
from fer_tune.metrics import (
    AFFECT_METRICS,
    EXPRESSION_METRICS,
    affect_metrics,
    compute_metrics,
    expression_metrics,
)

FER2013_PUBLIC_TEST = (467, 56, 496, 895, 653, 415, 607)
"""Class counts of FER2013's 3,589-face PublicTest split (angry .. neutral)."""

LABELS = np.arange(7)
N_COLUMNS = 8
REL_TOL = 1e-9


def make_split(n: int, seed: int = 0) -> tuple[dict, dict]:
    """A FER2013-like expression split of `n` faces plus valence / arousal (see module doc)."""
    rng = np.random.default_rng(seed)
    share = np.asarray(FER2013_PUBLIC_TEST, dtype=np.int64)
    counts = share * n // share.sum()  # exact for n = 3589
    counts[np.argmax(share)] += n - counts.sum()
    y = rng.permutation(np.repeat(LABELS, counts))
    logits = rng.normal(0.0, 1.0, size=(n, N_COLUMNS))
    logits[np.arange(n), y] += rng.normal(2.0, 1.0, size=n)  # noisy, correlated with the truth
    logits = logits.astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    val = np.clip(rng.normal(0.1, 0.45, n), -1, 1)
    aro = np.clip(rng.normal(0.3, 0.35, n), -1, 1)
    targets = {"expression": y, "valence": val, "arousal": aro}
    preds = {
        "expression": probs,
        "valence": np.clip(0.7 * val + rng.normal(0, 0.25, n), -1, 1),
        "arousal": np.clip(0.5 * aro + rng.normal(0, 0.25, n), -1, 1),
    }
    return targets, preds


class SklearnResampleBoot:
    """Drop-in for `metrics._ExpressionBoot` that takes resample indices (B, n), not weights:
    the scikit-learn point metrics (`expression_metrics`) of each resampled array."""

    def __init__(self, y: np.ndarray, probs: np.ndarray, lab: np.ndarray):
        self.y, self.probs, self.lab = y, probs, lab

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        rows = [expression_metrics(self.y[i], self.probs[i], labels=self.lab) for i in idx]
        return {m: np.array([r[m] for r in rows]) for m in EXPRESSION_METRICS}


@contextlib.contextmanager
def sklearn_resampling():
    """Within: `compute_metrics` bootstraps expression through `SklearnResampleBoot`."""
    saved = M._ExpressionBoot, M._resample_weights
    M._ExpressionBoot, M._resample_weights = SklearnResampleBoot, lambda idx, n: idx
    try:
        yield
    finally:
        M._ExpressionBoot, M._resample_weights = saved


def run_a(targets, preds, n_boot, seed=0):
    return compute_metrics(targets, preds, labels=LABELS, ci=True, n_boot=n_boot, seed=seed)


def run_b(targets, preds, n_boot, seed=0):
    with sklearn_resampling():
        return compute_metrics(targets, preds, labels=LABELS, ci=True, n_boot=n_boot, seed=seed)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def max_bound_diff(r1: dict, r2: dict, task: str) -> float:
    a = np.array([r1["ci95"][task][m] for m in r1["ci95"][task]], dtype=np.float64)
    b = np.array([r2["ci95"][task][m] for m in r1["ci95"][task]], dtype=np.float64)
    return float(np.nanmax(np.abs(a - b)))


def first_resamples(n: int, n_boot: int, seed: int, stream: int, k: int) -> np.ndarray:
    """The first `k` resamples `compute_metrics` draws for task `stream` (0 = expression)."""
    rng = np.random.default_rng([seed, stream])
    chunk = max(1, min(n_boot, M._BOOT_CELLS // max(n, 1)))
    return rng.integers(0, n, size=(chunk, n))[:k]


def rel_err(vec: float, ref: float) -> float:
    if np.isnan(vec) or np.isnan(ref):
        return 0.0 if (np.isnan(vec) and np.isnan(ref)) else float("inf")
    return abs(vec - ref) / max(abs(ref), 1e-300)


def exactness(targets, preds, n_boot: int, k: int) -> dict[str, float]:
    """Largest relative difference, per metric, vectorised path vs scikit-learn, same resamples."""
    y, probs = targets["expression"], preds["expression"]
    n = y.size
    worst: dict[str, float] = {}
    idx = first_resamples(n, n_boot, 0, 0, k)
    vec = M._ExpressionBoot(y, probs.astype(np.float64), LABELS)(M._resample_weights(idx, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(k):
            ref = expression_metrics(y[idx[i]], probs[idx[i]], labels=LABELS)
            for m in EXPRESSION_METRICS:
                worst[f"expression.{m}"] = max(worst.get(f"expression.{m}", 0.0),
                                               rel_err(float(vec[m][i]), ref[m]))
    for stream, task in enumerate(("valence", "arousal"), start=1):
        idx = first_resamples(n, n_boot, 0, stream, k)
        v, pv = targets[task], preds[task]
        aff = M._affect_batch(v[idx], pv[idx])
        for i in range(k):
            ref = affect_metrics(v[idx[i]], pv[idx[i]])
            for m in AFFECT_METRICS:
                worst[f"{task}.{m}"] = max(worst.get(f"{task}.{m}", 0.0),
                                           rel_err(float(aff[m][i]), ref[m]))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3589, help="faces in the test split (default 3589)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each arm (default 3)")
    ap.add_argument("--check", type=int, default=50,
                    help="resamples compared one by one in the exactness check (default 50)")
    args = ap.parse_args(argv)

    print("## Expression bootstrap: vectorised weights (a) vs scikit-learn resampling (b)\n")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- machine: {usable_cores()} usable cores ({os.cpu_count()} online), {cpu_model()}")
    print(f"- python {platform.python_version()}; numpy {version('numpy')}, "
          f"scikit-learn {version('scikit-learn')}")
    print(f"- load average at start: {load_average()}\n")

    targets, preds = make_split(args.n)
    point = expression_metrics(targets["expression"], preds["expression"], labels=LABELS)
    print(f"- split: {args.n} faces, classes {LABELS.tolist()} of {N_COLUMNS} columns, "
          f"counts {np.bincount(targets['expression']).tolist()}; accuracy "
          f"{point['accuracy']:.3f}, macro AUC-ROC {point['auc_roc']:.3f}")
    print(f"- compute_metrics(..., ci=True, n_boot={args.n_boot}), {args.repeats} repeats "
          f"interleaved, medians\n")

    run_a(targets, preds, 20)  # warm-up (imports, caches)
    run_b(targets, preds, 5)
    t_a, t_b = [], []
    for _ in range(args.repeats):
        dt, res_a = timed(run_a, targets, preds, args.n_boot)
        t_a.append(dt)
        dt, res_b = timed(run_b, targets, preds, args.n_boot)
        t_b.append(dt)
        print(f"  run: (a) {t_a[-1]:7.2f} s   (b) {t_b[-1]:7.2f} s", flush=True)
    res_a_seed1 = run_a(targets, preds, args.n_boot, 1)

    med_a, med_b = statistics.median(t_a), statistics.median(t_b)
    ratio = med_b / med_a
    print()
    print("| arm | median wall (s) | all runs (s) |")
    print("|---|---:|---|")
    print(f"| (a) vectorised `_ExpressionBoot` (today) | {med_a:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in t_a)} |")
    print(f"| (b) `expression_metrics` (scikit-learn) per resample | {med_b:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in t_b)} |")
    print()
    print(f"ratio (b) / (a) = {ratio:.1f}x  (target <= 2x: {'MET' if ratio <= 2 else 'NOT MET'})")
    per = (med_b - med_a) / args.n_boot * 1e3
    print(f"(b) costs {per:.1f} ms more per resample of {args.n} faces")
    print()
    same = max_bound_diff(res_a, res_b, "expression")
    mc = max_bound_diff(res_a, res_a_seed1, "expression")
    print(f"largest |CI bound difference| (a) vs (b), expression, same seed (same draws): "
          f"{same:.2e}")
    print(f"Monte-Carlo scale: largest |CI bound difference| of (a), seed 0 vs seed 1: {mc:.2e}")
    print()

    worst = exactness(targets, preds, args.n_boot, args.check)
    ok = all(v <= REL_TOL for v in worst.values())
    print(f"exactness, first {args.check} resamples of the actual draw, vectorised vs "
          f"scikit-learn point metrics of the resampled arrays (largest relative difference):")
    for name, v in worst.items():
        print(f"  {name:22s} {v:.1e}")
    print(f"exactness (rel <= {REL_TOL:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
