"""What to send a channel for a call, and how its answer becomes the client's, native or translated.

Pure module: no aiohttp, no I/O. A native exchange passes bytes through untouched (apart from the
model name and the usage request DESIGN.md allows); a translated one goes through `translate`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from proxyd.errors import ErrorType, ProxydError
from proxyd.protocol import anthropic as anthropic_wire
from proxyd.protocol import openai as openai_wire
from proxyd.protocol import translate
from proxyd.protocol.call import Call, injects_usage, native_body
from proxyd.protocol.translate.common import ANTHROPIC_VERSION
from proxyd.protocol.usage import StreamUsage, Usage, is_usage_only_chunk
from proxyd.state.store import Channel
from proxyd.upstream.failures import AttemptKind

# Client request headers passed on to an Anthropic channel (the rest are the operator's business).
_ANTHROPIC_PASS = ("anthropic-version", "anthropic-beta")
# OpenAI adds this to every chunk of a stream that asked for usage; inside a JSON string the
# quotes would be escaped, so the raw bytes only ever match the field itself.
_NULL_USAGE = b',"usage":null'
KEEP_BYTES = 2048


class StreamTransform:
    """Turns upstream SSE events into the client's; the native one passes them through."""

    def __init__(self, call: Call) -> None:
        self.call = call
        # Fed what the client received, for usage and estimates. It keeps references to the
        # first KEEP_BYTES of delivered events only; past that it counts bytes and an estimate
        # is scaled up by delivered/kept (per open stream this is most of proxyd's memory).
        self.scanner = StreamUsage(keep_bytes=KEEP_BYTES)
        self._strip = injects_usage(call)

    def feed(self, events: list[bytes]) -> list[bytes]:
        """The client events for these upstream events (the same objects when native)."""
        scanner = self.scanner
        for event in events:
            scanner.feed(event)
        if self._strip:  # undo what asking for usage changed: the usage chunk, "usage":null
            return [e.replace(_NULL_USAGE, b"") for e in events if not is_usage_only_chunk(e)]
        return events

    def finish(self) -> tuple[list[bytes], bool]:
        """Events to send at the upstream's end, and whether the answer was complete."""
        return [], True

    def fail(self, err: ProxydError) -> list[bytes]:
        """The error event that ends the client's stream."""
        if self.call.endpoint.protocol == "anthropic":
            return [anthropic_wire.error_event(err)]
        return [openai_wire.error_event(err)]

    def usage(self) -> Usage | None:
        """The provider's complete counts, or None (the record step then estimates)."""
        return None  # native streams: the scanner holds them


class TranslatedStream(StreamTransform):
    """Runs a translator between an upstream of the other protocol and the client."""

    def __init__(
        self,
        call: Call,
        translator: translate.AnthropicToOpenAIStream | translate.OpenAIToAnthropicStream,
    ) -> None:
        super().__init__(call)
        self._strip = False
        self.translator = translator

    def feed(self, events: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for event in events:
            out.extend(self.translator.feed(event))
        for event in out:
            self.scanner.feed(event)
        return out

    def finish(self) -> tuple[list[bytes], bool]:
        out = self.translator.finish()
        return out, self.translator.completed and self.translator.upstream_error is None

    def fail(self, err: ProxydError) -> list[bytes]:
        return self.translator.fail(err.message)

    def usage(self) -> Usage | None:
        return self.translator.usage if self.translator.completed else None


class Exchange:
    """One call on one channel: the request to send and the conversions of the answer."""

    def __init__(self, call: Call, channel: Channel, default_max_tokens: int) -> None:
        self.call = call
        self.channel = channel
        self.translated = channel.type != call.endpoint.protocol
        self.upstream_model = channel.upstream_model(call.model)
        self._default_max_tokens = default_max_tokens

    def request(
        self, credential: str, client_headers: Mapping[str, str]
    ) -> tuple[str, dict[str, str], bytes]:
        """URL, headers and body; raises InvalidRequest when a feature cannot be translated."""
        call, channel = self.call, self.channel
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if self.translated:
            if channel.type == "anthropic":
                req = translate.chat_request_to_messages(
                    call.body,
                    upstream_model=self.upstream_model,
                    default_max_tokens=self._default_max_tokens,
                )
            else:
                req = translate.messages_request_to_chat(
                    call.body,
                    upstream_model=self.upstream_model,
                    max_tokens_field=channel.max_tokens_field,
                )
            url, body = channel.base_url + req.path, req.payload()
            headers.update(req.headers)
        else:
            body = native_body(call, self.upstream_model)
            url = channel.base_url + call.endpoint.upstream_suffix
            if call.query:  # as the client sent it (Claude Code's `?beta=true`)
                url += "?" + call.query
        if channel.type == "anthropic":
            headers["x-api-key"] = credential
            headers["anthropic-version"] = ANTHROPIC_VERSION
            headers.update({n: v for n in _ANTHROPIC_PASS if (v := client_headers.get(n))})
        else:
            headers["Authorization"] = "Bearer " + credential
        if call.stream:
            headers["Accept"] = "text/event-stream"
        headers.update(channel.headers)
        return url, headers, body

    def body(self, raw: bytes) -> tuple[bytes, Usage | None]:
        """A successful non-stream body translated for the client, and the usage it reports.

        A native body needs no call: it goes out as it came, its usage read after sending.
        """
        if self.channel.type == "anthropic":
            out, usage = translate.anthropic_message_to_openai(
                raw, model=self.call.model, created=int(time.time())
            )
            return out, usage
        return translate.openai_completion_to_anthropic(raw, model=self.call.model)

    def error_body(self, status: int, raw: bytes) -> bytes:
        """An upstream error body in the client's format (unchanged when native)."""
        if not self.translated:
            return raw
        if self.channel.type == "anthropic":
            return translate.anthropic_error_to_openai(status, raw)
        return translate.openai_error_to_anthropic(status, raw)

    def stream(self) -> StreamTransform:
        """The per-stream transform for a streamed answer."""
        if not self.translated:
            return StreamTransform(self.call)
        if self.channel.type == "anthropic":
            return TranslatedStream(
                self.call,
                translate.AnthropicToOpenAIStream(
                    model=self.call.model,
                    created=int(time.time()),
                    include_usage=self.call.wants_usage,
                ),
            )
        return TranslatedStream(self.call, translate.OpenAIToAnthropicStream(model=self.call.model))


def stream_failure(kind: AttemptKind) -> ProxydError:
    """The error a client sees when the upstream broke off an answer it had started
    (STALLED: nothing arrived in time; anything else: the connection broke)."""
    timeout = kind is AttemptKind.STALLED
    return ProxydError(
        "The upstream provider stopped responding mid-stream."
        if timeout
        else "The upstream provider closed the stream before it was complete.",
        status=504 if timeout else 502,
        error_type=ErrorType.UPSTREAM_TIMEOUT if timeout else ErrorType.UPSTREAM_RESET,
    )
