"""P3 search efficiency: epochs ASHA + TPE spends to match what random search finds, ÷ random's.

    python benchmarks/search_efficiency.py --smoke        # wiring check (a few minutes); numbers mean nothing
    python benchmarks/search_efficiency.py                # quickstart space, 16 trials, 10 epochs, seeds 0 1 2
    python benchmarks/search_efficiency.py --trials 32 --epochs 20 --seeds 0 1 2 3 4
    python benchmarks/search_efficiency.py --grace 3 --random-from runs/benchmarks/p3 --work runs/benchmarks/p3_grace3
    python benchmarks/search_efficiency.py --grace 3 --methods asha_tpe --variant startup10:search.searcher.startup_trials=10 \
        --variant multivariate:search.searcher.multivariate=true,search.searcher.group=true   # TPE's settings, side by side

On the quickstart's synthetic faces and space (`--spec`), with `train.early_stop_patience: null`,
the same trial count (`--trials`) and epoch cap (`--epochs`), for each seed:

(Every arm searches from draws alone: `search.start_from_spec: false` and `search.finalists: 0`
(`SEARCH_ONLY`). With the spec's recipe as every arm's first trial, that one shared trial was random
search's best in 2 seeds of 2, so the ratio measured whether ASHA kept it, not the searchers;
starting from the recipe is what P4 measures. The final phase adds no search epochs.)

- random: `fer-tune run --set search.searcher.type=random --set search.scheduler.type=none`:
  Optuna's RandomSampler through fer-tune's Ray Tune path, every trial run to the cap;
- ASHA + TPE: `fer-tune run` with `searcher.type=optuna` (TPESampler) and `scheduler.type=asha`,
  grace period `--grace` (default 1: the first rung is the first epoch) and reduction factor
  `--reduction-factor` (default 3, ASHA's usual one and that of the project's real-data specs);
- Optuna alone: a plain Optuna study in this process (the search's TPESampler: same seed and
  startup trials; Optuna's MedianPruner with n_warmup_steps = the grace period and
  n_startup_trials = 5), whose objective
  calls `fer_tune.engine.loop.fit()` directly — the one training loop — with a report callback that
  calls trial.report(best val objective so far, epoch) and raises optuna.TrialPruned when
  trial.should_prune(). The space is sampled by fer-tune's own `SpaceSampler` and applied with
  `trial_spec`, exactly as in a search. Trials run one after another.

The searcher seed is the seed; data, split and training seed stay fixed.

Epoch accounting comes from each run's own records. The Ray runs: every trial's Tune
`DIR/tune/trial_*/progress.csv` (one row per reported epoch: trial_id, epoch, objective), each
epoch placed in time by `reported_at` (the time fer-tune reported it) or, in experiments from
before that column, by its checkpoint's name (Ray Train names a checkpoint by the time it is
registered, to the microsecond; `checkpoint_path` in the row) or, failing that, by Tune's
`timestamp` (whole seconds); `report/history.csv` drops those columns, so it is not used. The
Optuna runs: the time each epoch's report reached the callback. All reported epochs of a run,
across its trials, are put in time order; "epochs to target" is the number of epochs completed
up to and including the first one whose val objective is >= random's best val objective over all
its epochs minus `--tolerance` (0.005). Random's own count is the epochs up to its first such epoch.

Ratio = (sum over seeds of a method's epochs to target) / (sum of random's); a method that never
reaches the target in a seed counts all the epochs it spent there, and its ratio is shown as a
lower bound (">="). Target for ASHA + TPE: <= 0.25.

Each `--variant LABEL:KEY=VALUE,...` adds one more ASHA + TPE arm with those spec values (TPE's
`multivariate`/`group`, `constant_liar`, `startup_trials`, ASHA's `brackets`...), run on the same
seeds beside the others, so each choice is measured against the same random search.

With `--work`, the same command run again reuses each Ray arm's finished search there and resumes
an interrupted one (`fer-tune run --resume`), so a measurement longer than a session goes on in
the next; the Optuna-alone arm runs in this process and starts again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common import SEARCH_SPACES, machine_header, markdown_table, run_cli, smoke_note, verdict, write_spec

TARGET = 0.25
METHODS = ("random", "asha_tpe", "optuna")
LABELS = {"random": "random (run to completion)", "asha_tpe": "ASHA + TPE", "optuna": "Optuna TPE + MedianPruner"}
SEARCH_ONLY = ["search.start_from_spec=false", "search.finalists=0"]
"""Every arm searches from its searcher's draws alone, with no recipe first and no final phase."""
SMOKE = ["data.synthetic.n=240", "data.synthetic.identities=40", "data.image_size=32", "data.split.val=40",
         "data.split.test=40", "train.batch_size=32"]  # 32 px: test_convnext's last stage needs it
