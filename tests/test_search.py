"""`fer-tune run` end to end on a real local Ray cluster (tiny trials, CPU)."""

import contextlib
import io
import json
import os
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from fer_tune.cli import main
from fer_tune.search.space import SpaceSampler
from fer_tune.specfile import load_spec

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


def test_tpe_models_after_its_startup_trials_and_a_search_too_short_for_it_is_told(tmp_path, capsys):
    import optuna

    from fer_tune.search.space import make_sampler

    def draws(space=True, **searcher) -> list[float]:
        spec = load_spec(write_spec(tmp_path / "s.yaml", search={"num_samples": 8, "searcher": searcher,
                                                                 "start_from_spec": False},
                                    space={"model.dropout": {"uniform": [0.0, 0.5]}} if space else {}))
        study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
        for _ in range(6):
            trial = study.ask()
            study.tell(trial, trial.suggest_float("x", 0.0, 1.0))
        return [t.params["x"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    default, late = draws(seed=3), draws(seed=3, startup_trials=8)
    assert "TPE draws its first 8 trials at random, so this search's 8 are all random draws" in capsys.readouterr().out
    assert late[:2] == default[:2]  # the same seeded random start
    assert late[2:] != default[2:]  # then TPE after a quarter of the 8 trials, where 8 still draws at random
    draws(seed=3, startup_trials=7), draws(type="random"), draws(space=False)  # nothing to sample: nothing to say
    assert "TPE draws" not in capsys.readouterr().out


def test_tpe_starts_with_a_quarter_of_the_search_at_random_between_2_and_optunas_own_10():
    import inspect

    import optuna

    from fer_tune.spec import DEFAULT_MAX_STARTUP, SearcherSpec

    assert DEFAULT_MAX_STARTUP == inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default
    assert [SearcherSpec().startup(n) for n in (1, 8, 16, 24, 40, 200)] == [2, 2, 4, 6, 10, 10]
    # the recipes a search starts from are trials to Optuna: the random draws come on top of them
    assert [SearcherSpec().startup(n, known_recipes=k) for n, k in ((8, 1), (16, 1), (16, 3), (200, 2))] == [
        3, 4, 6, 12]
    assert SearcherSpec(startup_trials=12).startup(16, known_recipes=1) == 12


def test_the_default_start_up_counts_the_recipes_the_search_starts_from(tmp_path):
    from fer_tune.search.space import make_sampler

    def startup(**search) -> int:
        space = {"model.dropout": {"uniform": [0.0, 0.5]}}
        return make_sampler(load_spec(write_spec(tmp_path / "s.yaml", search={"num_samples": 16, **search},
                                                 space=space)))._n_startup_trials

    assert startup(start_from_spec=False) == 4
    assert startup() == 1 + 3  # the spec's own recipe, then a quarter of the 15 other trials at random
    assert startup(points=[{"model.dropout": 0.3}, {"model.dropout": 0.4}]) == 3 + 3


def test_a_new_search_says_how_many_trials_tpe_chooses(tmp_path, capsys):
    from fer_tune.search.run import make_searcher

    spec = load_spec(write_spec(tmp_path / "s.yaml", search={"num_samples": 16},
                                space={"model.dropout": {"uniform": [0.0, 0.5]}}))
    make_searcher(spec, tmp_path)
    assert "searcher: TPE chooses trials 5-16 after 4 start-up trials (1 known recipe(s), 3 random draws)" in (
        capsys.readouterr().out)


def test_one_worker_trials_train_in_their_tune_process_only_on_a_ray_fer_tune_starts(tmp_path):
    from fer_tune.search.trial import trains_in_trial

    def spec(**sections):
        return load_spec(write_spec(tmp_path / "s.yaml", **sections))

    assert trains_in_trial(spec(), joined=False)
    assert not trains_in_trial(spec(), joined=True)  # a cluster's checkpoints belong in search.storage
    assert not trains_in_trial(spec(resources={"workers_per_trial": 2}), joined=False)  # DDP
    assert not trains_in_trial(spec(search={"storage": str(tmp_path / "ckpt")}), joined=False)
    assert not trains_in_trial(spec(resources={"trainer": "torch_trainer"}), joined=False)
    assert trains_in_trial(spec(resources={"trainer": "in_trial"}), joined=True)


def test_asha_brackets_let_later_ones_compare_trials_later(tmp_path):
    from ray.tune.schedulers import FIFOScheduler

    from fer_tune.search.run import make_scheduler

    def first_rungs(**scheduler) -> list[int]:
        spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 20},
                                    search={"scheduler": {"grace_period": 2, **scheduler}}))
        return [int(bracket._rungs[-1][0]) for bracket in make_scheduler(spec, tmp_path)._brackets]

    assert first_rungs() == [2]
    assert first_rungs(brackets=3) == [2, 6, 18]  # grace x 3^k, within the 20-epoch cap
    assert first_rungs(brackets=2, reduction_factor=2) == [2, 4]
    none = load_spec(write_spec(tmp_path / "n.yaml", search={"scheduler": {"type": "none"}}))
    assert isinstance(make_scheduler(none, tmp_path), FIFOScheduler)


