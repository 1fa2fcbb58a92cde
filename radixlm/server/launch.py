"""``radixlm serve``: the engine (scheduler processes) plus the HTTP server in this process, and its lifecycle.

- **Drain** (the first SIGTERM or SIGINT): new requests get 503 with ``Retry-After`` and ``/health`` answers 503 (load
  balancers take the server out), while the requests in flight, streaming or not, go on for up to
  ``--graceful-shutdown-timeout`` seconds.  What is left then is aborted: its client gets the partial answer with
  finish_reason ``abort``.  Then the HTTP server stops, the engine shuts down, and the exit status is 0.  A second
  SIGTERM or SIGINT stops at once (exit status 1: answers may have been cut).
- **Engine failure** (the scheduler raised, its watchdog fired, or it was killed): the requests in flight get a 500
  naming the error, new ones a 503; once the in-flight responses are written (``FAILED_FLUSH_S`` at most) the server
  exits with status 1, so that a supervisor (systemd, Kubernetes) restarts it.
- If this process is killed outright, the schedulers notice their parent is gone and exit on their own.  A
  ``--dp-size`` replica (radixlm.server.replicas) likewise drains and exits when its supervisor is gone
  (``SUPERVISOR_PID_ENV``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from radixlm.config import ServerArgs

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine
    from radixlm.server.app import InFlight

logger = logging.getLogger("radixlm.server")

WATCH_INTERVAL_S = 0.1  # how often the lifecycle looks at the engine and the requests in flight
ABORTED_FLUSH_S = 10.0  # after the grace period: time for the aborted requests' answers to be written
FAILED_FLUSH_S = 5.0  # after an engine failure: time for the in-flight requests' errors to be written
EXIT_ENGINE_FAILED = 1
EXIT_FORCED = 1
SUPERVISOR_PID_ENV = "RADIXLM_SUPERVISOR_PID"  # set by a --dp-size supervisor for its replicas: their parent's pid


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a Jinja file, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def launch_server(server_args: ServerArgs) -> int:
    """Serve until a signal or an engine failure; the process's exit status (0: a clean drain)."""
    from radixlm.engine.engine import Engine
    from radixlm.server.app import create_app

    logging.basicConfig(level=server_args.log_level.upper(), format="[radixlm] %(asctime)s %(message)s")
    chat_template = load_chat_template(server_args.chat_template)
    engine = Engine(**dataclasses.asdict(server_args))
    try:
        app = create_app(engine, chat_template)
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                log_level=server_args.log_level, timeout_keep_alive=30,
                                timeout_graceful_shutdown=5)
        server = SignalFreeServer(config)
        supervisor = os.environ.get(SUPERVISOR_PID_ENV)
        lifecycle = Lifecycle(engine, server, app.state.in_flight, server_args.graceful_shutdown_timeout,
                              int(supervisor) if supervisor else None)
        return asyncio.run(lifecycle.serve())
    finally:
        engine.shutdown()


class SignalFreeServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the caller's lifecycle owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Lifecycle:
    def __init__(self, engine: "Engine", server: "uvicorn.Server", in_flight: "InFlight", grace_s: float,
                 supervisor_pid: int | None = None):
        """``supervisor_pid``: drain as on SIGTERM once this process's parent is no longer that pid."""
        self.engine = engine
        self.supervisor_pid = supervisor_pid
        self.server = server
        self.in_flight = in_flight
        self.grace_s = grace_s
        self.exit_code = 0
        self._signalled = asyncio.Event()
        self._signals = 0

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        task = asyncio.create_task(self.server.serve())
        while not self.server.started and not task.done():
            await asyncio.sleep(0.05)
        if self.server.started:
            args = self.engine.server_args
            print(f"radixlm is serving {self.engine.model_path} at http://{args.host}:{args.port} "
                  f"(OpenAI API under /v1)", flush=True)
            watcher = asyncio.create_task(self._watch())
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not watcher.done():
                watcher.cancel()
        await task
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.warning("%s: draining (new requests get 503) for up to %g s, then stopping; send it again to "
                           "stop at once", sig.name, self.grace_s)
            self.engine.stop_admitting("the server is shutting down")
            self._signalled.set()
            return
        logger.warning("%s again: stopping now", sig.name)
        self.exit_code = EXIT_FORCED
        self.server.force_exit = True
        self.server.should_exit = True

    async def _watch(self) -> None:
        """Wait for a signal (then drain) or an engine failure (then exit non-zero), whichever comes first."""
        while not self._signalled.is_set() and self.engine.dead_reason is None:
            try:
                await asyncio.wait_for(self._signalled.wait(), WATCH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid:
                logger.warning("the supervisor (pid %d) is gone: draining", self.supervisor_pid)
                self.engine.stop_admitting("the server is shutting down")
                break
        if self.engine.dead_reason is not None:
            logger.error("the engine failed; exiting with status %d once the in-flight responses are written",
                         EXIT_ENGINE_FAILED)
            self.exit_code = EXIT_ENGINE_FAILED
            await self._until_no_request_in_flight(FAILED_FLUSH_S)
        else:
            await self._drain()
        self.server.should_exit = True

    async def _drain(self) -> None:
        if not await self._until_no_request_in_flight(self.grace_s):
            left = self.engine.num_in_flight
            logger.warning("grace period over: aborting the %d requests still in flight", left)
            self.engine.abort_all()
            await self._until_no_request_in_flight(ABORTED_FLUSH_S)
        if self.engine.dead_reason is not None:
            self.exit_code = EXIT_ENGINE_FAILED

    async def _until_no_request_in_flight(self, timeout_s: float) -> bool:
        """Whether every HTTP request finished (its response written) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight.count > 0:
            if time.monotonic() >= deadline or self.server.should_exit:
                return False
            await asyncio.sleep(WATCH_INTERVAL_S)
        return True
