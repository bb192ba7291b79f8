"""A network lab on one machine: public hosts and homes behind NAT, as Linux network namespaces.

Layout (every name below lives inside the lab's own namespaces, so labs never collide)::

    public segment 10.0.0.0/24: a bridge in namespace ``<tag>-sw``
      public host N  (namespace ``<tag>-<name>``)   eth0 10.0.0.(10+N)
      home K's router (namespace ``<tag>-r<K>``)    wan  10.0.0.(100+K), lan 192.168.K.1
        home K's host (namespace ``<tag>-<name>``)  eth0 192.168.K.2, default route via the router

A router masquerades what its home sends out (nftables) and drops every connection begun
outside, like a home router with no port forwarded: a home dials out, nobody dials in. An uplink
cap is a ``tbf`` queue on the router's ``wan`` (what the home sends); a downlink cap one on its
``lan``. A public host's cap is on its ``eth0``. This kernel has no ``netem``: delay stays the job
of ``corolla.lab.relay``.

Processes run in a host with ``ip netns exec``, which execs the command: the pid is the
command's own, so signals reach it. The filesystem is shared, so venvs and caches work as they are.

Needs root and the ``ip``, ``tc`` and ``nft`` commands; ``unavailable_reason()`` says what is missing.
By hand: ``python -m corolla.lab.netlab up two-homes``, ``... exec two-homes home1 -- CMD``,
``... down two-homes``."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PUBLIC_NET = "10.0.0"
STATE_DIR = Path(os.environ.get("COROLLA_LAB_STATE", "/run/corolla-lab"))


class LabError(RuntimeError):
    """The lab could not be built or used; the message says which command failed."""


@dataclass(frozen=True)
class Home:
    """A home behind its own NAT router, with one host in it named ``name``."""

    name: str
    uplink_mbit: float | None = None  # what the home can send; None: uncapped
    downlink_mbit: float | None = None


@dataclass(frozen=True)
class PublicHost:
    """A host on the public segment that anyone can dial."""

    name: str
    uplink_mbit: float | None = None


@dataclass(frozen=True)
class Topology:
    public: tuple[PublicHost, ...] = ()
    homes: tuple[Home, ...] = ()

    def __post_init__(self) -> None:
        names = [h.name for h in self.public] + [h.name for h in self.homes]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        if len(self.public) > 80 or len(self.homes) > 150:
            raise ValueError("at most 80 public hosts and 150 homes")


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str  # its own IP (a home host's is private: others see its router's)
    public: bool
    router_namespace: str | None = None
    router_address: str | None = None  # the home's public face


TOPOLOGIES: dict[str, Topology] = {
    # a public DHT peer and two homes: the acceptance case of a server and a client behind NAT
    "two-homes": Topology(public=(PublicHost("dht"),), homes=(Home("home1"), Home("home2"))),
    # plus a public server host, and capped uplinks
    "mixed": Topology(
        public=(PublicHost("dht"), PublicHost("pub1")),
        homes=(Home("home1", uplink_mbit=20), Home("home2", uplink_mbit=20), Home("home3")),
    ),
}


def unavailable_reason() -> str | None:
    """Why this machine cannot build a lab (one line), or None when it can."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables)"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            hint = " (apt-get install nftables)" if tool == "nft" else " (apt-get install iproute2)"
            return f"the network lab needs the '{tool}' command{hint}"
    return None


def exit_unless_available(prog: str) -> None:
    """For a script that builds labs: exit with status 2 and the reason where this machine cannot,
    and make SIGTERM an exit, so that its ``with Lab.up(...)`` blocks remove their namespaces."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"{prog}: {reason}", file=sys.stderr)
        raise SystemExit(2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _run(argv: Sequence[str], *, stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")


def _in(namespace: str, *argv: str) -> None:
    _run(["ip", "netns", "exec", namespace, *argv])


def _cap(namespace: str, device: str, mbit: float) -> None:
    """A token bucket on ``device``'s egress: ``mbit`` Mbit/s, bursts of 64 KiB, at most 400 ms queued."""
    rate = f"{int(mbit * 1000)}kbit"
    _run(["ip", "-n", namespace, "link", "set", device, "txqueuelen", "1000"])
    _in(namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
        "burst", "64kb", "latency", "400ms")  # fmt: skip


NAT_RULES = """
table ip corolla_nat {
  chain post { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
table ip corolla_fw {
  chain through {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
  chain inbound {
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
"""


