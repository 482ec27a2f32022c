"""The spec: YAML -> validated Spec, --set overrides, space entries, one-line errors."""

import copy
import subprocess
import sys

import pytest

from fer_tune.cli import main
from fer_tune.errors import UserError
from fer_tune.spec import Spec, apply_overrides, validate_spec
from fer_tune.specfile import load_spec, read_spec

from conftest import REPO, write_spec


def error_of(path, *overrides) -> str:
    with pytest.raises(UserError) as info:
        load_spec(path, list(overrides))
    return str(info.value)


def test_shipped_specs_load():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        overrides = [] if "quickstart" in path.name else ["data.source=synthetic"]
        assert isinstance(read_spec(path, overrides), Spec), path
        try:
            spec = load_spec(path, overrides)
        except UserError as err:  # ImageNet weights are set up per machine (README: `fer-tune weights`)
            assert "imagenet weights of" in str(err) and "fer-tune weights" in str(err), (path, err)
            continue
        assert isinstance(spec, Spec), path


def test_overrides_are_typed_and_fix_searched_fields(tiny_spec):
    spec = load_spec(tiny_spec, ["train.lr=3e-4", "train.grad_clip=1.5", "space.model.dropout={uniform: [0.1, 0.4]}",
                                 "space.train.weight_decay={loguniform: [1.0e-5, 1.0e-2]}"])
    assert spec.train.lr == 3e-4 and spec.train.grad_clip == 1.5
    assert set(spec.space) == {"model.dropout", "train.weight_decay"}
    fixed = load_spec(tiny_spec, ["space.model.dropout={uniform: [0.1, 0.4]}", "model.dropout=0.3"])
    assert fixed.model.dropout == 0.3 and "model.dropout" not in fixed.space


