"""P4-P6 real faces: the report's two recipes against fer-tune's searches on FER2013 (48 px).

    python benchmarks/real_data.py --smoke            # wiring check on synthetic faces; numbers mean nothing
    python benchmarks/real_data.py                    # ../shared/data/fer2013-4k, 16 trials per search
    python benchmarks/real_data.py --table-only       # what has finished so far; trains nothing

Every step is the CLI as a subprocess, on the same data (`--data-root`, default
../shared/data/fer2013-4k: `data.source=folder`, 48 px, its own 399-face test split), each
experiment's numbers read from its own files:

1. the report's recipe, `fer-tune train search_spaces/report_baseline.yaml`, for efficientnet_b0
   and for resnet50 (`--set model.backbone=resnet50`), the report's 20 epochs;
2. two arms of searches with the same budget (`--samples` trials, the 20-epoch cap, ASHA's grace
   period and reduction factor, `--finalists` x `--finalist-seeds` full-budget re-runs):
   - from scratch: `regularization.yaml` (efficientnet_b0 or resnet50) and `resnet50_fix.yaml`;
   - ImageNet weights as a searchable choice: `pretrained.yaml` (tf_efficientnet_lite0 or
     mobilenetv2_100, `model.pretrained: {choice: [null, imagenet]}`);
   a backbone of an arm that its search did not pick gets a search of its own (P5), the same
   space with `--set model.backbone=THAT_ONE`. A search's model is its winner: the finalist with
   the best mean validation objective, already trained at full budget, tested once;
3. every recipe and search winner evaluated, as trained, on a second test set no selection saw
   (`--second-test`, default FER2013's 3,589-face PublicTest in ../shared/data/fer2013/test):
   `fer-tune evaluate DIR --set data.source=folder --set data.root=...`.

Printed: a table (test accuracy and macro F1 with 95 % bootstrap intervals on both test sets,
the best epoch's train accuracy, the train - test gap, epochs, wall) and, per arm:

- P4 the search's winner minus the better of the report's two recipes (better on the 399-face
  test), on each test set: the difference in accuracy with a paired 95 % bootstrap interval
  over the same faces and McNemar's p. Met when >= +10 points with the interval above 0;
- P5 after its own search, the weaker backbone's test accuracy / the stronger's (per backbone,
  the search winner with the highest validation objective; no choice uses test numbers), >= 0.95;
- P6 the winner's train - test accuracy gap <= 10 points.

`--extend SEARCH=N` then gives a finished search N trials in all, in a copy of its folder named
SEARCH_N (`fer-tune run --resume --set search.num_samples=N`: the extra trials go on from its
Optuna study and ASHA rungs, and its final phase runs again over all of them). The extended
winner gets the same tests and its own P4 and P6 lines; the search it extends stays as it was.

`--variant NAME SEARCH KEY=VALUE...` runs the search SEARCH again as NAME with those spec values
changed (e.g. `--variant pretrained_gap pretrained "search.gap_penalty={allowed: 0.1, weight: 1.0}"`),
side by side with it on the same data and budget, with its own P4 and P6 lines.

Finished experiments in --work are reused (an interrupted search resumes with `--resume`), so
the benchmark runs in pieces across sessions; each piece's wall time is kept in
--work/walls.json and the table adds them up. `--export DIR` writes each P4/P5 winner's complete
config (data.root relative to the repository) as DIR/<experiment>.yaml, as each search ends (with
`--table-only`: those that have ended).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import yaml

from common import (FER2013, REPO, SEARCH_SPACES, git_revision, machine_header, markdown_table, run_cli,
                    smoke_note, usable_cores, verdict)

RECIPES = ("efficientnet_b0", "resnet50")
ARMS = {  # arm: (its main search, its spec, its backbones, its other searches)
    "scratch": ("regularization", "regularization.yaml", ("efficientnet_b0", "resnet50"),
                {"resnet50_fix": "resnet50_fix.yaml"}),
    "imagenet": ("pretrained", "pretrained.yaml", ("tf_efficientnet_lite0", "mobilenetv2_100"), {}),
}
ARM_ORDER = ("imagenet", "scratch")  # the arm that can win first: it answers the question soonest
SECOND_TEST = REPO.parent / "shared" / "data" / "fer2013" / "test"
SMOKE_NAMES = {"efficientnet_b0": "test_efficientnet", "resnet50": "test_resnet",
               "tf_efficientnet_lite0": "test_efficientnet", "mobilenetv2_100": "test_resnet"}
SMOKE_DATA = ["data.source=synthetic", "data.synthetic.n=240", "data.synthetic.identities=40",
              "data.image_size=24", "data.split.val=40", "data.split.test=40"]


class Bench:
    """Runs (or reuses) each experiment in --work, and keeps each piece's wall time."""

    def __init__(self, args, work: Path, data: list[str], names: dict[str, str]):
        self.args, self.work, self.data, self.names = args, work, data, names
        # loader_workers pinned: a CPU benchmark uses none, and a search begun before `auto` existed
        # (saved as 0) resumes as the same experiment
        self.common = [*data, f"resources.cpus_per_worker={args.cpus_per_trial:g}", "data.loader_workers=0"]
        self.spaces = SEARCH_SPACES  # the smoke run's are made small

    def experiment(self, name: str, command: str, spec: Path, sets: list[str]) -> Path:
        out = self.work / name
        if (out / "report" / "metrics.json").is_file():
            print(f"{name}: reusing {out}", file=sys.stderr, flush=True)
            if changed := spec_changes(out, spec, sets):
                print(f"note: {drift_note(name, spec, changed)}", file=sys.stderr, flush=True)
            return out
        args = [command, spec, "--out", out]
        if command == "run" and (out / "tune").is_dir():
            args.append("--resume")  # an interrupted search goes on; an unfinished `train` starts over
        elif out.exists():
            import shutil

            shutil.rmtree(out)
        print(f"{name}: fer-tune {' '.join(map(str, args[:2]))} ...", file=sys.stderr, flush=True)
        with self.timed(name):
            run_cli([*args, *[a for s in sets for a in ("--set", s)]], self.work / f"{name}.log")
        return out

    def recipe_command(self, backbone: str) -> tuple[Path, list[str]]:
        return SEARCH_SPACES / "report_baseline.yaml", [*self.common, f"model.backbone={self.names[backbone]}",
                                                         f"train.epochs={self.args.epochs}"]

    def recipe(self, backbone: str) -> Path:
        return self.experiment(f"recipe_{backbone}", "train", *self.recipe_command(backbone))

    def search_command(self, spec_name: str, sets: list[str]) -> tuple[Path, list[str]]:
        a = self.args
        budget = [f"search.num_samples={a.samples}", f"train.epochs={a.epochs}", "search.scheduler.type=asha",
                  f"search.scheduler.grace_period={a.grace}", f"search.scheduler.reduction_factor={a.reduction_factor:g}",
                  f"search.searcher.startup_trials={a.startup}", f"search.finalists={a.finalists}",
                  f"search.finalist_seeds={a.finalist_seeds}"]
        return self.spaces / spec_name, [*self.common, *budget, *sets]

    def search(self, name: str, spec_name: str, sets: list[str]) -> Path:
        return self.experiment(name, "run", *self.search_command(spec_name, sets))

    def extend(self, name: str, samples: int) -> Optional[Path]:
        """A copy of the finished search `name`, given `samples` trials in all (None until `name` has
        finished). The copy is made once; its extension resumes like any search."""
        source, out = self.work / name, self.work / extended_name(name, samples)
        if not (source / "report" / "metrics.json").is_file():
            print(f"{out.name}: not yet ({name} has not finished)", file=sys.stderr, flush=True)
            return None
        if metrics_of(out).get("trials") == samples:
            print(f"{out.name}: reusing {out}", file=sys.stderr, flush=True)
            return out
        if not out.is_dir():  # copied whole, or not at all: a session may end mid-copy
            import shutil

            partial = out.with_name(out.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial, ignore=shutil.ignore_patterns("*.log"))
            (partial / "report" / "metrics.json").unlink()  # the copy's own report comes from its extension
            (partial / EXTENDED_FROM).write_text(name)
            partial.rename(out)
        print(f"{out.name}: fer-tune run {out / 'spec.yaml'} --resume --set search.num_samples={samples} ...",
              file=sys.stderr, flush=True)
        with self.timed(out.name):
            run_cli(["run", out / "spec.yaml", "--out", out, "--resume", "--set", f"search.num_samples={samples}"],
                    self.work / f"{out.name}.log")
        return out

    def second_test(self, name: str) -> Optional[Path]:
        """The experiment's model evaluated on the second test set (None when there is none)."""
        if self.args.second_test_sets is None:
            return None
        out = self.work / f"{name}_second_test"
        if not (out / "metrics.json").is_file():
            with self.timed(f"{name}_second_test"):
                run_cli(["evaluate", self.work / name, "--out", out,
                         *[a for s in self.args.second_test_sets for a in ("--set", s)]],
                        self.work / f"{name}_second_test.log")
        return out

    @contextlib.contextmanager
    def timed(self, name: str):
        """Record this piece of `name` in walls.json when it starts and again when it ends."""
        piece = {"started": time.time(), "seconds": None, "revision": git_revision()}
        self.record(name, piece)
        finished = False
        try:
            yield
            finished = True
        finally:
            self.record(name, {**piece, "seconds": time.time() - piece["started"], "finished": finished})

    def record(self, name: str, piece: dict) -> None:
        walls = read_walls(self.work)
        pieces = [p for p in walls.get(name, []) if p["started"] != piece["started"]]
        walls[name] = [*pieces, piece]
        (self.work / "walls.json").write_text(json.dumps(walls, indent=1))


