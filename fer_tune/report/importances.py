"""Which sampled parameters mattered: Optuna's fANOVA importances of the search's study
(drawn by Optuna's own plot, `fer_tune.report.figures.importances_figure`)."""

from __future__ import annotations

import warnings

from fer_tune.errors import one_line
from fer_tune.report.experiment import Experiment


def load_study(exp: Experiment):
    """The search's Optuna study, or a text saying why there is none."""
    db = exp.out / "optuna.db"
    if not exp.is_search or not db.is_file():
        return "a single training run has no search to analyse"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=exp.spec.name, storage=f"sqlite:///{db}")
    except KeyError:
        return f"{db} holds no study named {exp.spec.name}"


def evaluator():
    """fANOVA, seeded: the same importances every time the report is built."""
    import optuna

    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def parameter_importances(exp: Experiment) -> tuple[dict[str, float], str]:
    """fANOVA importances from the search's Optuna study, or ({}, why they cannot be computed)."""
    study = load_study(exp)
    if isinstance(study, str):
        return {}, study
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"needs at least 2 trials that did not error, found {len(complete)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator())
        except (RuntimeError, ValueError) as err:
            return {}, one_line(err)
    if not importances:
        return {}, "no parameter was sampled in every trial"
    return {name: float(value) for name, value in importances.items()}, ""

