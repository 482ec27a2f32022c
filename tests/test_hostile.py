"""Hostile files, broken state, odd data: each refused (or read right) in one line, nothing run,
nothing lost.

Every CLI case asserts the exit status, a one-line message naming the problem, no traceback, and,
for files that carry code, that the code never ran (it would have created a marker file).
"""

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_tune.cli import main
from fer_tune.data.images import read_rgb
from fer_tune.engine.artifacts import export_best
from fer_tune.errors import UserError
from fer_tune.io import folder_lock
from fer_tune.model import create_model
from fer_tune.specfile import load_spec

from conftest import write_spec


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


class RunsCode:
    """Unpickling this runs a shell command that leaves `marker` behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny exported model (untrained weights): run/best/{config.yaml, model.pt}."""
    root = tmp_path_factory.mktemp("hostile")
    spec = load_spec(write_spec(root / "spec.yaml", model={"backbone": "test_resnet", "dropout": 0.1},
                                data={"source": "synthetic", "image_size": 24, "synthetic": {"n": 80, "identities": 20}}))
    export_best(root / "run" / "best", spec, create_model(spec.model).state_dict(), list(range(8)))
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(root / "face.png")
    return root


def code_carrying_copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the exported model whose model.pt is a pickle that runs code; and its marker."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "labels": list(range(8))}, run / "best" / "model.pt")
    return run, marker


@pytest.mark.parametrize("command", ["evaluate", "export", "predict", "distill", "pretrained"])
def test_a_model_file_carrying_code_is_refused_without_running_it(trained, tmp_path, capsys, command):
    run, marker = code_carrying_copy(trained, tmp_path)
    student = write_spec(tmp_path / "student.yaml", train={"epochs": 1})
    argv = {"evaluate": ["evaluate", str(run)],
            "export": ["export", str(run), "--format", "torchscript"],
            "predict": ["predict", str(run), str(trained / "face.png"), "--no-detect", "--out", str(tmp_path / "p")],
            "distill": ["distill", str(run), str(student), "--out", str(tmp_path / "d")],
            "pretrained": ["train", str(write_spec(tmp_path / "ft.yaml", model={"backbone": "test_resnet",
                                                                               "pretrained": str(run / "best" / "model.pt")},
                                                   train={"epochs": 1})), "--out", str(tmp_path / "t")]}[command]
    assert main(argv) == 2
    one_line_error(capsys, "model.pt")
    assert not marker.exists(), "the pickled code ran"


def test_a_weights_file_carrying_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": RunsCode(marker)}, tmp_path / "weights.pth")
    spec = write_spec(tmp_path / "s.yaml", model={"backbone": "test_resnet", "pretrained": str(tmp_path / "weights.pth")},
                      train={"epochs": 1})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "weights.pth", "not a readable weights file")
    assert not marker.exists()


BILLION_LAUGHS = "name: bomb\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9)) \
    + "train: {lr: *l8}\n"


