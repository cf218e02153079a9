"""The mock's scripted agent: answers coding-agent CLIs (Claude Code, Codex) the way a model would.

A turn whose last user input carries no tool result gets a tool call (`Bash` / `exec_command`
running `echo proxyd-tool-ok`); a turn with a tool result gets a final answer quoting it. Prompt
caching is modelled per credential: a request reads from cache the longest prefix (system and
tools, then whole messages) that the same credential sent before, and writes the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxyd.mockprovider.common import _anthropic_error, _json, _read_json, _sse, prompt_tokens

TOOL_MARKER = "proxyd-tool-ok"
COMMAND = f"echo {TOOL_MARKER}"
_ids = itertools.count(1)


class PromptCache:
    """Prefixes each credential has sent, for cache reads only where that credential saw them."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._max = max_entries

    def account(self, credential: str, parts: list[bytes]) -> tuple[int, int]:
        """(cache read, cache write) tokens of a prompt made of `parts`, in order."""
        digest = hashlib.blake2b(digest_size=16)
        tokens = [max(1, math.ceil(len(p) / 4)) for p in parts]
        read_upto = 0
        marks: list[bytes] = []
        for i, part in enumerate(parts):
            digest.update(part)
            mark = digest.copy().digest()
            marks.append(mark)
            if (credential, mark) in self._seen:
                read_upto = i + 1
        self._remember(credential, marks[-1])
        read = sum(tokens[:read_upto])
        write = sum(tokens[read_upto:])
        return read, write

    def _remember(self, credential: str, mark: bytes) -> None:
        key = (credential, mark)
        self._seen[key] = None
        self._seen.move_to_end(key)
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)


@dataclass(frozen=True, slots=True)
class AgentCall:
    """What the mock noted about one call (for tests; no prompt text)."""

    path: str
    query: str
    credential: str
    fields: frozenset[str]  # the body's top-level field names
    max_tokens: int | None
    cache_read: int
    headers: tuple[tuple[str, str], ...]  # the agent-specific ones (betas, session ids)


CACHE_KEY = web.AppKey("agent_prompt_cache", PromptCache)
JOURNAL_KEY = web.AppKey("agent_journal", list[AgentCall])
_JOURNAL_MAX = 10_000
_NOTED_HEADERS = ("anthropic-beta", "x-claude-code-session-id", "session-id", "thread-id")


