"""``radixlm serve --dp-size N`` without ``--enable-dp-attention`` (radixlm.server.replicas), without starting a
process: the replicas' command lines built from ``ServerArgs`` (ports, GPUs, seeds, the API key kept out of them),
the ``--router-*`` flags reaching the router, the combinations refused, and the replicas' output passed through
with its prefix."""

from __future__ import annotations

import argparse
import asyncio
import os
import types
import subprocess
import sys

import pytest
import torch

import radixlm
from radixlm.cli import main as cli_main
from radixlm.config import ServerArgs
from radixlm.engine.child_stderr import OutputTail
from radixlm.router.launch import RouterOptions
from radixlm.router.workers import HealthChecks
from radixlm.router.policy import RouterArgs
from radixlm.server import replicas
from radixlm.server.launch import SUPERVISOR_PID_ENV, Lifecycle

SERVE = [sys.executable, "-m", "radixlm.serve"]


def serve_args(**kwargs) -> ServerArgs:
    base = dict(device="cpu", attention_backend="torch_native", random_seed=7)
    return ServerArgs(**{**base, **kwargs})


def parse_serve_flags(argv: list[str]) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def test_replica_commands_at_tp1() -> None:
    """One HTTP port each, no rendezvous port, replica i on GPU i and seeded --random-seed + i; the shared flags
    carried, the public host and port not."""
    args = serve_args(dp_size=2, max_total_tokens=2048, host="0.0.0.0", port=8000, enable_metrics=True)
    plans = replicas.plan_replicas(args, [5001, 5002])
    assert [p.command for p in plans] == [
        SERVE + ["--device", "cpu", "--max-total-tokens", "2048", "--attention-backend", "torch_native",
                 "--port", "5001", "--enable-metrics", "--random-seed", "7"],
        SERVE + ["--device", "cpu", "--base-gpu-id", "1", "--max-total-tokens", "2048", "--attention-backend",
                 "torch_native", "--port", "5002", "--enable-metrics", "--random-seed", "8"]]
    assert [p.url for p in plans] == ["http://127.0.0.1:5001", "http://127.0.0.1:5002"]
    assert [p.args.dp_size for p in plans] == [1, 1]
    assert plans[1].describe() == "replica 1 (http://127.0.0.1:5002, cpu)"


def test_replica_commands_at_tp2_use_their_own_gpus_and_rendezvous() -> None:
    """Replica i: GPUs --base-gpu-id + i * tp.., torch.distributed at its own local port (ports[dp + i])."""
    args = serve_args(dp_size=3, tp_size=2, base_gpu_id=1, model_path="/m", api_key="secret")
    assert replicas.replica_port_count(args) == 6
    plans = replicas.plan_replicas(args, [11, 12, 13, 21, 22, 23])
    assert [p.command for p in plans] == [
        SERVE + ["--model-path", "/m", "--device", "cpu", "--tp-size", "2", "--base-gpu-id", str(gpu),
                 "--attention-backend", "torch_native", "--port", str(port), "--random-seed", str(seed),
                 "--dist-init-addr", f"127.0.0.1:{dist}"]
        for gpu, port, seed, dist in ((1, 11, 7, 21), (3, 12, 8, 22), (5, 13, 9, 23))]
    assert [p.args.api_key for p in plans] == ["secret"] * 3
    with pytest.raises(ValueError, match="6 ports are needed"):
        replicas.plan_replicas(args, [11, 12, 13])


