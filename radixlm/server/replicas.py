"""``radixlm serve --dp-size N`` without ``--enable-dp-attention``: N independent replicas of the server behind the
router, in one command.

Process map::

    radixlm serve --dp-size N  (this process: the supervisor, and the router on --host:--port)
     ├─ replica 0: radixlm serve --port P0 --host 127.0.0.1 --base-gpu-id B        (own process group)
     │   └─ its --tp-size scheduler processes, GPUs B .. B+tp-1, torch.distributed on 127.0.0.1:D0
     ├─ replica 1: radixlm serve --port P1 ... --base-gpu-id B+tp
     └─ ...

Each replica is a plain ``radixlm serve`` process (``replica_command``): this server's flags with ``--dp-size 1``,
its own free local HTTP port and (with ``--tp-size`` > 1) torch.distributed port, its own GPUs, and
``--random-seed`` + i (so that replicas sample independently).  The API key goes to the replicas in the
environment (``RADIXLM_API_KEY``), never on a command line.  A replica's stdout and stderr come to this process's
stderr, every line prefixed ``[replica i]``, and the last lines are kept for error messages.

Lifecycle:

- **Startup**: the public port opens only once every replica answers ``/health``; a replica exiting first fails
  the startup (exit status 1) with a message naming it and its last output, and the others are stopped.
- **Serving**: the router (radixlm.router.server, the ``--router-*`` flags) in this process.  A replica that dies
  is logged with its last output and routed around (a refused connection moves its request to another replica
  before any byte is relayed; the router's health checks keep it out); the server goes on with the others, and
  exits with status 1 when none is left (and with status 1 at its stop, having lost one).  Replicas are not
  restarted: ``/list_workers`` and ``/metrics`` show the dead one unhealthy, and a supervisor that wants full
  capacity back restarts the whole command.
- **Stop** (the first SIGTERM or SIGINT): every replica gets SIGTERM and drains (radixlm.server.launch: in-flight
  requests finish within ``--graceful-shutdown-timeout``, new ones get 503), the router relaying their answers;
  once every replica has exited the router stops; status 0 when every replica drained cleanly.  A second signal
  is passed on (the replicas stop at once; status 1).  A replica still alive ``STOP_MARGIN_S`` after its grace
  period is killed with its process group.  If this process is killed outright, each replica notices its parent
  is gone (``SUPERVISOR_PID_ENV``) and drains on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import uvicorn

from radixlm.config import ServerArgs
from radixlm.config.server_args import API_KEY_ENV
from radixlm.engine.child_stderr import OutputTail
from radixlm.router.launch import RouterOptions
from radixlm.router.policy import RouterArgs
from radixlm.router.server import create_router_app
from radixlm.server.launch import SUPERVISOR_PID_ENV, SignalFreeServer

logger = logging.getLogger("radixlm.server")

REPLICA_HOST = "127.0.0.1"  # replicas listen on loopback only: clients reach them through the router
POLL_S = 0.2  # how often the supervisor looks at the replicas (exit status, readiness)
HEALTH_TIMEOUT_S = 2.0
STOP_MARGIN_S = 30.0  # past --graceful-shutdown-timeout: the aborted answers' flush and the engine's shutdown
EXIT_FAILED = 1


@dataclass(frozen=True)
class ReplicaPlan:
    """Replica ``index`` of a ``--dp-size`` server: its ``ServerArgs`` and the command line that serves them."""

    index: int
    args: ServerArgs
    command: list[str]

    @property
    def url(self) -> str:
        return f"http://{self.args.host}:{self.args.port}"

    def describe(self) -> str:
        where = (f"GPUs {self.args.base_gpu_id}..{self.args.base_gpu_id + self.args.tp_size - 1}"
                 if self.args.device == "cuda" else self.args.device)
        return f"replica {self.index} ({self.url}, {where})"


def plan_replicas(args: ServerArgs, ports: list[int]) -> list[ReplicaPlan]:
    """The ``args.dp_size`` replicas of ``args``: replica i listens on ``ports[i]`` and, with ``--tp-size`` > 1,
    rendezvouses at ``127.0.0.1:ports[dp_size + i]`` (``len(ports)``: ``replica_port_count(args)``); its GPUs start
    at ``--base-gpu-id + i * --tp-size``."""
    if len(ports) != replica_port_count(args):
        raise ValueError(f"{replica_port_count(args)} ports are needed, got {len(ports)}")
    n = args.dp_size
    plans = []
    for i in range(n):
        replica = args.replace(dp_size=1, host=REPLICA_HOST, port=ports[i],
                               base_gpu_id=args.base_gpu_id + i * args.tp_size,
                               dist_init_addr=f"{REPLICA_HOST}:{ports[n + i]}" if args.tp_size > 1 else None,
                               random_seed=args.random_seed + i)
        plans.append(ReplicaPlan(i, replica, replica_command(replica)))
    return plans


def replica_port_count(args: ServerArgs) -> int:
    """Local ports the replicas need: an HTTP port each, and a torch.distributed one each with ``--tp-size`` > 1."""
    return args.dp_size * (2 if args.tp_size > 1 else 1)


def replica_command(args: ServerArgs) -> list[str]:
    """The ``radixlm serve`` command line whose flags parse back to ``args`` (every field that differs from its
    default; the API key aside: it goes in the environment, ``replica_env``)."""
    command = [sys.executable, "-m", "radixlm.serve"]
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if f.name == "api_key" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            raise ValueError(f"{flag}: None differs from the default {f.default!r} and has no command-line form")
        command += [flag] if value is True else [flag, str(value)]
    return command


def replica_env(args: ServerArgs, environ: dict[str, str], supervisor_pid: int) -> dict[str, str]:
    """The replicas' environment: ``environ`` with the API key (or none) and the supervisor's pid."""
    env = {**environ, SUPERVISOR_PID_ENV: str(supervisor_pid)}
    env.pop(API_KEY_ENV, None)
    if args.api_key is not None:
        env[API_KEY_ENV] = args.api_key
    return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on the loopback right now (all held open together while they are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((REPLICA_HOST, 0))
        return [s.getsockname()[1] for s in socks]


def bind_public(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening: connections are refused) at the public ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


class Replica:
    """A started replica process (its own process group), its output passed through with a ``[replica i]`` prefix
    and its last lines kept."""

    def __init__(self, plan: ReplicaPlan, env: dict[str, str]) -> None:
        self.plan = plan
        self.output = OutputTail(f"replica-{plan.index}", prefix=f"[replica {plan.index}] ".encode())
        try:
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which stops replicas in order.
            self.proc = subprocess.Popen(plan.command, stdin=subprocess.DEVNULL, stdout=self.output.write_fd,
                                         stderr=self.output.write_fd, env=env, process_group=0)
        finally:
            self.output.close_write_end()
        self.ready = False
        self.reported = False  # its exit was logged

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the replica and its scheduler processes (one process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def exit_message(self, when: str) -> str:
        tail = self.output.tail()
        message = f"{self.plan.describe()} {ended(self.proc.returncode)} {when}."
        if not tail:
            return message + "  It wrote nothing."
        return message + "\nIts last output:\n" + "\n".join("    " + line for line in tail.splitlines())


def serve_replicas(args: ServerArgs, router: RouterArgs, options: RouterOptions) -> int:
    """Serve ``args`` as ``args.dp_size`` replicas behind the router (``router``'s policy and thresholds; its
    workers, host, port and key are set here) until a signal, or until every replica died; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="[radixlm] %(asctime)s %(message)s")
    plans = plan_replicas(args, free_ports(replica_port_count(args)))
    router = dataclasses.replace(router, worker_urls=tuple(p.url for p in plans), host=args.host, port=args.port,
                                 api_key=args.api_key)
    return asyncio.run(Supervisor(args, plans, router, options).serve())


