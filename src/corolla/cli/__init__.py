"""The command-line tools. corolla's own processes choose their policies before torch loads:

hivemind shares its futures' buffers with torch's ``file_system`` strategy unless told otherwise,
which starts a ``torch_shm_manager`` process per server (~65 MiB); ``file_descriptor`` (torch's
default on Linux) needs none."""

import os

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
