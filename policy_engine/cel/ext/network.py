"""cel-go's network library (``ext.Network``): the types ``net.IP`` and ``net.CIDR``,
``ip(s)``, ``cidr(s)``, ``isIP(s)``, ``isCIDR(s)``, ``ip.isCanonical(s)``, ``string(x)``,
``ip.family()``, ``isUnspecified``, ``isLoopback``, ``isGlobalUnicast``,
``isLinkLocalMulticast``, ``isLinkLocalUnicast``, ``cidr.containsIP(ip or string)``,
``cidr.containsCIDR(cidr or string)``, ``cidr.ip()``, ``cidr.masked()``,
``cidr.prefixLength()``; as Go's ``net/netip`` parses and classifies addresses (no zones,
no dotted IPv4 inside IPv6; an IPv4-mapped IPv6 address equals its IPv4 address).

The project's own ``inCidr`` helper stays (``context.client_ip.inCidr("10.0.0.0/8")``);
``cidr("10.0.0.0/8").containsIP(context.client_ip)`` is the same test in cel-go's words.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.functions import Function, function, sig, to_string
from policy_engine.cel.types import BOOL, INT, STRING, CelT
from policy_engine.cel.values import kind_of, no_overload, register_type

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class IP:
    """A ``net.IP``: an IPv4 or IPv6 address (no zone)."""

    __slots__ = ("address",)

    def __init__(self, address: Address) -> None:
        self.address = address

    def unmapped(self) -> Address:
        mapped = getattr(self.address, "ipv4_mapped", None)
        return mapped if mapped is not None else self.address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IP) and self.unmapped() == other.unmapped()

    def __hash__(self) -> int:
        return hash(self.unmapped())

    def __str__(self) -> str:
        return str(self.address)

    def __repr__(self) -> str:
        return f"ip({str(self)!r})"


class CIDR:
    """A ``net.CIDR``: an address and a prefix length (host bits kept, as written)."""

    __slots__ = ("address", "length")

    def __init__(self, address: Address, length: int) -> None:
        self.address = address
        self.length = length

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.address}/{self.length}", strict=False)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CIDR)
            and self.address == other.address
            and self.length == other.length
        )

    def __hash__(self) -> int:
        return hash((self.address, self.length))

    def __str__(self) -> str:
        return f"{self.address}/{self.length}"

    def __repr__(self) -> str:
        return f"cidr({str(self)!r})"


register_type(IP, "net.IP")
register_type(CIDR, "net.CIDR")
IP_TYPE = CelT("net.IP")
CIDR_TYPE = CelT("net.CIDR")


def _parse_address(text: str) -> Address | None:
    """An address as netip.ParseAddr reads it: no zone, no dotted IPv4 inside IPv6."""
    if "%" in text or (":" in text and "." in text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _text(value: Any, name: str) -> str:
    if kind_of(value) == "string":
        return str(value)
    raise no_overload(name, value)


def parse_ip(value: Any) -> IP:
    """``ip(s)``: a ``net.IP``; an error for text that is no address."""
    text = _text(value, "ip")
    address = _parse_address(text)
    if address is None:
        raise CelEvaluationError(f"ip(): invalid IP address {text!r}")
    return IP(address)


def parse_cidr(value: Any) -> CIDR:
    """``cidr(s)``: a ``net.CIDR`` (``address/length``); an error for anything else."""
    text = _text(value, "cidr")
    address_text, slash, length_text = text.partition("/")
    address = _parse_address(address_text)
    if (
        address is None
        or not slash
        or not length_text.isdigit()
        or length_text != str(int(length_text))
    ):
        raise CelEvaluationError(f"cidr(): invalid CIDR {text!r}")
    length = int(length_text)
    if length > address.max_prefixlen:
        raise CelEvaluationError(f"cidr(): invalid CIDR {text!r}")
    return CIDR(address, length)


def is_ip(value: Any) -> bool:
    """``isIP(s)``: whether ``s`` parses as an address."""
    return _parse_address(_text(value, "isIP")) is not None


def is_cidr(value: Any) -> bool:
    """``isCIDR(s)``: whether ``s`` parses as a CIDR."""
    try:
        parse_cidr(_text(value, "isCIDR"))
    except CelEvaluationError:
        return False
    return True


def is_canonical(value: Any) -> bool:
    """``ip.isCanonical(s)``: whether ``s`` is the address's canonical text (lower case,
    shortest IPv6 form); an error when ``s`` is no address."""
    return str(parse_ip(value)) == _text(value, "ip.isCanonical")


def _ip(value: Any, name: str) -> IP:
    if type(value) is IP:
        return value
    raise no_overload(name, value)


def _cidr(value: Any, name: str, *others: Any) -> CIDR:
    if type(value) is CIDR:
        return value
    raise no_overload(name, value, *others)


def family(value: Any) -> int:
    """``ip.family()``: 4 or 6."""
    return _ip(value, "family").address.version


_LINK_LOCAL_MULTICAST_V4 = ipaddress.ip_network("224.0.0.0/24")
_LINK_LOCAL_UNICAST_V4 = ipaddress.ip_network("169.254.0.0/16")
_LINK_LOCAL_UNICAST_V6 = ipaddress.ip_network("fe80::/10")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _link_local_multicast(address: Address) -> bool:
    if address.version == 4:
        return address in _LINK_LOCAL_MULTICAST_V4
    packed = address.packed
    return packed[0] == 0xFF and packed[1] & 0x0F == 0x02


def _link_local_unicast(address: Address) -> bool:
    network = _LINK_LOCAL_UNICAST_V4 if address.version == 4 else _LINK_LOCAL_UNICAST_V6
    return address in network


def _global_unicast(address: Address) -> bool:
    """Go's IsGlobalUnicast: neither unspecified, loopback, multicast, link-local unicast
    nor the IPv4 broadcast address (private ranges are global unicast to Go)."""
    return not (
        address.is_unspecified
        or address.is_loopback
        or address.is_multicast
        or _link_local_unicast(address)
        or address == _BROADCAST
    )


def _classifier(name: str, test: Callable[[Address], bool]) -> Callable[[Any], bool]:
    def classify(value: Any) -> bool:
        return test(_ip(value, name).unmapped())

    classify.__name__ = name
    return classify


def contains_ip(value: Any, other: Any) -> bool:
    """``cidr.containsIP(ip)``: the address (a ``net.IP`` or its text) is in the network."""
    network = _cidr(value, "containsIP", other)
    address = other if type(other) is IP else parse_ip(_text(other, "containsIP"))
    inner = address.unmapped()
    outer = network.network()
    return inner.version == outer.version and inner in outer


def contains_cidr(value: Any, other: Any) -> bool:
    """``cidr.containsCIDR(c)``: the network ``c`` (a ``net.CIDR`` or its text) lies inside."""
    network = _cidr(value, "containsCIDR", other)
    inner = other if type(other) is CIDR else parse_cidr(_text(other, "containsCIDR"))
    outer = network.network()
    return (
        inner.address.version == outer.version
        and inner.length >= network.length
        and inner.address in outer
    )


def cidr_ip(value: Any) -> IP:
    """``cidr.ip()``: the address as written."""
    return IP(_cidr(value, "ip").address)


def masked(value: Any) -> CIDR:
    """``cidr.masked()``: the network with its host bits cleared."""
    network = _cidr(value, "masked")
    return CIDR(network.network().network_address, network.length)


def prefix_length(value: Any) -> int:
    """``cidr.prefixLength()``."""
    return _cidr(value, "prefixLength").length


def network_string(value: Any) -> str:
    """``string(x)`` for ``net.IP`` and ``net.CIDR``; the standard conversions otherwise."""
    if type(value) in (IP, CIDR):
        return str(value)
    return to_string(value)


def _method(name: str, impl: Callable[..., Any], receiver: CelT, result: CelT) -> Function:
    return function(name, impl, (1,), "method", (), (sig(receiver, result),))


FUNCTIONS: tuple[Function, ...] = (
    function("ip", parse_ip, (1,), "global", (), (sig(STRING, IP_TYPE),)),
    function("cidr", parse_cidr, (1,), "global", (), (sig(STRING, CIDR_TYPE),)),
    function("isIP", is_ip, (1,), "global", (), (sig(STRING, BOOL),)),
    function("isCIDR", is_cidr, (1,), "global", (), (sig(STRING, BOOL),)),
    function("ip.isCanonical", is_canonical, (1,), "global", (), (sig(STRING, BOOL),)),
    # Merged with the standard string() (see policy_engine.cel.library).
    function(
        "string", network_string, (1,), "global", (), (sig(IP_TYPE, STRING), sig(CIDR_TYPE, STRING))
    ),
    _method("family", family, IP_TYPE, INT),
    *(
        _method(name, _classifier(name, test), IP_TYPE, BOOL)
        for name, test in (
            ("isUnspecified", lambda a: a.is_unspecified),
            ("isLoopback", lambda a: a.is_loopback),
            ("isGlobalUnicast", _global_unicast),
            ("isLinkLocalMulticast", _link_local_multicast),
            ("isLinkLocalUnicast", _link_local_unicast),
        )
    ),
    function(
        "containsIP",
        contains_ip,
        (2,),
        "method",
        (),
        (sig(CIDR_TYPE, IP_TYPE, BOOL), sig(CIDR_TYPE, STRING, BOOL)),
    ),
    function(
        "containsCIDR",
        contains_cidr,
        (2,),
        "method",
        (),
        (sig(CIDR_TYPE, CIDR_TYPE, BOOL), sig(CIDR_TYPE, STRING, BOOL)),
    ),
    _method("ip", cidr_ip, CIDR_TYPE, IP_TYPE),
    _method("masked", masked, CIDR_TYPE, CIDR_TYPE),
    _method("prefixLength", prefix_length, CIDR_TYPE, INT),
)
