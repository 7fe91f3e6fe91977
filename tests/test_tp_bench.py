"""The multi-device bench scripts' ``--cpu`` smoke runs, on 2 virtual CPU devices in a child process.

``bench/tp_block_gpu.py`` (the TP MLP block against one device) and the psum cases of
``bench/sharding_gpu.py`` (row parallel, the TP block) are what the lead runs on a multi-GPU host;
here they run on a ``("dp", "tp")`` mesh of shape ``(1, 2)`` in Pallas interpret mode (small shapes),
so a broken script or a broken check shows up before a GPU session. ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]).strip()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--cpu", "--out", str(out), *args],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, f"{script} --cpu failed (exit {proc.returncode}):\n{report}"
    return json.loads(out.read_text())


def test_tp_block_bench_cpu_smoke(tmp_path):
    res = _run("tp_block_gpu.py", tmp_path / "tp.json")
    assert res["ok"] and res["n_gpus"] == 2 and res["interpret"]
    assert {c["key"] for c in res["cases"]} == {"token", "group"}
    for c in res["cases"]:
        assert c["ok"] and not c["errors"], c
        assert set(c["checks"]) == {"residual", "shard_ref", "vs_single", "accuracy"}
        assert all(v["ok"] for v in c["checks"].values()), c["checks"]
        # two partials: a + b == b + a, so TP equals its shard-by-shard composition bit for bit
        assert c["checks"]["shard_ref"]["bit_exact"] and c["checks"]["residual"]["bit_exact"]
        assert c["single"]["wall_us"] > 0 and c["tp"]["wall_us"] > 0 and "speedup_wall" in c


def test_sharding_gpu_cpu_smoke_psum_cases(tmp_path):
    res = _run("sharding_gpu.py", tmp_path / "sharding.json", "--only", "row parallel,TP MLP")
    assert res["ok"] and res["env"]["n_devices"] == 2
    names = [c["case"] for c in res["cases"]]
    assert len(names) == 3 and all(c["ok"] for c in res["cases"]), res["cases"]
