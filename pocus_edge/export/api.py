"""One call per export: build the fused graph, write the artifact(s), check parity, and say
what was written. ``pocus-edge export`` is a thin wrapper around :func:`export_checkpoints`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, ToolchainUnavailable
from ..io import write_json_atomic
from . import parity as parity_mod
from .parity import ParityBars

TARGETS = ("onnx", "tensorrt", "coreml")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportResult:
    target: str
    precision: str
    artifact: Path | None
    onnx_path: Path | None = None
    intermediate: list[Path] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    parity_paths: tuple[Path, Path] | None = None
    tensorrt_ops: dict[str, Any] | None = None
    trtexec: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = []
        if self.artifact is not None:
            lines.append(f"wrote {self.artifact} ({self.target}, {self.precision}, {_size(self.artifact)})")
        for path in self.intermediate:
            lines.append(f"wrote {path} ({_size(path)})")
        if self.parity is not None:
            p = self.parity
            lines.append(
                f"parity ({p['precision']}, {p['backend']}, {p['frames']['count']} frames from {p['frames']['source']}): "
                f"max |diff| {p['max_abs_diff']:.3g} ({p['max_abs_diff_well_conditioned']:.3g} where the fusion is well conditioned), mean {p['mean_abs_diff']:.3g}, mask Dice {p['mask_dice_mean']:.4f} "
                f"-> {'PASS' if p['passed'] else 'FAIL'} ({self.parity_paths[1] if self.parity_paths else ''})"
            )
        if self.tensorrt_ops is not None:
            from .tensorrt import describe_op_issues

            lines.append("TensorRT op check: " + describe_op_issues(self.tensorrt_ops))
        if self.trtexec:
            lines.append(f"trtexec equivalent: {self.trtexec}")
        lines.extend(self.notes)
        return lines


class ToolchainMissing(ToolchainUnavailable):
    """ToolchainUnavailable that carries what was written before the missing tool was needed."""

    def __init__(self, message: str, result: ExportResult):
        super().__init__(message)
        self.result = result


def _size(path: Path) -> str:
    p = Path(path)
    if p.is_dir():
        total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    elif p.exists():
        total = p.stat().st_size
    else:
        return "missing"
    return f"{total / 1e6:.1f} MB"


def _validate(target: str, precision: str, batch: int | None, max_batch: int) -> None:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {max_batch}")
    if target == "coreml" and precision == "int8":
        raise ExportError("Core ML export supports fp16 (ML Program FP16 compute) or fp32, not int8")


def export_checkpoints(
    generative_ckpt: str | os.PathLike,
    contrastive_ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target: str = "onnx",
    precision: str = "fp32",
    method: str = "entropy",
    norm: str = "image",
    formula: str = "weighted",
    uint8_input: bool = False,
    return_branches: bool = False,
    **options: Any,
) -> ExportResult:
    """Load two fine-tuned checkpoints into a FusedSegmenter and export it (see export_model)."""
    from .fused import load_fused

    _validate(target, precision, options.get("batch", 1), options.get("max_batch", 8))
    for path in (generative_ckpt, contrastive_ckpt):
        if not Path(path).is_file():
            raise ExportError(f"{path}: checkpoint not found")
    fused = load_fused(generative_ckpt, contrastive_ckpt, method=method, norm=norm, formula=formula,
                       uint8_input=uint8_input, return_branches=return_branches)
    return export_model(fused, out, target=target, precision=precision, **options)


def export_model(
    fused,
    out: str | os.PathLike,
    *,
    target: str = "onnx",
    precision: str = "fp32",
    calib: str | os.PathLike | None = None,
    calib_frames: int = 64,
    parity_site: str | os.PathLike | None = None,
    parity_frames: int = 8,
    bars: ParityBars | None = None,
    batch: int | None = 1,
    max_batch: int = 8,
    opset: int | None = None,
    frame_shape: tuple[int, int] | None = None,
    timing_cache: str | os.PathLike | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export ``fused`` to ``out`` and write its parity report next to it.

    * onnx: ``out`` is the .onnx file at ``precision``; fp16/int8 keep the fp32 export next to it
      as ``<stem>.fp32.onnx`` (the source of the conversion, and what TensorRT parses).
    * tensorrt: writes ``<stem>.onnx`` (int8: symmetric Q/DQ, as TensorRT requires), checks its
      ops against TensorRT's parser, then builds the engine at ``out``; where TensorRT or a GPU
      is missing raises :class:`ToolchainMissing` (exit code 3) after writing the ONNX.
    * coreml: ``out`` is a .mlpackage with a grayscale image input of ``frame_shape``.

    ``batch=None`` exports a dynamic batch axis (1..max_batch). int8 needs ``calib``: a target
    site whose unlabeled frames calibrate the quantizer. Parity frames come from ``parity_site``
    (default: the calibration site's test split), else random frames (the report says so).
    """
    from .onnx import DEFAULT_OPSET, build_card, export_onnx, gflops_per_frame

    _validate(target, precision, batch, max_batch)
    bars = bars or ParityBars()
    opset = opset or DEFAULT_OPSET
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if precision == "int8" and target != "coreml" and calib is None:
        raise ExportError("int8 needs --calib TARGET_SITE: unlabeled target-probe frames calibrate the quantizer")
    fused = fused.eval()
    site_for_parity = parity_site if parity_site is not None else calib
    frames, source = parity_mod.parity_frames(site_for_parity, fused.img_size, n=parity_frames,
                                              uint8_input=fused.uint8_input, seed=seed)
    reference, weight_sum = parity_mod.torch_reference_with_weights(fused, frames)
    gflops = gflops_per_frame(fused)

    if target == "coreml":
        return _export_coreml(fused, out, precision=precision, frame_shape=frame_shape, bars=bars,
                              frames_site=site_for_parity, n_frames=parity_frames, seed=seed, gflops=gflops,
                              batch=batch, max_batch=max_batch, opset=opset)

    # ---- ONNX (also the input of TensorRT) ----
    if target == "tensorrt":
        onnx_final = out.with_suffix(".onnx") if out.suffix != ".onnx" else out.with_name(out.stem + ".trt.onnx")
    else:
        if out.suffix != ".onnx":
            raise ExportError(f"{out}: an ONNX export is written to a *.onnx file")
        onnx_final = out
    result = ExportResult(target=target, precision=precision, artifact=None)
    needs_fp32_copy = precision != "fp32" and not (target == "tensorrt" and precision == "fp16")
    fp32_path = onnx_final.with_name(onnx_final.stem + ".fp32.onnx") if needs_fp32_copy else onnx_final
    card = build_card(fused, precision="fp32", batch=batch, max_batch=max_batch, opset=opset, gflops=gflops)
    export_onnx(fused, fp32_path, batch=batch, max_batch=max_batch, opset=opset, card=card)
    if needs_fp32_copy:
        result.intermediate.append(fp32_path)
    artifact_onnx = fp32_path
    if precision == "fp16" and target == "onnx":
        from .quantize import convert_fp16

        artifact_onnx = convert_fp16(fp32_path, onnx_final)
    elif precision == "int8":
        from .onnx import INPUT_NAME
        from .quantize import SiteCalibrationReader, quantize_int8

        reader = SiteCalibrationReader(calib, fused.img_size, input_name=INPUT_NAME, n_frames=calib_frames,
                                       uint8_input=fused.uint8_input, seed=seed)
        if batch is not None and batch > 1:
            reader.batch_size = batch
        artifact_onnx = quantize_int8(fp32_path, onnx_final, reader, symmetric_activations=(target == "tensorrt"))
    result.onnx_path = Path(artifact_onnx)
    # For TensorRT fp16 the ONNX stays fp32 (TensorRT picks fp16 kernels itself); its parity is
    # the fp32 graph's, judged by the fp32 bar.
    onnx_precision = "fp32" if (target == "tensorrt" and precision == "fp16") else precision
    report = parity_mod.parity_report(artifact_onnx, fused, frames, precision=onnx_precision, source=source,
                                      bars=bars, reference=reference, weight_sum=weight_sum)
    result.parity = report
    result.parity_paths = parity_mod.write_parity(report, artifact_onnx)
    parity_mod.enforce(report)

    if target == "onnx":
        result.artifact = Path(artifact_onnx)
        return result

    # ---- TensorRT ----
    from .onnx import INPUT_NAME
    from .tensorrt import build_engine, check_tensorrt_ops, describe_op_issues, tensorrt_available, trtexec_command

    ops = check_tensorrt_ops(artifact_onnx)
    result.tensorrt_ops = ops
    write_json_atomic(Path(str(artifact_onnx) + ".tensorrt_ops.json"), ops)
    cache = Path(timing_cache) if timing_cache is not None else out.with_suffix(".timing.cache")
    shape = tuple(fused.input_shape(1))
    result.trtexec = trtexec_command(artifact_onnx, out, input_name=INPUT_NAME, input_shape=shape,
                                     precision=precision, batch=batch, max_batch=max_batch, timing_cache=cache)
    if not ops["compatible"]:
        raise ExportError(f"{artifact_onnx}: {describe_op_issues(ops)}")
    available, why = tensorrt_available()
    if not available:
        raise ToolchainMissing(f"TensorRT engine not built: {why}; the ONNX is written and checked, build it with the trtexec line", result)
    engine = build_engine(artifact_onnx, out, input_name=INPUT_NAME, input_shape=shape, precision=precision,
                          batch=batch, max_batch=max_batch, timing_cache=cache)
    result.artifact = engine
    engine_report = parity_mod.parity_report(
        engine, fused, frames, precision=precision, source=source, bars=bars, reference=reference, weight_sum=weight_sum,
        runner=_tensorrt_runner(engine, INPUT_NAME), backend="tensorrt",
    )
    result.parity = engine_report
    result.parity_paths = parity_mod.write_parity(engine_report, engine)
    parity_mod.enforce(engine_report)
    return result


