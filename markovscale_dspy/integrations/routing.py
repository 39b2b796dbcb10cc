"""LiteLLM's Router behind a ``dspy.LM``: several deployments of one model group, retries, fallbacks, cooldowns.

The config is LiteLLM's own proxy-config format, as a dict or a YAML/JSON file::

    model_list:
      - model_name: qwen                      # a group: deployments sharing a model_name are load-balanced
        litellm_params: {model: hosted_vllm/Qwen/Qwen2.5-7B-Instruct, api_base: http://gpu-1:8000/v1, rpm: 600}
        model_info: {input_cost_per_token: 0.0000001, output_cost_per_token: 0.0000002}   # self-hosted prices
      - model_name: qwen
        litellm_params: {model: hosted_vllm/Qwen/Qwen2.5-7B-Instruct, api_base: http://gpu-2:8000/v1}
      - model_name: hosted
        litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
    router_settings:
      routing_strategy: simple-shuffle        # or least-busy, latency-based-routing, usage-based-routing-v2, ...
      num_retries: 2
      allowed_fails: 1                        # failures before a deployment cools down
      cooldown_time: 30                       # seconds
      fallbacks: [{qwen: [hosted]}]

Calls are DSPy 3.4 *engine* calls (``complete(Request) -> Response``): DSPy keeps its cache (keyed by the request
and ``rollout_id``), usage tracking, history and callbacks; the engine converts the request to OpenAI messages,
calls ``Router.completion`` / ``Router.acompletion`` for the group, and converts the answer back (text, usage,
logprobs).

**One retry owner: the Router.** It retries on another deployment, cools failing ones down and falls back to other
groups; the ``dspy.LM`` is built with ``num_retries=0``, so retries never multiply.

Secrets: ``api_key`` values (write ``os.environ/NAME`` to keep them out of the file) and ``api_base`` values are
held by the Router only. They are hashed into :attr:`RouterEngine.fingerprint` (endpoints only; never keys), never
written to a state, trace key, report or log by this package, and scrubbed from error messages.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import logging
import os
import threading
import typing
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.core.validation import check_int, check_number
from markovscale_dspy.usage import record_cost

__all__ = ["ROUTER_PREFIX", "AsyncRouterEngine", "RouterConfig", "RouterEngine", "load_router_config", "router_lm"]

logger = logging.getLogger(__name__)

#: A router LM's ``model`` string is ``router/<group>`` (its name in usage, history, reports and states).
ROUTER_PREFIX = "router/"

#: Router settings the Router owns by default here (LiteLLM's own defaults otherwise).
DEFAULT_SETTINGS = {"num_retries": 2}

#: ``litellm_settings`` keys of a proxy config that are Router settings (LiteLLM's proxy reads them there too).
_FROM_LITELLM_SETTINGS = {
    "num_retries": "num_retries",
    "fallbacks": "fallbacks",
    "context_window_fallbacks": "context_window_fallbacks",
    "allowed_fails": "allowed_fails",
    "cooldown_time": "cooldown_time",
    "request_timeout": "timeout",
}
_PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token")
_SECRET_KEYS = ("api_key", "api_base", "base_url", "aws_secret_access_key", "aws_access_key_id", "vertex_credentials")
_FALLBACK_KEYS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks", "default_fallbacks")


def _litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map from the internet
    import litellm

    return litellm


def _env_value(value: Any) -> Any:
    """LiteLLM's ``os.environ/NAME`` reference, resolved (for scrubbing and hashing; the Router resolves its own)."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return os.environ.get(value.removeprefix("os.environ/"))
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


