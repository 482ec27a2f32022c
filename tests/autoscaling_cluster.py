"""cluster.yaml's node types on Ray's fake multi-node provider: an autoscaling cluster on one machine.

Run as a script in its own process (`python tests/autoscaling_cluster.py SETTINGS_JSON`), so that
the cluster's Ray state never mixes with the test process's own. It builds Ray's own test
harness for the autoscaler, `ray.cluster_utils.AutoscalingCluster`, from the repository's
cluster.yaml: its worker node types with their resources (GPUs included), min/max_workers, the
cluster's max_workers and upscaling_speed, and the head's resources (CPU: 0). The autoscaler
(v1, Ray 2.60's default) adds a worker node of those types when a task or placement group waits
for what no node has, as `ray up cluster.yaml` would on AWS, only each "instance" is a raylet on
this machine, and removes it after the idle timeout. Token authentication stays on.

It prints one JSON line `{"address": GCS_ADDRESS, "dashboard": URL, "head": NODE_ID}`, then
answers each `nodes` line on its stdin with one JSON line: every node seen so far, `{NODE_ID:
{"type", "resources", "added", "removed", "gpus_held"}}` (times are time.time(), removed null while
alive; gpus_held: the most of its GPUs that Ray had given out at once). Its autoscaler's config is
ROOT/autoscaling.json, its log ROOT/ray/session_latest/logs/monitor.log. End of input shuts the
cluster down.

Ray's own `AutoscalingCluster.start()` and `.shutdown()` run `ray stop --force`, which kills every
Ray on the machine; `LocalAutoscalingCluster` starts and stops only its own processes. Its base
config is built here: the wheel lacks the fake provider's example.yaml that the original reads.

`emulate_gpus` is a Ray worker setup hook for the search run on it (see `tests/test_cluster.py`):
this machine has no CUDA, so trials that hold a declared GPU train on the CPU.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ray.cluster_utils import AutoscalingCluster


def emulate_gpus() -> None:
    """Ray worker setup hook (runtime_env `worker_process_setup_hook`): on a machine without CUDA,
    a worker that holds GPUs in Ray's accounting trains on the CPU.

    Ray Train would give it a cuda device (`ray.train.torch.get_device`) and an NCCL process group
    (TorchTrainer's choice for `use_gpu`), both of which fail without a GPU. Here Train's device
    manager for GPUs is its CPU one and an NCCL process group is a gloo one; everything else (the
    product's trial, Train worker and training loop) runs as on a real GPU node.
    """
    import torch

    if torch.cuda.is_available():
        return
    import torch.distributed as dist
    import ray.air._internal.device_manager as managers
    from ray.air._internal.device_manager.cpu import CPUTorchDeviceManager

    managers.SUPPORTED_ACCELERATOR_TORCH_DEVICE_MANAGER["GPU"] = CPUTorchDeviceManager
    init_process_group = dist.init_process_group

    def gloo_for_nccl(*args, backend=None, **kwargs):
        return init_process_group(*args, backend="gloo" if backend == "nccl" else backend, **kwargs)

    dist.init_process_group = gloo_for_nccl


def fake_node_types(cluster_yaml: dict, object_store_memory: int) -> tuple[dict, dict]:
    """(head resources, worker node types) of the fake provider, from cluster.yaml's own.

    CPU and GPU counts, min_workers and max_workers are the file's, not scaled down: the autoscaler
    then faces the same choice between node types as on AWS, and logical CPUs start no processes
    (a fake node is a raylet and its two agents whatever it declares; Ray starts workers for what
    runs there, here one per trial). node_config (the EC2 instance) means nothing to the fake
    provider; each node's object store is given a small size instead of 30 % of the machine's memory.
    """
    types = cluster_yaml["available_node_types"]
    head = dict(types[cluster_yaml["head_node_type"]].get("resources", {}))
    workers = {}
    for name, node_type in types.items():
        if name == cluster_yaml["head_node_type"]:
            continue
        workers[name] = {"resources": {**node_type["resources"], "object_store_memory": object_store_memory},
                         "node_config": {}, "min_workers": node_type.get("min_workers", 0),
                         "max_workers": node_type["max_workers"]}
    return head, workers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalAutoscalingCluster(AutoscalingCluster):
    """`ray.cluster_utils.AutoscalingCluster` that starts and stops only its own processes, on
    ports and a temp dir (RAY_TMPDIR) of its own; see the module docstring."""

    def __init__(self, head_resources: dict, worker_node_types: dict, root: Path, object_store_memory: int,
                 **config_kwargs):
        self.root = root
        self.object_store_memory = object_store_memory
        self.ip = _node_ip()
        self.port = _free_port()
        self.address = f"{self.ip}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        super().__init__(head_resources, worker_node_types, **config_kwargs)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        # What Ray's fake_multi_node/example.yaml says (absent from the 2.60 wheel), with the
        # worker types given; gcs_address: this cluster, not whatever listens on port 6379.
        assert not autoscaler_v2, "autoscaler v1 only: Ray 2.60's default for a cluster it launches"
        config = {
            "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address,
                         # else a launch of n nodes starts one (as AutoscalingCluster(autoscaler_v2=True) sets)
                         "launch_multiple": True},
            # the fake provider knows its head by this type name only
            "head_node_type": "ray.head.default",
            "available_node_types": {**copy.deepcopy(worker_node_types),
                                     "ray.head.default": {"resources": head_resources, "node_config": {},
                                                          "max_workers": 0}},
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None):
        """Ray's start(), less its `ray stop --force`."""
        config_file = self.root / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = ["ray", "start", "--head", f"--autoscaling-config={config_file}", f"--port={self.port}",
               f"--node-ip-address={self.ip}", f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}",
               f"--object-store-memory={self.object_store_memory}", "--disable-usage-stats",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard.rpartition(':')[2]}",
               # Ray's fixed default ports may be taken by other Rays on this machine
               f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}"]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1",
                   RAY_API_SERVER_ADDRESS=self.dashboard, **(override_env or {}))
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)

    def shutdown(self):
        """Ray's shutdown(), less its `ray stop --force`: this process's descendants only.

        This process is their subreaper (`_become_subreaper`): `ray start` exits, leaving the head's
        processes, and the worker nodes' raylets, which the fake provider starts in the
        autoscaler's process, would be orphaned when the autoscaler exits.
        """
        _stop_descendants()


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def _become_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _stop_descendants(grace_s: float = 3.0) -> None:
    """SIGTERM every process below this one, then SIGKILL what is left after `grace_s` (the GCS
    and the autoscaler were seen to outlast 15 s). psutil checks that a pid is still the process
    it found (not a reused pid) before signalling it."""
    import psutil  # Ray's vendored copy, importable once ray is

    def alive() -> list:
        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    termed: set = set()
    started = time.monotonic()
    while (procs := alive()) and time.monotonic() - started < grace_s + 30:
        for proc in procs:
            try:
                if proc.pid not in termed:
                    termed.add(proc.pid)
                    proc.terminate()
                elif time.monotonic() - started > grace_s:
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
        _reap()
    _reap()


