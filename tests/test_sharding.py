"""Runs tests/sharding_cases.py in a child process with 8 virtual CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, so it cannot
be set in this (shared) test process without changing every other test; the child's report is
printed on failure. The child runs on CPU (``JAX_PLATFORMS=cpu``) on any host. Arguments for the child (e.g. ``-k swizzled``) go in ``QUANTACT_SHARDING_ARGS``.

On a multi-GPU host, ``QUANTACT_SHARDING_DEVICES=gpu pytest tests/test_sharding.py -k gpus -s`` runs the
same cases on a mesh of the GPUs instead (``bench/gpu_run.sh`` does, when it sees more than one GPU);
without that variable that test skips.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_cases(env: dict[str, str]) -> str:
    """Run the cases in a child with ``env``; fails unless they ran and passed (all skipped = failed)."""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           str(ROOT / "tests" / "sharding_cases.py"), *shlex.split(os.environ.get("QUANTACT_SHARDING_ARGS", ""))]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"sharding cases failed (exit {proc.returncode}):\n{report}"
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in summary and "skipped" not in summary, report  # skipped: the child saw no mesh
    return summary


def test_sharding_cases_on_8_virtual_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("QUANTACT_SHARDING_DEVICES", None)  # this one is the 8-CPU-device run
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    _run_cases(env)


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("QUANTACT_SHARDING_DEVICES"),
                    reason="set QUANTACT_SHARDING_DEVICES=gpu on a multi-GPU host")
def test_sharding_cases_on_gpus():
    # NVLink multicast off unless the caller says otherwise (bench/gpu_run.sh exports the same)
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", **os.environ}
    print(f"sharding cases on the {env['QUANTACT_SHARDING_DEVICES']} devices: {_run_cases(env)}")
