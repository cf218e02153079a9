"""A local mock LLM provider (OpenAI and Anthropic wire formats) for `make run`, tests, benchmarks.

Streams deterministic text on one shared deadline-paced timer with pre-serialised event bytes, so
thousands of streams cost little. It never calls the network and never logs a body.
"""

from __future__ import annotations

from proxyd.mockprovider.app import create_mock_app, main
from proxyd.mockprovider.common import (
    CONFIG_KEY,
    MODELS,
    WORDS,
    MockConfig,
    mock_text,
    prompt_tokens,
)

__all__ = [
    "CONFIG_KEY",
    "MODELS",
    "WORDS",
    "MockConfig",
    "create_mock_app",
    "main",
    "mock_text",
    "prompt_tokens",
]
