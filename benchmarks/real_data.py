"""P4-P6 real faces: the report's recipe against tuned recipes on FER2013 (48 px), held-out test.

    python benchmarks/real_data.py --smoke            # wiring check on synthetic faces; numbers mean nothing
    python benchmarks/real_data.py                    # ../shared/data/fer2013-4k, 16 trials per search
    python benchmarks/real_data.py --samples 32 --cpus-per-trial 4 --work runs/benchmarks/real_data

Every step is the CLI as a subprocess, on the same data (`--data-root`, default
../shared/data/fer2013-4k: `data.source=folder`, 48 px, its own test split; skipped with a message
when absent), each experiment's numbers read from its `report/metrics.json`:

1. the report's recipe, `fer-tune train search_spaces/report_baseline.yaml`, for efficientnet_b0
   and for resnet50 (`--set model.backbone=resnet50`);
2. `fer-tune run search_spaces/regularization.yaml` and `fer-tune run search_spaces/resnet50_fix.yaml`
   with the same budget: the same `--samples` trials, epoch cap (the report's 20) and ASHA grace
   period / reduction factor (the epochs each really spent are in the table);
   so that each backbone has a search of its own, a backbone that neither search picked as its
   best gets one more: regularization.yaml with `--set model.backbone=THAT_ONE`, same budget;
3. each search's best config retrained from scratch with the report's epoch count:
   `fer-tune train DIR/best/config.yaml --set train.epochs=20`.

Table: test accuracy, macro F1, Cohen's kappa, each with its 95 % bootstrap interval; the best
epoch's train accuracy (measured on the augmented training batches during that epoch, as
fer-tune reports it); train - test gap; the epochs of that experiment and, for a retrained
search winner, including its search. Targets printed at the end:

- P4 the tuned model (regularization.yaml's winner, retrained) >= the better of the report's two
  recipes + 10 accuracy points;
- P5 after its own search the weaker backbone reaches >= 0.95 x the stronger one's test accuracy
  (per backbone, the retrained winner of its search(es) with the highest val objective: no
  choice is made on test numbers);
- P6 the tuned model's train - test accuracy gap <= 10 points.

Finished experiments in --work are reused when the script runs again (an interrupted search
resumes), so a long benchmark can be continued; `--table-only` prints the table of those finished
so far, and the targets they can decide, without training anything.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common import (FER2013, SEARCH_SPACES, REPO, epochs_spent, machine_header, markdown_table, read_metrics,
                    run_cli, smoke_note, usable_cores, verdict)

BACKBONES = ("efficientnet_b0", "resnet50")
SMOKE_BACKBONES = {"efficientnet_b0": "test_efficientnet", "resnet50": "test_resnet"}
SMOKE_DATA = ["data.source=synthetic", "data.synthetic.n=240", "data.synthetic.identities=40",
              "data.image_size=24", "data.split.val=40", "data.split.test=40"]


class Bench:
    def __init__(self, args, work: Path, data: list[str]):
        self.args, self.work, self.data = args, work, data
        self.common = [*data, f"resources.cpus_per_worker={args.cpus_per_trial:g}"]
        self.walls: dict[str, float] = {}

    def experiment(self, name: str, command: str, spec: Path, sets: list[str]) -> dict:
        """Run (or reuse) one CLI experiment into work/name; its metrics.json."""
        out = self.work / name
        if (out / "report" / "metrics.json").is_file():
            print(f"{name}: reusing {out}", file=sys.stderr, flush=True)
            return read_metrics(out)
        if command == "train":
            shutil.rmtree(out, ignore_errors=True)  # an unfinished `train` starts over; a `run` resumes
        print(f"{name}: fer-tune {command} {spec.relative_to(REPO) if spec.is_relative_to(REPO) else spec} ...",
              file=sys.stderr, flush=True)
        self.walls[name] = run_cli([command, spec, "--out", out, *[a for s in sets for a in ("--set", s)]],
                                   self.work / f"{name}.log")
        return read_metrics(out)

    def search(self, name: str, spec: Path, sets: list[str]) -> dict:
        a = self.args
        budget = [f"search.num_samples={a.samples}", f"train.epochs={a.epochs}",
                  "search.scheduler.type=asha", f"search.scheduler.grace_period={a.grace}",
                  f"search.scheduler.reduction_factor={a.reduction_factor:g}"]
        return self.experiment(name, "run", spec, [*self.common, *budget, *sets])

    def retrain(self, name: str) -> dict:
        config = self.work / name / "best" / "config.yaml"
        return self.experiment(f"{name}_retrained", "train", config, [f"train.epochs={self.args.epochs}"])


def backbone_of(experiment: Path) -> str:
    from fer_tune.specfile import read_spec

    best = experiment / "best" / "config.yaml"
    return read_spec(best if best.is_file() else experiment / "spec.yaml").model.backbone


def val_objective(experiment: Path, metrics: dict) -> float:
    from fer_tune.specfile import read_spec

    return read_spec(experiment / "spec.yaml").search.score(metrics.get("val", {}))


def with_ci(metrics: dict, key: str) -> str:
    value = metrics.get("expression", {}).get(key)
    if value is None:
        return "n/a"
    low, high = metrics.get("ci95", {}).get("expression", {}).get(key, (float("nan"), float("nan")))
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=FER2013, help="a FER2013-style folder dataset")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--samples", type=int, default=16, help="trials per search (the same for every search)")
    parser.add_argument("--epochs", type=int, help="epoch cap of the searches and of every retrain "
                                                   "(default: report_baseline.yaml's train.epochs, the report's 20)")
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period of every search")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA reduction factor of every search")
    parser.add_argument("--cpus-per-trial", type=float, default=float(min(4, usable_cores())),
                        help="resources.cpus_per_worker (torch threads of each training)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "benchmarks" / "real_data",
                        help="experiments go (and are reused from) here")
    parser.add_argument("--smoke", action="store_true",
                        help="synthetic faces, test_efficientnet / test_resnet, 1 epoch, 2 trials, temporary --work")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: print the table of the experiments already finished in --work "
                             "(a benchmark run in pieces) and the targets they can decide")
    args = parser.parse_args(argv)

    from fer_tune.specfile import load_spec

    recipe_spec = SEARCH_SPACES / "report_baseline.yaml"
    report_epochs = load_spec(recipe_spec, ["data.source=synthetic"]).train.epochs
    names = {b: b for b in BACKBONES}
    print(machine_header("P4-P6 real faces (benchmarks/real_data.py)"))
    if args.table_only:
        finished = {name: read_metrics(args.work / name) for name in experiment_names()
                    if (args.work / name / "report" / "metrics.json").is_file()}
        print(f"table only: the experiments finished in {args.work}; nothing trained now\n")
        summarize(finished, [n for n in SEARCH_NAMES if n in finished], names, args.work, None, False)
        return 0
    if args.smoke:
        args.samples, args.epochs, args.grace, args.reduction_factor = 2, 1, 1, 2.0
        names = dict(SMOKE_BACKBONES)
        data = list(SMOKE_DATA)
    else:
        if not (args.data_root / "train").is_dir():
            print(f"skipped: no dataset at {args.data_root} (expected FER2013's train/<class>/*.jpg and "
                  f"test/<class>/*.jpg; give another with --data-root)")
            return 0
        data = ["data.source=folder", f"data.root={args.data_root.resolve()}", f"data.image_size={args.image_size}"]
    args.epochs = args.epochs or report_epochs

    with tempfile.TemporaryDirectory(prefix="fer-tune-p4-") as tmp:
        work = Path(tmp) if args.smoke else args.work
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, work, data)
        print(smoke_note(args.smoke) + f"data: {' '.join(data)}; {args.cpus_per_trial:g} CPU(s) per training; "
              f"searches: {args.samples} trials, cap {args.epochs} epochs, ASHA grace {args.grace}, reduction "
              f"factor {args.reduction_factor:g}; retrains and recipes: {args.epochs} epochs; work: {work}\n",
              flush=True)
        started = time.perf_counter()
        results: dict[str, dict] = {}
        for b in BACKBONES:  # 1. the report's recipe
            results[f"recipe_{b}"] = bench.experiment(f"recipe_{b}", "train", recipe_spec,
                                                      [*bench.common, f"model.backbone={names[b]}",
                                                       f"train.epochs={args.epochs}"])
        smoke_space = ([f"space.model.backbone={{choice: [{names['efficientnet_b0']}, {names['resnet50']}]}}",
                        "space.train.lr={loguniform: [1.0e-3, 1.0e-2]}"] if args.smoke else [])
        searches = {"regularization": (SEARCH_SPACES / "regularization.yaml", smoke_space),
                    "resnet50_fix": (SEARCH_SPACES / "resnet50_fix.yaml",
                                     [f"model.backbone={names['resnet50']}"] if args.smoke else [])}
        for name, (spec, sets) in searches.items():  # 2. the searches, same budget
            results[name] = bench.search(name, spec, sets)
        picked = {backbone_of(work / name) for name in searches}
        for b in BACKBONES:  # a backbone no search picked gets a search of its own
            if names[b] not in picked:
                name = f"regularization_{b}"
                searches[name] = (SEARCH_SPACES / "regularization.yaml", [*smoke_space, f"model.backbone={names[b]}"])
                results[name] = bench.search(name, *searches[name])
        for name in searches:  # 3. the winners retrained with the report's epoch count
            results[f"{name}_retrained"] = bench.retrain(name)
        summarize(results, list(searches), names, work, time.perf_counter() - started, args.smoke)
    return 0


SEARCH_NAMES = ["regularization", "resnet50_fix", *(f"regularization_{b}" for b in BACKBONES)]


def experiment_names() -> list[str]:
    """Every experiment this benchmark can run, in its order."""
    return [*(f"recipe_{b}" for b in BACKBONES), *SEARCH_NAMES, *(f"{n}_retrained" for n in SEARCH_NAMES)]


def summarize(results: dict[str, dict], searches: list[str], names: dict[str, str], work: Path,
              total_wall: Optional[float], smoke_run: bool) -> None:
    """The table and the three target lines (a target whose experiments are missing says which)."""
    rows = []
    for name, m in results.items():
        own = epochs_spent(m)
        search = results.get(name.removesuffix("_retrained"), {}) if name.endswith("_retrained") else {}
        search_epochs = epochs_spent(search)
        train_acc, test_acc = m.get("train_accuracy"), m.get("expression", {}).get("accuracy")
        gap = f"{100 * (train_acc - test_acc):+.1f} pts" if train_acc is not None and test_acc is not None else "n/a"
        rows.append([name, backbone_of(work / name) if (work / name).exists() else "?",
                     with_ci(m, "accuracy"), with_ci(m, "f1_macro"), with_ci(m, "kappa"),
                     f"{train_acc:.3f}" if train_acc is not None else "n/a", gap, f"{m.get('best_epoch', '?')}",
                     f"{own}", f"{own + search_epochs}"])
    print(markdown_table(["experiment", "backbone", "test accuracy [95 % CI]", "macro F1 [95 % CI]",
                          "kappa [95 % CI]", "best-epoch train acc", "train - test", "best epoch", "epochs",
                          "epochs incl. search"], rows))
    print()
    if searches:
        budgets = ", ".join(f"{n} {epochs_spent(results[n])}" for n in searches)
        print(f"search epochs spent (same trials, cap and ASHA for each): {budgets}")
    if total_wall is not None:  # None: --table-only, nothing ran now
        print(f"total wall (this invocation, reused experiments not counted): {total_wall / 60:.1f} min")
    smoke = " [smoke]" if smoke_run else ""

    acc = {name: m.get("expression", {}).get("accuracy", float("nan")) for name, m in results.items()}
    tuned = "regularization_retrained"
    recipes = [f"recipe_{b}" for b in BACKBONES]
    missing = [n for n in [*recipes, tuned] if n not in results]
    if missing:
        print(f"P4 tuned vs the better recipe: not measured yet (missing: {', '.join(missing)}){smoke}")
    else:
        better_recipe = max(BACKBONES, key=lambda b: acc[f"recipe_{b}"])
        lift = acc[tuned] - acc[f"recipe_{better_recipe}"]
        print(f"P4 tuned ({tuned}, {backbone_of(work / tuned)}) - better recipe ({better_recipe}): "
              f"{acc[tuned]:.3f} - {acc[f'recipe_{better_recipe}']:.3f} = {100 * lift:+.1f} points "
              f"(target >= +10: {verdict(lift, 0.10 - 1e-9, higher_is_better=True)}){smoke}")
    per_backbone = {}
    for b in BACKBONES:  # the retrained winner with the best val objective, per backbone
        candidates = [n for n in results if n.endswith("_retrained") and backbone_of(work / n) == names[b]]
        if candidates:
            per_backbone[b] = max(candidates, key=lambda n: val_objective(work / n, results[n]))
    if len(per_backbone) < len(BACKBONES):
        lacking = [b for b in BACKBONES if b not in per_backbone]
        print(f"P5 weaker / stronger backbone after its own search: not measured yet (no retrained search "
              f"winner for {', '.join(lacking)}){smoke}")
    else:
        weaker, stronger = sorted(BACKBONES, key=lambda b: acc[per_backbone[b]])
        share = acc[per_backbone[weaker]] / acc[per_backbone[stronger]]
        print(f"P5 weaker / stronger backbone after its own search: {weaker} {acc[per_backbone[weaker]]:.3f} "
              f"({per_backbone[weaker]}) / {stronger} {acc[per_backbone[stronger]]:.3f} ({per_backbone[stronger]}) "
              f"= {share:.3f} (target >= 0.95: {verdict(share, 0.95, higher_is_better=True)}){smoke}")
    if tuned not in results:
        print(f"P6 train - test gap of the tuned model: not measured yet (missing: {tuned}){smoke}")
    else:
        tuned_gap = (results[tuned].get("train_accuracy") or float("nan")) - acc[tuned]
        print(f"P6 train - test gap of the tuned model: {100 * tuned_gap:+.1f} points "
              f"(target <= 10: {verdict(tuned_gap, 0.10 + 1e-9, higher_is_better=False)}){smoke}")


if __name__ == "__main__":
    sys.exit(main())