@pytest.mark.parametrize("text, expected", [
    (BILLION_LAUGHS, "YAML expands to more than 100,000 values"),
    ("name: loop\ntrain: &t {lr: *t}\n", "a YAML alias refers to the collection it is in"),
    ("name: deep\ntrain: {lr: " + "[" * 3000 + "]" * 3000 + "}\n", "YAML nested too deeply"),
    ("name: tag\ntrain: {lr: !!python/object/apply:os.system [\"touch MARKER\"]}\n",
     "could not determine a constructor for the tag"),
], ids=["billion-laughs", "self-alias", "deep", "python-tag"])
def test_hostile_yaml_is_refused_quickly_and_runs_nothing(tmp_path, capsys, text, expected):
    marker = tmp_path / "code-ran"
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace("MARKER", str(marker)))
    started = time.perf_counter()
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - started < 15  # not a hang (about 1.5 s on an idle 2-core machine)
    one_line_error(capsys, str(spec), expected)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_huge_wrong_value_is_named_briefly(tiny_spec, tmp_path, capsys):
    huge = "[" + ", ".join(["[" + ", ".join(["1"] * 200) + "]"] * 200) + "]"
    assert main(["train", str(tiny_spec), "--set", f"train.lr={huge}", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys, "train.lr: Input should be a valid number")
    assert len(err) < 400


def test_odd_image_modes_are_read_as_the_face_they_show(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    sixteen = read_rgb(tmp_path / "gray16.png")
    assert sixteen.dtype == np.uint8 and sixteen.min() == 0 and sixteen.max() == 255
    assert abs(float(sixteen.mean()) - 127.5) < 2  # scaled, not clipped to white
    colour = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(colour).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([colour, np.full((32, 32), 7, np.uint8)]), "RGBA").save(tmp_path / "alpha.png")
    for name in ("cmyk.jpg", "palette.png", "alpha.png"):
        image = read_rgb(tmp_path / name)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, name
    assert np.array_equal(read_rgb(tmp_path / "alpha.png"), colour)  # alpha dropped, colour kept


def test_a_file_is_decoded_only_in_an_image_format_whatever_its_name(tmp_path):
    from fer_tune.data.images import BadImage

    (tmp_path / "face.jpg").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(BadImage, match="not an image"):  # EPS would run Ghostscript
        read_rgb(tmp_path / "face.jpg")


def csv_dataset(folder: Path, rows: list[str], line_end: str = "\n", bom: bool = False) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(folder / "img" / f"{i}.png")
    text = line_end.join(["path,expression", *rows]) + line_end
    (folder / "labels.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder / "labels.csv"


def test_a_csv_with_a_bom_and_crlf_line_ends_reads_as_any_other(tmp_path):
    from fer_tune.data.sources import load_table

    rows = [f"img/{i}.png,{i % 7}" for i in range(40)]
    plain = load_table(load_spec(write_spec(tmp_path / "a.yaml", data={
        "source": "csv", "root": str(csv_dataset(tmp_path / "plain", rows))})).data)
    windows = load_table(load_spec(write_spec(tmp_path / "b.yaml", data={
        "source": "csv", "root": str(csv_dataset(tmp_path / "win", rows, "\r\n", bom=True))})).data)
    assert windows["image"].tolist() == plain["image"].tolist()
    assert windows["expression"].tolist() == plain["expression"].tolist() == [i % 7 for i in range(40)]


def test_a_face_listed_twice_is_refused_naming_both_lines(tmp_path, capsys):
    rows = [f"img/{i}.png,{i % 7}" for i in range(5)] + [""] + [f"img/{i}.png,{i % 7}" for i in range(5, 40)]
    labels = csv_dataset(tmp_path / "d", [*rows, "img/3.png,2"])  # a blank line 7; img/3 on lines 5 and 43
    spec = write_spec(tmp_path / "s.yaml", data={"source": "csv", "root": str(labels)})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, f"{labels} line 43: the same image as {labels} line 5 (img/3.png)")


def test_rows_wider_than_the_header_are_refused_naming_the_line(tmp_path, capsys):
    labels = csv_dataset(tmp_path / "d", [f"img/{i}.png,{i % 7},happy, really" for i in range(40)])
    spec = write_spec(tmp_path / "s.yaml", data={"source": "csv", "root": str(labels)})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, f"{labels} line 2: 4 fields where the header has 2")


def test_a_photo_with_two_faces_is_two_rows_not_a_duplicate(tmp_path):
    from fer_tune.data.sources import load_table

    labels = csv_dataset(tmp_path / "d", [f"img/{i}.png,{i % 7}" for i in range(40)])
    text = labels.read_text().replace("path,expression", "path,expression,face_x,face_y,face_w,face_h")
    lines = text.splitlines()
    lines = [lines[0]] + [f"{line},0,0,12,12" for line in lines[1:]] + ["img/0.png,3,12,12,12,12"]
    labels.write_text("\n".join(lines) + "\n")
    table = load_table(load_spec(write_spec(tmp_path / "s.yaml", data={"source": "csv", "root": str(labels)})).data)
    assert (table["image"] == "img/0.png").sum() == 2


@pytest.fixture
def prepared(tmp_path):
    from fer_tune.data.prepare import prepare_data

    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    data = prepare_data(spec.data, tmp_path / "run")
    data.load("train", False)
    return spec, tmp_path / "run", data


def test_a_damaged_image_cache_is_rebuilt_not_trusted(prepared, capsys):
    from fer_tune.data.prepare import prepare_data

    spec, out, data = prepared
    first = data.load("train", False)
    images, table = np.array(first.images), first.table
    cache = next(p for p in (out / "cache").glob("train_*.npy") if ".kept" not in p.name)
    kept = cache.with_suffix(".kept.npy")
    for damage in (lambda: cache.write_bytes(cache.read_bytes()[: len(cache.read_bytes()) // 2]),  # truncated
                   lambda: np.save(kept, np.load(kept)[:-3]),  # row numbers that no longer match the images
                   lambda: np.save(cache, np.zeros((len(table), 8, 8, 3), np.uint8))):  # another size
        damage()
        again = prepare_data(spec.data, out).load("train", False)
        assert "is damaged" in capsys.readouterr().out
        assert np.array_equal(np.asarray(again.images), images) and again.table.equals(table)


@pytest.mark.parametrize("damage, expected", [
    (lambda s: s.joinpath("train.csv").write_text(s.joinpath("train.csv").read_text()
                                                  + s.joinpath("test.csv").read_text().splitlines()[1] + "\n"),
     "the train split file was changed after the split was drawn"),
    (lambda s: s.joinpath("test.csv").unlink(), "the test split file is missing"),
    (lambda s: s.joinpath("split.json").write_text("{not json"), "split.json: unreadable"),
])
def test_edited_or_lost_split_files_are_refused(prepared, capsys, damage, expected, tmp_path):
    spec, out, _ = prepared
    damage(out / "splits")
    assert main(["train", str(tmp_path / "s.yaml"), "--out", str(out)]) == 2
    one_line_error(capsys, expected)


def test_train_never_writes_into_a_folder_holding_another_experiment(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "spec.yaml").write_text(load_spec(write_spec(tmp_path / "a.yaml", name="other")).to_yaml())
    (other / "best").mkdir()
    (other / "best" / "model.pt").write_bytes(b"their model")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in other.rglob("*") if p.is_file()}
    assert main(["train", str(write_spec(tmp_path / "b.yaml", name="mine")), "--out", str(other)]) == 2
    one_line_error(capsys, f"{other} holds a different experiment (name: folder has 'other', this spec has 'mine')")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in other.rglob("*") if p.is_file()} == before


