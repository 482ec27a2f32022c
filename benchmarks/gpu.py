"""The GPU check, ready to run on one GPU in under about 8 minutes (issue #19):

    python benchmarks/gpu.py                  # on a machine with a CUDA GPU
    python benchmarks/gpu.py --smoke          # CPU wiring check (the test suite runs it); numbers mean nothing

1. P1 on the GPU: `benchmarks/pipeline.py` (the real input path ÷ the bare step) for resnet18 and
   efficientnet_b0 at 48, 96 and 224 px.
2. Trials sharing the GPU: the same 8 short trainings as one `fer-tune run` with 1, 2, 4 and 8
   trials at once (`resources.gpus_per_worker` 1, 1/2, 1/4, 1/8); images trained per second of
   wall, all trials together, and the speed-up over one at a time.
3. A 32-trial search of `search_spaces/pretrained.yaml` (the space the fer2013-4k benchmark runs)
   on the whole FER2013 (`../shared/data/fer2013`, 28,709 training faces, 48 px), four trials per
   GPU, with its wall time and the winner's test accuracy; `--search-samples` and
   `--search-epochs` shorten it to fit a time budget.

Every part prints its table; the last lines give each part's headline number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SEARCH_SPACES, machine_header, markdown_table, read_metrics, run_cli, smoke_note

FER2013_FULL = REPO.parent / "shared" / "data" / "fer2013"


def shared_gpu(concurrency: int, args, work: Path) -> tuple[float, int]:
    """(images trained per second of wall, trials) for 8 fixed trainings (2 in a smoke run) run
    `concurrency` at a time."""
    epochs, n = (1, 160) if args.smoke else (3, 4000)
    trials = 2 if args.smoke else 8
    spec = work / f"share{concurrency}.yaml"
    spec.write_text(json.dumps({
        "name": f"share{concurrency}",
        "data": {"source": "synthetic", "image_size": 24 if args.smoke else 48,
                 "synthetic": {"n": n, "identities": 40}, "split": {"val": 0.1, "test": 0.1}},
        "model": {"backbone": "test_resnet" if args.smoke else "resnet18"},
        "train": {"epochs": epochs, "batch_size": 64, "warmup_epochs": 0},
        "search": {"num_samples": trials, "finalists": 0, "scheduler": {"type": "none"},
                   "max_concurrent_trials": concurrency, "searcher": {"type": "random"}},
        "space": {"train.lr": {"loguniform": [1.0e-3, 3.0e-3]}},
        "resources": ({"use_gpu": False, "cpus_per_worker": 1.0 / concurrency} if args.smoke else
                      {"use_gpu": True, "gpus_per_worker": 1.0 / concurrency, "cpus_per_worker": args.cpus / concurrency}),
    }))
    started = time.perf_counter()
    run_cli(["run", spec, "--out", work / f"share{concurrency}"], work / f"share{concurrency}.log")
    wall = time.perf_counter() - started
    train_images = int(n * 0.8)
    return trials * epochs * train_images / wall, trials


def search_sets(args) -> tuple[list[str], int, int]:
    """The --set values of part 3's search, its trials and its epoch cap."""
    if args.smoke:
        data = ["data.source=synthetic", "data.image_size=24", "data.synthetic.n=200", "data.synthetic.identities=40",
                "data.split.val=20", "data.split.test=20", "model.backbone=test_resnet", "model.pretrained=null",
                "resources.use_gpu=false", "resources.cpus_per_worker=1"]
        samples, epochs = 2, 1
    else:
        data = ["data.source=folder", f"data.root={FER2013_FULL}", "data.image_size=48", "resources.use_gpu=true",
                "resources.gpus_per_worker=0.25", f"resources.cpus_per_worker={args.cpus / 4:g}"]
        samples, epochs = args.search_samples, args.search_epochs
    sets = [*data, f"search.num_samples={samples}", f"train.epochs={epochs}",
            f"search.scheduler.grace_period={min(3, epochs)}", "search.finalists=2", "search.finalist_seeds=1"]
    if args.smoke:
        sets += ["search.scheduler.type=none", "search.finalists=0"]
    return sets, samples, epochs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=float, default=8.0, help="CPUs the trials sharing the GPU get between them")
    parser.add_argument("--search-samples", type=int, default=32)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], choices=["p1", "share", "search"])
    parser.add_argument("--concurrency", nargs="+", type=int, help="trials at once to measure in part 2 "
                                                                   "(default 1 2 4 8; smoke 1 2)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models and data: a wiring check")
    args = parser.parse_args(argv)

    import torch

    print(machine_header("GPU check (benchmarks/gpu.py)"))
    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA GPU on this machine (run with --smoke for a CPU wiring check)")
        return 0
    print(smoke_note(args.smoke))
    lines = []
    with tempfile.TemporaryDirectory(prefix="fer-tune-gpu-") as tmp:
        work = Path(tmp)
        if "p1" not in args.skip:
            import pipeline

            sizes = ["32"] if args.smoke else ["48", "96", "224"]
            models = ["test_resnet"] if args.smoke else ["resnet18", "efficientnet_b0"]
            extra = ["--smoke"] if args.smoke else ["--repeats", "3", "--threads", "4"]
            pipeline.main(["--models", *models, "--sizes", *sizes, *extra])
            lines.append("P1 on the GPU: see the ratio lines above")
        if "share" not in args.skip:
            rows, rates = [], {}
            for concurrency in args.concurrency or ((1, 2) if args.smoke else (1, 2, 4, 8)):
                rates[concurrency], trials = shared_gpu(concurrency, args, work)
                base = rates.get(1)
                rows.append([concurrency, f"{1 / concurrency:g}", trials, f"{rates[concurrency]:.0f}",
                             f"{rates[concurrency] / base:.2f}" if base else "n/a"])
            print(markdown_table(["trials at once", "GPU per trial", "trials", "images/s (all trials)",
                                  "speed-up over one at a time"], rows))
            best = max(rates, key=rates.get)
            lines.append(f"sharing the GPU: {rates[best] / rates[1]:.2f}x the images/s of one trial at a time, "
                         f"at {best} trials per GPU" if 1 in rates else
                         f"sharing the GPU: {rates[best]:.0f} images/s at {best} trials per GPU")
        if "search" not in args.skip:
            sets, samples, epochs = search_sets(args)
            started = time.perf_counter()
            run_cli(["run", SEARCH_SPACES / "pretrained.yaml", "--out", work / "search",
                     *[a for s in sets for a in ("--set", s)]], work / "search.log")
            wall = time.perf_counter() - started
            metrics = read_metrics(work / "search")
            lines.append(f"search: {samples} trials of pretrained.yaml, cap {epochs} epochs, on "
                         f"{'synthetic faces' if args.smoke else 'the whole FER2013'}: {wall / 60:.1f} min wall, "
                         f"winner's test accuracy {metrics['expression']['accuracy']:.3f}")
    print()
    for line in lines:
        print(line + (" [smoke]" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
