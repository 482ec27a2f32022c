"""`fer-tune distill TEACHER SPEC`: a finished experiment's best model teaches a (smaller) student.

Not a second training loop: it is the student's spec with `distill.teacher` set, trained by
`fer-tune train` or, when the spec has a space, searched by `fer-tune run` (see
`fer_tune.engine.teacher`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fer_tune.commands.train import train_experiment
from fer_tune.layout import find_model
from fer_tune.spec import set_path, validate_spec
from fer_tune.specfile import check_spec, load_spec


def distill(teacher: Path, spec_path: Path, overrides: list[str], out: Optional[Path] = None,
            resume: bool = False, address: Optional[str] = None) -> dict:
    """`fer-tune distill`: the student spec with `distill.teacher` set, searched if it has a space."""
    find_model(Path(teacher))  # a wrong teacher path is the likeliest mistake: say it plainly
    spec = load_spec(spec_path, overrides)
    raw = spec.model_dump(mode="json")
    set_path(raw, "distill.teacher", str(Path(teacher).expanduser().resolve()))
    if isinstance(raw.get("space"), dict):
        raw["space"].pop("distill.teacher", None)
    spec = check_spec(validate_spec(raw, source=str(spec_path)), source=str(spec_path))
    out = Path(out) if out else Path("runs") / spec.name
    if spec.space:
        from fer_tune.search.run import run_search  # deferred: Ray's import costs seconds a plain training never needs

        return run_search(spec, out, resume=resume, address=address)
    return train_experiment(spec, out, resume=resume)