EXTENDED_FROM = "extended_from"  # in an extended copy: the name of the search it was copied from


def parse_extension(text: str) -> tuple[str, int]:
    name, _, samples = text.partition("=")
    if not name or not samples.isdigit() or int(samples) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SEARCH=N, e.g. pretrained=24")
    return name, int(samples)


def parse_variant(words: list[str]) -> tuple[str, str, list[str]]:
    """--variant NAME SEARCH KEY=VALUE...: a search run again under another name with changed values."""
    if len(words) < 3 or any("=" not in w for w in words[2:]) or "=" in words[0] or "=" in words[1]:
        raise ValueError(f"--variant {' '.join(words)}: expected NAME SEARCH KEY=VALUE..., e.g. "
                         f"--variant pretrained_gap pretrained 'search.gap_penalty={{allowed: 0.1}}'")
    name, search, sets = words[0], words[1], words[2:]
    searches = {n for main, _, backbones, others in ARMS.values()
                for n in [main, *others, *(f"{main}_{b}" for b in backbones)]}
    if search not in searches:
        raise ValueError(f"--variant {name} {search}: no such search; one of {', '.join(sorted(searches))}")
    if (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in searches or name.startswith("recipe_")
            or name.endswith("_second_test") or name == "walls.json"):
        raise ValueError(f"--variant {name}: not a new experiment's name (letters, digits, _ . -, and not a "
                         f"search, recipe or second test of this benchmark)")
    return name, search, sets


