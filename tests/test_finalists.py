"""The final phase's plan and decision (`fer_tune.search.finalists`), and the paired comparison
of two models on the same test faces (`fer_tune.metrics.paired_comparison`)."""

import math

import numpy as np
import pandas as pd
import pytest

from fer_tune.metrics import compute_metrics, paired_comparison
from fer_tune.search import finalists
from fer_tune.spec import validate_spec


def trials_frame():
    return pd.DataFrame([
        {"trial_id": "a", "recipe": "", "stop_reason": "completed", "best_objective": 0.80, "checkpoint": "/ck/a", "epochs": 10},
        {"trial_id": "b", "recipe": "", "stop_reason": "stopped by ASHA", "best_objective": 0.85, "checkpoint": "/ck/b", "epochs": 2},
        {"trial_id": "c", "recipe": "", "stop_reason": "errored", "best_objective": math.nan, "checkpoint": "", "epochs": 1},
        {"trial_id": "d", "recipe": "your spec", "stop_reason": "stopped by ASHA", "best_objective": 0.50,
         "checkpoint": "/ck/d", "epochs": 2},
    ])


def spec(**search):
    return validate_spec({"train": {"seed": 7}, "search": {"num_samples": 4, **search}})


CONFIGS = {t: {"model.dropout": 0.1 * i} for i, t in enumerate("abcd")}


def test_plan_retrains_the_finalists_with_more_seeds_and_your_recipe_to_full_budget():
    runs = finalists.plan(spec(finalists=2, finalist_seeds=2), trials_frame(), CONFIGS)
    assert [(r.trial_id, r.seed, r.role) for r in runs] == [
        ("b", 7, "finalist"), ("b", 8, "finalist"), ("b", 9, "finalist"),  # stopped early: its own seed too
        ("a", 8, "finalist"), ("a", 9, "finalist"),                          # completed: its run counts
        ("d", 7, "your spec"), ("d", 8, "your spec"), ("d", 9, "your spec")]  # your recipe always competes
    assert [(r.trial_id, r.seed) for r in finalists.plan(spec(finalists=0), trials_frame(), CONFIGS)] == [
        ("d", 7)]  # no final phase: only your recipe, trained to full budget for the comparison
    assert runs[0].config() == {"model.dropout": 0.1, "train.seed": 7}


def test_select_takes_the_best_mean_and_the_best_run_of_the_winner():
    trials = trials_frame()
    runs = finalists.plan(spec(finalists=2, finalist_seeds=1), trials, CONFIGS)
    assert [(r.trial_id, r.seed) for r in runs] == [("b", 7), ("b", 8), ("a", 8), ("d", 7), ("d", 8)]
    done = [{"run_id": "f1", "objective": 0.70, "checkpoint": "/ck/f1"},   # b at full budget: worse than it looked
            {"run_id": "f2", "objective": 0.72, "checkpoint": "/ck/f2"},
            {"run_id": "f3", "objective": 0.82, "checkpoint": "/ck/f3"},   # a again, another seed
            {"run_id": "f4", "objective": 0.60, "checkpoint": "/ck/f4"},   # your recipe at full budget
            {"run_id": "f5", "objective": 0.64, "checkpoint": "/ck/f5"}]
    chosen = finalists.select(spec(finalists=2, finalist_seeds=1), trials, runs, done)
    by_id = {f["trial_id"]: f for f in chosen.finalists}
    assert by_id["a"]["mean"] == pytest.approx(0.81) and by_id["b"]["mean"] == pytest.approx(0.71)
    assert by_id["a"]["winner"] and not by_id["b"]["winner"]
    low, high = by_id["a"]["ci95"]
    assert low < 0.81 < high
    assert (chosen.winner.trial_id, chosen.winner.run_id, chosen.winner.seed) == ("a", "f3", 8)
    assert (chosen.your_recipe.trial_id, chosen.your_recipe.run_id) == ("d", "f4")  # its own seed
    assert by_id["d"]["mean"] == pytest.approx(0.62) and not by_id["d"]["winner"]
    # where your recipe does best at full budget, it wins: the search found nothing better
    done[3]["objective"] = done[4]["objective"] = 0.9
    chosen = finalists.select(spec(finalists=2, finalist_seeds=1), trials, runs, done)
    assert chosen.winner.trial_id == "d" and chosen.your_recipe.trial_id == "d"


def test_select_without_a_final_phase_and_without_your_recipe():
    trials = trials_frame()
    trials.loc[trials["trial_id"] == "d", "recipe"] = ""
    chosen = finalists.select(spec(finalists=0), trials, [], [])
    assert chosen.winner.trial_id == "b" and chosen.winner.run_id == "b"  # the best trial as it ran
    assert chosen.your_recipe is None and "no trial ran your spec" in chosen.your_recipe_note
    failed = finalists.plan(spec(finalists=1, finalist_seeds=1), trials, CONFIGS)
    chosen = finalists.select(spec(finalists=1, finalist_seeds=1), trials, failed,
                              [{"run_id": "", "objective": math.nan, "checkpoint": ""}] * len(failed))
    assert chosen.winner.trial_id == "b"  # every re-run failed: the best trial as it ran


def faces(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)

    def model(signal):
        logits = rng.normal(size=(n, 8))
        logits[np.arange(n), y] += signal
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return {"expression": probs, "valence": np.tanh(rng.normal(size=n)), "arousal": np.zeros(n)}

    targets = {"expression": y, "valence": np.tanh(rng.normal(size=n)), "arousal": np.full(n, np.nan)}
    return targets, model(0.5), model(1.5)


def test_paired_comparison_is_b_minus_a_on_the_same_resamples():
    targets, weak, strong = faces()
    result = paired_comparison(targets, weak, strong, labels=list(range(7)), n_boot=400, seed=3)
    a, b = (compute_metrics(targets, p, labels=list(range(7))) for p in (weak, strong))
    assert result["difference"]["expression"]["accuracy"] == pytest.approx(
        b["expression"]["accuracy"] - a["expression"]["accuracy"])
    assert "arousal" not in result["difference"]  # no arousal targets: not compared
    # the interval is that of accuracy differences over resamples drawn once for both models
    y = targets["expression"]
    idx = np.random.default_rng([3, 0]).integers(0, len(y), size=(400, len(y)))
    right_a, right_b = weak["expression"].argmax(1) == y, strong["expression"].argmax(1) == y
    gaps = right_b[idx].mean(1) - right_a[idx].mean(1)
    assert result["ci95"]["expression"]["accuracy"] == pytest.approx(list(np.percentile(gaps, [2.5, 97.5])))
    low, high = result["ci95"]["expression"]["accuracy"]
    assert 0 < low < high  # the strong model is better, and the paired interval says so
    n = result["mcnemar"]
    assert n["only_b"] == int((right_b & ~right_a).sum()) and n["only_a"] == int((right_a & ~right_b).sum())
    assert n["p_value"] < 1e-6


def test_paired_comparison_of_a_model_with_itself_claims_nothing():
    targets, weak, _ = faces(n=200)
    result = paired_comparison(targets, weak, weak, labels=list(range(7)), n_boot=100)
    assert result["difference"]["expression"]["accuracy"] == 0
    assert result["ci95"]["expression"]["accuracy"] == [0.0, 0.0]
    assert result["mcnemar"] == {"only_a": 0, "only_b": 0, "p_value": 1.0}
