"""The spec: YAML -> validated Spec, --set overrides, space entries, one-line errors."""

import subprocess
import sys

import pytest

from fer_tune.errors import UserError
from fer_tune.spec import Spec, validate_spec
from fer_tune.specfile import load_spec

from conftest import REPO, write_spec


def error_of(path, *overrides) -> str:
    with pytest.raises(UserError) as info:
        load_spec(path, list(overrides))
    return str(info.value)


def test_shipped_specs_load():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        spec = load_spec(path, [] if "quickstart" in path.name else ["data.source=synthetic"])
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


def test_cli_exits_2_with_one_line_and_no_traceback(tiny_spec):
    result = subprocess.run([sys.executable, "-m", "fer_tune.cli", "train", str(tiny_spec), "--set", "train.epochs=-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epochs" in lines[0], result.stderr
