"""Calibration throughput behind LiteLLM's Router: real llama.cpp servers, and a latency-bound API stand-in.

    python -m benchmarks.throughput latency            # a loopback OpenAI-compatible server with a fixed delay
    python -m benchmarks.throughput client             # where the client's CPU per call goes, layer by layer
    flock /tmp/llm.lock python -m benchmarks.throughput llama   # two one-thread llama.cpp servers vs one two-thread

``latency`` measures how calibration scales with concurrency when the server has spare capacity (a hosted API): an
OpenAI-compatible server **in its own process** (``benchmarks/latency_server.py``, aiohttp) answers every chat
completion after a fixed delay, so the ideal throughput at concurrency ``c`` is ``c / delay`` calls per second and
any shortfall is the client's (the server shares no interpreter lock with it). It runs the threaded calibrator
(``MarkovCalibrator(num_threads=c).compile``) and the async one (``MarkovCalibrator().acompile(concurrency=c)``),
through a plain LiteLLM LM and through a one-deployment Router group, and measures the client's CPU time per call.

``llama`` compares, on the same questions, one llama.cpp server with two threads against two one-thread servers
behind one Router group (each server in its own process), and counts the work each server did from its
``/metrics``. The machine has 2 cores: both set-ups have the same CPU, so this measures what the Router costs and
whether two small servers batch as well as one bigger one, not a scale-out gain.

Results go to ``--out`` (JSON) and are printed as Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from benchmarks.latency_server import LatencyServerProcess
from markovscale_dspy import MarkovCalibrator, MarkovRefine
from markovscale_dspy.integrations.lms import build_lm


def _say(text: str = "") -> None:
    print(text, flush=True)


def _examples(n: int, offset: int) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"Question #{offset + i}: A, B, C or D?", answer="A").with_inputs("question")
        for i in range(n)
    ]


def _metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    return example.answer == pred.answer


def _calibrator(rounds: int, concurrency: int) -> MarkovCalibrator:
    return MarkovCalibrator(_metric, rounds=rounds, num_threads=concurrency, store_traces=False, question_types=1)


def _student(rounds: int) -> MarkovRefine:
    return MarkovRefine(dspy.Predict("question -> answer"), max_rounds=rounds)


def _threaded(lm: dspy.LM, examples: list[dspy.Example], rounds: int, concurrency: int) -> int:
    calibrator = _calibrator(rounds, concurrency)
    with dspy.context(lm=lm):
        calibrator.compile(_student(rounds), trainset=examples)
    return int(calibrator.report.usage["calls"])


def _async(lm: dspy.LM, examples: list[dspy.Example], rounds: int, concurrency: int) -> int:
    calibrator = _calibrator(rounds, concurrency)

    async def run() -> None:
        with dspy.context(lm=lm):
            await calibrator.acompile(_student(rounds), trainset=examples, concurrency=concurrency)

    asyncio.run(run())
    return int(calibrator.report.usage["calls"])


def latency(delay: float, concurrencies: list[int], rounds: int, chains_per_thread: int) -> list[dict[str, Any]]:
    """Calls per second against the out-of-process latency server, against the ideal ``c / delay``."""
    rows = []
    offset = 0
    with LatencyServerProcess(delay) as server:
        routed = {
            "model_list": [
                {
                    "model_name": "api",
                    "litellm_params": {"model": "openai/latency-model", "api_base": server.api_base, "api_key": "sk-x"},
                }
            ],
            "router_settings": {"num_retries": 0},
        }
        lms = {
            "LiteLLM": build_lm("openai/latency-model", api_base=server.api_base, cache=False, num_retries=0),
            "Router": build_lm("api", router_config=routed, cache=False),
        }
        # Warm-up: imports, connection pools, the Router's clients, both paths.
        for lm in lms.values():
            for run in (_threaded, _async):
                run(lm, _examples(8, 10_000_000 + offset), 1, 8)
                offset += 8
        for c in concurrencies:
            for route, lm in lms.items():
                for mode, run in (("threads", _threaded), ("async", _async)):
                    n = chains_per_thread * c
                    examples = _examples(n, offset)  # fresh prompts: nothing is served from any cache
                    offset += n
                    before = server.stats()["completed"]
                    cpu, started = time.process_time(), time.perf_counter()
                    calls = run(lm, examples, rounds, c)
                    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                    ideal = c / delay
                    row = {
                        "route": route,
                        "mode": mode,
                        "concurrency": c,
                        "chains": n,
                        "calls": calls,
                        "server_completed": server.stats()["completed"] - before,
                        "seconds": seconds,
                        "calls_per_s": calls / seconds,
                        "ideal_calls_per_s": ideal,
                        "efficiency": calls / seconds / ideal,
                        "client_cpu_ms_per_call": 1000 * cpu / max(calls, 1),
                    }
                    rows.append(row)
                    _say(
                        f"  {route:<8} {mode:<8} c={c:<3} {calls} calls in {seconds:.2f} s = {row['calls_per_s']:.1f}/s"
                        f" (ideal {ideal:.1f}/s, {100 * row['efficiency']:.0f}%; client CPU "
                        f"{row['client_cpu_ms_per_call']:.2f} ms/call)"
                    )
    return rows


# Where the client's CPU goes ------------------------------------------------------------------------------------------


def client(delay: float, calls: int, concurrency: int) -> list[dict[str, Any]]:
    """Client CPU per LM call, layer by layer, against the out-of-process latency server (async, ``concurrency`` in
    flight): a bare ``LM.acall``, a ``dspy.Predict``, a MarkovRefine chain, and ``MarkovCalibrator.acompile``."""
    rows = []
    with LatencyServerProcess(delay) as server:
        lm = build_lm("openai/latency-model", api_base=server.api_base, cache=False, num_retries=0)
        offset = [20_000_000]

        def questions(n: int) -> list[dspy.Example]:
            offset[0] += n
            return _examples(n, offset[0])

        async def gated(items: list[Any], fn: Any) -> list[Any]:
            gate = asyncio.Semaphore(concurrency)

            async def one(item: Any) -> Any:
                async with gate:
                    with dspy.context(lm=lm):
                        return await fn(item)

            return await asyncio.gather(*(one(item) for item in items))

        predict, refine = dspy.Predict("question -> answer"), _student(2)
        layers = [
            ("LM.acall (DSPy + LiteLLM)", 1, lambda e: lm.acall(e.question)),
            ("dspy.Predict.acall (+ ChatAdapter)", 1, lambda e: predict.acall(question=e.question)),
            ("MarkovRefine.arun_chain(2)", 3, lambda e: refine.arun_chain(2, question=e.question)),
        ]
        asyncio.run(gated(questions(16), layers[0][2]))  # warm-up
        for name, per_item, fn in layers:
            items = questions(calls // per_item)
            cpu, started = time.process_time(), time.perf_counter()
            asyncio.run(gated(items, fn))
            rows.append(_client_row(name, len(items) * per_item, cpu, started))
        cpu, started = time.process_time(), time.perf_counter()
        made = _async(lm, questions(calls // 3), 2, concurrency)
        rows.append(_client_row("MarkovCalibrator.acompile (chains of 3)", made, cpu, started))
    for row in rows:
        _say(f"  {row['layer']:<42} {row['cpu_ms_per_call']:5.2f} ms CPU / call, {row['calls_per_s']:6.1f} calls/s")
    return rows


def _client_row(name: str, calls: int, cpu: float, started: float) -> dict[str, Any]:
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"layer": name, "calls": calls, "cpu_ms_per_call": 1000 * cpu / calls, "calls_per_s": calls / seconds}


def _client_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| layer | LM calls | client CPU ms / call | calls / s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['calls']} | {r['cpu_ms_per_call']:.2f} | {r['calls_per_s']:.1f} |")
    return "\n".join(lines)


# Two llama.cpp servers behind the Router vs one -----------------------------------------------------------------------


def llama(n: int, rounds: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """The same calibration on one two-thread server and on two one-thread servers behind a Router group."""
    from markovscale_dspy.integrations.datasets import load_task
    from markovscale_dspy.integrations.local import LocalModel

    task = load_task("winogrande")
    pool, _ = task.split(n * repeats * 2, 0, seed=11)
    out: dict[str, Any] = {"runs": []}

    def calibrate(lm: dspy.LM, examples: list[dspy.Example]) -> tuple[int, float, dict[str, Any]]:
        calibrator = MarkovCalibrator(
            task.metric, rounds=rounds, num_threads=concurrency, store_traces=False, question_types=1
        )
        started = time.perf_counter()
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            calibrator.compile(MarkovRefine(task.program(), max_rounds=rounds), trainset=examples)
        return int(calibrator.report.usage["calls"]), time.perf_counter() - started, calibrator.report.failures

    setups = ["one server, 2 threads", "two 1-thread servers behind the Router"]
    for repeat in range(repeats):
        for index, setup in enumerate(setups):
            # Each setup gets its own questions in each repeat (llama.cpp's prompt cache must not favour one).
            start = (repeat * len(setups) + index) * n
            examples = pool[start : start + n]
            if index == 0:
                with LocalModel(n_threads=2, n_parallel=concurrency, out_of_process=True) as server:
                    lm = server.lm(temperature=0.7, cache=False, num_retries=0)
                    calls, seconds, failures = calibrate(lm, examples)
                    work = [server.metrics()]
            else:
                with (
                    LocalModel(n_threads=1, n_parallel=max(concurrency // 2, 1), out_of_process=True) as a,
                    LocalModel(n_threads=1, n_parallel=max(concurrency // 2, 1), out_of_process=True) as b,
                ):
                    config = {
                        "model_list": [
                            {
                                "model_name": "smollm2-pool",
                                "litellm_params": {"model": "openai/smollm2", "api_base": s.api_base},
                            }
                            for s in (a, b)
                        ],
                        "router_settings": {"routing_strategy": "least-busy", "num_retries": 2},
                    }
                    lm = build_lm("smollm2-pool", router_config=config, temperature=0.7, max_tokens=256, cache=False)
                    calls, seconds, failures = calibrate(lm, examples)
                    work = [a.metrics(), b.metrics()]
            row = {
                "setup": setup,
                "repeat": repeat,
                "chains": n,
                "calls": calls,
                "seconds": seconds,
                "calls_per_s": calls / seconds,
                "chains_failed": failures["chains_failed"],
                "rounds_failed": failures["rounds_failed"],
                "per_server_tokens_predicted": [w.get("tokens_predicted_total") for w in work],
                "per_server_prompt_tokens": [w.get("prompt_tokens_total") for w in work],
                "per_server_decode_calls": [w.get("n_decode_total") for w in work],
            }
            out["runs"].append(row)
            _say(
                f"  [{repeat + 1}/{repeats}] {setup}: {calls} calls in {seconds:.1f} s = {row['calls_per_s']:.2f}/s; "
                f"generated tokens per server {row['per_server_tokens_predicted']}"
            )
    return out


def _latency_markdown(rows: list[dict[str, Any]], delay: float) -> str:
    lines = [
        "| route | path | concurrency | chains | LM calls | seconds | calls / s "
        f"| ideal (c / {delay:g} s) | of ideal | client CPU ms / call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['route']} | {r['mode']} | {r['concurrency']} | {r['chains']} | {r['calls']} | {r['seconds']:.2f} | "
            f"{r['calls_per_s']:.1f} | {r['ideal_calls_per_s']:.1f} | {100 * r['efficiency']:.0f}% | "
            f"{r['client_cpu_ms_per_call']:.2f} |"
        )
    return "\n".join(lines)


def _llama_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| set-up | run | LM calls | seconds | calls / s | chains failed | rounds failed "
        "| tokens generated per server |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        tokens = " / ".join(f"{t:.0f}" if t is not None else "?" for t in r["per_server_tokens_predicted"])
        lines.append(
            f"| {r['setup']} | {r['repeat'] + 1} | {r['calls']} | {r['seconds']:.1f} | {r['calls_per_s']:.2f} | "
            f"{r['chains_failed']} | {r['rounds_failed']} | {tokens} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("latency", "client", "llama"))
    parser.add_argument("--delay", type=float, default=0.5, help="latency server: seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128], help="latency: concurrencies")
    parser.add_argument("--chains-per-thread", type=int, default=4, help="latency: chains per unit of concurrency")
    parser.add_argument("--rounds", type=int, default=2, help="refinement rounds per chain")
    parser.add_argument("--calls", type=int, default=768, help="client: LM calls per layer")
    parser.add_argument("--client-concurrency", type=int, default=64, help="client: calls in flight")
    parser.add_argument("--n", type=int, default=24, help="llama: calibration questions per run")
    parser.add_argument("--threads", type=int, default=4, help="llama: calibration threads")
    parser.add_argument("--repeats", type=int, default=2, help="llama: runs of each set-up (interleaved)")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    _say(f"benchmarks.throughput {args.part} on {machine}; load average {os.getloadavg()}")
    if args.part == "latency":
        rows = latency(args.delay, args.concurrency, args.rounds, args.chains_per_thread)
        result: dict[str, Any] = {"rows": rows, "delay": args.delay, "rounds": args.rounds}
        markdown = _latency_markdown(rows, args.delay)
    elif args.part == "client":
        rows = client(args.delay, args.calls, args.client_concurrency)
        result = {"rows": rows, "delay": args.delay, "concurrency": args.client_concurrency}
        markdown = _client_markdown(rows)
    else:
        result = llama(args.n, args.rounds, args.threads, args.repeats)
        markdown = _llama_markdown(result)
    result.update(machine=machine, load_after=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv)
    # One file per latency delay, so runs at several delays sit side by side.
    name = f"throughput-latency-{args.delay:g}s.json" if args.part == "latency" else f"throughput-{args.part}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    _say("\n" + markdown)
    _say(f"\nload average after: {os.getloadavg()}; wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
