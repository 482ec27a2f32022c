"""Where a search runs: joining or starting Ray, what fits on it, and where checkpoints go."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

from fer_tune.errors import UserError, one_line
from fer_tune.spec import Spec

ANNOUNCED_BY_US = "FER_TUNE_RAY_API_SERVER_ADDRESS"
"""The environment variable that holds the RAY_API_SERVER_ADDRESS fer-tune set (see `local_dashboard`)."""


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
        raise UserError(f"{given} {address}: {str(err).strip().splitlines()[0]}") from None  # Ray's first line says it
    return joined


@contextlib.contextmanager
def ctrl_c_reaches_only_the_driver(started_here: bool):
    """Start Ray's processes with SIGINT ignored (inherited by every worker they spawn).

    A terminal's Ctrl-C goes to its whole process group, which includes the Ray this search
    starts: trial workers killed by it would leave their Train runs half-ended, and a resumed
    trial might not continue. The driver alone handles Ctrl-C (see `fer_tune.search.run.ctrl_c_stops_gracefully`).
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
    RAY_API_SERVER_ADDRESS, inherited by the raylet and so by every worker, names ours; beside it,
    `ANNOUNCED_BY_US` records that fer-tune set it, so the next Ray this process starts (another
    search, a test) announces its own port while a value the user set is left alone.
    """
    import socket

    ours = os.environ.get(ANNOUNCED_BY_US, "")
    if os.environ.get("RAY_API_SERVER_ADDRESS", ours) != ours:
        return {}  # the user's own setting
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[ANNOUNCED_BY_US] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port}


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


def driver_node_resource() -> str:
    """A resource that only the driver's node has: the head's own, else the node's address."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    head = "node:__internal_head__"
    return head if head in node["Resources"] else f"node:{node['NodeManagerAddress']}"


def train_storage(spec: Spec, out: Path) -> str:
    """Where the trials' Ray Train runs (checkpoints) go: DIR/train, or under search.storage.

    Tune's own experiment (DIR/tune, the searcher state, TensorBoard) stays on the driver: its
    trial functions run there too (see `fer_tune.search.run.run_search`).
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
        reason = one_line(err)
        hint = "check the URI and this machine's cloud credentials" if "://" in location else "choose another path"
        raise UserError(f"search.storage: cannot write to {location} ({reason}); {hint}") from None


def note_multi_node_storage(location: str) -> None:
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1 and "://" not in location:
        print(f"note: {nodes} Ray nodes: trial checkpoints go to {location} on the node of each trial's "
              f"first worker; unless that is a shared filesystem, set --storage s3://... or gs://...")


def placement(spec: Spec, joined: bool = False) -> tuple[bool, int]:
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
    need_gpu = res.workers_per_trial * res.gpus_per_worker if use_gpu else 0.0
    have = f"{cpus:g} CPU" + (f", {gpus:g} GPU" if use_gpu else "")
    worker = f"{res.cpus_per_worker:g} CPU" + (f" + {res.gpus_per_worker:g} GPU" if use_gpu else "")
    if use_gpu and gpus <= 0 and not joined:
        raise UserError("resources.use_gpu: true but the Ray cluster has no GPU; use auto or false")
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        if not joined:
            raise UserError(f"resources.workers_per_trial: {res.workers_per_trial} workers x {worker} can never be "
                            f"placed on this cluster ({have}); lower workers_per_trial, cpus_per_worker or "
                            f"gpus_per_worker")
        print(f"note: the cluster has {have} now and a trial needs {res.workers_per_trial} x ({worker}): trials "
              f"wait for nodes to join")
    fit = int(cpus / need_cpu + 1e-9)
    if use_gpu:
        share = res.gpus_per_worker
        # a share never spans two GPUs: 0.7 of a GPU fits once on each, 0.25 four times
        per_gpu = int(1 / share + 1e-9) if share < 1 else 0
        fit = min(fit, int(gpus + 1e-9) * per_gpu if share < 1 else int(gpus / need_gpu + 1e-9))
    limit = spec.search.max_concurrent_trials
    if joined and limit:
        return use_gpu, limit
    return use_gpu, max(1, min(fit, limit) if limit else fit)