@pytest.mark.parametrize("override, expected", [
    ("model.dropot=0.1", "unknown key 'model.dropot'; allowed: backbone, dropout, pretrained"),
    ("train.optimizer=adam", "train.optimizer: Input should be 'adamw' or 'sgd'"),
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("model.backbone=resnet9000", "unknown timm backbone 'resnet9000'"),
    ("data.source=imagenet", "data.source: Input should be 'synthetic', 'affectnet'"),
    ("data.split.val=2.5", "data.split.val: must be a count"),
    ("search.objective={accuracy: 1}", "unknown metric 'accuracy'; allowed: expression_accuracy"),
    ("search.searcher.startup_trials=0", "search.searcher.startup_trials: Input should be greater than or equal to 1"),
    ("space.train.lr={loguniform: [0, 0.1]}", "space.train.lr: loguniform with a log scale needs bounds > 0"),
    ("space.train.lr={uniform: [0.1, 0.01]}", "uniform low 0.1 > high 0.01"),
    ("space.model.backbone={choice: []}", "choice needs at least one value"),
    ("space.train.lrate={uniform: [0.1, 0.2]}", "space key 'train.lrate' names no spec field"),
    ("space.model.dropout={uniform: [0.1, 1.5]}", "space entry 'model.dropout': value 1.5 is invalid"),
    ("space.model.backbone={choice: [resnet18, nope_net]}", "unknown timm backbone 'nope_net'"),
    ("space.resources.workers_per_trial={int: [1, 4]}", "must name a field under data, model, train"),
])
def test_bad_values_name_the_field_and_what_is_allowed(tiny_spec, override, expected):
    message = error_of(tiny_spec, override)
    assert message.startswith(f"{tiny_spec}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_dataset_root_says_how_to_fix(tiny_spec, tmp_path):
    message = error_of(tiny_spec, "data.source=folder", f"data.root={tmp_path / 'nowhere'}")
    assert "does not exist" in message and "--set data.root=" in message and "quickstart" in message


def test_file_problems(tmp_path):
    assert "no such spec file" in error_of(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: synthetic\nmodel: [")
    assert "invalid YAML at line" in error_of(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "expected a mapping" in error_of(listy)


def test_conditional_space_and_with_values(tiny_spec):
    spec = load_spec(tiny_spec, [
        "space.model.backbone={choice: [resnet10t, mobilenetv3_small_050]}",
        "space.train.lr=[{loguniform: [1.0e-3, 1.0e-1], when: {model.backbone: resnet10t}}, {loguniform: [1.0e-4, 1.0e-2]}]"])
    entries = spec.space_entries()
    assert [k for k, _ in entries] == ["model.backbone", "train.lr", "train.lr"]
    assert entries[1][1].when == {"model.backbone": ["resnet10t"]}
    trial = spec.with_values({"model.backbone": "mobilenetv3_small_050", "train.lr": 0.005})
    assert trial.model.backbone == "mobilenetv3_small_050" and trial.train.lr == 0.005 and trial.space == {}
    with pytest.raises(Exception):
        spec.with_values({"train.lr": -1.0})


def test_objective_drops_missing_tasks():
    search = validate_spec({}).search
    assert search.score({"expression_f1": 0.5, "valence_ccc": 0.2, "arousal_ccc": 0.4}) == pytest.approx(
        (0.5 + 0.5 * 0.2 + 0.5 * 0.4) / 2.0)
    assert search.score({"expression_f1": 0.5}) == pytest.approx(0.5)


def test_gap_penalty_prices_only_the_gap_above_what_is_allowed():
    search = validate_spec({"search": {"objective": {"expression_accuracy": 1.0},
                                       "gap_penalty": {"allowed": 0.10, "weight": 2.0}}}).search
    val = {"expression_accuracy": 0.50}
    assert search.score(val, train_accuracy=0.55) == pytest.approx(0.50)  # a 5-point gap is free
    assert search.score(val, train_accuracy=0.75) == pytest.approx(0.50 - 2.0 * 0.15)
    assert search.score(val, train_accuracy=0.30) == pytest.approx(0.50)  # val above train costs nothing
    assert search.score(val) == pytest.approx(0.50)  # no train accuracy known: nothing to price
    unlabelled = validate_spec({"search": {"gap_penalty": {}}}).search  # data without expression labels
    assert unlabelled.score({"valence_ccc": 0.2}, train_accuracy=0.9) == pytest.approx(0.2)
    plain = validate_spec({"search": {"objective": {"expression_accuracy": 1.0}}}).search
    assert plain.score(val, train_accuracy=0.99) == pytest.approx(0.50)  # off by default


def test_cli_exits_2_with_one_line_and_no_traceback(tiny_spec):
    result = subprocess.run([sys.executable, "-m", "fer_tune.cli", "train", str(tiny_spec), "--set", "train.epochs=-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epochs" in lines[0], result.stderr


OPTIMIZER_SPACE = {"train.optimizer": {"choice": ["adamw", "sgd"]},
                   "train.lr": [{"loguniform": [1.0e-4, 1.0e-2], "when": {"train.optimizer": "adamw"}},
                                {"loguniform": [1.0e-3, 1.0e-1], "when": {"train.optimizer": "sgd"}}],
                   "train.momentum": {"uniform": [0.8, 0.95], "when": {"train.optimizer": "sgd"}}}


def recipes_spec(tmp_path, train=None, **search):
    return write_spec(tmp_path / "recipes.yaml", space=OPTIMIZER_SPACE, search={"num_samples": 3, **search},
                      train={"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, **(train or {})})


@pytest.mark.parametrize("train, search, expected", [
    ({}, {"points": [{"train.momentum": 0.9}]},
     "search.points[0]: 'train.momentum' is sampled only when train.optimizer in ['sgd'], which this recipe "
     "does not have"),
    ({}, {"points": [{"model.dropout": 0.3}]}, "search.points[0]: 'model.dropout' is not a field of space:"),
    ({}, {"points": [{"train.optimizer": "sgd", "train.lr": 5.0}]},
     "search.points[0]: train.lr 5.0 lies outside the entry's loguniform [0.001, 0.1]"),
    ({}, {"points": [{"train.optimizer": "rmsprop"}]},
     "search.points[0]: train.optimizer: Input should be 'adamw' or 'sgd'"),
    ({}, {"points": [{"train.optimizer": "sgd"}, {"train.optimizer": "sgd", "train.lr": 0.01}, {}]},
     "search.points: 4 known recipes to run first (the spec itself and 3 points) but search.num_samples is 3"),
    ({"lr": 0.5}, {"start_from_spec": True},
     "search.start_from_spec: the spec's own train.lr 0.5 lies outside the entry's loguniform [0.0001, 0.01]; "
     "add it to the entry, or set search.start_from_spec: false"),
    ({"optimizer": "sgd", "lr": 0.01, "momentum": 0.99}, {"start_from_spec": True},
     "search.start_from_spec: the spec's own train.momentum 0.99 lies outside the entry's uniform [0.8, 0.95]"),
])
def test_known_recipes_must_be_ones_the_space_can_run(tmp_path, train, search, expected):
    path = recipes_spec(tmp_path, train, **search)
    message = error_of(path)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_known_recipes_pass_when_they_fit(tmp_path, tiny_spec):
    from fer_tune.search.space import known_recipes

    # by default a spec whose own values the space cannot draw just does not start from them
    unfit = load_spec(recipes_spec(tmp_path, {"lr": 0.5}))
    assert known_recipes(unfit) == [] and "train.lr 0.5 lies outside" in unfit.own_recipe_problem()
    point = {"train.optimizer": "sgd", "train.lr": 0.01, "train.momentum": 0.9}
    spec = load_spec(recipes_spec(tmp_path, points=[point]))
    assert known_recipes(spec) == [
        ("your spec", {"train.optimizer": "adamw", "train.lr[train.optimizer=adamw]": 3e-3}),
        ("search.points[0]", {"train.optimizer": "sgd", "train.lr[train.optimizer=sgd]": 0.01,
                              "train.momentum[train.optimizer=sgd]": 0.9})]
    assert spec.with_values({}).search.points == []  # a trial's (or best/'s) config has no recipes to run
    assert "search.points: a spec without a space" in error_of(tiny_spec, "search.points=[{train.lr: 0.01}]")


def test_the_searcher_runs_the_known_recipes_first_and_exactly(tmp_path):
    """Enqueued in the Optuna study, each recipe is the next trial the define-by-run sampler runs."""
    import optuna

    from fer_tune.search.space import SpaceSampler, known_recipes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    point = {"train.optimizer": "sgd", "train.lr": 0.01, "train.momentum": 0.9}
    spec = load_spec(recipes_spec(tmp_path, points=[point], num_samples=4))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    for _, params in known_recipes(spec):
        study.enqueue_trial(params)
    sampler = SpaceSampler(spec)
    for _ in range(4):
        trial = study.ask()
        sampler(trial)
        study.tell(trial, trial.params.get("train.lr[train.optimizer=adamw]", 0.0))
    assert [t.params for t in study.trials[:2]] == [params for _, params in known_recipes(spec)]
    assert all(t.params not in [p for _, p in known_recipes(spec)] for t in study.trials[2:])


@pytest.mark.parametrize("name, backbones, weight_decay", [
    ("regularization", ["efficientnet_b0", "resnet50"], 1e-5),  # both of the report's recipes: the spec, then a point
    ("resnet50_fix", ["resnet50"], 1e-6)])
def test_the_fer2013_spaces_start_from_the_reports_recipes(name, backbones, weight_decay):
    from fer_tune.search.space import known_recipes

    sets = ["data.source=synthetic"]
    spec = load_spec(REPO / "search_spaces" / f"{name}.yaml", sets)
    assert [label for label, _ in known_recipes(spec)] == ["your spec", *(f"search.points[{i}]"
                                                                          for i in range(len(backbones) - 1))]
    assert spec.search.finalists >= 3
    for backbone, recipe in zip(backbones, [spec, *(spec.with_values(point) for point in spec.search.points)]):
        report = load_spec(REPO / "search_spaces" / "report_baseline.yaml", [*sets, f"model.backbone={backbone}"])
        for section in ("model", "train", "augment", "loss"):
            mine, theirs = getattr(recipe, section).model_dump(), getattr(report, section).model_dump()
            if section == "train":  # the one stand-in: a log-scale entry cannot draw the report's 0
                assert (mine.pop("weight_decay"), theirs.pop("weight_decay")) == (weight_decay, 0.0)
            assert mine == theirs, (backbone, section)


def test_tpe_options_reach_optunas_sampler(tiny_spec):
    from fer_tune.search.space import make_sampler

    sampler = make_sampler(load_spec(tiny_spec, ["search.searcher.multivariate=true", "search.searcher.group=true",
                                                 "search.searcher.constant_liar=true"]))
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)
    plain = make_sampler(load_spec(tiny_spec))
    assert (plain._multivariate, plain._group, plain._constant_liar) == (False, False, False)
    assert "search.searcher.group: groups are a form of multivariate TPE" in error_of(
        tiny_spec, "search.searcher.group=true")


def test_asha_grace_must_fit_the_epochs_and_defaults_to_what_p3_measured(tiny_spec):
    message = error_of(REPO / "search_spaces" / "quickstart.yaml", "train.epochs=1")  # the grace period is 2
    assert ("search.scheduler.grace_period 2 is above the epoch cap (train.epochs 1): ASHA could never compare "
            "two trials; lower grace_period or raise train.epochs") in message and "\n" not in message
    assert "search.scheduler.max_t 2" in error_of(tiny_spec, "search.scheduler.grace_period=3",
                                                   "search.scheduler.max_t=2")
    default = load_spec(tiny_spec).search.scheduler
    assert default.grace_period is None and default.grace(20) == 3 and default.grace(2) == 2


@pytest.mark.parametrize("overrides, expected", [
    (["train.epochs=3", "train.freeze_epochs=3"],
     "train.freeze_epochs 3 is not below train.epochs 3: the backbone would never train"),
    (["space.model.dropout={uniform: [0.0, 0.5]}", "search.num_samples=2", "search.finalists=3"],
     "search.finalists 3 is above search.num_samples 2: there are not that many trials to re-train"),
    (["data.synthetic.n=40", "data.split.val=20", "data.split.test=20"],
     "data.split.val 20 and data.split.test 20 take all data.synthetic.n 40 faces: nothing is left to train on"),
    (["data.split.val=0.6", "data.split.test=0.4"],
     "data.split.val 0.6 and data.split.test 0.4 take the whole dataset"),
    (["space.train.momentum={uniform: [0.8, 0.95], when: {train.optimizer: sgd}}"],
     "space entry 'train.momentum': when train.optimizer in ['sgd'], which no trial can have (train.optimizer is "
     "'adamw' and not searched); the entry would never apply"),
    (["space.train.optimizer={choice: [adamw]}", "space.train.momentum={uniform: [0.8, 0.95], when: {train.optimizer: sgd}}"],
     "its entries never draw those"),
])
def test_fields_valid_alone_but_not_together_are_one_line_naming_both(tiny_spec, overrides, expected, capsys,
                                                                     tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(tiny_spec), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_conditional_entry_is_checked_as_the_trials_it_applies_to_would_run(tiny_spec):
    # freeze_epochs 4 only ever runs with 10 epochs; with the base 1 epoch it would be refused
    spec = load_spec(tiny_spec, ["train.epochs=1", "space.train.epochs={choice: [1, 10]}",
                                 "space.train.freeze_epochs={choice: [0, 4], when: {train.epochs: 10}}"])
    assert spec.space["train.freeze_epochs"].when == {"train.epochs": [10]}
    assert "train.freeze_epochs 4 is not below train.epochs 1" in error_of(
        tiny_spec, "train.epochs=1", "space.train.freeze_epochs={choice: [0, 4]}")


def test_fixing_a_field_with_set_settles_the_conditions_on_it():
    spec = read_spec(REPO / "search_spaces" / "regularization.yaml", ["data.source=synthetic", "model.backbone=resnet50"])
    assert "model.backbone" not in spec.space
    assert [(e.loguniform, e.when) for e in spec.space["train.lr"]] == [((3.0e-5, 1.0e-3), {})]  # resnet50's entry
    fixed = read_spec(REPO / "search_spaces" / "resnet50_fix.yaml", ["data.source=synthetic", "train.optimizer=adamw"])
    assert "train.momentum" not in fixed.space  # sgd's only
    assert [e.loguniform for e in fixed.space["train.lr"]] == [(1.0e-5, 3.0e-3)]


def test_fixing_a_field_with_set_drops_the_known_recipes_of_other_values():
    shipped = read_spec(REPO / "search_spaces" / "regularization.yaml", ["data.source=synthetic"])
    assert shipped.search.points == [{"model.backbone": "resnet50"}]  # the report's ResNet50 recipe
    for backbone in ("efficientnet_b0", "resnet50"):  # the other backbone's recipe, or a second copy of the spec's
        fixed = read_spec(REPO / "search_spaces" / "regularization.yaml",
                          ["data.source=synthetic", f"model.backbone={backbone}"])
        assert fixed.search.points == []
    raw = {"data": {"source": "synthetic"}, "model": {"backbone": "resnet10t"},
           "train": {"optimizer": "sgd"},
           "search": {"num_samples": 8, "points": [
               {"model.backbone": "resnet10t", "model.dropout": 0.3},    # keeps its dropout
               {"model.backbone": "resnet18", "model.dropout": 0.1},     # another backbone's recipe
               {"train.momentum": 0.85},                                  # sgd's field, gone with adamw
               {"model.dropout": 0.5}]},                                  # names neither: untouched
           "space": {"model.backbone": {"choice": ["resnet10t", "resnet18"]},
                     "model.dropout": {"uniform": [0.0, 0.6]},
                     "train.momentum": {"uniform": [0.8, 0.95], "when": {"train.optimizer": "sgd"}}}}
    spec = validate_spec(apply_overrides(copy.deepcopy(raw), ["model.backbone=resnet10t", "train.optimizer=adamw"]))
    assert spec.search.points == [{"model.dropout": 0.3}, {"model.dropout": 0.5}]
    # settled once all overrides are in: their order does not matter
    points = 'search.points=[{model.backbone: resnet18, model.dropout: 0.1}, {model.backbone: resnet10t}]'
    for order in ([points, "model.backbone=resnet18", "search.start_from_spec=false"],
                  ["search.start_from_spec=false", "model.backbone=resnet18", points]):
        settled = validate_spec(apply_overrides(copy.deepcopy(raw), order)).search
        assert settled.points == [{"model.dropout": 0.1}], order
    # a later space entry samples the field again: its recipes stay
    again = apply_overrides(copy.deepcopy(raw), ["model.backbone=resnet18",
                                                 "space.model.backbone={choice: [resnet10t, resnet18]}"])
    assert len(validate_spec(again).search.points) == 4
    # a value written as YAML reads it (1e-3 is a string to YAML, 0.001 to the field) is the same value
    lr = {**raw, "space": {**raw["space"], "train.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
          "search": {"num_samples": 8, "points": [{"train.lr": 0.001, "model.dropout": 0.3}]}}
    assert validate_spec(apply_overrides(copy.deepcopy(lr), ["train.lr=1e-3"])).search.points == [{"model.dropout": 0.3}]
    raw["search"]["start_from_spec"] = False  # then a recipe left with no values of its own is the spec's: kept
    raw["search"]["points"] = [{"model.backbone": "resnet18"}]
    assert validate_spec(apply_overrides(raw, ["model.backbone=resnet18"])).search.points == [{}]


def test_a_known_recipe_of_a_field_the_space_never_sampled_is_refused_even_when_set_fixes_it():
    raw = {"data": {"source": "synthetic"}, "model": {"backbone": "resnet10t"},
           "search": {"num_samples": 4, "points": [{"model.backbone": "resnet18", "model.dropout": 0.3}]},
           "space": {"model.dropout": {"uniform": [0.0, 0.6]}}}
    for sets in ([], ["model.backbone=resnet18"], ["model.backbone=resnet50"]):
        with pytest.raises(UserError, match="'model.backbone' is not a field of space"):
            validate_spec(apply_overrides(copy.deepcopy(raw), sets))


def test_fields_tied_by_a_rule_are_checked_in_every_combination_a_space_draws(tiny_spec):
    message = error_of(tiny_spec, "space.train.epochs={int: [2, 20]}", "space.train.freeze_epochs={int: [0, 5]}")
    assert ("space entries 'train.epochs' = 2 with 'train.freeze_epochs' = 5 cannot be drawn together: "
            "train.freeze_epochs 5 is not below train.epochs 2") in message
    load_spec(tiny_spec, ["space.train.epochs={int: [6, 20]}", "space.train.freeze_epochs={int: [0, 5]}"])


def test_a_typo_in_a_condition_is_named_as_one(tiny_spec):
    message = error_of(tiny_spec, "space.model.dropout={uniform: [0.0, 0.5], when: {model.backbon: resnet10t}}")
    assert "space key 'model.backbon' names no spec field" in message


def test_gpu_shares_are_for_one_worker_trials(tiny_spec):
    message = error_of(tiny_spec, "resources.workers_per_trial=2", "resources.gpus_per_worker=0.5")
    assert "gpus_per_worker 0.5 with workers_per_trial 2: the ranks of one trial could land on the same GPU" in message
