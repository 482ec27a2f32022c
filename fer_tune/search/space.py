"""A spec's `space:` as Optuna sees it: a define-by-run function, parameter names, the sampler.

Kept free of Ray and of the training stack: the trial actors import it (through
`fer_tune.search.trial`) to turn a sampled config back into a spec.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from fer_tune.errors import UserError
from fer_tune.spec import Spec, SpaceEntry

if TYPE_CHECKING:
    import optuna


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
