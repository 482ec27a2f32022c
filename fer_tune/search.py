"""`fer-tune run`: a Ray Tune search whose every trial trains through a Ray Train TorchTrainer
(or, for a one-worker trial on a Ray fer-tune starts, in the Tune trial's own process).

Flow (top to bottom in `run_search`):
1. validate the spec and prepare the data once (split CSVs, train/val image caches) before Ray;
2. a Tuner over `trial` (a Tune function trainable), with OptunaSearch (TPE, study in
   `DIR/optuna.db`) over the spec's `space:` and ASHA on the objective;
3. each `trial` launches a TorchTrainer whose workers run `fit()` (DDP when more than one) and
   report every epoch through `ray.train.report`; TuneReportCallback forwards rank 0's metrics.
   A one-worker trial on a local Ray runs `fit()` itself and reports through `ray.tune.report`
   (`resources.trainer`, see `trains_in_trial`): the same loop, without Train's extra processes;
4. after the search the best trial's best epoch is tested once on the test split, and its config
   and weights are exported to `DIR/best/`.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer)` is gone: the TorchTrainer is launched inside
the Tune function and its run is named after the Tune trial id, so a retried trial finds its
own checkpoints and resumes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd
from ray.tune.logger import TBXLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from fer_tune.errors import SearchInterrupted, UserError
from fer_tune.io import atomic_write_text
from fer_tune.spec import ResourcesSpec, Spec, SpaceEntry, describe_differences, load_spec
from fer_tune.tensorboard import log_epoch, scalar_tag

if TYPE_CHECKING:
    import optuna

    from fer_tune.data.prepare import PreparedData

# Deliberately light at import: every trial's Tune actor and Train controller import this module
# (they unpickle `trial` and `train_worker`) and need neither timm nor sklearn. The training stack
# (fer_tune.train, fer_tune.data.prepare) is imported where it is used. pandas stays: ray.tune
# imports it anyway.

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

    # A diverged run ends normally (Train would retry it from its checkpoint, to diverge again);
    # its last report, with a checkpoint, tells the trial function, which then fails the trial.
    train_and_report(config, rank=ray.train.get_context().get_world_rank(), device=ray.train.torch.get_device(),
                     checkpoint=ray.train.get_checkpoint(), report_to=ray.train.report,
                     checkpoint_from=ray.train.Checkpoint.from_directory)


def train_and_report(config: dict, rank: int, device, checkpoint, report_to, checkpoint_from) -> Optional[str]:
    """`fit()` resumed from `checkpoint`, reporting every epoch through `report_to` (rank 0 with a
    checkpoint made by `checkpoint_from`); returns why training diverged, or None.

    Runs in a Ray Train worker (`train_worker`) or in the Tune trial itself (`in_trial`).
    """
    from fer_tune.loop import TrainingDiverged, fit
    from fer_tune.train import load_torch, save_torch

    _require_dataset_here(config["spec"])
    spec = Spec.model_validate(config["spec"])
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_torch(Path(folder) / CHECKPOINT_FILE)
    if resume and resume.get("diverged"):  # a retried diverged trial would only diverge again
        return resume["diverged"]
    prepared = worker_data(spec, config)
    train, val = prepared.load("train", progress=False), prepared.load("val", progress=False)
    nodes = ",".join(worker_nodes())
    last: dict = {"metrics": {METRIC: float("nan"), "epoch": 0}, "state": {}}

    def report(metrics: dict, state: Optional[dict]) -> None:
        metrics = {**metrics, "worker_nodes": nodes, "reported_at": time.time()}  # Tune's timestamp is whole s
        last.update(metrics=metrics, state=state or last["state"])
        if rank != 0 or state is None:
            report_to(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_torch(Path(folder) / CHECKPOINT_FILE, state)
            report_to(metrics, checkpoint=checkpoint_from(folder))

    try:
        fit(spec, train, val, prepared.labels, report, device=device, resume=resume)
    except TrainingDiverged as err:
        report({**last["metrics"], "finished": False, "diverged": str(err)}, {**last["state"], "diverged": str(err)})
        return str(err)
    return None


def worker_data(spec: Spec, config: dict) -> PreparedData:
    """The trial's data as this worker's node sees it.

    The split tables come from the driver through Ray's object store (they are small). Images
    never do: on the driver's node the worker memory-maps the cache the driver built in the
    experiment folder; on any other node it uses a cache that node builds once from data.root
    (every node needs the dataset at the same path), so no shared filesystem is needed.
    """
    import ray

    from fer_tune.data.prepare import PreparedData

    shipped = ray.get(config["data"])
    info = shipped["info"]
    here = ray.get_runtime_context().get_node_id()
    return PreparedData(spec.data, Path(config["experiment_dir"]), shipped["tables"], info["tasks"],
                        info["labels"], info, cache_root=None if here == config["driver_node"] else node_cache_dir())


def node_cache_dir() -> Path:
    """Where a node other than the driver's keeps its image caches: $FER_TUNE_CACHE_DIR, else
    ~/.cache/fer-tune. Cache names fingerprint split, source and size, so experiments share it."""
    return Path(os.environ.get("FER_TUNE_CACHE_DIR") or Path.home() / ".cache" / "fer-tune").expanduser()


def _require_dataset_here(raw_spec: dict) -> None:
    """Say which node lacks the dataset (rather than a spec error meant for the command line)."""
    data = raw_spec.get("data") or {}
    if data.get("source", "synthetic") != "synthetic" and data.get("root") and not Path(data["root"]).exists():
        import ray.util

        raise FileNotFoundError(f"data.root {data['root']} does not exist on node {ray.util.get_node_ip_address()}: "
                                f"every node of the cluster needs the dataset at the same path")


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, gathered over the trial's process group: where its
    workers really ran (reported with every epoch as `worker_nodes`)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return nodes


def scaling_config(res: ResourcesSpec, use_gpu: bool):
    """One trial's workers: one GPU each when GPUs are used; packed onto as few nodes as possible
    (collectives stay on a machine) unless `resources.placement: spread` asks for one per node."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=res.workers_per_trial, use_gpu=use_gpu,
                         resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
                         placement_strategy="SPREAD" if res.placement == "spread" else "PACK")


