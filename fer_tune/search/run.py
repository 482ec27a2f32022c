"""`fer-tune run`: a Ray Tune search whose every trial trains through a Ray Train TorchTrainer
(or, for a one-worker trial on a Ray fer-tune starts, in the Tune trial's own process).

Flow (top to bottom in `run_search`):
1. check the experiment folder and prepare the data once (split CSVs, train/val image caches)
   before Ray; the spec itself was loaded and checked by the command (`fer_tune.specfile`);
2. a Tuner over the trial trainable (`fer_tune.search.trial`), with OptunaSearch (TPE, study in
   `DIR/optuna.db`) over the spec's `space:` (`fer_tune.search.space`) and ASHA on the objective;
3. each trial launches a TorchTrainer whose workers run `fit()` (DDP when more than one) and
   report every epoch, or runs `fit()` itself (`resources.trainer`, see
   `fer_tune.search.trial.trains_in_trial`); a search given more trials on `--resume` runs them
   as a further Tuner on the same study (`search_parts`);
4. after the search the best trial's best epoch is tested once on the test split
   (`fer_tune.search.results` reads the trials back), and its config and weights are exported
   to `DIR/best/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import optuna
import pandas as pd
from ray.tune.logger import TBXLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from fer_tune.data.prepare import prepare_data
from fer_tune.engine.artifacts import export_best
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import compare_on_test, evaluate_on_test, format_test
from fer_tune.errors import SearchInterrupted, UserError, one_line
from fer_tune.io import atomic_write_json, atomic_write_text, check_writable, folder_lock
from fer_tune.layout import ASHA_FILE, FINAL_RUNS_FILE, PARTS_FILE, WALL_FILE, rerun_command
from fer_tune.metrics import flat_metrics
from fer_tune.report import write_history, write_report
from fer_tune.report.tensorboard import log_epoch
from fer_tune.search.cluster import (check_storage, connect_ray, driver_node_resource, note_multi_node_storage,
                                     placement, train_storage)
from fer_tune.search import finalists
from fer_tune.search.results import (final_histories, final_outcomes, healthy, read_checkpoint, trial_confusions,
                                     trial_histories, trial_table)
from fer_tune.search.scheduler import EXPERIMENT_DIR, ResumableASHA
from fer_tune.search.space import SpaceSampler, known_recipes, make_sampler
from fer_tune.search.trial import METRIC, make_trial, trains_in_trial, trial_holds
from fer_tune.spec import Spec
from fer_tune.specfile import check_same_experiment, check_spec, read_spec

FINAL_DIR = "final"
"""The Tune experiment of the final phase, beside the search's DIR/tune."""

STOPPING = "FER_TUNE_SEARCH_STOPPING"
"""Set in the driver's environment while a Ctrl-C stops the search (see `StudySearch`)."""


def run_search(spec: Spec, out: Path, resume: bool = False, address: Optional[str] = None,
               verbose: int = 1) -> dict:
    started = time.time()
    spec = check_spec(spec, source=spec.name)  # a spec made in code is checked like a loaded one (cheap, idempotent)
    out = Path(out).resolve()
    check_same_experiment(spec, out, resume)
    check_writable(out)
    with folder_lock(out):  # held until the search, its final phase and its report are done
        check_same_experiment(spec, out, resume)  # again: another command may have finished meanwhile
        earlier = earlier_pieces(out)
        parts = search_parts(spec, out)  # before _search writes this spec over the folder's
        try:
            return _search(spec, out, resume, address, verbose, started, earlier, parts)
        finally:
            record_piece(out, earlier, started)


