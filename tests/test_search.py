"""`fer-tune run` end to end on a real local Ray cluster (tiny trials, CPU)."""

import json
import os
import math

import optuna
import pandas as pd
import pytest
import torch

from fer_tune.cli import main
from fer_tune.search import param_name, SpaceSampler
from fer_tune.spec import load_spec

from conftest import write_spec

SPACE = {
    "model.backbone": {"choice": ["resnet10t", "mobilenetv3_small_050"]},
    "train.lr": [{"loguniform": [1.0e-3, 1.0e-2], "when": {"model.backbone": "resnet10t"}},
                 {"loguniform": [3.0e-3, 3.0e-2], "when": {"model.backbone": "mobilenetv3_small_050"}}],
    "model.dropout": {"uniform": [0.0, 0.4]},
}


def test_conditional_space_samples_only_matching_entries(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", space=SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampler = SpaceSampler(spec)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        sampler(trial)
        backbone = trial.params["model.backbone"]
        lr_params = [k for k in trial.params if k.startswith("train.lr")]
        assert lr_params == [f"train.lr[model.backbone={backbone}]"]
        low, high = (1e-3, 1e-2) if backbone == "resnet10t" else (3e-3, 3e-2)
        assert low <= trial.params[lr_params[0]] <= high
        seen.add(backbone)
        study.tell(trial, 0.0)
    assert seen == {"resnet10t", "mobilenetv3_small_050"}


# SGD at lr 1e8 diverges at once: the search must record that trial as errored and go on.
SEARCH_SPACE = {
    "model.backbone": {"choice": ["resnet10t", "mobilenetv3_small_050"]},
    "train.optimizer": {"choice": ["adamw", "sgd"]},
    "train.lr": [{"loguniform": [1.0e-3, 1.0e-2], "when": {"train.optimizer": "adamw"}},
                 {"loguniform": [1.0e+8, 1.0e+9], "when": {"train.optimizer": "sgd"}}],
    "model.dropout": {"uniform": [0.0, 0.4]},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One tiny search shared by the checks below (Ray start-up is the expensive part).

    With TPE seed 2 the four trials are three AdamW ones (both backbones) and one diverging SGD one.
    """
    tmp = tmp_path_factory.mktemp("search")
    spec = write_spec(tmp / "search.yaml", space=SEARCH_SPACE,
                      train={"epochs": 3, "batch_size": 32, "warmup_epochs": 0},
                      search={"num_samples": 4, "searcher": {"type": "optuna", "seed": 2},
                              "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}})
    out = tmp / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    return spec, out


def test_search_outcome(searched):
    spec, out = searched
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert len(trials) == 4
    assert {"model.backbone", "train.optimizer", "train.lr", "model.dropout", "epochs",
            "best_objective"} <= set(trials.columns)
    errored = trials[trials["stop_reason"] == "errored"]
    assert errored["train.optimizer"].tolist() == ["sgd"]
    assert "became nan" in errored["error"].iloc[0]
    healthy = trials[trials["stop_reason"] != "errored"]
    assert (healthy["stop_reason"] == "stopped by ASHA").sum() >= 1
    assert set(healthy["stop_reason"]) <= {"completed", "stopped by ASHA"}

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 4
    assert all(t.state.is_finished() for t in study.trials)
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials) == 1

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["expression"]) == {"accuracy", "f1_macro", "kappa", "auc_roc", "auc_pr"}
    assert metrics["trials"] == 4 and metrics["best_trial"] in set(trials["trial_id"])
    best = load_spec(out / "best" / "config.yaml")
    assert best.space == {}
    assert torch.load(out / "best" / "model.pt", weights_only=True)["labels"] == list(range(8))


def test_exported_config_reproduces_the_best_trial(searched, tmp_path):
    _, out = searched
    trials = pd.read_csv(out / "report" / "trials.csv")
    best = trials.loc[trials["best_objective"].idxmax()]
    assert main(["train", str(out / "best" / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report" / "metrics.json").read_text())
    assert again["best_epoch"] == best["best_epoch"]
    assert again["val"]["expression_f1"] == pytest.approx(best["val_expression_f1"], abs=1e-6)
    assert again["val"]["valence_ccc"] == pytest.approx(best["val_valence_ccc"], abs=1e-5)


def test_test_split_untouched_until_final_evaluation(searched):
    _, out = searched
    test_cache = [p for p in (out / "cache").glob("test_*px_*.npy") if ".kept" not in p.name]
    assert len(test_cache) == 1
    trial_files = [p for p in (out / "train").rglob("*") if p.is_file()]
    assert trial_files
    # the test images were decoded (first read) only after every trial had written its last file
    assert test_cache[0].stat().st_mtime >= max(p.stat().st_mtime for p in trial_files)


def test_two_workers_run_ddp_and_report_metrics_of_the_whole_val_split(tmp_path):
    from fer_tune.data.prepare import open_prepared
    from fer_tune.evaluate import predict
    from fer_tune.metrics import compute_metrics, flat_metrics
    from fer_tune.model import create_model

    spec_file = write_spec(tmp_path / "ddp.yaml", name="ddp", train={"epochs": 1, "batch_size": 32},
                           resources={"workers_per_trial": 2, "cpus_per_worker": 1, "use_gpu": False},
                           search={"num_samples": 1, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    assert main(["run", str(spec_file), "--out", str(out)]) == 0
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert trials["stop_reason"].tolist() == ["completed"]
    state = torch.load(f"{trials['checkpoint'][0]}/checkpoint.pt", weights_only=True)
    assert state["spec"]["resources"]["workers_per_trial"] == 2

    spec = load_spec(spec_file)
    prepared = open_prepared(spec.data, out)
    val = prepared.load("val", progress=False)
    model = create_model(spec.model)
    model.load_state_dict(state["best_model"])
    local = flat_metrics(compute_metrics(val.targets(), predict(model, val, torch.device("cpu")),
                                         labels=prepared.labels))
    reported = trials.iloc[0]
    # every rank evaluated a shard; the reported numbers are those of the whole split
    assert reported["val_expression_accuracy"] == pytest.approx(local["expression_accuracy"], abs=1e-6)
    assert reported["val_valence_ccc"] == pytest.approx(local["valence_ccc"], abs=1e-4)


def test_killed_driver_resumes_and_keeps_finished_trials(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path / "resume.yaml", name="resume", space={"model.dropout": {"uniform": [0.0, 0.4]}},
                      train={"epochs": 2, "batch_size": 32},
                      search={"num_samples": 3, "max_concurrent_trials": 1, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "fer_tune.cli", "run", str(spec), "--out", str(out)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    storage = f"sqlite:///{out / 'optuna.db'}"
    deadline = time.time() + 400
    finished = []
    while time.time() < deadline and first.poll() is None:
        time.sleep(2)
        try:
            study = optuna.load_study(study_name="resume", storage=storage)
        except Exception:
            continue
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if finished:
            break
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    assert finished, "no trial finished in time"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, like a crash
    first.wait()
    done_before = {t.params["model.dropout"] for t in finished}
    checkpoints_before = {p for p in (out / "train").rglob("checkpoint.pt")}

    assert main(["run", str(spec), "--out", str(out), "--resume"]) == 0
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert len(trials) == 3
    assert done_before <= set(trials["model.dropout"])
    assert checkpoints_before <= {p for p in (out / "train").rglob("checkpoint.pt")}
    study = optuna.load_study(study_name="resume", storage=storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 3


def test_killed_train_worker_resumes_from_its_last_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path / "worker.yaml", name="worker", train={"epochs": 8, "batch_size": 16},
                      data={"synthetic": {"n": 400, "identities": 40}},
                      search={"num_samples": 1, "max_failures": 2, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen([sys.executable, "-m", "fer_tune.cli", "run", str(spec), "--out", str(out)],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None and killed is None:
        time.sleep(0.5)
        # once Tune has an epoch's result, its checkpoint is registered (a checkpoint folder alone
        # may still be uploading, and a restart would then rightly start from scratch)
        progress = list((out / "tune").glob("trial_*/progress.csv"))
        if progress and progress[0].stat().st_size and len(pd.read_csv(progress[0])) >= 1:
            pids = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                killed = int(pids[0])
                os.kill(killed, signal.SIGKILL)  # the training process dies mid-trial
    assert killed, (tmp_path / "run.log").read_text()[-3000:]
    assert run.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]

    history = pd.read_csv(next((out / "tune").glob("trial_*/progress.csv")))
    epochs = history["epoch"].tolist()
    assert epochs == sorted(epochs) and epochs[-1] == 8  # no epoch trained twice from scratch
    assert history["resumed_from_epoch"].max() >= 1  # the restarted worker loaded a checkpoint
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert trials["stop_reason"].tolist() == ["completed"]
