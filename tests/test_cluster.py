"""Scaling out: `fer-tune run --address` on a real two-node Ray cluster, node loss, cluster.yaml.

The cluster is two Ray nodes on this machine (tests/ray_cluster.py): separate raylets, object
stores and node ids, token authentication on. One search (one trial: each costs half a minute
of start-up) serves both multi-node tests: the trial's two DDP workers must land on different
nodes (placement: spread; the head has room for both, so only SPREAD puts one on the second
node), and once the trial has checkpointed its first epoch, the second node is killed outright.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fer_tune.cli import main
from fer_tune.spec import ResourcesSpec

from conftest import REPO, write_spec

EPOCHS = 8


@dataclass
class TwoNodes:
    address: str
    head: str  # node ids
    worker: str
    env: dict  # what a driver joining the cluster needs (token, temp dir)
    caches: dict  # node id -> that node's FER_TUNE_CACHE_DIR
    process: subprocess.Popen

    def remove_worker(self) -> None:
        self.process.stdin.write("remove-worker\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "removed"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes():
    root = short_root("ftc")
    dashboard = _free_port()  # Ray's fixed default ports may be taken by other Rays on this machine
    # RAY_API_SERVER_ADDRESS tells Ray Train which of the machine's Rays is this one.
    env = cluster_env(root, drop=("RAY_ADDRESS",), RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}")
    settings = {
        "head": {"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                 "dashboard_port": dashboard, "dashboard_agent_listen_port": _free_port(),
                 "env_vars": {"FER_TUNE_CACHE_DIR": str(root / "cache-head")},
                 # notice a dead node within ~3 s, not Ray's default ~15 s
                 "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}},
        "worker": {"num_cpus": 1, "env_vars": {"FER_TUNE_CACHE_DIR": str(root / "cache-worker")}},
    }
    with cluster_helper("ray_cluster.py", settings, env, root) as (info, process):
        yield TwoNodes(info["address"], info["head"], info["worker"], env,
                       {info["head"]: root / "cache-head", info["worker"]: root / "cache-worker"}, process)


def short_root(prefix: str) -> Path:
    """A cluster's temp folder: short, as Ray's socket paths must stay under 107 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cluster_env(root: Path, drop: tuple, **extra: str) -> dict:
    """This environment without `drop`, for a cluster of its own under `root` with token authentication.

    RAY_TMPDIR keeps the cluster's address file out of /tmp/ray, so that no other `ray.init()` on
    this machine joins it by accident.
    """
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_raylet_start_wait_time_s="120", **extra)  # a busy machine starts a node slowly
    return env


