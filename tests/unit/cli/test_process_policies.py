"""What corolla's commands set before torch loads (``corolla/cli/__init__.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

VARIABLES = ("GOMP_SPINCOUNT", "HIVEMIND_MEMORY_SHARING_STRATEGY")
PRINT = f"import os; print(*(os.environ.get(v) for v in {VARIABLES!r}))"


def run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()  # fmt: skip


def test_commands_stop_idle_workers_spinning_before_torch_loads() -> None:
    assert run(f"import corolla.cli; {PRINT}") == "10000 file_descriptor"


def test_the_spin_count_is_not_set_once_torch_has_loaded() -> None:
    # libgomp read its settings when torch loaded: a value set now would say workers do not spin
    assert run(f"import torch; import corolla.cli; {PRINT}") == "None file_descriptor"


def test_a_value_in_the_environment_wins() -> None:
    code = f"import os; os.environ['GOMP_SPINCOUNT'] = '5'; import corolla.cli; {PRINT}"
    assert run(code) == "5 file_descriptor"