def _tensorrt_runner(engine_path: Path, input_name: str):
    """frames -> fused probability through a TensorRT engine (TensorRT 10 tensor-address API)."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    max_batch = engine.get_tensor_profile_shape(input_name, 0)[2][0]

    def run(frames: np.ndarray) -> np.ndarray:
        results = []
        stream = torch.cuda.Stream()
        for i in range(0, len(frames), max_batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + max_batch])).cuda()
            if x.shape[0] < max_batch and engine.get_tensor_profile_shape(input_name, 0)[0][0] == max_batch:
                raise ExportError(f"{engine_path}: fixed-batch engine needs batches of {max_batch}")
            context.set_input_shape(input_name, tuple(x.shape))
            context.set_tensor_address(input_name, x.data_ptr())
            buffers = {}
            for name in outputs:
                shape = tuple(context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
                context.set_tensor_address(name, buffers[name].data_ptr())
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            results.append(buffers[outputs[0]].cpu().numpy())
        return np.concatenate(results)

    return run


def _export_coreml(fused, out: Path, *, precision: str, frame_shape, bars: ParityBars, frames_site, n_frames: int,
                   seed: int, gflops: float, batch, max_batch, opset) -> ExportResult:
    from .coreml import ProbeFrameModel, coremltools_status, export_coreml
    from .onnx import build_card

    if fused.uint8_input:
        raise ExportError("Core ML export: drop --uint8-input (the grayscale image input already takes probe pixels)")
    if precision == "fp32":
        raise ExportError("Core ML export is FP16 compute (ML Program); pass --precision fp16")
    card = build_card(fused, precision="fp16", batch=1, max_batch=1, opset=opset, gflops=gflops)
    height, width = frame_shape or (fused.img_size, fused.img_size)
    path = export_coreml(fused, out, frame_shape=(height, width), card=card)
    result = ExportResult(target="coreml", precision="fp16", artifact=path)
    # Parity: the probe-frame preprocessing baked into the package (pad + resize in-graph) versus
    # the Python pipeline (OpenCV preprocess_frame), both through the same PyTorch weights; Core
    # ML's own fp16 prediction is compared where it can run (macOS).
    raw, source = _raw_frames(frames_site, height, width, n_frames, seed)
    from ..data.transforms import preprocess_frame

    pipeline = np.stack([preprocess_frame(f, fused.img_size) for f in raw])
    reference, weight_sum = parity_mod.torch_reference_with_weights(fused, pipeline)
    wrapper = ProbeFrameModel(fused, height, width).eval()
    _, can_predict, message = coremltools_status()
    if can_predict:
        import coremltools as ct
        from PIL import Image

        mlmodel = ct.models.MLModel(str(path))

        def runner(_frames):
            return np.stack([np.asarray(mlmodel.predict({"frame": Image.fromarray(f)})["fused"], dtype=np.float32)[0] for f in raw])

        backend = "coreml (macOS)"
    else:
        import torch

        def runner(_frames):
            with torch.no_grad():
                x = torch.from_numpy(raw.astype(np.float32)[:, None] / 255.0)
                return np.concatenate([wrapper(x[i : i + 1]).numpy() for i in range(len(x))])

        backend = "pytorch ProbeFrameModel (in-graph preprocessing; Core ML prediction needs macOS)"
        result.notes.append(f"Core ML prediction not run: {message}")
    report = parity_mod.parity_report(path, fused, pipeline, precision="fp16", source=source, bars=bars,
                                      reference=reference, weight_sum=weight_sum, runner=runner, backend=backend)
    result.parity = report
    result.parity_paths = parity_mod.write_parity(report, path)
    parity_mod.enforce(report)
    return result


def _raw_frames(site, height: int, width: int, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Raw probe frames of exactly (height, width): a site's test frames resized to that shape
    (real pixels), else random frames."""
    import cv2

    if site is not None:
        from ..data.layout import load_site

        s = load_site(site, check_masks=False)
        records = s.select("test") or s.records
        idx = np.unique(np.linspace(0, len(records) - 1, num=min(n, len(records))).round().astype(int))
        frames = []
        for i in idx:
            img = s.read_image(records[i])
            if img.shape != (height, width):
                img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
            frames.append(img)
        return np.stack(frames), f"site {s.name} ({len(frames)} frames at {height}x{width})"
    side = max(height, width)
    gray, source = parity_mod.parity_frames(None, side, n=n, uint8_input=True, seed=seed)
    return np.ascontiguousarray(gray[:, 0, :height, :width]), f"random frames at {height}x{width} (no site given)"