@dataclass
class Lab:
    """A built lab: its hosts by name. ``down()`` removes every namespace it made."""

    tag: str
    topology: Topology
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @classmethod
    def up(cls, topology: Topology, tag: str | None = None) -> Lab:
        reason = unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        lab = cls(tag or "cl" + secrets.token_hex(3), topology)
        try:
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    def _namespace(self, name: str) -> str:
        namespace = f"{self.tag}-{name}"
        _run(["ip", "netns", "add", namespace])
        self.namespaces.append(namespace)
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        return namespace

    def _wire(self, switch: str, port: str, namespace: str, device: str, address: str) -> None:
        """A veth from the switch's bridge (port ``port``) to ``device`` in ``namespace``."""
        _run(["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", device,
              "netns", namespace])  # fmt: skip
        _run(["ip", "-n", switch, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device])
        _run(["ip", "-n", namespace, "link", "set", device, "up"])

    def _build(self) -> None:
        switch = self._namespace("sw")
        _run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", switch, "link", "set", "br0", "up"])
        for i, spec in enumerate(self.topology.public):
            namespace = self._namespace(spec.name)
            address = f"{PUBLIC_NET}.{10 + i}"
            self._wire(switch, f"p{i}", namespace, "eth0", address)
            if spec.uplink_mbit:
                _cap(namespace, "eth0", spec.uplink_mbit)
            self.hosts[spec.name] = Host(spec.name, namespace, address, public=True)
        for k, home in enumerate(self.topology.homes, start=1):
            router = self._namespace(f"r{k}")
            wan_address = f"{PUBLIC_NET}.{100 + k}"
            self._wire(switch, f"r{k}", router, "wan", wan_address)
            namespace = self._namespace(home.name)
            _run(["ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                  "netns", namespace])  # fmt: skip
            _run(["ip", "-n", router, "addr", "add", f"192.168.{k}.1/24", "dev", "lan"])
            _run(["ip", "-n", router, "link", "set", "lan", "up"])
            address = f"192.168.{k}.2"
            _run(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0"])
            _run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
            _run(["ip", "-n", namespace, "route", "add", "default", "via", f"192.168.{k}.1"])
            _in(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            _run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=NAT_RULES)
            if home.uplink_mbit:
                _cap(router, "wan", home.uplink_mbit)
            if home.downlink_mbit:
                _cap(router, "lan", home.downlink_mbit)
            self.hosts[home.name] = Host(
                home.name, namespace, address, public=False, router_namespace=router,
                router_address=wan_address,
            )  # fmt: skip

    def down(self) -> None:
        """Remove the lab's namespaces (their processes keep running in none: stop them first)."""
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.namespaces.clear()

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` made to run on ``host``."""
        return ["ip", "netns", "exec", self.host(host).namespace, *argv]

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in this lab; hosts: {', '.join(self.hosts)}") from None

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(host, argv), **kwargs)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- kept between invocations of the command line ---

    def save(self, name: str) -> Path:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path = STATE_DIR / f"{name}.json"
        state = {"tag": self.tag, "topology": asdict(self.topology), "hosts": {k: asdict(v) for k, v in
                 self.hosts.items()}, "namespaces": self.namespaces}  # fmt: skip
        path.write_text(json.dumps(state, indent=1))
        return path

    @classmethod
    def load(cls, name: str) -> Lab:
        path = STATE_DIR / f"{name}.json"
        if not path.exists():
            raise LabError(f"lab {name!r} is not up (no {path}); start it with 'up {name}'")
        state = json.loads(path.read_text())
        topology = Topology(
            public=tuple(PublicHost(**h) for h in state["topology"]["public"]),
            homes=tuple(Home(**h) for h in state["topology"]["homes"]),
        )
        hosts = {k: Host(**v) for k, v in state["hosts"].items()}
        return cls(state["tag"], topology, hosts, state["namespaces"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corolla.lab.netlab",
        description="Build a named network lab (namespaces, NAT, caps), run commands on its hosts, "
        "remove it.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="build the lab and print its hosts")
    up.add_argument("topology", choices=sorted(TOPOLOGIES))
    down = sub.add_parser("down", help="remove the lab")
    down.add_argument("topology", choices=sorted(TOPOLOGIES))
    run = sub.add_parser("exec", help="run a command on one of the lab's hosts")
    run.add_argument("topology", choices=sorted(TOPOLOGIES))
    run.add_argument("host")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            if (STATE_DIR / f"{args.topology}.json").exists():
                raise LabError(f"lab {args.topology!r} is up already; 'down {args.topology}' first")
            lab = Lab.up(TOPOLOGIES[args.topology])
            lab.save(args.topology)
            for host in lab.hosts.values():
                where = "public" if host.public else f"behind NAT (its router: {host.router_address})"
                print(f"{host.name}: {host.address} {where}  namespace {host.namespace}")
        elif args.action == "down":
            lab = Lab.load(args.topology)
            lab.down()
            (STATE_DIR / f"{args.topology}.json").unlink()
        else:
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise LabError("give the command after '--'")
            return Lab.load(args.topology).run(args.host, command).returncode
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