def _note(request: web.Request, body: dict[str, Any], cache_read: int) -> None:
    max_tokens = body.get("max_tokens")
    journal = request.app[JOURNAL_KEY]
    if len(journal) >= _JOURNAL_MAX:  # a long-running mock keeps the recent calls only
        del journal[: _JOURNAL_MAX // 2]
    journal.append(
        AgentCall(
            path=request.path,
            query=request.rel_url.raw_query_string,
            credential=_credential(request),
            fields=frozenset(body),
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            cache_read=cache_read,
            headers=tuple((h, v) for h in _NOTED_HEADERS if (v := request.headers.get(h))),
        )
    )


def _credential(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return request.headers.get("x-api-key") or (auth[7:] if auth.startswith("Bearer ") else "")


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _prefix_part(value: Any) -> bytes:
    """A prompt part as the cache sees it: breakpoints (`cache_control`) are not content, and a
    string content is the same as one text block holding it."""
    return _dump(_without_breakpoints(value))


def _without_breakpoints(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _without_breakpoints(v) for k, v in value.items() if k != "cache_control"}
        if isinstance(out.get("content"), str):
            out["content"] = [{"type": "text", "text": out["content"]}]
        return out
    if isinstance(value, list):
        return [_without_breakpoints(v) for v in value]
    return value


# -- Anthropic (Claude Code) -------------------------------------------------------------------


def _tool_result_text(body: dict[str, Any]) -> str | None:
    """The text of the tool result in the last user message, if it carries one."""
    messages = body.get("messages") or []
    if not messages or not isinstance(messages[-1], dict):
        return None
    content = messages[-1].get("content")
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                return inner
            if isinstance(inner, list):
                return "".join(b.get("text", "") for b in inner if isinstance(b, dict))
            return ""
    return None


def _anthropic_blocks(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The content blocks of the answer and its stop reason."""
    blocks: list[dict[str, Any]] = []
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        blocks.append(
            {
                "type": "thinking",
                "thinking": "The user wants a tool run; then I report its output.",
                "signature": "mocksig_" + hashlib.sha256(_dump(body.get("messages"))).hexdigest(),
            }
        )
    result = _tool_result_text(body)
    names = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    if result is None and "Bash" in names:
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_mock{next(_ids):08d}",
                "name": "Bash",
                "input": {"command": COMMAND, "description": "Print the marker"},
            }
        )
        return blocks, "tool_use"
    text = f"The tool said: {result.strip()}" if result is not None else "Hello from the mock."
    blocks.append({"type": "text", "text": text})
    return blocks, "end_turn"


def _anthropic_usage(request: web.Request, body: dict[str, Any], output: int) -> dict[str, int]:
    parts = [_prefix_part([body.get("system"), body.get("tools")])]
    parts += [_prefix_part(m) for m in body.get("messages") or []]
    read, write = request.app[CACHE_KEY].account(_credential(request), parts)
    return {
        "input_tokens": 1,  # what follows the last cache breakpoint: the whole prompt is cached
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "output_tokens": output,
    }


async def agent_messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages as a scripted agent model, streaming or not."""
    if not _credential(request):
        return _anthropic_error(401, "x-api-key header is required", "authentication_error")
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "messages" not in body:
        return _anthropic_error(400, "model and messages are required", "invalid_request_error")
    blocks, stop = _anthropic_blocks(body)
    output = sum(max(1, len(_dump(b)) // 4) for b in blocks)
    usage = _anthropic_usage(request, body, output)
    _note(request, body, usage["cache_read_input_tokens"])
    message: dict[str, Any] = {
        "id": f"msg_agent{next(_ids):012d}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    if not body.get("stream"):
        return _json(message)
    events = [
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "usage": {**usage, "output_tokens": 1},
                },
            },
        )
    ]
    for index, block in enumerate(blocks):
        events += _anthropic_block_events(index, block)
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output},
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"".join(events))
    await response.write_eof()
    return response


def _anthropic_block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    kind = block["type"]
    start: dict[str, Any]
    if kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [
            {"type": "thinking_delta", "thinking": block["thinking"]},
            {"type": "signature_delta", "signature": block["signature"]},
        ]
    elif kind == "tool_use":
        start = {**block, "input": {}}
        deltas = [
            {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}
        ]
    else:
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": block["text"]}]
    out = [
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    out += [
        _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    ]
    out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


async def agent_count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: the mock's deterministic prompt size."""
    if not _credential(request):
        return _anthropic_error(401, "x-api-key header is required", "authentication_error")
    body = await _read_json(request)
    if body is None or "messages" not in body:
        return _anthropic_error(400, "messages are required", "invalid_request_error")
    _note(request, body, 0)
    return _json({"input_tokens": prompt_tokens(body)})


# -- OpenAI Responses (Codex) ------------------------------------------------------------------


def _function_output(items: list[Any]) -> str | None:
    """The output of a function call answered after the last user message, if any."""
    found: str | None = None
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message" and item.get("role") == "user":
            found = None
        elif item.get("type") == "function_call_output":
            output = item.get("output")
            found = output if isinstance(output, str) else orjson.dumps(output).decode()
    return found


def _responses_output(body: dict[str, Any]) -> list[dict[str, Any]]:
    given = body.get("input")
    items: list[Any] = given if isinstance(given, list) else []
    out: list[dict[str, Any]] = []
    if "reasoning.encrypted_content" in (body.get("include") or []):
        out.append(
            {
                "id": f"rs_mock{next(_ids):012d}",
                "type": "reasoning",
                "summary": [],
                "encrypted_content": "gAAAAmock" + hashlib.sha256(_dump(items)).hexdigest(),
            }
        )
    result = _function_output(items)
    names = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    if result is None and "exec_command" in names:
        out.append(
            {
                "id": f"fc_mock{next(_ids):012d}",
                "type": "function_call",
                "status": "completed",
                "call_id": f"call_mock{next(_ids):08d}",
                "name": "exec_command",
                "arguments": orjson.dumps({"cmd": COMMAND}).decode(),
            }
        )
        return out
    text = f"The tool said: {result.strip()}" if result is not None else "Hello from the mock."
    out.append(
        {
            "id": f"msg_mock{next(_ids):012d}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    )
    return out


async def agent_responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses as a scripted agent model (streamed, as Codex asks)."""
    credential = _credential(request)
    if not credential:
        return web.json_response(
            {"error": {"message": "Missing bearer", "type": "invalid_request_error"}}, status=401
        )
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "input" not in body:
        return web.json_response(
            {"error": {"message": "model and input are required", "type": "invalid_request_error"}},
            status=400,
        )
    output = _responses_output(body)
    items = body["input"] if isinstance(body["input"], list) else [body["input"]]
    parts = [_prefix_part([body.get("instructions"), body.get("tools")])]
    parts += [_prefix_part(i) for i in items]
    read, write = request.app[CACHE_KEY].account(credential, parts)
    _note(request, body, read)
    total = read + write
    produced = sum(max(1, len(_dump(o)) // 4) for o in output)
    usage = {
        "input_tokens": total,
        "input_tokens_details": {"cached_tokens": read},
        "output_tokens": produced,
        "output_tokens_details": {"reasoning_tokens": 8 if output[0]["type"] == "reasoning" else 0},
        "total_tokens": total + produced,
    }
    response_obj: dict[str, Any] = {
        "id": f"resp_agent{next(_ids):012d}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body["model"],
        "output": output,
        "usage": usage,
    }
    if not body.get("stream"):
        return _json(response_obj)
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

    pending = {**response_obj, "status": "in_progress", "output": [], "usage": None}
    events = [
        event("response.created", response=pending),
        event("response.in_progress", response=pending),
    ]
    for index, item in enumerate(output):
        events += _item_events(event, index, item)
    events.append(event("response.completed", response=response_obj))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"".join(events))
    await response.write_eof()
    return response


def _item_events(event: Any, index: int, item: dict[str, Any]) -> list[bytes]:
    kind = item["type"]
    out = []
    if kind == "message":
        text = item["content"][0]["text"]
        at = {"item_id": item["id"], "output_index": index, "content_index": 0}
        out.append(
            event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
        )
        empty = {"type": "output_text", "text": "", "annotations": []}
        out.append(event("response.content_part.added", **at, part=empty))
        out.append(event("response.output_text.delta", **at, delta=text))
        out.append(event("response.output_text.done", **at, text=text))
        out.append(event("response.content_part.done", **at, part=item["content"][0]))
    elif kind == "function_call":
        out.append(
            event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            )
        )
        at = {"item_id": item["id"], "output_index": index}
        out.append(event("response.function_call_arguments.delta", **at, delta=item["arguments"]))
        out.append(
            event("response.function_call_arguments.done", **at, arguments=item["arguments"])
        )
    else:
        out.append(event("response.output_item.added", output_index=index, item=item))
    out.append(event("response.output_item.done", output_index=index, item=item))
    return out


def add_agent_routes(app: web.Application) -> None:
    """Serve the scripted agent on /v1/messages, /v1/messages/count_tokens and /v1/responses."""
    app[CACHE_KEY] = PromptCache()
    app[JOURNAL_KEY] = []
    app.router.add_post("/v1/messages", agent_messages)
    app.router.add_post("/v1/messages/count_tokens", agent_count_tokens)
    app.router.add_post("/v1/responses", agent_responses)