# The config ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """A validated LiteLLM Router config: deployments (``model_list``) and Router settings.

    Build it with :func:`load_router_config`. It holds the secrets of the file; its ``repr`` does not.
    """

    deployments: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    source: str

    def __repr__(self) -> str:
        return f"RouterConfig(source={self.source!r}, groups={self.groups()})"

    def digest(self) -> str:
        """A hash of the whole config (secrets included, never shown): one Router per distinct config."""
        return _digest([list(self.deployments), self.settings])

    def groups(self) -> list[str]:
        """The ``model_name`` groups, in the order they first appear."""
        return list(dict.fromkeys(d["model_name"] for d in self.deployments))

    def deployments_of(self, group: str) -> list[dict[str, Any]]:
        return [d for d in self.deployments if d["model_name"] == group]

    def require_group(self, group: str) -> str:
        """``group`` itself, or ConfigurationError naming the groups there are."""
        if group not in self.groups():
            close = difflib.get_close_matches(group, self.groups(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"model {group!r} is not a group of the router config {self.source}: its model_list defines "
                f"{self.groups()}. With a router config, the model names a model_name group, not a provider "
                f"model string.{hint}"
            )
        return group

    def fallback_groups(self, group: str) -> list[str]:
        """Groups the Router may fall back to from ``group`` (any kind of fallback), in order, transitively."""
        seen: list[str] = []
        frontier = [group]
        while frontier:
            current = frontier.pop(0)
            for key in _FALLBACK_KEYS:
                for rule in self.settings.get(key) or []:
                    targets = (
                        rule.get(current, [])
                        if isinstance(rule, dict)
                        else (rule if key == "default_fallbacks" else [])
                    )
                    for target in targets if isinstance(targets, list) else [targets]:
                        if target not in seen and target != group:
                            seen.append(target)
                            frontier.append(target)
        return seen

    def secrets(self) -> list[str]:
        """Every key and endpoint string of the deployments (resolved from the environment), longest first."""
        values = {
            str(_env_value(d["litellm_params"].get(key)))
            for d in self.deployments
            for key in _SECRET_KEYS
            if _env_value(d["litellm_params"].get(key))
        }
        return sorted(values, key=len, reverse=True)

    def identity(self, group: str) -> dict[str, Any]:
        """What decides a group's answers: its deployments' models and (hashed) endpoints, and its fallbacks'."""

        def of(name: str) -> list[dict[str, Any]]:
            out = []
            for d in self.deployments_of(name):
                params = d["litellm_params"]
                endpoint = {k: str(_env_value(params[k])) for k in ("api_base", "base_url") if params.get(k)}
                out.append({"model": params["model"], "endpoint": _digest(endpoint) if endpoint else None})
            return sorted(out, key=lambda e: (e["model"], e["endpoint"] or ""))

        return {"group": group, "deployments": of(group), "fallbacks": {g: of(g) for g in self.fallback_groups(group)}}


def _read(source: str | os.PathLike) -> Any:
    path = Path(source).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"router config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"router config {path} cannot be read: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"router config {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigurationError(f"router config {path} is not valid YAML: {problem}{where}") from None


def _router_parameters() -> set[str]:
    return set(inspect.signature(_litellm().Router.__init__).parameters) - {"self", "model_list"}


def _routing_strategies() -> tuple[str, ...]:
    try:
        from litellm.types.litellm_params import RoutingStrategyName

        return typing.get_args(RoutingStrategyName)
    except Exception:  # an older LiteLLM: let the Router judge
        return ()