CHECKPOINT_TIME = re.compile(r"checkpoint_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+)")


@dataclass
class Outcome:
    epochs_to_target: int    # epochs spent up to the first epoch reaching the target (all, if never)
    reached: bool
    epochs_total: int
    best: float              # best val objective over all its epochs


# --- the epoch timeline of a run -------------------------------------------------------------------

def ray_timeline(experiment: Path) -> pd.DataFrame:
    """(time, trial, epoch, objective) of every epoch a `fer-tune run` reported, in time order."""
    frames = []
    for trial_dir in sorted((experiment / "tune").glob("trial_*")):
        progress, results = trial_dir / "progress.csv", trial_dir / "result.json"
        if progress.is_file() and progress.stat().st_size:
            frame = pd.read_csv(progress)
        elif results.is_file():
            frame = pd.DataFrame([json.loads(line) for line in results.read_text().splitlines() if line.strip()])
        else:
            continue
        if "epoch" not in frame:
            continue
        frame = frame.dropna(subset=["epoch"]).copy()
        frame["trial"] = trial_dir.name.split("_")[1]
        frame["time"] = [_epoch_time(row) for _, row in frame.iterrows()]
        frames.append(frame[["time", "trial", "epoch", "objective"]])
    if not frames:
        raise RuntimeError(f"{experiment}: no trial progress under tune/trial_*/")
    return order(pd.concat(frames, ignore_index=True))


def _epoch_time(row) -> float:
    if pd.notna(row.get("reported_at", float("nan"))):
        return float(row["reported_at"])
    match = CHECKPOINT_TIME.search(str(row.get("checkpoint_path", "")))
    if match:
        return datetime.datetime.strptime(match.group(1), "%Y-%m-%d_%H-%M-%S.%f").timestamp()
    return float(row["timestamp"])


