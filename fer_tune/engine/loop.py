"""`fit()`: the one training loop.

It runs unchanged in `fer-tune train` (one process) and in every Ray Train worker of a search
trial (torch.distributed already initialised by Ray: DDP, a DistributedSampler and validation
predictions gathered from all ranks, so every rank computes the same metrics). What differs
between the two is only `report(metrics, checkpoint)`, called once per epoch.

Read it top to bottom: set-up, then per epoch train -> validate -> keep the best -> report.

Options from the spec, each off by default: a class-balanced sampler (`train.sampler`), mixup /
cutmix (`train.mixup_alpha`, `train.cutmix_alpha`), SGDR and one-cycle schedules
(`train.schedule`), an EMA of the weights that is what gets validated and kept
(`train.ema_decay`), learned uncertainty weights per task (`loss.weighting`) and distillation
from a teacher (`distill.teacher`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from fer_tune import NUM_EXPRESSIONS
from fer_tune.errors import UserError
from fer_tune.data.augment import build_augment
from fer_tune.data.dataset import FaceDataset
from fer_tune.data.sampler import ClassBalancedSampler
from fer_tune.engine import pretrained
from fer_tune.engine.evaluate import predict
from fer_tune.engine.teacher import load_teacher
from fer_tune.losses import (UncertaintyWeights, distillation_loss, hard_labels, inverse_frequency_weights,
                             multitask_loss)
from fer_tune.metrics import compute_metrics, flat_metrics, predicted_classes
from fer_tune.mixing import mix_batch
from fer_tune.model import create_model

Report = Callable[[dict, Optional[dict]], None]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: the trial is stopped and recorded as errored."""


@dataclass
class FitResult:
    best_model: dict
    best_metrics: dict
    best_epoch: int
    history: list = field(default_factory=list)


