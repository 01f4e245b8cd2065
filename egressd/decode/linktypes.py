"""Link-layer types the decoders understand, and the error reasons they count.

Numbers are the LINKTYPE_* values of the pcap/pcapng specifications.  A link
type that is not listed here is not an error in the capture: its packets are
counted under ``undecoded_linktype_<N>`` so the report shows what was skipped.
"""

from __future__ import annotations

LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in the writer's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_OLD_12 = 12  # raw IP on some BSDs
LINKTYPE_RAW_OLD_14 = 14  # raw IP on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108  # OpenBSD loopback: 4-byte address family, network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

SUPPORTED_LINKTYPES = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW_OLD_12,
        LINKTYPE_RAW_OLD_14,
        LINKTYPE_RAW,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    }
)
RAW_LINKTYPES = frozenset({LINKTYPE_RAW_OLD_12, LINKTYPE_RAW_OLD_14, LINKTYPE_RAW})

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100})
MAX_VLAN_TAGS = 4

# Address-family values of NULL/LOOP headers meaning IPv4 or IPv6 (BSD variants differ).
AF_INET_VALUES = frozenset({2})
AF_INET6_VALUES = frozenset({10, 24, 28, 30})


class Err:
    """Fixed reason codes for packets that do not become part of a flow.

    They are the keys of a capture's ``decode_errors`` in the report, so they
    never change meaning.  ``non_ip`` is not damage: it is ARP, LLDP and other
    traffic that carries no IP packet.
    """

    TRUNCATED_LINK = "truncated_link"
    NON_IP = "non_ip"
    TRUNCATED_IP = "truncated_ip"
    BAD_IP_VERSION = "bad_ip_version"
    BAD_IPV4_HEADER = "bad_ipv4_header"
    TRUNCATED_IPV6_EXT = "truncated_ipv6_ext"
    IPV6_EXT_CHAIN_TOO_LONG = "ipv6_ext_chain_too_long"
    TRUNCATED_TRANSPORT = "truncated_transport"
    ORPHAN_FRAGMENT = "orphan_fragment"
    TOO_MANY_VLAN_TAGS = "too_many_vlan_tags"

    @staticmethod
    def undecoded(linktype: int) -> str:
        return f"undecoded_linktype_{linktype}"


# Error codes as small integers for the vectorized path (index into ERR_NAMES).
ERR_NAMES: tuple[str, ...] = (
    "",
    Err.TRUNCATED_LINK,
    Err.NON_IP,
    Err.TRUNCATED_IP,
    Err.BAD_IP_VERSION,
    Err.BAD_IPV4_HEADER,
    Err.TRUNCATED_IPV6_EXT,
    Err.IPV6_EXT_CHAIN_TOO_LONG,
    Err.TRUNCATED_TRANSPORT,
    Err.ORPHAN_FRAGMENT,
    Err.TOO_MANY_VLAN_TAGS,
)
ERR_CODE: dict[str, int] = {name: i for i, name in enumerate(ERR_NAMES) if name}
ERR_UNDECODED = 255  # plus the link type, kept beside it

# IPv6 extension headers walked to find the transport header.
IPV6_HOPOPTS = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_AH = 51
IPV6_DSTOPTS = 60
IPV6_MOBILITY = 135
IPV6_HIP = 139
IPV6_SHIM6 = 140
IPV6_EXT_HEADERS = frozenset(
    {IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS, IPV6_MOBILITY, IPV6_HIP,
     IPV6_SHIM6}
)
MAX_IPV6_EXT_HEADERS = 16
