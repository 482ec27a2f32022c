"""After the search: the best trials re-trained at full budget with more seeds, the winner chosen
by their mean, and your recipe trained to full budget for the comparison on the test split.

One validation score of one seed cannot tell the top trials apart (on 400 validation faces an
accuracy has a standard error of about 2.5 points, and a seed moves it as much), and a trial that
ASHA stopped early was judged on a few epochs. So `search.finalists` (K) of the best trials each
run `search.finalist_seeds` more times, with other seeds, to their full `train.epochs` (an
ASHA-stopped finalist also once with its own seed), and the winner is the finalist with the best
mean validation objective over its full-budget runs. Your recipe (the trial that ran the spec's
own values) is always a finalist, run like the others: the search wins only by beating it at full
budget on validation, and the held-out comparison is between two fully trained models.

This module only plans and decides; `fer_tune.search.run` runs the trainings through Tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd

from fer_tune.search.results import healthy
from fer_tune.search.trial import METRIC
from fer_tune.spec import Spec

FULL_BUDGET = ("completed", "early stop (patience)")
"""Trial outcomes that trained the recipe as written (early stopping is part of the recipe)."""

YOUR_SPEC = "your spec"


@dataclass
class FinalRun:
    """One full-budget training of a trial's recipe with one seed."""

    trial_id: str                 # the search trial whose recipe it trains
    params: dict[str, Any]        # that trial's sampled parameters (Optuna names)
    seed: int
    role: str = "finalist"        # or YOUR_SPEC: trained only for the comparison

    def config(self) -> dict[str, Any]:
        """The trial config that trains it: the recipe, with this seed."""
        return {**self.params, "train.seed": self.seed}


@dataclass
class Outcome:
    """A full-budget result: the original trial, or a final run."""

    trial_id: str       # the search trial whose recipe it is
    run_id: str         # the trial (search or final phase) that trained it
    seed: int
    objective: float
    checkpoint: str


@dataclass
class Selection:
    """What the final phase decided."""

    winner: Outcome                            # the run whose weights are tested and exported
    finalists: list[dict] = field(default_factory=list)  # per finalist: runs, mean, interval
    your_recipe: Optional[Outcome] = None      # your spec at full budget, for the comparison
    your_recipe_note: str = ""                 # why there is none, when there is none


def plan(spec: Spec, trials: pd.DataFrame, configs: dict[str, dict]) -> list[FinalRun]:
    """The full-budget trainings still needed: the K finalists and your recipe, each with more seeds
    (and once with its own when ASHA stopped it). Without finalists (K = 0), only your recipe's own
    seed when ASHA stopped it: the comparison on the test still needs it fully trained."""
    search = spec.search
    seed = spec.train.seed
    if search.finalists == 0:
        mine = your_trial(trials)
        if mine is None or mine["stop_reason"] in (*FULL_BUDGET, "errored") or not mine["checkpoint"]:
            return []
        return [FinalRun(str(mine["trial_id"]), configs[str(mine["trial_id"])], seed, YOUR_SPEC)]
    runs = []
    for _, row in finalist_rows(spec, trials).iterrows():
        trial_id = str(row["trial_id"])
        own_seed = [] if row["stop_reason"] in FULL_BUDGET else [seed]
        extra = [seed + 1 + i for i in range(search.finalist_seeds)]
        role = YOUR_SPEC if row.get("recipe") == YOUR_SPEC else "finalist"
        runs += [FinalRun(trial_id, configs[trial_id], s, role) for s in own_seed + extra]
    return runs


def finalist_rows(spec: Spec, trials: pd.DataFrame) -> pd.DataFrame:
    """The K best healthy trials, and your recipe's trial when it is healthy and not among them."""
    ok = healthy(trials)
    top = ok.sort_values(METRIC, ascending=False).head(spec.search.finalists)
    mine = ok[ok["recipe"].astype(object).fillna("").astype(str) == YOUR_SPEC] if "recipe" in ok else ok.iloc[:0]
    return pd.concat([top, mine[~mine["trial_id"].isin(top["trial_id"])]])


