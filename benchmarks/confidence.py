"""How much the embedded model's token confidence says, and what the belief policy does with it (BENCHMARKS.md).

    flock /tmp/llm.lock python -m benchmarks.confidence --tasks winogrande arc_easy --n 200 --rounds 3

For each task, ``n`` questions are answered with full refinement chains (round 0 plus ``rounds`` refinements) by
SmolLM2-135M through llama.cpp, JSONAdapter, temperature 0.7, ``logprobs=True``: every answer carries its
confidence, the probability of its option-letter token (see ``markovscale_dspy.refine.logprobs``). Reported:

* the AUROC of confidence for correctness, on round-0 answers and on all answers (95% interval, Hanley-McNeil);
* two-fold cross-fitting: calibrate on one half, run the policies on the other half's chains, and swap, so every
  question is a test question for a model that never saw it. A stopping policy's answer is read off the question's
  chain (its decisions depend only on the rounds before them), so every method is compared on the same answers:
  fixed-N, and ``belief`` with and without confidence, for ``select="last"`` and ``"best"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import dspy
import numpy as np

from markovscale_dspy import MarkovRefine
from markovscale_dspy.calibrate.calibrator import fit_chains
from markovscale_dspy.core.confidence import auroc
from markovscale_dspy.core.policies import RoundContext, evidence_for
from markovscale_dspy.evaluate.evaluation import evaluate

COSTS = (0.0, 0.01, 0.05)


def auroc_interval(scores: list[float], labels: list[bool]) -> tuple[float | None, float, float]:
    """AUROC with a 95% Hanley-McNeil interval."""
    a = auroc(scores, labels)
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    if a is None:
        return None, float("nan"), float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))
    return a, a - 1.96 * se, a + 1.96 * se


def chains(
    task: Any, examples: list[dspy.Example], rounds: int, threads: int, store: Path | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Full chains (every round's answer identity, confidence, correctness and failure) and how many were reused.

    With ``store``, finished chains are appended to that JSON-lines file as batches finish and reused on a re-run,
    so an interrupted measurement resumes (a chain is one independent sample either way).
    """
    done: dict[str, dict[str, Any]] = {}
    if store is not None and store.exists():
        for line in store.read_text().splitlines():
            row = json.loads(line)
            done[row["id"]] = row
    reused = {_ident(e) for e in examples} & set(done)
    out = []
    for start in range(0, len(examples), 20):
        batch = [e for e in examples[start : start + 20] if _ident(e) not in done]
        if batch:
            result = evaluate(
                MarkovRefine(task.program(), policy="fixed", max_rounds=rounds),
                batch,
                task.metric,
                name="fixed",
                num_threads=threads,
                keep_predictions=True,
            )
            for example, pred in zip(batch, result.predictions, strict=True):
                if pred is None:
                    continue
                trajectory = pred.markovscale.trajectory
                row = {
                    "id": _ident(example),
                    "keys": [list(e["answer_key"]) for e in trajectory],
                    "failed": [e["error"] is not None for e in trajectory],
                    "confidence": [e.get("confidence") for e in trajectory],
                    "labels": [bool(task.metric(example, dspy.Prediction(**e["outputs"]))) for e in trajectory],
                }
                done[row["id"]] = row
                if store is not None:
                    with store.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        out += [done[_ident(e)] for e in examples[start : start + 20] if _ident(e) in done]
    for row in out:
        row["keys"] = [tuple(k) if isinstance(k, list) else k for k in row["keys"]]
    return out, len(reused)


def _ident(example: dspy.Example) -> str:
    return str(example.get("id", example.question[:80]))


def replay(
    task: Any, model: Any, chain: dict[str, Any], rounds: int, cost: float, select: str, confidence: bool
) -> tuple[int, bool]:
    """Where MarkovRefine(policy="belief") stops on a recorded chain, and whether its returned answer is correct.

    Its decisions depend only on the rounds before them, so on this chain's answers it would make exactly these.
    """
    module = MarkovRefine(task.program(), policy="belief", max_rounds=rounds, round_cost=cost, select=select)
    module.model = model
    policy = module._effective_policy()  # the calibration gate included
    conf = tuple(chain["confidence"]) if confidence else ()
    r = 0
    while r < rounds:
        keys, failed = tuple(chain["keys"][: r + 1]), tuple(chain["failed"][: r + 1])
        if not policy.decide(RoundContext(model, r, rounds, cost, keys, failed, {}, conf[: r + 1], select)).refine:
            break
        r += 1
    if select == "best" and model.has_emissions:
        evidence, bins = evidence_for(model, conf, r)
        posteriors = evidence.posteriors(chain["keys"][: r + 1], chain["failed"][: r + 1], bins)
        chosen = max(range(r + 1), key=lambda t: posteriors[t] + 1e-12 * t)  # as ChainState.finish chooses
        return r, chain["labels"][chosen]
    return r, chain["labels"][r]


def calibrate(data: list[dict[str, Any]], rounds: int, confidence: bool) -> Any:
    """The model MarkovCalibrator fits to these chains (failed rounds dropped, as it drops them)."""
    labels, keys, confs = [], [], []
    for chain in data:
        kept = [t for t in range(len(chain["keys"])) if not chain["failed"][t]]
        labels.append([chain["labels"][t] for t in kept])
        keys.append([chain["keys"][t] for t in kept])
        confs.append([chain["confidence"][t] for t in kept])
    return fit_chains(labels, keys, confs if confidence else None, rounds=rounds)


