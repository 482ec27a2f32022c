"""`fer-tune run`: a Ray Tune search whose every trial trains through a Ray Train TorchTrainer.

Flow (top to bottom in `run_search`):
1. validate the spec and prepare the data once (split CSVs, train/val image caches) before Ray;
2. a Tuner over `trial` (a Tune function trainable), with OptunaSearch (TPE, study in
   `DIR/optuna.db`) over the spec's `space:` and ASHA on the objective;
3. each `trial` launches a TorchTrainer whose workers run `fit()` (DDP when more than one) and
   report every epoch through `ray.train.report`; TuneReportCallback forwards rank 0's metrics;
4. after the search the best trial's best epoch is tested once on the test split, and its config
   and weights are exported to `DIR/best/`.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer)` is gone: the TorchTrainer is launched inside
the Tune function and its run is named after the Tune trial id, so a retried trial finds its
own checkpoints and resumes.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from fer_tune.data.prepare import open_prepared, prepare_data
from fer_tune.errors import SearchInterrupted, UserError
from fer_tune.io import atomic_write_text
from fer_tune.spec import Spec, SpaceEntry, describe_differences, load_spec
from fer_tune.train import check_writable, export_best, format_test, load_torch, save_torch, evaluate_on_test

METRIC = "best_objective"
CHECKPOINT_FILE = "checkpoint.pt"


# --- the search space as an Optuna define-by-run function -------------------------------------

def param_name(key: str, entry: SpaceEntry) -> str:
    """Optuna parameter name: the spec path, plus the condition for conditional entries.

    Distinct names per condition keep TPE's per-parameter models apart (a resnet50 lr and an
    efficientnet lr are different parameters).
    """
    if not entry.when:
        return key
    cond = ",".join(f"{k}={'|'.join(map(str, v))}" for k, v in sorted(entry.when.items()))
    return f"{key}[{cond}]"


def spec_path(name: str) -> str:
    return name.split("[", 1)[0]


class SpaceSampler:
    """Optuna define-by-run sampler of a spec's space; conditions are resolved in dependency order.

    A class, not a closure, because Tune pickles the searcher (and so this) to resume a search.
    """

    def __init__(self, spec: Spec):
        self.entries = spec.space_entries()
        self.base = spec.model_dump(mode="json")

    def current(self, values: dict, key: str) -> Any:
        if key in values:
            return values[key]
        node: Any = self.base
        for part in key.split("."):
            node = node[part]
        return node

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        pending = list(self.entries)
        while pending:
            waiting = {k for k, _ in pending}
            ready = [(k, e) for k, e in pending if all(c == k or c not in waiting for c in e.when)]
            if not ready:
                raise UserError("space: conditional entries depend on each other in a cycle")
            for key, entry in ready:
                pending.remove((key, entry))
                if key in values or not all(self.current(values, c) in allowed for c, allowed in entry.when.items()):
                    continue
                values[key] = suggest(trial, param_name(key, entry), entry)


def suggest(trial, name: str, entry: SpaceEntry) -> Any:
    if entry.choice is not None:
        return trial.suggest_categorical(name, entry.choice)
    if entry.uniform is not None:
        return trial.suggest_float(name, *entry.uniform)
    if entry.loguniform is not None:
        return trial.suggest_float(name, *entry.loguniform, log=True)
    return trial.suggest_int(name, *entry.int, log=entry.log)


def trial_spec(spec: Spec, config: dict) -> Spec:
    return spec.with_values({spec_path(k): v for k, v in config.items()})


# --- what runs in Ray ----------------------------------------------------------------------------

def train_worker(config: dict) -> None:
    """One Ray Train worker: `fit()` with `ray.train.report` as its report callback."""
    import ray.train
    import ray.train.torch

    from fer_tune.loop import TrainingDiverged, fit

    spec = Spec.model_validate(config["spec"])
    prepared = open_prepared(spec.data, Path(config["experiment_dir"]))
    train, val = prepared.load("train", progress=False), prepared.load("val", progress=False)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_torch(Path(folder) / CHECKPOINT_FILE)

    last: dict = {"metrics": {METRIC: float("nan"), "epoch": 0}, "state": {}}

    def report(metrics: dict, state: Optional[dict]) -> None:
        last.update(metrics=metrics, state=state or last["state"])
        if rank != 0 or state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_torch(Path(folder) / CHECKPOINT_FILE, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    try:
        fit(spec, train, val, prepared.labels, report, device=ray.train.torch.get_device(), resume=resume)
    except TrainingDiverged as err:
        # Report instead of raising: Train would retry it from its checkpoint, to diverge again.
        # The report carries a checkpoint because the trial function reads the run's result,
        # whose metrics are those of its latest checkpoint.
        report({**last["metrics"], "finished": False, "diverged": str(err)}, {**last["state"], "diverged": str(err)})


def make_trial(spec: Spec, experiment_dir: Path, use_gpu: bool, storage: str):
    """The Tune function trainable: one TorchTrainer per trial, named after the trial id."""

    def trial(config: dict) -> None:
        import ray.tune
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        sampled = trial_spec(spec, config)
        trial_id = ray.tune.get_context().get_trial_id()
        res = sampled.resources
        wait_for_resources(res.workers_per_trial * res.cpus_per_worker, res.workers_per_trial if use_gpu else 0)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": sampled.model_dump(mode="json"), "experiment_dir": str(experiment_dir)},
            scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
                                         placement_strategy="SPREAD" if res.placement == "spread" else "PACK"),
            run_config=RunConfig(name=trial_id, storage_path=storage, callbacks=[TuneReportCallback()],
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=sampled.search.max_failures)),
        )
        result = trainer.fit()
        diverged = (result.metrics or {}).get("diverged")
        if diverged:
            from fer_tune.loop import TrainingDiverged

            raise TrainingDiverged(diverged)

    return trial


def wait_for_resources(cpus: float, gpus: float, timeout: float = 600.0) -> None:
    """Wait until the previous trial's workers have released what this trial needs.

    Tune starts the next trial as soon as the last one reports; its placement group is released
    a moment later. Launching the TorchTrainer into that gap makes its worker group time out and
    retry, which on a small machine can strand CPUs in placement groups for good.
    """
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus - 1e-6 and free.get("GPU", 0) >= gpus - 1e-6:
            return
        time.sleep(0.5)


# --- the driver ----------------------------------------------------------------------------------

def run_search(spec: Spec, out: Path, resume: bool = False, address: Optional[str] = None,
               verbose: int = 1) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    started = time.time()
    out = Path(out).resolve()
    _check_same_experiment(spec, out, resume)
    check_writable(out)
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    if not spec.space:
        print(f"note: {spec.name} has no space: section; every trial trains the same config")

    prepared = prepare_data(spec.data, out)  # reads and splits the labels: bad data fails here
    if not ray.is_initialized():
        # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train uses to free the
        # placement groups of trials that ASHA stops; without it their CPUs are never released.
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), dashboard_host="127.0.0.1",
                 log_to_driver=verbose > 1, configure_logging=verbose > 1,
                 runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
                     "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")}})
    use_gpu, concurrency = _placement(spec)
    prepared.load("train"), prepared.load("val")  # build the shared caches once, before any trial
    storage = str(out)

    sampler = (optuna.samplers.RandomSampler(seed=spec.search.searcher.seed) if spec.search.searcher.type == "random"
               else optuna.samplers.TPESampler(seed=spec.search.searcher.seed))
    storage_url = f"sqlite:///{out / 'optuna.db'}"
    searcher = OptunaSearch(SpaceSampler(spec), metric=METRIC, mode="max", sampler=sampler,
                            study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
    sched = spec.search.scheduler
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=sched.max_t or spec.train.epochs,
                               grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)
                 if sched.type == "asha" else FIFOScheduler())
    # The trial function only waits on its TorchTrainer: it holds memory, not a CPU a worker needs.
    trial = tune.with_resources(make_trial(spec, out, use_gpu, str(out / "train")), {"cpu": 0, "memory": 256 * 2**20})
    # Crashed workers are retried by Ray Train from the trial's last checkpoint; a trial that
    # fails anyway (diverged, raised) stays errored, also when the search is resumed.
    run_config = tune.RunConfig(name="tune", storage_path=storage, verbose=verbose,
                                failure_config=tune.FailureConfig(max_failures=0))
    tune_dir = out / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming the search in {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trial, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(trial, run_config=run_config, tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
            num_samples=spec.search.num_samples, max_concurrent_trials=concurrency))
    results = tuner.fit()
    if results.num_terminated + results.num_errors < spec.search.num_samples:
        raise SearchInterrupted(f"the search stopped before its {spec.search.num_samples} trials ended "
                                f"({results.num_terminated} finished, {results.num_errors} errored); "
                                f"finished trials are kept: resume with --resume --out {out}")
    return finish(spec, out, results, prepared, time.time() - started)



def finish(spec: Spec, out: Path, results, prepared, wall: float) -> dict:
    """Test the best trial's best epoch once, write trials.csv and export best/."""
    trials = trial_table(spec, results)
    atomic_write_text(out / "report" / "trials.csv", trials.to_csv(index=False))
    done = trials[trials["checkpoint"].astype(bool) & (trials["stop_reason"] != "errored")]
    if done.empty:
        reasons = "; ".join(sorted(set(trials["error"].dropna().astype(str))))[:500]
        raise UserError(f"every trial failed ({len(trials)} of {len(trials)}); first errors: {reasons}")
    best = done.sort_values(METRIC, ascending=False).iloc[0]
    state = load_torch(Path(best["checkpoint"]) / CHECKPOINT_FILE)
    best_spec = Spec.model_validate(state["spec"])
    from fer_tune.train import choose_device

    device = choose_device(spec.resources.use_gpu)
    counts = trials["stop_reason"].value_counts().to_dict()
    export_best(out / "best", best_spec, state["best_model"], prepared.labels)  # before the test: never lost
    metrics = evaluate_on_test(best_spec, prepared, state["best_model"], device, report_dir=out / "report", extra={
        "best_trial": best["trial_id"], "best_epoch": int(state["best_epoch"]),
        "val": {k.removeprefix("val_"): v for k, v in best.items() if str(k).startswith("val_")},
        "train_accuracy": state["best_metrics"].get("train_accuracy"),
        "trials": int(len(trials)), "trial_outcomes": {str(k): int(v) for k, v in counts.items()},
        "epochs_spent": int(trials["epochs"].sum()), "wall_seconds": round(wall, 1)})
    print(f"best trial {best['trial_id']}: {METRIC} {best[METRIC]:.4f} at epoch {int(state['best_epoch'])}; "
          f"{len(trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(format_test(metrics, out / "report" / "metrics.json"))
    print(f"best config: {out / 'best' / 'config.yaml'}  (re-run: fer-tune train {out / 'best' / 'config.yaml'})")
    return metrics


def trial_table(spec: Spec, results) -> pd.DataFrame:
    rows = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        last = result.metrics or {}
        epochs = int(last.get("epoch", 0) or 0)
        if result.error is not None:
            reason = "errored"
        elif last.get("finished"):
            reason = "early stop (patience)" if epochs < spec.train.epochs else "completed"
        else:
            reason = "stopped by ASHA"
        row = {"trial_id": last.get("trial_id") or getattr(result, "path", "").rsplit("/", 1)[-1],
               **{spec_path(k): v for k, v in config.items()},
               "epochs": epochs, "stop_reason": reason,
               "error": _one_line(result.error) if result.error is not None else None,
               METRIC: last.get(METRIC, math.nan), "best_epoch": last.get("best_epoch")}
        if history is not None and "objective" in history and history["objective"].notna().any():
            best_row = history.loc[history["objective"].idxmax()]
            row.update({k: best_row[k] for k in history.columns if str(k).startswith("val_") or k == "train_accuracy"})
        row["checkpoint"] = last.get("checkpoint_path") or ""
        rows.append(row)
    return pd.DataFrame(rows)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _placement(spec: Spec) -> tuple[bool, int]:
    """(use GPUs?, trials that fit at once) from what the cluster has and one trial takes."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    res = spec.resources
    use_gpu = bool(gpus) if res.use_gpu == "auto" else bool(res.use_gpu)
    if use_gpu and gpus < 1:
        raise UserError("resources.use_gpu: true but the Ray cluster has no GPU; use auto or false")
    need_cpu = res.workers_per_trial * res.cpus_per_worker
    if need_cpu > cpus or (use_gpu and res.workers_per_trial > gpus):
        have = f"{cpus:g} CPU" + (f", {gpus:g} GPU" if use_gpu else "")
        raise UserError(f"resources.workers_per_trial: {res.workers_per_trial} workers x "
                        f"{res.cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} can never be placed on "
                        f"this cluster ({have}); lower workers_per_trial or cpus_per_worker")
    fit = int(cpus // need_cpu)
    if use_gpu:
        fit = min(fit, int(gpus // res.workers_per_trial))
    limit = spec.search.max_concurrent_trials
    return use_gpu, max(1, min(fit, limit) if limit else fit)


def _check_same_experiment(spec: Spec, out: Path, resume: bool) -> None:
    saved = out / "spec.yaml"
    if not saved.exists():
        if resume:
            raise UserError(f"--resume: {out} holds no experiment to resume (no spec.yaml)")
        return
    try:
        before = load_spec(saved)
    except UserError:
        raise UserError(f"{saved}: the experiment folder's spec is unreadable; use another --out") from None
    differences = describe_differences(before.model_dump(mode="json"), spec.model_dump(mode="json"),
                                       "folder has", "this spec has")
    if differences:
        raise UserError(f"{out} holds a different experiment ({differences[0]}"
                        f"{f' and {len(differences) - 1} more' if len(differences) > 1 else ''}); "
                        f"use another --out, or the same spec and --set values to resume it")
