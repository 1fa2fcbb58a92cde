"""Multi-node tensor parallelism on CPU: two "nodes" on one machine over gloo.  Node 1 (``radixlm.engine.node.Node``,
TP rank 1) runs in a subprocess, started as ``radixlm serve --nnodes 2 --node-rank 1``; node 0 is an ``Engine(tp_size=2, nnodes=2, node_rank=0)`` in this process
(TP rank 0 and the front end).  Greedy outputs equal a TP=1 engine's; stopping node 0 stops node 1 and leaves no
process behind; a rank of node 1 that dies fails node 0's engine instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import radixlm
from radixlm.config import ServerArgs
from radixlm.distributed import free_local_addr
from radixlm.engine.node import Node, output_endpoint
from radixlm.engine.request_state import EngineDeadError

from conftest import build_tiny_hf_model, copy_embedded_tokenizer

COMMON = dict(dtype="float32", random_seed=0, device="cpu", attention_backend="torch_native", max_total_tokens=4096)
CLI_COMMON = ("--dtype", "float32", "--random-seed", "0", "--device", "cpu", "--attention-backend", "torch_native",
              "--max-total-tokens", "4096")
DP2 = dict(dp_size=2, enable_dp_attention=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
EXIT_TIMEOUT_S = 30.0


def start_node1(model: str, addr: str, *flags: str) -> subprocess.Popen:
    """``radixlm serve --nnodes 2 --node-rank 1`` as an operator would run it on the second node."""
    cmd = [sys.executable, "-m", "radixlm.serve", "--model-path", model, "--tp-size", "2", "--nnodes", "2",
           "--node-rank", "1", "--dist-init-addr", addr, *CLI_COMMON, *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def node_pids(node: subprocess.Popen) -> list[int]:
    """The scheduler pids node 1 prints once it is up."""
    for line in node.stdout:
        if "is up" in line:
            return [int(p) for p in line.split("scheduler pids")[1].split()]
    raise AssertionError(f"node 1 exited ({node.wait()}) before it was up")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not reaped yet is gone too
        return f.read().split(") ")[-1].startswith("Z")


def wait_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny DeepSeek-V3 (MLA, MoE) over the embedded model's vocabulary and tokenizer: two ranks split its heads,
    and it runs data-parallel attention."""
    path = str(tmp_path_factory.mktemp("multi_node_v3"))
    build_tiny_hf_model("deepseek_v3", path, overrides={"vocab_size": 49152})
    return copy_embedded_tokenizer(path)


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    with radixlm.Engine(model, **COMMON) as engine:
        return [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("dp_attention", [False, True], ids=["tp2", "tp2_dp2"])
def test_two_nodes_give_tp1_outputs_and_stop_together(model, reference, dp_attention):
    """Under DP attention TP rank 1 (node 1) leads DP rank 1 and sends its requests' tokens over TCP itself."""
    addr = free_local_addr()
    dp = DP2 if dp_attention else {}
    node1 = start_node1(model, addr, *(("--dp-size", "2", "--enable-dp-attention") if dp_attention else ()))
    try:
        with radixlm.Engine(model, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr, **dp,
                            **COMMON) as engine:
            assert len(engine.scheduler_pids()) == 1  # node 0 runs TP rank 0 only
            node1_pids = node_pids(node1)
            assert len(node1_pids) == 1
            outs = engine.generate(PROMPTS, GREEDY)
            if dp_attention:  # both DP ranks served requests: node 1's outputs came back
                assert all(state["cached_kv_tokens"] > 0 for state in engine.control("get_state").payload["dp"])
            local_pids = engine.scheduler_pids()
        assert [o["output_ids"] for o in outs] == reference
        assert node1.wait(EXIT_TIMEOUT_S) == 0  # node 0's stop message ended node 1's scheduler cleanly
        assert wait_gone(local_pids + node1_pids)
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.stdout.close()


def test_a_dead_rank_on_another_node_fails_the_engine(model):
    addr = free_local_addr()
    node1 = start_node1(model, addr)
    try:
        engine = radixlm.Engine(model, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr, **COMMON)
        try:
            (remote,) = node_pids(node1)
            os.kill(remote, signal.SIGKILL)
            deadline = time.monotonic() + EXIT_TIMEOUT_S
            while engine.dead_reason is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert engine.dead_reason is not None  # TP rank 0's broadcast broke: it reported the failure
            with pytest.raises(EngineDeadError):
                engine.generate(PROMPTS[0], GREEDY)
            local_pids = engine.scheduler_pids()
        finally:
            engine.shutdown()
        assert node1.wait(EXIT_TIMEOUT_S) != 0
        assert wait_gone(local_pids)
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.stdout.close()


def test_node_rank_0_is_the_front_end_not_a_node():
    args = ServerArgs(tp_size=2, nnodes=2, node_rank=0, dist_init_addr="127.0.0.1:29500", device="cpu")
    assert output_endpoint(args) == "tcp://127.0.0.1:29501"  # node 0 receives the outputs next to the rendezvous
    with pytest.raises(ValueError, match="node 0 runs the front end"):
        Node(args)
    with pytest.raises(ValueError, match="--node-rank 1"):
        radixlm.Engine(tp_size=2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:29500", device="cpu")