def check_names(variants: list[tuple[str, str, list[str]]], extensions: list[tuple[str, int]]) -> None:
    """Each experiment a run adds has a folder of its own."""
    names = [name for name, _, _ in variants]
    taken = {extended_name(n, k) for n, k in extensions}
    clash = sorted({n for n in names if names.count(n) > 1 or n in taken})
    if clash:
        raise ValueError(f"--variant {clash[0]}: given twice, or the folder of an --extend")


def spec_changes(folder: Path, spec: Path, sets: list[str]) -> list[str]:
    """The fields in which the spec a finished experiment ran differs from the one this command
    would run today because the shipped file was edited since: it is reused, so its row shows the
    old spec. This command's settings go over both, so a flag or a machine that sets them
    differently (`--cpus-per-trial`'s default follows the cores) is not a change."""
    from fer_tune.errors import UserError
    from fer_tune.spec import describe_differences
    from fer_tune.specfile import read_spec

    saved = folder / "spec.yaml"
    if not saved.is_file():
        return []
    try:
        then, now = (read_spec(path, sets).model_dump(mode="json") for path in (saved, spec))
    except UserError as err:
        return [f"(unreadable: {err})"]
    return sorted(d.split(": ", 1)[0] for d in describe_differences(then, now, "then", "now"))


def drift_note(name: str, spec: Path, changed: list[str]) -> str:
    return (f"{name} ran with a spec that {spec.name} and these settings no longer give (it differs in "
            f"{', '.join(changed)}); its row is that older spec's: move its folder away to run it again")


def variant_differs(folder: Path, sets: list[str]) -> bool:
    """Whether the variant's folder holds a search begun with other values than `sets`: a finished
    one is reused, so its results would be shown under values it did not run with."""
    from fer_tune.specfile import read_spec

    saved = folder / "spec.yaml"
    if not saved.is_file():
        return False
    return read_spec(saved).model_dump() != read_spec(saved, sets).model_dump()


