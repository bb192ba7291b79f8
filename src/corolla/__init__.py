"""corolla: run large language models collaboratively, BitTorrent-style.

Importing this package has no side effects; heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AutoDistributedModelForCausalLM": "corolla.client.model",
    "AutoDistributedModelForSequenceClassification": "corolla.client.classification",
}
__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "__version__",
]

if TYPE_CHECKING:
    from corolla.client.classification import AutoDistributedModelForSequenceClassification
    from corolla.client.model import AutoDistributedModelForCausalLM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")