def search_parts(spec: Spec, out: Path) -> list[dict]:
    """The Tune experiments this search is made of, in order, each with its number of trials:
    DIR/tune, then one more (DIR/tune_2, ...) for each `--resume` that raised `search.num_samples`.

    Tune cannot give a restored experiment more trials, so the extra ones are a new experiment on
    the same Optuna study: TPE goes on from every trial the search has run, ASHA from every rung
    (DIR/asha.json), and the final phase is run again over all the trials."""
    path = out / PARTS_FILE
    if not (out / "tune").is_dir():
        stale = sorted(p.name for p in out.glob("tune_*") if p.is_dir()) + sorted(
            p.name for p in out.glob(f"{FINAL_DIR}*") if p.is_dir())
        if stale:
            raise UserError(f"{out} holds {', '.join(f'{n}/' for n in stale)} of an earlier search but no tune/: "
                            f"remove them, or use another --out")
        parts = []
    elif path.is_file():
        try:
            parts = [{"name": str(p["name"]), "num_samples": int(p["num_samples"])}
                     for p in json.loads(path.read_text())["parts"]]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: unreadable ({one_line(err, limit=80)}); it lists the Tune experiments of "
                            f"this search (tune, tune_2, ...): restore it, or resume without changing "
                            f"search.num_samples") from None
    else:  # a search begun before extensions existed, or never extended: one experiment
        parts = [{"name": "tune", "num_samples": read_spec(out / "spec.yaml").search.num_samples}]
    planned = sum(p["num_samples"] for p in parts)
    if spec.search.num_samples > planned:
        parts.append({"name": f"tune_{len(parts) + 1}" if parts else "tune",
                      "num_samples": spec.search.num_samples - planned})
    return parts


def describe_extension(spec: Spec, more: int, before: int, tune_dir: Path) -> str:
    searcher = "random draws go on" if spec.search.searcher.type == "random" else "TPE goes on"
    sched = spec.search.scheduler
    rungs = ("; ASHA from their rungs" if sched.type == "asha" else "") + (
        " (a search begun before fer-tune kept them, with brackets > 1, starts with empty ones)"
        if sched.type == "asha" and sched.brackets > 1 else "")
    return (f"{more} more trial{'s' if more > 1 else ''} in {tune_dir}; {searcher} from the {before} "
            f"before{rungs}")


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """`name=value` in this process's environment for the block, then as it was before."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def experiment_folder(out: Path):
    """While Tune restores a search (`Tuner.restore`, then `fit()`): the folder it is restored
    from, for the scheduler and the searcher it unpickles, which were pickled with the paths of
    the folder the search began in, before a move or a copy (`EXPERIMENT_DIR`)."""
    return environment_variable(EXPERIMENT_DIR, str(out))


def earlier_pieces(out: Path) -> list[dict]:
    """The pieces this search already ran (DIR/wall.json), so that a resumed search's report gives
    the wall time of all of them. Only while DIR/tune/ holds the search they belong to."""
    path = out / WALL_FILE
    if not (out / "tune").is_dir() or not path.is_file():
        return []
    try:
        pieces = json.loads(path.read_text())["pieces"]
        return [p for p in pieces if isinstance(p.get("seconds"), (int, float))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []  # an unreadable record costs the report its earlier pieces, never the search


def record_piece(out: Path, earlier: list[dict], started: float) -> None:
    """Add this piece, however it ended (finished, Ctrl-C, an error); a killed driver's is lost."""
    piece = {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
             "seconds": round(time.time() - started, 1)}
    try:
        atomic_write_json(out / WALL_FILE, {"pieces": [*earlier, piece]})
    except OSError:
        pass  # in a `finally`: a full disk must not hide why the search stopped


