"""The client address: the peer, or X-Forwarded-For only through trusted proxies."""

from __future__ import annotations

import pytest

from proxyd.admission.clientip import address_allowed, client_address, client_ip, parse_networks

TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.5", "1.2.3.4", (), "203.0.113.5"),  # no trusted proxies: header ignored
        ("203.0.113.5", "1.2.3.4", TRUSTED, "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.2", None, TRUSTED, "10.0.0.2"),  # trusted peer, no header
        ("10.0.0.2", "1.2.3.4", TRUSTED, "1.2.3.4"),
        ("10.0.0.2", "6.6.6.6, 1.2.3.4", TRUSTED, "1.2.3.4"),  # spoofed left part ignored
        ("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.9.9.9", TRUSTED, "1.2.3.4"),  # proxy chain skipped
        ("10.0.0.2", "10.1.1.1, 10.2.2.2", TRUSTED, "10.1.1.1"),  # all trusted: leftmost
        ("10.0.0.2", "garbage, 1.2.3.4", TRUSTED, "1.2.3.4"),
        ("10.0.0.2", "1.2.3.4, garbage", TRUSTED, "10.0.0.2"),  # stop at the last believable hop
        ("10.0.0.2", " 1.2.3.4:5678 ", TRUSTED, "1.2.3.4"),
        ("10.0.0.2", "[2001:db8::1]:443", TRUSTED, "2001:db8::1"),
        ("fd00::1", "2001:db8::7", TRUSTED, "2001:db8::7"),
        ("::ffff:10.0.0.2", "1.2.3.4", TRUSTED, "1.2.3.4"),  # IPv4-mapped peer
        (None, "1.2.3.4", TRUSTED, ""),
    ],
)
def test_client_ip(
    peer: str | None, xff: str | None, trusted: tuple[object, ...], expected: str
) -> None:
    """Each case pins who is believed to be the client."""
    assert client_ip(peer, xff, trusted) == expected  # type: ignore[arg-type]


def test_client_address_joins_repeated_headers() -> None:
    """Two X-Forwarded-For lines count as one list, in order."""
    from multidict import CIMultiDict

    headers = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "1.2.3.4")])
    assert client_address("10.0.0.2", headers, TRUSTED) == "1.2.3.4"
    assert client_address("10.0.0.2", {"X-Forwarded-For": "5.5.5.5"}, TRUSTED) == "5.5.5.5"
    assert client_address("10.0.0.2", headers, ()) == "10.0.0.2"


@pytest.mark.parametrize(
    ("addr", "allowed"),
    [("192.168.1.7", True), ("192.168.2.7", False), ("::ffff:192.168.1.7", True), ("x", False)],
)
def test_address_allowed(addr: str, allowed: bool) -> None:
    """Allowlists match v4, v4-mapped v6, and refuse what does not parse."""
    assert address_allowed(addr, parse_networks(["192.168.1.0/24", "2001:db8::/32"])) is allowed
