"""The file layout is the architecture: a module's path names its layer, and no module imports from a layer above.

theory -> estimation -> policy (``core/``) -> module (``refine/``) -> calibrator (``calibrate/``) -> reporting
(``reporting/``) -> CLI, with integrations (LMs, local server, datasets) beside the module layer.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "markovscale_dspy"

# Inside core/ the order still matters (the model is estimated from the theory, policies read the model).
CORE = {
    "validation": 0,
    "theory": 0,
    "statistics": 0,
    "answers": 0,
    "confidence": 0,
    "belief": 1,
    "voting": 1,
    "evidence": 1,
    "mixture": 2,
    "stopping": 2,  # reads voting (the vote model and its exact laws)
    "model": 3,
    "policies": 4,
    "planner": 4,
}
FOLDERS = {"core": None, "refine": 5, "integrations": 5, "calibrate": 6, "reporting": 7}
TOP = {"_exceptions": -1, "_version": -1, "testing": 7, "cli": 8, "__init__": 9}
# Where a layer is shared by several modules of one folder, their order inside it.
WITHIN = {
    "refine/usage": -0.4,  # the meter (calls, tokens, dollars): a leaf that engines report dollars to
    "integrations/routing": -0.25,  # the Router engine: below lms, which builds router LMs
    "integrations/datasets": 0.5,  # builds DSPy programs: above lms
    "reporting/report": 0.5,
    "reporting/plots": 0.5,
    "reporting/compare": 0.25,
    "reporting/configurations": 0.75,  # reads reports and draws figures
}


def layer_of(path: Path) -> float:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = relative.parts
    if len(parts) == 1:
        return TOP[parts[0]]
    folder, name = parts[0], parts[-1]
    if folder == "core":
        return -0.5 if name == "__init__" else CORE[name]
    base = FOLDERS[folder]
    return base - 0.5 if name == "__init__" else base + WITHIN.get(f"{folder}/{name}", 0)


def imported_paths(path: Path):
    """Files of the package that ``path`` imports (``markovscale_dspy.x.y`` -> ``x/y.py`` or ``x/y/__init__.py``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("markovscale_dspy"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("markovscale_dspy")]
        for name in names:
            parts = name.split(".")[1:]
            for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
                if parts and candidate.exists():
                    yield candidate


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(path)  # KeyError names a module nobody placed


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above(path):
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return  # the package root re-exports everything
    own = layer_of(path)
    above = [str(p.relative_to(PACKAGE)) for p in imported_paths(path) if layer_of(p) > own]
    assert above == [], f"{path.relative_to(PACKAGE)} (layer {own}) imports {above} from a higher layer"


def test_core_does_not_import_dspy():
    for path in (PACKAGE / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "dspy" or m.startswith("dspy.") for m in imported), path.name


def test_the_wheel_ships_no_benchmark_code():
    """The project's presets, oracles and targets live in benchmarks/, outside the package."""
    for path in MODULES:
        text = path.read_text()
        for marker in ("ParameterOracle", "PRESETS", "Target ≤", "Target ≥", "benchmarks."):
            assert marker not in text, f"{path.relative_to(PACKAGE)} mentions {marker!r}"


def test_cli_help_does_not_import_the_comparison_harness():
    code = (
        "import sys; from markovscale_dspy.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith(('markovscale_dspy.reporting.compare', 'benchmarks', "
        "'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
