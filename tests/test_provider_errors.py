"""Whose problem an upstream error answer is, from real providers' bodies (pure, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.relay.provider_errors import (
    MESSAGES,
    Fault,
    fault_of,
    model_scoped,
    shows_provider_message,
)

F = Fault


@pytest.mark.parametrize(
    ("status", "body", "fault"),
    [
        # the operator's key or account: OpenAI, Anthropic, OpenAI-compatible wording
        (
            401,
            b'{"error":{"message":"Incorrect API key provided: sk-ab***yz.",'
            b'"code":"invalid_api_key"}}',
            F.CREDENTIAL,
        ),
        (
            401,
            b'{"type":"error","error":{"type":"authentication_error",'
            b'"message":"invalid x-api-key"}}',
            F.CREDENTIAL,
        ),
        (403, b'{"type":"error","error":{"type":"permission_error","message":"no"}}', F.CREDENTIAL),
        (
            429,
            b'{"error":{"message":"You exceeded your current quota, please check your plan '
            b'and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}',
            F.CREDENTIAL,
        ),
        (
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"Your credit '
            b'balance is too low to access the Anthropic API."}}',
            F.CREDENTIAL,
        ),
        (400, b'{"type":"error","error":{"type":"billing_error","message":"x"}}', F.CREDENTIAL),
        (
            400,
            b'{"error":{"message":"Your organization must be verified to stream this model."}}',
            F.CREDENTIAL,
        ),
        (404, b'{"error":{"message":"Project proj_1 in org-Zq81xYwVb2 not found"}}', F.CREDENTIAL),
        (402, b"", F.CREDENTIAL),
        (401, b"", F.CREDENTIAL),
        (403, b"<html>Forbidden</html>", F.CREDENTIAL),
        # the client's own request
        (
            400,
            b'{"error":{"message":"Invalid value for temperature","param":"temperature"}}',
            F.CLIENT,
        ),
        (
            400,
            b'{"error":{"code":"content_policy_violation","message":"rejected by our safety '
            b'system"}}',
            F.CLIENT,
        ),
        (403, b'{"error":{"message":"flagged by moderation"}}', F.CLIENT),
        (404, b'{"error":{"message":"The model `gpt-9` does not exist"}}', F.CLIENT),
        (413, b"", F.CLIENT),
        (422, b'{"detail":"messages: field required"}', F.CLIENT),
        # the provider's trouble
        (
            429,
            b'{"error":{"message":"Rate limit reached for gpt-4o in organization '
            b'org-Zq81xYwVb2 on tokens per min"}}',
            F.BUSY,
        ),
        (429, b"", F.BUSY),
        (500, b'{"error":{"message":"boom"}}', F.SERVER),
        (529, b'{"type":"error","error":{"type":"overloaded_error"}}', F.SERVER),
        (503, b"", F.SERVER),
        # anything else
        (405, b"", F.OTHER),
        (409, b'{"error":{"message":"conflict"}}', F.OTHER),
    ],
)
def test_fault_of_real_bodies(status: int, body: bytes, fault: Fault) -> None:
    """Each provider answer is judged the operator's, the client's or the provider's problem."""
    assert fault_of(status, body) is fault


def test_only_client_faults_show_the_providers_message() -> None:
    """The provider's words reach the client only for its own request; proxyd's otherwise."""
    assert [f for f in Fault if shows_provider_message(f)] == [Fault.CLIENT]
    for fault in Fault:
        assert "sk-" not in MESSAGES[fault]
        assert "org" not in MESSAGES[fault]


@given(st.integers(400, 599), st.binary(max_size=300), st.binary(max_size=300))
def test_an_answer_naming_the_operators_key_is_never_shown(
    status: int, before: bytes, after: bytes
) -> None:
    """Whatever else it says and whatever its status, an answer naming the operator's upstream
    key is never passed to the client with the provider's words."""
    body = before + b" Incorrect API key provided: sk-ab***yz " + after
    assert not shows_provider_message(fault_of(status, body))


@pytest.mark.parametrize(
    ("status", "body", "scoped"),
    [
        # OpenAI: a project without access to one model
        (
            403,
            b'{"error":{"message":"Project `proj_x1` does not have access to model `gpt-b`",'
            b'"type":"invalid_request_error","code":"model_not_found"}}',
            True,
        ),
        # Anthropic: the organisation may not use what was asked
        (
            403,
            b'{"type":"error","error":{"type":"permission_error",'
            b'"message":"Your API key does not have permission to use the specified resource."}}',
            True,
        ),
        # the whole account: out of money or switched off, whatever the status
        (403, b'{"error":{"message":"Your account has been deactivated"}}', False),
        (403, b'{"error":{"code":"insufficient_quota"}}', False),
        (401, b'{"error":{"code":"invalid_api_key"}}', False),
        (402, b"Payment required", False),
    ],
)
def test_a_403_refuses_one_model_unless_it_says_the_account_is_gone(
    status: int, body: bytes, scoped: bool
) -> None:
    assert fault_of(status, body) is Fault.CREDENTIAL
    assert model_scoped(status, body) is scoped
