"""One node's scheduler processes, and the addresses they talk to the front end on.

Single node (``--nnodes 1``): the ``Engine`` starts every TP rank's scheduler process and they talk to it over
``ipc://`` sockets in a private directory.

Multi-node (``--nnodes N``, the ``--tp-size`` ranks split evenly, node k holding ranks
``[k * tp / N, (k + 1) * tp / N)``): node 0 runs the front end (``Engine``, the HTTP server) and its own ranks; every
other node runs ``run_node``: its ranks' scheduler processes and nothing else (no tokenizer, no HTTP).  All ranks
join one torch.distributed group at ``--dist-init-addr`` (node 0's host:port).  Requests reach TP rank 0 (node 0)
over ``ipc://`` as on a single node and the others by the TP group's broadcast; outputs come back on a ``tcp://``
socket the front end binds at node 0's host, port + 1 of ``--dist-init-addr``, because under data-parallel
attention DP leaders (and their ``SchedulerFailure`` reports) live on other nodes.

Failure: a rank that dies breaks the gloo control group, so its peers' next broadcast raises; every rank's loop
then fails (``scheduler_process``'s failure contract), node 0's front end gets TP rank 0's ``SchedulerFailure``,
and the processes of every node exit non-zero (``run_node`` returns once its processes are gone).  A rank stuck
in a device collective instead is ended by its ``--watchdog-timeout``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from typing import Any, NamedTuple

import zmq

from radixlm.config import ServerArgs
from radixlm.distributed import set_multi_gpu_env
from radixlm.engine.child_stderr import ChildStderr, early_exit_message
from radixlm.engine.io_struct import SchedulerInfo
from radixlm.engine.scheduler_process import run_scheduler_process

logger = logging.getLogger(__name__)

READY_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0  # how long a stopped scheduler may take to leave before it is killed
OUTPUT_PORT_OFFSET = 1  # the multi-node output socket: --dist-init-addr's port + this, on node 0's host


def output_endpoint(server_args: ServerArgs) -> str:
    """``tcp://host:port`` where the multi-node front end receives the schedulers' outputs (``--nnodes > 1``)."""
    host, _, port = server_args.dist_init_addr.rpartition(":")
    return f"tcp://{host}:{int(port) + OUTPUT_PORT_OFFSET}"


def bind_output(sock: zmq.Socket, server_args: ServerArgs) -> None:
    """Bind the front end's output socket at ``output_endpoint``: ZMQ binds an address, not a host name, so the
    host is resolved here (the schedulers connect to the name)."""
    host, _, port = server_args.dist_init_addr.rpartition(":")
    addr = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)[0][4][0]
    if ":" in addr:  # IPv6
        sock.setsockopt(zmq.IPV6, 1)
        addr = f"[{addr}]"
    sock.bind(f"tcp://{addr}:{int(port) + OUTPUT_PORT_OFFSET}")


class FrontEndSockets(NamedTuple):
    """The front end's bound sockets and the addresses the schedulers connect to."""

    context: zmq.Context
    requests: zmq.Socket  # PUSH to TP rank 0 (at ``in_addr``)
    outputs: zmq.Socket  # PULL from every DP leader (at ``out_addr``)
    in_addr: str
    out_addr: str


def bind_front_end(server_args: ServerArgs, ipc_dir: str) -> FrontEndSockets:
    """Bind the front end's request and output sockets: IPC files in ``ipc_dir`` (a directory only this user may
    enter), made owner-only too, so that no other local user can inject requests or read outputs; across nodes
    the outputs come over TCP at ``output_endpoint`` (DP leaders may live on another node)."""
    multi_node = server_args.nnodes > 1
    in_addr = f"ipc://{ipc_dir}/in"
    out_addr = output_endpoint(server_args) if multi_node else f"ipc://{ipc_dir}/out"
    context = zmq.Context()
    requests = context.socket(zmq.PUSH)
    requests.bind(in_addr)
    outputs = context.socket(zmq.PULL)
    if multi_node:
        bind_output(outputs, server_args)
    else:
        outputs.bind(out_addr)
    for addr in (in_addr, out_addr):
        if addr.startswith("ipc://"):
            os.chmod(addr.removeprefix("ipc://"), 0o600)
    return FrontEndSockets(context, requests, outputs, in_addr, out_addr)