def extended_name(name: str, samples: int) -> str:
    return f"{name}_{samples}"


def read_walls(work: Path) -> dict:
    try:
        return json.loads((work / "walls.json").read_text())
    except (OSError, ValueError):
        return {}


def pieces_of(work: Path, name: str) -> list[tuple[str, dict]]:
    """(experiment, piece) of every piece that made an experiment: an extended copy's include those
    of the search it was copied from (its `extended_from` file names it)."""
    source = work / name / EXTENDED_FROM
    earlier = pieces_of(work, source.read_text().strip()) if source.is_file() else []
    return earlier + [(name, p) for p in read_walls(work).get(name, [])]


def wall_of(work: Path, name: str) -> str:
    """Minutes an experiment took over all its pieces; a piece cut off (a session's end) counts up
    to the last file it wrote."""
    pieces = pieces_of(work, name)
    if not pieces:
        return "n/a"
    total = 0.0
    starts = sorted(p["started"] for _, p in pieces)
    for folder, p in pieces:
        if p["seconds"] is not None:
            total += p["seconds"]
        else:  # cut off: until its last file, and never past the next piece's start
            following = [s for s in starts if s > p["started"]]
            last = max((f.stat().st_mtime for f in (work / folder).rglob("*") if f.is_file()), default=p["started"])
            total += max(0.0, min([last, *following]) - p["started"])
    return f"{total / 60:.0f} min" + (f" ({len(pieces)} pieces)" if len(pieces) > 1 else "")


def provenance(work: Path, name: str) -> str:
    """When and at which fer-tune revisions an experiment ran, over all its pieces: what a winner
    exported later must name, not the revision that happens to export it."""
    pieces = sorted((p for _, p in pieces_of(work, name)), key=lambda p: p["started"])
    if not pieces:
        return "at a time and revision walls.json did not record"
    moments = [t for p in pieces for t in (p["started"], p["started"] + (p.get("seconds") or 0))]
    days = sorted({datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date().isoformat() for t in moments})
    revisions = list(dict.fromkeys(p.get("revision", "unrecorded") for p in pieces))
    return f"{' to '.join([days[0], days[-1]] if len(days) > 1 else days)}, fer-tune {', '.join(revisions)}"


# --- reading results ---------------------------------------------------------------------------

def metrics_of(folder: Path) -> dict:
    path = folder / "report" / "metrics.json" if (folder / "report").is_dir() else folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def predictions_of(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "report" / "test_predictions.csv" if (folder / "report").is_dir()
                       else folder / "test_predictions.csv")


def config_of(experiment: Path) -> dict:
    best = experiment / "best" / "config.yaml"
    return yaml.safe_load((best if best.is_file() else experiment / "spec.yaml").read_text())


def val_objective(experiment: Path) -> float:
    from fer_tune.specfile import read_spec

    metrics = metrics_of(experiment)
    return read_spec(experiment / "spec.yaml").search.score(metrics.get("val", {}), metrics.get("train_accuracy"))


def with_ci(metrics: dict, key: str) -> str:
    value = metrics.get("expression", {}).get(key)
    if value is None:
        return "n/a"
    low, high = metrics.get("ci95", {}).get("expression", {}).get(key, (float("nan"), float("nan")))
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def paired(a: pd.DataFrame, b: pd.DataFrame, labels: list[int]) -> dict:
    """B minus A on the same faces (rows matched by image): accuracy difference, its paired 95 %
    bootstrap interval and McNemar's exact p, from `fer_tune.metrics.paired_comparison`."""
    from fer_tune import EXPRESSIONS
    from fer_tune.metrics import paired_comparison

    joined = a.merge(b, on="image", suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) != len(a) or len(joined) != len(b):
        raise SystemExit(f"the two models were not tested on the same faces ({len(a)} / {len(b)} / {len(joined)} shared)")
    if not (joined["expression_a"] == joined["expression_b"]).all():
        raise SystemExit("the two prediction files disagree on the true labels of the same faces")
    probs = {side: np.stack([joined[f"p_{n}_{side}"].to_numpy() for n in EXPRESSIONS], axis=1) for side in "ab"}
    out = paired_comparison({"expression": joined["expression_a"].to_numpy()}, {"expression": probs["a"]},
                            {"expression": probs["b"]}, labels=labels)
    low, high = out["ci95"]["expression"]["accuracy"]
    return {"difference": out["difference"]["expression"]["accuracy"], "low": low, "high": high,
            "p": out["mcnemar"]["p_value"], "faces": len(joined)}