def test_a_resumed_search_keeps_ashas_rungs_and_stops_a_trial_that_is_below_them(tmp_path):
    """Tune brings a resumed search's scheduler back from tune/tuner.pkl, pickled when the search
    began (with empty rungs); ASHA's rungs must come back as they were when the search stopped.
    Tune's own restore runs here (no Ray cluster is needed to create and restore a Tuner)."""
    from types import SimpleNamespace

    from ray import tune
    from ray.tune.schedulers import TrialScheduler

    from fer_tune.search.run import make_scheduler

    spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 9},
                                search={"scheduler": {"grace_period": 1, "reduction_factor": 3, "brackets": 2}}))

    def begin():
        scheduler = make_scheduler(spec, tmp_path)
        tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(metric="best_objective", mode="max",
                                                                    scheduler=scheduler, num_samples=5),
                   run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path)))  # writes tuner.pkl
        scheduler.set_search_properties("best_objective", "max")  # as Tune does when the search starts
        return scheduler

    def resume():
        tuner = tune.Tuner.restore(str(tmp_path / "tune"), trainable=lambda config: None)
        scheduler = tuner._local_tuner._tune_config.scheduler
        scheduler.set_search_properties("best_objective", "max")
        return scheduler

    def result(scheduler, trial, epoch, objective):
        return scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "best_objective": objective})

    scheduler = begin()
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(5)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    for i, trial in enumerate(trials[:4]):  # four trials report their first epochs, each better than the last
        for epoch in (1, 2, 3):
            result(scheduler, trial, epoch, 0.3 + 0.1 * i + 0.01 * epoch)
    brackets = {t.trial_id: scheduler._brackets.index(scheduler._trial_info[t.trial_id]) for t in trials}

    resumed = resume()
    assert resumed is not scheduler and [b._rungs for b in resumed._brackets] == [b._rungs for b in scheduler._brackets]
    assert any(recorded for b in resumed._brackets for _, recorded in b._rungs)
    for trial in trials:  # Tune adds the restored trials again; each keeps its bracket
        resumed.on_trial_add(None, trial)
    assert {t.trial_id: resumed._brackets.index(resumed._trial_info[t.trial_id]) for t in trials} == brackets
    weak = trials[4]  # the worst at its first milestone: stopped against the rungs kept
    milestone = int(min(m for m, _ in resumed._trial_info[weak.trial_id]._rungs))
    assert result(resumed, weak, milestone, 0.01) == TrialScheduler.STOP

    (tmp_path / "asha.json").write_text("{not json")  # an unreadable record: empty rungs, as Tune's own ASHA
    assert not any(recorded for b in resume()._brackets for _, recorded in b._rungs)
    begin()  # a new search in the same folder starts with empty rungs, whatever an earlier one left
    assert not any(recorded for b in resume()._brackets for _, recorded in b._rungs)


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

    With TPE seed 2 and all four trials in its start-up (the spec's recipe, then three random
    draws), they are three AdamW ones (both backbones) and one diverging SGD one.
    """
    tmp = tmp_path_factory.mktemp("search")
    spec = write_spec(tmp / "search.yaml", space=SEARCH_SPACE,
                      train={"epochs": 3, "batch_size": 32, "warmup_epochs": 0},
                      search={"num_samples": 4, "finalists": 2,
                              "searcher": {"type": "optuna", "seed": 2, "startup_trials": 4},
                              "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}})
    out = tmp / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(spec), "--out", str(out)]) == 0
    (tmp / "printed.txt").write_text(printed.getvalue())
    return spec, out


def test_the_rerun_command_a_search_prints_runs(searched):
    """The command the search prints under its result is the one a user copies: it must work, and
    name its own --out (the default, runs/<name>, is the search's folder when run where it ran)."""
    _, out = searched
    hint = next(line for line in (out.parent / "printed.txt").read_text().splitlines() if "(re-run: " in line)
    command = hint.split("(re-run: fer-tune ", 1)[1].rstrip(")").split()
    in_report = (out / "report" / "report.md").read_text().split("Re-run it: `fer-tune ", 1)[1].split("`")[0]
    assert in_report.split() == command  # report.md gives the same command
    header = (out / "best" / "config.yaml").read_text().splitlines()[0]
    assert header.split("`fer-tune ", 1)[1].split("`")[0].split() == command  # and so does the exported config
    again = Path(command[command.index("--out") + 1])
    assert again.resolve() != out.resolve()
    assert main(command) == 0
    assert (again / "best" / "model.pt").is_file()


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
    # the first trial ran the recipe the spec itself states (search.start_from_spec)
    own = trials[trials["recipe"] == "your spec"]
    assert len(own) == 1 and trials["recipe"].astype(object).fillna("").eq("").sum() == 3
    assert own[["model.backbone", "train.optimizer", "train.lr", "model.dropout"]].iloc[0].tolist() == [
        "resnet10t", "adamw", 3e-3, 0.1]
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
    # the finalists (the 2 best trials, and your recipe) ran at full budget with another seed; the
    # winner has the best mean
    finalists = pd.read_csv(out / "report" / "finalists.csv")
    top2 = set(healthy.sort_values("best_objective", ascending=False)["trial_id"].astype(str).head(2))
    expected = top2 | set(own["trial_id"].astype(str))
    assert {f["trial_id"] for f in metrics["finalists"]} == expected
    assert sum(f["winner"] for f in metrics["finalists"]) == 1
    assert all(f["runs"] >= 2 and len(set(f["seeds"])) == f["runs"] for f in metrics["finalists"])
    top = max(metrics["finalists"], key=lambda f: f["mean"])
    assert top["winner"] and metrics["best_trial"] == top["trial_id"]
    assert finalists["winner"].sum() == 1 and set(finalists["trial_id"].astype(str)) >= {
        f["trial_id"] for f in metrics["finalists"]}
    # found vs your recipe, both tested on the same faces after the selection
    comparison = metrics["comparison"]
    assert comparison.get("same") or {"difference", "ci95", "mcnemar", "your_recipe"} <= set(comparison)
    report = (out / "report" / "report.md").read_text()
    assert "## Found recipe vs your recipe" in report and "## Finalists: re-trained at full budget" in report
    assert torch.load(out / "best" / "model.pt", weights_only=True)["labels"] == list(range(8))


def test_exported_config_reproduces_the_best_trial(searched, tmp_path):
    """best/ holds the winning run (a search trial or a finalist's re-run with another seed): its
    config.yaml, seed included, trains the same model again."""
    _, out = searched
    searched_metrics = json.loads((out / "report" / "metrics.json").read_text())
    finalists = pd.read_csv(out / "report" / "finalists.csv")
    winner = finalists[finalists["winner"]].iloc[0]
    assert load_spec(out / "best" / "config.yaml").train.seed == winner["seed"] == searched_metrics["best_seed"]
    assert main(["train", str(out / "best" / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report" / "metrics.json").read_text())
    assert again["best_epoch"] == searched_metrics["best_epoch"]
    assert again["val"]["expression_f1"] == pytest.approx(searched_metrics["val"]["expression_f1"], abs=1e-6)
    assert again["val"]["valence_ccc"] == pytest.approx(searched_metrics["val"]["valence_ccc"], abs=1e-5)
    assert again["expression"]["accuracy"] == pytest.approx(searched_metrics["expression"]["accuracy"], abs=1e-6)


def test_test_split_untouched_until_final_evaluation(searched):
    _, out = searched
    test_cache = [p for p in (out / "cache").glob("test_*px_*.npy") if ".kept" not in p.name]
    assert len(test_cache) == 1
    trial_files = list(out.rglob("checkpoint.pt"))  # each trial's and final run's, wherever kept
    final_runs = json.loads((out / "report" / "metrics.json").read_text())["final_runs"]
    assert final_runs >= 1 and len({p.parent.parent for p in trial_files}) == 4 + final_runs
    # the test images were decoded (first read) only after every trial had written its last file
    assert test_cache[0].stat().st_mtime >= max(p.stat().st_mtime for p in trial_files)


def test_two_workers_run_ddp_and_report_metrics_of_the_whole_val_split(tmp_path):
    from fer_tune.data.prepare import open_prepared
    from fer_tune.engine.evaluate import predict
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


def test_interrupted_and_killed_driver_resume_and_keep_finished_trials(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops cleanly and says
    how to resume; a resumed search then SIGKILLed mid-trial resumes again, the running trial from
    its last checkpoint, and the experiment ends with exactly num_samples trials."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path / "resume.yaml", name="resume", space={"model.dropout": {"uniform": [0.0, 0.4]}},
                      train={"epochs": 8, "batch_size": 32},
                      search={"num_samples": 3, "max_concurrent_trials": 1, "scheduler": {"type": "none"}})
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'optuna.db'}"
    command = [sys.executable, "-m", "fer_tune.cli", "run", str(spec), "--out", str(out)]

    def completed():
        try:
            study = optuna.load_study(study_name="resume", storage=storage)
        except Exception:
            return []
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def running_trial_has_an_epoch(done: int) -> bool:
        """A trial beyond the `done` finished ones has reported (so checkpointed) an epoch, and
        has epochs left to interrupt."""
        rows = [len(pd.read_csv(p)) for p in (out / "tune").glob("trial_*/progress.csv") if p.stat().st_size]
        return sum(1 for n in rows if 0 < n <= 4) >= 1 and len(completed()) >= done

    def start_and_wait(log_name: str, done: int):
        """Start the search; return once `done` trials completed (and, for the first start, a
        running trial has checkpointed an epoch: Ctrl-C must interrupt a trial mid-way)."""
        log = open(tmp_path / log_name, "w")
        process = subprocess.Popen(command + (["--resume"] if done > 1 else []), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        ready = (lambda: running_trial_has_an_epoch(done)) if done == 1 else (lambda: len(completed()) >= done)
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(1)
        assert process.poll() is None, (tmp_path / log_name).read_text()[-2000:]
        return process

    first = start_and_wait("first.log", done=1)
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-2000:]
    said = (tmp_path / "first.log").read_text()
    assert "interrupted" in said and f"--resume --out {out}" in said and "Traceback" not in said
    done_before = {t.params["model.dropout"] for t in completed()}
    assert len(done_before) >= 1

    second = start_and_wait("second.log", done=2)
    os.killpg(second.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, like a crash
    second.wait()
    done_before |= {t.params["model.dropout"] for t in completed()}
    checkpoints_before = set(out.rglob("checkpoint.pt"))

    assert main(["run", str(spec), "--out", str(out), "--resume"]) == 0
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert len(trials) == 3 and set(trials["stop_reason"]) == {"completed"}
    assert done_before <= set(trials["model.dropout"])
    # every trial that had a checkpoint still has one (a resumed trial keeps only its newest)
    trials_with_checkpoints = {p.parent.parent.name for p in checkpoints_before}
    assert trials_with_checkpoints <= {p.parent.parent.name for p in out.rglob("checkpoint.pt")}
    history = pd.read_csv(out / "report" / "history.csv")
    assert history["resumed_from_epoch"].max() >= 1  # a running trial went on from its checkpoint
    assert len(completed()) == 3
    # the spec's own recipe ran once: the resumed searches did not queue it again (the SIGKILL may
    # leave the study an orphan RUNNING trial that Tune never finished; none is left waiting)
    study = optuna.load_study(study_name="resume", storage=storage)
    states = [t.state.name for t in study.trials]
    assert "WAITING" not in states, states
    assert [t.params.get("model.dropout") for t in study.trials].count(0.1) == 1, states
    assert trials["recipe"].astype(object).fillna("").tolist().count("your spec") == 1
    assert trials.loc[trials["recipe"] == "your spec", "model.dropout"].tolist() == [0.1]
    # the report's wall time is that of the Ctrl-C'd piece and the last one (a SIGKILL records nothing)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    pieces = json.loads((out / "wall.json").read_text())["pieces"]
    assert metrics["wall_pieces"] == len(pieces) == 2
    assert metrics["wall_seconds"] == pytest.approx(sum(p["seconds"] for p in pieces), abs=30)
    assert "over 2 pieces (resumed 1 time)" in (out / "report" / "report.md").read_text()


def test_extending_a_search_begun_before_asha_json_rebuilds_its_rungs_from_the_trials_results(tmp_path):
    from fer_tune.search.run import make_scheduler

    spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 9},
                                search={"scheduler": {"grace_period": 1, "reduction_factor": 3}}))
    for trial, objectives in {"a": [0.2, 0.3, 0.35, 0.4], "b": [0.1]}.items():
        folder = tmp_path / "tune" / f"trial_{trial}_0"
        folder.mkdir(parents=True)
        pd.DataFrame({"training_iteration": range(1, len(objectives) + 1), "best_objective": objectives,
                      "trial_id": trial}).to_csv(folder / "progress.csv", index=False)
    scheduler = make_scheduler(spec, tmp_path, earlier=[tmp_path / "tune"])
    assert not any(recorded for _, recorded in scheduler._brackets[0]._rungs)  # the metric is not known yet
    scheduler.set_search_properties("best_objective", "max")  # as Tune does when the search starts
    assert dict((int(m), r) for m, r in scheduler._brackets[0]._rungs) == {
        9: {}, 3: {"a": 0.35}, 1: {"a": 0.2, "b": 0.1}}  # each trial's value where it first reached each milestone
    assert json.loads((tmp_path / "asha.json").read_text())["rungs"][0][1] == [3.0, {"a": 0.35}]


def test_a_moved_or_copied_search_resumes_with_its_own_rungs_and_study_not_the_old_folders(tmp_path):
    import shutil
    from types import SimpleNamespace

    from ray import tune

    from fer_tune.search.run import experiment_folder, make_scheduler, make_searcher

    first, moved = tmp_path / "first", tmp_path / "moved"
    spec = load_spec(write_spec(tmp_path / "s.yaml", name="moving", space={"model.dropout": {"uniform": [0.0, 0.4]}},
                                search={"scheduler": {"grace_period": 1}}))
    scheduler = make_scheduler(spec, first)
    tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(metric="best_objective", mode="max",
                                                                scheduler=scheduler, num_samples=2),
               run_config=tune.RunConfig(name="tune", storage_path=str(first)))
    scheduler.set_search_properties("best_objective", "max")
    scheduler.on_trial_add(None, SimpleNamespace(trial_id="a"))
    scheduler.on_trial_result(None, SimpleNamespace(trial_id="a"), {"training_iteration": 1, "best_objective": 0.5})
    searcher = make_searcher(spec, first)
    searcher.set_search_properties("best_objective", "max", {})
    searcher.save(str(first / "searcher.pkl"))
    shutil.copytree(first, moved)
    (first / "asha.json").unlink()

    with experiment_folder(moved):
        restored = tune.Tuner.restore(str(moved / "tune"), trainable=lambda config: None)
        resumed = restored._local_tuner._tune_config.scheduler
        study = make_searcher(spec, moved)
        study.restore(str(moved / "searcher.pkl"))
    assert resumed._state_file == str(moved / "asha.json") and resumed._brackets[0]._rungs[-1][1] == {"a": 0.5}
    resumed._save()
    assert not (first / "asha.json").exists()  # the old folder is never written to
    assert study._storage.url == f"sqlite:///{moved / 'optuna.db'}"


