"""P1 input pipeline: images/s of the real training path ÷ images/s of the bare model step.

    python benchmarks/pipeline.py --smoke        # wiring check (< 30 s); its numbers mean nothing
    python benchmarks/pipeline.py                # efficientnet_b0, resnet18 at 48 and 96 px, 5 repeats
    python benchmarks/pipeline.py --loader-workers 0 2 --repeats 7

Both arms run `fer_tune.engine.loop.fit` itself — the one training loop, not a copy of its step — for
one epoch of `--warmup + --steps` batches, with the recipe of search_spaces/report_baseline.yaml
(batch size, optimizer, constant lr, augmentation strength) and `resources.cpus_per_worker =
--threads`; only the model, the resolution and the data differ between configurations:

- pipeline: fit() as `fer-tune train` runs it: the uint8 image cache (built by
  `fer_tune.data.prepare` from the synthetic faces, memory-mapped) -> `FaceDataset` +
  `build_augment` -> torch DataLoader (`data.loader_workers` processes) -> the step.
- bare: the same fit() call with the DataLoader that fit builds replaced (for this call only,
  by patching `fer_tune.engine.loop.DataLoader`) by a list of that loader's own batches, drawn before
  the epoch starts and already on the training device: the step on tensors already in memory.

fit() calls `progress` after every step; the clock starts after the `--warmup` steps and stops
after the last one, so model creation, the warm-up and the validation that follows the epoch are
not timed. images/s = batch size x timed steps / elapsed. The two arms run interleaved (their
order alternating per repeat) and each cell is the median over `--repeats`. "loader only" is
the images/s of drawing those batches in the bare arm: the input path without any model step,
to show where the time goes when the ratio falls short.

Ratio = pipeline / bare per configuration; target >= 0.90. The last lines print each ratio and
the worst one.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from common import SEARCH_SPACES, machine_header, markdown_table, median, smoke_note, usable_cores, verdict

TARGET = 0.90


class StepClock:
    """fit()'s `progress` callback: times the steps after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.timed = warmup, None, None, 0

    def __call__(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()
        elif step == steps:
            self.end = time.perf_counter()
            self.timed = steps - self.warmup


@contextlib.contextmanager
def batches_in_memory(device, drawn: dict):
    """Inside this block, fit()'s DataLoader is replaced by the list of its own batches, drawn up
    front and moved to `device`; `drawn["seconds"]`/`drawn["images"]` say how long drawing took."""
    import fer_tune.engine.loop as loop

    real = loop.DataLoader

    class InMemoryBatches:
        def __init__(self, *args, **kwargs):
            started = time.perf_counter()
            self.batches = [tuple(t.to(device) for t in batch) for batch in real(*args, **kwargs)]
            drawn["seconds"] = time.perf_counter() - started
            drawn["images"] = sum(len(b[0]) for b in self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def __iter__(self):
            return iter(self.batches)

    loop.DataLoader = InMemoryBatches
    try:
        yield
    finally:
        loop.DataLoader = real


def prepare(size: int, args, work: Path):
    """The synthetic faces at `size` px through fer-tune's own split + uint8 cache."""
    from fer_tune.data.prepare import prepare_data
    from fer_tune.specfile import load_spec

    val = 16  # counts; the val split is only fit()'s after-epoch validation, which is not timed
    n = args.batch_size * (args.warmup + args.steps) + 2 * val + 8
    spec = load_spec(SEARCH_SPACES / "report_baseline.yaml", [
        "data.source=synthetic", f"data.image_size={size}", f"data.synthetic.n={n}",
        f"data.synthetic.identities={min(120, n // 4)}", f"data.split.val={val}", f"data.split.test={val}"])
    prepared = prepare_data(spec.data, work / f"{size}px")
    return prepared, prepared.load("train", progress=False), prepared.load("val", progress=False)


def measure(arm: str, backbone: str, size: int, workers: int, data, args) -> tuple[float, float]:
    """(images/s of the timed steps, images/s of drawing the batches or nan) for one fit() epoch."""
    import torch

    from fer_tune.engine.loop import fit
    from fer_tune.specfile import load_spec
    from fer_tune.engine.device import choose_device

    prepared, train, val = data
    steps = len(train) // args.batch_size
    spec = load_spec(SEARCH_SPACES / "report_baseline.yaml", [
        "data.source=synthetic", f"data.image_size={size}", f"data.loader_workers={workers}",
        f"model.backbone={backbone}", "train.epochs=1", f"train.batch_size={args.batch_size}",
        f"augment.strength={args.augment}", f"resources.cpus_per_worker={args.threads}", *args.set])
    device = choose_device(spec.resources.use_gpu)
    clock, drawn = StepClock(steps - args.steps), {}
    patch = batches_in_memory(device, drawn) if arm == "bare" else contextlib.nullcontext()
    with patch:
        fit(spec, train, val, prepared.labels, lambda metrics, checkpoint: None, device=device, progress=clock)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if clock.start is None or clock.end is None:
        raise RuntimeError(f"{backbone} {size}px: fit() ran {steps} steps, expected {args.warmup + args.steps}")
    rate = args.batch_size * clock.timed / (clock.end - clock.start)
    return rate, (drawn["images"] / drawn["seconds"] if drawn else float("nan"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 96])
    parser.add_argument("--batch-size", type=int, help="default: report_baseline.yaml's train.batch_size")
    parser.add_argument("--augment", type=float, help="augment.strength; default: report_baseline.yaml's")
    parser.add_argument("--loader-workers", nargs="+", type=int, default=[0],
                        help="data.loader_workers values to measure (default 0, fer-tune's default)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="torch threads (resources.cpus_per_worker); default: all usable cores")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other spec override for both arms, e.g. --set train.optimizer=sgd")
    parser.add_argument("--work", type=Path, help="where the image caches go (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and images: a wiring check")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must each be >= 1")

    from fer_tune.specfile import load_spec

    recipe = load_spec(SEARCH_SPACES / "report_baseline.yaml", ["data.source=synthetic"])
    if args.smoke:
        args.models, args.sizes, args.batch_size = ["test_resnet"], [32], 8
        args.steps, args.warmup, args.repeats, args.threads = 3, 1, 2, 1
    args.batch_size = args.batch_size or recipe.train.batch_size
    args.augment = recipe.augment.strength if args.augment is None else args.augment

    print(machine_header("P1 input pipeline (benchmarks/pipeline.py)"))
    print(smoke_note(args.smoke) + f"fit() of report_baseline.yaml's recipe: batch {args.batch_size}, "
          f"{recipe.train.optimizer} lr {recipe.train.lr:g} constant, augment.strength {args.augment:g}, "
          f"{args.threads} torch thread(s); synthetic faces from the uint8 cache; {args.warmup} warm-up + "
          f"{args.steps} timed steps, median of {args.repeats} interleaved repeats\n", flush=True)

    configs = [(m, s, w) for s in args.sizes for m in args.models for w in args.loader_workers]
    rates: dict[tuple, dict[str, list[float]]] = {c: {"pipeline": [], "bare": [], "loader": []} for c in configs}
    with tempfile.TemporaryDirectory(prefix="fer-tune-p1-") as tmp:
        work = args.work or Path(tmp)
        data = {size: prepare(size, args, work) for size in args.sizes}
        for repeat in range(args.repeats):
            for config in configs:
                model, size, workers = config
                for arm in (("pipeline", "bare") if repeat % 2 == 0 else ("bare", "pipeline")):
                    rate, loader = measure(arm, model, size, workers, data[size], args)
                    rates[config][arm].append(rate)
                    if arm == "bare":
                        rates[config]["loader"].append(loader)
                print(f"repeat {repeat + 1}/{args.repeats} {model} {size}px workers {workers}: pipeline "
                      f"{rates[config]['pipeline'][-1]:.1f} img/s, bare {rates[config]['bare'][-1]:.1f} img/s",
                      file=sys.stderr, flush=True)

    rows, ratios = [], {}
    for (model, size, workers), r in rates.items():
        pipeline, bare, loader = median(r["pipeline"]), median(r["bare"]), median(r["loader"])
        ratios[(model, size, workers)] = pipeline / bare
        rows.append([model, f"{size}", f"{workers}", f"{args.batch_size}", f"{pipeline:.1f}", f"{bare:.1f}",
                     f"{loader:.1f}", f"{pipeline / bare:.3f}"])
    print(markdown_table(["model", "px", "loader workers", "batch", "pipeline img/s", "bare step img/s",
                          "loader only img/s", "ratio"], rows))
    print()
    for (model, size, workers), ratio in ratios.items():
        print(f"P1 ratio {model} {size}px loader_workers={workers}: {ratio:.3f}")
    worst = min(ratios.values())
    print(f"P1 ratio (worst configuration): {worst:.3f} (target >= {TARGET:.2f}: "
          f"{verdict(worst, TARGET, higher_is_better=True)}){' [smoke]' if args.smoke else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
