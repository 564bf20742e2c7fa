"""Network namespaces for multi-host tests: a server namespace with one veth pair to each
client's namespace (:func:`veth_star`), and the check that a test left none behind
(:func:`namespaces_left`). Built on :mod:`fedq.bench.netlink` (root and iproute2; the two-namespace
link and the two-node Ray cluster that ``fedq bench`` uses live there)."""

from __future__ import annotations

import random
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedq.bench.netlink import LinkUnavailable, link_unavailable_reason, sh, shape


@dataclass(frozen=True)
class Star:
    """A server namespace linked to each client namespace by its own veth pair: ``links[i]`` is
    ``(client namespace, client address, the server's address on that link)``."""

    server_ns: str
    links: list[tuple[str, str, str]]

    @property
    def server_ips(self) -> list[str]:
        return [srv for _, _, srv in self.links]


@contextmanager
def veth_star(clients: int, rate: str | None = None) -> Iterator[Star]:
    """Namespaces ``fqs-<tag>`` and ``fqc<i>-<tag>``, one veth pair per client with a fresh
    ``10.200.X.Y/30`` each, optionally shaped (``tc tbf`` at ``rate`` on both ends), so the
    clients reach the server only across their link; everything is deleted afterwards."""
    reason = link_unavailable_reason()
    if reason:
        raise LinkUnavailable(reason)
    tag = secrets.token_hex(3)
    ns_s = f"fqs-{tag}"
    rng = random.Random(tag)
    net = rng.randrange(256)
    made = [ns_s]
    links = []
    try:
        sh("ip", "netns", "add", ns_s)
        sh("ip", "-n", ns_s, "link", "set", "lo", "up")
        for i in range(clients):
            ns_c, if_s, if_c = f"fqc{i}-{tag}", f"fs{i}{tag}", f"fc{i}{tag}"
            ip_s, ip_c = f"10.200.{net}.{4 * i + 1}", f"10.200.{net}.{4 * i + 2}"
            sh("ip", "netns", "add", ns_c)
            made.append(ns_c)
            sh("ip", "link", "add", if_s, "type", "veth", "peer", "name", if_c)
            for ns, dev, ip in ((ns_s, if_s, ip_s), (ns_c, if_c, ip_c)):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                if rate:
                    shape(ns, dev, rate)
            sh("ip", "-n", ns_c, "link", "set", "lo", "up")
            links.append((ns_c, ip_c, ip_s))
        yield Star(ns_s, links)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def namespaces_left(tag_prefix: str = "fq") -> list[str]:
    """Namespaces whose name starts with ``fqs-``/``fqc-`` (for tests: nothing must leak)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith((f"{tag_prefix}s-", f"{tag_prefix}c-"))]