def test_the_api_key_goes_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never on a command line (visible in ps); a replica's command parses back to its ServerArgs given the env."""
    args = serve_args(dp_size=2, api_key="secret", tp_size=2, max_total_tokens=512, log_requests=True)
    plan = replicas.plan_replicas(args, [1, 2, 3, 4])[1]
    assert not any("secret" in part for part in plan.command)
    env = replicas.replica_env(args, {"PATH": "/bin", "RADIXLM_API_KEY": "inherited"}, 4242)
    assert env == {"PATH": "/bin", "RADIXLM_API_KEY": "secret", SUPERVISOR_PID_ENV: "4242"}
    keyless = replicas.replica_env(serve_args(dp_size=2), {"RADIXLM_API_KEY": "inherited"}, 1)
    assert keyless == {SUPERVISOR_PID_ENV: "1"}
    monkeypatch.setenv("RADIXLM_API_KEY", "secret")
    assert parse_serve_flags(plan.command[len(SERVE):]) == plan.args


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dp_size": 2, "nnodes": 2, "tp_size": 2, "dist_init_addr": "h:5000"}, "across nodes"),
    ({"dp_size": 2, "dist_init_addr": "127.0.0.1:5000"}, "takes no --dist-init-addr"),
    ({"dp_size": 0}, "--dp-size must be >= 1, got 0"),
    ({"tp_size": 4, "dp_size": 3, "enable_dp_attention": True}, "--dp-size 3 must divide --tp-size 4"),
    ({"base_gpu_id": -1}, "--base-gpu-id must be >= 0, got -1"),
])
def test_bad_combinations_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve_args(**kwargs)


def test_replicas_are_not_data_parallel_attention() -> None:
    """--dp-size 3 alone needs no divisibility by --tp-size; DP attention still does (and is unchanged)."""
    assert serve_args(dp_size=3, tp_size=2).dp_replicas
    assert not serve_args(dp_size=2, tp_size=2, enable_dp_attention=True).dp_replicas
    assert not serve_args().dp_replicas


def test_engine_refuses_replicas() -> None:
    with pytest.raises(ValueError, match=r"run `radixlm serve --dp-size 2`"):
        radixlm.Engine(dp_size=2, device="cpu")


def test_router_flags_of_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The --router-* flags and --host/--port/--api-key reach the router; without them, the router's defaults."""
    calls = []
    monkeypatch.setattr(replicas, "serve_replicas", lambda *a: calls.append(a) or 0)
    common = ["serve", "--dp-size", "2", "--device", "cpu", "--port", "9000", "--host", "0.0.0.0"]
    assert cli_main(common + ["--api-key", "k", "--router-policy", "round_robin", "--router-cache-threshold",
                              "0.5", "--router-balance-abs-threshold", "8", "--router-balance-rel-threshold", "2",
                              "--router-eviction-interval-secs", "7", "--router-max-tree-size", "100",
                              "--router-retry-max-retries", "0", "--router-health-check-interval-secs", "0.5"]) == 0
    args, router, options = calls[-1]
    assert (args.dp_size, args.port, args.api_key) == (2, 9000, "k")
    assert router == RouterArgs(policy="round_robin", cache_threshold=0.5, balance_abs_threshold=8,
                                balance_rel_threshold=2.0, eviction_interval_secs=7.0, max_tree_size=100,
                                host="0.0.0.0", port=9000, api_key="k")
    assert router.api_key == "k" and options == RouterOptions(retries=0, health=HealthChecks(interval_secs=0.5))
    assert cli_main(common) == 0
    assert calls[-1][1:] == (RouterArgs(host="0.0.0.0", port=9000), RouterOptions())


@pytest.mark.parametrize("flags", [["--router-cache-threshold", "2"], ["--router-retry-max-retries", "-1"],
                                   ["--router-policy", "fastest"]])
