"""Per-question adaptive voting against a latency-bound server in its own process: concurrency against wall time.

A MarkovScale whose plan is a vote (budget 8) answers the same questions with one chain in flight at a time and with
``k`` at once, sync (threads) and async (asyncio through LiteLLM's async client). Reported per question: wall time,
calls, and whether the concurrent run stopped exactly where the one-at-a-time rule stops on the same chains (its
replay), plus what the server counted (completed requests, requests that ended early).

    python -m benchmarks.concurrency --delay 0.5 --questions 40 --concurrency 1 4 8

Paths: ``sync`` (threads) and ``async`` launch the chains the rule needs whatever they answer; ``speculate`` keeps
``k`` chains in flight and cancels the rest once the vote is decided (compared with ``async`` at one chain).
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch LiteLLM's price map

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import dspy
import numpy as np

from benchmarks.latency_server import LatencyServerProcess, script
from markovscale_dspy import MarkovScale, TransitionModel, VoteModel

RESULTS = Path(__file__).resolve().parent / "results"


def calibrated_model(seed: int = 0, questions: int = 300, samples: int = 8) -> TransitionModel:
    """What a calibration against this server would give: a vote model fitted on ``questions`` x ``samples`` answers
    of the server's own script (questions 10_000 on, apart from the ones answered), and a chain where refinement
    hurts (so the plan is a vote)."""
    graded = []
    for q in range(10_000, 10_000 + questions):
        answers = [script(q, k, seed) for k in range(samples)]
        graded.append([(a == "A", a) for a in answers])
    votes = VoteModel.fit(graded, bootstrap=0, seed=0)
    return TransitionModel(n0_correct=130, n0_total=200, n_cc=300, n_cw=150, n_wc=60, n_ww=190, votes=votes)


def question(i: int) -> dict[str, str]:
    return {"question": f"Question #{i}: which option is right? A, B, C or D"}


def module(model: TransitionModel, call_cost: float, concurrency: int) -> MarkovScale:
    scale = MarkovScale(
        dspy.Predict("question -> answer"),
        max_calls=8,
        call_cost=call_cost,
        strategies=("single", "vote"),
        concurrency=concurrency,
    )
    scale.model = model
    return scale


def run(
    server: LatencyServerProcess,
    model: TransitionModel,
    *,
    questions: int,
    concurrency: int,
    call_cost: float,
    mode: str,
) -> dict[str, Any]:
    lm = dspy.LM("openai/latency", api_base=server.api_base, api_key="local", cache=False, num_retries=0)
    scale = module(model, call_cost, concurrency)
    scale.speculate = mode == "speculate"
    sequential = module(model, call_cost, 1)
    server.reset()
    walls, calls, exact, answers, unused, cancelled = [], [], 0, [], 0, 0
    with dspy.context(lm=lm):
        for i in range(questions):
            started = time.perf_counter()
            pred = scale(**question(i)) if mode == "sync" else asyncio.run(scale.acall(**question(i)))
            walls.append(time.perf_counter() - started)
            calls.append(pred.markovscale.calls)
            answers.append(pred.answer)
            unused += sum(u.get("calls", 0) for u in pred.markovscale.unused)
            cancelled += pred.markovscale.cancelled
            replay = sequential.replay(pred, **question(i))  # the one-at-a-time rule on the same chains
            voting_calls = sum(u.get("calls", 0) for u in pred.markovscale.usage)
            exact += (replay.answer, replay.markovscale.calls) == (pred.answer, voting_calls)
    stats = server.stats()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "call_cost": call_cost,
        "questions": questions,
        "wall_per_question": statistics.mean(walls),
        "calls_per_question": statistics.mean(calls),
        "same_as_sequential_rule": exact,
        "paid_unused_calls": unused,
        "cancelled_in_flight": cancelled,
        "server_completed": stats["completed"],
        "server_ended_early": stats["ended_early"],
        "accuracy": float(np.mean([a == "A" for a in answers])),
    }


def markdown(rows: list[dict[str, Any]], delay: float, argv: list[str]) -> str:
    lines = [
        f"Latency-bound server in its own process, {delay} s per call; `python -m benchmarks.concurrency "
        f"{' '.join(argv)}`.",
        "",
        "| path | call cost | concurrency | wall s / question | vs one at a time | paid calls / question | of which "
        "answered after the decision | cancelled in flight | stops where the sequential rule stops | server: "
        "completed / ended early | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["mode"], r["call_cost"]): r["wall_per_question"] for r in rows if r["concurrency"] == 1}
    for r in rows:
        ratio = r["wall_per_question"] / base[("sync" if r["mode"] == "sync" else "async", r["call_cost"])]
        lines.append(
            f"| {r['mode']} | {r['call_cost']:g} | {r['concurrency']} | {r['wall_per_question']:.2f} | {ratio:.0%} | "
            f"{r['calls_per_question']:.2f} | {r['paid_unused_calls']} | {r['cancelled_in_flight']} | "
            f"{r['same_as_sequential_rule']}/{r['questions']} | {r['server_completed']} / "
            f"{r['server_ended_early']} | {r['accuracy']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--call-cost", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument(
        "--modes", nargs="+", default=["sync", "async", "speculate"], choices=["sync", "async", "speculate"]
    )
    parser.add_argument("--out", default=str(RESULTS / "concurrency"))
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    model = calibrated_model()
    rows = []
    with LatencyServerProcess(args.delay) as server:
        for mode in args.modes:
            for cost in args.call_cost:
                for k in sorted({1, *args.concurrency} - ({1} if mode == "speculate" else set())):
                    row = run(server, model, questions=args.questions, concurrency=k, call_cost=cost, mode=mode)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"delay": args.delay, "argv": argv, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, args.delay, argv))
    print(markdown(rows, args.delay, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
