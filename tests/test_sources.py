"""Tests for fer_tune.data.sources: tiny fixtures of every format built in tmp_path."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_tune import EXPRESSIONS
from fer_tune.data.sources import (
    COLUMNS,
    SOURCES,
    BadImage,
    Source,
    expression_id,
    load_table,
    read_image,
    register_source,
)
from fer_tune.errors import UserError

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013-4k"
if not FER2013.is_dir():
    FER2013 = Path("/work/shared/data/fer2013-4k")

RED, BLUE, GRAY = (200, 30, 30), (20, 40, 220), 128


def spec(source, root=None, **synthetic):
    syn = dict(n=32, seed=0, label_noise=0.0, identities=4)
    syn.update(synthetic)
    return SimpleNamespace(source=source, root=None if root is None else Path(root),
                           synthetic=SimpleNamespace(**syn))


def write_image(path: Path, size=(20, 16), color=RED, mode="RGB", box=None, box_color=BLUE):
    """An image of `size` (w, h) filled with `color`; `box` (x, y, w, h) painted `box_color`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, color)
    if box is not None:
        x, y, w, h = box
        image.paste(box_color, (x, y, x + w, y + h))
    image.save(path)
    return path


def check_columns(table: pd.DataFrame):
    assert tuple(table.columns[: len(COLUMNS)]) == COLUMNS
    assert table["expression"].dtype == np.int64
    for col in ("valence", "arousal", "face_x", "face_y", "face_w", "face_h"):
        assert table[col].dtype == np.float64
    for col in ("image", "subject", "source_split"):
        assert all(isinstance(v, str) for v in table[col])
    assert set(table["source_split"]) <= {"train", "val", "test", ""}
    assert table["expression"].between(-1, 7).all()
    assert isinstance(table.attrs["dropped"], dict)
    assert set(table.attrs["tasks"]) <= {"expression", "valence", "arousal"}


def user_error(data, *fragments):
    with pytest.raises(UserError) as info:
        load_table(data)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_has_every_source():
    assert {"synthetic", "affectnet", "affectnet-npy", "folder", "csv"} <= set(SOURCES)
    assert all(isinstance(s, Source) for s in SOURCES.values())


def test_unknown_source_lists_valid_ones():
    user_error(spec("nope"), "nope", "folder", "csv")


def test_register_function_source(tmp_path):
    @register_source("test-fn", root_kind=None)
    def tiny(data):
        return pd.DataFrame({"image": ["a.png"], "expression": [2], "valence": [0.5]})

    try:
        table = load_table(spec("test-fn"))
        check_columns(table)
        assert table.attrs["tasks"] == ["expression", "valence"]
        assert math.isnan(table.loc[0, "arousal"]) and table.loc[0, "subject"] == ""
    finally:
        SOURCES.pop("test-fn")


@pytest.mark.parametrize("source", ["folder", "affectnet", "affectnet-npy", "csv"])
def test_root_missing_or_unset(tmp_path, source):
    user_error(spec(source), "data.root", "--set data.root=PATH")
    user_error(spec(source, tmp_path / "absent"), str(tmp_path / "absent"), "--set data.root=PATH")


@pytest.mark.parametrize("source", ["folder", "affectnet", "affectnet-npy"])
def test_root_must_be_a_directory(tmp_path, source):
    file = tmp_path / "file.txt"
    file.write_text("x")
    user_error(spec(source, file), str(file), "not a directory", "--set data.root=PATH")


@pytest.mark.parametrize("source", ["folder", "affectnet-npy"])
def test_empty_dataset(tmp_path, source):
    user_error(spec(source, tmp_path), "no images found under", str(tmp_path))


def test_expression_id():
    assert expression_id("Angry") == 6 and expression_id("happiness") == 1
    assert expression_id("3") == 3 and expression_id(" 7 ") == 7 and expression_id("2.0") == 2
    assert expression_id("8") is None and expression_id("joy") is None and expression_id("") is None


