"""The bad-input catalogue: every kind of mistake a user can make, through the real CLI.

Each case builds its own tiny fixture in ``tmp_path`` and runs ``fer_tune.cli.main`` in-process;
a few also run as a real ``python -m fer_tune.cli`` process. Every one must end with exit status
2 and a short stderr (one line, at most 3) that names the file / field / path at fault and says
what would be valid -- never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_tune.cli import main

from conftest import write_spec

CASES: dict[str, object] = {}


def case(fn):
    """Register ``fn(tmp_path) -> (argv, fragments)``: the CLI arguments, and the strings the
    error must contain (``{tmp}`` in a fragment stands for ``tmp_path``)."""
    CASES[fn.__name__] = fn
    return fn


# --- tiny fixtures ---------------------------------------------------------------------------


def image(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def folder_dataset(root: Path, classes=("happy", "sad"), per_class: int = 8, split: str = "") -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            image(root / split / name / f"{i}.png", seed=100 * c + i)
    return root


def csv_dataset(root: Path, rows: list[str], header: str = "path,expression,valence,arousal") -> Path:
    for i in range(4):
        image(root / f"img{i}.png", seed=i)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "labels.csv"


def spec(tmp: Path, **sections) -> str:
    return str(write_spec(tmp / "spec.yaml", **sections))


def folder_spec(tmp: Path, root: Path) -> str:
    return spec(tmp, data={"source": "folder", "root": str(root)})


# --- the spec file ---------------------------------------------------------------------------


@case
def missing_spec_file(tmp):
    return ["train", tmp / "nope.yaml"], ["{tmp}/nope.yaml", "no such spec file"]


@case
def spec_is_a_folder(tmp):
    (tmp / "specs").mkdir()
    return ["train", tmp / "specs"], ["{tmp}/specs", "is a folder, expected a spec YAML file"]


@case
def spec_not_utf8(tmp):
    path = tmp / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\nmodel: {dropout: 0.1}\n")
    return ["train", path], ["{tmp}/latin1.yaml", "UTF-8"]


@case
def invalid_yaml(tmp):
    path = tmp / "broken.yaml"
    path.write_text("data: {source: synthetic\nmodel: [\n")
    return ["train", path], ["{tmp}/broken.yaml", "invalid YAML at line"]


@case
def spec_not_a_mapping(tmp):
    path = tmp / "list.yaml"
    path.write_text("- data\n- model\n")
    return ["run", path], ["{tmp}/list.yaml", "expected a mapping of sections"]


@case
def unknown_top_level_key(tmp):
    return ["train", spec(tmp, optimiser={"lr": 0.1})], [
        "{tmp}/spec.yaml", "unknown key 'optimiser'", "allowed: name, data, model, train"]


@case
def unknown_nested_key(tmp):
    return ["train", spec(tmp, model={"dropot": 0.1})], [
        "{tmp}/spec.yaml", "unknown key 'model.dropot'", "allowed: backbone, dropout, pretrained"]


@case
def wrong_type(tmp):
    return ["train", spec(tmp, train={"lr": "fast"})], [
        "{tmp}/spec.yaml", "train.lr", "valid number", "'fast'"]


@case
def batch_size_zero(tmp):
    return ["train", spec(tmp), "--set", "train.batch_size=0"], [
        "{tmp}/spec.yaml", "train.batch_size", "greater than or equal to 1", "got 0"]


@case
def epochs_negative(tmp):
    return ["train", spec(tmp, train={"epochs": -1})], [
        "{tmp}/spec.yaml", "train.epochs", "greater than or equal to 1", "got -1"]


@case
def image_size_zero(tmp):
    return ["run", spec(tmp), "--set", "data.image_size=0"], [
        "{tmp}/spec.yaml", "data.image_size", "greater than or equal to 16"]


@case
def split_size_not_count_or_fraction(tmp):
    return ["train", spec(tmp), "--set", "data.split.val=2.5"], [
        "{tmp}/spec.yaml", "data.split.val", "count (whole number >= 1) or a fraction"]


@case
def experiment_name_with_space(tmp):
    return ["train", spec(tmp, name="my run")], ["{tmp}/spec.yaml", "name", "pattern"]


@case
def lr_not_finite(tmp):
    return ["train", spec(tmp), "--set", "train.lr=.inf"], [
        "{tmp}/spec.yaml", "train.lr", "finite number", "got inf"]


@case
def use_gpu_not_a_choice(tmp):
    return ["train", spec(tmp), "--set", "resources.use_gpu=maybe"], [
        "{tmp}/spec.yaml", "resources.use_gpu", "valid boolean or 'auto'", "got 'maybe'"]


# --- the search space ------------------------------------------------------------------------


@case
def space_low_above_high(tmp):
    return ["run", spec(tmp, space={"model.dropout": {"uniform": [0.5, 0.1]}})], [
        "{tmp}/spec.yaml", "space.model.dropout", "uniform low 0.5 > high 0.1"]


@case
def loguniform_non_positive(tmp):
    return ["run", spec(tmp, space={"train.lr": {"loguniform": [0.0, 0.1]}})], [
        "{tmp}/spec.yaml", "space.train.lr", "needs bounds > 0"]


@case
def empty_choice(tmp):
    return ["run", spec(tmp, space={"model.backbone": {"choice": []}})], [
        "{tmp}/spec.yaml", "space.model.backbone", "choice needs at least one value"]


@case
def space_key_names_no_field(tmp):
    return ["run", spec(tmp, space={"train.lrate": {"uniform": [0.1, 0.2]}})], [
        "{tmp}/spec.yaml", "space key 'train.lrate' names no spec field", "allowed there:", "lr"]


@case
def space_value_invalid_for_field(tmp):
    return ["run", spec(tmp, space={"model.dropout": {"uniform": [0.1, 1.5]}})], [
        "{tmp}/spec.yaml", "space entry 'model.dropout': value 1.5 is invalid", "less than 1"]


@case
def int_bounds_not_whole(tmp):
    return ["run", spec(tmp, space={"train.epochs": {"int": [1.5, 3]}})], [
        "{tmp}/spec.yaml", "space.train.epochs.int.0", "valid integer", "int takes [low, high]"]


# --- the model -------------------------------------------------------------------------------


@case
def unknown_backbone(tmp):
    return ["train", spec(tmp), "--set", "model.backbone=resnet9000"], [
        "{tmp}/spec.yaml", "model.backbone", "unknown timm backbone 'resnet9000'", "timm.list_models"]


@case
def pretrained_weights_missing(tmp):
    return ["train", spec(tmp), "--set", f"model.pretrained={tmp / 'weights.pth'}"], [
        "{tmp}/spec.yaml", "model.pretrained", "{tmp}/weights.pth", "does not exist"]


# --- the data --------------------------------------------------------------------------------


@case
def unknown_data_source(tmp):
    return ["train", spec(tmp), "--set", "data.source=imagenet"], [
        "{tmp}/spec.yaml", "data.source", "'synthetic', 'affectnet'", "'folder' or 'csv'"]


@case
def data_root_missing(tmp):
    return ["train", folder_spec(tmp, tmp / "no-such-data")], [
        "{tmp}/spec.yaml", "data", "root '{tmp}/no-such-data' does not exist", "--set data.root=PATH"]


@case
def data_root_not_set(tmp):
    return ["train", spec(tmp, data={"source": "csv"})], [
        "{tmp}/spec.yaml", "source 'csv' needs a root", "--set data.root=PATH"]


@case
def empty_dataset(tmp):
    (tmp / "faces").mkdir()
    return ["train", folder_spec(tmp, tmp / "faces"), "--out", tmp / "run"], [
        "no images found under {tmp}/faces", "[<split>/]<class>/*.jpg"]


@case
def class_folder_without_images(tmp):
    root = folder_dataset(tmp / "faces", classes=("happy",))
    (root / "sad").mkdir()
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "{tmp}/faces/sad", "class folder has no images", ".jpg"]


@case
def non_image_files_only(tmp):
    root = tmp / "faces"
    for name in ("happy", "sad"):
        (root / name).mkdir(parents=True)
        (root / name / "notes.txt").write_text("not an image")
        (root / name / "labels.json").write_text("{}")
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "{tmp}/faces/happy", "class folder has no images", ".jpg, .jpeg, .png"]


@case
def unknown_class_folder(tmp):
    root = folder_dataset(tmp / "faces")
    image(root / "smirk" / "0.png")
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "{tmp}/faces/smirk", "neither a class nor a split folder", "valid class folders: neutral, happy"]


@case
def truncated_images(tmp):
    root = folder_dataset(tmp / "faces", per_class=10)
    for name in ("happy", "sad"):
        for i in range(0, 10, 2):
            path = root / name / f"{i}.png"
            path.write_bytes(path.read_bytes()[:60])
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "unreadable image(s) in the train split", "{tmp}/faces/", ".png", "data.skip_bad"]


@case
def image_files_that_are_not_images(tmp):
    root = folder_dataset(tmp / "faces", per_class=10)
    for name in ("happy", "sad"):
        for i in range(10, 20):
            (root / name / f"{i}.jpg").write_text("this is not a jpeg")
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "unreadable image(s) in the train split", "{tmp}/faces/", "not an image", "data.skip_bad"]


@case
def csv_expression_out_of_range(tmp):
    labels = csv_dataset(tmp / "faces", ["img0.png,1,0.1,0.2", "img1.png,12,0.1,0.2"])
    return ["train", spec(tmp, data={"source": "csv", "root": str(labels)}), "--out", tmp / "run"], [
        "{tmp}/faces/labels.csv line 3", "expression '12' is out of range", "valid: 0..7"]


@case
def csv_valence_out_of_range(tmp):
    labels = csv_dataset(tmp / "faces", ["img0.png,1,0.1,0.2", "img1.png,2,1.7,0.2"])
    return ["train", spec(tmp, data={"source": "csv", "root": str(labels)}), "--out", tmp / "run"], [
        "{tmp}/faces/labels.csv line 3", "valence 1.7 is outside [-1, 1]"]


@case
def csv_missing_column(tmp):
    labels = csv_dataset(tmp / "faces", ["img0.png,0.1,0.2"], header="path,valence,arousal")
    return ["train", spec(tmp, data={"source": "csv", "root": str(labels)}), "--out", tmp / "run"], [
        "{tmp}/faces/labels.csv", "missing column 'expression'", "required columns: path, expression"]


@case
def csv_lists_missing_images(tmp):
    labels = csv_dataset(tmp / "faces", ["img0.png,1,,", "gone.png,2,,"])
    return ["train", spec(tmp, data={"source": "csv", "root": str(labels)}), "--out", tmp / "run"], [
        "{tmp}/faces/labels.csv", "1 image file(s) listed there do not exist", "gone.png"]


@case
def csv_path_escapes_the_dataset_root(tmp):
    image(tmp / "secret.png")
    labels = csv_dataset(tmp / "faces", ["img0.png,1,,", "../secret.png,2,,"])
    return ["train", spec(tmp, data={"source": "csv", "root": str(labels)}), "--out", tmp / "run"], [
        "{tmp}/faces/labels.csv", "path escapes the dataset root", "../secret.png"]


@case
def split_larger_than_data(tmp):
    return ["train", spec(tmp), "--set", "data.split.test=100000", "--out", tmp / "run"], [
        "data.split.val 0.2 and data.split.test 100000 take all data.synthetic.n 160 faces", "lower them"]


@case
def class_only_in_the_test_split(tmp):
    root = folder_dataset(tmp / "faces", classes=("happy", "sad"), per_class=8, split="train")
    folder_dataset(root, classes=("happy", "sad", "angry"), per_class=3, split="test")
    return ["train", folder_spec(tmp, root), "--out", tmp / "run"], [
        "{tmp}/faces", "test split has expression classes the training split lacks: 6 (anger)"]


@case
def split_differs_from_existing_one(tmp):
    out = tmp / "run"
    (out / "splits").mkdir(parents=True)
    (out / "splits" / "split.json").write_text('{"val": 0.5, "test": 0.2, "seed": 0, "table": "x"}')
    return ["train", spec(tmp), "--out", out], [
        "{tmp}/run/splits", "never redrawn silently", "use another --out folder"]


# --- resources and the output folder ---------------------------------------------------------


@case
def workers_per_trial_never_placeable(tmp):
    return ["run", spec(tmp), "--set", "resources.workers_per_trial=64", "--out", tmp / "run"], [
        "resources.workers_per_trial: 64 workers", "can never be placed", "lower workers_per_trial"]


@case
def in_trial_with_several_workers(tmp):
    return ["run", spec(tmp, resources={"trainer": "in_trial", "workers_per_trial": 2})], [
        "{tmp}/spec.yaml", "resources", "trainer: in_trial trains in one process", "need torch_trainer"]


@case
def in_trial_with_checkpoint_storage(tmp):
    return ["run", spec(tmp, resources={"trainer": "in_trial"}), "--storage", tmp / "checkpoints"], [
        "resources.trainer: in_trial keeps checkpoints in the experiment folder", "search.storage needs torch_trainer"]


@case
def use_gpu_without_gpu(tmp):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    return ["train", spec(tmp), "--set", "resources.use_gpu=true", "--out", tmp / "run"], [
        "resources.use_gpu: true", "no CUDA GPU", "use auto or false"]


@case
def train_out_inside_a_file(tmp):
    (tmp / "afile").write_text("a regular file")
    return ["train", spec(tmp), "--out", tmp / "afile" / "run"], [
        "{tmp}/afile/run", "not writable", "--out"]


@case
def run_out_inside_a_file(tmp):
    (tmp / "afile").write_text("a regular file")
    return ["run", spec(tmp), "--out", tmp / "afile" / "run"], [
        "{tmp}/afile/run", "not writable", "--out"]


@case
def resume_folder_of_another_spec(tmp):
    out = tmp / "run"
    out.mkdir()
    write_spec(out / "spec.yaml", name="other", train={"epochs": 7})
    return ["run", spec(tmp), "--out", out, "--resume"], [
        "{tmp}/run", "holds a different experiment", "use another --out"]


@case
def resume_empty_folder(tmp):
    (tmp / "run").mkdir()
    return ["run", spec(tmp), "--out", tmp / "run", "--resume"], [
        "--resume", "{tmp}/run", "no experiment to resume", "spec.yaml"]


@case
def out_is_an_existing_file(tmp):
    (tmp / "afile").write_text("a regular file")
    return ["train", spec(tmp), "--out", tmp / "afile"], [
        "{tmp}/afile", "is an existing file, not a folder", "--out"]


@case
def recipe_diverges(tmp):
    return ["train", spec(tmp, train={"epochs": 1, "lr": 1e12}), "--out", tmp / "run"], [
        "the recipe diverged", "lower train.lr (now 1e+12)", "train.grad_clip"]


# --- the command line ------------------------------------------------------------------------


@case
def set_without_equals(tmp):
    return ["train", spec(tmp), "--set", "train.lr"], [
        "--set 'train.lr'", "expected dotted.key=value"]


@case
def set_into_a_value(tmp):
    return ["train", spec(tmp), "--set", "train.lr.max=0.1"], [
        "--set train.lr.max", "'lr' is a value, not a section"]


@case
def unknown_command(tmp):
    return ["tune", spec(tmp)], ["invalid choice: 'tune'", "choose from"]


@case
def synth_count_zero(tmp):
    return ["data", "synth", "--out", tmp / "synth", "--n", "0"], ["--n 0: must be >= 1"]


@case
def synth_label_noise_out_of_range(tmp):
    return ["data", "synth", "--out", tmp / "synth", "--label-noise", "5"], [
        "--label-noise 5: must be between 0 and 1"]


@case
def synth_out_inside_a_file(tmp):
    (tmp / "afile").write_text("a regular file")
    return ["data", "synth", "--out", tmp / "afile" / "synth", "--n", "4"], [
        "{tmp}/afile/synth", "not writable", "--out"]


# --- evaluate --------------------------------------------------------------------------------


@case
def evaluate_folder_without_model(tmp):
    (tmp / "run").mkdir()
    return ["evaluate", tmp / "run"], ["{tmp}/run", "no trained model here", "best/model.pt"]


@case
def report_missing_folder(tmp):
    return ["report", tmp / "nowhere"], ["{tmp}/nowhere", "no finished experiment here"]


@case
def report_of_unfinished_experiment(tmp):
    (tmp / "run").mkdir()
    write_spec(tmp / "run" / "spec.yaml")
    return ["report", tmp / "run"], ["{tmp}/run", "no report/metrics.json"]


@case
def report_corrupt_metrics(tmp):
    (tmp / "run" / "report").mkdir(parents=True)
    (tmp / "run" / "report" / "metrics.json").write_text("{not json")
    return ["report", tmp / "run"], ["{tmp}/run/report/metrics.json", "not valid JSON"]


@case
def evaluate_missing_path(tmp):
    return ["evaluate", tmp / "never-trained"], ["{tmp}/never-trained", "does not exist"]


@case
def evaluate_corrupt_model_file(tmp):
    best = tmp / "run" / "best"
    best.mkdir(parents=True)
    write_spec(best / "config.yaml")
    (best / "model.pt").write_bytes(b"not a torch file")
    return ["evaluate", tmp / "run", "--out", tmp / "eval"], [
        "{tmp}/run/best/model.pt", "not a readable model file"]


@case
def evaluate_weights_of_another_backbone(tmp):
    import torch

    from fer_tune.model import create_model
    from fer_tune.spec import ModelSpec

    best = tmp / "run" / "best"
    best.mkdir(parents=True)
    write_spec(best / "config.yaml", model={"backbone": "mobilenetv3_small_050"})
    weights = create_model(ModelSpec(backbone="resnet10t")).state_dict()
    torch.save({"model": weights, "labels": list(range(8))}, best / "model.pt")
    return ["evaluate", best, "--out", tmp / "eval"], [
        "{tmp}/run/best/model.pt", "do not fit model.backbone 'mobilenetv3_small_050'",
        "{tmp}/run/best/config.yaml", "missing"]


# --- running the cases -----------------------------------------------------------------------


def check(code, out: str, err: str, fragments: list[str], tmp: Path) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, f"exit status {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, f"stderr is {len(lines)} lines:\n{err}"
    text = " ".join(lines)
    for fragment in fragments:
        fragment = fragment.replace("{tmp}", str(tmp))
        assert fragment in text, f"{fragment!r} not in stderr: {err}"


def run_in_process(argv: list, capsys) -> tuple:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def shutdown_ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_clear_line(name, tmp_path, capsys, request):
    if name == "workers_per_trial_never_placeable":
        request.getfixturevalue("shutdown_ray")  # the one case that starts a local Ray cluster
    argv, fragments = CASES[name](tmp_path)
    code, out, err = run_in_process(argv, capsys)
    check(code, out, err, fragments, tmp_path)


@pytest.mark.parametrize("name", ["missing_spec_file", "set_without_equals", "evaluate_folder_without_model"])
def test_bad_input_in_a_real_process(name, tmp_path):
    argv, fragments = CASES[name](tmp_path)
    result = subprocess.run([sys.executable, "-m", "fer_tune.cli", *map(str, argv)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    check(result.returncode, result.stdout, result.stderr, fragments, tmp_path)


@pytest.mark.parametrize("command", [
    ["train", "missing.yaml"], ["run", "missing.yaml"], ["train", "{spec}", "--set", "train.epochs=-1"],
    ["evaluate", "missing"], ["predict", "missing", "face.jpg"], ["export", "missing"],
    ["distill", "missing", "{spec}"], ["distill", "{spec}", "missing.yaml"]])
def test_a_mistyped_spec_or_model_is_answered_before_torch_or_ray_load(command, tmp_path):
    """The one-line answer to a typo comes from the spec or the path alone: seconds of importing
    torch, timm and Ray would come first otherwise."""
    spec = write_spec(tmp_path / "s.yaml")
    argv = [a.format(spec=spec) for a in command]
    probe = ("import sys; from fer_tune.cli import main; code = main(sys.argv[1:]); "
             "print(code, sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["2", "[]"], (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "fer-tune: error:" in result.stderr


def test_catalogue_is_complete():
    assert len(CASES) >= 25
