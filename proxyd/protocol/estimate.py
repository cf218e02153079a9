"""Offline token estimates for requests whose provider reported no usage.

Loads tiktoken's o200k_base / cl100k_base from the gzipped files shipped in proxyd/data (hash
checked); it never downloads and never writes a cache. It counts text it is handed and keeps none.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import orjson
import tiktoken

from proxyd.protocol.usage import StreamUsage, Usage

# Special tokens and split patterns as tiktoken_ext.openai_public defines them (MIT licence);
# the hashes are the ones tiktoken checks its own downloads against.
_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
}

# Fixed costs, as OpenAI documents them for chat models: every message is wrapped in 3 tokens
# and every reply is primed with 3. Images cost a flat amount by detail.
PER_MESSAGE = 3
REPLY_PRIMING = 3
IMAGE_TOKENS = 765
IMAGE_TOKENS_LOW = 85
_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})
# Keys whose values are ids, switches or binary payloads rather than text the model reads.
_SKIP = frozenset(
    {
        "type", "id", "tool_call_id", "tool_use_id", "call_id", "cache_control", "detail",
        "image_url", "source", "data", "url", "file_data", "file_id", "input_audio", "status",
        "signature", "media_type",
    }
)  # fmt: skip


def load_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken Encoding built from the bundled file; ValueError on unknown name or bad hash."""
    if name not in _ENCODINGS:
        raise ValueError(f"encoding: unknown {name!r}; use one of {sorted(_ENCODINGS)}")
    expected, pat, special = _ENCODINGS[name]
    raw = gzip.decompress(
        resources.files("proxyd").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    )
    if hashlib.sha256(raw).hexdigest() != expected:
        raise ValueError(f"encoding: bundled {name} file does not match its hash")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def _endpoint_kind(endpoint: str) -> str:
    """'/v1/chat/completions' or 'chat/completions' -> 'chat/completions', and so on."""
    tail = endpoint.strip("/")
    return tail[3:] if tail.startswith("v1/") else tail


def _walk(value: object, texts: list[str]) -> int:
    """Collect the strings a model reads under `value`; return the fixed tokens found (images)."""
    extra = 0
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, Mapping):
        kind = value.get("type")
        if kind in _IMAGE_TYPES or "image_url" in value:
            img = value.get("image_url")
            low = value.get("detail") == "low" or (
                isinstance(img, Mapping) and img.get("detail") == "low"
            )
            extra += IMAGE_TOKENS_LOW if low else IMAGE_TOKENS
        for k, v in value.items():
            if k not in _SKIP:
                extra += _walk(v, texts)
    elif isinstance(value, list):
        if value and all(type(v) is int for v in value):  # pre-tokenized prompt
            return len(value)
        for v in value:
            extra += _walk(v, texts)
    return extra


def prompt_parts(endpoint: str, request: Mapping[str, Any]) -> tuple[list[str], int]:
    """The texts to count and the fixed token overhead of a request's prompt.

    Endpoints: chat/completions and messages (per-message overhead and reply priming, system,
    tools as JSON), responses (instructions, input, tools), completions (prompt), embeddings
    (input). Pre-tokenized inputs (lists of ints) count one token per int.
    """
    kind = _endpoint_kind(endpoint)
    texts: list[str] = []
    fixed = 0
    if kind in ("chat/completions", "messages", "responses"):
        items = request.get("messages") if kind != "responses" else request.get("input")
        if isinstance(items, list):
            fixed += PER_MESSAGE * len(items) + REPLY_PRIMING
        fixed += _walk(items, texts)
        fixed += _walk(request.get("system"), texts)  # Anthropic
        fixed += _walk(request.get("instructions"), texts)  # Responses
        texts.extend(
            orjson.dumps(request[key]).decode()
            for key in ("tools", "functions")
            if request.get(key)
        )
    elif kind == "completions":
        fixed += _walk(request.get("prompt"), texts)
    elif kind == "embeddings":
        fixed += _walk(request.get("input"), texts)
    return texts, fixed


class Tokenizer:
    """Counts tokens with one bundled encoding, loaded on first use and then kept (thread-safe)."""

    def __init__(self, encoding: str = "o200k_base") -> None:
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding: unknown {encoding!r}; use one of {sorted(_ENCODINGS)}")
        self.encoding_name = encoding
        self._enc: tiktoken.Encoding | None = None
        self._lock = threading.Lock()

    def load(self) -> tiktoken.Encoding:
        """The encoding, built once (about 0.3 s); call it at start-up to keep it off a request."""
        enc = self._enc
        if enc is None:
            with self._lock:
                enc = self._enc
                if enc is None:
                    enc = self._enc = load_encoding(self.encoding_name)
        return enc

    def count(self, text: str) -> int:
        """Tokens in `text`; special-token strings count as plain text."""
        return len(self.load().encode_ordinary(text)) if text else 0

    def count_all(self, texts: Iterable[str]) -> int:
        """Tokens in several texts, each encoded on its own."""
        encode = self.load().encode_ordinary
        return sum(len(encode(t)) for t in texts if t)

    def prompt_tokens(self, endpoint: str, request: Mapping[str, Any]) -> int:
        """Estimated prompt tokens of a request body (already parsed JSON)."""
        texts, fixed = prompt_parts(endpoint, request)
        return fixed + self.count_all(texts)

    def completion_tokens(self, scanner: StreamUsage) -> int:
        """Estimated tokens the client received on a stream, scaled up past the kept bytes."""
        counted = self.count(scanner.delivered_text())
        delivered, kept = scanner.extrapolation()
        if kept == 0 or delivered <= kept:
            return counted
        return -(-counted * delivered // kept)

    def estimate(
        self,
        endpoint: str,
        request: Mapping[str, Any],
        scanner: StreamUsage | None = None,
        response_text: str | None = None,
    ) -> tuple[Usage, str]:
        """Usage for the row and its `usage_source`: the provider's when complete, else estimated.

        What the provider did report is kept (Anthropic's prompt count from message_start);
        the rest is counted from the request and from what was delivered.
        """
        reported = scanner.usage() if scanner is not None else None
        if scanner is not None and scanner.complete and reported is not None:
            return reported, "upstream"
        usage = reported or Usage()
        if scanner is None or not scanner.prompt_known:
            usage.prompt_tokens = self.prompt_tokens(endpoint, request)
            usage.cached_tokens = 0
        if scanner is not None:
            usage.completion_tokens = self.completion_tokens(scanner)
        elif response_text is not None:
            usage.completion_tokens = self.count(response_text)
        usage.reasoning_tokens = min(usage.reasoning_tokens, usage.completion_tokens)
        return usage, "estimated"
