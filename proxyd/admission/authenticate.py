"""Authenticate: find the API key a request presents, and refuse unknown, disabled or expired keys.

Pure module: headers in, a KeyRecord out. The secret is hashed at once and never kept, logged or
echoed; only the key's id travels further.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from proxyd.errors import ErrorType, Forbidden, UnknownKey
from proxyd.state.store import KeyRecord, State


def presented_secret(authorization: str | None, x_api_key: str | None) -> str | None:
    """The secret from `Authorization: Bearer <key>` or `x-api-key: <key>`, if any."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def authenticate(headers: Mapping[str, str], state: State, now: float) -> KeyRecord:
    """The key record for the request's credentials; raises a 401 or 403 ProxydError."""
    secret = presented_secret(headers.get("Authorization"), headers.get("x-api-key"))
    if secret is None:
        raise UnknownKey(
            "No API key was provided. Send it as 'Authorization: Bearer <key>' or 'x-api-key'."
        )
    key = state.keys_by_hash.get(hashlib.sha256(secret.encode()).hexdigest())
    if key is None:
        raise UnknownKey("The API key provided is not valid.")
    if not key.active:
        raise Forbidden("This API key has been disabled.", error_type=ErrorType.KEY_DISABLED)
    if key.expires_at is not None and now >= key.expires_at:
        raise Forbidden("This API key has expired.", error_type=ErrorType.KEY_EXPIRED)
    return key
