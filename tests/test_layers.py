"""The file layout shows the data flow: no module imports from a layer above its own."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "markovscale_dspy"

# theory -> estimation -> policy -> module -> calibrator -> evaluation -> report/CLI
LAYERS = {
    "_exceptions": 0,
    "_version": 0,
    "theory": 0,
    "belief": 0,
    "_answers": 0,
    "_mixture": 1,
    "_model": 1,
    "_policies": 2,
    "_signatures": 3,
    "_state": 3,
    "_usage": 3,
    "_chain": 3,
    "_budget": 3,
    "_refine": 3,
    "lms": 3,
    "local": 3,
    "_traces": 4,
    "_calibrate": 4,
    "testing": 5,
    "datasets": 5,
    "evaluation": 5,
    "benchmark": 5,
    "report": 6,
    "plots": 6,
    "_bench_cli": 7,
    "cli": 7,
    "__init__": 7,
}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("markovscale_dspy"):
            parts = node.module.split(".")
            if len(parts) > 1:
                yield parts[1]
            else:
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("markovscale_dspy."):
                    yield alias.name.split(".")[1]


def test_every_module_has_a_layer():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_no_module_imports_from_a_layer_above(module):
    above = [name for name in imported_modules(PACKAGE / f"{module}.py") if LAYERS.get(name, -1) > LAYERS[module]]
    assert above == [], f"{module} (layer {LAYERS[module]}) imports {above} from a higher layer"


def test_theory_does_not_import_dspy():
    for module in ("theory", "belief", "_model", "_mixture"):
        names = {
            n.names[0].name
            for n in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text()))
            if isinstance(n, ast.Import)
        }
        modules = {
            n.module
            for n in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text()))
            if isinstance(n, ast.ImportFrom)
        }
        assert "dspy" not in names and not any(m and m.startswith("dspy") for m in modules), module