@contextlib.contextmanager
def cluster_helper(script: str, settings: dict, env: dict, root: Path):
    """Run tests/SCRIPT (a cluster in its own process) and yield (its first JSON line, the process);
    closing its stdin makes it stop its own processes (never `ray stop`: other Rays run here)."""
    log = open(root / "cluster.log", "w")
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / script), json.dumps(settings)],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = process.stdout.readline()
        assert line, (root / "cluster.log").read_text()[-3000:]
        yield json.loads(line), process
    finally:
        process.stdin.close()
        process.wait(timeout=120)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def spread_search(two_nodes, tmp_path_factory):
    """One trial of 2 spread workers; the second node dies after the trial's first epoch."""
    tmp = tmp_path_factory.mktemp("cluster")
    spec = write_spec(tmp / "spread.yaml", name="spread", data={"synthetic": {"n": 400, "identities": 40}},
                      train={"epochs": EPOCHS, "batch_size": 16},
                      resources={"workers_per_trial": 2, "cpus_per_worker": 1, "use_gpu": False,
                                 "placement": "spread"},
                      search={"num_samples": 1, "max_failures": 1, "scheduler": {"type": "none"}})
    out, storage = tmp / "run", tmp / "storage"
    started = time.monotonic()
    with open(tmp / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "fer_tune.cli", "run", str(spec), "--out", str(out),
                                   "--address", two_nodes.address, "--storage", f"file://{storage}"],
                                  env=two_nodes.env, stdout=log, stderr=subprocess.STDOUT)
        removed = None
        while driver.poll() is None and time.monotonic() - started < 400:
            # Train's own record of a registered checkpoint: the driver's Tune may see epochs
            # seconds later than Train does on a busy machine, and the whole trial lasts ~15 s
            if _registered_checkpoints(storage):
                removed = time.monotonic() - started
                two_nodes.remove_worker()
                break
            time.sleep(0.25)
        try:
            code = driver.wait(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
    wall = time.monotonic() - started
    assert code == 0, (tmp / "driver.log").read_text()[-4000:]
    history = pd.read_csv(next((out / "tune").glob("trial_*/progress.csv")))
    return {"out": out, "storage": storage, "removed_at": removed, "wall": wall, "history": history,
            "trials": pd.read_csv(out / "report" / "trials.csv")}


def _registered_checkpoints(storage: Path) -> int:
    """How many checkpoints Ray Train has registered for the trial (its snapshot file)."""
    for snapshot in storage.glob("run/train/*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):  # mid-write
            return 0
    return 0


def test_trial_workers_run_ddp_across_both_nodes(two_nodes, spread_search):
    first = spread_search["history"].iloc[0]
    # every rank reports its node id, gathered over the trial's gloo process group
    assert first["epoch"] == 1 and first["resumed_from_epoch"] == 0
    assert set(first["worker_nodes"].split(",")) == {two_nodes.head, two_nodes.worker}
    # the second node built its own image cache from data.root; the driver's node used the driver's
    assert {p.name.split("_")[0] for p in two_nodes.caches[two_nodes.worker].glob("*.kept.npy")} == {"train", "val"}
    assert not list(two_nodes.caches[two_nodes.head].glob("*.npy"))
    # checkpoints went to the storage URI; the driver's folder still got the report and best/
    trials = spread_search["trials"]
    assert all(str(c).startswith(str(spread_search["storage"] / "run" / "train")) for c in trials["checkpoint"])
    assert json.loads((spread_search["out"] / "report" / "metrics.json").read_text())["trials"] == 1
    assert torch.load(spread_search["out"] / "best" / "model.pt", weights_only=True)["labels"] == list(range(8))


def test_search_survives_losing_a_node_mid_trial(two_nodes, spread_search):
    assert spread_search["removed_at"] is not None, "the second node was never removed"
    history, trials = spread_search["history"], spread_search["trials"]
    assert trials["stop_reason"].tolist() == ["completed"]
    # nothing finished was lost: Train restarted the workers (both on the head now) from the
    # checkpoint of the last epoch reported before the loss, and no epoch was trained twice
    epochs = history["epoch"].tolist()
    assert epochs == list(range(1, EPOCHS + 1))
    resumed = history[history["resumed_from_epoch"] > 0]
    assert len(resumed) and resumed["resumed_from_epoch"].iloc[0] == resumed["epoch"].iloc[0] - 1
    assert resumed["worker_nodes"].iloc[-1].split(",") == [two_nodes.head, two_nodes.head]
    assert (Path(trials["checkpoint"][0]) / "checkpoint.pt").is_file()
    # what the loss cost: the gap around the restart, less one ordinary epoch (printed for the record)
    before, after = history[history["resumed_from_epoch"] == 0].iloc[-1], resumed.iloc[0]
    cost = after["time_total_s"] - before["time_total_s"] - after["epoch_seconds"]
    print(f"\ntwo-node search: {spread_search['wall']:.0f} s wall, node removed at {spread_search['removed_at']:.0f} s, "
          f"trial {history['time_total_s'].max():.0f} s of which the node loss cost {cost:.0f} s")


def test_scaling_config_packs_by_default_spreads_on_request_one_gpu_per_worker():
    from fer_tune.search.trial import scaling_config

    packed = scaling_config(ResourcesSpec(workers_per_trial=4, use_gpu=True), use_gpu=True)
    assert packed.placement_strategy == "PACK" and packed.num_workers == 4 and packed.use_gpu
    assert packed.resources_per_worker == {"CPU": 1.0, "GPU": 1}
    spread = scaling_config(ResourcesSpec(workers_per_trial=2, cpus_per_worker=2, placement="spread"), use_gpu=False)
    assert spread.placement_strategy == "SPREAD" and spread.resources_per_worker == {"CPU": 2.0}


def test_unusable_address_or_storage_is_one_line(tmp_path, capsys):
    spec = str(write_spec(tmp_path / "s.yaml"))
    (tmp_path / "a-file").write_text("")
    cases = [(["--storage", "ftp://host/x"], "search.storage: scheme 'ftp://' is not supported"),
             (["--storage", str(tmp_path / "a-file")], "search.storage: cannot write to"),
             (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
             (["--address", "ray://127.0.0.1:10001"], "Ray Client cannot run a search")]
    for extra, expected in cases:
        assert main(["run", spec, "--out", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_worker_env_drops_preemption_watcher_and_metrics_only_on_a_ray_started_here(monkeypatch):
    from fer_tune.search.cluster import _worker_env

    for name in ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                 "RAY_TRAIN_METRICS_ENABLED", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    assert _worker_env(joined=False) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
                                         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                         "RAY_TRAIN_METRICS_ENABLED": "0"}
    assert _worker_env(joined=True) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}  # a cluster keeps them
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's choice wins
    assert _worker_env(joined=False)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    job = {"runtime_env": {"env_vars": {"RAY_TRAIN_METRICS_ENABLED": "1"}}}  # set by `ray job submit`
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "RAY_TRAIN_METRICS_ENABLED" not in _worker_env(joined=False)


def test_worker_without_the_dataset_names_its_node(tmp_path):
    from fer_tune.search.trial import require_dataset_here

    with pytest.raises(FileNotFoundError, match=r"data.root .*missing does not exist on node \S+: every node"):
        require_dataset_here({"data": {"source": "csv", "root": str(tmp_path / "missing")}})
    require_dataset_here({"data": {"source": "csv", "root": str(tmp_path)}})
    require_dataset_here({"data": {"source": "synthetic"}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_trial_gives_each_worker_one_gpu(tmp_path):
    workers = min(2, torch.cuda.device_count())
    spec = write_spec(tmp_path / "gpu.yaml", name="gpu", train={"epochs": 1, "batch_size": 32},
                      resources={"workers_per_trial": workers, "use_gpu": True},
                      search={"num_samples": 1, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert trials["stop_reason"].tolist() == ["completed"]
    state = torch.load(Path(trials["checkpoint"][0]) / "checkpoint.pt", weights_only=True)
    assert state["spec"]["resources"]["use_gpu"] is True


def test_cluster_yaml_passes_rays_own_validation():
    """The checks `ray up` makes before it calls the cloud: defaults merged, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 and t["max_workers"] >= 1
                             for t in gpu_types)
    setup = " ".join(config["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup and "aws s3 sync" in setup
    assert config["idle_timeout_minutes"] > 0
    text = (REPO / "cluster.yaml").read_text()
    for secret in ("AKIA", "aws_secret_access_key", "ssh_private_key:", "BEGIN RSA", "BEGIN OPENSSH"):
        assert secret not in text


def test_trials_share_gpus_by_fractions(tmp_path):
    """2 GPUs declared to Ray, 0.5 GPU a trial: four trials at once, each with half of one GPU."""
    out = tmp_path / "share.json"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_share.py"), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    share = json.loads(out.read_text())
    assert share["use_gpu"] and share["concurrency"] == 4
    assert share["trainer_worker"] == {"CPU": 0.5, "GPU": 0.5}  # a TorchTrainer worker asks for the same share
    trials = share["trials"]
    assert len(trials) == 4 and all(t["gpus"] == 0.5 and len(t["gpu_ids"]) == 1 for t in trials)
    assert sorted(str(t["gpu_ids"][0]) for t in trials) == ["0", "0", "1", "1"]  # two trials on each GPU
    assert max(t["started"] for t in trials) < min(t["ended"] for t in trials)  # all four ran at once


@pytest.mark.parametrize("gpus, expected", [(1.5, "gpus_per_worker: 1.5: a worker takes a share of one GPU"),
                                            (0, "gpus_per_worker: Input should be greater than 0")])
def test_gpu_shares_are_fractions_of_one_or_whole_gpus(tiny_spec, gpus, expected, capsys, tmp_path):
    assert main(["run", str(tiny_spec), "--set", f"resources.gpus_per_worker={gpus}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_concurrency_counts_whole_shares_of_each_gpu(monkeypatch):
    import ray

    from fer_tune.search.cluster import placement
    from fer_tune.spec import validate_spec

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64, "GPU": 3})
    for share, expected in ((0.7, 3), (0.25, 12), (0.5, 6), (1, 3), (2, 1)):
        spec = validate_spec({"resources": {"use_gpu": True, "gpus_per_worker": share}})
        assert placement(spec) == (True, expected), share


IDLE_TIMEOUT_MINUTES = 0.2


@dataclass
class Autoscaling:
    address: str
    head: str  # node id
    root: Path  # RAY_TMPDIR: autoscaling.json (the autoscaler's config) and ray/session_latest/logs
    env: dict  # what a driver joining the cluster needs (token, temp dir, dashboard)
    process: subprocess.Popen

    def nodes(self) -> dict:
        """Every node the cluster has had so far (see tests/autoscaling_cluster.py)."""
        self.process.stdin.write("nodes\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())


@pytest.fixture
def autoscaling_cluster():
    """cluster.yaml's node types on Ray's fake multi-node provider (tests/autoscaling_cluster.py)."""
    root = short_root("fta")
    env = cluster_env(root, drop=("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "FER_TUNE_RAY_API_SERVER_ADDRESS"),
                      FER_TUNE_CACHE_DIR=str(root / "node-cache"))
    settings = {"root": str(root), "cluster_yaml": str(REPO / "cluster.yaml"),
                "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES}
    with cluster_helper("autoscaling_cluster.py", settings, env, root) as (info, process):
        yield Autoscaling(info["address"], info["head"], root, {**env, "RAY_API_SERVER_ADDRESS": info["dashboard"]},
                          process)


def test_autoscaler_adds_cluster_yaml_gpu_nodes_for_waiting_trials_and_removes_them_idle(autoscaling_cluster,
                                                                                          tmp_path):
    """`fer-tune run --address` on cluster.yaml's own node types, scaled by Ray's autoscaler.

    The head has what cluster.yaml's has, CPU: 0 (nothing the search runs there asks for a CPU:
    the driver is no Ray worker; trial functions, Train controllers and their report queues ask
    for 0), and no GPU node exists at the start: two trials of one GPU each wait, the autoscaler
    adds GPU worker nodes of cluster.yaml's types, the trials train there, and once idle for the
    idle timeout the nodes are removed. This machine has no CUDA: the search runs as
    `ray job submit --runtime-env-json` would run it, with a worker setup hook
    (`autoscaling_cluster.emulate_gpus`) under which a worker that holds a GPU trains on the CPU.
    """
    cluster = autoscaling_cluster
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu_types = {n: t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]}
    # the autoscaler got cluster.yaml's node types, resources, limits (only the idle timeout is shorter)
    config = json.loads((cluster.root / "autoscaling.json").read_text())
    fake = config["available_node_types"]
    assert set(fake) == set(gpu_types) | {"ray.head.default"}
    assert fake["ray.head.default"]["resources"] == raw["available_node_types"][raw["head_node_type"]]["resources"]
    for name, node_type in gpu_types.items():
        resources = {k: v for k, v in fake[name]["resources"].items() if k != "object_store_memory"}
        assert resources == node_type["resources"] and resources["GPU"] >= 1
        assert (fake[name]["min_workers"], fake[name]["max_workers"]) == (node_type["min_workers"],
                                                                         node_type["max_workers"])
    assert (config["max_workers"], config["upscaling_speed"]) == (raw["max_workers"], raw["upscaling_speed"])
    assert config["idle_timeout_minutes"] == IDLE_TIMEOUT_MINUTES
    before = cluster.nodes()
    assert list(before) == [cluster.head] and before[cluster.head]["resources"] == {}  # CPU: 0, no GPU

    spec = write_spec(tmp_path / "autoscale.yaml", name="autoscale",
                      resources={"use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 1},
                      search={"num_samples": 2, "max_concurrent_trials": 2, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    # What `ray job submit --runtime-env-json '{...}' -- fer-tune run ...` hands its entrypoint
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    job = {"runtime_env": {"worker_process_setup_hook": "autoscaling_cluster.emulate_gpus",
                           "env_vars": {"PYTHONPATH": path}}}
    started = time.time()
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "fer_tune.cli", "run", str(spec), "--out", str(out),
                                   "--address", cluster.address],
                                  env={**cluster.env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)},
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            code = driver.wait(timeout=420)
        except subprocess.TimeoutExpired:
            code = "timed out"
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    ended = time.time()
    driver_log = (tmp_path / "driver.log").read_text()
    monitor_log = cluster.root / "ray" / "session_latest" / "logs" / "monitor.log"
    assert code == 0, driver_log[-4000:] + "\n--- monitor.log\n" + monitor_log.read_text()[-3000:]
    assert "trials wait for nodes to join" in driver_log  # the search began with no GPU in the cluster

    # 1. worker nodes of cluster.yaml's GPU types were added once the trials asked for GPUs
    nodes = cluster.nodes()
    workers = {node_id: n for node_id, n in nodes.items() if node_id != cluster.head}
    assert workers and all(n["type"] in gpu_types and started < n["added"] < ended for n in workers.values()), nodes
    # 2. every trial completed on them, each holding one of their GPUs (in Ray's accounting)
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert len(trials) == 2 and trials["stop_reason"].tolist() == ["completed", "completed"]
    used = {node for ranks in trials["worker_nodes"] for node in ranks.split(",")}
    assert used and used <= set(workers), (used, nodes)
    assert all(workers[node]["gpus_held"] >= 1 for node in used), nodes
    last_report = {}
    for progress in (out / "tune").glob("trial_*/progress.csv"):
        history = pd.read_csv(progress)
        assert history["epoch"].tolist() == [1, 2]
        node = history["worker_nodes"].iloc[-1]
        last_report[node] = max(last_report.get(node, 0), history["reported_at"].max())
    assert set(last_report) == used
    # 3. the autoscaler removes every worker node once it has been idle for the idle timeout
    idle_s = IDLE_TIMEOUT_MINUTES * 60
    # seconds, usually; Train's request for its workers' resources (request_resources, through
    # Ray's AutoscalingCoordinator) keeps nodes until its controller cancels it, or 180 s at most
    deadline = time.monotonic() + idle_s + 240
    while any(n["removed"] is None for n in workers.values()) and time.monotonic() < deadline:
        time.sleep(1)
        workers = {node_id: n for node_id, n in cluster.nodes().items() if node_id != cluster.head}
    assert all(n["removed"] is not None for n in workers.values()), workers
    assert all(workers[node]["removed"] >= last_report[node] + idle_s - 1 for node in used), (workers, last_report)
    events = [line.split(":event_summary:")[1] for line in monitor_log.read_text().splitlines()
              if ":event_summary:" in line]
    assert any(e.startswith("Adding") for e in events) and any(e.startswith("Removing") for e in events), events
    assert all(e.endswith("(idle).") for e in events if e.startswith("Removing")), events
    spans = ", ".join(f"{n['type']} +{n['added'] - started:.0f}..+{n['removed'] - started:.0f} s"
                      for n in workers.values())
    print(f"\nautoscaling search: {ended - started:.0f} s; nodes (from the search's start) {spans}; {'; '.join(events)}")
