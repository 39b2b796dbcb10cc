"""The ``markovscale`` command: demo, calibrate, report, run.

* ``markovscale demo`` -- the main job, offline: start the embedded model, calibrate on a real dataset, compare no
  refinement, fixed 3-round refinement and calibrated MarkovRefine on held-out questions, save state and report.
* ``markovscale calibrate`` -- any model (``--model`` LiteLLM string + ``--api-base``) or the embedded one, any
  bundled task -> state JSON + report.
* ``markovscale report STATE`` -- what a saved state says: estimates, regime, bounds, rounds for given costs.
* ``markovscale run STATE`` -- answer questions with a calibrated state.
* ``markovscale bench`` -- every method side by side on your model and task (held-out questions, same samples),
  with the planner (MarkovScale): what it chooses, every strategy's predicted against observed accuracy, a figure.
* ``markovscale compare-configs`` -- which model should draft and which should refine: calibrate each pair on the
  same questions, one state each, and a report of accuracy against dollars (or calls) with a recommendation.

Wherever ``--model`` is taken, ``--router-config PATH`` (LiteLLM's proxy-config format) makes ``--model`` name a
``model_name`` group whose deployments LiteLLM's Router balances, retries and falls back over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch LiteLLM's price map from the internet

import dspy

from markovscale_dspy._exceptions import ConfigurationError, MarkovScaleError, StateError
from markovscale_dspy._version import __version__
from markovscale_dspy.calibrate.calibrator import MarkovCalibrator
from markovscale_dspy.calibrate.report import CalibrationReport
from markovscale_dspy.core.model import TransitionModel
from markovscale_dspy.core.theory import BOUND_KIND
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.integrations.datasets import available_tasks, load_task
from markovscale_dspy.integrations.lms import ROUTES, build_lm, redact
from markovscale_dspy.integrations.routing import load_router_config
from markovscale_dspy.refine.loop import describe, unrecoverable
from markovscale_dspy.refine.markov_refine import MAX_ROUNDS_LIMIT, MarkovRefine
from markovscale_dspy.refine.state import MarkovState, read_state_file
from markovscale_dspy.reporting.pages import bench_page, configurations_page, run_context
from markovscale_dspy.reporting.text import (
    calibration_markdown,
    comparison_markdown,
    dollars,
    format_calibration,
    format_comparison,
    format_model,
    format_plan,
    markdown_table,
    paired_markdown,
    paired_words,
    verdict,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_NOTHING_USABLE", "EXIT_USAGE", "check_arguments", "main"]

#: Exit codes (also in ``markovscale --help`` and the README): 0 success.
EXIT_NOTHING_USABLE = 1  # it ran, but nothing usable came out (every question failed, no usable chain)
EXIT_USAGE = 2  # a usage or configuration error: bad argument, missing file, rejected key, unknown model
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    "exit codes: 0 success; 1 it ran but nothing usable came out (every question failed, no usable chain, too many "
    "errors); 2 usage or configuration error (bad argument, missing or unreadable file, rejected API key, unknown "
    "model; argparse's own errors too); 130 interrupted"
)


#: Retries of transient errors for a direct LM (a router LM's Router retries instead; see --router-config).
DEFAULT_RETRIES = 2


def _say(text: str = "") -> None:
    print(text, flush=True)


# LMs -------------------------------------------------------------------------------------------------------------


def _named_lm(name: str, args: argparse.Namespace, *, group_only: bool = False) -> dspy.LM:
    """The LM called ``name``: a group of ``--router-config`` if it is one, else a LiteLLM model string.

    With ``group_only`` (``--model`` beside ``--router-config``), a name that is no group is an error naming the
    groups, not a silent switch to a direct connection.
    """
    common: dict[str, Any] = {
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "cache": not args.no_cache,
    }
    if args.router_config:
        config = load_router_config(args.router_config)
        if group_only or name in config.groups():
            if args.api_base or args.api_key_env or args.route != "litellm":
                raise ConfigurationError(
                    "--router-config takes endpoints and keys from the file (use os.environ/NAME for keys): drop "
                    "--api-base, --api-key-env and --route"
                )
            retries = {} if args.retries is None else {"num_retries": args.retries}
            return build_lm(config.require_group(name), router_config=config, **common, **retries)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    retries = DEFAULT_RETRIES if args.retries is None else args.retries
    return build_lm(name, api_base=args.api_base, api_key=api_key, route=args.route, num_retries=retries, **common)


def _refiner_from_args(args: argparse.Namespace) -> dspy.LM | None:
    """``--refiner-model``: the LM of refinement rounds (a router group or a LiteLLM string), if given."""
    name = getattr(args, "refiner_model", None)
    return _named_lm(name, args) if name else None


@contextlib.contextmanager
def _lm_from_args(args: argparse.Namespace) -> Iterator[tuple[dspy.LM, str]]:
    """The LM the user asked for: ``--model`` (any LiteLLM string, or a group of ``--router-config``) or, by
    default, the embedded model."""
    if args.router_config and not args.model:
        raise ConfigurationError("--router-config needs --model naming the model_name group to call")
    if args.model:
        yield _named_lm(args.model, args, group_only=True), args.model
        return
    with _embedded_lm(args) as lm:
        yield lm, f"{lm.model} (embedded SmolLM2-135M-Instruct Q4_1)"


@contextlib.contextmanager
def _embedded_lm(args: argparse.Namespace) -> Iterator[dspy.LM]:
    """The embedded model's LM, its llama.cpp server running for the block."""
    common = {
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "cache": not args.no_cache,
        "num_retries": DEFAULT_RETRIES if args.retries is None else args.retries,
    }
    from markovscale_dspy.integrations.local import LocalModel

    _say("Starting the embedded model (SmolLM2-135M-Instruct, llama.cpp server from xllamacpp) ...")
    started = time.perf_counter()
    with LocalModel(n_parallel=args.threads) as server:
        _say(f"  ready on 127.0.0.1:{server.port} in {time.perf_counter() - started:.1f} s")
        yield server.lm(route=args.route, **common)