def test_bad_image_pickles():
    err = pickle.loads(pickle.dumps(BadImage("/x.png", "truncated")))
    assert (err.path, err.reason) == ("/x.png", "truncated") and "truncated" in str(err)


# ---------------------------------------------------------------------------------------------
# folder


def test_folder_splits_aliases_numeric_and_non_images(tmp_path):
    write_image(tmp_path / "train" / "Angry" / "a1.png")
    write_image(tmp_path / "train" / "Angry" / "a2.JPG")
    write_image(tmp_path / "train" / "happiness" / "h1.jpeg")
    write_image(tmp_path / "train" / "7" / "c1.bmp", mode="L", color=GRAY)
    (tmp_path / "train" / "Angry" / "notes.txt").write_text("x")
    (tmp_path / "train" / "Angry" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "7" / "Thumbs.db").write_bytes(b"\0")
    write_image(tmp_path / "Validation" / "surprised" / "s1.webp")
    write_image(tmp_path / "testing" / "Neutral" / "n1.png")
    write_image(tmp_path / "testing" / "sadness" / "x.png")
    (tmp_path / "README.md").write_text("hi")

    table = load_table(spec("folder", tmp_path))
    check_columns(table)
    got = dict(zip(table["image"], zip(table["expression"], table["source_split"])))
    assert got == {
        "train/Angry/a1.png": (6, "train"),
        "train/Angry/a2.JPG": (6, "train"),
        "train/happiness/h1.jpeg": (1, "train"),
        "train/7/c1.bmp": (7, "train"),
        "Validation/surprised/s1.webp": (3, "val"),
        "testing/Neutral/n1.png": (0, "test"),
        "testing/sadness/x.png": (2, "test"),
    }
    assert table["valence"].isna().all() and table["arousal"].isna().all()
    assert (table["subject"] == "").all() and table["face_x"].isna().all()
    assert table.attrs["dropped"]["non-image files"] == 4
    assert table.attrs["tasks"] == ["expression"]

    data = spec("folder", tmp_path)
    gray = read_image(data, table[table["image"] == "train/7/c1.bmp"].iloc[0])
    assert gray.shape == (16, 20, 3) and gray.dtype == np.uint8 and (gray == GRAY).all()
    rgb = read_image(data, table[table["image"] == "train/Angry/a1.png"].iloc[0])
    assert rgb.shape == (16, 20, 3) and (rgb == RED).all()


def test_folder_without_splits(tmp_path):
    write_image(tmp_path / "fear" / "1.png")
    write_image(tmp_path / "disgusted" / "2.png")
    write_image(tmp_path / "0" / "3.png")
    table = load_table(spec("folder", tmp_path))
    assert sorted(zip(table["image"], table["expression"])) == [
        ("0/3.png", 0), ("disgusted/2.png", 5), ("fear/1.png", 4)]
    assert (table["source_split"] == "").all()


def test_folder_unknown_folder_lists_classes(tmp_path):
    write_image(tmp_path / "train" / "happy" / "1.png")
    write_image(tmp_path / "train" / "joy" / "2.png")
    user_error(spec("folder", tmp_path), "joy", "neutral", "contempt", "angry")
    write_image(tmp_path / "other" / "3.png")
    user_error(spec("folder", tmp_path), "other", "neither a class nor a split")


def test_folder_empty_class_folder(tmp_path):
    write_image(tmp_path / "happy" / "1.png")
    (tmp_path / "sad").mkdir()
    (tmp_path / "sad" / "readme.txt").write_text("x")
    user_error(spec("folder", tmp_path), str(tmp_path / "sad"), "no images")


def test_folder_symlink_escaping_root(tmp_path):
    outside = write_image(tmp_path / "outside" / "x.png")
    root = tmp_path / "data"
    write_image(root / "happy" / "1.png")
    os.symlink(outside, root / "happy" / "2.png")
    user_error(spec("folder", root), "path escapes the dataset root", "2.png")
    (root / "happy" / "2.png").unlink()
    os.symlink(outside.parent, root / "sad")
    user_error(spec("folder", root), "path escapes the dataset root", "sad")


