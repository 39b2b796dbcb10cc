"""Reproduce the README's MLflow screenshots: a traced MarkovRefine call and its calibration run.

Run from the repository root (offline: a simulated world, no model, no key):

    LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python docs/images/capture_mlflow.py

Everything MLflow writes (tracking database, artifacts, server) lives in a temporary directory that is removed at
the end; only ``docs/images/mlflow-trace.png`` and ``docs/images/mlflow-calibration-run.png`` are written here.

Needs a Chromium (Debian: ``apt-get install chromium``) and Playwright's Python package (``pip install
playwright``; ``playwright install`` is not needed, the system Chromium is used). Neither is a dependency of the
package. ``--chromium PATH`` picks another browser binary, ``--keep-server`` leaves the UI running to look around.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 90_000


def record(tmp: Path) -> tuple[str, str, str]:
    """Calibrate and call a MarkovRefine in a simulated world under MLflow autolog; (experiment, run, trace) ids."""
    import dspy
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    experiment_id = mlflow.create_experiment("markovscale-demo", artifact_location=(tmp / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    mlflow.dspy.autolog(log_compiles=True)

    from markovscale_dspy import MarkovCalibrator, MarkovRefine
    from markovscale_dspy.testing import SimulatedWorld

    w = SimulatedWorld.homogeneous(120, seed=0, p0=0.4, p_cw=0.1, p_wc=0.3)
    with dspy.context(lm=w.lm()):
        program = MarkovCalibrator(w.metric, num_threads=2, store_traces=False).compile(
            MarkovRefine(dspy.Predict("question -> answer"), max_rounds=3), trainset=w.examples
        )
        run_id = mlflow.last_active_run().info.run_id  # the run autolog opened around compile
        program(**w.examples[0].inputs())
    mlflow.flush_trace_async_logging()
    trace_id = mlflow.get_last_active_trace_id()
    if trace_id is None:
        raise RuntimeError("the MarkovRefine call left no trace")
    return experiment_id, run_id, trace_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on the temporary store, in its own process group; returns once it answers /health."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow_cli) if mlflow_cli.exists() else "mlflow",
        "server",
        "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
        "--artifacts-destination", (tmp / "artifacts").as_uri(),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(tmp / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{(tmp / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("mlflow server did not answer within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server's process group (the server and the uvicorn it started), nothing else."""
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def capture_trace(page, base: str, experiment_id: str, trace_id: str, out: Path) -> None:
    """The trace, full screen: the round spans (DSPy internals folded), round 1's ``markovscale.*`` attributes."""
    page.goto(f"{base}/#/experiments/{experiment_id}/traces?traceId={trace_id}")
    page.get_by_text("round 1: refine").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_label("Full screen").click()  # the drawer over the whole page, not beside the Assistant panel
    # Fold each round's Predict.forward so the whole chain of rounds fits on screen.
    rows = page.locator('[data-testid^="span-title-row-"]').filter(has_text="Predict.forward")
    for testid in [row.get_attribute("data-testid") for row in rows.all()]:
        page.get_by_test_id(testid.replace("span-title-row-", "toggle-span-expanded-")).click()
    page.get_by_text("round 1: refine").locator("visible=true").first.click()
    page.get_by_text("markovscale.answer_changed").wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # let the selection highlight and connectors settle
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 580}  # the span tree ends near y=530
    page.screenshot(path=str(out), animations="disabled", caret="hide", clip=clip)


def capture_run(page, base: str, experiment_id: str, run_id: str, out: Path) -> None:
    """The calibration run's Overview: the ``markovscale.*`` metrics, the regime tag, the run's details."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}")
    page.get_by_text("markovscale.prob_improves").first.wait_for(timeout=TIMEOUT_MS)
    assistant_close = page.get_by_label("Close", exact=True)  # the MLflow Assistant side panel, open by default
    if assistant_close.count():
        assistant_close.first.click()
    page.get_by_text("markovscale.bound").first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out), animations="disabled", caret="hide")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default: docs/images)")
    parser.add_argument("--keep-server", action="store_true", help="leave the MLflow UI running until Ctrl-C")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="markovscale-mlflow-") as name:
        tmp = Path(name)
        experiment_id, run_id, trace_id = record(tmp)
        print(f"recorded run {run_id} and trace {trace_id} ({time.monotonic() - started:.0f} s)", flush=True)
        port = free_port()
        server = start_server(tmp, port)
        base = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport=VIEWPORT)
                    capture_trace(page, base, experiment_id, trace_id, args.out / "mlflow-trace.png")
                    page = browser.new_page(viewport=VIEWPORT)
                    capture_run(page, base, experiment_id, run_id, args.out / "mlflow-calibration-run.png")
                finally:
                    browser.close()
            for png in ("mlflow-trace.png", "mlflow-calibration-run.png"):
                print(f"wrote {args.out / png} ({(args.out / png).stat().st_size // 1024} KB)")
            if args.keep_server:
                print(f"MLflow UI at {base} - Ctrl-C to stop", flush=True)
                try:
                    server.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            stop_server(server)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