def study(task_name: str, n: int, rounds: int, threads: int, lm: dspy.LM, store: Path | None = None) -> dict[str, Any]:
    from markovscale_dspy.integrations.datasets import load_task

    task = load_task(task_name)
    examples, _ = task.split(n, 0, seed=0)
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter(), warn_on_type_mismatch=False):
        data, reused = chains(task, examples, rounds, threads, store)
    seconds = time.perf_counter() - started
    pairs0 = [(c["confidence"][0], c["labels"][0]) for c in data if c["confidence"][0] is not None]
    pairs = [
        (conf, label)
        for c in data
        for conf, label, failed in zip(c["confidence"], c["labels"], c["failed"], strict=True)
        if conf is not None and not failed
    ]
    out: dict[str, Any] = {
        "task": task_name,
        "questions": len(data),
        "rounds": rounds,
        "seconds": seconds,
        "reused_chains": reused,
        "accuracy_by_round": [float(np.mean([c["labels"][t] for c in data])) for t in range(rounds + 1)],
        "auroc_round0": auroc_interval([s for s, _ in pairs0], [y for _, y in pairs0]),
        "auroc_all": auroc_interval([s for s, _ in pairs], [y for _, y in pairs]),
        "answers_with_confidence": len(pairs),
    }
    halves = [data[0::2], data[1::2]]
    results: dict[str, list] = {}
    models = []
    for fold in range(2):
        train, test = halves[fold], halves[1 - fold]
        for confidence in (False, True):
            model = calibrate(train, rounds, confidence)
            kept = confidence and model.confidence is not None
            models.append({"fold": fold, "confidence": confidence, "confidence_kept": kept, "model": repr(model)})
            for select in ("last", "best"):
                for cost in COSTS:
                    key = f"belief{' + confidence' if confidence else ''}, select={select}, cost {cost:g}"
                    results.setdefault(key, [])
                    results[key] += [replay(task, model, c, rounds, cost, select, confidence) for c in test]
    out["models"] = models
    out["fixed"] = {f"fixed-{t}": float(np.mean([c["labels"][t] for c in data])) for t in range(rounds + 1)}
    out["methods"] = {}
    for key, rows in results.items():
        correct = [bool(y) for _, y in rows]
        out["methods"][key] = {
            "accuracy": float(np.mean(correct)),
            "calls": float(np.mean([r + 1 for r, _ in rows])),
            "correct": correct,
        }
    for select in ("last", "best"):
        for cost in COSTS:
            a = out["methods"][f"belief, select={select}, cost {cost:g}"]["correct"]
            b = out["methods"][f"belief + confidence, select={select}, cost {cost:g}"]["correct"]
            diff = np.array(b, dtype=float) - np.array(a, dtype=float)
            se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            out["methods"][f"belief + confidence, select={select}, cost {cost:g}"]["paired_difference"] = (
                float(diff.mean()),
                float(diff.mean() - 1.96 * se),
                float(diff.mean() + 1.96 * se),
            )
    return out


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for r in results:
        a0, lo0, hi0 = r["auroc_round0"]
        a, lo, hi = r["auroc_all"]
        lines += [
            f"### {r['task']}: {r['questions']} questions, {r['rounds']} refinement rounds "
            f"({r['questions'] - r['reused_chains']} chains measured in {r['seconds'] / 60:.0f} min, "
            f"{r['reused_chains']} read from the chain store)",
            "",
            f"- accuracy by round: {', '.join(f'{100 * x:.1f}%' for x in r['accuracy_by_round'])}",
            f"- confidence AUROC for correctness: round 0 **{a0:.3f}** (95% CI {lo0:.3f}-{hi0:.3f}), all "
            f"{r['answers_with_confidence']} answers **{a:.3f}** ({lo:.3f}-{hi:.3f})",
            "- fitted models (two folds, without / with confidence): "
            + "; ".join(f"`{m['model']}`" for m in r["models"]),
            "- did the fit keep confidence (it must beat a pooled histogram on held-out chains by two standard "
            "errors)? "
            + ", ".join(
                f"fold {m['fold']}: {'yes' if m['confidence_kept'] else 'no'}" for m in r["models"] if m["confidence"]
            ),
            "",
            "| method | accuracy | LM calls / q | paired difference with vs without confidence (95% CI) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {100 * acc:.1f}% | {t + 1:.2f} | |" for t, (name, acc) in enumerate(r["fixed"].items())]
        for key, m in r["methods"].items():
            diff = m.get("paired_difference")
            cell = f"{100 * diff[0]:+.1f} ({100 * diff[1]:+.1f} to {100 * diff[2]:+.1f})" if diff else ""
            lines.append(f"| {key} | {100 * m['accuracy']:.1f}% | {m['calls']:.2f} | {cell} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.confidence", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["winogrande", "arc_easy"])
    parser.add_argument("--n", type=int, default=200, help="questions per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/confidence.json")
    args = parser.parse_args(argv)
    from markovscale_dspy.integrations.local import LocalModel

    results = []
    with LocalModel(n_parallel=args.threads) as server:
        lm = server.lm(temperature=0.7, cache=False, num_retries=1, logprobs=True)
        for task in args.tasks:
            store = Path(args.out).with_name(f"confidence-{task}-chains.jsonl")
            results.append(study(task, args.n, args.rounds, args.threads, lm, store))
            print(markdown(results[-1:], ""), flush=True)
    command = "flock /tmp/llm.lock python -m benchmarks.confidence " + " ".join(argv or sys.argv[1:])
    text = markdown(results, command)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        for m in r["methods"].values():
            m.pop("correct")
    Path(args.out).write_text(json.dumps({"command": command, "results": results}, indent=1, default=str))
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