def test_bad_router_flags_refused(flags: list[str], monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(replicas, "serve_replicas", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--dp-size", "2", "--device", "cpu", *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


def test_router_flags_without_replicas_refused(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """A --router-* flag on a server that runs no router is a usage error, not silently ignored."""
    import radixlm.server.launch as server_launch

    monkeypatch.setattr(server_launch, "launch_server", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--device", "cpu", "--router-policy", "round_robin"])
    assert exc.value.code == 2 and "--router-policy applies to the router in front of --dp-size" in \
        capsys.readouterr().err


def test_free_ports_are_distinct() -> None:
    ports = replicas.free_ports(8)
    assert len(set(ports)) == 8 and all(0 < p < 65536 for p in ports)


def test_output_tail_prefixes_lines_and_keeps_them_plain(capfd: pytest.CaptureFixture) -> None:
    """Every line of a child's output reaches our stderr prefixed, across writes that split lines; the tail is
    the child's text as written."""
    tail = OutputTail("t", prefix=b"[replica 3] ")
    script = "import sys, time; sys.stdout.write('a\\nb'); sys.stdout.flush(); time.sleep(0.05); " \
             "sys.stderr.write('c\\n\\nd\\n'); sys.exit(3)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=tail.write_fd, stderr=tail.write_fd)
    tail.close_write_end()
    assert proc.wait() == 3
    assert tail.tail() == "a\nbc\n\nd"
    assert capfd.readouterr().err == "[replica 3] a\n[replica 3] bc\n\n[replica 3] d\n"


class FakeEngine:
    def __init__(self) -> None:
        self.model_path, self.server_args = "m", types.SimpleNamespace(host="127.0.0.1", port=1)
        self.dead_reason, self.num_in_flight, self.refusing = None, 0, None

    def stop_admitting(self, reason: str) -> None:
        self.refusing = reason


class FakeServer:
    started = should_exit = False

    async def serve(self) -> None:
        self.started = True
        while not self.should_exit:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("supervised_by_parent", [True, False])
def test_a_replica_drains_once_its_supervisor_is_gone(supervised_by_parent: bool) -> None:
    """A replica whose parent is no longer the supervisor's pid (the supervisor was killed) drains and exits 0;
    one whose supervisor lives serves on."""
    engine, server = FakeEngine(), FakeServer()
    supervisor = os.getppid() if supervised_by_parent else os.getppid() + 100000
    lifecycle = Lifecycle(engine, server, types.SimpleNamespace(count=0), grace_s=0, supervisor_pid=supervisor)

    async def run() -> int | None:
        try:
            return await asyncio.wait_for(lifecycle.serve(), 1.0)
        except asyncio.TimeoutError:
            return None

    assert asyncio.run(run()) == (None if supervised_by_parent else 0)
    assert engine.refusing == (None if supervised_by_parent else "the server is shutting down")


def test_gpus_per_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 4 GPUs (faked): --tp-size 2 --dp-size 2 gives replica i GPUs 2i..2i+1; one more replica, or a base
    past the end, is refused naming the GPUs needed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plans = replicas.plan_replicas(ServerArgs(tp_size=2, dp_size=2, random_seed=0), [1, 2, 3, 4])
    assert [p.describe() for p in plans] == ["replica 0 (http://127.0.0.1:1, GPUs 0..1)",
                                             "replica 1 (http://127.0.0.1:2, GPUs 2..3)"]
    assert [p.args.device for p in plans] == ["cuda", "cuda"]
    with pytest.raises(ValueError, match=r"GPUs 0\.\.5 are needed .* but torch sees 4"):
        ServerArgs(tp_size=2, dp_size=3)
    with pytest.raises(ValueError, match=r"GPUs 3\.\.4 are needed \(--base-gpu-id 3, 2 = --tp-size / --nnodes\)"):
        ServerArgs(tp_size=2, base_gpu_id=3)
    assert ServerArgs(tp_size=4, dp_size=4, enable_dp_attention=True).base_gpu_id == 0  # DP attention: 4 GPUs


def test_a_public_port_in_use_fails_before_any_replica_starts(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas, "Replica", lambda *a: pytest.fail("a replica was started"))
    with replicas.bind_public("127.0.0.1", 0) as busy:
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["serve", "--dp-size", "2", "--device", "cpu", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


def test_how_a_replica_ended() -> None:
    assert [replicas.ended(c) for c in (0, 1, -9, -15, -200)] == [
        "exited with code 0", "exited with code 1", "was killed by SIGKILL", "was killed by SIGTERM",
        "exited with code -200"]