def test_a_folder_with_an_earlier_searchs_experiments_but_no_tune_folder_is_refused(tmp_path):
    from fer_tune.errors import UserError
    from fer_tune.search.run import search_parts

    spec = load_spec(write_spec(tmp_path / "s.yaml", search={"num_samples": 4}))
    assert search_parts(spec, tmp_path) == [{"name": "tune", "num_samples": 4}]
    (tmp_path / "final_2").mkdir()
    with pytest.raises(UserError, match="holds final_2/ of an earlier search but no tune/"):
        search_parts(spec, tmp_path)


def test_each_final_phase_of_a_search_extended_twice_reuses_the_runs_it_already_has(tmp_path, monkeypatch):
    """Three parts, three final phases: each later phase trains only new (trial, seed) runs, and
    reads every earlier run back as the run it was (Tune numbers a phase's runs by its own list)."""
    from types import SimpleNamespace

    import ray.tune

    from fer_tune.search import finalists
    from fer_tune.search.run import earlier_final_runs, final_dir_name, final_phase_runs
    from fer_tune.spec import validate_spec

    spec = validate_spec({"train": {"seed": 7}, "search": {"num_samples": 5, "finalists": 2, "finalist_seeds": 1}})

    def row(trial, objective, recipe=""):
        return {"trial_id": trial, "recipe": recipe, "stop_reason": "stopped by ASHA", "best_objective": objective,
                "checkpoint": f"/ck/{trial}", "epochs": 2}

    # a and b lead after part 1; c joins them after part 2 (ahead of b), so each phase has new runs
    trials = pd.DataFrame([row("a", .9), row("b", .8), row("y", .5, "your spec"), row("c", .85), row("e", .1)])
    configs = {t: {"x": i} for i, t in enumerate("abyce")}
    sizes, phases = [3, 4, 5], {}
    monkeypatch.setattr(ray.tune, "ExperimentAnalysis", lambda folder: Path(folder).name)
    monkeypatch.setattr(ray.tune, "ResultGrid", lambda name: phases[name])
    for k in (1, 2, 3):
        name, known = final_dir_name(k), trials.iloc[:sizes[k - 1]]
        runs = finalists.plan(spec, known, configs)
        done = earlier_final_runs(spec, tmp_path, known, configs, sizes[:k])
        for (trial, seed), (outcome, _) in done.items():  # every run read back as itself
            assert outcome["run_id"].endswith(f"-{trial}{seed}"), (name, trial, seed, outcome)
        todo = final_phase_runs(tmp_path, name, runs, done)
        assert not {(r.trial_id, r.seed) for r in todo} & set(done)
        assert {(r.trial_id, r.seed) for r in todo} | set(done) >= {(r.trial_id, r.seed) for r in runs}
        assert final_phase_runs(tmp_path, name, runs, done) == todo  # before it begins: planned again alike
        (tmp_path / name).mkdir()
        assert final_phase_runs(tmp_path, name, runs, {}) == todo  # begun: the same list, whatever is done now
        phases[name] = [SimpleNamespace(config={"final_run": i}, error=None, checkpoint=None, metrics={
            "finished": True, "best_objective": 0.5, "checkpoint_path": f"/{name}/{r.trial_id}{r.seed}",
            "trial_id": f"{name}-{r.trial_id}{r.seed}"}) for i, r in enumerate(todo)]
        if k == 2:
            assert [(r.trial_id, r.seed) for r in todo] == [("c", 7), ("c", 8)]


