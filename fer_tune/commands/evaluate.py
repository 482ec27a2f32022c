"""`fer-tune evaluate`: a trained model on the test split of its own data, or of data named by --set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fer_tune.data.prepare import open_prepared, prepare_test_only
from fer_tune.engine.artifacts import check_weights, find_trained
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import evaluate_on_test, format_test
from fer_tune.errors import UserError
from fer_tune.io import check_writable
from fer_tune.layout import DATA_FILE, SPLITS_DIR
from fer_tune.specfile import check_spec, read_spec


def evaluate_model(model_path: Path, overrides: list[str], out: Optional[Path]) -> dict:
    """Evaluate a trained model on the test split of its own data, or on data named by --set.

    Other data need no train or val split: their own test split is used when they have one,
    else all of them (`prepare_test_only`), and metrics.json says which.

    The model is found by `find_trained`; the spec is its config.yaml with the --set values
    applied (so `--set model.backbone=...` is checked against the weights, as the model would
    be), without the backbone's pretrained file, which the trained weights replace.
    """
    trained = find_trained(model_path)
    spec = read_spec(trained.config, overrides)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"pretrained": None})})
    spec = check_spec(spec, source=str(trained.config), sections=("data", "model"))
    weights = check_weights(trained.model_file, spec, trained.config)["model"]  # before any data is prepared
    run_dir = trained.experiment
    own = own_data(trained.config) == spec.data and (run_dir / SPLITS_DIR / DATA_FILE).exists()
    tag = "own-test" if own else f"{spec.data.source}-{spec.data.image_size}px"
    out = Path(out) if out else run_dir / "evaluate" / tag
    check_writable(out)
    prepared = open_prepared(spec.data, run_dir) if own else prepare_test_only(spec.data, out)
    device = choose_device(spec.resources.use_gpu)
    metrics = evaluate_on_test(spec, prepared, weights, device, extra={"model": str(trained.model_file)},
                               report_dir=out)
    print(format_test(metrics, out / "metrics.json"))
    return metrics


def own_data(config: Path):
    """The data section config.yaml trained on, checked as --set data is (None when it is gone)."""
    try:
        return check_spec(read_spec(config), source=str(config), sections=("data",)).data
    except UserError:
        return None
