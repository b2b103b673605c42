"""How OpenMP's wait policy changes speed on a loaded machine (issue 17, item 12).

PyTorch's OpenMP threads busy-wait between parallel regions unless
``OMP_WAIT_POLICY=PASSIVE`` (what importing openbagel sets unless it is set).
This runs ``openbagel bench`` (fast path, median of ``--runs``) with
``OMP_WAIT_POLICY=ACTIVE`` and ``PASSIVE`` alternately, each in its own process
(OpenMP reads the variable when torch loads), once on the machine as it is and
once with busy processes on ``--load`` cores, and prints per phase the median
over rounds of each setting and its time over the last setting's (above 1:
the last is faster).

    python benchmarks/threads_under_load.py [--rounds 3] [--load 1] [--config tiny] [--policies ACTIVE,:10000,PASSIVE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: A setting: OMP_WAIT_POLICY's value ("" keeps libgomp's default: spin a while, then sleep;
#: openbagel's own default applies only when the variable is unset), optionally
#: ":N" for GOMP_SPINCOUNT=N (libgomp's spin count before sleeping).
DEFAULT_POLICIES = "ACTIVE,PASSIVE"


def bench(policy: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One ``openbagel bench`` run under ``policy`` (see :data:`DEFAULT_POLICIES`):
    phase -> fast-path median seconds."""
    cmd = [sys.executable, "-m", "openbagel.cli", "bench", "--config", args.config, "--task", "t2i"]
    cmd += ["--size", str(args.size), "--steps", "4", "--runs", str(args.runs), "--json", str(out)]
    wait, _, spin = policy.partition(":")
    env = {**os.environ, "OMP_WAIT_POLICY": wait}
    env.pop("GOMP_SPINCOUNT", None)
    if spin:
        env["GOMP_SPINCOUNT"] = spin
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return {r["phase"]: r["median_s"] for r in json.loads(out.read_text())}


def measure(args: argparse.Namespace, loaded: bool, tmp: Path) -> dict[str, dict[str, list[float]]]:
    """Alternating rounds (the order flips each round); returns policy -> phase -> seconds per round."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load if loaded else 0)]
    policies = args.policies
    times: dict[str, dict[str, list[float]]] = {p: {} for p in policies}
    try:
        for r in range(args.rounds):
            for policy in policies if r % 2 == 0 else policies[::-1]:
                for phase, s in bench(policy, args, tmp / "bench.json").items():
                    times[policy].setdefault(phase, []).append(s)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=1, help="busy processes in the loaded condition")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated; the last is the baseline")
    args = parser.parse_args()
    args.policies = args.policies.split(",")
    with tempfile.TemporaryDirectory() as d:
        for loaded in (False, True):
            times = measure(args, loaded, Path(d))
            label = f"{args.load} busy process(es)" if loaded else "no added load"
            print(f"\n{args.config} t2i {args.size}px, {label}, {args.rounds} rounds (median of each side)")
            base = args.policies[-1]
            names = [p or "(default)" for p in args.policies]
            print(f"{'phase':<14}" + "".join(f"{n + ' ms':>18}" for n in names) + f"   time / {names[-1]}'s")
            for phase in times[base]:
                ms = [statistics.median(times[p][phase]) * 1000 for p in args.policies]
                ratios = " ".join(f"{m / ms[-1]:.2f}x" for m in ms[:-1])
                print(f"{phase:<14}" + "".join(f"{m:>18.1f}" for m in ms) + f"   {ratios}")


if __name__ == "__main__":
    main()
