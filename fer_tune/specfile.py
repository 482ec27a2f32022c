"""A spec file as a command loads it: read, `--set` applied, validated, then checked against this machine.

`fer_tune.spec` only looks at values. What needs the disk or timm's registry is checked here,
once, by the command that loads the spec, and is never checked again inside a Ray worker or
when a finished experiment's files are read back (`read_spec`), so `fer-tune report` of an
experiment whose dataset has moved away still works:

- every backbone the spec (or its space) names is one timm knows;
- every `model.pretrained` weights file and `distill.teacher` experiment exists;
- `data.root` exists (for a source that reads files);
- local paths (data.root, weights, teacher, a local `search.storage`) are made absolute, so
  the spec saved in the experiment folder means the same from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import ValidationError

from fer_tune.errors import UserError
from fer_tune.io import read_yaml
from fer_tune.layout import find_model, is_experiment
from fer_tune.spec import Spec, short_repr, apply_overrides, describe_differences, set_path, validate_spec
from fer_tune.weights import imagenet_file

CHECKED_SECTIONS = ("data", "model", "distill", "search")
"""The sections `check_spec` looks at; a command may ask for fewer (evaluate: data only)."""


def read_spec(path: Union[str, Path], overrides: list[str] = ()) -> Spec:
    """Read, override and validate a spec file; nothing is checked against this machine."""
    path = Path(path)
    return validate_spec(apply_overrides(read_yaml(path), list(overrides)), source=str(path))


def load_spec(path: Union[str, Path], overrides: list[str] = ()) -> Spec:
    """What a command runs: `read_spec`, then `check_spec`. Raises UserError with one line."""
    return check_spec(read_spec(path, overrides), source=str(Path(path)))


def check_spec(spec: Spec, source: str = "spec", sections: tuple[str, ...] = CHECKED_SECTIONS) -> Spec:
    """`spec` with its local paths made absolute, once everything it names is found here.

    The base values are checked, then every value a space entry can give (each trial's config
    with that value set), so a search fails here, not in its first trial.
    """
    checks = [(key, check) for key, check in _CHECKS.items() if key.split(".")[0] in sections]
    raw = spec.model_dump(mode="json")
    for key, check in checks:
        problem, resolved = check(spec, _get(spec, key))
        if problem:
            raise UserError(f"{source}: {problem}")
        set_path(raw, key, resolved)
    for space_key, entry in spec.space_entries():
        for extreme in entry.extremes():
            try:
                trial = spec.with_drawn(space_key, entry, extreme)
            except ValidationError:  # a value valid only with its tied fields (the schema checked those)
                continue
            for key, check in checks:
                problem, _ = check(trial, _get(trial, key))
                if problem:
                    raise UserError(f"{source}: space entry '{space_key}': value {short_repr(extreme)} is invalid: {problem}")
    _check_drawn_together(spec, source, checks)
    for key, entries in raw.get("space", {}).items():
        check = _CHECKS.get(key)
        if check is None or key.split(".")[0] not in sections:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            if entry.get("choice") is not None:  # a path a trial draws means the same from its trial folder
                entry["choice"] = [check(spec, value)[1] for value in entry["choice"]]
    checked = validate_spec(raw, source=source)
    return spec if checked == spec else checked


def check_same_experiment(spec: Spec, out: Path, resume: bool = False, search: bool = True) -> None:
    """Refuse, touching nothing, an --out that holds another experiment (or, for `--resume`, none).

    The same spec may go on in its folder (`run --resume`) or be trained again (`train`); a folder
    whose spec differs, whose spec is unreadable, or that holds a search when `train` asks for
    it (search=False), is never written to. One difference is allowed, to `run --resume`: a
    larger `search.num_samples`, which extends the search (see `fer_tune.search.run.search_parts`).
    """
    out = Path(out)
    saved = out / "spec.yaml"
    if not search and (out / "tune").exists():
        raise UserError(f"{out} holds a search (tune/); `fer-tune train` would overwrite its best model: use "
                        f"another --out")
    if not saved.exists():
        if resume:
            raise UserError(f"--resume: {out} holds no experiment to resume (no spec.yaml)")
        return
    try:
        before = read_spec(saved)
    except UserError:
        raise UserError(f"{saved}: the experiment folder's spec is unreadable; use another --out") from None
    saved, now = before.model_dump(mode="json"), spec.model_dump(mode="json")
    grown = spec.search.num_samples - before.search.num_samples
    if resume and search and grown:
        if grown < 0:
            raise UserError(f"--resume: search.num_samples {spec.search.num_samples} is below the "
                            f"{before.search.num_samples} trials {out} holds or plans; a search's budget can only grow")
        saved["search"]["num_samples"] = now["search"]["num_samples"]  # more trials: the same experiment, extended
    differences = describe_differences(saved, now, "folder has", "this spec has")
    if differences:
        hint = (" (a larger search.num_samples alone extends the search, with --resume)"
                if search and grown > 0 and not resume and len(differences) == 1 else "")
        raise UserError(f"{out} holds a different experiment ({differences[0]}"
                        f"{f' and {len(differences) - 1} more' if len(differences) > 1 else ''}); "
                        f"use another --out, or the same spec and --set values to resume it{hint}")


def _check_drawn_together(spec: Spec, source: str, checks: list) -> None:
    """Checked fields the space draws together, in every combination a trial can get.

    One field at a time is not enough where checks depend on each other: `model.pretrained:
    imagenet` is valid for one backbone of a `model.backbone` choice and not for the other.
    A combination that an entry's `when` rules out is skipped.
    """
    drawn = [key for key, _ in checks if key in spec.space]
    if len(drawn) < 2:
        return
    for values in spec.drawn_together(drawn):
        trial = spec.with_values(values)
        for key, check in checks:
            problem, _ = check(trial, _get(trial, key))
            if problem:
                together = " with ".join(f"'{k}' = {v!r}" for k, v in values.items())
                raise UserError(f"{source}: space entries {together} are invalid together: {problem}")


def _get(spec: Spec, key: str) -> Any:
    node: Any = spec
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _backbone(spec: Spec, name: Any) -> tuple[Optional[str], Any]:
    import timm

    if timm.is_model(name):
        return None, name
    close = timm.list_models(f"*{str(name).split('_')[0]}*")[:5]
    hint = f"; similar: {', '.join(close)}" if close else ""
    return f"model.backbone: unknown timm backbone '{name}' (see timm.list_models()){hint}", name


def _weights_file(spec: Spec, path: Any) -> tuple[Optional[str], Any]:
    if path is None or path == "hub":  # the hub is only known to answer once asked (at training)
        return None, path
    if path == "imagenet":
        try:
            imagenet_file(spec.model.backbone)
        except UserError as err:
            return str(err), path
        return None, path
    resolved = Path(path).expanduser().resolve()
    if is_experiment(resolved):
        try:
            find_model(resolved)
        except UserError as err:
            return f"model.pretrained: {err}", path
        return None, str(resolved)
    if not resolved.is_file():
        return (f"model.pretrained: weights file '{resolved}' does not exist (model.pretrained takes null, imagenet, "
                f"hub, a local weights file or a finished fer-tune experiment)"), path
    return None, str(resolved)


def _teacher(spec: Spec, path: Any) -> tuple[Optional[str], Any]:
    if path is None:
        return None, None
    resolved = Path(path).expanduser().resolve()
    try:
        find_model(resolved)
    except UserError as err:
        return f"distill.teacher: {err}", path
    return None, str(resolved)


def _data_root(spec: Spec, root: Any) -> tuple[Optional[str], Any]:
    if spec.data.source == "synthetic" or root is None:
        return None, root
    resolved = Path(root).expanduser().resolve()
    if not resolved.exists():
        return (f"data.root '{root}' does not exist; point it at your dataset with --set data.root=PATH, "
                f"or try search_spaces/quickstart.yaml (synthetic data)"), root
    return None, str(resolved)


def _storage(spec: Spec, storage: Any) -> tuple[Optional[str], Any]:
    if storage is None or "://" in str(storage):
        return None, storage
    return None, str(Path(storage).expanduser().resolve())


_CHECKS: dict[str, Callable[[Spec, Any], tuple[Optional[str], Any]]] = {
    "data.root": _data_root,
    "model.backbone": _backbone,
    "model.pretrained": _weights_file,
    "distill.teacher": _teacher,
    "search.storage": _storage,
}
"""Spec field -> check(spec, value) giving (problem or None, the value to keep)."""
