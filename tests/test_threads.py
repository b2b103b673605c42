"""Thread settings applied when openbagel is imported."""

from __future__ import annotations

import os
import subprocess
import sys


def _policy(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    code = "import openbagel, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_openmp_threads_wait_passively_unless_chosen():
    # busy-waiting OpenMP threads made work 5-30x slower on a loaded machine
    assert _policy(None).strip() == "PASSIVE"
    assert _policy("ACTIVE").strip() == "ACTIVE"  # the user's choice stands
