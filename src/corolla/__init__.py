"""corolla: run large language models collaboratively, BitTorrent-style.

Importing this package has no side effects; heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]

if TYPE_CHECKING:
    from corolla.client.model import AutoDistributedModelForCausalLM


def __getattr__(name: str) -> Any:
    if name == "AutoDistributedModelForCausalLM":
        from corolla.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")