def fit(spec, train_split, val_split, labels: list[int], report: Report,
        device: Optional[torch.device] = None, resume: Optional[dict] = None,
        progress: Optional[Callable[[int, int, int, float], None]] = None) -> FitResult:
    """Train `spec` on `train_split`, validate on `val_split` each epoch, return the best epoch.

    `report(metrics, checkpoint)` gets flat metrics every epoch and a checkpoint dict (current
    and best weights, optimizer, schedule, history) that `resume` accepts to continue;
    `progress(epoch, step, steps, loss)`, if given, is called after every step on rank 0.
    """
    t = spec.train
    # A one-worker Ray Train run is plain training: same sampler, same numbers as `fer-tune train`.
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = device or torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    seed_everything(t.seed + rank)

    # --- model, optimiser, schedule ---------------------------------------------------------
    model_spec, fine_tune_from = pretrained.resolve(spec.model)  # every weights source as a timm file
    model = create_model(model_spec, pretrained=True)
    if fine_tune_from is not None and resume is None:
        targets = train_split.targets()
        tasks = ["expression"] * bool((targets["expression"] >= 0).any()) + \
                [task for task in ("valence", "arousal") if np.isfinite(targets[task]).any()]
        pretrained.load_experiment(model, fine_tune_from, labels, tasks)
    on_gpu = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last) if on_gpu else model.to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None) if distributed else model
    if t.compile and on_gpu:
        net = torch.compile(net)  # `model` stays the plain module: checkpoints and exports keep its names
    # Uncertainty weights live beside the model (not in it: exported models stay plain networks);
    # DDP does not see them, so their gradients are averaged across ranks by hand.
    uncertainty = UncertaintyWeights().to(device) if spec.loss.weighting == "uncertainty" else None
    optimizer = build_optimizer(model, t, extra=list(uncertainty.parameters()) if uncertainty else [])
    ema = build_ema(model, t)  # when on, the EMA is what is validated, kept and exported
    teacher = load_teacher(spec.distill.teacher, device) if spec.distill.teacher is not None else None
    per_rank_batch = max(1, t.batch_size // world)
    loader_workers = spec.data.loader_workers
    if loader_workers == "auto":  # decoding is done (the cache); workers only augment and collate
        loader_workers = min(4, max(0, int(spec.resources.cpus_per_worker) - 1)) if on_gpu else 0
    # The shuffle's generator and the augmentation are seeded by seed_epoch at every epoch.
    train_set = FaceDataset(train_split, build_augment(spec.augment.strength, spec.data.image_size))
    if len(train_set) // world < 2:  # BatchNorm cannot train on a batch of one
        raise UserError(f"the train split has {len(train_set)} image(s) for {world} training worker(s); each needs "
                        f"at least 2: use more data, smaller data.split sizes or fewer resources.workers_per_trial")
    if t.sampler == "class_balanced":
        sampler = ClassBalancedSampler(train_set.expression, world, rank, seed=t.seed)
    else:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=t.seed) if distributed \
            else RandomSampler(train_set, generator=torch.Generator())
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler,
                        drop_last=len(train_set) // world > per_rank_batch,
                        num_workers=loader_workers, persistent_workers=loader_workers > 0, pin_memory=on_gpu)
    steps_per_epoch = max(1, len(loader))
    scheduler = build_scheduler(optimizer, t, steps_per_epoch)
    amp_dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    class_weights = inverse_frequency_weights(train_split.table["expression"].to_numpy(), labels,
                                              NUM_EXPRESSIONS).to(device) if t.class_weights else None

    start_epoch, best_objective, best_epoch, stale = 1, -math.inf, 0, 0
    best_model, best_metrics, history = copy.deepcopy(model.state_dict()), {}, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume["ema"])
        if uncertainty is not None:
            uncertainty.load_state_dict(resume["uncertainty"])
        start_epoch = resume["epoch"] + 1
        best_model, best_metrics, history = resume["best_model"], resume["best_metrics"], resume["history"]
        best_objective, best_epoch, stale = resume["best_objective"], resume["best_epoch"], resume["stale"]

    for epoch in range(start_epoch, t.epochs + 1):
        started = time.perf_counter()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        seed_epoch(t.seed, rank, epoch, sampler, train_set.augment)

        # --- train one epoch (the heads only while train.freeze_epochs hold the backbone) ---
        net.train()
        frozen = epoch <= t.freeze_epochs
        if frozen:
            model.backbone.eval()  # its BatchNorm statistics stay as they came
        loss_sum = torch.zeros(3, device=device)  # loss * n, correct, n
        for step, (images, expression, valence, arousal) in enumerate(loader):
            images = images.to(device, non_blocking=True).float().div_(255)
            if on_gpu:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = {"expression": expression.to(device, non_blocking=True),
                       "valence": valence.to(device, non_blocking=True), "arousal": arousal.to(device, non_blocking=True)}
            images, targets, _ = mix_batch(images, targets, t.mixup_alpha, t.cutmix_alpha)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = net(images)
                loss, _ = multitask_loss(outputs, targets, spec.loss, t.label_smoothing, class_weights,
                                         log_vars=uncertainty.log_vars if uncertainty else None)
                if teacher is not None:
                    d = spec.distill
                    loss = (1 - d.alpha) * loss + d.alpha * distillation_loss(
                        outputs, teacher(images), spec.loss, d.temperature, teacher.tasks)
            if not distributed and not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch}, step {step + 1} "
                                       f"(lr {scheduler.get_last_lr()[0]:.3g})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if uncertainty is not None and distributed:
                average_gradients(uncertainty, world)
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            if frozen:
                for group in optimizer.param_groups:
                    if group.get("backbone"):
                        group["lr"] = 0.0  # the schedule sets it again after the step
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=(epoch - 1) * steps_per_epoch + step + 1)
            truth = hard_labels(targets["expression"])  # mixed batches: the dominant class
            labelled = truth >= 0
            loss_sum += torch.stack([loss.detach().float() * len(images),
                                     (outputs["expression"].argmax(1)[labelled] == truth[labelled]).sum(),
                                     labelled.sum()]).float()
            if progress and rank == 0:
                progress(epoch, step + 1, steps_per_epoch, loss.item())
        if distributed:
            dist.all_reduce(loss_sum)  # every rank sees a NaN on any rank and stops together
        train_loss = (loss_sum[0] / max(1, len(train_set))).item()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} in epoch {epoch} (lr {scheduler.get_last_lr()[0]:.3g})")
        train_accuracy = (loss_sum[1] / loss_sum[2].clamp(min=1)).item()

        # --- validate (sharded across ranks, gathered so every rank sees all predictions) ----
        evaluated = ema.module if ema is not None else model
        preds = gather_predictions(evaluated, val_split, device, rank, world, distributed)
        if not all(np.isfinite(p).all() for p in preds.values()):
            raise TrainingDiverged(f"validation outputs became nan/inf after epoch {epoch} "
                                   f"(lr {scheduler.get_last_lr()[0]:.3g})")
        val = compute_metrics(val_split.targets(), preds, labels=labels)
        val_flat = flat_metrics(val, prefix="val_")
        objective = spec.search.score(flat_metrics(val), train_accuracy)
        val_loss = validation_loss(preds, val_split.targets(), spec.loss, labels)

        # --- keep the best epoch, stop early -----------------------------------------------
        improved = math.isfinite(objective) and objective > best_objective
        if improved:
            best_objective, best_epoch, stale = objective, epoch, 0
            best_model = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            best_metrics = {"val": val, "train_accuracy": train_accuracy, "train_loss": train_loss,
                            "val_confusion": confusion(val_split.targets()["expression"], preds["expression"], labels)}
        else:
            stale += 1
        metrics = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                   "train_accuracy": train_accuracy, "val_loss": val_loss, **val_flat,
                   "objective": objective, "best_objective": best_objective, "best_epoch": best_epoch,
                   "resumed_from_epoch": start_epoch - 1,
                   **({f"task_weight_{k}": v for k, v in uncertainty.precisions().items()} if uncertainty else {}),
                   "epoch_seconds": time.perf_counter() - started}
        stop = t.early_stop_patience is not None and stale >= t.early_stop_patience
        metrics["finished"] = stop or epoch == t.epochs
        history.append(metrics)
        checkpoint = {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "uncertainty": uncertainty.state_dict() if uncertainty is not None else None,
            "best_model": best_model, "best_metrics": best_metrics, "best_objective": best_objective,
            "best_epoch": best_epoch, "stale": stale, "history": history, "labels": labels,
            "spec": spec.model_dump(mode="json"),
        }
        report(metrics, checkpoint)
        if stop:
            break
    return FitResult(best_model, best_metrics, best_epoch, history)