def _search(spec: Spec, out: Path, resume: bool, address: Optional[str], verbose: int, started: float,
            earlier: list[dict], parts: list[dict]) -> dict:
    import ray
    from ray import tune

    checkpoints = train_storage(spec, out)
    if spec.search.storage is not None:
        check_storage(checkpoints)  # before spec.yaml: a corrected --storage is then the same experiment
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    atomic_write_json(out / PARTS_FILE, {"parts": parts})
    if not spec.space:
        print(f"note: {spec.name} has no space: section; every trial trains the same config")

    prepared = prepare_data(spec.data, out)  # reads and splits the labels: bad data fails here
    joined = connect_ray(address, verbose)
    use_gpu, concurrency = placement(spec, joined)
    in_trial = trains_in_trial(spec, joined)
    if in_trial:
        checkpoints = str(out / "tune")  # Tune keeps them beside each trial's results
        # Keeping one checkpoint per trial makes Tune save its experiment state at each; with epochs
        # of a few seconds it warns about every one of them.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    note_multi_node_storage(checkpoints)
    prepared.load("train"), prepared.load("val")  # the driver node's caches, built once before any trial
    data = ray.put({"tables": prepared.tables, "info": prepared.info})  # for workers on other nodes
    storage = str(out)

    # Through a TorchTrainer, the trial function only waits on it: it holds memory, not a CPU a
    # worker needs. It runs on the driver's node, as does the Train controller it starts, so a lost
    # worker node takes only training workers with it, and Train retries the trial from its last
    # checkpoint; a trial that fails anyway (diverged, raised) stays errored, also when resumed.
    # In the trial's own process, the trial holds what one worker would, and Tune does the retries.
    trainable = make_trial(spec, out, use_gpu, checkpoints, data, ray.get_runtime_context().get_node_id(), in_trial)
    # An in-trial trial that ends (or that ASHA stops: it waits inside its report, which then exits
    # its thread) hands its process to the next trial; `fit()` sets threads and seeds itself. A
    # TorchTrainer trial's process is not reused: a stopped trial's controller would train on beside the next.
    reuse = in_trial and spec.resources.reuse_trial_processes
    holds = trial_holds(spec.resources, use_gpu, in_trial, driver_node_resource())
    trial = tune.with_resources(trainable, holds)
    retries = spec.search.max_failures if in_trial else 0  # a TorchTrainer trial's are Train's
    results, sizes = [], []
    final_name = final_dir_name(len(parts))
    for index, part in enumerate(parts):
        tune_dir = out / part["name"]
        if tune.Tuner.can_restore(str(tune_dir)):
            print(f"resuming the search in {tune_dir}")
            with experiment_folder(out):  # Tune unpickles the scheduler and searcher here and in fit()
                tuner = tune.Tuner.restore(str(tune_dir), trainable=trial, resume_unfinished=True,
                                           resume_errored=False)
        else:
            if index:
                if (out / final_name).exists():
                    raise UserError(f"{out / final_name} is left from an earlier extension of this search, whose "
                                    f"{tune_dir.name}/ is gone: remove {final_name}/ to extend the search again")
                print(f"extending the search: {describe_extension(spec, part['num_samples'], len(results), tune_dir)}")
            run_config = tune.RunConfig(name=part["name"], storage_path=storage, verbose=verbose,
                                        failure_config=tune.FailureConfig(max_failures=retries),
                                        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                        callbacks=[TrialCurves(out / "tensorboard")])
            tuner = tune.Tuner(trial, run_config=run_config, tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=make_searcher(spec, out, index),
                scheduler=make_scheduler(spec, out, earlier=[out / p["name"] for p in parts[:index]]),
                num_samples=part["num_samples"], max_concurrent_trials=concurrency, reuse_actors=reuse))
        with ctrl_c_stops_gracefully() as interrupted, experiment_folder(out):
            part_results = tuner.fit()
        if interrupted or part_results.num_terminated + part_results.num_errors < part["num_samples"]:
            raise SearchInterrupted(f"the search stopped before its {spec.search.num_samples} trials ended "
                                    f"({'interrupted; ' if interrupted else ''}finished trials and the running "
                                    f"ones' checkpoints are kept): resume with the same command plus --resume --out {out}")
        results += [part_results[i] for i in range(len(part_results))]
        sizes.append(len(results))
    trials = trial_table(spec, results)
    atomic_write_text(out / "report" / "trials.csv", trials.to_csv(index=False))
    if healthy(trials).empty:
        reasons = "; ".join(sorted(set(trials["error"].dropna().astype(str))))[:500]
        raise UserError(f"every trial failed ({len(trials)} of {len(trials)}); first errors: {reasons}")
    configs = {str(t): dict(r.config or {}) for t, r in zip(trials["trial_id"], results)}
    runs = finalists.plan(spec, trials, configs)
    done = earlier_final_runs(spec, out, trials, configs, sizes)
    todo = final_phase_runs(out, final_name, runs, done)
    if len(todo) < len(runs):
        print(f"final phase: {len(runs) - len(todo)} of its {len(runs)} runs already trained by the search's earlier "
              f"final phase(s); {len(todo)} to train")
    final = run_final(spec, out, todo, trainable, holds, retries, concurrency, reuse, verbose, final_name)
    trained = dict(zip([(r.trial_id, r.seed) for r in todo], runs_in_plan_order(spec, final, len(todo))))
    failed = ({"run_id": "", "objective": math.nan, "checkpoint": ""}, None)
    best = {**done, **{key: run for key, run in trained.items() if trained_well(run[0]) or key not in done}}
    final_runs = [best.get((r.trial_id, r.seed), failed) for r in runs]
    selection = finalists.select(spec, trials, runs, [outcome for outcome, _ in final_runs])
    wall = sum(p["seconds"] for p in earlier) + time.time() - started
    final_results = [result for _, result in final_runs if result is not None]
    return finish(spec, out, trials, results, final_results or None, runs, selection, prepared, wall,
                  pieces=len(earlier) + 1)


