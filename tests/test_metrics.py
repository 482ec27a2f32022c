"""Tests for fer_tune.metrics: expected values are worked out by hand in each test."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest

from fer_tune import metrics as M
from fer_tune.metrics import (
    AFFECT_METRICS,
    EXPRESSION_METRICS,
    affect_metrics,
    ccc,
    compute_metrics,
    expression_metrics,
    flat_metrics,
    sagr,
)


def onehot_probs(pred, n_cols=8, hi=0.65):
    """Probabilities whose argmax is `pred` (rest of the mass spread evenly)."""
    pred = np.asarray(pred)
    p = np.full((pred.size, n_cols), (1.0 - hi) / (n_cols - 1))
    p[np.arange(pred.size), pred] = hi
    return p


def synthetic(n, seed=0, n_classes=7, missing=0.1):
    """A dataset with a reasonable (not perfect) predictor and some missing targets."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, 8))
    logits[np.arange(n), y] += 1.5
    logits = np.round(logits, 1)  # produce score ties
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    y_miss = y.copy()
    y_miss[rng.random(n) < missing] = -1
    val = rng.uniform(-1, 1, n)
    aro = rng.uniform(-1, 1, n)
    targets = {"expression": y_miss, "valence": val.copy(), "arousal": aro.copy()}
    targets["valence"][rng.random(n) < missing] = np.nan
    targets["arousal"][rng.random(n) < missing] = np.nan
    preds = {
        "expression": probs,
        "valence": 0.6 * val + rng.normal(0, 0.3, n),
        "arousal": 0.4 * aro + rng.normal(0, 0.3, n),
    }
    return targets, preds


