"""Image cache (bad images), `fer-tune data synth`, and the model's local pretrained weights."""

import pytest
import torch
import timm
from PIL import Image

from fer_tune.cli import main
from fer_tune.data.cache import load_images
from fer_tune.data.sources import load_table
from fer_tune.errors import UserError
from fer_tune.model import MultiTaskNet
from fer_tune.spec import DataSpec, ModelSpec, Spec
from fer_tune.specfile import check_spec


def folder_with_bad_images(root):
    for name in ("happy", "sad"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (30, 30), (40 * i, 90, 200)).save(root / name / f"{i}.png")
    good = (root / "sad" / "0.png").read_bytes()
    (root / "happy" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "sad" / "corrupt.jpg").write_bytes(b"this is not a jpeg at all")
    return root


def test_bad_images_are_listed_in_one_error_or_skipped(tmp_path):
    root = folder_with_bad_images(tmp_path / "faces")
    data = DataSpec(source="folder", root=root, image_size=16)
    table = load_table(data)
    with pytest.raises(UserError) as info:
        load_images(data, table, "train", tmp_path / "cache", progress=False)
    message = str(info.value)
    assert message.startswith("2 unreadable image(s) in the train split")
    assert "truncated.png" in message and "corrupt.jpg" in message and "data.skip_bad: true" in message

    data = DataSpec(source="folder", root=root, image_size=16, skip_bad=True)
    images, kept = load_images(data, table, "train", tmp_path / "cache", progress=False)
    assert images.shape == (6, 16, 16, 3) and images.dtype.name == "uint8"
    assert len(kept) == 6 and not kept["image"].str.contains("truncated|corrupt").any()
    again, _ = load_images(data, table, "train", tmp_path / "cache", progress=False)  # reused, not rebuilt
    assert (again == images).all()


def test_data_synth_writes_a_csv_dataset(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--n", "24", "--size", "32"]) == 0
    table = load_table(DataSpec(source="csv", root=tmp_path / "synth" / "labels.csv"))
    assert len(table) == 24 and table["valence"].between(-1, 1).all()
    assert table.attrs["tasks"] == ["expression", "valence", "arousal"]
    assert Image.open(tmp_path / "synth" / table["image"][0]).size == (32, 32)


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    spec = ModelSpec(backbone="test_resnet", pretrained=tmp_path / "weights.pth")
    net = MultiTaskNet(spec.backbone, spec.dropout, spec.pretrained)
    for name, tensor in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[name], tensor), name
    out = net(torch.rand(2, 3, 32, 32))
    assert out["expression"].shape == (2, 8) and out["valence"].abs().max() <= 1
    with pytest.raises(UserError, match="does not exist"):  # checked where a command loads its spec
        check_spec(Spec(model=ModelSpec(backbone="test_resnet", pretrained=tmp_path / "missing.pth")))
