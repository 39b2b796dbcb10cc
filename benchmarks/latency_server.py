"""A latency-bound OpenAI-compatible server in its own process: every chat completion takes ``--delay`` seconds.

For measuring the client, not a model: the server's work is a sleep, so any shortfall from the ideal throughput is
the client's. It answers multiple-choice style questions "... #<i> ..." from a seeded script (question ``i``'s
``k``-th request gets the ``k``-th answer of its own sequence: the correct "A" with the question's accuracy, else one
of its distractors), in DSPy's ChatAdapter format. It counts the requests it completed and those whose client went
away before the answer was sent ("ended early": a cancelled request).

    python -m benchmarks.latency_server --delay 0.5 --port 8765
    curl localhost:8765/stats        # {"completed": ..., "ended_early": ..., "in_flight": ...}
    curl -X POST localhost:8765/reset   # restart every question's sequence and the counters

In Python, :class:`LatencyServerProcess` starts it on a free port and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

#: The distractors of every question (the correct answer is "A").
OPTIONS = ("B", "C", "D")


def script(question: int, k: int, seed: int = 0) -> str:
    """Answer ``k`` of question ``question``: correct with the question's accuracy (Beta(4, 2) over questions), else
    a distractor by the question's own shares (Dirichlet(0.5))."""
    rng = random.Random(f"{seed}|{question}")
    accuracy = rng.betavariate(4.0, 2.0)
    weights = [rng.gammavariate(0.5, 1.0) for _ in OPTIONS]
    draw = random.Random(f"{seed}|{question}|{k}")
    if draw.random() < accuracy:
        return "A"
    return draw.choices(OPTIONS, weights=weights)[0]


def serve(port: int, delay: float, seed: int) -> None:
    from aiohttp import web

    seen: dict[int, int] = defaultdict(int)
    stats = {"completed": 0, "ended_early": 0, "in_flight": 0}

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = json.dumps(body.get("messages", [])[-1:])
        match = re.search(r"#(\d+)", text)
        question = int(match.group(1)) if match else -1
        k = seen[question]
        seen[question] += 1
        stats["in_flight"] += 1
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:  # the client closed the connection: the request ended early
            stats["in_flight"] -= 1
            stats["ended_early"] += 1
            raise
        stats["in_flight"] -= 1
        stats["completed"] += 1
        answer = script(question, k, seed)
        content = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return web.json_response(
            {
                "id": f"lat-{stats['completed']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "latency"),
                "choices": [choice],
                "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
            }
        )

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def reset(request: web.Request) -> web.Response:
        seen.clear()
        stats.update(completed=0, ended_early=0)
        return web.json_response(stats)

    app = web.Application()
    app.add_routes(
        [web.post("/v1/chat/completions", complete), web.get("/stats", get_stats), web.post("/reset", reset)]
    )
    # handler_cancellation: a client that goes away cancels its handler, so the server sees the request end early
    web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True, access_log=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LatencyServerProcess:
    """The server in a child process, for the block (``api_base``, ``stats()``, ``reset()``)."""

    def __init__(self, delay: float = 0.5, seed: int = 0):
        self.delay, self.seed = delay, seed
        self.port = _free_port()
        self._process: subprocess.Popen | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LatencyServerProcess:
        args = [sys.executable, "-m", "benchmarks.latency_server", "--port", str(self.port)]
        args += ["--delay", str(self.delay), "--seed", str(self.seed)]
        root = Path(__file__).resolve().parent.parent  # so that -m benchmarks.latency_server resolves
        self._process = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("the latency server did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, int]:
        return self._call("/stats")

    def reset(self) -> dict[str, int]:
        return self._call("/reset", method="POST")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.port, args.delay, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