def make_trial(spec: Spec, experiment_dir: Path, use_gpu: bool, storage: str, data, driver_node: str,
               in_trial: bool = False):
    """The Tune function trainable: one TorchTrainer per trial, named after the trial id, or with
    `in_trial` the training itself in the trial's process (see `trains_in_trial`).

    `data` is the object-store reference of the split tables (see `worker_data`); `storage` is
    where the trial's Train run and checkpoints go (see `train_storage`).
    """

    def worker_config(sampled: Spec) -> dict:
        return {"spec": sampled.model_dump(mode="json"), "experiment_dir": str(experiment_dir), "data": data,
                "driver_node": driver_node}

    def trial(config: dict) -> None:
        import ray.tune
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        sampled = trial_spec(spec, config)
        trial_id = ray.tune.get_context().get_trial_id()
        res = sampled.resources
        wait_for_resources(res.workers_per_trial * res.cpus_per_worker, res.workers_per_trial if use_gpu else 0)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=worker_config(sampled),
            scaling_config=scaling_config(res, use_gpu),
            run_config=RunConfig(name=trial_id, storage_path=storage, callbacks=[TuneReportCallback()],
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=sampled.search.max_failures)),
        )
        result = trainer.fit()
        wait_for_last_report()
        fail_if_diverged((result.metrics or {}).get("diverged"))

    def trial_in_process(config: dict) -> None:
        import ray.tune
        import torch

        # Tune retries a failed trial from its last checkpoint, which says it diverged: it fails again at once.
        fail_if_diverged(train_and_report(worker_config(trial_spec(spec, config)), rank=0,
                                          device=torch.device("cuda", 0) if use_gpu else torch.device("cpu"),
                                          checkpoint=ray.tune.get_checkpoint(), report_to=ray.tune.report,
                                          checkpoint_from=ray.tune.Checkpoint.from_directory))

    if in_trial:
        trial_in_process.__name__ = trial.__name__  # Tune names trials (and their folders) after it
        return trial_in_process
    return trial


def fail_if_diverged(why: Optional[str]) -> None:
    """Fail the trial (it stays errored) when its training diverged."""
    if why:
        from fer_tune.loop import TrainingDiverged

        raise TrainingDiverged(why)


def trains_in_trial(spec: Spec, joined: bool) -> bool:
    """Whether each trial trains in its own Tune process rather than through a TorchTrainer.

    A TorchTrainer adds a controller and a worker process per trial: about 20 s of start-up on a
    small machine (benchmarks/overhead.py), which a one-worker trial does not need. Tune then
    restarts a crashed trial from its last checkpoint, as Train would restart its worker. On a
    cluster fer-tune joined, trials keep the TorchTrainer: its checkpoints go to `search.storage`
    and its controller stays on the driver's node (see `run_search`).
    """
    res = spec.resources
    if res.trainer != "auto":
        return res.trainer == "in_trial"
    return not joined and res.workers_per_trial == 1 and spec.search.storage is None


