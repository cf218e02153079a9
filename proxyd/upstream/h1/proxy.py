"""Outbound proxies for the h1 client: HTTP (CONNECT, or absolute-form for plain http) and SOCKS5.

The tunnels are opened by `python-socks` (a maintained client for SOCKS4/5 and HTTP CONNECT,
with authentication), which hands back a connected socket; the h1 connection (and its TLS to the
upstream) then runs over it. A proxy's credentials never reach a log or an error message.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxyd.upstream.h1.errors import ConnectError, ConnectTimeout
from proxyd.upstream.h1.wire import BadTarget

_TYPES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """A parsed proxy URL: `http://[user:pass@]host:port`, `socks5://…` or `socks5h://…`."""

    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None

    @property
    def http(self) -> bool:
        return self.scheme == "http"

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization value of an HTTP proxy with credentials (Basic)."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    async def tunnel(self, host: str, port: int, within: float) -> socket.socket:
        """A socket connected through the proxy to `host`:`port` (SOCKS5, or HTTP CONNECT)."""
        proxy = Proxy(
            _TYPES[self.scheme],
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            # socks5h: the proxy resolves the upstream's name; socks5: proxyd does
            rdns=self.scheme != "socks5",
        )
        try:
            return await proxy.connect(dest_host=host, dest_port=port, timeout=within)
        except ProxyTimeoutError:
            raise ConnectTimeout("connecting through the proxy timed out") from None
        except ProxyConnectionError:
            raise ConnectError("cannot connect to the proxy") from None
        except ProxyError as exc:  # the proxy refused: bad credentials, no route, a 407
            code = getattr(exc, "error_code", None)
            raise ConnectError(f"the proxy refused the tunnel ({code})") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect through the proxy: {type(exc).__name__}") from None


def proxy_of(url: str) -> ProxyRoute:
    """The parsed proxy `url`; raises BadTarget for one this client cannot use."""
    parts = urlsplit(url)
    if parts.scheme not in _TYPES or not parts.hostname:
        raise BadTarget(f"not a usable proxy URL scheme: {parts.scheme}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise BadTarget("a proxy URL needs a port")
    return ProxyRoute(
        parts.scheme,
        parts.hostname,
        port,
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
    )
