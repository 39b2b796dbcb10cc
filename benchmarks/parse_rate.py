"""Measure adapter parse failures and single-pass accuracy of the embedded model, per route and task.

Both routes talk to the same llama.cpp server with DSPy's JSONAdapter and a schema-constrained response format:
  litellm -- dspy.LM(engine="litellm"), LiteLLM told the model honours json_schema (markovscale's default)
  native  -- DSPy 3.4's own engine with a registered keyless provider that supports response schemas
  litellm-plain -- LiteLLM without the declaration (what a bare dspy.LM("openai/...") does): free-form JSON only
Each question is asked once (round 0) and refined once from that answer, so both prompt shapes are measured.

Reproduce:  .venv/bin/python benchmarks/parse_rate.py --n 100 --tasks arc_easy rg_chain_sum
"""

import argparse
import os
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.utils.parallelizer import ParallelExecutor
from scipy import stats

from markovscale_dspy import MarkovRefine
from markovscale_dspy.integrations.datasets import load_task
from markovscale_dspy.integrations.lms import build_lm
from markovscale_dspy.integrations.local import LocalModel


def interval(k, n):
    lo, hi = stats.beta(k + 0.5, n - k + 0.5).interval(0.95)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def run(task, examples, lm, threads):
    refine = MarkovRefine(task.program(), policy="fixed", max_rounds=1)

    def one(example):
        try:
            pred = refine(**example.inputs())
        except Exception as exc:  # round 0 failed to parse
            return ("round0_failed", type(exc).__name__)
        correct = bool(task.metric(example, dspy.Prediction(**pred.markovscale.trajectory[0]["outputs"])))
        return ("ok", correct, pred.markovscale.trajectory[1]["error"])

    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        return ParallelExecutor(num_threads=threads, disable_progress_bar=True).execute(one, examples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="questions per task")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "rg_chain_sum"])
    parser.add_argument("--routes", nargs="+", default=["litellm", "native"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"# parse failures and single-pass accuracy, SmolLM2-135M via llama.cpp, n={args.n} per task, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        "| task | route | round-0 parse failures | refinement parse failures | single-pass accuracy (95% CI) "
        "| s/question |"
    )
    print("|---|---|---|---|---|---|")
    with LocalModel() as server:
        for name in args.tasks:
            task = load_task(name)
            _, examples = task.split(0, args.n, seed=args.seed)
            for route in args.routes:
                options = {"temperature": 0.7, "cache": False, "num_retries": 0, "max_tokens": 256}
                if route == "litellm-plain":  # another name, so the declaration made for the server's alias is unseen
                    lm = build_lm(server.model + "-plain", api_base=server.api_base, structured=False, **options)
                else:
                    lm = server.lm(route=route, **options)
                started = time.perf_counter()
                results = run(task, examples, lm, args.threads)
                seconds = (time.perf_counter() - started) / len(examples)
                ok = [r for r in results if r and r[0] == "ok"]
                r0_fail = len(examples) - len(ok)
                refine_fail = sum(1 for r in ok if r[2] and "Parse" in r[2])
                correct = sum(r[1] for r in ok)
                lo, hi = interval(correct, len(examples))
                print(
                    f"| {name} | {route} | {r0_fail}/{len(examples)} | {refine_fail}/{len(ok)} | "
                    f"{correct / len(examples):.1%} ({lo:.1%}–{hi:.1%}) | {seconds:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
