"""build_lm: any LiteLLM model string, endpoint and key from arguments or environment, no network needed."""

import pytest

from markovscale_dspy import ConfigurationError
from markovscale_dspy.integrations.lms import build_lm, redact


def test_litellm_route_is_the_default():
    lm = build_lm("hosted_vllm/qwen", api_base="http://localhost:8000/v1")
    assert lm.model == "hosted_vllm/qwen" and lm.kwargs["api_base"] == "http://localhost:8000/v1"
    from dspy.clients.backend_selection import select_backend

    assert select_backend(lm).native is False


def test_self_hosted_models_are_declared_schema_capable():
    import litellm

    build_lm("openai/my-local-model", api_base="http://localhost:8080/v1")
    assert litellm.supports_response_schema(model="openai/my-local-model", custom_llm_provider="openai")


def test_json_adapter_asks_self_hosted_models_for_a_schema():
    lm = build_lm("hosted_vllm/another-model", api_base="http://localhost:8000/v1")
    assert lm.supports_response_schema and "response_format" in lm.supported_params


def test_api_base_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MARKOVSCALE_API_BASE", "http://gpu-box:8000/v1")
    monkeypatch.setenv("MARKOVSCALE_API_KEY", "sk-test-123")
    lm = build_lm("hosted_vllm/qwen")
    assert lm.kwargs["api_base"] == "http://gpu-box:8000/v1" and lm.kwargs["api_key"] == "sk-test-123"


def test_local_servers_get_a_placeholder_key():
    assert build_lm("openai/x", api_base="http://127.0.0.1:9/v1").kwargs["api_key"] == "sk-local"


def test_hosted_models_keep_the_provider_key_lookup(monkeypatch):
    monkeypatch.delenv("MARKOVSCALE_API_BASE", raising=False)
    monkeypatch.delenv("MARKOVSCALE_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-example")
    lm = build_lm("anthropic/claude-3-5-haiku-latest")
    assert "api_key" not in lm.kwargs and "api_base" not in lm.kwargs


def test_a_hosted_model_without_any_key_fails_when_built(monkeypatch):
    """LiteLLM would report the missing key as a retryable server error at every call: say it now."""
    for name in ("MARKOVSCALE_API_BASE", "MARKOVSCALE_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="needs an API key and none is set: export ANTHROPIC_API_KEY"):
        build_lm("anthropic/claude-3-5-haiku-latest")


def test_saved_lm_state_never_holds_the_key():
    lm = build_lm("hosted_vllm/qwen", api_base="http://localhost:8000/v1", api_key="sk-SECRET-42")
    assert "sk-SECRET-42" not in str(lm.dump_state())


def test_native_route_uses_a_schema_capable_provider():
    from dspy.clients.backend_selection import select_backend

    lm = build_lm("openai/smollm2", api_base="http://127.0.0.1:9/v1", route="native")
    assert lm.model == "llamacpp/smollm2" and lm.supports_response_schema and select_backend(lm).native


def test_native_route_needs_an_api_base(monkeypatch):
    monkeypatch.delenv("MARKOVSCALE_API_BASE", raising=False)
    with pytest.raises(ConfigurationError, match="route='native' talks to an OpenAI-compatible server"):
        build_lm("openai/x", route="native")


def test_unknown_route_is_named():
    with pytest.raises(ConfigurationError, match="route must be one of .* got 'grpc'"):
        build_lm("openai/x", route="grpc")


def test_empty_model_is_rejected():
    with pytest.raises(ConfigurationError, match="model must be a LiteLLM model string"):
        build_lm("")


def test_redact_hides_secrets():
    assert redact("key sk-1 at http://u:p@host", "sk-1", "http://u:p@host", None) == "key *** at ***"