def wait_for_last_report(timeout: float = 60.0) -> None:
    """Let Tune read the trial's last epoch before the trial function returns.

    TuneReportCallback hands each epoch's metrics from the Train controller to this trial through
    a one-slot queue that Tune drains only while the function runs: returning as soon as
    `trainer.fit()` does can drop the final epoch (seen: a trial recorded at epoch 7 of 8).
    """
    from ray.train._internal.session import get_session

    handoff = getattr(get_session(), "_inter_actor_queue", None)
    deadline = time.monotonic() + timeout
    while handoff is not None and time.monotonic() < deadline and not handoff.empty():
        time.sleep(0.1)


class TrialCurves(TBXLoggerCallback):
    """Tune's TensorBoard logger, replaced: clean tags (val/expression_f1, not ray/tune/...) and
    one run per trial named by its id, written by the driver (so also when workers are remote).

    Subclassing TBXLoggerCallback is what tells Tune not to add its own TensorBoard logger.
    """

    def __init__(self, logdir: Path):  # not TBXLoggerCallback's: no tensorboardX
        self.logdir = str(logdir)
        self._writers = {}

    def __getstate__(self):  # Tune pickles its callbacks to resume a search; writers restart
        return {"logdir": self.logdir, "_writers": {}}

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if "epoch" not in result:
            return
        if trial.trial_id not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[trial.trial_id] = SummaryWriter(os.path.join(self.logdir, trial.trial_id))
        log_epoch(self._writers[trial.trial_id], result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()


def wait_for_resources(cpus: float, gpus: float, timeout: float = 600.0) -> None:
    """Wait until the previous trial's workers have released what this trial needs.

    Tune starts the next trial as soon as the last one reports; its placement group is released
    a moment later. Launching the TorchTrainer into that gap makes its worker group time out and
    retry, which on a small machine can strand CPUs in placement groups for good. What the
    cluster does not have at all is not waited for: the trainer's own request for it is what
    makes an autoscaler add nodes.
    """
    import ray

    total = ray.cluster_resources()
    if total.get("CPU", 0) < cpus - 1e-6 or total.get("GPU", 0) < gpus - 1e-6:
        return
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
    import optuna

    from fer_tune.data.prepare import prepare_data
    from fer_tune.train import check_writable

    started = time.time()
    out = Path(out).resolve()
    _check_same_experiment(spec, out, resume)
    check_writable(out)
    checkpoints = train_storage(spec, out)
    if spec.search.storage is not None:
        check_storage(checkpoints)  # before spec.yaml: a corrected --storage is then the same experiment
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    if not spec.space:
        print(f"note: {spec.name} has no space: section; every trial trains the same config")

    prepared = prepare_data(spec.data, out)  # reads and splits the labels: bad data fails here
    joined = connect_ray(address, verbose)
    use_gpu, concurrency = _placement(spec, joined)
    in_trial = trains_in_trial(spec, joined)
    if in_trial:
        checkpoints = str(out / "tune")  # Tune keeps them beside each trial's results
        # Keeping one checkpoint per trial makes Tune save its experiment state at each; with epochs
        # of a few seconds it warns about every one of them.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _note_multi_node_storage(checkpoints)
    prepared.load("train"), prepared.load("val")  # the driver node's caches, built once before any trial
    data = ray.put({"tables": prepared.tables, "info": prepared.info})  # for workers on other nodes
    storage = str(out)

    sampler = make_sampler(spec)
    storage_url = f"sqlite:///{out / 'optuna.db'}"
    searcher = StudySearch(SpaceSampler(spec), metric=METRIC, mode="max", sampler=sampler,
                            study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
    sched = spec.search.scheduler
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=sched.max_t or spec.train.epochs,
                               grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)
                 if sched.type == "asha" else FIFOScheduler())
    # Through a TorchTrainer, the trial function only waits on it: it holds memory, not a CPU a
    # worker needs. It runs on the driver's node, as does the Train controller it starts, so a lost
    # worker node takes only training workers with it, and Train retries the trial from its last
    # checkpoint; a trial that fails anyway (diverged, raised) stays errored, also when resumed.
    # In the trial's own process, the trial holds what one worker would, and Tune does the retries.
    trainable = make_trial(spec, out, use_gpu, checkpoints, data, ray.get_runtime_context().get_node_id(), in_trial)
    holds = ({"cpu": spec.resources.cpus_per_worker, "gpu": 1 if use_gpu else 0} if in_trial
             else {"cpu": 0, "memory": 256 * 2**20, _driver_node_resource(): 0.001})
    trial = tune.with_resources(trainable, holds)
    retries = spec.search.max_failures if in_trial else 0  # a TorchTrainer trial's are Train's
    run_config = tune.RunConfig(name="tune", storage_path=storage, verbose=verbose,
                                failure_config=tune.FailureConfig(max_failures=retries),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                callbacks=[TrialCurves(out / "tensorboard")])
    tune_dir = out / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming the search in {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trial, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(trial, run_config=run_config, tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
            num_samples=spec.search.num_samples, max_concurrent_trials=concurrency))
    with ctrl_c_stops_gracefully() as interrupted:
        results = tuner.fit()
    if interrupted or results.num_terminated + results.num_errors < spec.search.num_samples:
        raise SearchInterrupted(f"the search stopped before its {spec.search.num_samples} trials ended "
                                f"({'interrupted; ' if interrupted else ''}finished trials and the running "
                                f"ones' checkpoints are kept): resume with the same command plus --resume --out {out}")
    return finish(spec, out, results, prepared, time.time() - started)