def _reap() -> None:
    """Collect the exit status of every ended child (orphans reparented here included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class NodeLog:
    """Every node the cluster has had: its type (told by its resources), when it joined and left,
    and the most GPUs it had in use at once (Ray's accounting: what tasks and placement groups hold)."""

    def __init__(self, types: dict):
        self.types = types
        self.nodes: dict = {}
        self.lock = threading.Lock()

    def type_of(self, resources: dict) -> str:
        for name, node_type in self.types.items():
            if all(resources.get(k, 0) == v for k, v in node_type["resources"].items() if k in ("CPU", "GPU")):
                return name
        return "head" if not resources.get("GPU") else "?"

    def poll(self) -> None:
        import ray
        from ray._private.state import available_resources_per_node

        now = time.time()
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        free = available_resources_per_node()
        with self.lock:
            for node_id, node in alive.items():
                resources = {k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU")}
                entry = self.nodes.setdefault(node_id, {"type": self.type_of(resources), "resources": resources,
                                                        "added": now, "removed": None, "gpus_held": 0.0})
                if node_id in free:
                    held = resources.get("GPU", 0) - free[node_id].get("GPU", 0)
                    entry["gpus_held"] = max(entry["gpus_held"], held)
            for node_id, entry in self.nodes.items():
                if entry["removed"] is None and node_id not in alive:
                    entry["removed"] = now

    def snapshot(self) -> dict:
        with self.lock:
            return copy.deepcopy(self.nodes)


def main(settings: dict) -> None:
    import ray

    # Replies go to the original stdout; anything else printed there (Ray prints the autoscaler's
    # events to a driver's stdout) goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _become_subreaper()
    cluster_yaml = yaml.safe_load(Path(settings["cluster_yaml"]).read_text())
    store = 200 * 2**20
    head, workers = fake_node_types(cluster_yaml, store)
    cluster = LocalAutoscalingCluster(
        head, workers, Path(settings["root"]), store, cluster_name=cluster_yaml["cluster_name"],
        max_workers=cluster_yaml["max_workers"], upscaling_speed=cluster_yaml["upscaling_speed"],
        idle_timeout_minutes=settings["idle_timeout_minutes"])  # 10 on AWS; seconds here, where a test waits
    try:
        cluster.start()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        log = NodeLog(workers)
        log.poll()
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                try:
                    log.poll()
                except Exception as err:  # noqa: BLE001 - a GCS hiccup on a busy machine: poll again
                    print(f"poll failed: {err!r}", file=sys.stderr, flush=True)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        print(json.dumps({"address": cluster.address, "dashboard": cluster.dashboard,
                          "head": ray.get_runtime_context().get_node_id()}), file=replies, flush=True)
        for line in sys.stdin:
            if line.strip() == "nodes":
                print(json.dumps(log.snapshot()), file=replies, flush=True)
        stop.set()
        watcher.join(timeout=5)
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the cluster
    main(json.loads(sys.argv[1]))