def _check_deployment(i: int, entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where}: model_list[{i}] must be a mapping with model_name and litellm_params")
    name = entry.get("model_name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"{where}: model_list[{i}] has no model_name (the group the deployment serves)")
    params = entry.get("litellm_params")
    if not isinstance(params, Mapping) or not isinstance(params.get("model"), str) or not params["model"].strip():
        raise ConfigurationError(
            f"{where}: model_list[{i}] ({name!r}) needs litellm_params with a model, e.g. "
            "litellm_params: {model: hosted_vllm/NAME, api_base: http://host:8000/v1}"
        )
    info = entry.get("model_info") or {}
    if not isinstance(info, Mapping):
        raise ConfigurationError(f"{where}: model_list[{i}] ({name!r}): model_info must be a mapping")
    for key in _PRICE_KEYS:
        if key in info:
            check_number(f"{where}: model_list[{i}] ({name!r}) model_info.{key}", info[key], 0, unit="dollars")
    for key in ("rpm", "tpm"):
        for holder in (entry, params):
            if key in holder:
                check_int(f"{where}: model_list[{i}] ({name!r}) {key}", holder[key], 1)
    return {**copy.deepcopy(dict(entry)), "litellm_params": copy.deepcopy(dict(params)), "model_info": dict(info)}


def _check_settings(settings: dict[str, Any], groups: list[str], where: str) -> None:
    known = _router_parameters()
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigurationError(
                f"{where}: router_settings has no setting {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + "; see LiteLLM's Router documentation for the settings"
            )
    for key in ("num_retries", "allowed_fails", "max_fallbacks"):
        if settings.get(key) is not None:
            check_int(f"{where}: router_settings.{key}", settings[key], 0)
    for key in ("cooldown_time", "timeout", "retry_after"):
        if settings.get(key) is not None:
            check_number(f"{where}: router_settings.{key}", settings[key], 0, unit="seconds")
    strategy = settings.get("routing_strategy")
    strategies = _routing_strategies()
    if strategy is not None and strategies and strategy not in strategies:
        raise ConfigurationError(
            f"{where}: router_settings.routing_strategy {strategy!r} is not one of LiteLLM's {list(strategies)}"
        )
    for key in _FALLBACK_KEYS[:3]:
        rules = settings.get(key)
        if rules is None:
            continue
        if not isinstance(rules, list) or not all(isinstance(r, Mapping) for r in rules):
            raise ConfigurationError(
                f"{where}: router_settings.{key} must be a list of {{group: [fallback groups]}}, got {rules!r}"
            )
        for rule in rules:
            for source, targets in rule.items():
                if not isinstance(targets, list):
                    raise ConfigurationError(
                        f"{where}: router_settings.{key}: the fallbacks of {source!r} must be a list of groups "
                        f"(LiteLLM requires a list even for one group), got {targets!r}"
                    )
                for name in [source, *targets]:
                    if name not in groups:
                        raise ConfigurationError(
                            f"{where}: router_settings.{key} names {name!r}, which is not a model_name group of "
                            f"the model_list {groups}"
                        )


def load_router_config(source: Mapping[str, Any] | str | os.PathLike | RouterConfig) -> RouterConfig:
    """Read and check a LiteLLM Router config (a dict, or a YAML/JSON file in LiteLLM's proxy-config format).

    ``model_list`` and ``router_settings`` are used; Router settings given under ``litellm_settings`` (as the proxy
    accepts: ``num_retries``, ``fallbacks``, ``request_timeout``, ...) count too, ``router_settings`` winning.

    Raises:
        ConfigurationError: the file is missing or not valid YAML/JSON, ``model_list`` is missing or empty, a
            deployment lacks ``model_name`` or ``litellm_params.model``, a setting is unknown or out of range, or a
            fallback names a group that does not exist. The message names the problem.

    Example:
        >>> config = load_router_config({"model_list": [
        ...     {"model_name": "pool", "litellm_params": {"model": "openai/m", "api_base": "http://a:8000/v1"}},
        ...     {"model_name": "pool", "litellm_params": {"model": "openai/m", "api_base": "http://b:8000/v1"}}]})
        >>> config.groups(), len(config.deployments_of("pool"))
        (['pool'], 2)
    """
    if isinstance(source, RouterConfig):
        return source
    if isinstance(source, Mapping):
        data, where = source, "router config (dict)"
    elif isinstance(source, (str, os.PathLike)):
        data, where = _read(source), f"router config {Path(source).expanduser()}"
    else:
        raise ConfigurationError(
            f"router_config must be a dict or the path of a YAML/JSON file, got {type(source).__name__}"
        )
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"{where} must be a mapping with a model_list (LiteLLM's proxy-config format), got {type(data).__name__}"
        )
    model_list = data.get("model_list")
    if not model_list:
        raise ConfigurationError(
            f"{where} has no model_list: give the deployments as model_list: [{{model_name: GROUP, litellm_params: "
            "{model: PROVIDER/MODEL, api_base: URL}}}, ...] (deployments sharing a model_name form a group)"
        )
    if not isinstance(model_list, list):
        raise ConfigurationError(f"{where}: model_list must be a list of deployments, got {type(model_list).__name__}")
    deployments = tuple(_check_deployment(i, entry, where) for i, entry in enumerate(model_list))
    settings: dict[str, Any] = dict(DEFAULT_SETTINGS)
    litellm_settings = data.get("litellm_settings") or {}
    if not isinstance(litellm_settings, Mapping):
        raise ConfigurationError(f"{where}: litellm_settings must be a mapping")
    settings.update(
        {new: litellm_settings[old] for old, new in _FROM_LITELLM_SETTINGS.items() if old in litellm_settings}
    )
    router_settings = data.get("router_settings") or {}
    if not isinstance(router_settings, Mapping):
        raise ConfigurationError(f"{where}: router_settings must be a mapping, got {type(router_settings).__name__}")
    settings.update(router_settings)
    groups = list(dict.fromkeys(d["model_name"] for d in deployments))
    _check_settings(settings, groups, where)
    return RouterConfig(deployments, settings, where.removeprefix("router config ").strip())