_STOPPING = threading.Event()  # set by Ctrl-C while `tuner.fit()` runs


class StudySearch(OptunaSearch):
    """OptunaSearch that leaves the trials a Ctrl-C stops unfinished in the Optuna study.

    Tune's graceful stop saves the experiment (those trials still running in it) and then reports
    them complete to the searcher; told to Optuna, their partial objective would become a final
    one, and the resumed trials could no longer be told. Skipped, the study matches the saved
    experiment, and resumed trials are told when they really end.
    """

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if _STOPPING.is_set():
            return
        super().on_trial_complete(trial_id, result=result, error=error)


@contextlib.contextmanager
def ctrl_c_stops_gracefully():
    """Ctrl-C during `tuner.fit()`: Tune saves the experiment state and returns; yields a list
    that is non-empty afterwards if that happened. A second Ctrl-C stops at once.

    Tune's own SIGINT handler stops the same way but leaves no trace: once it returns, trials it
    stopped read as terminated, like finished ones. So ours records the interrupt and asks Tune
    to stop through SIGUSR1, which Tune handles with the same graceful stop.
    """
    import signal

    interrupted: list = []
    _STOPPING.clear()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield interrupted
        return

    def on_ctrl_c(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        _STOPPING.set()
        print("\nfer-tune: stopping; the search state is being saved (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    previous_setting = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if previous_setting is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_setting



def finish(spec: Spec, out: Path, results, prepared, wall: float) -> dict:
    """Test the best trial's best epoch once, write trials.csv and export best/."""
    from fer_tune.train import evaluate_on_test, export_best, format_test, write_history, write_report

    trials = trial_table(spec, results)
    atomic_write_text(out / "report" / "trials.csv", trials.to_csv(index=False))
    done = trials[trials["checkpoint"].astype(bool) & (trials["stop_reason"] != "errored")]
    if done.empty:
        reasons = "; ".join(sorted(set(trials["error"].dropna().astype(str))))[:500]
        raise UserError(f"every trial failed ({len(trials)} of {len(trials)}); first errors: {reasons}")
    best = done.sort_values(METRIC, ascending=False).iloc[0]
    state = read_checkpoint(best["checkpoint"])
    best_spec = Spec.model_validate(state["spec"])
    from fer_tune.train import choose_device

    device = choose_device("auto")  # the driver's own: a CPU head node tests a GPU-trained model
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
    write_history(out / "report", trial_histories(trials, results), trial_confusions(trials))
    write_report(out)
    return metrics


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


def trial_table(spec: Spec, results) -> pd.DataFrame:
    rows = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        last = newer_local_epoch(last_result(result))
        epochs = int(last.get("epoch", 0) or 0)
        if result.error is not None:
            reason = "errored"
        elif last.get("finished"):
            reason = "early stop (patience)" if epochs < spec.train.epochs else "completed"
        else:
            reason = "stopped by ASHA" if spec.search.scheduler.type == "asha" else "stopped before its last epoch"
        folder = str(getattr(result, "path", "")).rstrip("/").rsplit("/", 1)[-1]  # trial_<id>_<n>_...
        row = {"trial_id": last.get("trial_id") or (folder.split("_")[1] if folder.count("_") > 1 else folder),
               **{spec_path(k): v for k, v in config.items()},
               "epochs": epochs, "stop_reason": reason,
               "error": _one_line(result.error) if result.error is not None else None,
               METRIC: last.get(METRIC, math.nan), "best_epoch": last.get("best_epoch")}
        if history is not None and "objective" in history and history["objective"].notna().any():
            best_row = history.loc[history["objective"].idxmax()]
            row.update({k: best_row[k] for k in history.columns if str(k).startswith("val_") or k == "train_accuracy"})
        row["worker_nodes"] = last.get("worker_nodes")
        row["checkpoint"] = checkpoint_location(spec.search.storage, last.get("checkpoint_path") or "")
        rows.append(row)
    return pd.DataFrame(rows)


def last_result(result) -> dict:
    """A trial's last reported metrics and, as `checkpoint_path`, where its last checkpoint is
    (TuneReportCallback adds that for a TorchTrainer; an in-trial checkpoint is Tune's own)."""
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

    from fer_tune.train import load_torch

    with Checkpoint(location).as_directory() as folder:
        return load_torch(Path(folder) / CHECKPOINT_FILE)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def connect_ray(address: Optional[str], verbose: int) -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start one here; True if joined.

    Token authentication stays on: Ray turns it on for a cluster it starts, and a driver that
    joins one needs the cluster's token (~/.ray/auth_token, $RAY_AUTH_TOKEN or
    $RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token).
    """
    import ray

    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    joined = address not in (None, "local")
    if joined and address.startswith("ray://"):
        raise UserError(f"{given} {address}: Ray Client cannot run a search (its Tune driver must run on a "
                        f"cluster node); submit it: ray job submit --address http://HEAD:8265 -- fer-tune run ...")
    if joined and address != "auto":
        problem = _unreachable(address)
        if problem:
            raise UserError(f"{given} {address}: no Ray cluster answers there ({problem}); give the head "
                            f"node's HOST:PORT (ray start --head prints it) or auto on a cluster node")
    if ray.is_initialized():
        return joined
    dashboard = {} if joined else local_dashboard()
    try:
        # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train uses to free the
        # placement groups of trials that ASHA stops; without it their CPUs are never released.
        with ctrl_c_reaches_only_the_driver(started_here=not joined):
            ray.init(address=address, dashboard_host="127.0.0.1", log_to_driver=verbose > 1,
                     configure_logging=verbose > 1, runtime_env={"env_vars": _worker_env(joined)}, **dashboard)
    except ConnectionError as err:
        if "AuthenticationError" in repr(err.__cause__):
            raise UserError(f"{given} {address}: the cluster wants its authentication token; copy it from the "
                            f"head (ray get-auth-token) to ~/.ray/auth_token and set RAY_AUTH_MODE=token") from None
        raise UserError(f"{given} {address}: {str(err).strip().splitlines()[0]}") from None
    return joined


@contextlib.contextmanager
def ctrl_c_reaches_only_the_driver(started_here: bool):
    """Start Ray's processes with SIGINT ignored (inherited by every worker they spawn).

    A terminal's Ctrl-C goes to its whole process group, which includes the Ray this search
    starts: trial workers killed by it would leave their Train runs half-ended, and a resumed
    trial might not continue. The driver alone handles Ctrl-C (see ctrl_c_stops_gracefully).
    """
    import signal

    if not started_here or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_dashboard() -> dict:
    """A dashboard port for the Ray this search starts, announced to all its processes.

    Ray Train's PlacementGroupCleaner finds the state API by auto-detecting "the" local Ray; with
    a second Ray instance on the machine (another search, a test cluster) that detection fails,
    the cleaner dies, and the CPUs of every trial that ASHA stops stay reserved: the search hangs.
    RAY_API_SERVER_ADDRESS, inherited by the raylet and so by every worker, names ours.
    """
    import socket

    if os.environ.get("RAY_API_SERVER_ADDRESS", _ANNOUNCED[0]) != _ANNOUNCED[0]:
        return {}  # the user's own setting
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _ANNOUNCED[0] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port}


_ANNOUNCED = [""]  # the RAY_API_SERVER_ADDRESS this process set for the last Ray it started


def _unreachable(address: str) -> Optional[str]:
    """Why nothing listens at HOST:PORT, or None. Checked first because ray.init would retry a
    wrong address for minutes."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return "expected auto or HOST:PORT, e.g. 10.0.0.5:6379"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__


def _worker_env(joined: bool = True) -> dict:
    """Environment of every Ray worker of this search.

    Train's worker-group start timeout: a trial may wait for the previous one's CPUs, or for an
    autoscaler's new node. On a Ray this search starts itself (one machine, nothing preempted),
    Train's preemption watcher and Prometheus metrics are switched off: two more processes and
    periodic work per trial that compete with training for the CPU (benchmarks/overhead.py).
    A job submitted with its own runtime_env may set these there, and ray.init must not set the
    same variable again; a variable set in the driver's environment wins.
    """
    wanted = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    if not joined:
        wanted.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_METRICS_ENABLED="0")
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {name: os.environ.get(name, value) for name, value in wanted.items() if name not in taken}