# --- the benchmark -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=FER2013, help="a FER2013-style folder dataset")
    parser.add_argument("--second-test", type=Path, default=SECOND_TEST,
                        help="a class folder of test faces no selection sees (default FER2013 PublicTest)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--samples", type=int, default=16, help="trials per search (the same for every search)")
    parser.add_argument("--startup", type=int, help="TPE's random start-up trials (default: a third of --samples)")
    parser.add_argument("--epochs", type=int, help="epoch cap of the searches, the finalists and the recipes "
                                                   "(default: report_baseline.yaml's, the report's 20)")
    parser.add_argument("--grace", type=int, default=3, help="ASHA grace period of every search")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA reduction factor of every search")
    parser.add_argument("--finalists", type=int, default=3, help="search.finalists of every search")
    parser.add_argument("--finalist-seeds", type=int, default=2, help="search.finalist_seeds of every search")
    parser.add_argument("--cpus-per-trial", type=float, default=float(min(4, usable_cores())),
                        help="resources.cpus_per_worker (torch threads of each training)")
    parser.add_argument("--arms", nargs="+", choices=ARM_ORDER, default=list(ARM_ORDER))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "benchmarks" / "real_data",
                        help="experiments go (and are reused from) here")
    parser.add_argument("--export", type=Path, help="write each P4/P5 winner's config as EXPORT/<experiment>.yaml")
    parser.add_argument("--extend", action="append", default=[], type=parse_extension, metavar="SEARCH=N",
                        help="after the arms, a copy SEARCH_N of a finished search given N trials in all (repeatable)")
    parser.add_argument("--variant", action="append", default=[], nargs="+", type=str,
                        metavar=("NAME SEARCH", "KEY=VALUE"),
                        help="after the arms, search SEARCH again as NAME with at least one spec value "
                             "changed (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="synthetic faces, tiny backbones, 2 epochs, 2 trials, temporary --work")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: the table of what has finished in --work and the targets it decides")
    args = parser.parse_args(argv)
    try:
        args.variant = [parse_variant(v) for v in args.variant]
        check_names(args.variant, args.extend)
    except ValueError as err:
        parser.error(str(err))

    from fer_tune.specfile import load_spec

    names = {b: b for b in SMOKE_NAMES}
    print(machine_header("P4-P6 real faces (benchmarks/real_data.py)"))
    args.second_test_sets = ["data.source=folder", f"data.root={args.second_test.resolve()}"]
    if args.smoke:
        args.samples, args.epochs, args.grace, args.reduction_factor = 2, 2, 1, 2.0
        args.finalists, args.finalist_seeds, args.startup = 1, 1, 1
        names = dict(SMOKE_NAMES)
        data = list(SMOKE_DATA)
    else:
        if not (args.data_root / "train").is_dir() and not args.table_only:
            print(f"skipped: no dataset at {args.data_root} (expected FER2013's train/<class>/*.jpg and "
                  f"test/<class>/*.jpg; give another with --data-root)")
            return 0
        data = ["data.source=folder", f"data.root={args.data_root.resolve()}", f"data.image_size={args.image_size}"]
        if not args.second_test.is_dir():
            print(f"note: no second test set at {args.second_test}; only the 399-face test is used")
            args.second_test_sets = None
    args.epochs = args.epochs or load_spec(SEARCH_SPACES / "report_baseline.yaml", ["data.source=synthetic"]).train.epochs
    args.startup = args.startup or max(1, args.samples // 3)

    with tempfile.TemporaryDirectory(prefix="fer-tune-p4-") as tmp:
        work = Path(tmp) if args.smoke else args.work
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, work, data, names)
        if args.smoke:
            smoke_setup(bench, Path(tmp))
        print(smoke_note(args.smoke) + f"data: {' '.join(data)}; {args.cpus_per_trial:g} CPU(s) per training; "
              f"searches: {args.samples} trials ({args.startup} random start-up), cap {args.epochs} epochs, ASHA "
              f"grace {args.grace}, reduction factor {args.reduction_factor:g}, {args.finalists} finalist(s) x "
              f"{args.finalist_seeds} more seed(s) and your recipe; recipes: {args.epochs} epochs; work: {work}\n",
              flush=True)
        if not args.table_only:
            run_all(bench)
        elif args.export:
            export_winners(bench)
        summarize(bench)
    return 0


