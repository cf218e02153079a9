"""What an upstream error answer is about: the client's request, the operator's account, or the
provider's own trouble. Pure module: status and body bytes in, a `Fault` out; no I/O, no logging.

It reads an error body only to classify it and never keeps, logs or returns any part of it.
Whether a fault moves the request to another channel is decided in `failover`, not here.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Fault(StrEnum):
    """Whose problem an upstream error answer is."""

    CLIENT = "client"  # the client's own request (bad field, unknown model, too long, policy)
    CREDENTIAL = "credential"  # the operator's upstream key or account: rejected, out of credit
    BUSY = "busy"  # the provider is rate limiting or overloaded
    SERVER = "server"  # the provider failed (5xx)
    OTHER = "other"  # any other 4xx: not the client's request, not worth another channel


# The base verdict by status; the phrases below refine it.
_BY_STATUS: dict[int, Fault] = {
    400: Fault.CLIENT,
    401: Fault.CREDENTIAL,
    402: Fault.CREDENTIAL,
    403: Fault.CREDENTIAL,
    404: Fault.CLIENT,
    413: Fault.CLIENT,
    422: Fault.CLIENT,
    429: Fault.BUSY,
}

# A refusal of the content itself is about the client's request, whatever the status.
_CONTENT_POLICY = (
    b"content_policy",
    b"content policy",
    b"content_filter",
    b"content management policy",
    b"safety system",
    b"moderation",
)
# The operator's upstream account is out of money or switched off (OpenAI, Anthropic, and the
# usual wording of OpenAI-compatible providers).
_OUT_OF_CREDIT = (
    b"insufficient_quota",
    b"exceeded your current quota",
    b"credit balance",
    b"billing",
    b"insufficient balance",
    b"insufficient_user_quota",
    b"payment required",
    b"account_deactivated",
    b"access_terminated",
    b"account is not active",
    b"has been deactivated",
    b"has been suspended",
)
# The operator's key or organisation named or rejected: never the client's business.
_ACCOUNT = (
    b"invalid_api_key",
    b"incorrect api key",
    b"invalid x-api-key",
    b"invalid api key",
    b"api key",
    b"api_key",
    b"authentication_error",
    b"permission_error",
    b"your organization",
    b"invalid_organization",
    b"no_such_organization",
)
_ORG_ID = re.compile(rb"\borg-[a-z0-9]{6,}")
_SCAN = 1 << 16  # error bodies are small; a huge one is judged by its start


def fault_of(status: int, body: bytes) -> Fault:
    """Whose problem the upstream answer `status` (400 or above) with `body` is.

    - out of credit or a deactivated account (any status, 429 included): CREDENTIAL;
    - any other answer naming the operator's key or organisation, unless it is a 429 (a rate
      limit per organisation is still only a rate limit): CREDENTIAL, whatever else it says;
    - a 4xx (but 429) refusing the content (policy, moderation): CLIENT;
    - otherwise by status: 401, 402, 403 CREDENTIAL; 400, 404, 413, 422 CLIENT; 429 BUSY;
      5xx (and 529) SERVER; any other 4xx OTHER.
    """
    text = body[:_SCAN].lower()
    if any(p in text for p in _OUT_OF_CREDIT):
        return Fault.CREDENTIAL
    if status != 429 and (any(p in text for p in _ACCOUNT) or _ORG_ID.search(text)):
        return Fault.CREDENTIAL
    if status < 500 and status != 429 and any(p in text for p in _CONTENT_POLICY):
        return Fault.CLIENT
    if status >= 500:
        return Fault.SERVER
    return _BY_STATUS.get(status, Fault.OTHER)


def model_scoped(status: int, body: bytes) -> bool:
    """Whether a CREDENTIAL answer refuses one model rather than the whole upstream account: a
    403 that does not say the account is out of money or switched off. Providers answer 403
    when the operator's key or project may not use a model (OpenAI's project model access,
    Anthropic's `permission_error`); the same key serves its other models, so the refusal
    cools that model on the channel, not the channel (see `ChannelHealth.refuse_model`)."""
    return status == 403 and not any(p in body[:_SCAN].lower() for p in _OUT_OF_CREDIT)


def shows_provider_message(fault: Fault) -> bool:
    """Whether the client sees the provider's own error body: only about its own request."""
    return fault is Fault.CLIENT


# proxyd's words for an upstream error the client must not see verbatim, by fault.
MESSAGES: dict[Fault, str] = {
    Fault.CREDENTIAL: "No upstream channel could serve this request right now; "
    "this is not a problem with your API key.",
    Fault.BUSY: "The upstream provider is busy; retry shortly.",
    Fault.SERVER: "The upstream provider returned an error.",
    Fault.OTHER: "The upstream provider refused the request.",
    Fault.CLIENT: "The upstream provider refused the request.",
}