def build_optimizer(model: torch.nn.Module, t, extra: list = ()) -> torch.optim.Optimizer:
    """AdamW or SGD; norm layers and biases are excluded from weight decay unless asked for, and
    the backbone's parameters are groups of their own (flagged `backbone`, for train.freeze_epochs).

    `extra` parameters (the uncertainty log-variances) join without weight decay, which would
    pull every task's weight towards 1.
    """
    groups = {(backbone, decayed): [] for backbone in (True, False) for decayed in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 and not t.decay_norm_and_bias)
        groups[(name.startswith("backbone."), decayed)].append(param)
    # backbone groups are flagged: train.freeze_epochs gives them no step while it holds
    groups = [{"params": params, "weight_decay": t.weight_decay if decayed else 0.0, "backbone": backbone}
              for (backbone, decayed), params in groups.items() if params]
    if extra:
        groups.append({"params": list(extra), "weight_decay": 0.0})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)


def build_ema(model: torch.nn.Module, t) -> Optional[ModelEmaV3]:
    """timm's EMA of weights (and BN statistics) with its warm-up: the decay at step k is
    min(ema_decay, 1 - k^(-2/3)), so a short run is not dominated by the random initial weights."""
    return ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay else None


def build_scheduler(optimizer: torch.optim.Optimizer, t, steps_per_epoch: int):
    """A per-step schedule: torch's OneCycleLR for `onecycle`, else `lr_factor` as a LambdaLR.

    One-cycle (Smith 2018) rises from lr/25 to lr over `warmup_epochs`, anneals to lr/25e4 and
    cycles momentum (Adam's beta1) inversely between 0.95 and 0.85; SGD without momentum keeps none.
    """
    if t.schedule != "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, steps_per_epoch))
    total = max(2, t.epochs * steps_per_epoch)
    rise = min(max(1, int(t.warmup_epochs * steps_per_epoch)), total - 1)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.lr, total_steps=total, pct_start=rise / total, anneal_strategy="cos",
        cycle_momentum=not (t.optimizer == "sgd" and t.momentum == 0))


