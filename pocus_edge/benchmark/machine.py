"""Describe the machine a benchmark ran on, so that numbers from different machines can be
compared (`pocus-edge benchmark compare`) and matched to a known device's peak rates."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU feature flags that decide which reduced-precision paths run natively. x86 names are the
# Linux /proc/cpuinfo spellings; Arm ones are the "Features" line's.
RELEVANT_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "bf16",
    "i8mm",
)

LIBRARIES = (
    "pocus-edge",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "onnxslim",
    "tensorrt",
    "coremltools",
    "triton",
)


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flag set) from /proc/cpuinfo on Linux; sysctl on macOS; platform otherwise."""
    model, flags = "", set()
    path = Path("/proc/cpuinfo")
    if path.is_file():
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    elif platform.system() == "Darwin":
        try:
            model = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return model or platform.processor() or platform.machine(), flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where the OS does not expose them)."""
    return _cpuinfo()[1]


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """True when the CPU executes bf16 matrix math natively (x86 AVX-512 BF16 / AMX, Arm BF16);
    elsewhere torch emulates bf16 and the "fast" path is slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _gpu() -> dict[str, Any] | None:
    """Name, memory, capability and driver of CUDA device 0, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "name": torch.cuda.get_device_name(0),
        "memory_bytes": int(props.total_memory),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": int(props.multi_processor_count),
        "driver": driver,
        "cuda": torch.version.cuda or "",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages ([] where the OS has none)."""
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return []


def describe_machine() -> dict[str, Any]:
    """Everything a reader needs to interpret the numbers: CPU model, usable cores, the flags that
    decide the bf16/int8 paths, GPU and driver, library versions, and the load at the time."""
    model, flags = _cpuinfo()
    load = load_average()
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = 0
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpu": {
            "model": model,
            "cores": _usable_cores(),
            "flags": sorted(f for f in RELEVANT_CPU_FLAGS if f in flags),
            "native_bf16": native_bf16_cpu(flags),
        },
        "torch_threads": torch_threads,
        "load_average": load,
        "gpu": _gpu(),
        "versions": _versions(),
    }


def probe_matmul_gflops(device: str = "cpu", *, size: int | None = None, seconds: float = 0.5) -> dict[str, float]:
    """Measured dense matrix-product rate (GFLOP/s) in fp32 and bf16 on ``device``.

    The compute floor of a machine that has no entry in devices.yaml (this CPU, say) is taken
    from this probe, and the JSON says so: it is what the BLAS reaches, not a datasheet peak.
    """
    import torch

    size = size or (4096 if device.startswith("cuda") else 1024)
    rates: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and device == "cpu" and not native_bf16_cpu():
            continue
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: BLAS/oneDNN kernel selection and thread pool start
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2.0 * size**3 / best / 1e9
    return rates


def device_label(machine: dict[str, Any], device: str) -> str:
    """The name a report's device goes by: the GPU's for CUDA runs, the CPU model's otherwise."""
    if device.startswith("cuda") and machine.get("gpu"):
        return machine["gpu"]["name"]
    return re.sub(r"\s+", " ", machine.get("cpu", {}).get("model", "") or "unknown CPU").strip()
