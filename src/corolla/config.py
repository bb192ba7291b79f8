"""Typed, frozen configuration.

Each component receives only its own part: the swarm layer gets ``NetworkConfig``, the
runtime ``LimitsConfig``, and so on. Defaults live here and nowhere else: the CLI builds
its flags from these fields (``metadata["help"]`` is the flag's help text), so ``--help``
shows exactly these defaults. Values are checked once, in ``__post_init__``; checks that
need the machine or the model (CUDA present? blocks inside the model?) happen in the CLI
before anything heavy is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from corolla.errors import ConfigError

BUILTIN_MODEL = "smollm2-135m"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
THROUGHPUT_MODES = ("auto", "eval", "dry_run")
QUANT_TYPES = ("auto", "none", "int8", "nf4")


def default_cache_dir() -> str:
    """``$COROLLA_CACHE_DIR`` or ``~/.cache/corolla`` (XDG-aware)."""
    if os.environ.get("COROLLA_CACHE_DIR"):
        return os.environ["COROLLA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "corolla")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """Bytes from "50GB" (powers of 1000), "100GiB" (powers of 1024) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a size; use e.g. 50GB, 100GiB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check_positive(obj: object) -> None:
    """Every int/float field whose help says "positive" must be > 0."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if "positive" in f.metadata.get("help", "") and value is not None and value <= 0:
            raise ConfigError(f"--{f.name} must be positive, got {value}")


@dataclass(frozen=True)
class NetworkConfig:
    """Where this peer listens, what it announces and which swarm it joins."""

    initial_peers: tuple[str, ...] = field(
        default=(), metadata=_help("multiaddrs of peers already in the swarm to join")
    )
    new_swarm: bool = field(default=False, metadata=_help("start a new private swarm"))
    port: int | None = field(
        default=None,
        metadata=_help("TCP port to listen on (0.0.0.0); positive; conflicts with --host_maddrs"),
    )
    host_maddrs: tuple[str, ...] = field(
        default=(), metadata=_help("multiaddrs to listen on (default: /ip4/0.0.0.0/tcp/0)")
    )
    announce_maddrs: tuple[str, ...] = field(
        default=(), metadata=_help("multiaddrs to announce to others; conflicts with --public_ip")
    )
    public_ip: str | None = field(
        default=None, metadata=_help("this machine's public IP, announced with --port")
    )
    identity_path: str | None = field(
        default=None,
        metadata=_help("file with a persistent peer identity (created if missing), keeps the peer id"),
    )
    swarm_key: str | None = field(
        default=None,
        metadata=_help(
            "file with the swarm's shared secret: only peers holding it take part (make one with "
            "'corolla keygen FILE') (default: an open swarm)"
        ),
    )

    use_relay: bool = field(
        default=True,
        metadata={
            "help": "reach peers behind NAT through circuit relays, and relay for others when reachable "
            "(--no_relay: neither)",
            "off": "no_relay",
        },
    )
    use_auto_relay: bool = field(
        default=True,
        metadata={
            "help": "when peers cannot dial this one back (behind NAT), become reachable through relays "
            "on the --initial_peers (--no_auto_relay, or --no_relay: stay unreachable)",
            "off": "no_auto_relay",
        },
    )
    skip_reachability_check: bool = field(
        default=False,
        metadata=_help(
            "do not ask peers to dial this one back at start; assume it is reachable directly"
        ),
    )

    def __post_init__(self) -> None:
        if self.initial_peers and self.new_swarm:
            raise ConfigError("--initial_peers and --new_swarm conflict: join a swarm or start a new one")
        if self.port is not None and self.host_maddrs:
            raise ConfigError("--port and --host_maddrs conflict: give the port inside --host_maddrs")
        if self.public_ip is not None and self.announce_maddrs:
            raise ConfigError("--public_ip and --announce_maddrs conflict: put the IP in --announce_maddrs")
        if self.public_ip is not None and self.port is None:
            raise ConfigError("--public_ip needs --port (the port that others can reach)")
        for maddr in self.initial_peers:
            if not maddr.startswith("/") or "/p2p/" not in maddr:
                raise ConfigError(
                    f"--initial_peers {maddr!r} is not a full multiaddr; "
                    "expected /ip4/ADDR/tcp/PORT/p2p/PEER_ID as printed by a running peer"
                )
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")

    def listen_maddrs(self) -> list[str]:
        if self.host_maddrs:
            return list(self.host_maddrs)
        port = self.port or 0
        return [f"/ip4/0.0.0.0/tcp/{port}"]

    def public_maddrs(self) -> list[str]:
        if self.announce_maddrs:
            return list(self.announce_maddrs)
        if self.public_ip is not None:
            return [f"/ip4/{self.public_ip}/tcp/{self.port}"]
        return []


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds a server enforces on every request and session."""

    max_batch_size: int = field(
        default=8192, metadata=_help("most tokens (batch x length) in one request; positive")
    )
    inference_max_length: int = field(
        default=8192, metadata=_help("longest inference session, in tokens; positive")
    )
    attn_cache_tokens: int = field(
        default=16384,
        metadata=_help("attention (KV) cache budget of all sessions together, in tokens per block; positive"),
    )
    request_timeout: float = field(default=180.0, metadata=_help("seconds one RPC may take; positive"))
    session_timeout: float = field(
        default=1800.0, metadata=_help("seconds one inference session may last; positive")
    )
    step_timeout: float = field(
        default=300.0, metadata=_help("seconds a session may wait for its next step; positive")
    )
    max_alloc_timeout: float = field(
        default=0.0,
        metadata=_help(
            "seconds a new session waits for attention-cache room when the budget is full, then fails "
            "(0: fail at once); live sessions are never evicted"
        ),
    )
    max_sessions_per_peer: int = field(
        default=16,
        metadata=_help("most inference sessions one client peer may have on this server; positive"),
    )

    def __post_init__(self) -> None:
        _check_positive(self)
        if not 0 <= self.max_alloc_timeout < float("inf"):
            raise ConfigError(f"--max_alloc_timeout must be >= 0 seconds, got {self.max_alloc_timeout}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``corolla serve`` needs; built by the CLI, validated once."""

    model: str = field(
        default=BUILTIN_MODEL,
        metadata=_help(
            "local transformers directory, hub repo id (only the hosted blocks' bytes are fetched) "
            "or built-in name"
        ),
    )
    num_blocks: int | None = field(
        default=None, metadata=_help("how many blocks to host (default: as many as fit in memory); positive")
    )
    block_indices: tuple[int, int] | None = field(
        default=None, metadata=_help("exactly which blocks to host, as START:END (END exclusive)")
    )
    dht_prefix: str | None = field(
        default=None, metadata=_help("the model's name in the DHT (default: derived from the model)")
    )
    public_name: str | None = field(
        default=None, metadata=_help("human-readable name carried in this server's DHT record")
    )
    device: str = field(default="auto", metadata=_help("cuda, cuda:N, mps or cpu (auto: cuda > mps > cpu)"))
    torch_dtype: str = field(
        default="auto",
        metadata=_help("auto (checkpoint dtype; float16 -> float32 on CPU), float32, bfloat16 or float16"),
    )
    quant_type: str = field(
        default="auto",
        metadata=_help(
            "weight quantisation with bitsandbytes: none, int8 (LLM.int8) or nf4 (4-bit NormalFloat); "
            "auto: nf4 on CUDA, none elsewhere"
        ),
    )
    num_threads: int | None = field(
        default=None,
        metadata=_help(
            "CPU threads this server computes with, exactly (default: torch's, one per core, and "
            "decode passes use fewer while that measures faster, as it does when other work runs); "
            "positive. Servers sharing one machine run faster with the cores split between them"
        ),
    )
    tensor_parallel_devices: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "split every block across these devices (e.g. cuda:0 cuda:1): attention heads and MLP "
            "columns sharded, one server in the swarm"
        ),
    )
    adapters: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "LoRA adapters (PEFT format: local directories or hub repos in the local cache) to serve "
            "for the hosted blocks; clients pick one with active_adapter"
        ),
    )
    cache_dir: str = field(
        default_factory=default_cache_dir, metadata=_help("where converted models and caches live")
    )
    revision: str | None = field(
        default=None, metadata=_help(
            "the hub model's branch, tag or commit (default: main); another revision than main also "
            "names a swarm of its own (the default --dht_prefix ends in -REVISION)"
        ),
    )
    token: str | None = field(
        default=None,
        repr=False,
        metadata=_help(
            "Hugging Face access token, for gated and private hub models (default: $HF_TOKEN or the "
            "token saved by 'hf auth login')"
        ),
    )
    max_disk_space: str | None = field(
        default=None,
        metadata=_help(
            "most disk the cached weights of hub models may take under CACHE_DIR/hub, e.g. 50GB or "
            "100GiB; the least recently used models are evicted to make room (default: no limit)"
        ),
    )
    throughput: str = field(
        default="auto",
        metadata=_help(
            "auto (cached measurement, measured once), eval (measure again), dry_run (measure, print, exit) "
            "or a number of tokens/s to announce as is"
        ),
    )
    mean_balance_check_period: float = field(
        default=120.0,
        metadata=_help("mean seconds between checks whether moving elsewhere would help the swarm; positive"),
    )
    balance_quality: float = field(
        default=0.75,
        metadata=_help(
            "move when the swarm's bottleneck would improve beyond this factor (0: never, >1: always)"
        ),
    )
    update_period: float = field(
        default=60.0, metadata=_help("seconds between re-announcements in the DHT; positive")
    )
    expiration: float | None = field(
        default=None,
        metadata=_help("seconds a DHT record lives (default: max(2 x update_period, 60)); positive"),
    )
    metrics_port: int | None = field(
        default=None,
        metadata=_help(
            "serve Prometheus metrics on http://HOST:PORT/metrics, HOST being 0.0.0.0 "
            "(:: when the server listens on IPv6 only) (default: off)"
        ),
    )
    allowed_peers: str | None = field(
        default=None,
        metadata=_help(
            "file of the peer ids this server answers, one per line (# comments); others get "
            "Unauthorized; pushes from other servers are exempt (default: everyone)"
        ),
    )
    network: NetworkConfig = field(default_factory=NetworkConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(f"--metrics_port must be between 1 and 65535, got {self.metrics_port}")
        if self.throughput not in THROUGHPUT_MODES:
            try:
                value = float(self.throughput)
            except ValueError:
                value = -1.0
            if not value > 0 or value == float("inf"):
                raise ConfigError(
                    f"--throughput {self.throughput!r} is not valid; "
                    "use auto, eval, dry_run or a positive number"
                )
        if self.max_disk_space is not None:
            parse_size(self.max_disk_space, "--max_disk_space")
        if self.balance_quality < 0:
            raise ConfigError(f"--balance_quality must be >= 0, got {self.balance_quality}")
        if self.num_blocks is not None and self.block_indices is not None:
            raise ConfigError("--num_blocks and --block_indices conflict: give one of them")
        if self.block_indices is not None:
            start, end = self.block_indices
            if start < 0 or end <= start:
                raise ConfigError(
                    f"--block_indices {start}:{end} is empty or negative; use START:END with 0 <= START < END"
                )
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(
                f"--device {self.device!r} is unknown; use one of {', '.join(DEVICES)} or cuda:N"
            )
        if self.torch_dtype not in DTYPES:
            raise ConfigError(
                f"--torch_dtype {self.torch_dtype!r} is unknown; use one of {', '.join(DTYPES)}"
            )
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(
                f"--quant_type {self.quant_type!r} is unknown; use one of {', '.join(QUANT_TYPES)}"
            )
        if self.tensor_parallel_devices and self.device != "auto":
            raise ConfigError(
                "--device and --tensor_parallel_devices conflict: the first tensor-parallel device "
                "is the server's device; give only --tensor_parallel_devices"
            )

    @property
    def fixed_throughput(self) -> float | None:
        """The number given to --throughput, or None for auto/eval/dry_run."""
        return None if self.throughput in THROUGHPUT_MODES else float(self.throughput)

    @property
    def max_disk_space_bytes(self) -> int | None:
        return None if self.max_disk_space is None else parse_size(self.max_disk_space, "--max_disk_space")

    @property
    def record_expiration(self) -> float:
        return self.expiration if self.expiration is not None else max(2 * self.update_period, 60.0)


@dataclass(frozen=True)
class ClientConfig:
    """How a client finds and talks to servers."""

    initial_peers: tuple[str, ...] = ()
    dht_prefix: str | None = None
    request_timeout: float = 180.0
    step_timeout: float = 60.0
    max_wait_for_blocks: float = 30.0
    update_period: float = 5.0
    max_retries: int = 5  # failed servers per request/step before giving up
    use_push: bool = True  # servers send their outputs straight to the next server of the chain
    ban_timeout: float = 15.0  # first ban of a failed server; doubles on each new failure (max 300 s)
    swarm_key: str | None = None  # file with a closed swarm's shared secret (corolla.swarm.auth)
    identity_path: str | None = None  # file with this client's peer identity (for servers' --allowed_peers)
    # Verified outputs (client/verify.py): the share of steps (and forward passes) re-run on another
    # server holding the same blocks and compared; a server outside the majority is banned.
    verify_fraction: float = 0.0
    verify_tolerance: float | None = None  # relative error per token; None: by dtype (DEFAULT_TOLERANCES)
    verify_seed: int | None = None  # seeds the choice of steps and verifiers (None: random)
    # Activations on the wire (both ways, and servers' pushes) in this dtype instead of each server's
    # own: "bfloat16"/"float16" halve the bytes from float32 servers, for slow uplinks; the outputs
    # are then rounded, so no longer exact (see the README's "Volunteering from home").
    wire_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.wire_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"wire_dtype must be float32, bfloat16 or float16, got {self.wire_dtype!r}")
