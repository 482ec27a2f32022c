"""What runs in Ray for one trial: the Tune function trainable, and `fit()` in a Train worker or
in the trial itself.

Deliberately light at import: every trial's Tune actor and Train controller unpickle `trial` and
`train_worker` from here, and need neither timm nor sklearn; the training stack is imported
where a trial trains (see `train_and_report`).

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer)` is gone: the TorchTrainer is launched inside
the Tune function and its run is named after the Tune trial id, so a retried trial finds its
own checkpoints and resumes. A one-worker trial on a Ray fer-tune started runs `fit()` itself
and reports through `ray.tune.report` (`resources.trainer`, see `trains_in_trial`): the same
loop, without Train's extra processes.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ray.train import UserCallback  # ray.tune, which every trial actor runs, has imported it already

from fer_tune.search.space import trial_spec
from fer_tune.spec import ResourcesSpec, Spec

if TYPE_CHECKING:
    from fer_tune.data.prepare import PreparedData

METRIC = "best_objective"

CHECKPOINT_FILE = "checkpoint.pt"


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
    # deferred: the training stack (torch, timm) is imported only where a trial trains, not in the
    # Tune actor of a TorchTrainer trial, which only waits on its trainer
    from fer_tune.engine.artifacts import load_torch, save_torch
    from fer_tune.engine.loop import TrainingDiverged, fit

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
        metrics = {**metrics, "worker_nodes": nodes, "process": os.getpid(),
                   "reported_at": time.time()}  # Tune's timestamp is whole s
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

    from fer_tune.data.prepare import PreparedData  # deferred like the training stack (see train_and_report)

    shipped = ray.get(config["data"])
    info = shipped["info"]
    on_driver_node = ray.get_runtime_context().get_node_id() == config["driver_node"]
    if not on_driver_node:
        require_dataset_here(config["spec"])  # only this node's own cache reads data.root
    return PreparedData(spec.data, Path(config["experiment_dir"]), shipped["tables"], info["tasks"],
                        info["labels"], info, cache_root=None if on_driver_node else node_cache_dir())


def node_cache_dir() -> Path:
    """Where a node other than the driver's keeps its image caches: $FER_TUNE_CACHE_DIR, else
    ~/.cache/fer-tune. Cache names fingerprint split, source and size, so experiments share it."""
    return Path(os.environ.get("FER_TUNE_CACHE_DIR") or Path.home() / ".cache" / "fer-tune").expanduser()


def require_dataset_here(raw_spec: dict) -> None:
    """Say which node lacks the dataset, before its cache tries to read it.

    Checked only on a node other than the driver's, the one case where a worker reads data.root
    (the driver checked it there when the spec was loaded).
    """
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
                         resources_per_worker={"CPU": res.cpus_per_worker,
                                               **({"GPU": res.gpus_per_worker} if use_gpu else {})},
                         placement_strategy="SPREAD" if res.placement == "spread" else "PACK")


def trial_holds(res: ResourcesSpec, use_gpu: bool, in_trial: bool, driver_node: str) -> dict:
    """What one Tune trial holds: in its own process, one worker's CPUs and share of a GPU (so
    `gpus_per_worker: 0.25` runs four trials on each GPU at once); through a TorchTrainer, almost
    nothing, pinned to the driver's node (the workers hold the rest, see `scaling_config`)."""
    if in_trial:
        return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker if use_gpu else 0}
    return {"cpu": 0, "memory": 256 * 2**20, driver_node: 0.001}


