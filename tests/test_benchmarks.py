"""The project's own benchmark run (benchmarks/, not shipped): one small simulated world end to end."""

import json

import pytest

from benchmarks.run import main


@pytest.mark.slow
def test_project_bench_runs_every_method_on_a_simulated_world(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(["--skip-real", "--skip-micro", "--presets", "heterogeneous", "--scale", "0.05", "--out", str(out)]) == 0
    )
    text = (out / "results.md").read_text()
    for method in (
        "fixed-0",
        "closed_form",
        "belief",
        "parameter oracle",
        "hindsight oracle",
        "dspy.BestOfN",
        "dspy.Refine",
        "self-consistency",
        "Targets:",
    ):
        assert method in text
    assert (out / "sim-heterogeneous.png").read_bytes()[:4] == b"\x89PNG"
    # The numbers behind the table, against what is known without the harness: every method answered the same
    # n_test = 1000 x 0.05 questions; fixed-k costs exactly 1 + k calls per question (the simulated LM never fails);
    # and the hindsight oracle (stop at the first correct round) is right whenever any fixed-k is.
    results = {
        r["name"]: r for r in json.loads((out / "results.json").read_text())["simulated"]["heterogeneous"]["results"]
    }
    assert {r["n"] for r in results.values()} == {50}
    fixed = [results[f"fixed-{k}"] for k in range(7)]
    assert [r["calls"] for r in fixed] == [50 * (1 + k) for k in range(7)]
    assert all(results["hindsight oracle"]["correct"] >= r["correct"] for r in fixed)
    assert all(0 <= r["correct"] <= r["n"] for r in results.values())
