"""The LoRA adapters a front end serves, and the protocol of loading and unloading one live.

Served adapters come from ``--lora-paths`` at startup, then from ``load_lora_adapter`` calls.  A request names its
adapter (native ``lora_path``, OpenAI ``model: "<base>:<adapter>"``); ``resolve`` turns that into one adapter name
(or None, the base model) per prompt, or an ``InvalidRequestError`` naming the adapter: LoRA is off, the adapter is
unknown, or it is being unloaded.

Unload semantics: the adapter stops taking new requests at once (they get a 400 naming it), the unload WAITS until
its requests in flight have finished (they complete normally), then every TP rank frees it (its pool slot and its
radix-cache namespace).  Load and unload of one name never overlap.

The engine calls ``resolve`` and ``begin_unload`` under the lock that registers request states, so that a request
which passed ``resolve`` is visible to the unload's wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from radixlm.errors import InvalidRequestError
from radixlm.lora.adapter import LoRAAdapterError

UNLOAD_POLL_S = 0.01  # how often an unload looks whether the adapter's last requests have finished

# Asks every rank's scheduler (Engine.control): (kind, args) -> a reply with .ok and .payload
AskRanks = Callable[[str, dict[str, Any]], Any]


class LoRARegistry:
    """``enabled``: the server runs with ``--enable-lora``; ``startup``: ``--lora-paths`` (name -> path), already
    loaded by every rank when the engine starts."""

    def __init__(self, enabled: bool, startup: dict[str, str]) -> None:
        self.enabled = enabled
        self._paths: dict[str, str] = dict(startup)  # served: name -> path, in order of loading
        self._busy: set[str] = set()  # names being loaded or unloaded
        self._lock = threading.Lock()

    def served(self) -> dict[str, str]:
        """Adapters that take requests now (name -> path), in order of loading."""
        with self._lock:
            return {name: path for name, path in self._paths.items() if name not in self._busy}

    def resolve(self, lora_path: str | list[str | None] | None, num_prompts: int,
                param: str = "lora_path") -> list[str | None]:
        """One adapter name (None: the base model) per prompt: ``lora_path`` is one name for every prompt or a
        list with one entry per prompt.  InvalidRequestError (``param``) for a wrong shape or an adapter that
        does not take requests."""
        if lora_path is None:
            return [None] * num_prompts
        names = [lora_path] * num_prompts if isinstance(lora_path, str) else lora_path
        if not isinstance(names, list) or not all(n is None or isinstance(n, str) for n in names):
            raise InvalidRequestError("lora_path must be an adapter name or a list of them (null: the base model)",
                                      param)
        if len(names) != num_prompts:
            raise InvalidRequestError(f"{len(names)} lora_path entries for {num_prompts} prompts", param)
        for name in names:
            if name is not None:
                self.check(name, param)
        return list(names)

    def check(self, name: str, param: str) -> None:
        """InvalidRequestError unless adapter ``name`` takes requests now."""
        if not self.enabled:
            raise InvalidRequestError(f"LoRA adapter {name!r} requested, but this server serves no adapters: start "
                                      "it with --enable-lora (or --lora-paths)", param)
        with self._lock:
            if name in self._paths and name in self._busy:
                raise InvalidRequestError(f"LoRA adapter {name!r} is being unloaded and takes no new requests",
                                          param)
            if name not in self._paths:
                served = ", ".join(repr(n) for n in self._paths if n not in self._busy) or "none"
                raise InvalidRequestError(f"unknown LoRA adapter {name!r} (served: {served}); load it with "
                                          "/load_lora_adapter", param)

    # ------------------------------------------------------------------ live loading and unloading
    def load(self, name: str, path: str, ask: AskRanks) -> dict[str, Any]:
        """Load adapter ``name`` from ``path`` on every rank (a ``load_lora_adapter`` control request) and serve
        it; returns what the ranks report ({"name", "rank", "target_modules"}).  LoRAAdapterError, nothing
        changed, for a server without LoRA, a bad name, a name already served or an adapter the ranks refused
        (with their message)."""
        if not self.enabled:
            raise LoRAAdapterError("LoRA adapters need a server started with --enable-lora")
        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path:
            raise LoRAAdapterError("lora_name and lora_path must be non-empty strings")
        with self._lock:
            if name in self._paths or name in self._busy:
                raise LoRAAdapterError(f"LoRA adapter {name!r} is already loaded; unload it first")
            self._busy.add(name)
        try:
            info = _checked(ask("load_lora_adapter", {"name": name, "path": path}))
        except BaseException:
            with self._lock:
                self._busy.discard(name)
            raise
        with self._lock:
            self._paths[name] = path
            self._busy.discard(name)
        return info

    def begin_unload(self, name: str) -> None:
        """Stop taking requests for adapter ``name`` (call under the engine's request lock).  LoRAAdapterError
        for a server without LoRA or a name that is not served."""
        if not self.enabled:
            raise LoRAAdapterError("LoRA adapters need a server started with --enable-lora")
        with self._lock:
            if name not in self._paths or name in self._busy:
                served = ", ".join(repr(n) for n in self._paths if n not in self._busy) or "none"
                raise LoRAAdapterError(f"LoRA adapter {name!r} is not loaded (served: {served})")
            self._busy.add(name)

    def finish_unload(self, name: str, in_flight: Callable[[str], int], ask: AskRanks,
                      timeout: float | None) -> None:
        """After ``begin_unload``: wait until ``in_flight(name)`` (the adapter's requests not yet finished) is 0,
        then free the adapter on every rank (an ``unload_lora_adapter`` control request) and forget it.
        TimeoutError after ``timeout`` seconds of waiting (None: no limit): the adapter then serves again, as
        before the unload."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while in_flight(name):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"LoRA adapter {name!r} still has {in_flight(name)} requests in flight "
                                       f"after {timeout} s; it was not unloaded")
                time.sleep(UNLOAD_POLL_S)
            _checked(ask("unload_lora_adapter", {"name": name}))
        except BaseException:
            with self._lock:
                self._busy.discard(name)
            raise
        with self._lock:
            del self._paths[name]
            self._busy.discard(name)


def _checked(reply: Any) -> dict[str, Any]:
    if not reply.ok:
        raise LoRAAdapterError(reply.payload.get("message", "the scheduler refused"))
    return reply.payload
