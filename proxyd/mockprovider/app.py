"""The mock provider's app and its command line."""

from __future__ import annotations

import argparse
import gc
from typing import Any

import uvloop
from aiohttp import web

from proxyd.mockprovider.agent import add_agent_routes
from proxyd.mockprovider.anthropic import messages
from proxyd.mockprovider.cache import CACHE_KEY, PromptCache
from proxyd.mockprovider.common import (
    CONFIG_KEY,
    MockConfig,
    Ticker,
)
from proxyd.mockprovider.openai import chat_completions, completions, embeddings, models, responses


def create_mock_app(
    *, chunk_interval: float = 0.02, chunks: int = 16, instant: bool = False, agent: bool = False
) -> web.Application:
    """The mock provider: OpenAI routes under /v1 and Anthropic's /v1/messages on one app.

    `agent` serves /v1/messages (with count_tokens) and /v1/responses as a scripted coding-agent
    model instead (`proxyd.mockprovider.agent`): one tool call, then an answer quoting its result.
    """
    if chunks < 1 or chunk_interval <= 0:
        raise ValueError("chunks must be >= 1 and chunk_interval > 0")
    app = web.Application()
    cfg = MockConfig(chunk_interval, chunks, instant)
    app[CONFIG_KEY] = cfg
    app[CACHE_KEY] = PromptCache()

    async def ticker_ctx(_app: web.Application) -> Any:
        cfg.ticker = Ticker(chunk_interval)
        yield
        cfg.ticker.close()
        cfg.ticker = None

    app.cleanup_ctx.append(ticker_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    if agent:
        add_agent_routes(app)
    else:
        app.router.add_post("/v1/responses", responses)
        app.router.add_post("/v1/messages", messages)
    return app


def main(argv: list[str] | None = None) -> None:
    """`python -m proxyd.mockprovider --port 9100 [--instant] [--chunks N] [--interval S]`."""
    parser = argparse.ArgumentParser(prog="python -m proxyd.mockprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=16, help="content tokens per answer")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--instant", action="store_true", help="no pacing: answer at once")
    parser.add_argument("--agent", action="store_true", help="a scripted coding-agent model")
    args = parser.parse_args(argv)
    uvloop.install()
    app = create_mock_app(
        chunk_interval=args.interval, chunks=args.chunks, instant=args.instant, agent=args.agent
    )
    gc.freeze()  # start-up objects never need scanning again: shorter collector pauses
    print(
        f"mock provider on http://{args.host}:{args.port} (OpenAI: /v1, Anthropic: /)", flush=True
    )
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)
