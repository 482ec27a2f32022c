"""The experiment report: report.md, its plots, TensorBoard curves/images, and comparing runs.

The search-side checks (HParams of every trial, errored trials listed) live in test_search.py,
on its shared search.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fer_tune.cli import main
from fer_tune.report.markdown import objective_text, with_ci
from fer_tune.spec import validate_spec
from fer_tune.report.tensorboard import hparam_value

from conftest import write_spec
from test_train import make_folder_dataset

PLOTS = ("confusion_matrix.png", "valence_arousal.png", "learning_curves.png", "class_counts.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    assert main(["train", str(write_spec(tmp / "tiny.yaml")), "--out", str(out)]) == 0
    return out


def test_report_holds_the_test_tables_of_metrics_json(trained):
    text = (trained / "report" / "report.md").read_text()
    metrics = json.loads((trained / "report" / "metrics.json").read_text())
    ci = metrics["ci95"]
    expression_row = next(line for line in text.splitlines() if line.startswith("| 0.") or line.startswith("| -0."))
    cells = [c.strip() for c in expression_row.strip("|").split("|")]
    for cell, key in zip(cells, ("accuracy", "f1_macro", "kappa", "auc_roc", "auc_pr")):
        value, (lo, hi) = metrics["expression"][key], ci["expression"][key]
        assert cell == f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    for task in ("Valence", "Arousal"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        ccc = metrics[task.lower()]["ccc"]
        assert row.rstrip(" |").endswith(f"{ccc:.3f} [{ci[task.lower()]['ccc'][0]:.3f}, {ci[task.lower()]['ccc'][1]:.3f}]")
    gap = 100 * (metrics["train_accuracy"] - metrics["val"]["expression_accuracy"])
    assert f"{gap:+.1f} pts" in text
    assert "synthetic" in text and "best/config.yaml" in text


def test_report_plots_exist_and_the_confusion_matrix_counts_the_test_split(trained):
    for name in PLOTS:
        with Image.open(trained / "report" / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
        assert f"]({name})" in (trained / "report" / "report.md").read_text()
    predictions = pd.read_csv(trained / "report" / "test_predictions.csv")
    metrics = json.loads((trained / "report" / "metrics.json").read_text())
    assert len(predictions) == metrics["test_images"]
    accuracy = (predictions["expression"] == predictions["expression_pred"]).mean()
    assert accuracy == pytest.approx(metrics["expression"]["accuracy"])  # same predictions as the metrics
    probs = predictions.filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)


def test_tensorboard_has_curves_and_the_best_epoch_confusion_image(trained):
    history = pd.read_csv(trained / "report" / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    events = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "train/accuracy", "val/expression_accuracy", "val/expression_f1",
            "val/valence_ccc", "val/arousal_ccc", "lr", "objective"} <= set(tags["scalars"])
    f1 = [e.value for e in events.Scalars("val/expression_f1")]
    assert f1 == pytest.approx(history["val_expression_f1"].tolist())
    best_epoch = json.loads((trained / "report" / "metrics.json").read_text())["best_epoch"]
    assert [e.step for e in events.Images("val/confusion_matrix")] == [best_epoch]
    confusion = json.loads((trained / "report" / "val_confusion.json").read_text())["train"]
    val_size = len(pd.read_csv(trained / "splits" / "val.csv"))
    assert sum(map(sum, confusion["matrix"])) == val_size and confusion["epoch"] == best_epoch


def test_report_command_rebuilds_without_duplicating_tensorboard_images(trained, capsys):
    before = sorted(p.name for p in (trained / "tensorboard").iterdir())
    (trained / "report" / "report.md").unlink()
    assert main(["report", str(trained)]) == 0
    assert (trained / "report" / "report.md").is_file()
    assert sorted(p.name for p in (trained / "tensorboard").iterdir()) != [] and \
        len(list((trained / "tensorboard").iterdir())) == len(before)


def test_report_compares_two_experiments(trained, tmp_path, capsys):
    other = tmp_path / "other"
    spec = write_spec(tmp_path / "other.yaml", name="other", train={"epochs": 1, "lr": 1e-3})
    assert main(["train", str(spec), "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["report", str(trained), str(other), "--out", str(tmp_path / "compare.md")]) == 0
    table = capsys.readouterr().out
    a = json.loads((trained / "report" / "metrics.json").read_text())
    b = json.loads((other / "report" / "metrics.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| expression Accuracy |"))
    assert with_ci(a["expression"]["accuracy"], a["ci95"]["expression"]["accuracy"]) in row
    assert with_ci(b["expression"]["accuracy"], b["ci95"]["expression"]["accuracy"]) in row
    assert table.startswith((tmp_path / "compare.md").read_text())


def test_report_of_data_without_valence_arousal_says_so(tmp_path):
    root = make_folder_dataset(tmp_path / "faces")
    spec = write_spec(tmp_path / "spec.yaml", data={"source": "folder", "root": str(root), "image_size": 24,
                                                    "split": {"val": 6, "test": 0.1, "seed": 0}},
                      train={"epochs": 1, "batch_size": 16})
    out = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(out)]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "Not measured (the data have no labels for them): valence, arousal." in text
    assert "### Valence and arousal" not in text
    assert not (out / "report" / "valence_arousal.png").exists()
    assert (out / "report" / "confusion_matrix.png").exists()

    # The report reads only the experiment folder: it rebuilds once the dataset has moved away,
    # and the trained model still runs (nothing re-checks data.root once the run is over).
    root.rename(tmp_path / "moved")
    (out / "report" / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "Not measured (the data have no labels for them)" in (out / "report" / "report.md").read_text()
    assert main(["export", str(out)]) == 0 and (out / "best" / "model.ts").is_file()


@pytest.mark.parametrize("value, expected", [
    (np.float32(0.5), 0.5), (np.int64(3), 3.0), (np.bool_(True), "true"), (None, None),
    (math.nan, None), ("resnet50", "resnet50"), (False, "false"), (7, 7.0)])
def test_hparam_values_become_types_the_plugin_accepts(value, expected):
    converted = hparam_value(value)
    assert converted == expected and type(converted) is type(expected)


def test_the_report_names_the_gap_penalty_when_the_objective_pays_it():
    plain = validate_spec({"search": {"objective": {"expression_f1": 1.0}}})
    priced = validate_spec({"search": {"objective": {"expression_f1": 1.0},
                                       "gap_penalty": {"allowed": 0.05, "weight": 2.0}}})
    assert objective_text(plain) == "1·expression_f1, normalised by the weights"
    assert objective_text(priced).endswith("less 2 × the train − val accuracy gap above 5 points")


def test_the_parallel_coordinates_plot_draws_a_true_false_choice_as_two_categories(tmp_path):
    """resnet50_fix.yaml searches `train.decay_norm_and_bias: {choice: [false, true]}`; read back
    from trials.csv such a column is boolean, which numpy cannot subtract, and the whole report
    was lost to it (found on the P4 benchmark)."""
    import io

    import matplotlib.pyplot as plt

    from fer_tune.report.figures import parallel_coordinates_figure

    trials = pd.read_csv(io.StringIO(
        "trial_id,train.decay_norm_and_bias,train.grad_clip,train.lr,stop_reason,best_objective\n"
        "a,True,,0.001,completed,0.42\n"
        "b,False,True,0.01,completed,0.31\n"
        "c,True,False,0.0001,completed,0.38\n"))
    assert trials["train.decay_norm_and_bias"].dtype == bool  # what the report reads
    fig = parallel_coordinates_figure(trials, ["train.decay_norm_and_bias", "train.grad_clip", "train.lr"],
                                      "best_objective")
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert texts.count("False") == 2 and texts.count("True") == 2  # both flag axes, as categories
    assert "0.0001" in texts and "0.01" in texts  # the number axis still spans its values