def order(timeline: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, epoch) — a diverged trial re-reports its last epoch — in time order."""
    timeline = timeline.astype({"epoch": int, "objective": float})
    return (timeline.sort_values(["time", "trial", "epoch"], kind="stable")
            .drop_duplicates(["trial", "epoch"]).reset_index(drop=True))


def outcome(timeline: pd.DataFrame, target: float) -> Outcome:
    hits = (timeline["objective"] >= target).to_numpy().nonzero()[0]
    total = len(timeline)
    return Outcome(int(hits[0]) + 1 if len(hits) else total, bool(len(hits)), total,
                   float(timeline["objective"].max()))


# --- the three methods -------------------------------------------------------------------------------

def ray_sets(method: str, seed: int, args) -> list[str]:
    """The --set values of a Ray arm: random, ASHA + TPE, or ASHA + TPE with a --variant's values."""
    return [f"search.searcher.type={'random' if method == 'random' else 'optuna'}",
            f"search.searcher.seed={seed}",
            f"search.scheduler.type={'none' if method == 'random' else 'asha'}",
            f"search.scheduler.grace_period={args.grace}",
            f"search.scheduler.reduction_factor={args.reduction_factor:g}",
            *getattr(args, "variants", {}).get(method, [])]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`LABEL:KEY=VALUE[,KEY=VALUE...]`, e.g. `multivariate:search.searcher.multivariate=true,search.searcher.group=true`."""
    label, _, sets = text.partition(":")
    values = [v for v in sets.split(",") if v]
    if not label or not values or not all("=" in v for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give LABEL:KEY=VALUE[,KEY=VALUE...]")
    return label, values


def run_ray(method: str, spec_file: Path, seed: int, out: Path, args) -> pd.DataFrame:
    """The arm's search in `out`: reused if a search of the same spec finished there (a rerun of
    the same command measures only what is missing), resumed if one was interrupted there, else
    run afresh. A resumed trial loses the part of an epoch it was in; its reported epochs count."""
    sets = ray_sets(method, seed, args)
    earlier = earlier_search(out, load_spec_dump(spec_file, sets))
    if earlier == "finished":
        print(f"{out}: reusing the finished search there", file=sys.stderr, flush=True)
        return ray_timeline(out)
    if earlier is None:
        shutil.rmtree(out, ignore_errors=True)
    resume = ["--resume"] if earlier == "interrupted" else []
    run_cli(["run", spec_file, "--out", out, *resume, *[a for s in sets for a in ("--set", s)]],
            out.with_suffix(".resumed.log" if resume else ".log"))
    return ray_timeline(out)


def load_spec_dump(spec_file: Path, sets: list[str]) -> dict:
    from fer_tune.specfile import load_spec

    return load_spec(spec_file, sets).model_dump(mode="json")


def earlier_search(out: Path, spec: dict) -> str | None:
    """"finished" or "interrupted" when `out` holds a search of exactly `spec`, else None."""
    from fer_tune.errors import UserError
    from fer_tune.specfile import read_spec

    if not (out / "spec.yaml").is_file() or not (out / "tune").is_dir():
        return None
    try:
        if read_spec(out / "spec.yaml").model_dump(mode="json") != spec:
            return None
    except UserError:
        return None
    return "finished" if (out / "report" / "metrics.json").is_file() else "interrupted"


def reused_random(spec_file: Path, seed: int, source: Path, args) -> pd.DataFrame:
    """The finished random search of `seed` under `source` (an earlier `--work`), if it ran this spec.

    Random search runs every trial to the cap without a scheduler and never uses TPE's startup
    count, so ASHA's settings and `search.searcher.startup_trials` are the only fields allowed to
    differ: a rerun with another `--grace` can reuse the 16 x cap epochs of random search instead
    of paying them again. The spec is all it checks: reuse runs made by the same fer-tune, since
    a change to the training loop changes what random search finds.
    """
    from fer_tune.errors import UserError
    from fer_tune.spec import describe_differences
    from fer_tune.specfile import read_spec

    folder = source / f"seed{seed}" / "random"
    if not (folder / "report" / "metrics.json").is_file():
        raise SystemExit(f"--random-from: {folder} holds no finished random search (no report/metrics.json)")
    try:
        before = read_spec(folder / "spec.yaml").model_dump(mode="json")
    except UserError as err:
        raise SystemExit(f"--random-from: {err}") from None
    now = load_spec_dump(spec_file, ray_sets("random", seed, args))
    for spec in (before, now):
        spec["search"]["scheduler"] = spec["search"]["searcher"]["startup_trials"] = None
    differences = describe_differences(before, now, "it ran", "this run has")
    if differences:
        raise SystemExit(f"--random-from: {folder} ran a different search ({'; '.join(differences[:3])})")
    return ray_timeline(folder)


def run_optuna(spec_file: Path, seed: int, out: Path, args) -> pd.DataFrame:
    import optuna

    from fer_tune.data.prepare import prepare_data
    from fer_tune.engine.loop import fit
    from fer_tune.search.space import SpaceSampler, make_sampler, trial_spec
    from fer_tune.specfile import load_spec
    from fer_tune.engine.device import choose_device

    spec = load_spec(spec_file, ["search.searcher.type=optuna", f"search.searcher.seed={seed}"])
    shutil.rmtree(out, ignore_errors=True)
    prepared = prepare_data(spec.data, out)
    train, val = prepared.load("train", progress=False), prepared.load("val", progress=False)
    device = choose_device(spec.resources.use_gpu)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec),  # the search's TPE
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=args.grace),
                                storage=f"sqlite:///{out / 'optuna.db'}", study_name=spec.name)
    sample = SpaceSampler(spec)
    rows: list[dict] = []

    def objective(trial) -> float:
        sample(trial)
        trial_config = trial_spec(spec, trial.params)

        def report(metrics: dict, checkpoint) -> None:
            rows.append({"time": time.time(), "trial": str(trial.number), "epoch": metrics["epoch"],
                         "objective": metrics["objective"]})
            trial.report(metrics["best_objective"], metrics["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        result = fit(trial_config, train, val, prepared.labels, report, device=device)
        return max(m["objective"] for m in result.history)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # A trial that raises (diverged, a config the model cannot run) is recorded as failed and the
    # study goes on, as an errored trial does in a search; its reported epochs still count.
    study.optimize(objective, n_trials=spec.search.num_samples, catch=(Exception,))
    states = pd.Series([t.state.name.lower() for t in study.trials]).value_counts().to_dict()
    print(f"optuna study: {', '.join(f'{v} {k}' for k, v in states.items())}", file=sys.stderr, flush=True)
    return order(pd.DataFrame(rows))


# --- main ----------------------------------------------------------------------------------------------

def ratio_text(methods: dict[str, list[Outcome]], method: str) -> tuple[float, str]:
    spent = sum(o.epochs_to_target for o in methods[method])
    base = sum(o.epochs_to_target for o in methods["random"])
    ratio = spent / base if base else math.nan
    bound = "" if all(o.reached for o in methods[method]) else ">= "
    return ratio, f"{bound}{ratio:.3f} ({spent} / {base} epochs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SEARCH_SPACES / "quickstart.yaml",
                        help="spec whose space is searched (default: the quickstart's, synthetic faces)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, help="epoch cap (default: the spec's train.epochs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period and MedianPruner warm-up steps")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA reduction factor")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="resources.cpus_per_worker (default 1)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="random always sets the target: run, or reused with --random-from")
    parser.add_argument("--work", type=Path, help="keep the experiments here (default: a temporary folder)")
    parser.add_argument("--random-from", type=Path, metavar="WORK",
                        help="reuse the finished random searches of an earlier --work (same spec, trials, cap and "
                             "seeds; ASHA settings and TPE's startup_trials may differ) instead of running them again")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="LABEL:KEY=VALUE,...",
                        help="one more ASHA + TPE arm with these spec values, e.g. "
                             "liar:search.searcher.constant_liar=true (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 3 trials, 2 epochs, one seed")
    args = parser.parse_args(argv)
    args.variants = {f"asha_tpe:{label}": values for label, values in args.variant}
    labels = {**LABELS, **{method: f"ASHA + TPE, {method.split(':', 1)[1]} ({', '.join(values)})"
                           for method, values in args.variants.items()}}
    extra = list(args.set)
    if args.smoke:
        args.trials, args.epochs, args.seeds, args.reduction_factor = 3, 2, args.seeds[:1], 2.0
        extra = [*SMOKE, *extra]
    methods = [m for m in METHODS if m == "random" or m in args.methods] + list(args.variants)

    print(machine_header("P3 search efficiency (benchmarks/search_efficiency.py)"))
    outcomes: dict[str, list[Outcome]] = {m: [] for m in methods}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fer-tune-p3-") as tmp:
        work = args.work or Path(tmp)
        spec_file = write_spec(args.spec, [f"search.num_samples={args.trials}", "train.early_stop_patience=null",
                                           *SEARCH_ONLY,
                                           f"resources.cpus_per_worker={args.cpus_per_trial:g}",
                                           *([f"train.epochs={args.epochs}"] if args.epochs else []), *extra],
                               work / "spec.yaml")
        from fer_tune.specfile import load_spec

        spec = load_spec(spec_file)
        reuse = f"; random search reused from {args.random_from}" if args.random_from else ""
        print(smoke_note(args.smoke) + f"space of {args.spec.name} ({len(spec.space)} parameters) on "
              f"{spec.data.source} data at {spec.data.image_size} px; {args.trials} trials, cap "
              f"{spec.train.epochs} epochs; ASHA grace {args.grace}, reduction factor "
              f"{args.reduction_factor:g}; {args.cpus_per_trial:g} CPU per trial; "
              f"seeds {' '.join(map(str, args.seeds))}; tolerance {args.tolerance}{reuse}\n", flush=True)
        for seed in args.seeds:
            timelines = {}
            for method in methods:
                out = work / f"seed{seed}" / method.replace(":", "_")
                started = time.perf_counter()
                if method == "random" and args.random_from:
                    timelines[method] = reused_random(spec_file, seed, args.random_from, args)
                elif method == "optuna":
                    timelines[method] = run_optuna(spec_file, seed, out, args)
                else:
                    timelines[method] = run_ray(method, spec_file, seed, out, args)
                print(f"seed {seed} {method}: {len(timelines[method])} epochs in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                if not args.work:
                    shutil.rmtree(out, ignore_errors=True)
            target = float(timelines["random"]["objective"].max()) - args.tolerance
            row = [f"{seed}", f"{target + args.tolerance:.4f}"]
            for method in methods:
                o = outcome(timelines[method], target)
                outcomes[method].append(o)
                row += [f"{o.epochs_to_target}{'' if o.reached else ' (never)'}", f"{o.epochs_total}", f"{o.best:.4f}"]
            rows.append(row)

    header = ["seed", "random best val obj."]
    for method in methods:
        header += [f"{labels[method]}: epochs to target", "epochs spent", "best val obj."]
    print(markdown_table(header, rows))
    print()
    smoke = " [smoke]" if args.smoke else ""
    for method in methods:
        if method == "random":
            continue
        ratio, text = ratio_text(outcomes, method)
        if method.startswith("asha_tpe"):
            met = ("NOT met (did not reach random's best in every seed)" if text.startswith(">=")
                   else verdict(ratio, TARGET, higher_is_better=False))
            which = f" ({method.split(':', 1)[1]})" if ":" in method else ""
            print(f"P3 ratio ASHA+TPE{which} / random: {text} (target <= {TARGET:.2f}: {met}){smoke}")
        else:
            print(f"P3 ratio Optuna (TPE + MedianPruner) / random: {text}{smoke}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
