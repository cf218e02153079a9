"""TLS on the client listener: the server context, and its certificate reloaded on SIGHUP.

TLS 1.3 minimum unless the operator chose 1.2 (`server.tls_min_version`). A reload loads the
files into a fresh context first, so a broken pair is reported and the old one stays in force;
connections already open keep their session, new handshakes get the new certificate.
"""

from __future__ import annotations

import os
import ssl
from typing import Literal

import structlog

log = structlog.get_logger("proxyd.tls")

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def _load(context: ssl.SSLContext, cert: str, key: str) -> None:
    for name, path in (("server.tls_cert", cert), ("server.tls_key", key)):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{name} {path}: no such file")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"server.tls_cert {cert} / server.tls_key {key}: cannot be loaded ({exc})"
        ) from exc


def server_context(
    cert: str, key: str, min_version: Literal["1.2", "1.3"] = "1.3"
) -> ssl.SSLContext:
    """A server-side context with `cert` and `key`, refusing anything older than `min_version`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load(context, cert, key)
    return context


def reload(context: ssl.SSLContext, cert: str, key: str) -> bool:
    """Load `cert` and `key` again into `context`; False (logged) when they cannot be used."""
    try:
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)  # checked before it counts
        _load(context, cert, key)
    except TLSConfigError as exc:
        log.error("tls_reload_failed", error=str(exc))  # noqa: TRY400 - the message says it all
        return False
    log.info("tls_reloaded", cert=cert)
    return True