# The Router ----------------------------------------------------------------------------------------------------------

_routers: dict[str, Any] = {}
_routers_lock = threading.Lock()


_known_models: frozenset[str] | None = None


def _priced_by_litellm(model: str, litellm: Any) -> bool:
    """Whether LiteLLM's *shipped* cost map knows ``model``. Not ``litellm.get_model_info``: the Router registers
    every deployment's model_info there, so the answer would change after the first Router was built."""
    global _known_models
    if _known_models is None:
        try:
            _known_models = frozenset(litellm.get_model_cost_map(url=litellm.model_cost_map_url))
        except Exception:
            _known_models = frozenset(litellm.model_cost)
    return model in _known_models or model.split("/", 1)[-1] in _known_models


def _self_hosted(params: Mapping[str, Any], litellm: Any) -> bool:
    """A deployment on the user's own server: an endpoint, and a model LiteLLM has no price for."""
    if not (params.get("api_base") or params.get("base_url")):
        return False
    return not _priced_by_litellm(str(params["model"]), litellm)


def _deployment_id(config: RouterConfig, i: int) -> str:
    """``group#i@<config digest>``: readable, without endpoint, and unique per config -- LiteLLM keeps deployments'
    clients in process-wide caches keyed by id, so two Routers must never share one (the second would get the
    first's clients, or none)."""
    entry = config.deployments[i]
    return str(entry["model_info"].get("id") or f"{entry['model_name']}#{i}@{config.digest()[:12]}")


def _router_model_list(config: RouterConfig, litellm: Any) -> list[dict[str, Any]]:
    """The deployments as the Router takes them: ids from :func:`_deployment_id`, and self-hosted ones declared
    schema-capable, free unless their ``model_info`` gives prices, and given a placeholder key."""
    model_list = []
    for i, entry in enumerate(config.deployments):
        entry = copy.deepcopy(entry)
        info = entry["model_info"]
        info["id"] = _deployment_id(config, i)
        if _self_hosted(entry["litellm_params"], litellm):
            # OpenAI-compatible local servers want some key and never check it (as build_lm does for one server).
            entry["litellm_params"].setdefault("api_key", "sk-local")
            info.setdefault("supports_response_schema", True)
            for key in (*_PRICE_KEYS, "cache_creation_input_token_cost", "cache_read_input_token_cost"):
                info.setdefault(key, 0.0)
        elif any(key in info for key in _PRICE_KEYS):
            info.setdefault("cache_creation_input_token_cost", 0.0)
            info.setdefault("cache_read_input_token_cost", 0.0)
        model_list.append(entry)
    return model_list


