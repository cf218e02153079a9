"""Translation between the OpenAI chat-completions and Anthropic messages wire formats.

Pure package: no aiohttp, no I/O, no logging; bodies pass through it and go nowhere else.
Requests, whole responses, error bodies and SSE streams, in both directions.
"""

from proxyd.protocol.translate.anthropic_to_openai import messages_request_to_chat
from proxyd.protocol.translate.common import (
    ANTHROPIC_MESSAGES_PATH,
    ANTHROPIC_VERSION,
    OPENAI_CHAT_PATH,
    UpstreamRequest,
)
from proxyd.protocol.translate.openai_to_anthropic import (
    chat_request_to_messages,
    stream_include_usage,
)
from proxyd.protocol.translate.response_to_anthropic import (
    openai_completion_to_anthropic,
    openai_error_to_anthropic,
)
from proxyd.protocol.translate.response_to_openai import (
    anthropic_error_to_openai,
    anthropic_message_to_openai,
)
from proxyd.protocol.translate.stream_to_anthropic import OpenAIToAnthropicStream
from proxyd.protocol.translate.stream_to_openai import AnthropicToOpenAIStream
from proxyd.protocol.usage import Usage

__all__ = [
    "ANTHROPIC_MESSAGES_PATH",
    "ANTHROPIC_VERSION",
    "OPENAI_CHAT_PATH",
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "UpstreamRequest",
    "Usage",
    "anthropic_error_to_openai",
    "anthropic_message_to_openai",
    "chat_request_to_messages",
    "messages_request_to_chat",
    "openai_completion_to_anthropic",
    "openai_error_to_anthropic",
    "stream_include_usage",
]
