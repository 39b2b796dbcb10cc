"""The calibration trace store: finished chains are stored (as JSON) and reused, so an interrupted calibration
resumes without repeating finished chains; a changed program or failed chain is never reused."""

import sqlite3

import dspy
import pytest
from helpers import refine, world

from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.calibrate.traces import TraceStore
from markovscale_dspy.testing import SimulatedEngine


class InterruptingEngine(SimulatedEngine):
    """Answers like the world, then simulates Ctrl-C after a number of calls."""

    def __init__(self, world, after):
        super().__init__(world)
        self.after = after

    def complete(self, request):
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().complete(request)


def calibrate_on(w, lm, trace_dir, resume=True):
    calibrator = MarkovCalibrator(
        w.metric, rounds=3, num_threads=1, trace_dir=trace_dir, resume=resume, question_types=1
    )
    with dspy.context(lm=lm):
        return calibrator.compile(refine(max_rounds=3), trainset=w.examples), calibrator


def test_interrupted_calibration_resumes_without_repeating_finished_chains(tmp_path):
    n, calls_per_chain = 60, 4
    reference, _ = calibrate_on(world(n, seed=50), world(n, seed=50).lm(), tmp_path / "reference")

    w = world(n, seed=50)
    stopper = InterruptingEngine(w, after=n * calls_per_chain // 2 + 1)  # Ctrl-C in the middle of chain 31
    lm = dspy.LM("simulated/world", engine=stopper, temperature=0.7, num_retries=0, cache=False)
    with pytest.raises(KeyboardInterrupt):
        calibrate_on(w, lm, tmp_path / "traces")

    restart = world(n, seed=50)
    resumed, calibrator = calibrate_on(restart, restart.lm(), tmp_path / "traces")
    finished = n // 2
    assert calibrator.report.chains_reused == finished
    assert restart.calls == (n - finished) * calls_per_chain  # zero repeated calls for finished chains
    assert resumed.model == reference.model


def test_fresh_ignores_the_store(tmp_path):
    calibrate_on(world(20), world(20).lm(), tmp_path / "t")
    again = world(20)
    _, calibrator = calibrate_on(again, again.lm(), tmp_path / "t", resume=False)
    assert calibrator.report.chains_reused == 0 and again.calls == 20 * 4


def test_changing_the_program_invalidates_the_store(tmp_path):
    calibrate_on(world(20), world(20).lm(), tmp_path / "t")
    again = world(20)
    calibrator = MarkovCalibrator(again.metric, rounds=3, num_threads=1, trace_dir=tmp_path / "t")
    with dspy.context(lm=again.lm()):
        calibrator.compile(
            MarkovRefine(dspy.Predict("question -> answer"), instructions="Try harder."), trainset=again.examples
        )
    assert calibrator.report.chains_reused == 0


def test_chains_lost_to_lm_errors_are_not_stored(tmp_path):
    w = world(20)
    student = refine()
    student.refiner.lm = w.lm(faults={"rate_limit": 0.5})
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=1, trace_dir=tmp_path / "t")
    with dspy.context(lm=w.lm()):
        calibrator.compile(student, trainset=w.examples)
    clean = sum(1 for c in calibrator.report.chains if not any(c["errors"]))

    assert len(TraceStore(tmp_path / "t")) == clean < 20


def test_trace_store_holds_json_not_pickles(tmp_path):
    calibrate_on(world(5), world(5).lm(), tmp_path / "t")

    rows = sqlite3.connect(tmp_path / "t" / "cache.db").execute("SELECT mode FROM Cache").fetchall()
    assert rows and {mode for (mode,) in rows} <= {1, 2, 3}  # raw / binary / text (JSON), never 4 (pickle)
