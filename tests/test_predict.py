"""`fer-tune export` and `fer-tune predict`: every form of a model answers the same, per face."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fer_tune.cli import main
from fer_tune.data.cache import load_images
from fer_tune.data.sources import load_table
from fer_tune.engine.runtime import load_runtime
from fer_tune.data.faces import make_detector, read_photo
from fer_tune.model import create_model
from fer_tune.commands.predict import PROBABILITY_COLUMNS, predict_photos, to_batch
from fer_tune.specfile import load_spec
from fer_tune.engine.artifacts import export_best

from composed import compose, matches, write_pictures
from conftest import FER2013, write_spec

needs_fer = pytest.mark.skipif(not FER2013.is_dir(), reason=f"{FER2013} is absent")


def has_onnx() -> bool:
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A tiny untrained model exported as `fer-tune train` would: run/best/{config.yaml, model.pt}."""
    root = tmp_path_factory.mktemp("model")
    spec = load_spec(write_spec(root / "spec.yaml", model={"backbone": "test_resnet", "dropout": 0.1},
                                data={"source": "synthetic", "image_size": 48}))
    torch.manual_seed(0)
    net = create_model(spec.model)
    with torch.no_grad():  # heads far from zero, so the forms' answers differ visibly if they differ
        for head in (net.expression, net.valence, net.arousal):
            head.weight.normal_(0, 0.5)
    export_best(root / "run" / "best", spec, net.state_dict(), list(range(8)))
    return root / "run"


@pytest.fixture(scope="module")
def exported(experiment):
    formats = "torchscript,onnx" if has_onnx() else "torchscript"
    assert main(["export", str(experiment), "--format", formats]) == 0
    return experiment


def test_exported_models_match_pytorch_on_the_same_batch(exported):
    best = exported / "best"
    images = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(1)).numpy()
    expected = load_runtime(best / "model.pt")(images)
    assert expected[0].shape == (5, 8) and expected[1].shape == (5,)
    forms = ["model.ts"] + (["model.onnx"] if has_onnx() else [])
    for form in forms:
        got = load_runtime(best / form)(images)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=form)
    if not has_onnx():
        pytest.skip("onnx extra not installed: only TorchScript checked (pip install 'fer-tune[onnx]')")