def test_each_piece_of_a_search_adds_its_wall_time_and_a_new_search_starts_the_count_again(tmp_path):
    import time

    from fer_tune.search.run import earlier_pieces, record_piece

    assert earlier_pieces(tmp_path) == []
    record_piece(tmp_path, earlier_pieces(tmp_path), time.time() - 60)  # the first piece, before tune/ existed
    (tmp_path / "tune").mkdir()
    record_piece(tmp_path, earlier_pieces(tmp_path), time.time() - 30)  # a --resume
    assert [round(p["seconds"]) for p in earlier_pieces(tmp_path)] == [60, 30]
    (tmp_path / "tune").rmdir()  # its search gone, a new one in the same folder counts from 0
    assert earlier_pieces(tmp_path) == []
    (tmp_path / "tune").mkdir()
    (tmp_path / "wall.json").write_text("{not json")
    assert earlier_pieces(tmp_path) == []  # an unreadable record costs the report its history, not the search


@pytest.mark.parametrize("trainer, process", [("torch_trainer", "ray::RayTrainWorker"),
                                              ("in_trial", "ray::ImplicitFunc")])
def test_killed_training_process_resumes_from_its_last_checkpoint(tmp_path, trainer, process):
    """Train restarts a TorchTrainer's killed worker; Tune restarts a killed in-trial trial."""
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path / "worker.yaml", name="worker", train={"epochs": 8, "batch_size": 16},
                      data={"synthetic": {"n": 400, "identities": 40}}, resources={"trainer": trainer},
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
            pids = descendants_named(run.pid, process)  # never another Ray's process on this machine
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)  # the training process dies mid-trial
    assert killed, (tmp_path / "run.log").read_text()[-3000:]
    assert run.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]

    history = pd.read_csv(next((out / "tune").glob("trial_*/progress.csv")))
    epochs = history["epoch"].tolist()
    assert epochs == sorted(epochs) and epochs[-1] == 8  # no epoch trained twice from scratch
    assert history["resumed_from_epoch"].max() >= 1  # the restarted worker loaded a checkpoint
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert trials["stop_reason"].tolist() == ["completed"]


