"""Trials sharing GPUs, on a Ray told it has GPUs (this machine has none): run as a script in its
own process (`python tests/gpu_share.py OUT_JSON`), so its Ray never mixes with the test's.

Four trials of `resources.gpus_per_worker: 0.5` on 2 declared GPUs, held as a real search holds
them (`trial_holds`, `placement`); each records when it ran and what Ray assigned it.
"""

import json
import sys
import time

import ray
from ray import tune

from fer_tune.search.cluster import placement
from fer_tune.search.trial import scaling_config, trial_holds
from fer_tune.spec import validate_spec


def main(out: str) -> None:
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    spec = validate_spec({"resources": {"cpus_per_worker": 0.5, "gpus_per_worker": 0.5, "use_gpu": True}})
    use_gpu, concurrency = placement(spec)

    def trial(config: dict) -> None:
        started = time.time()
        time.sleep(4)
        tune.report({"started": started, "ended": time.time(), "gpu_ids": ray.get_gpu_ids(),
                     "gpus": ray.get_runtime_context().get_assigned_resources().get("GPU", 0)})

    tuner = tune.Tuner(tune.with_resources(trial, trial_holds(spec.resources, use_gpu, True, "unused")),
                       param_space={"i": tune.grid_search([0, 1, 2, 3])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                       run_config=tune.RunConfig(storage_path=f"{out}.tune", verbose=0))
    results = [r.metrics for r in tuner.fit()]
    trainer = scaling_config(spec.resources, use_gpu).resources_per_worker
    with open(out, "w") as f:
        json.dump({"use_gpu": use_gpu, "concurrency": concurrency, "trainer_worker": trainer,
                   "trials": [{k: r[k] for k in ("started", "ended", "gpu_ids", "gpus")} for r in results]}, f)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