def your_trial(trials: pd.DataFrame) -> Optional[pd.Series]:
    """The search trial that ran the spec's own values, if one did."""
    if "recipe" not in trials:
        return None
    mine = trials[trials["recipe"].astype(object).fillna("").astype(str) == YOUR_SPEC]
    return mine.iloc[0] if len(mine) else None


def select(spec: Spec, trials: pd.DataFrame, runs: list[FinalRun], finished: list[dict]) -> Selection:
    """The winner by mean validation objective over full-budget runs, and your recipe's run.

    `finished[i]` is what final run `runs[i]` gave: {"run_id", "objective", "checkpoint"} (the
    objective NaN and the checkpoint empty when it failed).
    """
    seed = spec.train.seed
    outcomes: dict[str, list[Outcome]] = {}
    ok = healthy(trials)
    finalist_ids = [str(t) for t in finalist_rows(spec, trials)["trial_id"]] if spec.search.finalists else \
        [str(ok.sort_values(METRIC, ascending=False).iloc[0]["trial_id"])]
    for _, row in trials.iterrows():
        if row["stop_reason"] in FULL_BUDGET and row["checkpoint"]:
            outcomes.setdefault(str(row["trial_id"]), []).append(
                Outcome(str(row["trial_id"]), str(row["trial_id"]), seed, float(row[METRIC]), str(row["checkpoint"])))
    for run, result in zip(runs, finished):
        if result.get("checkpoint") and math.isfinite(result.get("objective", math.nan)):
            outcomes.setdefault(run.trial_id, []).append(
                Outcome(run.trial_id, str(result["run_id"]), run.seed, float(result["objective"]),
                        str(result["checkpoint"])))
    summaries = []
    for trial_id in finalist_ids:
        got = outcomes.get(trial_id, [])
        if not got and spec.search.finalists == 0:  # no final phase: the trial as it ran
            row = ok[ok["trial_id"].astype(str) == trial_id].iloc[0]
            got = [Outcome(trial_id, trial_id, seed, float(row[METRIC]), str(row["checkpoint"]))]
        if got:
            summaries.append(summarise(trial_id, got))
    if not summaries:  # every finalist run failed: fall back to the best trial as it ran
        row = ok.sort_values(METRIC, ascending=False).iloc[0]
        summaries = [summarise(str(row["trial_id"]), [Outcome(str(row["trial_id"]), str(row["trial_id"]), seed,
                                                              float(row[METRIC]), str(row["checkpoint"]))])]
    best = max(summaries, key=lambda s: s["mean"])
    winner = max(best["outcomes"], key=lambda o: o.objective)
    for summary in summaries:
        summary["winner"] = summary is best
    selection = Selection(winner, summaries)
    mine = your_trial(trials)
    if mine is None:
        selection.your_recipe_note = "no trial ran your spec's own values (search.start_from_spec)"
    elif mine["stop_reason"] == "errored":
        selection.your_recipe_note = f"your recipe's trial `{mine['trial_id']}` errored: {mine.get('error') or ''}"
    else:
        own = [o for o in outcomes.get(str(mine["trial_id"]), []) if o.seed == seed]
        if own:
            selection.your_recipe = own[0]
        else:
            selection.your_recipe_note = f"your recipe's full-budget run of trial `{mine['trial_id']}` failed"
    return selection


def summarise(trial_id: str, outcomes: list[Outcome]) -> dict:
    """A finalist's full-budget runs: the mean objective and a 95 % t interval of that mean."""
    from scipy import stats

    values = [o.objective for o in outcomes]
    mean = sum(values) / len(values)
    if len(values) > 1:
        sem = stats.sem(values)
        low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
    else:
        low = high = math.nan
    return {"trial_id": trial_id, "outcomes": outcomes, "runs": len(values), "mean": mean,
            "ci95": [float(low), float(high)], "objectives": values, "seeds": [o.seed for o in outcomes]}
