"""The package's layout holds: layers, no import circle, a light trial module, a pure spec.

`tools/import_graph.py` reads the imports from the source; these tests fail on a new circle, on
an import that reaches up a layer, or on a reach into Ray's private modules.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

PACKAGE = ROOT / "fer_tune"


def test_the_package_has_no_import_circle():
    assert import_graph.circles(import_graph.edges(PACKAGE)) == []


def test_every_module_imports_only_its_layer_or_lower():
    assert import_graph.layer_violations(import_graph.edges(PACKAGE)) == []


def test_the_graph_tool_finds_a_circle_and_an_upward_import(tmp_path):
    package = tmp_path / "fer_tune"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "spec.py").write_text("def load():\n    from fer_tune.engine import loop  # hidden in a function\n")
    (package / "engine" / "loop.py").write_text("from fer_tune import spec\nimport fer_tune.stray\n")
    (package / "stray.py").write_text("")
    found = import_graph.edges(package)
    assert import_graph.circles(found) == [["fer_tune.engine.loop", "fer_tune.spec"]]
    assert any(e.deferred for e in found if e.source == "fer_tune.spec")
    assert import_graph.layer_violations(found) == [
        "fer_tune.engine.loop -> fer_tune.stray: a module in no layer (add it to LAYERS)",
        "fer_tune.spec (L2) -> fer_tune.engine.loop (L4), line 2"]


def test_no_module_imports_rays_private_modules():
    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            private += [f"{path.relative_to(ROOT)}: {n}" for n in names
                        if n.startswith("ray") and any(p.startswith("_") for p in n.split("."))]
    assert private == []


def test_what_every_trial_actor_imports_needs_no_training_stack():
    code = ("import sys, fer_tune.search.trial; "
            "print(sorted(m for m in ('timm', 'sklearn', 'matplotlib', 'optuna', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_spec_schema_never_looks_at_this_machine(tmp_path):
    from fer_tune.errors import UserError
    from fer_tune.spec import Spec
    from fer_tune.specfile import check_spec

    raw = {"data": {"source": "folder", "root": str(tmp_path / "gone")},
           "model": {"backbone": "no_such_net", "pretrained": str(tmp_path / "gone.pth")},
           "distill": {"teacher": str(tmp_path / "no-run")}}
    spec = Spec.model_validate(raw)  # what a Ray worker or a finished experiment's reader does
    assert str(spec.data.root) == str(tmp_path / "gone")
    with pytest.raises(UserError, match="data.root '.*gone' does not exist"):
        check_spec(spec)
    imports = {n.names[0].name if isinstance(n, ast.Import) else n.module
               for n in ast.walk(ast.parse((PACKAGE / "spec.py").read_text()))
               if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert not imports & {"timm", "os", "fer_tune.io", "fer_tune.layout"}


def test_the_readme_layer_table_names_every_module_of_each_package():
    """The README's "Layout" table is where a newcomer looks for a module: one added to a package
    without a word there is a module they cannot find."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| L")]
    missing = []
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        row = next((r for r in rows if f"`{package.name}/`" in r), None)
        assert row is not None, f"README's layer table has no row for {package.name}/"
        listed = row.split(f"`{package.name}/`", 1)[1].split(")", 1)[0]
        missing += [f"{package.name}/{m.stem}" for m in sorted(package.glob("*.py"))
                    if m.stem != "__init__" and f"`{m.stem}`" not in listed]
    assert not missing, f"modules the README's layer table does not name: {', '.join(missing)}"



@pytest.mark.parametrize("where, cwd", [("runs/x", "."), ("my runs/x", "."), (".", "runs/x"), ("..", "runs/x/inner")])
def test_the_rerun_command_names_a_new_folder_beside_the_experiment_and_pastes_as_is(where, cwd, tmp_path,
                                                                                     monkeypatch):
    """It goes into report.md and best/config.yaml's header, for `fer-tune report .` too, and a
    folder name with a space must survive a paste into a shell."""
    import shlex

    from fer_tune.layout import rerun_command

    experiment = tmp_path / ("my runs/x" if where == "my runs/x" else "runs/x")
    (experiment / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / cwd)
    command = shlex.split(rerun_command(Path(where)))
    assert command[:2] == ["fer-tune", "train"] and command[3] == "--out" and len(command) == 5
    assert Path(command[2]).resolve() == experiment / "best" / "config.yaml"
    assert Path(command[4]).resolve() == experiment.parent / "x-again"
