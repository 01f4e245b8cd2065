"""Two network namespaces joined by a veth pair, for the live benchmarks.

The sender's namespace and the receiver's have no IPv6 (no neighbour
discovery or MLD chatter): the frames a benchmark sends are all that crosses
the veth.  Needs root.
"""

from __future__ import annotations

import subprocess

RX_MAC = "02:00:00:00:00:03"
"""The receiving end's MAC address (frames are addressed to it)."""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setup(prefix: str, tag: str, tx_if: str, rx_if: str) -> tuple[str, str]:
    """Create ``<prefix>-<tag>-tx`` and ``-rx`` joined by ``tx_if``/``rx_if``, both up."""
    tx, rx = f"{prefix}-{tag}-tx", f"{prefix}-{tag}-rx"
    for ns in (tx, rx):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "link", "add", tx_if, "netns", tx, "type", "veth", "peer", rx_if, "netns", rx)
    sh("ip", "-n", rx, "link", "set", rx_if, "address", RX_MAC)
    sh("ip", "-n", tx, "link", "set", tx_if, "up")
    sh("ip", "-n", rx, "link", "set", rx_if, "up")
    return tx, rx


def teardown(tx: str, rx: str) -> None:
    """Delete both namespaces (and with them the veth pair); never raises."""
    for ns in (tx, rx):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
