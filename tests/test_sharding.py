"""Runs tests/sharding_cases.py in a child process with 8 virtual CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, so it cannot
be set in this (shared) test process without changing every other test; the child's report is
printed on failure. The child runs on CPU (``JAX_PLATFORMS=cpu``) on any host. Arguments for the child (e.g. ``-k swizzled``) go in ``QUANTACT_SHARDING_ARGS``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sharding_cases_on_8_virtual_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           str(ROOT / "tests" / "sharding_cases.py"), *shlex.split(os.environ.get("QUANTACT_SHARDING_ARGS", ""))]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"sharding cases failed (exit {proc.returncode}):\n{report}"
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in summary and "skipped" not in summary, report  # skipped: the child saw no 8 devices
