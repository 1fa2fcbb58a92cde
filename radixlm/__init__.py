"""radixlm: a fast LLM inference and serving engine."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `import radixlm` (e.g. in a scheduler subprocess) does not pull the front end's imports.
    if name == "Engine":
        from radixlm.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
