"""Build small, real MaxMind DB files for tests.

Records are shaped like MaxMind's, e.g. a Country database::

    {"81.2.69.0/24": {"country": {"iso_code": "GB"},
                      "registered_country": {"iso_code": "US"}},
     "214.1.1.0/24": {"traits": {"is_anycast": True}}}

and an ASN database::

    {"89.160.0.0/17": {"autonomous_system_number": 29518,
                       "autonomous_system_organization": "Bredband2 AB"}}

What the files are and are not:

* IPv6 files (the default, like MaxMind's) keep IPv4 networks in the IPv4
  subtree at ``::/96``, where readers look IPv4 addresses up, so an IPv4 lookup
  finds them.  Unlike MaxMind's own files there are no aliases: nothing is
  stored at ``::ffff:0:0/96`` (IPv4-mapped) or ``2002::/16`` (6to4).  That makes
  these files a check that the resolver maps those forms itself.
* Networks may overlap: a more specific network wins whatever the dict order
  (broader networks are written first, which the writer needs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPNetwork, IPSet


def build_mmdb(
    path: str | os.PathLike[str],
    database_type: str,
    records: dict[str, dict[str, Any]],
    *,
    ip_version: int = 6,
    description: str = "egressd test data",
) -> Path:
    """Write a MaxMind DB with ``records`` (network or address → record) to ``path``.

    ``database_type`` goes into the metadata as is (e.g. ``GeoLite2-Country``,
    ``GeoIP2-City``, ``GeoLite2-ASN``), which is what resolvers check.  With
    ``ip_version=4`` the file holds IPv4 only, and IPv6 keys are an error.
    Returns the path as a :class:`~pathlib.Path`.
    """
    writer = MMDBWriter(
        ip_version=ip_version,
        database_type=database_type,
        languages=["en"],
        description={"en": description},
        # IPv4 networks go to ::a.b.c.d/96+n (the IPv4 subtree of an IPv6
        # tree), not to ::ffff:a.b.c.d, where no reader looks.
        ipv4_compatible=ip_version == 6,
        # MaxMind stores numbers such as ASNs and geoname ids as uint32.
        int_type="u32",
    )

    # The writer lets a later broader network overwrite an earlier, more
    # specific one, so insert from the broadest down (by prefix length in the
    # tree: an IPv4 /n sits at /96+n of an IPv6 tree).
    def depth(net: str) -> int:
        n = IPNetwork(net)
        length = int(n.prefixlen)
        return length + 96 if n.version == 4 and ip_version == 6 else length

    networks = sorted(records, key=depth)
    for net in networks:
        writer.insert_network(IPSet([net]), records[net])
    out = Path(path)
    writer.to_db_file(os.fspath(out))
    return out
