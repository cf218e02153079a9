"""OpenAI chat messages (system, user, assistant, tool turns and their parts) -> Anthropic's.

Pure module: no aiohttp, no I/O. A part without a faithful Anthropic form is refused with a
400 naming its path in the request (e.g. `messages[2].content[0]`); nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.protocol.translate.common import (
    ANTHROPIC_IMAGE_TYPES,
    JSON,
    invalid,
    parse_data_url,
    unsupported,
)


def translate_messages(messages: Any) -> tuple[list[JSON], list[JSON]]:
    """The leading system/developer text blocks and the Anthropic turns of an OpenAI chat."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list.")
    system: list[JSON] = []
    out: list[JSON] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(param, "A message must be an object.")
        if msg.get("name") is not None:
            raise unsupported(f"{param}.name", "A participant name on a message")
        role = msg.get("role")
        if role in ("system", "developer"):
            if out:
                raise unsupported(f"{param}.role", "A system message after the first user message")
            system.extend(_text_blocks(msg.get("content"), f"{param}.content"))
            continue
        if role == "user":
            _append(out, "user", _user_content(msg.get("content"), f"{param}.content"))
        elif role == "assistant":
            _append(out, "assistant", _assistant_content(msg, param))
        elif role == "tool":
            _append(out, "user", [_tool_result(msg, param)])
        elif role == "function":
            raise unsupported(f"{param}.role", "The deprecated 'function' role (use 'tool')")
        else:
            raise invalid(
                f"{param}.role", "role must be system, developer, user, assistant or tool."
            )
    return system, out


def _append(out: list[JSON], role: str, content: str | list[JSON]) -> None:
    """Add a turn; consecutive turns of one role merge, as Anthropic itself would merge them."""
    if out and out[-1]["role"] == role:
        previous = out[-1]["content"]
        if isinstance(previous, str):
            previous = [{"type": "text", "text": previous}] if previous else []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}] if content else []
        out[-1]["content"] = previous + content
    else:
        out.append({"role": role, "content": content})


def _text_blocks(content: Any, param: str) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid(param, "content must be a string or a list of text parts.")
    blocks = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise unsupported(f"{param}[{k}]", "A non-text part in this message")
        if part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _user_content(content: Any, param: str) -> str | list[JSON]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(param, "content must be a string or a list of parts.")
    blocks: list[JSON] = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"{where}.image_url"))
        elif kind == "file":
            blocks.append(_document(part.get("file"), f"{where}.file"))
        elif kind == "input_audio":
            raise unsupported(where, "Audio input")
        else:
            raise invalid(f"{where}.type", "A content part must be text, image_url or file.")
    return blocks


def _image(image: Any, param: str) -> JSON:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise invalid(f"{param}.url", "An image part needs a url.")
    if url.startswith("data:"):
        media_type, data = parse_data_url(url, f"{param}.url")
        if media_type not in ANTHROPIC_IMAGE_TYPES:
            raise unsupported(f"{param}.url", f"An image of type {media_type}")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid(f"{param}.url", "An image url must be an http(s) or a data: URL.")


def _document(file: Any, param: str) -> JSON:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str):
        raise unsupported(param, "A file part without inline file_data (file ids)")
    media_type, data = parse_data_url(data_url, f"{param}.file_data")
    if media_type != "application/pdf":
        raise unsupported(f"{param}.file_data", f"A file of type {media_type}")
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _assistant_content(msg: JSON, param: str) -> str | list[JSON]:
    for key in ("audio", "function_call"):
        if msg.get(key) is not None:
            raise unsupported(f"{param}.{key}", f"An assistant message with {key}")
    content = msg.get("content")
    tool_calls = msg.get("tool_calls")
    refusal = msg.get("refusal")
    if isinstance(content, str) and not tool_calls and not refusal:
        return content
    blocks: list[JSON] = []
    if isinstance(content, list):
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get(kind) if kind in ("text", "refusal") else None
            if not isinstance(text, str):
                raise invalid(f"{param}.content[{k}]", "An assistant part must be text or refusal.")
            if text:
                blocks.append({"type": "text", "text": text})
    elif isinstance(content, str) and content:
        blocks.append({"type": "text", "text": content})
    elif content is not None and not isinstance(content, str):
        raise invalid(f"{param}.content", "content must be a string, a list of parts or null.")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    for j, call in enumerate(tool_calls or ()):
        blocks.append(_tool_use(call, f"{param}.tool_calls[{j}]"))
    return blocks


def _tool_use(call: Any, param: str) -> JSON:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise unsupported(f"{param}.type", "A tool call that is not a function call")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{param}.function.name", "A tool call needs a function name.")
    if not isinstance(call.get("id"), str):
        raise invalid(f"{param}.id", "A tool call needs an id.")
    arguments = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise invalid(f"{param}.function.arguments", "Tool call arguments must be a JSON object.")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _tool_result(msg: JSON, param: str) -> JSON:
    tool_call_id = msg.get("tool_call_id")
    if not isinstance(tool_call_id, str):
        raise invalid(f"{param}.tool_call_id", "A tool message needs a tool_call_id.")
    content = msg.get("content")
    result: JSON = {"type": "tool_result", "tool_use_id": tool_call_id}
    if isinstance(content, str):
        if content:
            result["content"] = content
    else:
        blocks = _text_blocks(content, f"{param}.content")
        if blocks:
            result["content"] = blocks
    return result
