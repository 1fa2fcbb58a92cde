"""Fuzz every route of a radixlm server from its own ``/openapi.json`` (the strategies of
``tests/fuzz/fuzz_cases.py``, the invariants of ``tests/fuzz/api_fuzz.py``), route by route, and print per route:
cases run, statuses, the failure found (the case Hypothesis minimized it to).  Without ``--url`` it spawns the fuzz server (a tiny random-weight Llama with
the embedded tokenizer, 512-token context) and restarts it if a failure left it unhealthy.

    python bench/fuzz.py --cases 2000 --seed 1 [--url http://127.0.0.1:30000] [--routes /generate ...]

Exits 1 when anything failed (a case's invariant, or the server not idle and healthy at the end).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fuzz"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import api_fuzz  # noqa: E402
import fuzz_cases  # noqa: E402


class Target:
    """The server under test: one at ``url``, or one this script spawns (and may restart)."""

    def __init__(self, url: str | None, model_dir: str):
        self.url, self.model_dir, self.server = url, model_dir, None
        self.start()

    def start(self) -> None:
        if self.url:
            self.port = urllib.parse.urlparse(self.url).port or 80
            return
        self.server = api_fuzz.FuzzServer(self.model_dir)
        self.port = self.server.port

    def healthy(self) -> bool:
        try:
            return api_fuzz.call(self.port, fuzz_cases.Case("GET", "/health", None, None, "probe"), 10).status == 200
        except OSError:
            return False

    def restart(self) -> str:
        """Restart a spawned server; the old one's log tail."""
        if self.server is None:
            return ""
        log = self.server.output()[-3000:]
        self.server.stop()
        self.start()
        return log

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def fuzz_route(target: Target, spec: dict, route: tuple[str, str], cases: int, seed_value: int,
               statuses: collections.Counter) -> str | None:
    """Run ``cases`` cases on ``route``; the failure (as first seen and as minimized), or None."""
    failures: list[str] = []  # first seen, then each smaller one Hypothesis tries

    @seed(seed_value)
    @settings(max_examples=cases, deadline=None, database=None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz_cases.cases(spec, [route]))
    def run(case: fuzz_cases.Case) -> None:
        try:
            reply = api_fuzz.call(target.port, case)
            statuses[reply.status] += 1
            api_fuzz.check(case, reply)
        except (api_fuzz.Violation, OSError) as e:
            text = str(e) if isinstance(e, api_fuzz.Violation) else f"{type(e).__name__}: {e}\n    case: {case.show()}"
            failures.append(text)
            raise

    try:
        run()
    except Exception as e:
        if not failures:
            return f"failed outside a call: {type(e).__name__}: {e}"
        # The minimized case is the last that failed; the first is kept too, since a case that leaves the server
        # hung or dead makes every later one fail and the "minimized" one meaningless.
        first, last = failures[0], failures[-1]
        return last if first == last else f"first seen: {first}\n  minimized: {last}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="cases in all, spread evenly over the routes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="fuzz this server instead of spawning one")
    parser.add_argument("--routes", nargs="*", help="paths to fuzz (default: every route of the schema)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        target = Target(args.url, api_fuzz.tiny_model_dir(tmp))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{target.port}/openapi.json", timeout=30) as resp:
                spec = json.load(resp)
            routes = [r for r in fuzz_cases.operations(spec) if not args.routes or r[1] in args.routes]
            per_route = max(1, args.cases // len(routes))
            rows, failures, started = [], [], time.monotonic()
            for i, route in enumerate(routes):
                statuses: collections.Counter = collections.Counter()
                failure = fuzz_route(target, spec, route, per_route, args.seed + i, statuses)
                rows.append((f"{route[0]} {route[1]}", sum(statuses.values()), statuses, failure))
                if failure:
                    found = [failure]
                    if not target.healthy():
                        found.append(f"the server was unhealthy afterwards; its log:\n{target.restart()}")
                    for text in found:  # now, not only in the summary: a long run may be cut short
                        print(f"FAILURE {route[0]} {route[1]} ({time.monotonic() - started:.0f} s):\n  {text}\n",
                              flush=True)
                        failures.append((f"{route[0]} {route[1]}", text))
            try:
                idle = api_fuzz.assert_idle(target.port)
                after = f"healthy and idle after the run (KV: {idle['available_kv_tokens']} free + " \
                        f"{idle['cached_kv_tokens']} cached of {idle['max_total_num_tokens']})"
            except (api_fuzz.Violation, OSError) as e:
                failures.append(("after the run", str(e)))
                after = "NOT idle/healthy after the run"
        finally:
            target.stop()

    print(f"\n{'route':<28} {'cases':>6}  {'failed':>6}  statuses")
    for name, count, statuses, failure in rows:
        shown = " ".join(f"{s}:{n}" for s, n in sorted(statuses.items()))
        print(f"{name:<28} {count:>6}  {'yes' if failure else 'no':>6}  {shown}")
    total = sum(r[1] for r in rows)
    print(f"\n{total} cases in {time.monotonic() - started:.0f} s, seed {args.seed}; {len(failures)} failures; {after}")
    for name, failure in failures:
        print(f"\nFAILURE {name}:\n  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
