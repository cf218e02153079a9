"""Token usage as the provider reports it: response bodies and streamed SSE events.

Pure module: no I/O, no aiohttp. Streams are scanned with a bytes search first; only the few
events that carry a usage object are JSON-parsed. Bodies are never logged or kept beyond a stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

_USAGE = b'"usage"'
_EMPTY_CHOICES = (b'"choices":[]', b'"choices": []')
_FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass(slots=True)
class Usage:
    """Token counts of one request, as parts of the whole prompt and the whole completion.

    `prompt_tokens` is the whole prompt (plain input, cache reads, cache writes, audio);
    `cached_tokens` the cache reads and `cache_write_tokens` all cache writes within it,
    `cache_write_1h_tokens` the 1-hour part of those. `completion_tokens` is the whole output
    (reasoning, audio and image output within it). `service_tier` is the priced tier that served
    the request (None: standard); `tool_calls` counts paid server-tool calls by tool.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_output_tokens: int = 0
    service_tier: str | None = None
    tool_calls: dict[str, int] = field(default_factory=dict)

    @property
    def tool_call_count(self) -> int:
        """All paid server-tool calls."""
        return sum(self.tool_calls.values()) if self.tool_calls else 0


def _int(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


# Tiers a response names that are the standard price (not a `tiers` entry).
STANDARD_TIERS = frozenset({"default", "auto", "standard", "standard_only"})
# Anthropic `usage.server_tool_use` counters and the `per_call` tool each one is.
_ANTHROPIC_TOOLS = (("web_search_requests", "web_search"), ("web_fetch_requests", "web_fetch"))
# Responses API output items that are paid server-tool calls, and their `per_call` tool.
RESPONSES_TOOL_ITEMS = {
    "web_search_call": "web_search",
    "image_generation_call": "image_generation",
    "file_search_call": "file_search",
}


def tier_name(value: object) -> str | None:
    """A reported service tier as a `tiers` key; None for the standard price."""
    if not isinstance(value, str) or not value or value in STANDARD_TIERS:
        return None
    return value


def _sub(u: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = u.get(key)
    if type(v) is dict:  # what orjson makes: no ABC check (isinstance(v, Mapping) is slow)
        return v
    return v if isinstance(v, Mapping) else _NONE


_NONE: Mapping[str, Any] = {}


def parse_usage(u: Mapping[str, Any]) -> Usage:
    """One provider `usage` object, whatever its dialect, as a Usage.

    - OpenAI chat/completions/embeddings: prompt_tokens (cache included), completion_tokens,
      prompt_tokens_details.{cached_tokens, cache_write_tokens, audio_tokens},
      completion_tokens_details.{reasoning_tokens, audio_tokens}. DeepSeek adds
      prompt_cache_hit_tokens / prompt_cache_miss_tokens (hits are cache reads). When
      total_tokens exceeds prompt + completion (reasoning reported outside the completion), the
      difference counts as output.
    - OpenAI Responses: input_tokens (cache included), output_tokens,
      input_tokens_details.{cached_tokens, cache_write_tokens, audio_tokens},
      output_tokens_details.{reasoning_tokens, audio_tokens, image_tokens}.
    - Anthropic: input_tokens excludes the cache, so the prompt is input_tokens +
      cache_read_input_tokens + cache_creation_input_tokens; cache writes split by
      cache_creation.ephemeral_{5m,1h}_input_tokens (a remainder counts as 5-minute);
      server_tool_use counts paid tool calls; `speed: "fast"` is the `fast` tier.
    Cache writes with no TTL given are 5-minute writes. The shape decides the dialect.
    """
    if "prompt_tokens" in u or "completion_tokens" in u:
        # Every answer of the OpenAI dialect runs this: `_int` written out where it is read
        # (a positive int, else 0), a call less per count (9 of them: ~1/3 of the parse).
        get = u.get
        v = get("prompt_tokens")
        prompt = v if type(v) is int and v > 0 else 0
        v = get("completion_tokens")
        completion = v if type(v) is int and v > 0 else 0
        v = get("total_tokens")
        if type(v) is int and v > prompt + completion:
            completion = v - prompt
        v = get("prompt_cache_hit_tokens")  # DeepSeek
        cached = v if type(v) is int and v > 0 else 0
        write = audio_in = reasoning = audio_out = 0
        pd = get("prompt_tokens_details")
        if pd and (type(pd) is dict or isinstance(pd, Mapping)):
            v = pd.get("cached_tokens")
            if type(v) is int and v > 0:
                cached = v
            v = pd.get("cache_write_tokens")
            write = v if type(v) is int and v > 0 else 0
            v = pd.get("audio_tokens")
            audio_in = v if type(v) is int and v > 0 else 0
        cd = get("completion_tokens_details")
        if cd and (type(cd) is dict or isinstance(cd, Mapping)):
            v = cd.get("reasoning_tokens")
            reasoning = v if type(v) is int and v > 0 else 0
            v = cd.get("audio_tokens")
            audio_out = v if type(v) is int and v > 0 else 0
        tier = get("service_tier")
        # positional (a call with keywords costs more): prompt, completion, cached, reasoning,
        # cache_write, cache_write_1h, audio_input, audio_output, image_output, service_tier
        return Usage(
            prompt,
            completion,
            cached,
            reasoning,
            write,
            0,
            audio_in,
            audio_out,
            0,
            None if tier is None else tier_name(tier),
        )
    if "cache_creation_input_tokens" in u or "cache_read_input_tokens" in u or "speed" in u:
        return _anthropic(u)
    idt = _sub(u, "input_tokens_details")
    odt = _sub(u, "output_tokens_details")
    if idt or odt or "total_tokens" in u:  # Responses API
        prompt = _int(u.get("input_tokens"))
        completion = max(_int(u.get("output_tokens")), _int(u.get("total_tokens")) - prompt)
        return Usage(
            prompt,
            completion,
            _int(idt.get("cached_tokens")),
            _int(odt.get("reasoning_tokens")),
            cache_write_tokens=_int(idt.get("cache_write_tokens")),
            audio_input_tokens=_int(idt.get("audio_tokens")),
            audio_output_tokens=_int(odt.get("audio_tokens")),
            image_output_tokens=_int(odt.get("image_tokens")),
            service_tier=tier_name(u.get("service_tier")),
        )
    return _anthropic(u)


def _anthropic(u: Mapping[str, Any]) -> Usage:
    read = _int(u.get("cache_read_input_tokens"))
    write = _int(u.get("cache_creation_input_tokens"))
    split = _sub(u, "cache_creation")
    w1h = min(_int(split.get("ephemeral_1h_input_tokens")), write)
    tools = _sub(u, "server_tool_use")
    calls = {t: n for k, t in _ANTHROPIC_TOOLS if (n := _int(tools.get(k)))} if tools else {}
    return Usage(
        _int(u.get("input_tokens")) + read + write,
        _int(u.get("output_tokens")),
        read,
        0,
        cache_write_tokens=write,
        cache_write_1h_tokens=w1h,
        service_tier="fast" if u.get("speed") == "fast" else None,
        tool_calls=calls,
    )


def responses_tool_calls(output: object) -> dict[str, int]:
    """Paid server-tool calls among a Responses API answer's output items."""
    calls: dict[str, int] = {}
    for item in _blocks(output):
        tool = RESPONSES_TOOL_ITEMS.get(item.get("type"))  # type: ignore[arg-type]
        if tool is not None:
            calls[tool] = calls.get(tool, 0) + 1
    return calls


def usage_of_answer(obj: Mapping[str, Any]) -> Usage | None:
    """The usage of a whole answer object (chat, completions, responses, messages).

    Adds what sits beside the usage object: OpenAI's `service_tier` and the Responses API's
    tool-call output items.
    """
    u = obj.get("usage")
    if type(u) is not dict and not isinstance(u, Mapping):  # dict first: the ABC check is slow
        return None
    usage = parse_usage(u)
    if usage.service_tier is None and "service_tier" in obj:
        usage.service_tier = tier_name(obj["service_tier"])
    if "output" in obj:
        calls = responses_tool_calls(obj.get("output"))
        if calls:
            usage.tool_calls = calls
    return usage


def usage_from_body(body: bytes | Mapping[str, Any]) -> Usage | None:
    """Usage of a non-stream response (chat, completions, embeddings, responses, messages)."""
    try:
        obj = orjson.loads(body) if isinstance(body, bytes | bytearray | memoryview) else body
    except orjson.JSONDecodeError:
        return None
    return usage_of_answer(obj) if type(obj) is dict or isinstance(obj, Mapping) else None


def event_data(event: bytes) -> bytes | None:
    """The payload of one SSE event: its data lines joined by newlines, or None."""
    parts = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


def has_usage_object(event: bytes) -> bool:
    """Cheap test (one reverse bytes search) that an event carries a non-null usage object.

    A usage object is a key, so it is never inside a JSON string, where quotes are escaped.
    """
    i = event.rfind(_USAGE)
    return i >= 0 and event.find(b"{", i + 7, i + 10) >= 0


def is_usage_only_chunk(event: bytes) -> bool:
    """True for OpenAI's extra usage chunk (`"choices":[]` with a usage object).

    The relay drops it when proxyd itself asked for `stream_options.include_usage`.
    """
    return has_usage_object(event) and (_EMPTY_CHOICES[0] in event or _EMPTY_CHOICES[1] in event)


def _merge(into: dict[str, Any], u: Mapping[str, Any]) -> None:
    """Fold a usage object into the running one; counts are cumulative, so keep the largest."""
    for k, v in u.items():
        if type(v) is int:
            old = into.get(k)
            into[k] = max(v, old) if type(old) is int else v
        elif isinstance(v, Mapping):
            sub = into.get(k)
            if not isinstance(sub, dict):
                sub = into[k] = {}
            _merge(sub, v)
        elif type(v) is str:  # Anthropic `speed`, `service_tier`
            into[k] = v


class StreamUsage:
    """Per-stream usage scanner: the relay feeds it each complete SSE event it delivered.

    `feed()` costs a list append and one reverse bytes search unless the event carries a usage
    object. To estimate when usage never comes, it keeps *references* to the delivered event
    bytes (the relay allocated them anyway; nothing is copied or decoded) up to `keep_bytes`
    in total; past that it only counts bytes, and `delivered_text()` gives the text of the
    kept events and `extrapolation()` the factor to scale their token count by. The references
    are dropped as soon as the final usage arrives. Nothing here is ever logged or stored.
    """

    __slots__ = (
        "_calls",
        "_events",
        "_kept",
        "_raw",
        "_skipped",
        "_tier",
        "complete",
        "keep_bytes",
        "prompt_known",
    )

    def __init__(self, keep_bytes: int = 1 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._events: list[bytes] | None = []
        self._kept = 0
        self._skipped = 0
        self._raw: dict[str, Any] = {}
        self._tier: str | None = None  # OpenAI's `service_tier` beside the usage
        self._calls: dict[str, int] = {}  # Responses API tool-call output items
        self.complete = False  # a final usage (with the completion count) arrived
        self.prompt_known = False  # the provider told the prompt count (Anthropic message_start)

    def feed(self, event: bytes) -> None:
        """Take one complete SSE event as delivered to the client."""
        events = self._events
        if events is not None:
            if self._kept < self.keep_bytes:
                events.append(event)
                self._kept += len(event)
            else:
                self._skipped += len(event)
        i = event.rfind(_USAGE)
        if i >= 0 and event.find(b"{", i + 7, i + 10) >= 0:
            self._take(event)

    def _take(self, event: bytes) -> None:
        data = event_data(event)
        if data is None:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        final = True
        if kind == "message_start":  # Anthropic: prompt counts; output_tokens is a placeholder
            msg = obj.get("message")
            u = msg.get("usage") if isinstance(msg, dict) else None
            final = False
            if isinstance(u, dict):
                u = {k: v for k, v in u.items() if k != "output_tokens"}
        elif kind in _FINAL_TYPES:  # Responses API
            resp = obj.get("response")
            u = resp.get("usage") if isinstance(resp, dict) else None
            if isinstance(resp, dict):
                self._tier = tier_name(resp.get("service_tier"))
                self._calls = responses_tool_calls(resp.get("output"))
        else:  # OpenAI chat/completions usage chunk, Anthropic message_delta
            u = obj.get("usage")
            if "service_tier" in obj:
                self._tier = tier_name(obj.get("service_tier"))
        if not isinstance(u, dict):
            return
        _merge(self._raw, u)
        self.prompt_known = True
        if final:
            self.complete = True
            self._events = None

    def usage(self) -> Usage | None:
        """What the provider reported so far (None when nothing); final only if `complete`."""
        if not self._raw:
            return None
        usage = parse_usage(self._raw)
        if usage.service_tier is None:
            usage.service_tier = self._tier
        if self._calls:
            usage.tool_calls = self._calls
        return usage

    def extrapolation(self) -> tuple[int, int]:
        """(delivered bytes, kept bytes): scale the kept text's token count by their ratio."""
        return self._kept + self._skipped, self._kept

    def delivered_text(self) -> str:
        """The completion text of the kept events (content, reasoning, tool arguments)."""
        return "".join(_texts(self._events or ()))


def _texts(events: Iterable[bytes]) -> Iterable[str]:
    for event in events:
        data = event_data(event)
        if data is None or data == b"[DONE]":
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield from _event_texts(obj)


def _strs(*values: object) -> Iterable[str]:
    return (v for v in values if isinstance(v, str))


def _event_texts(obj: dict[str, Any]) -> Iterable[str]:
    kind = obj.get("type")
    if kind is None or "choices" in obj:  # OpenAI chat / completions chunk
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            yield from _strs(choice.get("text"))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                yield from _strs(
                    delta.get("content"), delta.get("reasoning_content"), delta.get("refusal")
                )
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        yield from _strs(fn.get("name"), fn.get("arguments"))
    elif kind == "content_block_delta":  # Anthropic
        delta = obj.get("delta")
        if isinstance(delta, dict):
            yield from _strs(delta.get("text"), delta.get("partial_json"), delta.get("thinking"))
    elif isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta"):
        yield from _strs(obj.get("delta"))  # Responses API text, reasoning, tool arguments


def completion_text(body: bytes | Mapping[str, Any]) -> str:
    """The generated text of a non-stream response, for estimation when it has no usage."""
    try:
        obj = orjson.loads(body) if isinstance(body, bytes | bytearray | memoryview) else body
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(obj, Mapping):
        return ""
    out: list[str] = []
    for choice in obj.get("choices") or ():  # OpenAI chat / completions
        if isinstance(choice, Mapping):
            out.extend(_strs(choice.get("text")))
            msg = choice.get("message")
            if isinstance(msg, Mapping):
                out.extend(_strs(msg.get("content"), msg.get("reasoning_content")))
                for call in msg.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(fn, Mapping):
                        out.extend(_strs(fn.get("name"), fn.get("arguments")))
    for block in _blocks(obj.get("content")):  # Anthropic messages
        out.extend(_strs(block.get("text"), block.get("thinking")))
        if "input" in block:
            out.append(orjson.dumps(block["input"]).decode())
    for item in _blocks(obj.get("output")):  # Responses API
        out.extend(_strs(item.get("arguments")))
        for part in _blocks(item.get("content")):
            out.extend(_strs(part.get("text")))
    return "".join(out)


def _blocks(value: object) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, list):
        return (v for v in value if isinstance(v, Mapping))
    return ()