def test_a_second_command_on_a_folder_in_use_refuses_at_once(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml")
    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out):  # as a first `fer-tune run` or `train` holds it
        started = time.perf_counter()
        assert main(["train", str(spec), "--out", str(out)]) == 2
        assert time.perf_counter() - started < 30
    one_line_error(capsys, f"{out} is in use by another fer-tune command (pid {os.getpid()})")
    assert not (out / "spec.yaml").exists()
    with folder_lock(out):  # released when the holder ends
        pass


def test_a_full_disk_is_one_line_and_keeps_what_was_finished(tmp_path, capsys, monkeypatch):
    import fer_tune.commands.train as train_command

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_command, "export_best", full)
    spec = write_spec(tmp_path / "s.yaml", train={"epochs": 1})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "No space left on device writing", "what had finished is kept")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()  # the epoch it trained


def test_a_model_file_of_another_shape_is_refused_before_any_image(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    torch.jit.script(torch.nn.Linear(24, 2)).save(str(run / "best" / "model.ts"))
    (run / "best" / "model.pt").unlink()
    assert main(["predict", str(run / "best" / "model.ts"), str(trained / "face.png"), "--no-detect",
                 "--out", str(tmp_path / "p")]) == 2
    one_line_error(capsys, "model.ts", "re-export it with `fer-tune export DIR --format torchscript`")


def test_an_annotation_symlinked_out_of_the_dataset_is_refused(tmp_path, capsys):
    root = tmp_path / "affectnet"
    (root / "train_set" / "images").mkdir(parents=True)
    (root / "train_set" / "annotations").mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "train_set" / "images" / "0.jpg")
    np.save(tmp_path / "outside.npy", np.array(3))
    (root / "train_set" / "annotations" / "0_exp.npy").symlink_to(tmp_path / "outside.npy")
    spec = write_spec(tmp_path / "s.yaml", data={"source": "affectnet-npy", "root": str(root)})
    with pytest.raises(UserError, match="0_exp.npy"):
        from fer_tune.data.sources import load_table

        load_table(load_spec(spec).data)


def test_a_decompression_bomb_is_refused_without_decoding_it(tmp_path):
    from fer_tune.data.images import BadImage

    Image.new("1", (16_000, 16_000)).save(tmp_path / "bomb.png")  # 256 Mpx in a small file
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    started = time.perf_counter()
    with pytest.raises(BadImage, match="image too large"):
        read_rgb(tmp_path / "bomb.png")
    assert time.perf_counter() - started < 5


def test_a_train_split_of_one_image_is_one_line_not_a_batchnorm_error(tmp_path, capsys):
    labels = csv_dataset(tmp_path / "d", ["img/0.png,1", "img/1.png,1", "img/2.png,1"])
    spec = write_spec(tmp_path / "s.yaml", data={"source": "csv", "root": str(labels), "image_size": 24,
                                                 "split": {"val": 1, "test": 1, "seed": 0}}, train={"epochs": 1})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "the train split has 1 image(s) for 1 training worker(s); each needs at least 2")


def test_the_folder_lock_never_follows_a_symlink(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".fer-tune.lock").symlink_to(precious)
    assert main(["train", str(write_spec(tmp_path / "s.yaml")), "--out", str(out)]) == 2
    one_line_error(capsys, "cannot lock the experiment folder", "a symlink is refused")
    assert precious.read_text() == "keep me"


def test_train_never_overwrites_a_search(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tune").mkdir(parents=True)
    spec = write_spec(tmp_path / "s.yaml")
    assert main(["train", str(spec), "--out", str(out)]) == 2
    one_line_error(capsys, f"{out} holds a search (tune/); `fer-tune train` would overwrite its best model")
    assert sorted(p.name for p in out.iterdir()) == ["tune"]


def test_a_second_search_on_a_folder_in_use_refuses_before_ray_starts(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", space={"model.dropout": {"uniform": [0.0, 0.3]}},
                      search={"num_samples": 2, "finalists": 0})
    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out):
        assert main(["run", str(spec), "--out", str(out)]) == 2
    one_line_error(capsys, f"{out} is in use by another fer-tune command")
    assert not (out / "spec.yaml").exists() and not (out / "tune").exists()


def test_torch_reporting_a_full_disk_is_the_one_line_of_a_full_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from fer_tune.engine import artifacts

    def fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(artifacts.torch, "save", fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("Usage", "total used free")(1, 1, 0))
    with pytest.raises(OSError) as info:
        artifacts.save_torch(tmp_path / "model.pt", {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written left
