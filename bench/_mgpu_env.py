"""Environment for the multi-GPU bench scripts, imported before JAX starts (``import _mgpu_env``).

Sets what NCCL, torch and NVSHMEM read at start-up: no JAX memory preallocation (torch shares the GPUs),
NVLink multicast off; with ``--cpu`` on the command line, the CPU platform with 2 virtual devices
unless ``XLA_FLAGS`` already asks for a count.
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)  # NVLink multicast off (read when NCCL starts)
if "--cpu" in sys.argv[1:]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                            "--xla_force_host_platform_device_count=2"]).strip()