def lr_factor(t, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up for `warmup_epochs`, then cosine decay to zero, constant, or SGDR.

    SGDR (Loshchilov & Hutter 2017) repeats the cosine from the full lr: the first cycle lasts
    `sgdr_cycle_epochs`, each next one `sgdr_cycle_mult` times longer (the arithmetic of torch's
    CosineAnnealingWarmRestarts, here after the same warm-up as the other schedules).
    """
    warmup = int(t.warmup_epochs * steps_per_epoch)
    total = max(1, t.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "sgdr":
            return sgdr_factor(step - warmup, max(1.0, t.sgdr_cycle_epochs * steps_per_epoch), t.sgdr_cycle_mult)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def sgdr_factor(position: float, length: float, mult: float) -> float:
    """Cosine from 1 to 0 within the current cycle; the cycle is found in closed form."""
    if mult == 1:
        position %= length
    else:
        cycle = int(math.log(position / length * (mult - 1) + 1, mult))
        start = lambda c: length * (mult ** c - 1) / (mult - 1)  # noqa: E731
        cycle += (start(cycle + 1) <= position) - (start(cycle) > position)  # float error at a boundary
        position, length = position - start(cycle), length * mult ** cycle
    return 0.5 * (1 + math.cos(math.pi * position / length))


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Average the gradients of parameters that DDP does not manage (all ranks step alike)."""
    for param in module.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= world


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision only on GPU: bf16 where supported (auto), fp16 on request."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def gather_predictions(model, split, device, rank: int, world: int, distributed: bool) -> dict:
    if not distributed:
        return predict(model, split, device)
    # DDP syncs buffers (BatchNorm statistics) at the start of each forward, so after the last
    # step ranks differ slightly: evaluate rank 0's model everywhere, the one that is checkpointed.
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    shard = np.arange(rank, len(split), world)
    local = predict(model, split, device, indices=shard)
    gathered = [None] * world
    dist.all_gather_object(gathered, (shard, local))
    order = np.concatenate([idx for idx, _ in gathered])
    merged = {k: np.concatenate([p[k] for _, p in gathered]) for k in local}
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {k: v[inverse] for k, v in merged.items()}


def confusion(expression: np.ndarray, probs: np.ndarray, labels: list[int]) -> list[list[int]]:
    """Counts of (true, predicted) classes over the labelled rows, all 8 classes (for the report)."""
    from sklearn.metrics import confusion_matrix

    labelled = expression >= 0
    return confusion_matrix(expression[labelled], predicted_classes(probs[labelled], labels),
                            labels=list(range(NUM_EXPRESSIONS))).tolist()


def validation_loss(preds: dict, targets: dict, loss_spec, labels) -> float:
    """The training loss's terms on validation predictions (no smoothing): for learning curves."""
    outputs = {"expression": torch.log(torch.as_tensor(preds["expression"]).clamp(min=1e-8)),
               "valence": torch.as_tensor(preds["valence"]), "arousal": torch.as_tensor(preds["arousal"])}
    tensors = {k: torch.tensor(v) for k, v in targets.items()}
    loss, _ = multitask_loss(outputs, tensors, loss_spec)
    return loss.item()


def seed_epoch(seed: int, rank: int, epoch: int, sampler, augment) -> None:
    """Reseed every draw an epoch makes (shuffle, augmentation, dropout, mixup) from (seed, rank, epoch).

    Then a run resumed after any epoch trains exactly as one that never stopped: a search trial
    Tune restarted and the same config retrained give the same model. Loader worker processes
    (`data.loader_workers` > 0) keep their own augmentation streams, so there it holds only for
    the shuffle, dropout and mixup.
    """
    epoch_seed = int(np.random.SeedSequence([seed % 2**32, rank, epoch]).generate_state(1)[0])
    seed_everything(epoch_seed)
    if isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(epoch_seed)
    if augment is not None:
        augment.set_random_seed(epoch_seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
