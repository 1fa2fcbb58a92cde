#!/usr/bin/env bash
# GPU run K5 (the H200 machine's 16 CPU cores, no GPU work, ~5 minutes): router overhead under load, radixlm's
# router against sglang-router 0.3.2, each pinned to two cores, mock workers on six, load generators on eight
# (issue #21).  .whl carries the router's wheels (aiohttp, uvloop, httptools, starlette, uvicorn) and
# sglang-router's (sglang_router, orjson, setproctitle, fastapi, pydantic).
#   bash bench/gpu/session_k5.sh     (GPU machine, repository root; carry .whl)
set -uo pipefail
source bench/gpu/setup.sh || exit 1
nproc
timeout 500 python3 bench/router_load.py --duration 8 --rates 1000,5000 --routers ours,sglang --workers 4 \
  --clients 4 --concurrency 256 --cpus router:0-1,workers:2-7,load:8-15 2>&1 | grep -v "^\s*$" | tail -60