def build_router(config: RouterConfig) -> Any:
    """The ``litellm.Router`` of ``config``; one per distinct config in a process, so LMs built from the same config
    (a drafter group and a refiner group, say) share cooldowns and rate-limit counts."""
    key = config.digest()
    with _routers_lock:
        router = _routers.get(key)
        if router is None:
            litellm = _litellm()
            try:
                router = litellm.Router(model_list=_router_model_list(config, litellm), **config.settings)
            except Exception as exc:
                message = str(exc)
                for secret in config.secrets():
                    message = message.replace(secret, "***")
                raise ConfigurationError(f"LiteLLM rejected the router config {config.source}: {message}") from None
            _routers[key] = router
    return router


# The engine ----------------------------------------------------------------------------------------------------------


def _scrub(exc: BaseException, secrets: list[str]) -> BaseException:
    """Remove endpoints and keys from an exception's message (in place)."""

    def clean(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for secret in secrets:
            value = value.replace(secret, "***")
        return value

    exc.args = tuple(clean(a) for a in exc.args)
    if isinstance(getattr(exc, "message", None), str):
        exc.message = clean(exc.message)
    return exc


class RouterEngine:
    """DSPy engine (``complete(Request) -> Response``) that sends every call to one group of a LiteLLM Router.

    Build LMs with :func:`router_lm` (or ``build_lm(group, router_config=...)``) rather than by hand.

    Args:
        router: The ``litellm.Router``.
        config: Its :class:`RouterConfig`.
        group: The ``model_name`` group to call.
        structured: Whether every deployment of the group (and its fallbacks) honours JSON-schema outputs.

    Attributes:
        deployment_calls: Successful calls per deployment, keyed ``"group#i model"`` (no endpoint).
    """

    def __init__(self, router: Any, config: RouterConfig, group: str, structured: bool):
        self.router = router
        self.config = config
        self.group = group
        self.supports_response_schema = structured
        self.deployment_calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._capabilities: tuple[frozenset[str], bool] | None = None

    def __deepcopy__(self, memo: dict) -> RouterEngine:
        return self  # a shared service: Module.deepcopy() must not clone the Router or its counters

    def __repr__(self) -> str:
        return f"RouterEngine(group={self.group!r}, deployments={len(self.config.deployments_of(self.group))})"

    @property
    def fingerprint(self) -> str:
        """Identity of what this group answers with (models and hashed endpoints, never keys): keys the trace store."""
        return "router:" + _digest(self.config.identity(self.group))

    @property
    def model_names(self) -> list[str]:
        """The models behind the group and its fallbacks (what a calibration records it was fitted for)."""
        names = [d["litellm_params"]["model"] for d in self.config.deployments_of(self.group)]
        names += [
            d["litellm_params"]["model"]
            for g in self.config.fallback_groups(self.group)
            for d in self.config.deployments_of(g)
        ]
        return list(dict.fromkeys(names))

    def _capability(self) -> tuple[frozenset[str], bool]:
        """(OpenAI parameters every deployment takes, whether all call functions), looked up once: DSPy's adapters
        read them on every call."""
        if self._capabilities is None:
            litellm = _litellm()
            sets, functions = [], True
            for d in self.config.deployments_of(self.group):
                model = d["litellm_params"]["model"]
                try:
                    sets.append(set(litellm.get_supported_openai_params(model=model) or ()))
                except Exception:
                    sets.append(set())
                try:
                    functions = functions and bool(litellm.supports_function_calling(model=model))
                except Exception:
                    functions = False
            params = set.intersection(*sets) if sets else set()
            if self.supports_response_schema:
                params.add("response_format")
            self._capabilities = (frozenset(params), functions)
        return self._capabilities

    @property
    def supported_params(self) -> frozenset[str]:
        """OpenAI parameters every deployment of the group takes (DSPy's adapters read this)."""
        return self._capability()[0]

    @property
    def supports_function_calling(self) -> bool:
        return self._capability()[1]

    def dump_state(self) -> dict[str, Any]:
        """What DSPy saves for a pinned router LM: the group and its models, never endpoints or keys."""
        return {"group": self.group, "models": self.model_names}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> RouterEngine:
        raise ConfigurationError(
            f"a router LM (group {state.get('group')!r}) cannot be restored from saved state, which holds no "
            "endpoints or keys: build it again with build_lm(group, router_config=...) and set it on the program"
        )

    # Calls -----------------------------------------------------------------------------------------------------

    def _arguments(self, request: Any) -> dict[str, Any]:
        from dspy.clients.engines.base import validate_request
        from dspy.clients.lm15_boundary import request_kwargs

        validate_request(request)
        data = request_kwargs(request, "chat")
        if request.config.top_k is not None:
            data["top_k"] = request.config.top_k  # LiteLLM forwards it to the servers that take it
        if "max_completion_tokens" in data and "max_tokens" not in data:
            # LiteLLM maps max_tokens to what each provider wants; self-hosted servers may ignore the newer name.
            data["max_tokens"] = data.pop("max_completion_tokens")
        data.pop("n", None)
        data.pop("num_retries", None)  # the Router's own setting rules
        return data

    def _finish(self, raw: Any, request: Any) -> Any:
        from dspy.clients.lm15_boundary import response_value

        response = response_value(raw, "chat", request)
        hidden = getattr(raw, "_hidden_params", None) or {}
        deployment = self._deployment(hidden.get("model_id"))
        cost = hidden.get("response_cost")
        if cost is None and deployment is not None:
            cost = self._price(deployment, response.usage)
        label = f"{deployment['label']} {deployment['litellm_params']['model']}" if deployment else "unknown"
        with self._lock:
            self.deployment_calls[label] += 1
        record_cost(request.model, None if cost is None else float(cost))
        extra = {"markovscale": {"deployment": label, "cost": cost}}
        return replace(response, provider_data={**(response.provider_data or {}), **extra})

    def _deployment(self, model_id: Any) -> dict[str, Any] | None:
        """The deployment LiteLLM says answered, with its readable ``label`` (``group#i``, or the user's id)."""
        if model_id is None:
            return None
        for i, d in enumerate(self.config.deployments):
            if _deployment_id(self.config, i) == str(model_id):
                label = str(d["model_info"].get("id") or f"{d['model_name']}#{i}")
                return {**d, "label": label}
        return None

    @staticmethod
    def _price(deployment: dict[str, Any], usage: Any) -> float | None:
        info = deployment["model_info"]
        if not all(key in info for key in _PRICE_KEYS) or usage.input_tokens is None or usage.output_tokens is None:
            return None
        return info["input_cost_per_token"] * usage.input_tokens + info["output_cost_per_token"] * usage.output_tokens

    def complete(self, request: Any) -> Any:
        from dspy.clients.engines.litellm_errors import litellm_errors

        data = self._arguments(request)
        try:
            with litellm_errors(model=request.model):
                raw = self.router.completion(model=self.group, **data)
        except Exception as exc:
            raise _scrub(exc, self.config.secrets()) from None
        return self._finish(raw, request)

    def stream(self, request: Any) -> Iterator[Any]:
        from dspy.clients.engines.litellm_engine import _ChatStream
        from dspy.clients.engines.litellm_errors import litellm_errors

        data = self._arguments(request)
        codec = _ChatStream(request)
        try:
            with litellm_errors(model=request.model):
                source = self.router.completion(
                    model=self.group, **data, stream=True, stream_options={"include_usage": True}
                )
                for chunk in source:
                    yield from codec.feed(chunk)
        except Exception as exc:
            raise _scrub(exc, self.config.secrets()) from None
        end = codec.finish(_litellm())
        record_cost(request.model, None)  # a stream does not say which deployment answered, so its price is unknown
        yield end

    def close(self) -> None:
        """Nothing to release: the Router is shared by every LM built from its config."""


class AsyncRouterEngine:
    """Async twin of :class:`RouterEngine` (``Router.acompletion``); shares its Router and counters."""

    def __init__(self, engine: RouterEngine):
        self.engine = engine

    def __deepcopy__(self, memo: dict) -> AsyncRouterEngine:
        return self

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncRouterEngine:
        RouterEngine.load_state(state)
        raise AssertionError("unreachable")

    async def complete(self, request: Any) -> Any:
        from dspy.clients.engines.litellm_errors import litellm_errors

        engine = self.engine
        data = engine._arguments(request)
        try:
            with litellm_errors(model=request.model):
                raw = await engine.router.acompletion(model=engine.group, **data)
        except Exception as exc:
            raise _scrub(exc, engine.config.secrets()) from None
        return engine._finish(raw, request)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        from dspy.clients.engines.litellm_engine import _ChatStream
        from dspy.clients.engines.litellm_errors import litellm_errors

        engine = self.engine
        data = engine._arguments(request)
        codec = _ChatStream(request)
        try:
            with litellm_errors(model=request.model):
                source = await engine.router.acompletion(
                    model=engine.group, **data, stream=True, stream_options={"include_usage": True}
                )
                async for chunk in source:
                    for event in codec.feed(chunk):
                        yield event
        except Exception as exc:
            raise _scrub(exc, engine.config.secrets()) from None
        end = codec.finish(_litellm())
        record_cost(request.model, None)
        yield end

    async def aclose(self) -> None:
        """Nothing to release (see :meth:`RouterEngine.close`)."""


def _structured(config: RouterConfig, group: str, litellm: Any) -> bool:
    """Every deployment the group may reach honours JSON-schema outputs (self-hosted ones are declared so)."""
    for name in [group, *config.fallback_groups(group)]:
        for d in config.deployments_of(name):
            params, info = d["litellm_params"], d["model_info"]
            if info.get("supports_response_schema") is not None:
                if not info["supports_response_schema"]:
                    return False
                continue
            if _self_hosted(params, litellm):
                continue
            try:
                if not litellm.supports_response_schema(model=params["model"]):
                    return False
            except Exception:
                return False
    return True


def router_lm(
    group: str,
    router_config: Mapping[str, Any] | str | os.PathLike | RouterConfig,
    *,
    structured: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A ``dspy.LM`` named ``router/<group>`` whose calls go through a LiteLLM Router to the deployments of ``group``.

    Args:
        group: The ``model_name`` group to call.
        router_config: A dict, a YAML/JSON path or a :class:`RouterConfig` (see :func:`load_router_config`).
        structured: Declare JSON-schema outputs; default: yes when every deployment the group can reach (fallbacks
            included) is self-hosted or known to LiteLLM to support them.
        **kwargs: Passed to ``dspy.LM`` (``temperature``, ``max_tokens``, ``cache``, ...). ``num_retries`` sets the
            Router's retries (overriding the config); the LM itself always gets ``num_retries=0``.

    Raises:
        ConfigurationError: a bad config (see :func:`load_router_config`) or an unknown group.
    """
    import dspy

    config = load_router_config(router_config)
    config.require_group(group)
    for key in ("api_key", "api_base", "base_url"):
        if kwargs.get(key) is not None:
            raise ConfigurationError(
                f"{key} belongs to each deployment's litellm_params in the router config, not to build_lm"
            )
        kwargs.pop(key, None)
    retries = kwargs.pop("num_retries", None)
    if retries is not None:
        check_int("num_retries", retries, 0)
        config = RouterConfig(config.deployments, {**config.settings, "num_retries": retries}, config.source)
    router = build_router(config)
    if structured is None:
        structured = _structured(config, group, _litellm())
    engine = RouterEngine(router, config, group, bool(structured))
    return dspy.LM(
        ROUTER_PREFIX + group, engine=engine, async_engine=AsyncRouterEngine(engine), num_retries=0, **kwargs
    )
