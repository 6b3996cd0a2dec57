"""Start llama-cpp-python's own server (``python -m llama_cpp.server``) with the AMX work-around.

Some virtual machines advertise AMX in cpuid without enabling its tile state; llama.cpp then dies
with SIGILL in ``ggml_backend_amx_mul_mat`` on the first model load. ``opt serve --backend
llamacpp`` keeps the weights out of the AMX and repack buffers (``use_extra_bufts = False``);
this launcher applies the same context manager around llama-cpp-python's server, so the peer
server runs the same AVX-512 kernels as ours. It needs the server extras
(``pip install 'llama-cpp-python[server]'``: sse-starlette, starlette-context). Arguments are
llama_cpp.server's own:

    .venv/bin/python benchmarks/llama_cpp_server.py --model FILE.gguf --n_threads 2 --port 8001
"""

from __future__ import annotations

import contextlib
import os
import sys


def main() -> None:
    import llama_cpp
    from llama_cpp.server.__main__ import main as server_main

    from openpto.engines.llamacpp_backend import _without_extra_buffers, cpu_advertises_amx

    keep_extra = os.environ.get("OPT_LLAMACPP_EXTRA_BUFTS") == "1"
    guard = (_without_extra_buffers(llama_cpp) if cpu_advertises_amx() and not keep_extra
             else contextlib.nullcontext())
    sys.argv[0] = "llama_cpp.server"
    with guard:  # held for the server's life: every model load sees the patched defaults
        server_main()


if __name__ == "__main__":
    main()
