"""The project's own benchmark run (benchmarks/, not shipped): one small simulated world end to end."""

from benchmarks.run import main


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
