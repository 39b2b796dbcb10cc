"""Integrations beside the layers: LMs (LiteLLM), the embedded llama.cpp server, bundled datasets."""
