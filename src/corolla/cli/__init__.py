"""The command-line tools. corolla's own processes choose their policies before torch loads:

- ``GOMP_SPINCOUNT=10000``: PyTorch's OpenMP workers spin 300,000 times after each operation
  before they sleep (libgomp's default). A server and a client on the same cores then take CPU
  time from each other at every step, and with other work on the machine both collapse. Measured
  with ``benchmarks/bench_decode.py --defaults [--hog]`` (README, Performance).
- hivemind shares its futures' buffers with torch's ``file_system`` strategy unless told otherwise,
  which starts a ``torch_shm_manager`` process per server (~65 MiB); ``file_descriptor`` (torch's
  default on Linux) needs none.

A variable already in the environment wins. ``GOMP_SPINCOUNT`` is set only while torch has not
loaded: libgomp reads it once, when torch loads, so a value set later would not act here but would
tell ``client/threads.py`` that this process's workers do not spin.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