def make_trial(spec: Spec, experiment_dir: Path, use_gpu: bool, storage: str, data, driver_node: str,
               in_trial: bool = False):
    """The Tune function trainable: one TorchTrainer per trial, named after the trial id, or with
    `in_trial` the training itself in the trial's process (see `trains_in_trial`).

    `data` is the object-store reference of the split tables (see `worker_data`); `storage` is
    where the trial's Train run and checkpoints go (see `fer_tune.search.cluster.train_storage`).
    """

    def worker_config(sampled: Spec) -> dict:
        return {"spec": sampled.model_dump(mode="json"), "experiment_dir": str(experiment_dir), "data": data,
                "driver_node": driver_node}

    def trial(config: dict) -> None:
        import ray.tune
        from ray.train import CheckpointConfig, FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        sampled = trial_spec(spec, config)
        trial_id = ray.tune.get_context().get_trial_id()
        res = sampled.resources
        wait_for_resources(res.workers_per_trial * res.cpus_per_worker,
                           res.workers_per_trial * res.gpus_per_worker if use_gpu else 0)
        reports = ReportsToTune(driver_node)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=worker_config(sampled),
            scaling_config=scaling_config(res, use_gpu),
            run_config=RunConfig(name=trial_id, storage_path=storage, callbacks=[reports.callback()],
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=sampled.search.max_failures)),
        )
        result = reports.forward_while(trainer.fit)
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
        from fer_tune.engine.loop import TrainingDiverged  # deferred: see train_and_report

        raise TrainingDiverged(why)


def trains_in_trial(spec: Spec, joined: bool) -> bool:
    """Whether each trial trains in its own Tune process rather than through a TorchTrainer.

    A TorchTrainer adds a controller and a worker process per trial: about 20 s of start-up on a
    small machine (benchmarks/overhead.py), which a one-worker trial does not need. Tune then
    restarts a crashed trial from its last checkpoint, as Train would restart its worker. On a
    cluster fer-tune joined, trials keep the TorchTrainer: its checkpoints go to `search.storage`
    and its controller stays on the driver's node (see `fer_tune.search.run.run_search`).
    """
    res = spec.resources
    if res.trainer != "auto":
        return res.trainer == "in_trial"
    return not joined and res.workers_per_trial == 1 and spec.search.storage is None


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


class ReportsToTune:
    """Rank 0's metrics of every Train report, forwarded to the Tune trial that runs the TorchTrainer.

    What Ray's TuneReportCallback does, with public APIs only: the Train controller puts each
    report (with `checkpoint_path`) into a one-slot `ray.util.queue.Queue`, and the trial reports
    it to Tune with `ray.tune.report` while `trainer.fit()` runs in a thread. The trial ends once
    the queue is empty, so Tune has every epoch (returning as soon as `trainer.fit()` did could
    drop the last one: seen, a trial recorded at epoch 7 of 8). One slot keeps the controller
    from running far ahead of what Tune has seen.
    """

    def __init__(self, driver_node: str):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node, always: a lost worker node must not take the hand-off with it (with a
        # soft affinity Ray was seen to place it on a node that then died)
        pinned = NodeAffinitySchedulingStrategy(driver_node, soft=False)
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0, "scheduling_strategy": pinned})

    def callback(self):
        """The Train-side half, a `ray.train.UserCallback` (pickled into the Train controller)."""
        return _ReportCallback(self.queue)

    def forward_while(self, fit):
        """Run `fit()` in a thread, reporting every queued epoch to Tune; return what it returns."""
        import queue as std_queue

        import ray.exceptions
        import ray.tune

        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = fit()
            except BaseException as err:  # noqa: BLE001 - re-raised in the trial's own thread below
                outcome["error"] = err

        worker = threading.Thread(target=run, name="torch-trainer", daemon=True)
        worker.start()
        unavailable_since = None
        try:
            while True:
                try:
                    if not worker.is_alive() and self.queue.empty():
                        break
                    metrics = self.queue.get(timeout=0.5)
                except std_queue.Empty:
                    continue
                except ray.exceptions.ActorUnavailableError:
                    # Ray says "temporarily": seen while a lost node's processes were being torn down
                    unavailable_since = unavailable_since or time.monotonic()
                    if time.monotonic() - unavailable_since > UNAVAILABLE_FOR_S:
                        raise
                    time.sleep(0.5)
                    continue
                unavailable_since = None
                ray.tune.report(metrics)
        finally:
            if worker.is_alive():  # Tune stopped the trial (ASHA): the controller's next put fails, its run ends
                self.queue.shutdown(force=True)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


UNAVAILABLE_FOR_S = 120.0
"""How long the hand-off queue may stay "temporarily unavailable" before the trial gives up."""


class _ReportCallback(UserCallback):
    """The Train-side half of `ReportsToTune`: runs in the Train controller."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put(item)
