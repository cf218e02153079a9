"""`make run`: proxyd on the example config in front of the local mock provider, in one process.

For trying proxyd on a machine with no provider account and no internet; never for production.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from proxyd.cli import serve_forever
from proxyd.config import ConfigError, load_config
from proxyd.mockprovider import create_mock_app
from proxyd.observability.logs import configure_logging

DEMO_SECRET = "sk-proxyd-demo"  # noqa: S105 - the published demo key of config/example.toml
MOCK_PORT = 9100
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"


async def _run() -> int:
    try:
        config = load_config(EXAMPLE)
    except ConfigError as exc:
        print(f"proxyd demo: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    mock = web.AppRunner(create_mock_app(), access_log=None)
    await mock.setup()
    await web.TCPSite(mock, "127.0.0.1", MOCK_PORT).start()
    listen = config.server.listen
    print(
        f"""
proxyd demo: a mock provider on 127.0.0.1:{MOCK_PORT}, proxyd on {listen}
demo key: {DEMO_SECRET}     models: mock-gpt (OpenAI style), mock-claude (Anthropic style)

  curl -N http://{listen}/v1/chat/completions \\
    -H "Authorization: Bearer {DEMO_SECRET}" -H "Content-Type: application/json" \\
    -d '{{"model": "mock-gpt", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

Ctrl-C stops it.
""",
        flush=True,
    )
    try:
        return await serve_forever(config)
    finally:
        await mock.cleanup()


def main() -> int:
    import uvloop

    Path("var").mkdir(exist_ok=True)
    return uvloop.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