def smoke_setup(bench: Bench, tmp: Path) -> None:
    """Smoke stand-ins: the shipped spaces with tiny backbones (SMOKE_NAMES), a tiny weights file in
    `imagenet`'s place (for test_resnet only), a synthetic csv dataset as the second test set."""
    import timm
    import torch

    weights = tmp / "tiny_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)

    def tiny(node):
        if isinstance(node, dict):
            return {k: tiny(v) for k, v in node.items()}
        if isinstance(node, list):
            return [tiny(v) for v in node]
        return str(weights) if node == "imagenet" else SMOKE_NAMES.get(node, node) if isinstance(node, str) else node

    for spec_name in {s for _, s, _, others in ARMS.values() for s in [s, *others.values()]}:
        raw = tiny(yaml.safe_load((SEARCH_SPACES / spec_name).read_text()))
        if "model.pretrained" in raw.get("space", {}):
            raw["space"]["model.pretrained"]["when"] = {"model.backbone": "test_resnet"}
            raw["space"]["train.freeze_epochs"]["choice"] = [0, 1]  # below the smoke run's 2 epochs
        (tmp / spec_name).write_text(yaml.safe_dump(raw, sort_keys=False))
    bench.spaces = tmp
    run_cli(["data", "synth", "--out", tmp / "second", "--n", "60", "--seed", "7", "--size", "24"], tmp / "synth.log")
    bench.args.second_test_sets = ["data.source=csv", f"data.root={tmp / 'second'}"]


def searches_of(bench: Bench, arm: str) -> dict[str, tuple[str, list[str]]]:
    """An arm's searches: name -> (spec file, extra --set values), P5's own-backbone searches included
    once the main search has picked its backbone."""
    main_name, spec_name, backbones, others = ARMS[arm]
    found = {main_name: (spec_name, []), **{n: (s, []) for n, s in others.items()}}
    picked = {config_of(bench.work / n)["model"]["backbone"] for n in found if (bench.work / n / "best").is_dir()}
    if (bench.work / main_name / "best").is_dir():
        for b in backbones:
            if bench.names[b] not in picked:
                found[f"{main_name}_{b}"] = (spec_name, [f"model.backbone={bench.names[b]}"])
    return found


def run_all(bench: Bench) -> None:
    for b in RECIPES:
        bench.recipe(b)
        bench.second_test(f"recipe_{b}")
    for arm in bench.args.arms:
        done: set[str] = set()
        while pending := [n for n in searches_of(bench, arm) if n not in done]:
            for name in pending:
                spec_name, sets = searches_of(bench, arm)[name]
                bench.search(name, spec_name, sets)
                bench.second_test(name)
                done.add(name)
                if bench.args.export:  # as each search ends: a run stopped later keeps what finished
                    export_winners(bench)
    for name, samples in bench.args.extend:
        if bench.extend(name, samples) is not None:
            bench.second_test(extended_name(name, samples))
            if bench.args.export:
                export_winners(bench)
    for name, search, sets in bench.args.variant:
        spec_name, search_sets = searches_of(bench, arm_of(search)).get(search, (None, []))
        if spec_name is None:
            print(f"{name}: not yet ({search} runs only once its arm's main search has picked its backbone)",
                  file=sys.stderr, flush=True)
            continue
        if variant_differs(bench.work / name, sets):
            print(f"{name}: skipped: {bench.work / name} holds a search with other values than "
                  f"{' '.join(sets)}; give the variant another name", file=sys.stderr, flush=True)
            continue
        bench.search(name, spec_name, [*search_sets, *sets])
        bench.second_test(name)
        if bench.args.export:
            export_winners(bench)


