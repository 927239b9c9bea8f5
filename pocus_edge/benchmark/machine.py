"""Describe the machine a benchmark ran on, so that numbers from different machines can be
compared (`pocus-edge benchmark compare`) and matched to a known device's peak rates."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

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
    "openvino",
    "nncf",
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
    """Name, memory, capability and driver of CUDA device 0, or None without one (or without
    torch loaded: a lean install describes its GPU through NVML alone)."""
    torch = sys.modules.get("torch")
    if torch is None:
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


def nvml_state() -> dict[str, Any] | None:
    """What decides a GPU's speed besides the chip, read through NVML (nvidia-ml-py): driver,
    and per GPU the current and maximum SM/memory clocks, the enforced power limit, the
    performance state and the temperature. None without pynvml or an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError: no driver / no GPU
        return None
    try:
        def read(call, *args):
            try:
                return call(*args)
            except Exception:
                return None

        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = read(pynvml.nvmlDeviceGetName, handle)
            limit_mw = read(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "sm_clock_mhz": read(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": read(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
                "memory_clock_mhz": read(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
                "memory_clock_max_mhz": read(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
                "performance_state": read(pynvml.nvmlDeviceGetPerformanceState, handle),
                "temperature_c": read(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
            })
        driver = read(pynvml.nvmlSystemGetDriverVersion)
        return {"driver": driver.decode() if isinstance(driver, bytes) else driver, "gpus": gpus}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def jetson_power_mode() -> dict[str, Any] | None:
    """The Jetson power mode (``nvpmodel -q``: its name and number), None elsewhere."""
    import shutil

    if shutil.which("nvpmodel") is None:
        return None
    try:
        text = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvpmodel(text)


def parse_nvpmodel(text: str) -> dict[str, Any] | None:
    """``NV Power Mode: MAXN`` + a line with the mode number -> {"name": "MAXN", "id": 0}."""
    name, mode_id = None, None
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("nv power mode"):
            name = line.split(":", 1)[1].strip()
        elif line.isdigit() and mode_id is None:
            mode_id = int(line)
    return None if name is None else {"name": name, "id": mode_id}


def describe_machine(*, hostname: bool = False) -> dict[str, Any]:
    """Everything a reader needs to interpret the numbers: CPU model, usable cores, the flags that
    decide the bf16/int8 paths, GPU and driver (with clocks and power limit through NVML where
    pynvml is installed), the Jetson power mode, library versions, and the load at the time.
    The hostname only with ``hostname=True``: reports travel, machine names need not."""
    model, flags = _cpuinfo()
    load = load_average()
    torch_threads = 0
    if "torch" in sys.modules:  # never import torch just to describe the machine
        torch_threads = sys.modules["torch"].get_num_threads()
    described: dict[str, Any] = {
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
        "nvml": nvml_state(),
        "jetson_power_mode": jetson_power_mode(),
        "versions": _versions(),
    }
    if hostname:
        described["hostname"] = platform.node()
    return described


def _best_rate(run, flops: float, seconds: float) -> float:
    """GFLOP/s of the fastest call of ``run`` within ``seconds`` (after one warm-up call)."""
    run()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _torch_rate(device: str, dtype_name: str, size: int, seconds: float) -> float | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dtype = getattr(torch, dtype_name)
    if dtype is torch.bfloat16 and device == "cpu" and not native_bf16_cpu():
        return None
    if dtype is torch.float16 and device == "cpu":
        return None  # CPU fp16 matmul in torch is emulated: onnxruntime's kernel is the probe
    cuda = device.startswith("cuda")
    if dtype is torch.int8:
        if not cuda:
            return None
        a = torch.randint(-128, 127, (size, size), device=device, dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), device=device, dtype=torch.int8)
        op = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        op = lambda: torch.mm(a, b)  # noqa: E731

    def run():
        op()
        if cuda:
            torch.cuda.synchronize()

    return _best_rate(run, 2.0 * size**3, seconds)


def _matmul_onnx(precision: str, size: int):
    """(ONNX model, input) of one (size x size) @ (size x size) MatMul in ``precision`` (int8:
    the Q/DQ form the int8 exports use, which runtimes run on their integer kernels)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size)).astype(np.float16 if precision == "fp16" else np.float32)
    if precision == "int8":
        elem = TensorProto.FLOAT
        inits = [
            numpy_helper.from_array(rng.integers(-127, 127, (size, size), dtype=np.int8), "w_q"),
            numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
            helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
        ]
    else:
        elem = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        inits = [numpy_helper.from_array(rng.standard_normal((size, size)).astype(x.dtype), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "matmul_probe", [helper.make_tensor_value_info("x", elem, [size, size])],
                              [helper.make_tensor_value_info("y", elem, [size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, x


def _ort_rate(precision: str, size: int, seconds: float, threads: int | None) -> float | None:
    """onnxruntime's CPU rate on the probe MatMul (None without onnx/onnxruntime)."""
    if precision not in ("fp32", "fp16", "int8"):
        return None
    try:
        import onnxruntime as ort

        model, x = _matmul_onnx(precision, size)
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:
        return None
    return _best_rate(lambda: session.run(None, {"x": x}), 2.0 * size**3, seconds)


def _openvino_rate(precision: str, size: int, seconds: float, threads: int | None) -> float | None:
    """OpenVINO's CPU rate on the probe MatMul at its inference precision (bf16: the fp32 graph
    with the bf16 hint, on CPUs with native bf16). None without OpenVINO."""
    if precision not in ("fp32", "bf16", "int8") or (precision == "bf16" and not native_bf16_cpu()):
        return None
    try:
        import openvino as ov

        model, x = _matmul_onnx(precision, size)
    except ImportError:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        path.write_bytes(model.SerializeToString())
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception:
            return None
    request = compiled.create_infer_request()
    return _best_rate(lambda: request.infer({0: x}), 2.0 * size**3, seconds)


def probe_matmul(device: str = "cpu", *, size: int | None = None, seconds: float = 0.3,
                 threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Measured dense matrix-product rate per precision on ``device``, in GFLOP/s (GOPS for
    int8): ``{"gflops": {precision: rate}, "engine": {precision: "torch" | "onnxruntime"}}``.

    Each precision takes the best of the libraries present (torch's BLAS/oneDNN/cuBLAS,
    onnxruntime's and OpenVINO's CPU kernels): it is the machine's measured peak for that
    precision, which each
    benchmark row's achieved GFLOP/s is divided by. It is what the libraries reach, not a
    datasheet figure; devices.yaml holds those for known devices.
    """
    cuda = device.startswith("cuda")
    size = size or (4096 if cuda else 1024)
    rates: dict[str, float] = {}
    engines: dict[str, str] = {}
    for precision, dtype_name in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"), ("int8", "int8")):
        candidates = {"torch": _torch_rate(device, dtype_name, size, seconds)}
        if not cuda:
            candidates["onnxruntime"] = _ort_rate(precision, size, seconds, threads)
            candidates["openvino"] = _openvino_rate(precision, size, seconds, threads)
        found = {k: v for k, v in candidates.items() if v}
        if found:
            engine = max(found, key=found.get)
            rates[precision], engines[precision] = found[engine], engine
    return {"gflops": rates, "engine": engines}


def device_label(machine: dict[str, Any], device: str) -> str:
    """The name a report's device goes by: the GPU's for CUDA runs, the CPU model's otherwise."""
    if device.startswith("cuda") and machine.get("gpu"):
        return machine["gpu"]["name"]
    return re.sub(r"\s+", " ", machine.get("cpu", {}).get("model", "") or "unknown CPU").strip()