def _driver_node_resource() -> str:
    """A resource that only the driver's node has: the head's own, else the node's address."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    head = "node:__internal_head__"
    return head if head in node["Resources"] else f"node:{node['NodeManagerAddress']}"


def train_storage(spec: Spec, out: Path) -> str:
    """Where the trials' Ray Train runs (checkpoints) go: DIR/train, or under search.storage.

    Tune's own experiment (DIR/tune, the searcher state, TensorBoard) stays on the driver: its
    trial functions run there too (see `run_search`).
    """
    if spec.search.storage is None:
        return str(out / "train")
    return f"{spec.search.storage}/{out.name}/train"


def check_storage(location: str) -> None:
    """Fail before any training when `search.storage` cannot be written (as Ray Train writes it)."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.write-test"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... with multi-line texts
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        hint = "check the URI and this machine's cloud credentials" if "://" in location else "choose another path"
        raise UserError(f"search.storage: cannot write to {location} ({reason}); {hint}") from None


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `search.searcher` names; says so when TPE would never get past its random start."""
    import optuna

    search, searcher = spec.search, spec.search.searcher
    if searcher.type == "random":
        return optuna.samplers.RandomSampler(seed=searcher.seed)
    startup = searcher.startup_trials or inspect.signature(optuna.samplers.TPESampler).parameters[
        "n_startup_trials"].default
    if spec.space and search.num_samples <= startup:
        print(f"note: TPE draws its first {startup} trials at random, so this search's {search.num_samples} "
              f"are all random draws; search.searcher.startup_trials below {search.num_samples} lets TPE "
              f"choose the rest")
    return optuna.samplers.TPESampler(seed=searcher.seed, n_startup_trials=startup)


def _note_multi_node_storage(location: str) -> None:
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1 and "://" not in location:
        print(f"note: {nodes} Ray nodes: trial checkpoints go to {location} on the node of each trial's "
              f"first worker; unless that is a shared filesystem, set --storage s3://... or gs://...")


def _placement(spec: Spec, joined: bool = False) -> tuple[bool, int]:
    """(use GPUs?, trials that fit at once) from what the cluster has and one trial takes.

    A cluster this search started has all it will ever have: a trial that cannot fit is refused.
    A cluster it joined may be autoscaling from nothing: what is missing is noted, trials ask for
    it, and `search.max_concurrent_trials` (if set) is how many run at once.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    res = spec.resources
    use_gpu = bool(gpus) if res.use_gpu == "auto" else bool(res.use_gpu)
    need_cpu = res.workers_per_trial * res.cpus_per_worker
    have = f"{cpus:g} CPU" + (f", {gpus:g} GPU" if use_gpu else "")
    if use_gpu and gpus < 1 and not joined:
        raise UserError("resources.use_gpu: true but the Ray cluster has no GPU; use auto or false")
    if need_cpu > cpus or (use_gpu and res.workers_per_trial > gpus):
        if not joined:
            raise UserError(f"resources.workers_per_trial: {res.workers_per_trial} workers x "
                            f"{res.cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} can never be placed on "
                            f"this cluster ({have}); lower workers_per_trial or cpus_per_worker")
        print(f"note: the cluster has {have} now and a trial needs {res.workers_per_trial} x "
              f"({res.cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''}): trials wait for nodes to join")
    fit = int(cpus // need_cpu)
    if use_gpu:
        fit = min(fit, int(gpus // res.workers_per_trial))
    limit = spec.search.max_concurrent_trials
    if joined and limit:
        return use_gpu, limit
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
