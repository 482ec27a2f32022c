"""A spec's `space:` as Optuna sees it: a define-by-run function, parameter names, the sampler.

Kept free of Ray and of the training stack: the trial actors import it (through
`fer_tune.search.trial`) to turn a sampled config back into a spec.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

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
    """Optuna define-by-run sampler of a spec's space; conditions are resolved in dependency order
    (`Spec.walk_space`).

    A class, not a closure, because Tune pickles the searcher (and so this) to resume a search.
    """

    def __init__(self, spec: Spec):
        self.spec = spec

    def __call__(self, trial) -> None:
        self.spec.walk_space(lambda key, entry: suggest(trial, param_name(key, entry), entry))


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


def make_sampler(spec: Spec, recipes: int | None = None, part: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `search.searcher` names, for a search that runs `recipes` known recipes
    first (default: as many as `known_recipes` finds). Says how many trials TPE chooses, or, when
    the start-up trials the user set leave it none, that the search is a random one; the default
    (`SearcherSpec.startup`) leaves it most of a search longer than the recipes and 2 random draws.
    Each further `part` of an extended search gets its own seed: the same one would draw the first
    part's random trials again."""
    import optuna

    search, searcher = spec.search, spec.search.searcher
    seed = searcher.seed + part
    if searcher.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    recipes = len(known_recipes(spec)) if recipes is None else recipes
    startup = searcher.startup(search.num_samples, recipes)
    if spec.space and startup < search.num_samples:
        print(f"searcher: TPE chooses trials {startup + 1}-{search.num_samples} after {startup} start-up trials "
              f"({recipes} known recipe(s), {max(0, startup - recipes)} random draws)")
    elif spec.space and searcher.startup_trials:
        print(f"note: TPE draws its first {startup} trials at random, so this search's {search.num_samples} "
              f"are all random draws; search.searcher.startup_trials below {search.num_samples} lets TPE "
              f"choose the rest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, group, constant_liar
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=searcher.multivariate,
                                          group=searcher.group, constant_liar=searcher.constant_liar)


def known_recipes(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """(label, Optuna parameters) of the recipes a search runs before its searcher chooses: the
    spec's own values (`search.start_from_spec`), then each of `search.points`, in that order.

    Each recipe is the spec with the point's values set; its parameters are those a trial of it
    samples (`Spec.walk_space`), so the searcher learns from it like from any trial.
    """
    if not spec.space:
        return []
    own = spec.search.start_from_spec is not False and not spec.own_recipe_problem()
    recipes = [("your spec", {})] if own else []
    recipes += [(f"search.points[{i}]", point) for i, point in enumerate(spec.search.points)]
    return [(label, {param_name(key, entry): value
                     for key, (entry, value) in spec.with_values(values, keep_space=True).walk_space().items()})
            for label, values in recipes]
