"""The file layout is the architecture: a module's path names its layer, and no module imports from a layer above.

theory -> estimation -> policy (``core/``) -> the meter (``usage``) -> module (``refine/``) -> calibrator
(``calibrate/``) -> evaluation (``evaluate/``, runs programs to compare them) -> rendering (``reporting/``) -> CLI,
with integrations (LMs, local server, datasets) and the simulated world (``testing``) beside the module layer.
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
    "racing": 1,  # reads theory (the rounds the closed form plans)
    "mixture": 2,
    "stopping": 2,  # reads voting (the vote model and its exact laws)
    "model": 3,
    "policies": 4,
    "planner": 4,
}
FOLDERS = {"core": None, "refine": 5, "integrations": 5, "calibrate": 6, "evaluate": 7, "reporting": 8}
# usage: the meter (calls, tokens, dollars), the ground floor of everything that calls an LM; tracing: spans and
# attributes for the user's tracer, and their context carried into worker threads.
TOP = {
    "_exceptions": -1,
    "_version": -1,
    "_warnings": -1,
    "usage": 4.5,
    "spending": 4.55,  # the dollar cap: prices calls with the meter's prices
    "tracing": 4.6,
    "testing": 5,
    "cli": 9,
    "__init__": 10,
}
# Where a layer is shared by several modules of one folder, their order inside it.
WITHIN = {
    "integrations/routing": -0.25,  # the Router engine: below lms, which builds router LMs
    "integrations/datasets": 0.5,  # builds DSPy programs: above lms
    "evaluate/evaluation": -0.25,  # one method on held-out questions: what compare and configurations run
    "reporting/pages": 0.5,  # whole pages, from text and figures
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


def imported_names(path: Path):
    """``(module, name)`` for every ``from markovscale_dspy.x import name`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("markovscale_dspy"):
            for alias in node.names:
                yield node.module, alias.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_name(path):
    private = [f"{m}.{n}" for m, n in imported_names(path) if n.startswith("_") and not n.startswith("__")]
    assert private == [], f"{path.relative_to(PACKAGE)} imports private names {private}"


def test_integrations_and_the_simulated_world_sit_beside_refine_not_above_it():
    """They need the meter, which is on the ground floor: nothing of refine/."""
    for path in [*(PACKAGE / "integrations").glob("*.py"), PACKAGE / "testing.py"]:
        refine = [str(p.relative_to(PACKAGE)) for p in imported_paths(path) if p.parent.name == "refine"]
        assert refine == [], f"{path.relative_to(PACKAGE)} imports {refine}"


def test_the_calibrator_does_not_go_through_markov_scale():
    """Following ``trainset`` from ``MarkovCalibrator.compile``: the calibrator draws samples through the sampling
    module and knows its students by a protocol, so the MarkovScale module is never entered."""
    reached, todo = set(), [PACKAGE / "calibrate" / "calibrator.py"]
    while todo:
        path = todo.pop()
        for imported in imported_paths(path):
            if imported not in reached:
                reached.add(imported)
                todo.append(imported)
    assert PACKAGE / "refine" / "markov_scale.py" not in reached


def loaded_by(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with ``prefixes`` that running ``statement`` in a fresh interpreter loads."""
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out)  # a printed list of module names


def test_importing_the_package_loads_no_reporting_or_local_server_code():
    heavy = ("markovscale_dspy.reporting", "markovscale_dspy.evaluate", "markovscale_dspy.integrations.local")
    assert loaded_by("import markovscale_dspy", (*heavy, "markovscale_dspy.cli", "matplotlib", "xllamacpp")) == []


def test_public_names_say_the_public_path():
    """Tracebacks say ``markovscale_dspy.X`` for exceptions and functions; classes keep their file (doctest finds
    their methods' examples there, and ``dspy.Refine`` reads a module's source through it)."""
    import dspy

    import markovscale_dspy

    for name in markovscale_dspy.__all__:
        value = getattr(markovscale_dspy, name)
        public = (isinstance(value, type) and issubclass(value, BaseException)) or (
            callable(value) and not isinstance(value, type)
        )
        if public:
            assert value.__module__ == "markovscale_dspy", f"{name} says {value.__module__}"
        elif isinstance(value, type):
            assert value.__module__.startswith("markovscale_dspy."), name
    with pytest.raises(markovscale_dspy.ConfigurationError) as raised:
        markovscale_dspy.MarkovRefine(dspy.Predict("question -> answer"), max_rounds=-1)
    assert f"{type(raised.value).__module__}.{type(raised.value).__qualname__}" == "markovscale_dspy.ConfigurationError"


def test_every_docstring_example_is_collected():
    """A docstring with ``>>>`` that doctest cannot find from its module would silently never run."""
    import doctest
    import importlib

    missing = []
    for path in MODULES:
        name = ".".join(("markovscale_dspy", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        module = importlib.import_module(name)
        found = {t.name.rsplit(".", 1)[-1] for t in doctest.DocTestFinder().find(module) if t.examples}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                if ">>>" in doc and node.name not in found:
                    missing.append(f"{name}.{node.name}")
    # A public function's examples are collected from the package root, where its name is published.
    root = {
        t.name.rsplit(".", 1)[-1] for t in doctest.DocTestFinder().find(importlib.import_module("markovscale_dspy"))
    }
    assert [m for m in missing if m.rsplit(".", 1)[-1] not in root] == []


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
    statement = "from markovscale_dspy.cli import build_parser; build_parser()"
    assert loaded_by(statement, ("markovscale_dspy.evaluate", "benchmarks", "matplotlib")) == []