def runs_in_plan_order(spec: Spec, results, runs: int) -> list[tuple[dict, object]]:
    """(outcome, Tune result) of each final run, in the order of the plan (`final_run` in each
    result's config), whatever order Tune lists them in; no runs, no results."""
    if results is None:
        return []
    outcomes = final_outcomes(spec, results, runs)
    by_index = {int((r.config or {}).get("final_run", -1)): r for r in results}
    return [(outcome, by_index.get(index)) for index, outcome in enumerate(outcomes)]


def final_phase_runs(out: Path, name: str, runs: list, done: dict) -> list:
    """The runs the final phase `name` trains, in the order its Tune experiment numbers them: those
    of `runs` no earlier phase trained, recorded in DIR/final_runs.json when the phase begins so a
    resume gets the same list; all of `runs` for a phase begun before fer-tune reused earlier ones."""
    record = final_runs_record(out)
    by_key = {(r.trial_id, r.seed): r for r in runs}
    if (out / name).is_dir():  # begun: the runs it began with
        if name not in record:
            return list(runs)
        if not all(key in by_key for key in record[name]):
            raise UserError(f"{out / name}: the runs it began with ({out / FINAL_RUNS_FILE}) are no longer this "
                            f"search's finalists; remove {name}/ to run the final phase again")
        return [by_key[key] for key in record[name]]
    todo = [run for run in runs if (run.trial_id, run.seed) not in done]
    atomic_write_json(out / FINAL_RUNS_FILE, {**record, name: [[r.trial_id, r.seed] for r in todo]})
    return todo


def final_runs_record(out: Path) -> dict[str, list]:
    """DIR/final_runs.json: per final phase, its (trial, seed) runs in its Tune experiment's order."""
    path = out / FINAL_RUNS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        return {str(k): [(str(t), int(seed)) for t, seed in v] for k, v in record.items()}
    except (ValueError, TypeError, AttributeError):
        raise UserError(f"{path}: unreadable; it says which runs each final phase trains. Restore it, or remove "
                        f"it with the final phase folders it describes (final*/) to run them again") from None


def final_dir_name(parts: int) -> str:
    """The final phase's Tune experiment of a search made of `parts` parts: DIR/final, then an
    extended search's own (DIR/final_2, ...), over all its trials."""
    return FINAL_DIR if parts == 1 else f"{FINAL_DIR}_{parts}"


