"""Ablation of the training options: each switched on alone against the same base, same seeds.

    python benchmarks/ablation.py --smoke                      # < 1 min: wiring check, numbers mean nothing
    python benchmarks/ablation.py --data synthetic fer2013 --seeds 0 1 2 --out BENCHMARKS-ablation.md
    python benchmarks/ablation.py --base runs/regularization/best/config.yaml --teacher runs/quickstart

For every dataset, the base config (default: search_spaces/regularization.yaml's base values, or
the best config of a search) is trained once per seed, then once per seed with each option on;
every run is tested once on the held-out test split. The table gives, per option, the mean
paired difference to the base (option minus base, same seed) in test accuracy, macro F1 and
valence/arousal CCC, with a 95 % t-interval over the seeds. The verdict reads the F1 and CCC
intervals: "helped" when one lies above zero and none below, "hurt" the reverse, "mixed" when
both happen, otherwise "no clear effect" (with 3 seeds, only large effects clear the bar).

Training is `fer_tune.engine.loop.fit` and testing `fer_tune.engine.evaluate.evaluate_on_test` — the same code as
`fer-tune train` — on data prepared once per dataset. Finished runs are kept in --work
(metrics.json per run) and skipped when the script is run again, so a long ablation resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from fer_tune.data.prepare import prepare_data
from fer_tune.engine.loop import fit
from fer_tune.spec import Spec, parse_override
from fer_tune.specfile import check_spec, load_spec
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import evaluate_on_test

REPO = Path(__file__).resolve().parents[1]

OPTIONS: dict[str, list[str]] = {
    "class_weights": ["train.class_weights=true"],
    "balanced_sampler": ["train.sampler=class_balanced"],
    "mixup": ["train.mixup_alpha=0.2"],
    "cutmix": ["train.cutmix_alpha=1.0"],
    "sgdr": ["train.schedule=sgdr"],
    "onecycle": ["train.schedule=onecycle"],
    "grad_clip": ["train.grad_clip=1.0"],
    "ema": ["train.ema_decay=0.999"],
    "se": ["model.attention=se"],
    "cbam": ["model.attention=cbam"],
    "fpn": ["model.neck=fpn"],
    "uncertainty": ["loss.weighting=uncertainty"],
}
"""Each option alone, at a common default strength. Mixed precision is GPU-only and not ablated here."""

DATASETS: dict[str, list[str]] = {
    "synthetic": ["data.source=synthetic", "data.image_size=48"],
    "fer2013": ["data.source=folder", f"data.root={REPO.parent / 'shared' / 'data' / 'fer2013-4k'}",
                "data.image_size=48"],
}

SMOKE = ["data.synthetic.n=200", "data.synthetic.identities=40", "data.image_size=32", "data.split.val=40",
         "data.split.test=40", "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=32",
         "train.warmup_epochs=0", "resources.cpus_per_worker=1"]

METRICS = (("expression", "accuracy", "accuracy"), ("expression", "f1_macro", "macro F1"),
           ("valence", "ccc", "valence CCC"), ("arousal", "ccc", "arousal CCC"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "search_spaces" / "regularization.yaml",
                        help="base spec or exported best/config.yaml (its space: is ignored)")
    parser.add_argument("--data", nargs="+", choices=list(DATASETS), default=["synthetic", "fer2013"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base field for every run, e.g. --set train.epochs=10")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--options", nargs="+", choices=[*OPTIONS, "distill"], default=list(OPTIONS))
    parser.add_argument("--teacher", type=Path, help="a finished experiment: adds the distill option")
    parser.add_argument("--work", type=Path, help="where runs are kept (default runs/ablation[-smoke])")
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic runs, 2 seeds, 3 options (< 1 min)")
    args = parser.parse_args(argv)

    options = {name: OPTIONS.get(name, []) for name in args.options}
    if args.teacher:
        options["distill"] = [f"distill.teacher={args.teacher.resolve()}"]
    elif "distill" in options:
        parser.error("--options distill needs --teacher DIR")
    datasets, seeds, extra = args.data, args.seeds, list(args.set)
    if args.smoke:
        datasets, seeds, extra = ["synthetic"], seeds[:2], [*SMOKE, *extra]
        options = {name: options[name] for name in ("mixup", "ema", "se") if name in options} or options
    work = args.work or REPO / "runs" / ("ablation-smoke" if args.smoke else "ablation")

    tables = []
    for dataset in datasets:
        base = load_spec(args.base, [*DATASETS[dataset], *extra]).with_values({})
        results = run_dataset(base, dataset, options, seeds, work / dataset)
        tables.append(format_table(dataset, base, results, seeds))
        print(tables[-1], flush=True)
    if args.out:
        args.out.write_text("\n\n".join(tables) + "\n")
        print(f"written to {args.out}")
    return 0


def run_dataset(base: Spec, dataset: str, options: dict[str, list[str]], seeds: list[int],
                work: Path) -> dict[str, list[dict]]:
    """{option: [test metrics per seed]}, "base" included; data prepared once for all runs."""
    prepared = prepare_data(base.data, work)
    train, val = prepared.load("train", progress=False), prepared.load("val", progress=False)
    device = choose_device(base.resources.use_gpu)
    results: dict[str, list[dict]] = {}
    for name, overrides in {"base": [], **options}.items():
        values = dict(parse_override(o) for o in overrides)
        for seed in seeds:
            out = work / name / f"seed{seed}"
            if (out / "metrics.json").exists():
                results.setdefault(name, []).append(json.loads((out / "metrics.json").read_text()))
                continue
            spec = check_spec(base.with_values({**values, "train.seed": seed}), source=name)  # e.g. the teacher exists
            started = time.time()
            result = fit(spec, train, val, prepared.labels, lambda metrics, checkpoint: None, device=device)
            metrics = evaluate_on_test(spec, prepared, result.best_model, device, report_dir=out, extra={
                "option": name, "seed": seed, "best_epoch": result.best_epoch,
                "train_seconds": round(time.time() - started, 1), "device": str(device)})
            results.setdefault(name, []).append(metrics)
            print(f"{dataset} {name} seed {seed}: F1 {metrics['expression']['f1_macro']:.4f} "
                  f"({metrics['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return results


def paired_delta(option: list[dict], base: list[dict], task: str, metric: str) -> tuple[float, float, float]:
    """Mean of (option - base) over seeds and its 95 % t-interval (nan where not measured)."""
    diffs = np.array([o[task][metric] - b[task][metric] for o, b in zip(option, base)
                      if task in o and task in b], dtype=float)
    if len(diffs) == 0:
        return math.nan, math.nan, math.nan
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return mean, mean - half, mean + half


def format_table(dataset: str, base: Spec, results: dict[str, list[dict]], seeds: list[int]) -> str:
    runs = [m for ms in results.values() for m in ms]
    seconds = sum(m.get("train_seconds", 0) for m in runs)
    b = results["base"]
    mean_base = ", ".join(f"{label} {np.mean([m[t][k] for m in b]):.4f}" for t, k, label in METRICS if t in b[0])
    lines = [f"### {dataset}: {base.model.backbone}, {base.data.image_size} px, {base.train.epochs} epochs, "
             f"seeds {', '.join(map(str, seeds))}",
             "",
             f"Base (mean over seeds): {mean_base}. {len(runs)} runs, {seconds / 60:.1f} min of training on "
             f"{runs[0].get('device', '?')}. Deltas are option minus base on the same seed, mean [95 % t-interval].",
             "",
             "| option | " + " | ".join(f"Δ {label}" for _, _, label in METRICS) + " | verdict |",
             "| --- |" + " --- |" * (len(METRICS) + 1)]
    for name, metrics in results.items():
        if name == "base":
            continue
        cells, verdicts = [], []
        for task, metric, _ in METRICS:
            mean, low, high = paired_delta(metrics, b, task, metric)
            cells.append("n/a" if math.isnan(mean) else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
            if metric in ("f1_macro", "ccc") and not math.isnan(low):
                verdicts.append(1 if low > 0 else -1 if high < 0 else 0)
        verdict = {(True, False): "helped", (False, True): "hurt", (True, True): "mixed"}.get(
            (1 in verdicts, -1 in verdicts), "no clear effect")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
