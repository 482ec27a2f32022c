"""The searchable training options (issue 8): each changes what it should, and only that.

Attention and FPN neck, mixup/cutmix targets, SGDR and one-cycle schedules, EMA of weights,
uncertainty weighting, the class-balanced sampler, one-line errors for bad values, and a
checkpoint -> resume round trip with EMA and uncertainty weights on.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import SEModule
from timm.layers.cbam import CbamModule

from fer_tune.data.sampler import ClassBalancedSampler, class_balanced_weights
from fer_tune.errors import UserError
from fer_tune.engine.loop import build_ema, build_optimizer, build_scheduler, fit, lr_factor
from fer_tune.losses import UncertaintyWeights, hard_labels, multitask_loss
from fer_tune.mixing import mix_batch, mix_targets
from fer_tune.model import MultiTaskNet
from fer_tune.spec import LossSpec, TrainSpec, validate_spec
from fer_tune.specfile import load_spec
from fer_tune.engine.artifacts import load_torch, save_torch

from conftest import write_spec

NAN = float("nan")


# --- model: attention block and FPN neck ----------------------------------------------------

@pytest.mark.parametrize("kind, module", [("se", SEModule), ("cbam", CbamModule)])
def test_attention_block_reweights_the_last_feature_map(kind, module):
    torch.manual_seed(0)
    model = MultiTaskNet("test_resnet", dropout=0.0, attention=kind).eval()
    assert isinstance(model.attention, module)
    seen = []
    model.attention.register_forward_hook(lambda m, inputs, output: seen.append((inputs[0].shape, output.shape)))
    images = torch.rand(3, 3, 32, 32)
    out = model(images)
    (shape_in, shape_out), = seen  # called once per forward: it is in the path to the heads
    assert shape_out == shape_in and shape_in[:2] == (3, model.backbone.num_features) and len(shape_in) == 4
    assert out["expression"].shape == (3, 8) and out["valence"].shape == (3,)
    # the block changes what the heads see: without it, other outputs
    attention, model.attention = model.attention, None
    plain = model(images)
    model.attention = attention
    assert not torch.allclose(plain["expression"], out["expression"])


def test_attention_refuses_a_token_backbone():
    with pytest.raises(UserError) as info:
        MultiTaskNet("test_vit", attention="se")
    assert "model.attention: se needs a convolutional backbone" in str(info.value)
    assert "\n" not in str(info.value)


def test_fpn_neck_fuses_several_stages():
    torch.manual_seed(0)
    model = MultiTaskNet("test_resnet", dropout=0.0, attention="cbam", neck="fpn", neck_stages=3, neck_channels=16)
    stages = []
    model.backbone.register_forward_hook(lambda m, inputs, output: stages.extend(output))
    out = model(torch.rand(4, 3, 32, 32))
    assert len(stages) == 3 and len({s.shape[-1] for s in stages}) == 3  # three resolutions
    assert model.neck.num_features == 3 * 16 and model.expression.in_features == 48
    sum(v.sum() for v in out.values()).backward()
    for lateral in model.neck.lateral:  # every stage reaches the heads
        assert lateral.weight.grad.abs().sum() > 0
    assert model.attention.channel.fc1.weight.grad.abs().sum() > 0  # CBAM on the deepest stage


# --- mixup / cutmix --------------------------------------------------------------------------

def test_mixed_targets_by_hand():
    targets = {"expression": torch.tensor([1, 3, -1, 0]), "valence": torch.tensor([0.5, -0.5, 0.2, NAN]),
               "arousal": torch.tensor([0.1, 0.3, NAN, 0.9])}
    perm = torch.tensor([1, 0, 3, 2])
    mixed = mix_targets(targets, 0.7, perm, num_classes=8)
    expected = torch.zeros(4, 8)
    expected[0, 1], expected[0, 3] = 0.7, 0.3  # 0.7 * one_hot(1) + 0.3 * one_hot(3)
    expected[1, 3], expected[1, 1] = 0.7, 0.3
    assert torch.allclose(mixed["expression"], expected)  # rows 2, 3: partner unlabelled -> no target
    assert mixed["valence"][:2].tolist() == pytest.approx([0.7 * 0.5 + 0.3 * -0.5, 0.7 * -0.5 + 0.3 * 0.5])
    assert torch.isnan(mixed["valence"][2:]).all()
    assert mixed["arousal"][:2].tolist() == pytest.approx([0.7 * 0.1 + 0.3 * 0.3, 0.7 * 0.3 + 0.3 * 0.1])
    assert hard_labels(mixed["expression"]).tolist() == [1, 3, -1, -1]


def test_mixup_blends_images_and_targets_with_one_lambda():
    np.random.seed(0)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    targets = {"expression": torch.tensor([0, 1, 2, 3, 4, 5]), "valence": torch.linspace(-1, 1, 6),
               "arousal": torch.linspace(1, -1, 6)}
    mixed_images, mixed, mix = mix_batch(images, targets, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam, perm = mix.lam, mix.perm
    assert mix.mode == "mixup" and 0 < lam < 1
    assert torch.allclose(mixed_images, lam * images + (1 - lam) * images[perm])
    one_hot = F.one_hot(targets["expression"], 8).float()
    assert torch.allclose(mixed["expression"], lam * one_hot + (1 - lam) * one_hot[perm])
    assert torch.allclose(mixed["valence"], lam * targets["valence"] + (1 - lam) * targets["valence"][perm])
    # soft targets reach the loss as probabilities: CE = -sum(p * log_softmax)
    logits = torch.randn(6, 8)
    loss, _ = multitask_loss({"expression": logits, "valence": torch.zeros(6), "arousal": torch.zeros(6)}, mixed,
                             LossSpec(expression=1.0, valence=0.0, arousal=0.0))
    assert loss.item() == pytest.approx(-(mixed["expression"] * logits.log_softmax(1)).sum(1).mean().item(), rel=1e-5)
    # both alphas off: nothing changes
    same_images, same, none = mix_batch(images, targets, 0.0, 0.0)
    assert none is None and same_images is images and same is targets


def test_cutmix_lambda_is_the_unpasted_area():
    np.random.seed(3)
    torch.manual_seed(3)
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 20, 20).clone()  # image i is all i
    targets = {"expression": torch.arange(8), "valence": torch.zeros(8), "arousal": torch.zeros(8)}
    for _ in range(5):
        mixed_images, mixed, mix = mix_batch(images, targets, mixup_alpha=0.0, cutmix_alpha=1.0)
        assert mix.mode == "cutmix"
        y0, y1, x0, x1 = mix.box
        assert mix.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 400)
        for i in range(8):
            if mix.perm[i] != i:
                kept = (mixed_images[i] == i).float().mean().item()
                assert kept == pytest.approx(mix.lam)
        assert mixed["expression"][torch.arange(8), torch.arange(8)].tolist() == pytest.approx(
            [mix.lam if mix.perm[i] != i else 1.0 for i in range(8)])


# --- schedules -------------------------------------------------------------------------------

def test_sgdr_restarts_at_the_end_of_each_cycle():
    t = TrainSpec(schedule="sgdr", epochs=20, warmup_epochs=0, sgdr_cycle_epochs=2, sgdr_cycle_mult=2)
    factor = lr_factor(t, steps_per_epoch=10)  # cycles of 20, 40, 80 steps: restarts at 20 and 60
    assert factor(0) == 1.0 and factor(20) == 1.0 and factor(60) == 1.0
    assert factor(19) < 0.01 and factor(59) < 0.01
    assert factor(10) == pytest.approx(0.5) and factor(40) == pytest.approx(0.5)
    assert all(factor(s + 1) < factor(s) for s in range(20, 59))  # one cosine, no restart inside a cycle
    warm = lr_factor(TrainSpec(schedule="sgdr", epochs=20, warmup_epochs=1, sgdr_cycle_epochs=2, sgdr_cycle_mult=1), 10)
    assert warm(9) == 1.0 and warm(29) < 0.01 and warm(30) == 1.0 and warm(50) == 1.0  # restarts every 20 steps


def test_onecycle_peaks_at_the_end_of_warmup():
    t = TrainSpec(schedule="onecycle", epochs=10, warmup_epochs=3, lr=0.01)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, steps_per_epoch=10)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    assert int(np.argmax(lrs)) == 29 and max(lrs) == pytest.approx(0.01)  # the 30th step: 3 epochs in
    assert lrs[0] == pytest.approx(0.01 / 25) and lrs[-1] < 1e-5
    assert betas[29] == pytest.approx(0.85) and betas[0] == pytest.approx(0.95)  # momentum cycles inversely


# --- EMA, uncertainty weights, sampler -------------------------------------------------------

def test_ema_is_the_hand_computed_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = build_ema(model, TrainSpec(ema_decay=0.7))
    assert build_ema(model, TrainSpec()) is None
    expected = None
    for k in range(1, 9):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3))
        ema.update(model, step=k)
        decay = min(0.7, 1 - k ** (-2 / 3))  # timm's warm-up (0 at step 1: the EMA starts as the model)
        expected = model.weight.detach().clone() if expected is None else decay * expected + (1 - decay) * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert decay == pytest.approx(0.7)  # the cap is reached at step 7


def test_uncertainty_weights_by_hand_and_masked_tasks_add_nothing():
    log_vars = torch.tensor([0.5, -0.2, 0.1], requires_grad=True)
    logits = torch.randn(4, 8, requires_grad=True)
    outputs = {"expression": logits, "valence": torch.tensor([0.1, 0.2, -0.3, 0.0]), "arousal": torch.zeros(4)}
    targets = {"expression": torch.tensor([1, 2, -1, 0]), "valence": torch.tensor([0.0, 0.5, NAN, -0.2]),
               "arousal": torch.full((4,), NAN)}
    spec = LossSpec(expression=1.0, valence=0.3, arousal=0.3, weighting="uncertainty")
    total, _ = multitask_loss(outputs, targets, spec, log_vars=log_vars)
    keep = torch.tensor([0, 1, 3])
    ce = F.cross_entropy(logits[keep], targets["expression"][keep])
    mse = ((outputs["valence"][keep] - targets["valence"][keep]) ** 2).mean()
    by_hand = math.exp(-0.5) * ce + 0.25 + 0.3 * (0.5 * math.exp(0.2) * mse - 0.1)
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-6)
    total.backward()
    assert log_vars.grad[0] != 0 and log_vars.grad[1] != 0
    assert log_vars.grad[2] == 0  # no arousal label in the batch: its log-variance is untouched


def test_uncertainty_weights_are_learned():
    torch.manual_seed(0)
    head, weights = torch.nn.Linear(5, 10), UncertaintyWeights()
    optimizer = build_optimizer(head, TrainSpec(lr=0.05), extra=list(weights.parameters()))
    assert any(p is weights.log_vars for g in optimizer.param_groups for p in g["params"])
    x = torch.randn(32, 5)
    targets = {"expression": torch.randint(0, 8, (32,)), "valence": torch.rand(32) - 0.5, "arousal": torch.rand(32) - 0.5}
    for _ in range(20):
        out = head(x)
        outputs = {"expression": out[:, :8], "valence": torch.tanh(out[:, 8]), "arousal": torch.tanh(out[:, 9])}
        loss, _ = multitask_loss(outputs, targets, LossSpec(weighting="uncertainty"), log_vars=weights.log_vars)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = weights.log_vars.detach()
    assert (learned.abs() > 0.1).all()
    assert learned[0] > learned[1]  # 8-way CE is a larger loss than a small MSE: a smaller precision


def test_class_balanced_sampler_draws_classes_uniformly_and_shards():
    labels = np.array([1] * 800 + [3] * 150 + [6] * 50 + [-1] * 200)
    weights = class_balanced_weights(labels)
    assert weights.sum().item() == pytest.approx(1.0)
    sampler = ClassBalancedSampler(labels, seed=0)
    draws = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        draws.extend(sampler)
    drawn = labels[draws]
    labelled = drawn[drawn >= 0]
    for c in (1, 3, 6):
        assert abs((labelled == c).mean() - 1 / 3) < 0.03
    assert abs((drawn == -1).mean() - 200 / 1200) < 0.03  # unlabelled rows keep their share
    # DDP: ranks split one shared draw, without overlap, equal lengths
    sampler.set_epoch(2)
    ranks = [ClassBalancedSampler(labels, 2, r, seed=0) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    parts = [list(r) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 600
    assert parts[0] == list(sampler)[0::2] and parts[1] == list(sampler)[1::2]
    assert list(sampler) != (sampler.set_epoch(3) or list(sampler))  # a new draw each epoch


# --- spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("train.schedule=warm", "train.schedule: Input should be 'cosine', 'constant', 'sgdr' or 'onecycle'"),
    ("train.sgdr_cycle_epochs=0", "train.sgdr_cycle_epochs: Input should be greater than 0"),
    ("train.sgdr_cycle_mult=0.5", "train.sgdr_cycle_mult: Input should be greater than or equal to 1"),
    ("train.sampler=balanced", "train.sampler: Input should be 'random' or 'class_balanced'"),
    ("train.mixup_alpha=-0.2", "train.mixup_alpha: Input should be greater than or equal to 0"),
    ("train.cutmix_alpha=strong", "train.cutmix_alpha: Input should be a valid number"),
    ("train.ema_decay=1.5", "train.ema_decay: Input should be less than 1"),
    ("model.attention=eca", "model.attention: Input should be 'none', 'se' or 'cbam'"),
    ("model.neck=bifpn", "model.neck: Input should be 'none' or 'fpn'"),
    ("model.neck_stages=1", "model.neck_stages: Input should be greater than or equal to 2"),
    ("model.neck_channels=0", "model.neck_channels: Input should be greater than or equal to 8"),
    ("loss.weighting=learned", "loss.weighting: Input should be 'fixed' or 'uncertainty'"),
    ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
    ("distill.alpha=2", "distill.alpha: Input should be less than or equal to 1"),
    ("distill.teacher=/no/such/run", "distill.teacher: /no/such/run: does not exist"),
    ("distill.teachr=x", "unknown key 'distill.teachr'; allowed: teacher, temperature, alpha"),
    ("space.train.schedule={choice: [cosine, warm]}", "space entry 'train.schedule': value 'warm' is invalid"),
    ("space.train.ema_decay={uniform: [0.9, 1.0]}", "space entry 'train.ema_decay': value 1.0 is invalid"),
])
def test_bad_option_values_are_one_line_errors(tiny_spec, override, expected):
    with pytest.raises(UserError) as info:
        load_spec(tiny_spec, [override])
    message = str(info.value)
    assert message.startswith(f"{tiny_spec}: ") and expected in message and "\n" not in message


def test_options_are_off_by_default_and_searchable(tiny_spec):
    spec = load_spec(tiny_spec)
    assert (spec.train.sampler, spec.train.mixup_alpha, spec.train.cutmix_alpha, spec.train.ema_decay,
            spec.train.schedule, spec.model.attention, spec.model.neck, spec.loss.weighting,
            spec.distill.teacher) == ("random", 0.0, 0.0, None, "cosine", "none", "none", "fixed", None)
    searched = load_spec(tiny_spec, ["space.train.ema_decay={choice: [null, 0.99]}",
                                     "space.distill.temperature={uniform: [1, 8]}",
                                     "space.train.schedule={choice: [cosine, sgdr]}",
                                     "space.train.sgdr_cycle_mult={choice: [1, 2], when: {train.schedule: sgdr}}"])
    trial = searched.with_values({"train.ema_decay": 0.99, "model.neck": "fpn", "distill.temperature": 3.0})
    assert trial.train.ema_decay == 0.99 and trial.model.neck == "fpn" and trial.distill.temperature == 3.0


# --- checkpoint -> resume with EMA and uncertainty weights -----------------------------------

def test_resume_keeps_ema_and_uncertainty_state(tmp_path):
    from fer_tune.data.prepare import prepare_data

    raw = {"name": "resume", "data": {"source": "synthetic", "image_size": 32, "synthetic": {"n": 120, "identities": 30},
                                      "split": {"val": 24, "test": 8}},
           "model": {"backbone": "test_resnet", "dropout": 0.0},
           # one step per epoch, so the EMA after the resumed epoch can be computed by hand
           "train": {"epochs": 1, "batch_size": 256, "lr": 3e-3, "warmup_epochs": 0, "ema_decay": 0.9,
                     "schedule": "sgdr", "sgdr_cycle_epochs": 1},
           "loss": {"weighting": "uncertainty"}}
    spec = validate_spec(raw)
    prepared = prepare_data(spec.data, tmp_path)
    train, val = prepared.load("train", False), prepared.load("val", False)
    saved = []

    def report(metrics, checkpoint):
        save_torch(tmp_path / f"epoch{metrics['epoch']}.pt", checkpoint)  # through the weights_only loader
        saved.append(metrics)

    fit(spec, train, val, prepared.labels, report)
    first = load_torch(tmp_path / "epoch1.pt")
    assert first["ema"] is not None and first["uncertainty"] is not None
    assert any(g["params"] for g in first["optimizer"]["param_groups"][2:])  # log-variances are optimised
    # change the saved log-variances: a resume that re-initialised them would not start from these
    first["uncertainty"]["log_vars"] = torch.tensor([0.3, -0.3, 0.2])
    two = validate_spec({**raw, "train": {**raw["train"], "epochs": 2}})
    result = fit(two, train, val, prepared.labels, report, resume=first)
    second = load_torch(tmp_path / "epoch2.pt")
    assert saved[-1]["resumed_from_epoch"] == 1 and [m["epoch"] for m in result.history] == [1, 2]

    learned = second["uncertainty"]["log_vars"]
    assert torch.allclose(learned, torch.tensor([0.3, -0.3, 0.2]), atol=0.05)
    assert not torch.equal(learned, torch.tensor([0.3, -0.3, 0.2]))  # and trained on
    assert saved[-1]["task_weight_expression"] == pytest.approx(math.exp(-learned[0].item()), rel=1e-5)

    decay = min(0.9, 1 - 2 ** (-2 / 3))  # global step 2
    for key, value in second["ema"].items():
        if value.is_floating_point():
            assert torch.allclose(value, decay * first["ema"][key] + (1 - decay) * second["model"][key], atol=1e-6), key
    best = second["best_epoch"]
    best_ema = (first if best == 1 else second)["ema"]
    assert all(torch.equal(second["best_model"][k], best_ema[k]) for k in best_ema)  # the EMA is what is kept


def test_a_run_resumed_after_any_epoch_trains_exactly_as_one_that_never_stopped(tmp_path):
    """Shuffle, augmentation, dropout and mixup draw from (seed, epoch): a restarted trial is the same run."""
    from fer_tune.data.prepare import prepare_data

    spec = validate_spec({"name": "exact", "data": {"source": "synthetic", "image_size": 32,
                                                    "synthetic": {"n": 160, "identities": 40},
                                                    "split": {"val": 24, "test": 8}},
                          "model": {"backbone": "test_resnet", "dropout": 0.3},
                          "augment": {"strength": 0.8},
                          "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0,
                                    "mixup_alpha": 0.4}})
    prepared = prepare_data(spec.data, tmp_path)
    train, val = prepared.load("train", False), prepared.load("val", False)
    checkpoints = {}

    def report(metrics, checkpoint):
        save_torch(tmp_path / f"epoch{metrics['epoch']}.pt", checkpoint)
        checkpoints[metrics["epoch"]] = metrics

    never_stopped = fit(spec, train, val, prepared.labels, report)
    last = load_torch(tmp_path / "epoch3.pt")
    resumed = fit(spec, train, val, prepared.labels, report, resume=load_torch(tmp_path / "epoch1.pt"))
    assert checkpoints[3]["resumed_from_epoch"] == 1
    for before, after in zip(never_stopped.history[1:], resumed.history[1:]):
        assert after["epoch"] == before["epoch"] and after["train_loss"] == before["train_loss"]
        assert after["objective"] == before["objective"]
    again = load_torch(tmp_path / "epoch3.pt")
    assert all(torch.equal(again["model"][k], last["model"][k]) for k in last["model"])


def test_gpu_step_options_are_valid_on_a_cpu_and_change_nothing_there(tmp_path):
    from fer_tune.commands.train import train_experiment

    spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 1, "compile": True}))
    assert spec.data.loader_workers == "auto" and spec.train.compile
    plain = train_experiment(load_spec(write_spec(tmp_path / "p.yaml", train={"epochs": 1})), tmp_path / "plain", verbose=False)
    gpu_options = train_experiment(spec, tmp_path / "compiled", verbose=False)  # CPU: compile ignored, 0 loader workers
    assert gpu_options["expression"] == plain["expression"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_step_compiles_and_runs_channels_last(tmp_path):
    from fer_tune.commands.train import train_experiment

    spec = load_spec(write_spec(tmp_path / "s.yaml", train={"epochs": 2, "compile": True},
                                resources={"use_gpu": True, "cpus_per_worker": 2}))
    metrics = train_experiment(spec, tmp_path / "run", verbose=False)
    assert metrics["epochs_run"] == 2 and 0 <= metrics["expression"]["accuracy"] <= 1
    state = torch.load(tmp_path / "run" / "best" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)  # exported under the plain network's names


def test_the_gap_penalty_is_in_every_epochs_objective_and_chooses_the_kept_epoch(tmp_path):
    """ASHA, the kept epoch and the finalists all read the epoch's objective: the price is paid there."""
    from fer_tune.data.prepare import prepare_data

    raw = {"name": "gap", "data": {"source": "synthetic", "image_size": 32, "synthetic": {"n": 160, "identities": 40},
                                   "split": {"val": 24, "test": 8}},
           "model": {"backbone": "test_resnet", "dropout": 0.0},
           "train": {"epochs": 4, "batch_size": 16, "lr": 1e-2, "warmup_epochs": 0},
           "search": {"objective": {"expression_accuracy": 1.0},
                      "gap_penalty": {"allowed": 0.0, "weight": 5.0}}}
    spec = validate_spec(raw)
    prepared = prepare_data(spec.data, tmp_path)
    train, val = prepared.load("train", False), prepared.load("val", False)
    result = fit(spec, train, val, prepared.labels, lambda metrics, checkpoint: None)
    for epoch in result.history:
        gap = max(0.0, epoch["train_accuracy"] - epoch["val_expression_accuracy"])
        assert epoch["objective"] == pytest.approx(epoch["val_expression_accuracy"] - 5.0 * gap)
    assert any(e["train_accuracy"] > e["val_expression_accuracy"] for e in result.history)  # the price was paid
    kept = max(result.history, key=lambda e: e["objective"])
    assert result.history[-1]["best_epoch"] == kept["epoch"]