def test_folder_bad_images(tmp_path):
    write_image(tmp_path / "happy" / "good.png")
    (tmp_path / "happy" / "fake.jpg").write_bytes(b"this is not a jpeg")
    full = write_image(tmp_path / "happy" / "cut.png", size=(64, 64))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    Image.new("RGB", (64, 64)).save(tmp_path / "happy" / "cut2.jpg", quality=90)
    jpg = (tmp_path / "happy" / "cut2.jpg").read_bytes()
    (tmp_path / "happy" / "cut2.jpg").write_bytes(jpg[: len(jpg) // 2])

    table = load_table(spec("folder", tmp_path)).set_index("image", drop=False)
    data = spec("folder", tmp_path)
    assert read_image(data, table.loc["happy/good.png"]).shape == (16, 20, 3)
    for name in ("happy/fake.jpg", "happy/cut.png", "happy/cut2.jpg"):
        with pytest.raises(BadImage) as info:
            read_image(data, table.loc[name])
        assert not isinstance(info.value, UserError)
        assert name.split("/")[1] in info.value.path
    outside = write_image(tmp_path.parent / f"{tmp_path.name}-outside.png")
    with pytest.raises(BadImage, match="escapes the dataset root"):
        read_image(data, {"image": f"../{outside.name}"})
    (tmp_path / "happy" / "good.png").unlink()
    with pytest.raises(BadImage, match="not found"):
        read_image(data, table.loc["happy/good.png"])


@pytest.mark.skipif(not FER2013.is_dir(), reason="shared fer2013-4k data not present")
def test_folder_real_fer2013():
    table = load_table(spec("folder", FER2013))
    check_columns(table)
    on_disk = {s: sum(1 for _ in (FER2013 / s).glob("*/*.jpg")) for s in ("train", "test")}
    assert len(table) == sum(on_disk.values())  # 3,918 here (README says 3,919)
    counts = table["source_split"].value_counts().to_dict()
    assert counts == on_disk and counts["train"] == 3520 and counts["test"] in (398, 399)
    assert sorted(table["expression"].unique()) == [0, 1, 2, 3, 4, 5, 6]
    assert 7 not in set(table["expression"])
    assert table.attrs["tasks"] == ["expression"]
    assert table["valence"].isna().all() and table["arousal"].isna().all()
    image = read_image(spec("folder", FER2013), table.iloc[0])
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# csv


def test_csv_labels_masks_and_face_box(tmp_path):
    write_image(tmp_path / "img" / "a.png", size=(40, 30), box=(10, 5, 12, 8))
    write_image(tmp_path / "img" / "b.png")
    write_image(tmp_path / "c.jpg")
    write_image(tmp_path / "d.png")
    (tmp_path / "labels.csv").write_text(
        "path,expression,valence,arousal,subject,face_x,face_y,face_w,face_h\n"
        "img/a.png,3,0.5,-0.25,s1,10,5,12,8\n"
        "img\\b.png,Happy,,,s2,,,,\n"
        f"{tmp_path / 'c.jpg'},,1,-1,,,,,\n"
        "./d.png,angry,,0.1,s1,,,,\n")
    data = spec("csv", tmp_path)
    table = load_table(data)
    check_columns(table)
    assert list(table["image"]) == ["img/a.png", "img/b.png", "c.jpg", "d.png"]
    assert list(table["expression"]) == [3, 1, -1, 6]
    np.testing.assert_array_equal(table["valence"], [0.5, np.nan, 1.0, np.nan])
    np.testing.assert_array_equal(table["arousal"], [-0.25, np.nan, -1.0, 0.1])
    assert list(table["subject"]) == ["s1", "s2", "", "s1"]
    assert table.loc[0, ["face_x", "face_y", "face_w", "face_h"]].tolist() == [10, 5, 12, 8]
    assert table.loc[1:, "face_x"].isna().all()
    assert table.attrs["tasks"] == ["expression", "valence", "arousal"]
    assert table.attrs["dropped"] == {}

    face = read_image(data, table.iloc[0])
    assert face.shape == (8, 12, 3) and (face == BLUE).all()
    whole = read_image(data, table.iloc[1])
    assert whole.shape == (16, 20, 3)
    # the CSV file itself as root gives the same table
    same = load_table(spec("csv", tmp_path / "labels.csv"))
    pd.testing.assert_frame_equal(same, table)
    assert (read_image(spec("csv", tmp_path / "labels.csv"), same.iloc[0]) == BLUE).all()


def test_face_box_is_clipped_to_the_image(tmp_path):
    write_image(tmp_path / "a.png", size=(40, 30), box=(30, 20, 10, 10))
    (tmp_path / "labels.csv").write_text(
        "path,expression,face_x,face_y,face_w,face_h\na.png,0,30,20,25,25\na.png,0,-5,-5,10,10\n"
        "a.png,0,50,50,5,5\n")
    data = spec("csv", tmp_path)
    table = load_table(data)
    face = read_image(data, table.iloc[0])
    assert face.shape == (10, 10, 3) and (face == BLUE).all()
    assert read_image(data, table.iloc[1]).shape == (5, 5, 3)
    with pytest.raises(BadImage, match="outside"):
        read_image(data, table.iloc[2])
    # a namedtuple row works too
    row = next(table.itertuples(index=False))
    assert read_image(data, row).shape == (10, 10, 3)


def test_csv_folder_without_labels_csv(tmp_path):
    user_error(spec("csv", tmp_path), "labels.csv", "--set data.root=PATH")


@pytest.mark.parametrize("header,missing", [("file,expression", "path"),
                                             ("path,valence,arousal", "expression")])
def test_csv_missing_required_column(tmp_path, header, missing):
    csv = tmp_path / "labels.csv"
    csv.write_text(header + "\n" + ",".join(["x.png", "1", "0"][: len(header.split(","))]) + "\n")
    user_error(spec("csv", csv), str(csv), f"'{missing}'", "path, expression")


@pytest.mark.parametrize("row,fragments", [
    ("a.png,9,,", ["line 2", "expression", "'9'"]),
    ("a.png,joy,,", ["line 2", "expression", "'joy'"]),
    ("a.png,1,1.5,", ["line 2", "valence", "1.5"]),
    ("a.png,1,,-3", ["line 2", "arousal", "-3"]),
    ("a.png,1,high,", ["line 2", "valence", "'high'"]),
])
def test_csv_bad_labels(tmp_path, row, fragments):
    write_image(tmp_path / "a.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,expression,valence,arousal\n" + row + "\n")
    user_error(spec("csv", csv), str(csv), *fragments)


@pytest.mark.parametrize("path", ["../outside.png", "img/../../outside.png", "/etc/hostname"])
def test_csv_path_escaping_root(tmp_path, path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_image(tmp_path / "outside.png")
    (root / "labels.csv").write_text(f"path,expression\na.png,1\n{path},2\n")
    user_error(spec("csv", root), "line 3", "path escapes the dataset root")


def test_csv_symlink_escaping_root(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    outside = write_image(tmp_path / "outside" / "b.png")
    os.symlink(outside, root / "b.png")
    os.symlink(outside.parent, root / "sub")
    (root / "labels.csv").write_text("path,expression\na.png,1\nsub/b.png,2\n")
    user_error(spec("csv", root), "line 3", "path escapes the dataset root")
    (root / "labels.csv").write_text("path,expression\na.png,1\nb.png,2\n")
    user_error(spec("csv", root), "line 3", "path escapes the dataset root")


def test_csv_missing_images_are_listed(tmp_path):
    write_image(tmp_path / "a.png")
    lines = ["path,expression", "a.png,1"] + [f"gone{i}.png,2" for i in range(8)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    message = user_error(spec("csv", tmp_path), "8 image file(s)", "gone0.png", "gone4.png",
                         "3 more")
    assert "gone5.png" not in message


def test_csv_with_no_rows(tmp_path):
    (tmp_path / "labels.csv").write_text("path,expression\n")
    user_error(spec("csv", tmp_path), "no images found under")


def test_csv_partial_face_box(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(
        "path,expression,face_x,face_y,face_w,face_h\na.png,1,1,2,,4\n")
    user_error(spec("csv", tmp_path), "line 2", "face box")


# ---------------------------------------------------------------------------------------------
# affectnet (official CSVs)

AFFECTNET_HEADER = ("subDirectory_filePath, face_x, face_y, face_width, face_height, "
                    "facial_landmarks, expression, valence, arousal")


def affectnet_row(path, expr, val, aro, box=(0, 0, 20, 16)):
    x, y, w, h = box
    return f"{path},{x},{y},{w},{h},1.0;2.0;3.0;4.0,{expr},{val},{aro}"


def make_affectnet(root: Path, lists_folder="Manually_Annotated_file_lists",
                   images_folder="Manually_Annotated_Images"):
    images = root / images_folder if images_folder else root
    write_image(images / "1" / "a.png", size=(40, 30), box=(4, 6, 10, 12))
    for name in ("b.jpg", "c.png", "d.png", "e.png", "f.png"):
        write_image(images / "1" / name)
    write_image(images / "2" / "v.png")
    write_image(images / "2" / "w.png")
    lists = root / lists_folder if lists_folder else root
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "training.csv").write_text("\n".join([
        AFFECTNET_HEADER,
        affectnet_row("1/a.png", 1, 0.5, 0.25, box=(4, 6, 10, 12)),
        affectnet_row("1/b.jpg", 8, 0.0, 0.0),
        affectnet_row("1/c.png", 9, -2, -2),
        affectnet_row("1/d.png", 10, -2, -2),
        affectnet_row("1/e.png", 7, -2, 0.3),
        affectnet_row("1/f.png", 0, -0.1, -2),
    ]) + "\n")
    (lists / "validation.csv").write_text("\n".join([
        AFFECTNET_HEADER,
        affectnet_row("2/v.png", 4, -0.75, 0.9),
        affectnet_row("2/w.png", 6, -1, 1),
    ]) + "\n")
    return lists


@pytest.mark.parametrize("layout", ["official", "flat"])
def test_affectnet(tmp_path, layout):
    if layout == "official":
        make_affectnet(tmp_path)
        prefix = "Manually_Annotated_Images/"
    else:
        make_affectnet(tmp_path, lists_folder=None, images_folder=None)
        prefix = ""
    data = spec("affectnet", tmp_path)
    table = load_table(data)
    check_columns(table)
    assert list(table["image"]) == [prefix + p for p in ("1/a.png", "2/v.png", "2/w.png")]
    assert list(table["expression"]) == [1, 4, 6]
    assert list(table["valence"]) == [0.5, -0.75, -1.0]
    assert list(table["arousal"]) == [0.25, 0.9, 1.0]
    assert list(table["source_split"]) == ["train", "test", "test"]
    assert table.attrs["dropped"] == {"expression 8-10 (none/uncertain/no-face)": 3,
                                      "valence/arousal == -2": 2}
    assert table.attrs["tasks"] == ["expression", "valence", "arousal"]
    assert table.loc[0, ["face_x", "face_y", "face_w", "face_h"]].tolist() == [4, 6, 10, 12]
    face = read_image(data, table.iloc[0])
    assert face.shape == (12, 10, 3) and (face == BLUE).all()


def test_affectnet_training_only_and_headerless(tmp_path):
    lists = make_affectnet(tmp_path)
    (lists / "validation.csv").unlink()
    text = (lists / "training.csv").read_text().splitlines()[1:]
    (lists / "training.csv").write_text("\n".join(text) + "\n")
    table = load_table(spec("affectnet", tmp_path))
    assert list(table["source_split"]) == ["train"]


def test_affectnet_no_csvs(tmp_path):
    user_error(spec("affectnet", tmp_path), "training.csv", "validation.csv", str(tmp_path))


@pytest.mark.parametrize("expr,va,fragments", [
    ("11", ("0", "0"), ["expression", "'11'", "line 3"]),
    ("-1", ("0", "0"), ["expression", "'-1'", "line 3"]),
    ("2", ("1.5", "0"), ["valence", "1.5", "line 3"]),
    ("2", ("0", "-1.5"), ["arousal", "-1.5", "line 3"]),
])
def test_affectnet_bad_values(tmp_path, expr, va, fragments):
    lists = make_affectnet(tmp_path)
    csv = lists / "training.csv"
    lines = csv.read_text().splitlines()
    lines[2] = affectnet_row("1/b.jpg", expr, *va)
    csv.write_text("\n".join(lines) + "\n")
    user_error(spec("affectnet", tmp_path), str(csv), *fragments)


def test_affectnet_missing_images_and_escape(tmp_path):
    lists = make_affectnet(tmp_path)
    csv = lists / "validation.csv"
    csv.write_text("\n".join([AFFECTNET_HEADER, affectnet_row("2/v.png", 1, 0, 0),
                              affectnet_row("2/gone.png", 1, 0, 0)]) + "\n")
    user_error(spec("affectnet", tmp_path), str(csv), "1 image file(s)", "2/gone.png")
    csv.write_text("\n".join([AFFECTNET_HEADER, affectnet_row("2/v.png", 1, 0, 0),
                              affectnet_row("../../x.png", 1, 0, 0)]) + "\n")
    user_error(spec("affectnet", tmp_path), "line 3", "path escapes the dataset root")


def test_affectnet_missing_column(tmp_path):
    lists = make_affectnet(tmp_path)
    csv = lists / "training.csv"
    csv.write_text("subDirectory_filePath,face_x,face_y,face_width,face_height,expression\n"
                   "1/a.png,0,0,1,1,1\n")
    user_error(spec("affectnet", tmp_path), str(csv), "'valence'")


# ---------------------------------------------------------------------------------------------
# affectnet-npy


def write_npy_sample(folder: Path, stem: str, exp=None, val=None, aro=None, **image_kw):
    write_image(folder / "images" / f"{stem}.jpg", **image_kw)
    ann = folder / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for suffix, value in (("exp", exp), ("val", val), ("aro", aro)):
        if value is not None:
            np.save(ann / f"{stem}_{suffix}.npy", np.array(value))


def test_affectnet_npy_with_splits(tmp_path):
    write_npy_sample(tmp_path / "train_set", "0", exp="3", val="0.5", aro="-0.5")
    write_npy_sample(tmp_path / "train_set", "1", exp=1, val=0.25)  # no aro file
    write_npy_sample(tmp_path / "train_set", "2", val=-0.3, aro=0.3)  # no exp file
    write_npy_sample(tmp_path / "train_set", "3", exp="9", val=-2.0, aro=-2.0)
    write_npy_sample(tmp_path / "train_set", "4", exp="2", val=-2.0, aro=0.5)
    write_image(tmp_path / "train_set" / "images" / "5.png")
    (tmp_path / "train_set" / "images" / "list.txt").write_text("x")
    write_npy_sample(tmp_path / "val_set", "10", exp="7", val="-1", aro="1")
    data = spec("affectnet-npy", tmp_path)
    table = load_table(data)
    check_columns(table)
    assert list(table["image"]) == ["train_set/images/0.jpg", "train_set/images/1.jpg",
                                    "train_set/images/2.jpg", "train_set/images/5.png",
                                    "val_set/images/10.jpg"]
    assert list(table["expression"]) == [3, 1, -1, -1, 7]
    np.testing.assert_array_equal(table["valence"], [0.5, 0.25, -0.3, np.nan, -1.0])
    np.testing.assert_array_equal(table["arousal"], [-0.5, np.nan, 0.3, np.nan, 1.0])
    assert list(table["source_split"]) == ["train"] * 4 + ["test"]
    assert table.attrs["dropped"] == {"non-image files": 1,
                                      "expression 8-10 (none/uncertain/no-face)": 1,
                                      "valence/arousal == -2": 1}
    assert table.attrs["tasks"] == ["expression", "valence", "arousal"]
    assert read_image(data, table.iloc[0]).shape == (16, 20, 3)


def test_affectnet_npy_flat_and_test_split(tmp_path):
    write_npy_sample(tmp_path, "a", exp="0")
    table = load_table(spec("affectnet-npy", tmp_path))
    assert list(table["image"]) == ["images/a.jpg"] and list(table["source_split"]) == [""]
    assert table.attrs["tasks"] == ["expression"]

    other = tmp_path / "other"
    write_npy_sample(other / "test", "b", exp="5")
    write_npy_sample(other / "validation", "c", exp="4")
    table = load_table(spec("affectnet-npy", other))
    assert list(table["source_split"]) == ["test", "test"]


@pytest.mark.parametrize("kind,value,fragments", [
    ("exp", "12", ["0_exp.npy", "expression", "12"]),
    ("exp", "x", ["0_exp.npy", "expression", "'x'"]),
    ("val", 1.5, ["0_val.npy", "valence", "1.5"]),
    ("aro", "-3", ["0_aro.npy", "arousal", "-3"]),
])
def test_affectnet_npy_bad_values(tmp_path, kind, value, fragments):
    labels = {"exp": "1", "val": 0.0, "aro": 0.0}
    labels[kind] = value
    write_npy_sample(tmp_path / "train_set", "0", **labels)
    user_error(spec("affectnet-npy", tmp_path), *fragments)


def test_affectnet_npy_unknown_split_folder(tmp_path):
    write_npy_sample(tmp_path / "extra", "0", exp="1")
    user_error(spec("affectnet-npy", tmp_path), "extra", "train_set", "val_set")


def test_affectnet_npy_symlink_escaping_root(tmp_path):
    root = tmp_path / "data"
    write_npy_sample(root, "0", exp="1")
    outside = write_image(tmp_path / "outside.jpg")
    os.symlink(outside, root / "images" / "1.jpg")
    user_error(spec("affectnet-npy", root), "path escapes the dataset root", "1.jpg")


# ---------------------------------------------------------------------------------------------
# synthetic

HAVE_SYNTHETIC = importlib.util.find_spec("fer_tune.data.synthetic") is not None


@pytest.mark.skipif(not HAVE_SYNTHETIC, reason="fer_tune.data.synthetic not written yet")
def test_synthetic():
    data = spec("synthetic", n=24, seed=3)
    table = load_table(data)
    check_columns(table)
    assert len(table) == 24
    assert table["image"].iloc[5] == "synthetic/000005"
    assert len(table.columns) > len(COLUMNS)  # rendering parameters kept
    assert table[["face_x", "face_y", "face_w", "face_h"]].isna().all().all()
    assert table.attrs["tasks"] == ["expression", "valence", "arousal"]
    image = read_image(data, table.iloc[0], size=40)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    # the renderer sees its own parameters (its face_w / face_h are not the face box)
    from fer_tune.data.synthetic import render_face, sample_faces

    faces = sample_faces(24, 3, 0.0, 4)
    np.testing.assert_array_equal(image, render_face(faces.iloc[0].to_dict(), 40))
    np.testing.assert_array_equal(read_image(data, next(table.itertuples(index=False)), size=40),
                                  image)
    again = load_table(data)
    pd.testing.assert_frame_equal(table, again)