def descendants_named(root: int, name: str) -> list[int]:
    """Processes below `root` (children, their children...) whose command line contains `name`."""
    import ray  # noqa: F401 - makes Ray's vendored psutil importable
    import psutil

    found = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if name in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:  # ended meanwhile
            continue
    return sorted(found)


def test_report_and_tensorboard_hparams_cover_every_trial(searched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    _, out = searched
    trials = pd.read_csv(out / "report" / "trials.csv")
    params = ["model.backbone", "train.optimizer", "train.lr", "model.dropout"]

    def plugin_content(folder):
        events = EventAccumulator(str(folder))
        events.Reload()
        return events, events.PluginTagToContent(metadata.PLUGIN_NAME)

    _, root = plugin_content(out / "tensorboard")
    experiment = metadata.parse_experiment_plugin_data(root[metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == {*params, "status"}
    assert "hparams/best_objective" in {m.name.tag for m in experiment.metric_infos}
    for _, trial in trials.iterrows():
        events, content = plugin_content(out / "tensorboard" / trial["trial_id"])
        session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        values = {k: (v.string_value if v.HasField("string_value") else v.number_value)
                  for k, v in session.hparams.items()}
        assert values["status"] == trial["stop_reason"]
        assert values["model.backbone"] == trial["model.backbone"]
        assert values["train.lr"] == pytest.approx(trial["train.lr"])
        assert values["model.dropout"] == pytest.approx(trial["model.dropout"])
        if trial["stop_reason"] != "errored":  # curves written live, one point per epoch run
            assert [e.step for e in events.Scalars("val/expression_f1")] == list(range(1, trial["epochs"] + 1))
            assert events.Scalars("hparams/best_objective")[0].value == pytest.approx(trial["best_objective"])

    report = (out / "report" / "report.md").read_text()
    errored = trials[trials["stop_reason"] == "errored"].iloc[0]
    assert f"| {errored['trial_id']} |" in report and "became nan" in report
    assert "## Errored trials (1)" in report and "## Parameter importances" in report
    for name in ("confusion_matrix.png", "valence_arousal.png", "learning_curves.png",
                 "parallel_coordinates.png", "param_importances.png", "class_counts.png"):
        assert (out / "report" / name).stat().st_size > 10_000, name
    assert not list((out / "tune").rglob("events.out.tfevents.*"))  # Ray's own TensorBoard files replaced


def test_a_finished_search_extended_with_more_trials_goes_on_from_its_study_and_rungs(tmp_path, capsys):
    """`--resume` with a larger search.num_samples adds trials to a finished search: its searcher
    goes on in the same study (new draws, not the first part's again), ASHA judges against their rungs, the final phase runs again over all
    of them, and the report and best/ are those of the whole search. A smaller budget is refused."""
    spec = write_spec(tmp_path / "s.yaml", name="grow", space={"model.dropout": {"uniform": [0.0, 0.4]}},
                      train={"epochs": 2, "batch_size": 32},
                      search={"num_samples": 2, "finalists": 1, "finalist_seeds": 1, "max_concurrent_trials": 1,
                              "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                              "searcher": {"type": "random", "seed": 0}})
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    first = pd.read_csv(out / "report" / "trials.csv")
    rungs_before = json.loads((out / "asha.json").read_text())["rungs"]
    capsys.readouterr()

    assert main(["run", str(spec), "--out", str(out), "--set", "search.num_samples=3"]) == 2  # not without --resume
    assert "a larger search.num_samples alone extends the search, with --resume" in capsys.readouterr().err
    assert main(["run", str(spec), "--out", str(out), "--resume", "--set", "search.num_samples=3"]) == 0
    said = capsys.readouterr().out
    assert f"extending the search: 1 more trial in {out / 'tune_2'}; random draws go on from the 2 before" in said

    parts = json.loads((out / "searches.json").read_text())["parts"]
    assert parts == [{"name": "tune", "num_samples": 2}, {"name": "tune_2", "num_samples": 1}]
    trials = pd.read_csv(out / "report" / "trials.csv")
    assert len(trials) == 3 and set(first["trial_id"]) < set(trials["trial_id"])
    assert trials["model.dropout"].nunique() == 3  # the new part's random draws are new ones, not the first part's again
    study = optuna.load_study(study_name="grow", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 3 and [t.params.get("model.dropout") for t in study.trials].count(0.1) == 1
    rungs_after = json.loads((out / "asha.json").read_text())["rungs"]
    for (milestone, before), (same, after) in zip(rungs_before[0], rungs_after[0]):
        assert milestone == same and before.items() <= after.items()  # the new trials met the old rungs
    assert len(rungs_after[0][-1][1]) == 3
    # the final phase over all 3 trials trains only what the first one did not (your recipe's seed is among those)
    assert "already trained by the search's earlier final phase(s)" in said
    record = {name: {tuple(run) for run in runs}
              for name, runs in json.loads((out / "final_runs.json").read_text()).items()}
    assert record["final"] and not record["final"] & record["final_2"]
    assert (out / "final_2").is_dir() == bool(record["final_2"])
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["trials"] == 3 and all(f["runs"] >= 2 for f in metrics["finalists"])
    assert metrics["best_trial"] in set(trials["trial_id"])
    assert "Search: 3 trials" in (out / "report" / "report.md").read_text()

    assert main(["run", str(spec), "--out", str(out), "--resume", "--set", "search.num_samples=2"]) == 2
    assert "search.num_samples 2 is below the 3 trials" in capsys.readouterr().err


def test_trials_in_their_own_process_reuse_it_and_train_as_a_fresh_process_would(tmp_path):
    """One process serves trial after trial (resources.reuse_trial_processes), and nothing of an
    earlier trial leaks into a later one: the last trial's numbers are those `fer-tune train` gets
    for its config in a process of its own."""
    spec = write_spec(tmp_path / "s.yaml", space={"model.dropout": {"uniform": [0.0, 0.4]}},
                      resources={"cpus_per_worker": 2},
                      search={"num_samples": 3, "finalists": 0, "max_concurrent_trials": 1,
                              "scheduler": {"type": "none"}, "searcher": {"type": "random", "seed": 0}})
    assert main(["run", str(spec), "--out", str(tmp_path / "run")]) == 0
    trials = pd.read_csv(tmp_path / "run" / "report" / "trials.csv")
    assert len(trials) == 3 and trials["process"].nunique() == 1
    later = trials[trials["recipe"].astype(object).fillna("") == ""].iloc[-1]
    assert main(["train", str(spec), "--set", f"model.dropout={float(later['model.dropout'])!r}",
                 "--out", str(tmp_path / "fresh")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "report" / "metrics.json").read_text())
    assert fresh["best_epoch"] == later["best_epoch"]
    assert fresh["val"]["expression_f1"] == pytest.approx(later["val_expression_f1"], abs=1e-6)
    assert fresh["val"]["valence_ccc"] == pytest.approx(later["val_valence_ccc"], abs=1e-5)