def _add_lm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: the embedded SmolLM2-135M, offline)")
    group.add_argument(
        "--model", help="LiteLLM model string, e.g. hosted_vllm/Qwen2.5-7B, ollama_chat/llama3.2, openai/gpt-4o-mini"
    )
    group.add_argument(
        "--router-config",
        metavar="PATH",
        help="LiteLLM Router config (YAML/JSON, LiteLLM's proxy-config format); --model then names a model_name "
        "group, whose deployments the Router balances, retries and falls back over. A LiteLLM proxy needs none of "
        "this: --model openai/<model_name> --api-base http://proxy:4000",
    )
    group.add_argument("--api-base", help="server URL, e.g. http://localhost:8000/v1 (or $MARKOVSCALE_API_BASE)")
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (or $MARKOVSCALE_API_KEY / provider default)",
    )
    group.add_argument("--route", choices=ROUTES, default="litellm", help="how calls reach the server")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument(
        "--retries",
        type=int,
        default=None,
        help=f"retries of transient LM errors (default {DEFAULT_RETRIES}; with --router-config the Router "
        "retries, by default as many times as the file's num_retries)",
    )
    group.add_argument("--no-cache", action="store_true", help="disable DSPy's LM cache")
    group.add_argument(
        "--adapter",
        choices=("json", "chat"),
        default="json",
        help="DSPy adapter (json: schema-constrained outputs; needed by small models)",
    )
    group.add_argument("--threads", type=int, default=2, help="parallel requests (default 2)")


def _adapter(name: str) -> dspy.Adapter:
    return dspy.JSONAdapter() if name == "json" else dspy.ChatAdapter()


# Commands ----------------------------------------------------------------------------------------------------------


def _calibrate(
    task_name: str, lm: dspy.LM, args: argparse.Namespace, train: list[dspy.Example]
) -> tuple[MarkovRefine, MarkovCalibrator]:
    task = load_task(task_name)
    value = getattr(args, "value_per_correct", None)
    student = MarkovRefine(
        task.program(reasoning=args.reasoning),
        max_rounds=args.rounds,
        round_cost=None if value is not None else args.round_cost,
        value_per_correct=value,
        min_prob_improves=args.min_prob_improves,
        refiner_lm=_refiner_from_args(args),
    )
    calibrator = MarkovCalibrator(
        task.metric,
        rounds=args.rounds,
        num_threads=args.threads,
        display_progress=True,
        resume=not args.fresh,
        trace_dir=args.trace_dir,
        max_dollars=getattr(args, "max_dollars", None),
    )
    with dspy.context(lm=lm, adapter=_adapter(args.adapter)):
        program = calibrator.compile(student, trainset=train)
    if value is not None:
        # The reports speak of a round cost in accuracy: the measured dollars per round over the value of a correct
        # answer (a StateError-like refusal when the dollars are unknown comes from stopping_cost).
        args.round_cost = program.stopping_cost()
        _say(
            f"A refinement round cost {dollars(program.markov.dollars_per_round())} on average; with a correct answer "
            f"worth ${value:g}, a round must add {args.round_cost:.4g} accuracy to pay."
        )
    return program, calibrator


def _context(args: argparse.Namespace, model_name: str, task: Any, n_train: int, n_test: int | None) -> dict:
    value = getattr(args, "value_per_correct", None)
    fields = {
        "model": model_name,
        "task": f"{task.name}: {task.description}",
        "data": task.source,
        "calibration questions": n_train,
        "refinement rounds per chain": args.rounds,
        "temperature": args.temperature,
        "adapter": args.adapter,
        "refiner model": getattr(args, "refiner_model", None),
        "router config": Path(args.router_config).name if getattr(args, "router_config", None) else None,
        "value of a correct answer": f"${value:g}" if value is not None else None,
        "held-out questions": n_test,
    }
    return run_context(fields, seed=args.seed)


