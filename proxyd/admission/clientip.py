"""The client's address: the TCP peer, or what trusted proxies say in X-Forwarded-For.

Pure module: strings in, a string out. X-Forwarded-For is believed only hop by hop from the
peer, and only while each hop is inside a configured trusted-proxy network; never otherwise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings as networks (host bits allowed, e.g. `10.0.0.1/8`)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def parse_address(text: str) -> IPAddress | None:
    """An address from a peer or header entry (`1.2.3.4`, `1.2.3.4:80`, `[::1]:80`); None if bad.

    An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, from dual-stack sockets) becomes IPv4.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(addr in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> str:
    """The client address for a request from `peer` carrying `X-Forwarded-For: forwarded_for`.

    Without trusted proxies, or from an untrusted peer, the peer is the client. From a trusted
    peer, the header is read right to left, skipping trusted proxies; the first other address
    is the client. A malformed entry stops the walk at the last hop that could be believed.
    "" when there is no peer address (a Unix socket).
    """
    if not peer:
        return ""
    if not trusted:
        return peer
    addr = parse_address(peer)
    if addr is None:
        return peer
    if not forwarded_for or not _trusted(addr, trusted):
        return str(addr)
    for entry in reversed(forwarded_for.split(",")):
        hop = parse_address(entry)
        if hop is None:
            break
        addr = hop
        if not _trusted(hop, trusted):
            break
    return str(addr)


def client_address(
    peer: str | None, headers: Mapping[str, str], trusted: Sequence[IPNetwork]
) -> str:
    """`client_ip` with every X-Forwarded-For header line of `headers`, joined in order."""
    if not trusted or not peer:
        return peer or ""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = getall("X-Forwarded-For", [])
        forwarded = ",".join(values) if values else None
    else:
        forwarded = headers.get("X-Forwarded-For")
    return client_ip(peer, forwarded, trusted)


def address_allowed(client: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether `client` is inside one of `networks` (an unparsable address is not)."""
    addr = parse_address(client)
    return addr is not None and _trusted(addr, networks)