class LocalSchedulers:
    """This node's scheduler processes (``ServerArgs.local_tp_ranks``), started with their stderr passed through.
    ``in_addr``: the front end's request socket (read by TP rank 0 only; None on other nodes); ``out_addr``: its
    output socket."""

    def __init__(self, server_args: ServerArgs, in_addr: str | None, out_addr: str):
        if server_args.tp_size > 1:
            set_multi_gpu_env()  # before the scheduler processes are spawned: they inherit it
        ctx = mp.get_context("spawn")
        self.ranks = list(server_args.local_tp_ranks())
        self.procs: list[mp.process.BaseProcess] = []
        self._pipes: list[Any] = []
        self._stderrs: list[ChildStderr] = []
        for rank in self.ranks:
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_scheduler_process, daemon=True,
                               args=(server_args, rank, in_addr, out_addr, child))
            self._stderrs.append(ChildStderr(proc))  # starts it
            self.procs.append(proc)
            self._pipes.append(parent)

    def wait_ready(self) -> list[SchedulerInfo]:
        """Every local scheduler's ``SchedulerInfo``, in rank order; RuntimeError with a scheduler's error, or its
        last output when it dies first.  A rank reports ready only after torch.distributed joined every rank of
        every node and the KV pool size was agreed over them, so this also waits for the other nodes."""
        return [self._wait_one(i) for i in range(len(self.procs))]

    def _wait_one(self, i: int) -> SchedulerInfo:
        proc, pipe = self.procs[i], self._pipes[i]
        while not pipe.poll(READY_POLL_S):
            if not proc.is_alive() and not pipe.poll():
                raise self._early_exit(i)
        try:
            msg = pipe.recv()
        except EOFError:  # only the child holds the pipe's other end: it died before reporting
            proc.join(STOP_TIMEOUT_S)
            raise self._early_exit(i) from None
        if isinstance(msg, str):
            raise RuntimeError(f"scheduler failed to start: {msg}")
        return msg

    def _early_exit(self, i: int) -> RuntimeError:
        return RuntimeError(early_exit_message(f"scheduler process (tp rank {self.ranks[i]})",
                                               self.procs[i].exitcode, self._stderrs[i].tail()))

    def dead(self) -> list[tuple[int, int | None]]:
        """(TP rank, exit code) of every local scheduler that exited."""
        return [(rank, p.exitcode) for rank, p in zip(self.ranks, self.procs) if not p.is_alive()]

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every process to exit; those still alive are killed."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


class Node:
    """A node other than node 0 (``--node-rank > 0``): its TP ranks' scheduler processes, nothing else.  They
    stop when node 0's front end stops them (the stop message is broadcast over the TP group) or when a rank of
    any node dies (see the module docstring).  ``start`` returns once they are up, ``wait`` until they are gone."""

    def __init__(self, server_args: ServerArgs):
        if server_args.node_rank == 0:
            raise ValueError("node 0 runs the front end: use Engine or `radixlm serve` there, not Node")
        self.server_args = server_args
        self.schedulers: LocalSchedulers | None = None

    def start(self) -> None:
        """Start the schedulers and wait until they joined the whole TP group (node 0's too)."""
        args = self.server_args
        logger.info("node %d of %d: starting TP ranks %d..%d, joining %s", args.node_rank, args.nnodes,
                    args.local_tp_ranks()[0], args.local_tp_ranks()[-1], args.dist_init_addr)
        self.schedulers = LocalSchedulers(args, None, output_endpoint(args))
        try:
            self.schedulers.wait_ready()
        except BaseException:
            self.shutdown()
            raise

    def scheduler_pids(self) -> list[int]:
        return [p.pid for p in self.schedulers.procs] if self.schedulers is not None else []

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until every scheduler process exited (None if ``timeout`` passed first): 0 if all ended
        cleanly, else the first non-zero exit code.  Once one process exited non-zero the others get
        ``STOP_TIMEOUT_S`` to follow (their group is broken) before they are killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            dead = self.schedulers.dead()
            failed = [code for _, code in dead if code != 0]
            if len(dead) == len(self.schedulers.procs) or failed:
                self.schedulers.join(STOP_TIMEOUT_S)
                return failed[0] if failed else 0
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(READY_POLL_S)

    def shutdown(self) -> None:
        """Stop this node's schedulers now (the other nodes' ranks then fail: a node cannot leave alone)."""
        if self.schedulers is None:
            return
        for proc in self.schedulers.procs:
            if proc.is_alive():
                proc.terminate()
        self.schedulers.join(STOP_TIMEOUT_S)


def run_node(server_args: ServerArgs) -> int:
    """``radixlm serve --node-rank k`` (k > 0): run this node's schedulers until they exit; the exit status.
    SIGTERM or SIGINT stops them (which ends the whole multi-node server)."""
    node = Node(server_args)

    def stop(signum: int, _frame: Any) -> None:
        logger.warning("%s: stopping this node's schedulers", signal.Signals(signum).name)
        node.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        node.start()
        ranks = server_args.local_tp_ranks()
        print(f"radixlm node {server_args.node_rank} of {server_args.nnodes} is up: TP ranks {ranks[0]}..{ranks[-1]}, "
              f"scheduler pids {' '.join(map(str, node.scheduler_pids()))}", flush=True)
        code = node.wait()
    finally:
        node.shutdown()
    if code:
        logger.error("a scheduler process of this node exited with status %s", code)
    return code or 0


__all__ = ["LocalSchedulers", "Node", "bind_output", "output_endpoint", "run_node"]