def export_winners(bench: Bench) -> None:
    """Each search winner's complete config, data.root relative to the repository, to retrain anywhere."""
    from fer_tune.errors import UserError
    from fer_tune.specfile import read_spec

    bench.args.export.mkdir(parents=True, exist_ok=True)
    searches = [(arm, name) for arm in bench.args.arms for name in searches_of(bench, arm)]
    # an extended copy holds its source's best/ until its own search has ended
    searches += [(arm_of(name), extended_name(name, n)) for name, n in bench.args.extend
                 if metrics_of(bench.work / extended_name(name, n)).get("trials") == n]
    searches += [(arm_of(search), name) for name, search, _ in bench.args.variant]
    for arm, name in searches:
        best = bench.work / name / "best" / "config.yaml"
        if not best.is_file():
            continue
        try:
            config = read_spec(best).model_dump(mode="json")  # complete in today's schema: new fields' defaults too
        except UserError as err:  # a winner today's schema refuses is still exported, as it was written
            print(f"note: {best}: {err}; exported as written", file=sys.stderr)
            config = yaml.safe_load(best.read_text())
        root = config.get("data", {}).get("root")
        if root:
            config["data"]["root"] = os.path.relpath(root, REPO)
        header = (f"# {name}: the winner of benchmarks/real_data.py's {arm} arm "
                  f"(searched {provenance(bench.work, name)}).\n"
                  f"# Retrain: fer-tune train benchmarks/results/{name}.yaml (paths relative to the repository)\n")
        target, text = bench.args.export / f"{name}.yaml", header + yaml.safe_dump(config, sort_keys=False)
        if not target.is_file() or target.read_text() != text:  # said once per change, not after every search
            target.write_text(text)
            print(f"exported {target}", file=sys.stderr)


def arm_of(search: str) -> str:
    """The arm whose searches include `search` (its main search or one of its others)."""
    return next((arm for arm, (main, _, _, others) in ARMS.items() if search == main or search in others
                 or search.startswith(f"{main}_")), "?")