class Supervisor:
    """The replicas' lifecycle and the router in front of them, on this process's asyncio loop (module docstring)."""

    def __init__(self, args: ServerArgs, plans: list[ReplicaPlan], router: RouterArgs,
                 options: RouterOptions) -> None:
        self.args = args
        self.plans = plans
        self.router = router
        self.options = options
        self.replicas: list[Replica] = []
        self.exit_code = 0
        self._signals = 0
        self._stop_deadline: float | None = None  # once stopping: when the replicas left get killed

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        app = create_router_app(self.router, retries=self.options.retries, health=self.options.health)
        server = SignalFreeServer(uvicorn.Config(app, host=self.args.host, port=self.args.port,
                                                 log_level=self.args.log_level, access_log=False,
                                                 timeout_keep_alive=30, timeout_graceful_shutdown=5))
        try:  # bound now (a port in use fails at once, not after the replicas loaded), listening once they are ready
            public = bind_public(self.args.host, self.args.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", self.args.host, self.args.port, exc)
            return EXIT_FAILED
        env = replica_env(self.args, dict(os.environ), os.getpid())
        try:
            for plan in self.plans:
                self.replicas.append(Replica(plan, env))
            logger.info("started %d replicas: %s", len(self.replicas),
                        ", ".join(f"{r.plan.describe()} pid {r.proc.pid}" for r in self.replicas))
            if await self._until_ready():
                await self._serve_router(server, public)
            while any(r.exit_code is None for r in self.replicas):
                self._tick()
                await asyncio.sleep(POLL_S)
            self._tick()
        finally:
            public.close()
            for replica in self.replicas:  # an exception on the way: no replica outlives the supervisor
                if replica.exit_code is None:
                    replica.kill_group()
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.warning("%s: stopping the %d replicas (each drains for up to %g s); send it again to stop at once",
                           sig.name, len(self.replicas), self.args.graceful_shutdown_timeout)
        else:
            logger.warning("%s again: stopping the replicas now", sig.name)
            self.exit_code = EXIT_FAILED
        self._stop_replicas(sig)

    def _stop_replicas(self, sig: int = signal.SIGTERM) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.args.graceful_shutdown_timeout + STOP_MARGIN_S
        for replica in self.replicas:
            replica.signal(sig)

    async def _until_ready(self) -> bool:
        """Whether every replica answered ``/health`` before any exited and before a signal."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as session:
            while self._stop_deadline is None:
                for replica in self.replicas:
                    if replica.exit_code is not None:
                        replica.reported = True
                        logger.error("%s", replica.exit_message("while starting"))
                        logger.error("startup failed: stopping the other replicas")
                        self.exit_code = EXIT_FAILED
                        self._stop_replicas()
                        return False
                    if not replica.ready:
                        replica.ready = await _healthy(session, replica.plan.url)
                if all(r.ready for r in self.replicas):
                    return True
                await asyncio.sleep(POLL_S)
        return False

    async def _serve_router(self, server: uvicorn.Server, public: socket.socket) -> None:
        """The router on the public port until the replicas are gone (stopped, or all dead) or it fails."""
        task = asyncio.create_task(server.serve(sockets=[public]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"radixlm is serving {self.args.model_path or 'the embedded model'} at "
                  f"http://{self.args.host}:{self.args.port} (OpenAI API under /v1): {len(self.replicas)} "
                  f"replicas behind the {self.router.policy} router", flush=True)
        while not task.done() and any(r.exit_code is None for r in self.replicas):
            self._tick()
            await asyncio.sleep(POLL_S)
        self._tick()
        if task.done():  # the router itself failed (uvicorn logged why): nothing serves the replicas any more
            self.exit_code = EXIT_FAILED
            self._stop_replicas()
        elif self._stop_deadline is None:
            logger.error("every replica has died: exiting with status %d", EXIT_FAILED)
            self.exit_code = EXIT_FAILED
        server.should_exit = True
        await task

    def _tick(self) -> None:
        """Log replicas that exited since the last tick; past the stop deadline, kill those left."""
        for replica in self.replicas:
            code = replica.exit_code
            if code is None or replica.reported:
                continue
            replica.reported = True
            if self._stop_deadline is None:
                self.exit_code = EXIT_FAILED  # whatever ends the server later: it lost a replica on the way
                logger.error("%s\nRouted around from now on (%d replicas left)", replica.exit_message("while serving"),
                             sum(r.exit_code is None for r in self.replicas))
                continue
            if code != 0:
                self.exit_code = EXIT_FAILED
            logger.info("%s %s", replica.plan.describe(), ended(code))
        if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
            for replica in self.replicas:
                if replica.exit_code is None:
                    logger.error("%s did not stop in time: killed with its scheduler processes",
                                 replica.plan.describe())
                    replica.kill_group()
                    replica.reported = True
                    self.exit_code = EXIT_FAILED


def ended(code: int) -> str:
    """How a process with this exit status ended (``Popen.returncode``: -N for signal N)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/health") as response:
            return response.status == 200
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return False