def earlier_final_runs(spec: Spec, out: Path, trials: pd.DataFrame, configs: dict, sizes: list[int]) -> dict:
    """The full-budget runs an extended search's earlier final phases trained, by (trial, seed):
    (outcome, result). Which run each Tune result is comes from DIR/final_runs.json; a phase begun
    before that record existed trained its whole plan, made again here from the trials it had
    (the first `sizes[k - 1]`), and is skipped if that plan does not fit its results."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    record = final_runs_record(out)
    done = {}
    for k in range(1, len(sizes)):
        name = final_dir_name(k)
        if not (out / name).is_dir():
            continue
        try:
            results = ResultGrid(ExperimentAnalysis(str(out / name)))
            keys = record.get(name) or [(r.trial_id, r.seed) for r in
                                        finalists.plan(spec, trials.iloc[:sizes[k - 1]], configs)]
            if name not in record and len(keys) != len(results):
                continue
            pairs = runs_in_plan_order(spec, results, len(keys))
        except Exception:  # noqa: BLE001 - an unreadable earlier phase only costs its runs again
            continue
        for key, (outcome, result) in zip(keys, pairs):
            if trained_well(outcome) and result is not None:
                done[key] = (outcome, result)
    return done


def trained_well(outcome: dict) -> bool:
    return bool(outcome["checkpoint"]) and math.isfinite(outcome["objective"])


def make_scheduler(spec: Spec, out: Path, earlier: list[Path] = ()):
    """ASHA over epochs (`search.scheduler`) whose rungs a resumed search keeps (DIR/asha.json),
    or no early stopping. For a new Tune experiment only (a resumed one gets its scheduler from
    Tune): a new search starts with empty rungs, an extension with the rungs of its `earlier`
    Tune experiments."""
    from ray.tune.schedulers import FIFOScheduler

    sched = spec.search.scheduler
    if sched.type != "asha":
        return FIFOScheduler()
    return ResumableASHA(out / ASHA_FILE, earlier=tuple(earlier),
                         time_attr="training_iteration", max_t=sched.max_t or spec.train.epochs,
                         grace_period=sched.grace(spec.train.epochs), reduction_factor=sched.reduction_factor,
                         brackets=sched.brackets)


def run_final(spec: Spec, out: Path, runs: list, trainable, holds: dict, retries: int, concurrency: int,
              reuse: bool, verbose: int, name: str = FINAL_DIR):
    """The full-budget runs of `fer_tune.search.finalists`, through Tune as a second experiment
    (DIR/final; DIR/final_2... for an extended search) with the search's own trainable; resumable
    like the search. None when there are none."""
    from ray import tune

    if not runs:
        return None
    configs = [run.config() for run in runs]

    def final_run(config: dict) -> None:
        return trainable(configs[config["final_run"]])

    final_run.__name__ = trainable.__name__  # Tune names trials (and their folders) after it
    final = tune.with_resources(final_run, holds)
    final_dir = out / name
    print(f"final phase: {len(runs)} full-budget run(s) of {len({r.trial_id for r in runs})} recipe(s): "
          f"the {spec.search.finalists} best trial(s) and your recipe, {spec.search.finalist_seeds} more seed(s) "
          f"each, once with their own where ASHA stopped them")
    if tune.Tuner.can_restore(str(final_dir)):
        print(f"resuming the final phase in {final_dir}")
        tuner = tune.Tuner.restore(str(final_dir), trainable=final, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(final, param_space={"final_run": tune.grid_search(list(range(len(runs))))},
                           run_config=tune.RunConfig(name=name, storage_path=str(out), verbose=verbose,
                                                     failure_config=tune.FailureConfig(max_failures=retries),
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                                     callbacks=[TrialCurves(out / "tensorboard")]),
                           tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=1,
                                                       max_concurrent_trials=concurrency, reuse_actors=reuse))
    with ctrl_c_stops_gracefully() as interrupted:
        results = tuner.fit()
    if interrupted or results.num_terminated + results.num_errors < len(runs):
        raise SearchInterrupted(f"the final phase stopped before its {len(runs)} runs ended "
                                f"({'interrupted; ' if interrupted else ''}the search's trials and the finished "
                                f"runs are kept): resume with the same command plus --resume --out {out}")
    return results


def make_searcher(spec: Spec, out: Path, part: int = 0) -> "StudySearch":
    """OptunaSearch over the spec's space, its study in DIR/optuna.db, starting with the known recipes.

    The recipes (`known_recipes`: the spec's own values, then `search.points`) are enqueued in the
    study, so they are the first trials Tune asks for and Optuna learns from them like from any
    other. Built only for a new search: a resumed one gets Tune's saved searcher, and its study
    already holds the recipes (run, or still queued).
    """
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    recipes = known_recipes(spec)
    try:
        begun = len(optuna.load_study(study_name=spec.name, storage=storage).trials) > 0
    except KeyError:
        begun = False
    problem = spec.own_recipe_problem() if spec.space and spec.search.start_from_spec is not False else None
    if problem:
        print(f"note: the search does not start from your spec's own values: {problem.split(': ', 1)[1]}")
    if begun and recipes and not part:
        print(f"note: {out / 'optuna.db'} already holds trials of {spec.name}: its known recipes are not queued again")
    return StudySearch(SpaceSampler(spec), metric=METRIC, mode="max", sampler=make_sampler(spec, len(recipes), part),
                       study_name=spec.name, storage=storage,
                       points_to_evaluate=[params for _, params in recipes] if recipes and not begun else None)


class StudySearch(OptunaSearch):
    """OptunaSearch that leaves the trials a Ctrl-C stops unfinished in the Optuna study.

    Tune's graceful stop saves the experiment (those trials still running in it) and then reports
    them complete to the searcher; told to Optuna, their partial objective would become a final
    one, and the resumed trials could no longer be told. Skipped, the study matches the saved
    experiment, and resumed trials are told when they really end.

    That the stop has begun reaches it through the driver's environment (`STOPPING`, set by
    `ctrl_c_stops_gracefully`): Tune unpickles the searcher of a resumed search itself, so it
    cannot be handed a flag.
    """

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if os.environ.get(STOPPING):
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore, then the study of the folder being resumed: the pickled one names the
        optuna.db of the folder the search began in, which a moved or copied search must not write to."""
        super().restore(checkpoint_path)
        folder = os.environ.get(EXPERIMENT_DIR)
        if folder and isinstance(self._storage, optuna.storages.RDBStorage):
            here = f"sqlite:///{Path(folder) / 'optuna.db'}"
            if self._storage.url != here:
                self._storage = optuna.storages.RDBStorage(here)
                self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                                   sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)


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
    os.environ.pop(STOPPING, None)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield interrupted
        return

    def on_ctrl_c(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        os.environ[STOPPING] = "1"
        print("\nfer-tune: stopping; the search state is being saved (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with environment_variable("TUNE_DISABLE_SIGINT_HANDLER", "1"):
            yield interrupted
    finally:
        os.environ.pop(STOPPING, None)
        signal.signal(signal.SIGINT, previous_handler)


def finish(spec: Spec, out: Path, trials, results, final, runs: list, selection, prepared, wall: float,
           pieces: int = 1) -> dict:
    """Test the winner once (and your recipe beside it), export best/, write the report's files."""
    winner = selection.winner
    state = read_checkpoint(winner.checkpoint)
    best_spec = Spec.model_validate(state["spec"])
    device = choose_device("auto")  # the driver's own: a CPU head node tests a GPU-trained model
    counts = trials["stop_reason"].value_counts().to_dict()
    final_epochs = sum(len(h) for h in final_histories(final, runs).values())
    export_best(out / "best", best_spec, state["best_model"], prepared.labels)  # before the test: never lost
    write_finalists(out / "report", runs, selection)
    best_epoch_metrics = next((h for h in state.get("history", []) if h.get("epoch") == state["best_epoch"]), {})
    metrics = evaluate_on_test(best_spec, prepared, state["best_model"], device, report_dir=out / "report", extra={
        "best_trial": winner.trial_id, "best_run": winner.run_id, "best_seed": winner.seed,
        "best_epoch": int(state["best_epoch"]),
        "val": {**flat_metrics(state["best_metrics"].get("val", {})),
                **({"loss": best_epoch_metrics["val_loss"]} if "val_loss" in best_epoch_metrics else {})},
        "train_accuracy": state["best_metrics"].get("train_accuracy"),
        "trials": int(len(trials)), "trial_outcomes": {str(k): int(v) for k, v in counts.items()},
        "finalists": [{k: v for k, v in f.items() if k != "outcomes"} for f in selection.finalists],
        "final_runs": len(runs), "final_epochs": int(final_epochs),
        "epochs_spent": int(trials["epochs"].sum()) + final_epochs,
        "wall_seconds": round(wall, 1), "wall_pieces": pieces})
    metrics["comparison"] = compare_with_your_recipe(selection, best_spec, state, prepared, device, out)
    atomic_write_json(out / "report" / "metrics.json", metrics)
    print(f"best trial {winner.trial_id}: {METRIC} {winner.objective:.4f} at epoch {int(state['best_epoch'])}"
          f"{f' (final run {winner.run_id}, seed {winner.seed})' if winner.run_id != winner.trial_id else ''}; "
          f"{len(trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}), {len(runs)} final run(s)")
    print(format_test(metrics, out / "report" / "metrics.json"))
    print(describe_comparison(metrics["comparison"]))
    print(f"best config: {out / 'best' / 'config.yaml'}  (re-run: {rerun_command(out)})")
    write_history(out / "report", {**trial_histories(trials, results), **final_histories(final, runs)},
                  trial_confusions(trials))
    write_report(out)
    return metrics


def compare_with_your_recipe(selection, best_spec: Spec, state: dict, prepared, device, out: Path) -> dict:
    """Your recipe at full budget against the winner, on the test split (read after the selection)."""
    mine = selection.your_recipe
    if mine is None:
        return {"note": selection.your_recipe_note}
    if mine.trial_id == selection.winner.trial_id:  # your recipe won (with this seed or another)
        return {"same": True, "trial": mine.trial_id, "run": selection.winner.run_id}
    theirs = read_checkpoint(mine.checkpoint)
    compared = compare_on_test(prepared, device, found=(best_spec, state["best_model"]),
                               yours=(Spec.model_validate(theirs["spec"]), theirs["best_model"]),
                               report_dir=out / "report")
    return {"trial": mine.trial_id, "run": mine.run_id, **compared}


def describe_comparison(comparison: dict) -> str:
    """One line on the command's output: the found recipe against yours, on test accuracy."""
    if comparison.get("note"):
        return f"found vs your recipe: not compared ({comparison['note']})"
    if comparison.get("same"):
        return "found vs your recipe: the winner is your recipe: the search found nothing better"
    if "expression" not in comparison.get("difference", {}):
        return "found vs your recipe: see report.md (no expression labels to compare accuracy on)"
    gap = comparison["difference"]["expression"]["accuracy"]
    low, high = comparison["ci95"].get("expression", {}).get("accuracy", [math.nan, math.nan])
    verdict = ("better" if low > 0 else "worse" if high < 0 else "no clear difference: the interval includes 0")
    return (f"found vs your recipe: test accuracy {100 * gap:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] "
            f"({verdict}); McNemar p = {comparison['mcnemar']['p_value']:.3g}")


def write_finalists(report_dir: Path, runs: list, selection) -> None:
    """report/finalists.csv: every full-budget run of every finalist (and of your recipe)."""
    rows = [{"trial_id": f["trial_id"], "run_id": o.run_id, "seed": o.seed, "best_objective": o.objective,
             "winner": f["winner"] and o is selection.winner}
            for f in selection.finalists for o in f["outcomes"]]
    mine = selection.your_recipe
    if mine is not None and not any(r["run_id"] == mine.run_id for r in rows):
        rows.append({"trial_id": mine.trial_id, "run_id": mine.run_id, "seed": mine.seed,
                     "best_objective": mine.objective, "winner": False})
    atomic_write_text(report_dir / "finalists.csv", pd.DataFrame(
        rows, columns=["trial_id", "run_id", "seed", "best_objective", "winner"]).to_csv(index=False))


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

