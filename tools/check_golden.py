#!/usr/bin/env python
"""Run every case of a golden folder against openbagel and report the errors.

Usage: python tools/check_golden.py DIR [--dtype float32|bfloat16]

Prints one line per case (kind, max absolute error, max relative L2 error,
PASS/FAIL) and exits non-zero if any case fails. float32 requires relative
L2 error <= 1e-4 on every tensor, identical greedy ids and 8-bit images within
one level; bfloat16 requires identical greedy ids, first-step logits within
0.16 and first-step velocities within 3.6% (twice the reference's own bf16 drift).
"""

from __future__ import annotations

import argparse
import sys

import torch

from openbagel.golden import run_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="golden folder with cases.json, the case files and the tiny checkpoint")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations dtype")
    args = ap.parse_args(argv)
    if args.dtype == "float32":
        print("float32: every tensor within relative L2 error 1e-4, greedy ids identical, 8-bit images within 1 level")
    else:
        print("bfloat16: greedy ids identical, first-step logits within 0.16, first-step velocities within 3.6%")
    results = run_all(args.folder, getattr(torch, args.dtype))
    width = max(len(r.name) for r in results)
    for r in results:
        status = "PASS" if r.ok else "FAIL"
        print(f"{r.name:<{width}}  {r.kind:<14} max_abs={r.max_abs:.3e}  max_rel={r.max_rel:.3e}  {status}")
        for f in r.failures:
            print(f"    {f}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
