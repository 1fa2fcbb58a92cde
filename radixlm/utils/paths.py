"""Where radixlm keeps what it builds or converts (the embedded model, the CPU kernels)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """``$RADIXLM_CACHE_DIR``, else ``~/.cache/radixlm``."""
    return os.environ.get("RADIXLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "radixlm")