def assert_plain(obj):
    """Only plain Python containers / scalars (no numpy types)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str
            assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_plain(v)
    else:
        assert type(obj) in (float, int, str), (obj, type(obj))


# ------------------------------------------------------------------ expression


def test_accuracy_f1_kappa_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # confusion (rows = true):  [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1_k = 2 tp / (2 tp + fp + fn)
    f1_0 = 2 * 1 / (2 * 1 + 1 + 1)  # tp 1, fp 1 (sample 5), fn 1 (sample 1)
    f1_1 = 2 * 2 / (2 * 2 + 1 + 0)  # tp 2, fp 1, fn 0
    f1_2 = 2 * 1 / (2 * 1 + 0 + 1)  # tp 1, fp 0, fn 1
    po = 4 / 6
    pe = (2 * 2 + 2 * 3 + 2 * 1) / 6**2  # row sums [2,2,2] x column sums [2,3,1]
    m = expression_metrics(y, onehot_probs(pred))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1_macro"] == pytest.approx((f1_0 + f1_1 + f1_2) / 3)
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))
    assert m["kappa"] == pytest.approx(0.5)
    assert set(m) == set(EXPRESSION_METRICS)


def _auc_case():
    """5 samples, classes {0, 1}; class-1 score after renormalising columns 0 and 1."""
    s1 = np.array([0.1, 0.4, 0.35, 0.8, 0.35])
    y = np.array([0, 0, 1, 1, 0])
    probs = np.zeros((5, 8))
    probs[:, 0] = 0.75 * (1 - s1)
    probs[:, 1] = 0.75 * s1
    probs[:, 7] = 0.25  # mass on a class the dataset does not have
    return y, probs


def test_auc_roc_and_pr_by_hand():
    y, probs = _auc_case()
    # class 1: positives score 0.35 and 0.8, negatives 0.1, 0.4, 0.35.
    # pairs won: 0.35 -> beats 0.1, loses to 0.4, ties 0.35 (1/2) = 1.5; 0.8 -> beats 3 = 3
    auc_1 = (1.5 + 3) / (2 * 3)
    # class 0 has score 1 - s1 and the complementary positives: the same pairs, same AUC
    auc_0 = auc_1
    # AP class 1, thresholds in decreasing score: 0.8 (tp1 fp0), 0.4 (tp1 fp1), 0.35 (tp2 fp2)
    ap_1 = 0.5 * 1 / 1 + 0.5 * 2 / 4
    # AP class 0 (scores 0.9+, 0.6-, 0.65 tie +/-, 0.2-):
    # 0.9 (tp1 fp0), 0.65 (tp2 fp1), 0.6 (tp3 fp1), 0.2 (tp3 fp2)
    ap_0 = (1 / 3) * 1 + (1 / 3) * (2 / 3) + (1 / 3) * (3 / 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = expression_metrics(y, probs)
    assert m["auc_roc"] == pytest.approx((auc_0 + auc_1) / 2)
    assert m["auc_roc"] == pytest.approx(0.75)
    assert m["auc_pr"] == pytest.approx((ap_0 + ap_1) / 2)
    assert m["auc_pr"] == pytest.approx(7 / 9)


def test_auc_uses_renormalised_label_columns():
    # sample A (class 1): raw p1 = 0.1 but p1 / (p0 + p1) = 0.5
    # sample B (class 0): raw p1 = 0.4 but p1 / (p0 + p1) = 0.4 / 0.9 = 0.444
    probs = np.zeros((2, 8))
    probs[0, [0, 1, 7]] = [0.1, 0.1, 0.8]
    probs[1, [0, 1, 7]] = [0.5, 0.4, 0.1]
    y = np.array([1, 0])
    m = expression_metrics(y, probs, labels=[0, 1])
    # renormalised, the single positive/negative pair is ranked correctly for both classes
    assert m["auc_roc"] == 1.0
    assert m["auc_pr"] == 1.0
    # (raw column 1 would rank B above A: AUC 0)


def test_auc_single_class_is_nan_without_warnings():
    y = np.array([3, 3, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = expression_metrics(y, onehot_probs([3, 1, 3]))
        res = compute_metrics({"expression": y}, {"expression": onehot_probs([3, 1, 3])}, ci=True)
    assert math.isnan(m["auc_roc"]) and math.isnan(m["auc_pr"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(res["ci95"]["expression"]["auc_roc"][0])
    json.dumps(res)


def test_labels_restrict_macro_f1():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    f1_0 = 2 * 1 / (2 * 1 + 0 + 1)  # tp 1, fp 0, fn 1
    f1_1 = 2 * 2 / (2 * 2 + 1 + 0)  # tp 2, fp 1, fn 0
    expected = (f1_0 + f1_1) / 2
    probs = onehot_probs(pred)
    assert expression_metrics(y, probs)["f1_macro"] == pytest.approx(expected)
    assert expression_metrics(y, probs, labels=[0, 1])["f1_macro"] == pytest.approx(expected)
    # class 2: never present and never predicted -> does not drag the average down
    assert expression_metrics(y, probs, labels=[0, 1, 2])["f1_macro"] == pytest.approx(expected)
    res = compute_metrics({"expression": y}, {"expression": probs}, labels=[0, 1, 2])
    assert res["expression"]["f1_macro"] == pytest.approx(expected)
    assert res["counts"]["per_class"] == {"0": 2, "1": 2, "2": 0}


def test_prediction_outside_labels_counts_as_error():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 7, 1, 1])  # class 7 is not in the dataset
    m = expression_metrics(y, onehot_probs(pred), labels=[0, 1])
    assert m["accuracy"] == pytest.approx(3 / 4)
    f1_0 = 2 * 1 / (2 * 1 + 0 + 1)  # the 7 is a false negative of class 0
    f1_1 = 2 * 2 / (2 * 2 + 0 + 0)
    assert m["f1_macro"] == pytest.approx((f1_0 + f1_1) / 2)
    # rows (true 0, 1) = [2, 2], columns (pred 0, 1, 7) = [1, 2, 1]
    po, pe = 3 / 4, (2 * 1 + 2 * 2 + 0 * 1) / 16
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_targets_outside_labels_rejected():
    with pytest.raises(ValueError, match="not in labels"):
        expression_metrics(np.array([0, 1, 2]), onehot_probs([0, 1, 2]), labels=[0, 1])


# ---------------------------------------------------------------------- affect


def test_affect_by_hand():
    y = np.array([0.5, -0.5, 0.0, 1.0])
    p = np.array([0.4, -0.1, -0.2, 0.6])
    # errors 0.1, -0.4, 0.2, 0.4 -> squares 0.01, 0.16, 0.04, 0.16
    rmse = math.sqrt((0.01 + 0.16 + 0.04 + 0.16) / 4)
    # signs (>= 0 is positive): agree, agree, disagree (0 vs -0.2), agree
    sagr_ = 3 / 4
    my, mp = 0.25, 0.175
    var_y = (0.25**2 + 0.75**2 + 0.25**2 + 0.75**2) / 4  # 0.3125
    var_p = (0.225**2 + 0.275**2 + 0.375**2 + 0.425**2) / 4  # 0.111875
    cov = (0.25 * 0.225 + 0.75 * 0.275 + 0.25 * 0.375 + 0.75 * 0.425) / 4  # 0.16875
    ccc_ = 2 * cov / (var_y + var_p + (my - mp) ** 2)  # 0.3375 / 0.43
    pcc = cov / math.sqrt(var_y * var_p)
    m = affect_metrics(y, p)
    assert set(m) == set(AFFECT_METRICS)
    assert m["rmse"] == pytest.approx(rmse)
    assert m["sagr"] == pytest.approx(sagr_)
    assert m["ccc"] == pytest.approx(ccc_)
    assert m["ccc"] == pytest.approx(0.3375 / 0.43)
    assert m["pcc"] == pytest.approx(pcc)
    assert ccc(y, p) == pytest.approx(ccc_)
    assert sagr(y, p) == pytest.approx(sagr_)


def test_affect_constant_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # constant prediction: cov 0, denominator var_y + (mean diff)^2 > 0 -> CCC 0
        m = affect_metrics(np.array([0.1, 0.2, 0.3]), np.zeros(3))
        assert math.isnan(m["pcc"])
        assert m["ccc"] == 0.0
        # both constant and equal: denominator 0 -> NaN
        assert math.isnan(ccc(np.full(2, 0.5), np.full(2, 0.5)))
        # single sample
        m1 = affect_metrics(np.array([0.2]), np.array([-0.3]))
        assert m1["rmse"] == pytest.approx(0.5) and m1["sagr"] == 0.0
        assert math.isnan(m1["pcc"]) and m1["ccc"] == 0.0
        res = compute_metrics(
            {"valence": np.array([0.2])}, {"valence": np.array([-0.3])}, ci=True, n_boot=50
        )
    assert res["ci95"]["valence"]["rmse"] == [pytest.approx(0.5)] * 2
    assert all(math.isnan(v) for v in res["ci95"]["valence"]["pcc"])
    json.dumps(res)


def test_sagr_zero_counts_as_positive():
    assert sagr([0.0, 0.0, -0.1], [0.3, -0.2, -0.5]) == pytest.approx(2 / 3)


# ------------------------------------------------------------ compute_metrics


def test_masking_equals_filtered_arrays():
    targets, preds = synthetic(300, seed=1, missing=0.25)
    res = compute_metrics(targets, preds)
    y = targets["expression"]
    ok = y >= 0
    assert res["expression"] == expression_metrics(y[ok], preds["expression"][ok])
    assert expression_metrics(y, preds["expression"]) == res["expression"]
    for task in ("valence", "arousal"):
        ok = ~np.isnan(targets[task])
        assert res[task] == affect_metrics(targets[task][ok], preds[task][ok])
        assert res["counts"][task] == int(ok.sum())
    assert res["counts"]["expression"] == int((y >= 0).sum())
    assert sum(res["counts"]["per_class"].values()) == res["counts"]["expression"]
    assert res["missing_tasks"] == []


def test_missing_tasks():
    targets, preds = synthetic(50, seed=2)
    targets["arousal"] = np.full(50, np.nan)
    del targets["valence"]
    res = compute_metrics(targets, preds, ci=True, n_boot=20)
    assert res["missing_tasks"] == ["valence", "arousal"]
    assert "valence" not in res and "arousal" not in res
    assert "expression" in res
    assert set(res["ci95"]) == {"expression"}
    assert res["counts"]["valence"] == 0 and res["counts"]["arousal"] == 0
    flat = flat_metrics(res)
    assert not any(k.startswith(("valence", "arousal")) for k in flat)

    only_affect = compute_metrics(
        {"expression": np.full(3, -1), "valence": np.array([0.1, np.nan, -0.2])},
        {"expression": onehot_probs([0, 1, 2]), "valence": np.array([0.0, 0.5, -0.1])},
    )
    assert only_affect["missing_tasks"] == ["expression", "arousal"]
    assert only_affect["counts"]["expression"] == 0
    assert only_affect["counts"]["valence"] == 2

    # no predictions needed for a task without targets; required otherwise
    res = compute_metrics({"valence": np.full(2, np.nan)}, {})
    assert res["missing_tasks"] == ["expression", "valence", "arousal"]
    with pytest.raises(ValueError, match="valence"):
        compute_metrics({"valence": np.array([0.1, np.nan])}, {})


def test_schema_json_and_flat_metrics():
    targets, preds = synthetic(200, seed=3)
    res = compute_metrics(targets, preds, ci=True, n_boot=100)
    assert set(res) == {"expression", "valence", "arousal", "missing_tasks", "counts", "ci95"}
    assert set(res["expression"]) == set(EXPRESSION_METRICS)
    assert set(res["valence"]) == set(AFFECT_METRICS) == set(res["arousal"])
    for task in ("expression", "valence", "arousal"):
        assert set(res["ci95"][task]) == set(res[task])
        assert all(len(v) == 2 for v in res["ci95"][task].values())
    assert_plain(res)
    assert json.loads(json.dumps(res))["counts"] == res["counts"]
    assert "ci95" not in compute_metrics(targets, preds)

    flat = flat_metrics(res, prefix="val_")
    expected = {
        "val_expression_accuracy": res["expression"]["accuracy"],
        "val_expression_f1": res["expression"]["f1_macro"],
        "val_expression_kappa": res["expression"]["kappa"],
        "val_expression_auc_roc": res["expression"]["auc_roc"],
        "val_expression_auc_pr": res["expression"]["auc_pr"],
    }
    for task in ("valence", "arousal"):
        for m in AFFECT_METRICS:
            expected[f"val_{task}_{m}"] = res[task][m]
    assert flat == expected
    assert set(flat_metrics(res)) == {k[len("val_"):] for k in expected}


# ------------------------------------------------------------------ bootstrap


def test_ci_brackets_point_and_shrinks():
    small_t, small_p = synthetic(150, seed=4)
    big_t, big_p = synthetic(1500, seed=4)
    small = compute_metrics(small_t, small_p, ci=True, n_boot=250, seed=0)
    big = compute_metrics(big_t, big_p, ci=True, n_boot=250, seed=0)
    for res in (small, big):
        for task in ("expression", "valence", "arousal"):
            for m, v in res[task].items():
                lo, hi = res["ci95"][task][m]
                assert lo <= v <= hi, (task, m, lo, v, hi)
    for task in ("expression", "valence", "arousal"):
        for m in small[task]:
            w_small = np.diff(small["ci95"][task][m])[0]
            w_big = np.diff(big["ci95"][task][m])[0]
            assert 0 < w_big < w_small, (task, m, w_big, w_small)


def test_bootstrap_deterministic_with_seed():
    targets, preds = synthetic(300, seed=5)
    a = compute_metrics(targets, preds, ci=True, n_boot=100, seed=7)
    b = compute_metrics(targets, preds, ci=True, n_boot=100, seed=7)
    c = compute_metrics(targets, preds, ci=True, n_boot=100, seed=8)
    assert json.dumps(a) == json.dumps(b)
    assert a["ci95"] != c["ci95"]
    assert {k: a[k] for k in ("expression", "valence")} == {
        k: c[k] for k in ("expression", "valence")
    }


def test_vectorised_resamples_match_point_metrics():
    """The vectorised bootstrap computes exactly the point metrics of each resample."""
    targets, preds = synthetic(400, seed=6, missing=0.0)
    y, probs = targets["expression"], preds["expression"]
    lab = np.arange(7)
    boot = M._ExpressionBoot(y, probs, lab)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, y.size, size=(4, y.size))
    idx[3] = rng.integers(0, 25, size=y.size)  # tiny effective sample: classes drop out
    vec = boot(M._resample_weights(idx, y.size))
    ones = boot(np.ones((y.size, 1), dtype=np.float32))
    point = expression_metrics(y, probs, labels=lab)
    for m in EXPRESSION_METRICS:
        assert ones[m][0] == pytest.approx(point[m], rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(idx.shape[0]):
            ref = expression_metrics(y[idx[i]], probs[idx[i]], labels=lab)
            for m in EXPRESSION_METRICS:
                assert vec[m][i] == pytest.approx(ref[m], rel=1e-9, nan_ok=True), (i, m)

    v, pv = targets["valence"], preds["valence"]
    aff = M._affect_batch(v[idx], pv[idx])
    for i in range(idx.shape[0]):
        ref = affect_metrics(v[idx[i]], pv[idx[i]])
        for m in AFFECT_METRICS:
            assert aff[m][i] == pytest.approx(ref[m], rel=1e-9), (i, m)


def test_ci_equals_sklearn_resampling_on_same_draws(monkeypatch):
    """End to end: compute_metrics' expression CIs are those of a bootstrap that calls the
    scikit-learn point metrics (`expression_metrics`) on each resampled array, same draws."""
    targets, preds = synthetic(150, seed=10, missing=0.1)
    labels = list(range(8))  # class 7 never a target: left out of the AUCs, F1 0 if predicted
    vec = compute_metrics(targets, preds, labels=labels, ci=True, n_boot=60, seed=3)

    class SklearnBoot:
        def __init__(self, y, probs, lab):
            self.y, self.probs, self.lab = y, probs, lab

        def __call__(self, idx):
            rows = [expression_metrics(self.y[i], self.probs[i], labels=self.lab) for i in idx]
            return {m: np.array([r[m] for r in rows]) for m in EXPRESSION_METRICS}

    monkeypatch.setattr(M, "_ExpressionBoot", SklearnBoot)
    monkeypatch.setattr(M, "_resample_weights", lambda idx, n: idx)
    ref = compute_metrics(targets, preds, labels=labels, ci=True, n_boot=60, seed=3)
    assert set(vec["ci95"]["expression"]) == set(EXPRESSION_METRICS)
    for m in EXPRESSION_METRICS:
        assert vec["ci95"]["expression"][m] == pytest.approx(
            ref["ci95"]["expression"][m], rel=1e-9
        ), m
    for key in ("expression", "counts"):
        assert vec[key] == ref[key]


def test_timing_4000_samples_with_ci():
    targets, preds = synthetic(4000, seed=9)
    t0 = time.perf_counter()
    res = compute_metrics(targets, preds, ci=True)  # default 1000 resamples
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    assert len(flat_metrics(res)) == 13