@needs_fer
def test_predict_gives_one_row_per_face_and_the_same_answers_from_every_form(exported, tmp_path, capsys):
    truth = write_pictures(tmp_path / "photos", count=4, per_picture=3, seed=1)
    Image.fromarray(compose([], seed=5)[0]).save(tmp_path / "photos" / "no_face.jpg")
    (tmp_path / "photos" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    best = exported / "best"
    models = [exported, best, best / "model.pt", best / "model.ts"] + ([best / "model.onnx"] if has_onnx() else [])
    tables = []
    for i, model in enumerate(models):
        out = tmp_path / f"out{i}"
        assert main(["predict", str(model), str(tmp_path / "photos"), "--out", str(out)]) == 0
        tables.append(pd.read_csv(out / "predictions.csv"))
    stderr = capsys.readouterr().err
    assert "corrupt.png" in stderr and "no face: " in stderr  # reported, not fatal

    table = tables[0]
    detector = make_detector("auto")  # what predict uses by default
    for path, boxes in truth.items():
        rows = table[table["image"] == str(path)]
        found = [tuple(r) for r in rows[["x", "y", "w", "h"]].itertuples(index=False)]
        assert len(rows) == len(detector.find(read_photo(path)))  # one row per detected face
        assert matches(boxes, found)[1] == 0  # every row is a real face
    assert sum(matches(b, [tuple(r) for r in table[table["image"] == str(p)][["x", "y", "w", "h"]]
                                                    .itertuples(index=False)])[0]
               for p, b in truth.items()) >= 7  # of 12 (test_faces measures the hit rate)
    assert not (table["image"].str.endswith("no_face.jpg")).any()
    np.testing.assert_allclose(table[PROBABILITY_COLUMNS].sum(axis=1), 1, atol=1e-5)
    assert table["expression"].tolist() == [PROBABILITY_COLUMNS[i][2:] for i in
                                            np.argmax(table[PROBABILITY_COLUMNS].to_numpy(), axis=1)]
    for other in tables[1:]:
        assert other[["image", "face", "x", "y", "w", "h"]].equals(table[["image", "face", "x", "y", "w", "h"]])
        numbers = [*PROBABILITY_COLUMNS, "valence", "arousal"]
        np.testing.assert_allclose(other[numbers].to_numpy(), table[numbers].to_numpy(), atol=1e-4)

    annotated = sorted(p.name for p in (tmp_path / "out0" / "annotated").iterdir())
    assert annotated == sorted([p.name for p in truth] + ["no_face.jpg"])  # corrupt.png has none
    assert min(Image.open(tmp_path / "out0" / "annotated" / "no_face.jpg").size) >= 360


def test_no_detect_feeds_the_network_what_training_fed_it(experiment, tmp_path, capsys):
    """--no-detect on a class-folder dataset = the training cache's pixels through the same network."""
    rng = np.random.default_rng(0)
    for i, (name, shape) in enumerate([("happy", (40, 40)), ("happy", (64, 80, 3)), ("sad", (100, 90, 4)),
                                       ("sad", (48, 48))]):
        (tmp_path / "faces" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "faces" / name / f"{i}.png")
    runtime = load_runtime(experiment)
    spec = load_spec(write_spec(tmp_path / "s.yaml", data={"source": "folder", "root": str(tmp_path / "faces"),
                                                          "image_size": 48}))
    table = load_table(spec.data)
    cached, kept = load_images(spec.data, table, "test", tmp_path / "cache", progress=False)
    expected = runtime(to_batch(list(cached)))

    result = predict_photos(runtime, [tmp_path / "faces"], detect=False, progress=False)
    got = result.table.set_index("image").loc[[str(tmp_path / "faces" / p) for p in kept["image"]]]
    np.testing.assert_allclose(got[PROBABILITY_COLUMNS].to_numpy(), expected[0], atol=1e-6)
    np.testing.assert_allclose(got["valence"].to_numpy(), expected[1], atol=1e-6)
    assert (got[["x", "y"]] == 0).all().all() and got.loc[str(tmp_path / "faces" / "happy" / "1.png"), "w"] == 80

    # Without --out the CSV goes to stdout: one header line plus one line per image.
    assert main(["predict", str(experiment), str(tmp_path / "faces"), "--no-detect"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 4


def test_a_picture_without_a_face_gives_zero_rows(experiment, tmp_path):
    Image.fromarray(compose([], seed=2)[0]).save(tmp_path / "wall.jpg")
    result = predict_photos(load_runtime(experiment), [tmp_path / "wall.jpg"], annotate_dir=tmp_path / "a",
                            progress=False)
    assert len(result.table) == 0 and result.no_face == [str(tmp_path / "wall.jpg")]
    assert (tmp_path / "a" / "wall.jpg").exists()


def test_bad_inputs_are_one_line_and_exit_2(experiment, tmp_path, capsys, monkeypatch):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(compose([], seed=1)[0]).save(photo)
    (tmp_path / "empty").mkdir()
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "model.ts").write_bytes(b"not a model")
    (experiment / "best" / "broken.ts").write_bytes(b"not a model")
    renamed = tmp_path / "renamed" / "best"  # a config.yaml whose backbone this timm does not know
    renamed.mkdir(parents=True)
    (renamed / "model.pt").write_bytes((experiment / "best" / "model.pt").read_bytes())
    (renamed / "config.yaml").write_text((experiment / "best" / "config.yaml").read_text().replace(
        "backbone: test_resnet", "backbone: test_resnet_v9"))
    cases = {
        ("predict", str(renamed.parent), str(photo)): "unknown timm backbone 'test_resnet_v9'",
        ("export", str(renamed.parent)): "unknown timm backbone 'test_resnet_v9'",
        ("evaluate", str(renamed.parent)): "unknown timm backbone 'test_resnet_v9'",
        ("predict", str(tmp_path / "nope"), str(photo)): "does not exist",
        ("predict", str(experiment), str(tmp_path / "missing.jpg")): "no such file or folder",
        ("predict", str(experiment), str(tmp_path / "empty")): "no images",
        ("predict", str(experiment), str(photo), "--margin", "-1"): "--margin -1",
        ("predict", str(tmp_path / "lonely" / "model.ts"), str(photo)): "no config.yaml beside it",
        ("predict", str(experiment / "best" / "broken.ts"), str(photo)): "not a readable TorchScript model",
        ("predict", str(experiment), str(photo), "--out", str(photo)): "is an existing file",
        ("predict", str(experiment), str(tmp_path), "--out", str(tmp_path / "p")): "is inside",
        ("export", str(experiment), "--format", "tflite"): "unknown format 'tflite'",
        ("export", str(tmp_path / "empty")): "no trained model here",
        ("data", "faces", "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "c")): "does not exist",
        ("data", "faces", "--in", str(tmp_path), "--out", str(tmp_path / "c")): "is inside --in",
        ("data", "faces", "--in", str(tmp_path / "empty"), "--out", str(tmp_path / "c")): "no images",
        ("data", "faces", "--in", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--size", "8"): "--size 8",
    }
    for argv, fragment in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and fragment in err and "Traceback" not in err, (argv, err)

    # Without the onnx extra, exporting or running ONNX says how to get it.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(experiment), "--format", "onnx"]) == 2
    assert "pip install 'fer-tune[onnx]'" in capsys.readouterr().err
    (experiment / "best" / "fake.onnx").write_bytes(b"x")
    assert main(["predict", str(experiment / "best" / "fake.onnx"), str(photo)]) == 2
    assert "pip install 'fer-tune[onnx]'" in capsys.readouterr().err