def summarize(bench: Bench) -> None:
    work, names = bench.work, bench.names
    rows, finished = [], {}
    extended = [extended_name(n, k) for n, k in bench.args.extend]
    variants = [name for name, _, sets in bench.args.variant if not variant_differs(work / name, sets)]
    for name in {name for name, _, _ in bench.args.variant} - set(variants):
        print(f"note: {work / name} holds a search with other values than its --variant gives; it is left "
              f"out (give the variant another name)")
    candidates = [f"recipe_{b}" for b in RECIPES] + [n for arm in ARM_ORDER for n in searches_of(bench, arm)]
    for name in [*candidates, *extended, *variants]:
        m = metrics_of(work / name)
        if not m:
            continue
        finished[name] = m
        second = metrics_of(work / f"{name}_second_test")
        config = config_of(work / name)
        train_acc, test_acc = m.get("train_accuracy"), m["expression"]["accuracy"]
        gap = f"{100 * (train_acc - test_acc):+.1f} pts" if train_acc is not None else "n/a"
        rows.append([name, config["model"]["backbone"], config["model"].get("pretrained") or "none",
                     with_ci(m, "accuracy"), with_ci(m, "f1_macro"),
                     with_ci(second, "accuracy") if second else "n/a", with_ci(second, "f1_macro") if second else "n/a",
                     f"{train_acc:.3f}" if train_acc is not None else "n/a", gap,
                     str(m.get("epochs_spent", m.get("epochs_run", "?"))), wall_of(work, name)])
    test_name = f"test ({finished[next(iter(finished))]['test_images']})" if finished else "test"
    second_name = "second test"
    for name in finished:
        second = metrics_of(work / f"{name}_second_test")
        if second:
            second_name = f"second test ({second['test_images']})"
            break
    commands = {f"recipe_{b}": bench.recipe_command(b) for b in RECIPES}
    commands.update({n: bench.search_command(*searches_of(bench, arm)[n]) for arm in ARM_ORDER
                     for n in searches_of(bench, arm)})
    for name, search, sets in bench.args.variant:
        if search in commands:
            commands[name] = (commands[search][0], [*commands[search][1], *sets])
    for name in finished:
        if name in commands and (changed := spec_changes(work / name, *commands[name])):
            print(f"note: {drift_note(name, commands[name][0], changed)}")
    print(markdown_table(["experiment", "backbone", "pretrained", f"{test_name} accuracy [95 % CI]", "macro F1",
                          f"{second_name} accuracy", "macro F1", "best-epoch train acc", "train - test",
                          "epochs (all trials)", "wall"], rows))
    print()
    smoke = " [smoke]" if bench.args.smoke else ""
    recipes = [f"recipe_{b}" for b in RECIPES]
    for arm in ARM_ORDER:
        main_name, _, backbones, _ = ARMS[arm]
        label = f"[{arm}]"
        if any(r not in finished for r in recipes) or main_name not in finished:
            missing = [n for n in [*recipes, main_name] if n not in finished]
            print(f"P4 {label} winner - better recipe: not measured yet (missing: {', '.join(missing)}){smoke}")
        else:
            print_p4(work, label, main_name, finished, recipes, smoke)
        per_backbone = {}
        for n in searches_of(bench, arm):
            if n in finished:
                b = config_of(work / n)["model"]["backbone"]
                if b not in per_backbone or val_objective(work / n) > val_objective(work / per_backbone[b]):
                    per_backbone[b] = n
        wanted = [names[b] for b in backbones]
        if any(b not in per_backbone for b in wanted):
            lacking = [b for b in wanted if b not in per_backbone]
            print(f"P5 {label} weaker / stronger backbone after its own search: not measured yet (no search winner "
                  f"for {', '.join(lacking)}){smoke}")
        else:
            acc = {b: finished[per_backbone[b]]["expression"]["accuracy"] for b in wanted}
            weaker, stronger = sorted(wanted, key=lambda b: acc[b])
            share = acc[weaker] / acc[stronger]
            print(f"P5 {label} weaker / stronger backbone after its own search: {weaker} {acc[weaker]:.3f} "
                  f"({per_backbone[weaker]}) / {stronger} {acc[stronger]:.3f} ({per_backbone[stronger]}) = "
                  f"{share:.3f} (target >= 0.95: {verdict(share, 0.95, higher_is_better=True)}){smoke}")
        if main_name not in finished or finished[main_name].get("train_accuracy") is None:
            print(f"P6 {label} train - test gap of the winner: not measured yet{smoke}")
        else:
            gap = finished[main_name]["train_accuracy"] - finished[main_name]["expression"]["accuracy"]
            print(f"P6 {label} train - test gap of {main_name}'s winner: {100 * gap:+.1f} points "
                  f"(target <= 10: {verdict(gap, 0.10 + 1e-9, higher_is_better=False)}){smoke}")


    # an arm's other shipped spaces (resnet50_fix.yaml) are searches a user runs too: each is measured alike
    further = [(f"[{arm}, {name}]", name) for arm in ARM_ORDER for name in ARMS[arm][3]]
    further += [(f"[{arm_of(name)}, {name} extended to {samples} trials]", extension)
                for (name, samples), extension in zip(bench.args.extend, extended)]
    further += [(f"[{arm_of(search)}, {name}: {search} with {', '.join(sets)}]", name)
                for name, search, sets in bench.args.variant if name in variants]
    for label, name in further:
        if name not in finished or any(r not in finished for r in recipes):
            print(f"P4 {label}: not measured yet{smoke}")
            continue
        print_p4(work, label, name, finished, recipes, smoke)
        if finished[name].get("train_accuracy") is None:
            print(f"P6 {label} train - test gap of the winner: not measured{smoke}")
            continue
        gap = finished[name]["train_accuracy"] - finished[name]["expression"]["accuracy"]
        print(f"P6 {label} train - test gap of {name}'s winner: {100 * gap:+.1f} points "
              f"(target <= 10: {verdict(gap, 0.10 + 1e-9, higher_is_better=False)}){smoke}")


def print_p4(work: Path, label: str, search: str, finished: dict, recipes: list[str], smoke: str) -> None:
    """The search's winner minus the better recipe (on the first test), paired, on each test set."""
    better = max(recipes, key=lambda r: finished[r]["expression"]["accuracy"])
    for which, suffix in (("test", ""), ("second test", "_second_test")):
        a, b = work / f"{better}{suffix}", work / f"{search}{suffix}"
        if not metrics_of(a) or not metrics_of(b):
            print(f"P4 {label} on the {which}: not measured yet{smoke}")
            continue
        d = paired(predictions_of(a), predictions_of(b), metrics_of(b)["labels"])
        met = d["difference"] >= 0.10 - 1e-9 and d["low"] > 0
        print(f"P4 {label} {search} - {better} on the {which} ({d['faces']} faces): "
              f"{100 * d['difference']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], "
              f"McNemar p {d['p']:.2g} (target >= +10 with the interval above 0: "
              f"{'met' if met else 'NOT met'}){smoke}")


if __name__ == "__main__":
    sys.exit(main())