def _write_calibration(
    program: MarkovRefine,
    report: CalibrationReport,
    args: argparse.Namespace,
    *,
    state_path: Path,
    markdown_path: Path,
    json_path: Path,
    png_path: Path,
    title: str,
    figure_title: str,
    context: dict[str, Any],
    extra_markdown: str = "",
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Save the calibrated state and its report (Markdown, JSON sidecar, figure) -- what demo and calibrate write."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(state_path)
    figure = _figure(report, png_path, figure_title)
    markdown = calibration_markdown(
        report,
        title=title,
        context=context,
        round_cost=args.round_cost,
        max_rounds=args.rounds,
        figure=figure,
        min_prob_improves=args.min_prob_improves,
    )
    markdown_path.write_text(markdown + extra_markdown)
    json_path.write_text(
        json.dumps({"context": context, "calibration": report.to_dict(), **(extra_json or {})}, indent=1)
    )


def cmd_demo(args: argparse.Namespace) -> int:
    task = load_task(args.task)
    train, test = task.split(args.train, args.test, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _say(f"markovscale demo: does refinement pay on {task.name} for the embedded model?")
    _say(f"  {task.description}; {len(train)} calibration + {len(test)} held-out questions (seed {args.seed})")
    with _lm_from_args(args) as (lm, model_name):
        _say(f"\n[1/2] Calibrating: round 0 + {args.rounds} refinement rounds on {len(train)} questions ...")
        program, calibrator = _calibrate(args.task, lm, args, train)
        report = calibrator.report
        _say(format_calibration(report, args.round_cost, args.rounds, args.min_prob_improves))

        _say(
            f"\n[2/2] Held-out evaluation on {len(test)} questions: one {args.rounds}-round chain per question; "
            "no refinement (its round 0), fixed refinement (its last round) and calibrated MarkovRefine (where its "
            "policy stops on that chain) are read off the same samples ..."
        )
        from markovscale_dspy.evaluate.compare import fixed_curve, replayed
        from markovscale_dspy.evaluate.evaluation import evaluate

        chains = MarkovRefine(task.program(reasoning=args.reasoning), policy="fixed", max_rounds=args.rounds)
        with dspy.context(lm=lm, adapter=_adapter(args.adapter)):
            run = evaluate(
                chains,
                test,
                task.metric,
                name=f"fixed {args.rounds}-round refinement",
                num_threads=args.threads,
                display_progress=True,
                keep_predictions=True,
            )
            curve = fixed_curve(run, test, task.metric, args.rounds)
            base, fixed = curve[0], curve[-1]
            markov = replayed(program, run, test, task.metric, "MarkovRefine (calibrated)")
    base.name, fixed.name = "no refinement", f"fixed {args.rounds}-round refinement"
    results = [base, fixed, markov]
    _say("\n" + format_comparison(results))
    held_out = " ".join(paired_words(a, b) for a, b in ((fixed, base), (markov, base), (markov, fixed)))
    held_out += (
        f" Calls per question: {base.mean_calls:.2f} / {fixed.mean_calls:.2f} / {markov.mean_calls:.2f} "
        f"({markov.calls / max(fixed.calls, 1):.0%} of fixed-{args.rounds}'s calls)."
    )
    words = verdict(program.model, args.round_cost, args.rounds, args.min_prob_improves)
    _say("\nVerdict from the calibration: " + words)
    _say("Held-out check (paired, same questions): " + held_out)

    state_path, report_path = out / "state.json", out / "report.md"
    _write_calibration(
        program,
        report,
        args,
        state_path=state_path,
        markdown_path=report_path,
        json_path=out / "report.json",
        png_path=out / "report.png",
        title=f"markovscale demo: {task.name}",
        figure_title=f"SmolLM2-135M on {task.name}: accuracy by refinement round",
        context=_context(args, model_name, task, len(train), len(test)),
        extra_markdown="\n## Held-out evaluation (paired: every method read off the same chains)\n\n"
        + comparison_markdown(results)
        + "\n\n"
        + paired_markdown(results, base)
        + "\n\n"
        + held_out
        + "\n",
        extra_json={"evaluation": [r.to_dict() for r in results]},
    )
    _say(
        f"\nSaved the calibrated state to {state_path} and the report to {report_path} "
        f"(total {time.perf_counter() - started:.0f} s)."
    )
    return 0


def _optimize_refiner(args: argparse.Namespace, task: Any, lm: dspy.LM, model_name: str) -> int:
    """``calibrate --optimize-refiner``: race refinement instructions, save the winner's calibrated state, and report
    every candidate and the chains before and after."""
    from markovscale_dspy.calibrate.refiner_optimizer import RefinerOptimizer
    from markovscale_dspy.reporting.plots import refiner_figure
    from markovscale_dspy.reporting.text import refiner_markdown, refiner_words

    train, held_out = task.split(args.train, args.holdout or 0, seed=args.seed)
    out = Path(args.out)
    candidates = [] if not args.candidates else _read_candidates(args.candidates)
    reflection = _named_lm(args.reflection_model, args) if args.reflection_model else None
    student = MarkovRefine(
        task.program(reasoning=args.reasoning),
        max_rounds=args.rounds,
        round_cost=args.round_cost,
        min_prob_improves=args.min_prob_improves,
        refiner_lm=_refiner_from_args(args),
    )
    optimizer = RefinerOptimizer(
        task.metric,
        candidates=candidates,
        reflection_lm=reflection,
        proposals=(args.proposals or 2) if reflection is not None else 0,
        rounds=args.rounds,
        num_threads=args.threads,
        resume=not args.fresh,
        trace_dir=args.trace_dir,
        display_progress=True,
        seed=args.seed,
    )
    n = len(candidates) + 2 + ((args.proposals or 2) if reflection is not None else 0)
    _say(f"Racing up to {n} refiners on {len(train)} {task.name} questions, round 0 + {args.rounds} rounds ...")
    with dspy.context(lm=lm, adapter=_adapter(args.adapter)):
        program = optimizer.compile(student, trainset=train, valset=held_out or None)
    report = optimizer.report
    _say(refiner_words(report))
    _say(format_calibration(report.after, args.round_cost, args.rounds, args.min_prob_improves))
    report_md = out.with_suffix(".report.md")
    program.save(out)  # first: what was paid for is kept whatever happens to the figures
    try:
        figure = _draw(refiner_figure, report, out.with_suffix(".refiners.png"), title=f"{model_name} on {task.name}")
    except Exception as exc:  # a figure is not worth losing the report for
        _say(f"  (no figure of the chains: {describe(exc)})")
        figure = None
    _write_calibration(
        program,
        report.after,
        args,
        state_path=out,
        markdown_path=report_md,
        json_path=out.with_suffix(".report.json"),
        png_path=out.with_suffix(".report.png"),
        title=f"Calibration with the optimised refiner: {task.name}",
        figure_title=f"{model_name} on {task.name} (chosen refiner)",
        context=_context(args, model_name, task, len(train), len(held_out) or None),
        extra_markdown="\n" + refiner_markdown(report, figure=figure),
        extra_json={"refiners": {k: v for k, v in report.to_dict().items() if k not in ("before", "after")}},
    )
    _say(f"Saved the state (refiner: {report.chosen_source}) to {out} and the report to {report_md}.")
    return 0


def _read_candidates(path: str) -> list[str]:
    """Refinement instructions from a text file: one per line, blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"--candidates {path}: cannot read it ({exc.strerror}); give a text file") from None
    found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ConfigurationError(f"--candidates {path} holds no instructions: write one per line")
    return found


def cmd_calibrate(args: argparse.Namespace) -> int:
    task = load_task(args.task)
    if args.optimize_refiner:
        with _lm_from_args(args) as (lm, model_name):
            return _optimize_refiner(args, task, lm, model_name)
    train, _ = task.split(args.train, 0, seed=args.seed)
    out = Path(args.out)
    with _lm_from_args(args) as (lm, model_name):
        _say(f"Calibrating on {len(train)} {task.name} questions, round 0 + {args.rounds} refinement rounds ...")
        program, calibrator = _calibrate(args.task, lm, args, train)
    report = calibrator.report
    _say(format_calibration(report, args.round_cost, args.rounds, args.min_prob_improves))
    report_md = out.with_suffix(".report.md")
    _write_calibration(
        program,
        report,
        args,
        state_path=out,
        markdown_path=report_md,
        json_path=out.with_suffix(".report.json"),
        png_path=out.with_suffix(".report.png"),
        title=f"Calibration: {task.name}",
        figure_title=f"{model_name} on {task.name}",
        context=_context(args, model_name, task, len(train), None),
    )
    _say(f"Saved the state to {out} and the report to {report_md}.")
    return 0


def _read_state(path: str) -> tuple[dict[str, Any], TransitionModel]:
    """The MarkovRefine state in a state file and its model (the same checks as ``MarkovRefine.load``)."""
    state = read_state_file(path)["markov"]
    program = state.get("program") if isinstance(state, dict) else None
    program = program if isinstance(program, dict) else {}
    model = MarkovState.parse(state, program.get("inputs"), program.get("answers"))
    if model is None:
        raise StateError(f"{path} holds an uncalibrated MarkovRefine: calibrate it first")
    return state, model


def _draw(draw: Any, *args: Any, **kwargs: Any) -> str | None:
    """Draw a figure and return its file name; without matplotlib the report simply has no figure."""
    try:
        return draw(*args, **kwargs).name
    except MarkovScaleError as exc:
        _say(f"  (no figure: {exc})")
        return None


def _figure(report: CalibrationReport, path: Path, title: str) -> str | None:
    from markovscale_dspy.reporting.plots import calibration_figure

    return _draw(calibration_figure, report, path, title=title)


def _sidecar_report(state_path: Path) -> tuple[CalibrationReport | None, dict[str, Any]]:
    """The calibration report written next to a state by ``calibrate`` or ``demo``, if there is one."""
    for candidate in (state_path.with_suffix(".report.json"), state_path.parent / "report.json"):
        if candidate.exists():
            try:
                data = json.loads(candidate.read_text())
                return CalibrationReport.from_dict(data["calibration"]), data.get("context") or {}
            except (json.JSONDecodeError, KeyError, MarkovScaleError):
                continue
    return None, {}


def cmd_report(args: argparse.Namespace) -> int:
    state, model = _read_state(args.state)
    state_path = Path(args.state)
    report, context = _sidecar_report(state_path)
    if report is None or report.transition_model() != model:
        report, context = CalibrationReport.from_model(model, args.max_rounds), {}
    md_path = Path(args.markdown) if args.markdown else state_path.with_suffix(".report.md")
    png_path = Path(args.png) if args.png else state_path.with_suffix(".report.png")
    if not args.no_files:
        figure = _figure(report, png_path, f"Calibration in {state_path.name}")
        markdown = calibration_markdown(
            report,
            title=f"Calibration report: {state_path.name}",
            context=context,
            round_cost=args.cost[0],
            max_rounds=args.max_rounds,
            figure=figure,
        )
        rows = [
            [
                f"{c:g}",
                model.optimal_rounds(c, args.max_rounds),
                f"{model.accuracy_at(model.optimal_rounds(c, args.max_rounds)):.3f}",
            ]
            for c in args.cost
        ]
        markdown += (
            "\n## Rounds for the requested costs\n\n"
            + markdown_table(["cost per round", "rounds", "expected accuracy"], rows)
            + "\n"
        )
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown)
    program = state.get("program", {})
    _say(
        f"{args.state}: MarkovRefine for {program.get('inputs')} -> {program.get('answers')}, "
        f"written by markovscale-dspy {state.get('markovscale_version')}"
    )
    _say(f"  calibrated on {model.n0_total} chains, {model.n_transitions} transitions; prior {model.prior}")
    _say("  estimates with 95% credible intervals:")
    for line in format_model(model):
        _say(line)
    bound = model.stationary_accuracy()
    kind = BOUND_KIND[model.regime()]
    _say(f"  regime: {model.regime()}; {kind} bound {bound:.3f}; convergence rate {model.convergence_rate():.3f}")
    _say(f"  P(refinement helps | data) = {model.prob_improves():.3f}")
    for cost in args.cost:
        t = model.optimal_rounds(cost, args.max_rounds)
        _say(
            f"  cost {cost:g}/round -> {t} round(s), expected accuracy {model.accuracy_at(t):.3f} "
            f"(vs {model.p0:.3f} without refinement)"
        )
    _say("  " + verdict(model, args.cost[0], args.max_rounds))
    if not args.no_files:
        _say(f"Wrote {md_path} and {png_path}.")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    task = load_task(args.task)
    refine = MarkovRefine(
        task.program(reasoning=args.reasoning),
        max_rounds=args.max_rounds,
        round_cost=None if args.value_per_correct is not None else args.round_cost,
        value_per_correct=args.value_per_correct,
        policy=args.policy,
        min_prob_improves=args.min_prob_improves,
    )
    refine.load(args.state)
    if args.question:
        examples = [dspy.Example(question=q).with_inputs("question") for q in args.question]
    else:
        _, examples = task.split(0, args.n, seed=args.seed)
    answered = correct = graded = 0
    with _lm_from_args(args) as (lm, _), dspy.context(lm=lm, adapter=_adapter(args.adapter)):
        refine.refiner_lm = _refiner_from_args(args)
        for example in examples:
            try:
                pred = refine(**example.inputs())
            except MarkovScaleError as exc:
                fix = unrecoverable(exc)
                if fix is not None:  # the next question would fail the same way: stop, and say what to change
                    raise ConfigurationError(f"{describe(exc.__cause__ or exc)}: {fix}") from exc
                _say(f"- {example.question[:70]!r}: failed: {exc}")
                continue
            answered += 1
            line = (
                f"- {example.question.splitlines()[0][:70]!r} -> {pred.answer!r} ({pred.rounds} rounds, "
                f"{pred.stop_reason})"
            )
            if "answer" in example:
                ok = bool(task.metric(example, pred))
                correct, graded = correct + ok, graded + 1
                line += " correct" if ok else f" wrong (gold {example.answer!r})"
            _say(line)
    if graded:
        _say(f"{correct}/{graded} correct")
    if answered == 0:
        _say(f"No question was answered ({len(examples)} failed): see the errors above.")
        return EXIT_NOTHING_USABLE
    return 0


def _configuration_spec(spec: str) -> tuple[str, str, str | None]:
    """``[NAME=]ROUND0[+REFINER]`` -> (name, round-0 model, refiner model or None)."""
    name, _, models = spec.rpartition("=") if "=" in spec else ("", "", spec)
    round0, _, refiner = models.partition("+")
    if not round0.strip() or (_ and not refiner.strip()):
        raise ConfigurationError(
            f"--config {spec!r}: expected [NAME=]MODEL[+REFINER_MODEL], e.g. draft=openai/gpt-4o-mini+openai/gpt-4o "
            "(models are LiteLLM strings, groups of --router-config, or 'embedded')"
        )
    return (name.strip() or models.strip(), round0.strip(), refiner.strip() or None)


def cmd_compare_configs(args: argparse.Namespace) -> int:
    from markovscale_dspy.evaluate.configurations import Configuration, compare_configurations
    from markovscale_dspy.reporting.plots import comparison_figure

    specs = [_configuration_spec(spec) for spec in args.config]
    task = load_task(args.task)
    train, test = task.split(args.train, args.test, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _say(
        f"markovscale compare-configs: {len(specs)} configurations on {task.name}, {len(train)} calibration + "
        f"{len(test)} held-out questions"
    )
    with contextlib.ExitStack() as stack:
        lms: dict[str, dspy.LM] = {}

        def lm_for(name: str) -> dspy.LM:
            if name not in lms:
                lms[name] = stack.enter_context(_embedded_lm(args)) if name == "embedded" else _named_lm(name, args)
            return lms[name]

        configurations = [Configuration(name, lm_for(r0), lm_for(ref) if ref else None) for name, r0, ref in specs]

        def show(r: Any) -> None:
            held = r.held_out
            scored = f"{held.correct}/{held.n} held out" if held is not None else "not evaluated"
            _say(
                f"  {r.name}: p0 {r.report.estimates['p0']['mean']:.3f}, p_cw {r.report.estimates['p_cw']['mean']:.3f},"
                f" p_wc {r.report.estimates['p_wc']['mean']:.3f} ({r.report.regime}); {r.rounds} round(s); {scored}; "
                f"{dollars(r.dollars)} and {r.calls:.2f} calls per question"
            )

        with dspy.context(adapter=_adapter(args.adapter)):
            result = compare_configurations(
                lambda: task.program(reasoning=args.reasoning),
                configurations,
                train,
                task.metric,
                testset=test,
                max_rounds=args.rounds,
                round_cost=None if args.value_per_correct is not None else args.round_cost,
                value_per_correct=args.value_per_correct,
                out_dir=out,
                num_threads=args.threads,
                resume=not args.fresh,
                trace_dir=args.trace_dir,
                min_prob_improves=args.min_prob_improves,
                on_result=show,
            )
    context = run_context(
        {
            "task": f"{task.name}: {task.description}",
            "data": task.source,
            "configurations": "; ".join(f"{n} = {r0}" + (f" + {ref}" if ref else "") for n, r0, ref in specs),
            "calibration questions": len(train),
            "held-out questions": len(test),
            "refinement rounds": args.rounds,
            "temperature": args.temperature,
        },
        seed=args.seed,
    )
    figure = _draw(comparison_figure, result, out / "compare.png", title=f"Configurations on {task.name}")
    page = configurations_page(f"markovscale compare-configs: {task.name}", context, result, figure=figure)
    (out / "compare.md").write_text(page)
    (out / "compare.json").write_text(json.dumps({"context": context, **result.to_dict()}, indent=1, default=str))
    _say(
        "\nRecommended: "
        + (result.recommended or "none (no configuration's cost is known)")
        + f" ({result.criterion})."
    )
    _say(f"Wrote {out / 'compare.md'}, {out / 'compare.json'} and one state per configuration in {out}.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from markovscale_dspy.evaluate.compare import compare_methods

    if args.value_per_correct is not None:
        raise ConfigurationError("bench compares methods at --round-cost; --value-per-correct is for calibrate/run")

    task = load_task(args.task)
    train, test = task.split(args.train, args.test, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_calls = None if args.no_planner else (args.max_calls or args.rounds + 1)
    _say(f"markovscale bench: every method on {task.name}, {len(train)} calibration + {len(test)} held-out questions")
    with _lm_from_args(args) as (lm, model_name), dspy.context(lm=lm, adapter=_adapter(args.adapter)):
        result = compare_methods(
            lambda: task.program(reasoning=args.reasoning),
            train,
            test,
            task.metric,
            name=task.name,
            max_rounds=args.rounds,
            round_cost=args.round_cost,
            num_threads=args.threads,
            include_baselines=not args.no_baselines,
            baseline_n=args.baseline_n,
            resume=not args.fresh,
            description={"task": task.description, "source": task.source},
            max_calls=max_calls,
            parallel_samples=args.parallel_samples,
            call_cost=args.call_cost,
            min_prob_gain=args.min_prob_gain,
        )
    _say("\n" + format_comparison(result.results))
    base = next(r for r in result.results if r.name == "fixed-0")
    paired = [paired_words(r, base) for r in result.results if r.name in ("closed_form", "belief")]
    if result.plan is not None:
        _say("\nThe planner (MarkovScale): " + format_plan(result.plan))
        _say(format_comparison(result.strategies))
    _say("\nVerdict: " + verdict(result.model, args.round_cost, args.rounds, args.min_prob_improves))
    _say("Held-out check against no refinement (paired, same questions): " + " ".join(paired))
    context = _context(args, model_name, task, len(train), len(test))
    from markovscale_dspy.reporting.plots import frontier_figure, strategy_figure

    title = f"{model_name} on {task.name}"
    frontier = _draw(frontier_figure, result.results, out / "bench.png", title=title)
    plan_png = None
    if result.plan is not None:
        plan_png = _draw(strategy_figure, result.plan, out / "plan.png", observed=result.strategies, title=title)
    words = verdict(result.model, args.round_cost, args.rounds, args.min_prob_improves)
    page = bench_page(
        f"markovscale bench: {task.name}",
        context,
        result,
        words,
        base,
        paired,
        frontier_figure=frontier,
        plan_figure=plan_png,
    )
    (out / "bench.md").write_text(page)
    extra: dict[str, Any] = {}
    if result.plan is not None:
        extra = {"plan": result.plan.to_dict(), "strategies": [r.to_dict() for r in result.strategies]}
    (out / "bench.json").write_text(
        json.dumps(
            {
                "context": context,
                "model": result.model.to_dict(),
                "results": [r.to_dict() for r in result.results],
                **extra,
            },
            indent=1,
        )
    )
    _say(f"\nWrote {out / 'bench.md'} and {out / 'bench.json'}.")
    return 0


# Parser --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="markovscale", description="Principled refinement for DSPy programs.", epilog=EXIT_CODES
    )
    parser.add_argument("--version", action="version", version=f"markovscale-dspy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_verb(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=EXIT_CODES, **kwargs)

    def task_options(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--task", choices=available_tasks(), default=default, help=f"bundled task (default {default})")
        p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
        p.add_argument("--reasoning", action="store_true", help="use ChainOfThought instead of Predict")
        p.add_argument("--round-cost", type=float, default=0.01, help="accuracy one round must buy (default 0.01)")
        p.add_argument(
            "--value-per-correct",
            type=float,
            metavar="DOLLARS",
            help="instead of --round-cost: dollars a correct answer is worth; a round must then buy its measured "
            "dollars / DOLLARS of accuracy",
        )
        p.add_argument(
            "--min-prob-improves",
            type=float,
            default=0.9,
            help="refine only if P(refinement helps | calibration) reaches this (default 0.9; 0 = the "
            "paper's rule as is)",
        )

    def cap_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-dollars",
            type=float,
            default=None,
            help="hard cap on what calibration spends: a call whose worst case does not fit is not made, and the "
            "chains that finished are fitted and stored (needs the model's price and --max-tokens)",
        )

    def trace_options(p: argparse.ArgumentParser, fresh: bool) -> None:
        p.add_argument(
            "--trace-dir",
            help="where finished calibration chains are kept (default "
            "$MARKOVSCALE_TRACE_DIR or ~/.cache/markovscale/traces)",
        )
        group = p.add_mutually_exclusive_group()
        group.add_argument(
            "--fresh",
            dest="fresh",
            action="store_true",
            default=fresh,
            help="recompute every chain, ignoring stored ones" + (" (default)" if fresh else ""),
        )
        group.add_argument(
            "--resume",
            dest="fresh",
            action="store_false",
            help="reuse finished chains from an earlier run" + ("" if fresh else " (default)"),
        )

    demo = add_verb("demo", help="the main job: calibrate and evaluate on the embedded model, offline")
    task_options(demo, DEMO_TASK)
    demo.add_argument("--train", type=int, default=DEMO_TRAIN, help=f"calibration questions (default {DEMO_TRAIN})")
    demo.add_argument("--test", type=int, default=DEMO_TEST, help=f"held-out questions (default {DEMO_TEST})")
    demo.add_argument("--rounds", type=int, default=3, help="refinement rounds (default 3)")
    demo.add_argument("--out", default="markovscale-out", help="output folder (default markovscale-out)")
    trace_options(demo, fresh=True)  # the demo measures: a fresh calibration each time
    cap_option(demo)
    _add_lm_options(demo)
    demo.set_defaults(func=cmd_demo, no_cache=True)

    cal = add_verb("calibrate", help="calibrate MarkovRefine for a model on a bundled task")
    task_options(cal, DEMO_TASK)
    cal.add_argument("--train", type=int, default=200, help="calibration questions (default 200)")
    cal.add_argument("--rounds", type=int, default=4, help="refinement rounds per chain (default 4)")
    cal.add_argument("--out", default="markovscale-state.json", help="state file to write")
    trace_options(cal, fresh=False)  # a paid-for calibration resumes where it stopped
    cap_option(cal)
    _add_lm_options(cal)
    cal.add_argument(
        "--refiner-model", help="LM of refinement rounds (LiteLLM string or router group); default --model"
    )
    race = cal.add_argument_group("refiner optimisation (RefinerOptimizer)")
    race.add_argument(
        "--optimize-refiner",
        action="store_true",
        help="race refinement instructions (the default, a built-in 'verify first' one, --candidates, proposals) "
        "and save the winner, chosen only if the posterior supports its advantage",
    )
    race.add_argument("--candidates", help="text file of refinement instructions to race, one per line")
    race.add_argument("--reflection-model", help="LM that proposes more instructions (GEPA's proposer)")
    race.add_argument("--proposals", type=int, help="instructions --reflection-model proposes (default 2)")
    race.add_argument("--holdout", type=int, default=0, help="held-out questions answered before and after (default 0)")
    cal.set_defaults(func=cmd_calibrate)

    rep = add_verb("report", help="print what a saved state says")
    rep.add_argument("state", help="state JSON written by calibrate, demo or refine.save()")
    rep.add_argument("--cost", type=float, nargs="+", default=[0.0, 0.01, 0.05], help="costs per round to plan for")
    rep.add_argument("--max-rounds", type=int, default=8)
    rep.add_argument("--markdown", help="Markdown report to write (default STATE.report.md)")
    rep.add_argument("--png", help="figure to write (default STATE.report.png)")
    rep.add_argument("--no-files", action="store_true", help="only print, write no report files")
    rep.set_defaults(func=cmd_report)

    run = add_verb("run", help="answer questions with a calibrated state")
    run.add_argument("state", help="state JSON written by calibrate or demo")
    task_options(run, DEMO_TASK)
    run.add_argument("--question", action="append", help="a question to answer (repeatable); default: task sample")
    run.add_argument("--n", type=int, default=10, help="task questions to answer when no --question is given")
    run.add_argument("--policy", default="closed_form", help="stopping policy (default closed_form)")
    run.add_argument("--max-rounds", type=int, default=4)
    _add_lm_options(run)
    run.add_argument(
        "--refiner-model", help="LM of refinement rounds (LiteLLM string or router group); default --model"
    )
    run.set_defaults(func=cmd_run)

    bench = add_verb(
        "bench", help="every method side by side on your model and task: calibrate, then compare on held-out questions"
    )
    task_options(bench, DEMO_TASK)
    bench.add_argument("--train", type=int, default=60, help="calibration questions (default 60)")
    bench.add_argument("--test", type=int, default=40, help="held-out questions (default 40)")
    bench.add_argument("--rounds", type=int, default=3, help="refinement rounds (default 3)")
    bench.add_argument("--baseline-n", type=int, default=3, help="attempts of BestOfN, Refine, self-consistency")
    bench.add_argument("--no-baselines", action="store_true", help="only no refinement, fixed-N and MarkovRefine")
    bench.add_argument(
        "--max-calls", type=int, help="the planner's budget of LM calls per question (default: rounds + 1)"
    )
    bench.add_argument(
        "--parallel-samples", type=int, help="independent samples per calibration question (default: max calls)"
    )
    bench.add_argument("--call-cost", type=float, default=0.0, help="accuracy one LM call must buy (default 0)")
    bench.add_argument(
        "--min-prob-gain",
        type=float,
        default=0.9,
        help="the planner claims a gain over one call only with this posterior probability (default 0.9)",
    )
    bench.add_argument("--no-planner", action="store_true", help="leave out the planner (MarkovScale)")
    bench.add_argument("--out", default="markovscale-bench", help="output folder (default markovscale-bench)")
    trace_options(bench, fresh=True)
    _add_lm_options(bench)
    bench.set_defaults(func=cmd_bench, no_cache=True)

    cmp = add_verb(
        "compare-configs",
        help="which model drafts and which refines: calibrate each configuration on the same questions, one state "
        "each, and a report of accuracy against dollars with a recommendation",
    )
    task_options(cmp, DEMO_TASK)
    cmp.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="[NAME=]MODEL[+REFINER]",
        help="a configuration (repeat): round-0 model and optionally a refiner model; each a LiteLLM string, a "
        "group of --router-config, or 'embedded'. E.g. --config cheap=openai/gpt-4o-mini --config "
        "mixed=openai/gpt-4o-mini+openai/gpt-4o",
    )
    cmp.add_argument("--train", type=int, default=60, help="calibration questions (default 60)")
    cmp.add_argument("--test", type=int, default=40, help="held-out questions (default 40)")
    cmp.add_argument("--rounds", type=int, default=3, help="refinement rounds (default 3)")
    cmp.add_argument("--out", default="markovscale-configs", help="output folder (default markovscale-configs)")
    trace_options(cmp, fresh=False)
    _add_lm_options(cmp)
    cmp.set_defaults(func=cmd_compare_configs, no_cache=True)
    return parser


# Demo defaults, chosen by measurement (README, "The demo"): the embedded model's single-pass accuracy on the task
# is inside 20-80%, and the sizes finish in about five minutes on two cores.
DEMO_TASK = "winogrande"
DEMO_TRAIN = 100
DEMO_TEST = 50


def check_arguments(args: argparse.Namespace) -> None:
    """Every file and number the command was given, checked before data packages load or a server starts (so a
    missing state file is reported as that, not as whatever a later step trips over).

    Raises:
        ConfigurationError: a bad number or option, or an unset ``--api-key-env`` variable.
        StateError: a state file that is missing or unreadable.
    """
    for name, lo, hi in (("train", 2, None), ("test", 1, None), ("rounds", 1, MAX_ROUNDS_LIMIT), ("n", 1, None)):
        if hasattr(args, name):
            check_int(f"--{name}", getattr(args, name), lo, hi)
    if hasattr(args, "threads"):
        check_int("--threads", args.threads, 1)
        check_int("--max-tokens", args.max_tokens, 1)
        check_number("--temperature", args.temperature, 0, lo_open=True)
    for name in ("round_cost", "min_prob_improves"):
        if getattr(args, name, None) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), 0, 1)
    if getattr(args, "max_dollars", None) is not None:
        check_number("--max-dollars", args.max_dollars, 0, unit="dollars")
    if getattr(args, "value_per_correct", None) is not None:
        check_number("--value-per-correct", args.value_per_correct, 0, lo_open=True, unit="dollars")
    if getattr(args, "optimize_refiner", None) is not None:
        _check_race_arguments(args)
    if getattr(args, "state", None) is not None:
        read_state_file(args.state)
    if getattr(args, "router_config", None):
        load_router_config(args.router_config)
    env = getattr(args, "api_key_env", None)
    if env and not os.environ.get(env):
        raise ConfigurationError(f"--api-key-env {env}: the environment variable {env} is not set; export it first")


def _check_race_arguments(args: argparse.Namespace) -> None:
    used = [
        f"--{n.replace('_', '-')}"
        for n in ("candidates", "reflection_model", "holdout", "proposals")
        if getattr(args, n) is not None and getattr(args, n) is not False and getattr(args, n) != 0
    ]
    if not args.optimize_refiner:
        if used:
            raise ConfigurationError(f"{', '.join(used)} apply to --optimize-refiner: add it, or drop them")
        return
    if getattr(args, "max_dollars", None) is not None or getattr(args, "value_per_correct", None) is not None:
        raise ConfigurationError(
            "--optimize-refiner does not take --max-dollars or --value-per-correct yet: race with --round-cost, "
            "then calibrate the saved refiner with a cap"
        )
    if args.proposals is not None:
        if not args.reflection_model:
            raise ConfigurationError("--proposals needs --reflection-model naming the LM that writes them")
        check_int("--proposals", args.proposals, 1, 16)
    check_int("--holdout", args.holdout, 0)
    if args.candidates:
        _read_candidates(args.candidates)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    for noisy in ("LiteLLM", "litellm", "httpx", "dspy"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        check_arguments(args)  # before any data package is imported or server started
        return args.func(args)
    except MarkovScaleError as exc:
        secrets = [os.environ.get(args.api_key_env)] if getattr(args, "api_key_env", None) else []
        print(f"markovscale: error: {redact(str(exc), *secrets)}", file=sys.stderr)
        # Bad input (ValueError family) is the user's to fix; a run that produced nothing usable is a failure.
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_NOTHING_USABLE
    except KeyboardInterrupt:
        print("markovscale: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
