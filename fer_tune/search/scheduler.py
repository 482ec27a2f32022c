"""ASHA whose rungs survive a resumed search.

Tune restores a search's trials and its searcher from DIR/tune, but its scheduler comes back as it
was pickled into DIR/tune/tuner.pkl when the search began: every rung empty. After a `--resume`
the first trials then pass every milestone unjudged, and a trial that ASHA would have stopped at
its grace epoch trains to the end. (Measured on the P4 `pretrained` search, resumed four times:
a trial at 0.147 at epoch 3, below the rung's cutoff of 0.314, ran all 20 epochs.)

`ResumableASHA` writes its rungs and the bracket of every trial to a JSON file beside the search
at each result, and reads them back when Tune unpickles it, so a resumed search judges its trials
against every result the search has seen. An extension of a search (more trials, a further Tune
experiment: `fer_tune.search.run.search_parts`) starts from the same rungs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ray.tune.schedulers import AsyncHyperBandScheduler

from fer_tune.io import atomic_write_json

EXPERIMENT_DIR = "FER_TUNE_EXPERIMENT_DIR"
"""Set in the driver's environment while Tune restores a search (`fer_tune.search.run.experiment_folder`):
the folder it is restored from. Tune unpickles the scheduler and the searcher itself, with the
paths of the folder the search began in, which a move or a copy has left behind."""


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_file: Path, earlier: tuple[Path, ...] = (), **asha):
        """For a new Tune experiment only (a resumed one is unpickled). A new search's empty rungs
        replace any an earlier search left in `state_file`; an extension of the search (its
        `earlier` Tune experiments given) starts from the rungs there, or, for a search begun before
        fer-tune kept them, from what those experiments' trials reported (one bracket only: which
        bracket a trial was in is not in its results)."""
        super().__init__(**asha)
        self._state_file = str(state_file)
        self._saved_bracket: dict[str, int] = {}
        rebuild = bool(earlier) and not self._load() and len(self._brackets) == 1
        self._rebuild_from = [str(d) for d in earlier] if rebuild else []  # once Tune names the metric
        self._save()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        accepted = super().set_search_properties(metric, mode, **spec)
        if accepted and getattr(self, "_rebuild_from", None) and self._metric_op:  # (unpickled from before it)
            rungs_from_results(self, [Path(d) for d in self._rebuild_from])
            self._rebuild_from = []
            self._save()
        return accepted

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.trial_id in self._saved_bracket:  # a resumed trial keeps the bracket it was judged in
            self._trial_info[trial.trial_id] = self._brackets[self._saved_bracket[trial.trial_id]]
        else:
            super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def state(self) -> dict:
        brackets = {id(b): i for i, b in enumerate(self._brackets)}
        return {"rungs": [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets],
                "trial_brackets": {**self._saved_bracket,
                                   **{t: brackets[id(b)] for t, b in self._trial_info.items()}},
                "num_stopped": self._num_stopped}

    def _save(self) -> None:
        atomic_write_json(Path(self._state_file), self.state())

    def __setstate__(self, pickled: dict) -> None:
        self.__dict__.update(pickled)
        if os.environ.get(EXPERIMENT_DIR):  # resumed from a folder that may have been moved or copied
            self._state_file = str(Path(os.environ[EXPERIMENT_DIR]) / Path(self._state_file).name)
        self._load()

    def _load(self) -> bool:
        saved = read_state(Path(self._state_file), self)
        if saved is None:
            return False
        for bracket, rungs in zip(self._brackets, saved["rungs"]):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)
        self._saved_bracket = dict(saved["trial_brackets"])
        self._num_stopped = saved["num_stopped"]
        return True


def rungs_from_results(scheduler: ResumableASHA, tune_dirs) -> None:
    """Fill a one-bracket scheduler's rungs as ASHA itself fills them: each trial's metric at the
    first result that reached the milestone (from each trial's progress.csv)."""
    import pandas as pd

    (bracket,) = scheduler._brackets
    for tune_dir in tune_dirs:
        for progress in sorted(Path(tune_dir).glob("trial_*/progress.csv")):
            try:
                history = pd.read_csv(progress)
            except (OSError, ValueError):
                continue
            if not {scheduler._time_attr, scheduler._metric, "trial_id"} <= set(history.columns):
                continue
            for milestone, recorded in bracket._rungs:
                reached = history[history[scheduler._time_attr] >= milestone]
                if len(reached):
                    recorded[str(reached["trial_id"].iloc[0])] = scheduler._metric_op * float(
                        reached[scheduler._metric].iloc[0])


def read_state(path: Path, scheduler: ResumableASHA) -> Optional[dict]:
    """The saved rungs, if they fit this scheduler's brackets; otherwise None (the search then
    resumes with empty rungs, as Tune's own ASHA would)."""
    try:
        saved = json.loads(path.read_text())
        rungs, brackets = saved["rungs"], saved["trial_brackets"]
        fits = len(rungs) == len(scheduler._brackets) and all(
            [m for m, _ in b._rungs] == [m for m, _ in r] for b, r in zip(scheduler._brackets, rungs))
        ok = fits and all(0 <= int(i) < len(rungs) for i in brackets.values())
        return {"rungs": rungs, "trial_brackets": {t: int(i) for t, i in brackets.items()},
                "num_stopped": int(saved.get("num_stopped", 0))} if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
