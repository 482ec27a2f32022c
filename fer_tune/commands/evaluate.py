"""`fer-tune evaluate`: a trained model on the test split of its own data, or of data named by --set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fer_tune.data.prepare import open_prepared, prepare_data
from fer_tune.engine.artifacts import find_trained
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import evaluate_on_test, format_test
from fer_tune.io import check_writable
from fer_tune.layout import DATA_FILE, SPLITS_DIR
from fer_tune.specfile import check_spec, read_spec


def evaluate_model(model_path: Path, overrides: list[str], out: Optional[Path]) -> dict:
    """Evaluate a trained model on the test split of its own data, or of data named by --set.

    The model is read by `find_trained` (its weights checked against its config); the data come
    from its config.yaml with the --set values applied, and only the data are checked here.
    """
    trained = find_trained(model_path)
    spec = check_spec(read_spec(trained.config, overrides), source=str(trained.config), sections=("data",))
    spec = spec.model_copy(update={"model": trained.spec.model})  # the trained network, without its pretrained file
    weights = trained.weights  # checked before any data is prepared
    run_dir = trained.experiment
    own = read_spec(trained.config).data == spec.data and (run_dir / SPLITS_DIR / DATA_FILE).exists()
    tag = "own-test" if own else f"{spec.data.source}-{spec.data.image_size}px"
    out = Path(out) if out else run_dir / "evaluate" / tag
    check_writable(out)
    prepared = open_prepared(spec.data, run_dir) if own else prepare_data(spec.data, out)
    device = choose_device(spec.resources.use_gpu)
    metrics = evaluate_on_test(spec, prepared, weights, device, extra={"model": str(trained.model_file)},
                               report_dir=out)
    print(format_test(metrics, out / "metrics.json"))
    return metrics
