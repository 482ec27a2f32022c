"""A finished search read back from Ray Tune: one row per trial, every epoch, every checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pandas as pd

from fer_tune.engine.artifacts import load_torch
from fer_tune.errors import one_line
from fer_tune.report.tensorboard import scalar_tag
from fer_tune.search.space import known_recipes, spec_path
from fer_tune.search.trial import CHECKPOINT_FILE, METRIC
from fer_tune.spec import Spec


def trial_table(spec: Spec, results) -> pd.DataFrame:
    """One row per trial: its sampled values, outcome, best objective and best epoch's val metrics,
    and `recipe`, which known recipe it ran ("your spec", "search.points[i]", or empty: sampled)."""
    rows = []
    recipes = known_recipes(spec)
    for result in results:
        config = result.config or {}
        recipe = next((i for i, (_, params) in enumerate(recipes) if params == config), None)
        label = recipes.pop(recipe)[0] if recipe is not None else ""
        history = result.metrics_dataframe
        last = newer_local_epoch(last_result(result))
        epochs = int(last.get("epoch", 0) or 0)
        if result.error is not None:
            reason = "errored"
        elif last.get("finished"):
            reason = "early stop (patience)" if epochs < spec.train.epochs else "completed"
        else:
            reason = "stopped by ASHA" if spec.search.scheduler.type == "asha" else "stopped before its last epoch"
        row = {"trial_id": trial_id_of(result, last),
               **{spec_path(k): v for k, v in config.items()},
               "recipe": label, "epochs": epochs, "stop_reason": reason,
               "error": one_line(result.error, limit=300, last=True) if result.error is not None else None,
               METRIC: last.get(METRIC, math.nan), "best_epoch": last.get("best_epoch")}
        if history is not None and "objective" in history and history["objective"].notna().any():
            best_row = history.loc[history["objective"].idxmax()]
            row.update({k: best_row[k] for k in history.columns if str(k).startswith("val_") or k == "train_accuracy"})
        row["worker_nodes"], row["process"] = last.get("worker_nodes"), last.get("process")
        row["checkpoint"] = checkpoint_location(spec.search.storage, last.get("checkpoint_path") or "")
        rows.append(row)
    return pd.DataFrame(rows)


def trial_histories(trials: pd.DataFrame, results) -> dict[str, list[dict]]:
    """Each trial's per-epoch loop metrics (Tune's own bookkeeping columns left out)."""
    histories = {}
    for trial_id, result in zip(trials["trial_id"], results):
        frame = result.metrics_dataframe
        state = newest_local_state(last_result(result))  # every epoch, also those before a resume
        if state is not None and (frame is None or len(state["history"]) >= len(frame)):
            frame = pd.DataFrame(state["history"])
        if frame is None or "epoch" not in frame:
            continue
        keep = [c for c in frame.columns if c in ("epoch", "best_epoch", "resumed_from_epoch") or scalar_tag(c)]
        histories[str(trial_id)] = frame[keep].dropna(subset=["epoch"]).to_dict("records")
    return histories


def trial_confusions(trials: pd.DataFrame) -> dict[str, dict]:
    """Each trial's validation confusion matrix at its best epoch, from its last checkpoint."""
    import torch

    confusions = {}
    for _, row in trials.iterrows():
        path = Path(str(row["checkpoint"] or "")) / CHECKPOINT_FILE
        if not row["checkpoint"] or not path.is_file():
            continue
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        matrix = state.get("best_metrics", {}).get("val_confusion")
        if matrix:
            confusions[str(row["trial_id"])] = {"epoch": int(state["best_epoch"]), "matrix": matrix}
    return confusions


def trial_id_of(result, last: dict) -> str:
    """A result's Tune trial id: from its metrics, else from its folder's name (trial_<id>_<n>_...)."""
    folder = str(getattr(result, "path", "")).rstrip("/").rsplit("/", 1)[-1]
    return str(last.get("trial_id") or (folder.split("_")[1] if folder.count("_") > 1 else folder))


def healthy(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that did not error and left a checkpoint: the ones a winner can come from."""
    return trials[trials["checkpoint"].astype(bool) & (trials["stop_reason"] != "errored")]


def final_histories(final, runs: list) -> dict[str, list[dict]]:
    """Each final run's per-epoch metrics, under its own run id."""
    if final is None:
        return {}
    ids = [trial_id_of(result, result.metrics or {}) for result in final]
    return trial_histories(pd.DataFrame({"trial_id": ids}), final)


def last_result(result) -> dict:
    """A trial's last reported metrics and, as `checkpoint_path`, where its last checkpoint is
    (`fer_tune.search.trial.ReportsToTune` adds that for a TorchTrainer; an in-trial checkpoint is Tune's own)."""
    metrics = dict(result.metrics or {})
    if not metrics.get("checkpoint_path") and result.checkpoint is not None:
        metrics["checkpoint_path"] = result.checkpoint.path
    return metrics


def newest_local_state(last: dict) -> Optional[dict]:
    """The newest checkpoint of a trial (its Train run's, or in-trial Tune's), when local (else None).

    A resumed trial's final epochs can be checkpointed by Ray Train yet never reach Tune (seen:
    Tune's record of a resumed trial ends at epoch 6 of 8). The checkpoint keeps every epoch's
    metrics, so the trial's record is completed from there. Remote checkpoints are trusted as is.
    """
    import torch

    reported = Path(str(last.get("checkpoint_path") or ""))
    if not reported.name.startswith("checkpoint_") or not reported.parent.is_dir():
        return None
    newest = sorted(reported.parent.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not newest:
        return None
    try:
        state = torch.load(newest[-1], map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable (e.g. being replaced): keep Tune's record
        return None
    if not state.get("history"):
        return None
    return {**state, "checkpoint_path": str(newest[-1].parent)}


def newer_local_epoch(last: dict) -> dict:
    """The trial's last result, from its newest checkpoint when Tune's record stops short."""
    state = newest_local_state(last)
    if state is None or int(state.get("epoch", 0) or 0) <= int(last.get("epoch", 0) or 0):
        return last
    return {**last, **state["history"][-1], "checkpoint_path": state["checkpoint_path"]}


def checkpoint_location(storage: Optional[str], fs_path: str) -> str:
    """A checkpoint's URI: Ray reports its path on the storage's filesystem, without the scheme."""
    scheme = storage.split("://", 1)[0] if storage and "://" in storage else "file"
    return fs_path if scheme == "file" or not fs_path else f"{scheme}://{fs_path}"


def read_checkpoint(location: str) -> dict:
    """A trial checkpoint's state, read in place or fetched from the storage URI it lives at."""
    from ray.train import Checkpoint

    with Checkpoint(location).as_directory() as folder:
        return load_torch(Path(folder) / CHECKPOINT_FILE)


def final_outcomes(spec: Spec, results, runs: int) -> list[dict]:
    """What each final-phase run gave, in the order of the runs: {"run_id", "objective", "checkpoint"}
    (objective NaN and no checkpoint for a run that failed)."""
    outcomes = [{"run_id": "", "objective": math.nan, "checkpoint": ""} for _ in range(runs)]
    for result in results:
        index = int((result.config or {})["final_run"])
        last = newer_local_epoch(last_result(result))
        run_id = trial_id_of(result, last)
        failed = result.error is not None or not last.get("finished")
        outcomes[index] = {"run_id": str(run_id), "objective": math.nan if failed else float(last.get(METRIC, math.nan)),
                           "checkpoint": "" if failed else checkpoint_location(spec.search.storage,
                                                                               last.get("checkpoint_path") or "")}
    return outcomes
