"""Typed DHT records: what a server announces for each block it hosts."""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECORD_VERSION = 1
MAX_ADDRS = 16  # addresses one record may announce
Address = Annotated[str, Field(min_length=1, max_length=256)]  # a multiaddr without /p2p/


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerInfo(BaseModel):
    """One server's announcement, stored under each hosted block's uid (subkey: peer id)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    record_version: int = RECORD_VERSION
    state: ServerState
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    throughput: float = Field(ge=0)
    torch_dtype: str  # activations travel in it
    quant_type: str = "none"  # weight quantisation: none, int8 or nf4
    tensor_parallel: int = Field(default=1, ge=1)  # devices each block is split across
    adapters: tuple[str, ...] = ()  # LoRA adapters a request may name (active_adapter)
    public_name: str | None = None
    version: str
    max_inference_length: int = Field(ge=0)
    cache_tokens_left: int = Field(ge=0)
    pinned: bool = False  # chose its blocks with --block_indices: never moves when rebalancing
    # where peers can dial it (multiaddrs without its own /p2p/ part; a relayed one names the relay:
    # RELAY_ADDR/p2p/RELAY/p2p-circuit), most useful first: a peer that learned of
    # it only from the DHT hands these to its P2P daemon, which may not find the server otherwise
    addrs: tuple[Address, ...] = Field(default=(), max_length=MAX_ADDRS)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, value: Any) -> ServerInfo | None:
        """Parse a record read from the DHT; ``None`` for anything malformed or of another version."""
        if not isinstance(value, dict) or value.get("record_version") != RECORD_VERSION:
            return None
        try:
            info = cls.model_validate(value)
        except ValidationError:
            return None
        return info if info.end_block > info.start_block else None
