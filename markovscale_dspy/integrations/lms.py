"""Build a ``dspy.LM`` for any model: hosted providers, vLLM, Ollama, llama.cpp or the embedded local model.

Calls go through LiteLLM (``engine="litellm"``) by default, as most users' stacks do. Small and unknown models need
one more thing to answer DSPy's structured prompts reliably: the server must be asked for *schema-constrained*
JSON (``response_format: json_schema``), which llama.cpp and vLLM enforce by grammar. LiteLLM only sends it for
models it knows support it, so :func:`declare_structured_outputs` tells LiteLLM (and DSPy's native engine) so.

With ``router_config=``, the LM calls a group of deployments through LiteLLM's Router instead (load balancing,
retries, fallbacks, cooldowns; see :mod:`markovscale_dspy.integrations.routing`). A LiteLLM *proxy* needs nothing
special: it is an OpenAI-compatible server, so ``build_lm("openai/<model_name>", api_base="http://proxy:4000")``.

Secrets: ``api_key`` is read from the argument or the environment and handed to ``dspy.LM``; DSPy never writes it
to saved state, and this package never logs or reports it (nor ``api_base``, which may embed credentials).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import dspy

from markovscale_dspy._exceptions import ConfigurationError
from markovscale_dspy.integrations.routing import RouterConfig, router_lm
from markovscale_dspy.usage import register_price

__all__ = ["ROUTES", "build_lm", "declare_structured_outputs", "redact"]

#: How calls reach the server: through LiteLLM, or through DSPy 3.4's native engine.
ROUTES = ("litellm", "native")

_NATIVE_PROVIDER = "llamacpp"
_lock = threading.Lock()
_declared: set[str] = set()


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _model_name(model: str) -> str:
    return model.split("/", 1)[1] if "/" in model else model


def declare_structured_outputs(model: str) -> None:
    """Tell LiteLLM that ``model`` (e.g. ``"openai/smollm2"``) honours ``response_format: json_schema``.

    Without it, DSPy's JSONAdapter asks unknown models for free-form JSON only, which small models get wrong most of
    the time (measured: 1 of 20 answers parsed on SmolLM2-135M; 20 of 20 with the schema).
    """
    with _lock:
        if model in _declared:
            return
        import litellm

        provider = model.split("/", 1)[0] if "/" in model else "openai"
        # Keyed by the full "provider/name" string: a bare name makes LiteLLM print a provider-lookup error.
        # Zero prices: LiteLLM knows nothing about a self-hosted model's cost (and warns when cache prices lack).
        zero = dict.fromkeys(
            (
                "input_cost_per_token",
                "output_cost_per_token",
                "cache_creation_input_token_cost",
                "cache_read_input_token_cost",
            ),
            0.0,
        )
        litellm.register_model(
            {model: {"litellm_provider": provider, "mode": "chat", "supports_response_schema": True, **zero}}
        )
        register_price(model, 0.0, 0.0)
        _declared.add(model)


def _register_native_provider() -> None:
    with _lock:
        if _NATIVE_PROVIDER in _declared:
            return
        from dspy.lm15 import (
            AccessPolicy,
            EndpointSupport,
            ModelSupport,
            OpenAIChatCompat,
            ProviderDefinition,
            register_provider,
        )

        register_provider(
            ProviderDefinition.chat(
                AccessPolicy(
                    provider=_NATIVE_PROVIDER,
                    supports=EndpointSupport(complete=True, stream=True, models=True),
                    auth_modes=("bearer",),
                    base_url="http://127.0.0.1:8080/v1",
                ),
                compat=OpenAIChatCompat.preset("vllm"),
                placeholder_key="EMPTY",
            ),
            supports=ModelSupport(response_schema=True, function_calling=False, reasoning=False),
        )
        _declared.add(_NATIVE_PROVIDER)


def _require_provider_key(model: str) -> None:
    """A hosted model with no key anywhere fails now, naming the variable, instead of at every call (LiteLLM reports
    a missing key as a retryable server error, so a calibration would retry it on every chain)."""
    import litellm

    try:
        missing = litellm.validate_environment(model=model).get("missing_keys") or []
    except Exception:  # a model LiteLLM cannot place: let the first call say what is wrong
        return
    keys = [name for name in missing if name.endswith("_API_KEY")]
    if keys:
        raise ConfigurationError(
            f"{model!r} needs an API key and none is set: export {' or '.join(keys)} (or MARKOVSCALE_API_KEY), pass "
            "api_key= (CLI: --api-key-env VAR), or give api_base= for a self-hosted server"
        )


def build_lm(
    model: str,
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    route: str = "litellm",
    structured: bool | None = None,
    router_config: dict[str, Any] | str | os.PathLike | RouterConfig | None = None,
    **kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` for a LiteLLM model string, with endpoint and key from arguments or the environment.

    Args:
        model: LiteLLM model string: ``openai/NAME`` or ``hosted_vllm/NAME`` (OpenAI-compatible servers: llama.cpp,
            vLLM, SGLang), ``ollama_chat/NAME``, or a hosted model (``openai/gpt-4o-mini``, ``anthropic/...``).
            With ``router_config``, the ``model_name`` group to call.
        api_base: Server URL; defaults to ``$MARKOVSCALE_API_BASE`` (then the provider's own default).
        api_key: Key; defaults to ``$MARKOVSCALE_API_KEY``, then the provider's usual variable (``OPENAI_API_KEY``,
            ...); local servers get a placeholder.
        route: ``"litellm"`` (default) or ``"native"`` (DSPy's own engine; OpenAI-compatible servers only).
        structured: Declare that the model honours JSON-schema outputs. Default: yes when ``api_base`` is set (a
            self-hosted server: llama.cpp and vLLM enforce schemas by grammar), no for hosted models, which LiteLLM
            already knows.
        router_config: A LiteLLM Router config (dict, YAML/JSON path in LiteLLM's proxy-config format): the LM, named
            ``router/<model>``, calls that group through ``litellm.Router``. Endpoints and keys then come from the
            config's deployments only; the Router owns retries (``num_retries`` sets them, the LM gets 0).
        **kwargs: Passed to ``dspy.LM`` (``temperature``, ``max_tokens``, ``cache``, ``num_retries``, ...).

    Example:
        >>> lm = build_lm("pool", router_config={"model_list": [
        ...     {"model_name": "pool", "litellm_params": {"model": "openai/m", "api_base": "http://a:8000/v1"}},
        ...     {"model_name": "pool", "litellm_params": {"model": "openai/m", "api_base": "http://b:8000/v1"}}]})
        >>> lm.model, lm.num_retries, lm.supports_response_schema
        ('router/pool', 0, True)
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigurationError(f"model must be a LiteLLM model string such as 'openai/gpt-4o-mini', got {model!r}")
    if router_config is not None:
        if api_base is not None or api_key is not None or route != "litellm":
            raise ConfigurationError(
                "with router_config, endpoints and keys belong to the deployments' litellm_params and calls go "
                "through the Router: drop api_base, api_key and route"
            )
        return router_lm(model, router_config, structured=structured, **kwargs)
    if route not in ROUTES:
        raise ConfigurationError(f"route must be one of {ROUTES}, got {route!r}")
    api_base = api_base or os.environ.get("MARKOVSCALE_API_BASE") or None
    api_key = api_key or os.environ.get("MARKOVSCALE_API_KEY") or None
    if structured is None:
        structured = api_base is not None
    if route == "native":
        if api_base is None:
            raise ConfigurationError("route='native' talks to an OpenAI-compatible server: pass api_base")
        if structured:
            _register_native_provider()
            register_price(f"{_NATIVE_PROVIDER}/{_model_name(model)}", 0.0, 0.0)
            keyed = {"api_key": api_key} if api_key else {}  # an explicit None would count as an empty key
            return dspy.LM(f"{_NATIVE_PROVIDER}/{_model_name(model)}", api_base=api_base, **keyed, **kwargs)
        return dspy.LM(model, api_base=api_base, api_key=api_key or "EMPTY", **kwargs)
    if structured:
        declare_structured_outputs(model)
    if api_base is None and api_key is None:
        _require_provider_key(model)
    if api_base is not None and api_key is None:
        api_key = "sk-local"  # OpenAI-compatible local servers want some key; it is never checked
    extra = {"api_base": api_base} if api_base else {}
    if api_key:
        extra["api_key"] = api_key
    return dspy.LM(model, engine="litellm", **extra, **kwargs)
