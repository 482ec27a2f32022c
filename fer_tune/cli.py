"""The `fer-tune` command.

Every `UserError` becomes one line on stderr and exit status 2; nothing the user typed wrong
ever shows a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fer_tune.errors import SearchInterrupted, UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        args.handler(args)
    except SearchInterrupted as err:
        print(f"fer-tune: {err}", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"fer-tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fer-tune: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer-tune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(metavar="COMMAND")

    def spec_command(name: str, help: str, handler) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("spec", type=Path, help="experiment YAML (e.g. search_spaces/quickstart.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, e.g. --set data.root=/data/AffectNet (repeatable)")
        p.add_argument("--out", type=Path, help="experiment folder (default runs/<name>)")
        p.set_defaults(handler=handler)
        return p

    p = spec_command("run", "search the spec's space with Ray Tune, test the best trial once, export it", _run)
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment in --out")
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); default: start one here")
    spec_command("train", "train one config, test its best epoch once, export it", _train)

    p = commands.add_parser("evaluate", help="evaluate a trained model on a test split")
    p.add_argument("model", type=Path, help="experiment folder, its best/ folder, or a model.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate on other data, e.g. --set data.source=folder --set data.root=DIR")
    p.add_argument("--out", type=Path, help="where metrics.json goes (default MODEL/evaluate/...)")
    p.set_defaults(handler=_evaluate)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(metavar="TOOL")
    p = data.add_parser("synth", help="write the built-in synthetic faces as a csv dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=2400)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.05)
    p.set_defaults(handler=_synth)
    return parser


def _run(args) -> None:
    from fer_tune.search import run_search
    from fer_tune.spec import load_spec

    spec = load_spec(args.spec, args.set)
    run_search(spec, args.out or Path("runs") / spec.name, resume=args.resume, address=args.address)


def _train(args) -> None:
    from fer_tune.spec import load_spec
    from fer_tune.train import train_experiment

    spec = load_spec(args.spec, args.set)
    train_experiment(spec, args.out or Path("runs") / spec.name)


def _evaluate(args) -> None:
    from fer_tune.train import evaluate_model

    evaluate_model(args.model, args.set, args.out)


def _synth(args) -> None:
    from fer_tune.data.synthetic import write_dataset
    from fer_tune.io import check_writable

    if args.n < 1:
        raise UserError(f"--n {args.n}: must be >= 1 (the number of faces to write)")
    if not 16 <= args.size <= 1024:
        raise UserError(f"--size {args.size}: must be between 16 and 1024 (pixels)")
    if not 0 <= args.label_noise <= 1:
        raise UserError(f"--label-noise {args.label_noise:g}: must be between 0 and 1 (the share of wrong labels)")
    check_writable(args.out)
    path = write_dataset(args.out, n=args.n, size=args.size, seed=args.seed, label_noise=args.label_noise)
    print(f"wrote {args.n} synthetic faces to {path} (use --set data.source=csv --set data.root={path})")


if __name__ == "__main__":
    sys.exit(main())
