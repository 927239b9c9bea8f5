"""One call per export: build the artifact, check its parity, and say what was written.

``export_model`` looks its (target, precision) up in the format table (:mod:`.formats`, shared
with the benchmark) and runs that target's list of steps. Every file is built in a staging
folder beside the output and moved into place only after its parity check passed: a failed or
interrupted export leaves nothing under the final name and never replaces a good artifact.
``pocus-edge export`` is a thin wrapper around :func:`export_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ExportError, ToolchainUnavailable
from ..io import write_json_atomic
from . import parity as parity_mod
from .formats import ARTIFACTS, PRECISIONS, TARGETS, ArtifactFormat, artifact_format
from .parity import ParityBars

__all__ = ["ExportOptions", "ExportResult", "ToolchainMissing", "export_checkpoints", "export_model", "TARGETS", "PRECISIONS", "ARTIFACTS"]


@dataclass
class ExportOptions:
    """Everything an export takes besides the model and the output path.

    ``batch=None`` exports a dynamic batch axis (1..max_batch). int8 needs ``calib`` (a target
    site whose unlabeled frames calibrate the quantizer) or ``calibration_frames`` (model-input
    frames in memory). Parity frames come from ``parity_site`` (default: the calibration site's
    test split), else random frames (the report says so); ``parity_frames=0`` skips the parity
    step (the benchmark measures agreement itself). ``fp32_onnx``: reuse this fp32 export of
    the same model instead of tracing it again. ``qualify`` (a ``qualify.json`` of ``pocus-edge
    qualify``; ``qualify_model`` picks one of its models) fills the card's risk threshold and
    drift band of a model exported with its risk output.
    """

    target: str = "onnx"
    precision: str = "fp32"
    calib: str | os.PathLike | None = None
    calib_frames: int = 64
    calibration_frames: np.ndarray | None = None
    parity_site: str | os.PathLike | None = None
    parity_frames: int = 8
    bars: ParityBars = field(default_factory=ParityBars)
    batch: int | None = 1
    max_batch: int = 8
    opset: int = 18
    frame_shape: tuple[int, int] | None = None
    timing_cache: str | os.PathLike | None = None
    fp32_onnx: str | os.PathLike | None = None
    seed: int = 0
    qualify: str | os.PathLike | None = None
    qualify_model: str | None = None


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
    trtexec: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = []
        if self.artifact is not None:
            lines.append(f"wrote {self.artifact} ({self.target}, {self.precision}, {_size(self.artifact)})")
        elif self.onnx_path is not None:
            lines.append(f"wrote {self.onnx_path} (precision-explicit ONNX, {self.precision}, {_size(self.onnx_path)})")
        for path in self.intermediate:
            lines.append(f"wrote {path} ({_size(path)})")
        if self.parity is not None:
            p = self.parity
            lines.append(
                f"parity ({p['precision']}, {p['backend']}, {p['frames']['count']} frames from {p['frames']['source']}): "
                f"max |diff| {p['max_abs_diff']:.3g} ({p['max_abs_diff_well_conditioned']:.3g} where the fusion is well "
                f"conditioned), mean {p['mean_abs_diff']:.3g}, mask Dice {p['mask_dice_mean']:.4f}"
                + (f", risk max |diff| {p['risk_max_abs_diff']:.3g}" if "risk_max_abs_diff" in p else "")
                + f" -> {'PASS' if p['passed'] else 'FAIL'} ({self.parity_paths[1] if self.parity_paths else ''})"
            )
        if self.tensorrt_ops is not None:
            from .tensorrt import describe_op_issues

            lines.append("TensorRT op check: " + describe_op_issues(self.tensorrt_ops))
        lines.extend(self.trtexec)
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
        from .staging import companions

        total = p.stat().st_size + sum(c.stat().st_size for c in companions(p) if c.suffix != ".json")
    else:
        return "missing"
    return f"{total / 1e6:.1f} MB"


def _validate(opts: ExportOptions, out: Path, spec: ArtifactFormat) -> None:
    if opts.batch is not None and opts.batch < 1:
        raise ExportError(f"--batch must be >= 1, got {opts.batch}")
    if opts.max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {opts.max_batch}")
    if spec.graph is not None and spec.precision == "int8" and opts.calib is None and opts.calibration_frames is None:
        raise ExportError("int8 needs --calib TARGET_SITE: unlabeled target-probe frames calibrate the quantizer")
    if out.suffix != spec.suffix and not (spec.target == "tensorrt" and out.suffix in (".plan", ".trt")):
        raise ExportError(f"{out}: a {spec.target} export is written to a *{spec.suffix} {'folder' if spec.suffix == '.mlpackage' else 'file'}")
    # An existing folder where a file goes (or a non-package folder where a package goes) is
    # refused before any work: promotion would otherwise have to delete it.
    if out.is_dir() and not (spec.suffix == ".mlpackage" and (out / "Manifest.json").is_file()):
        raise ExportError(f"{out}: is an existing folder; choose a file name for the {spec.target} artifact")


def export_checkpoints(
    generative_ckpt: str | os.PathLike,
    contrastive_ckpt: str | os.PathLike | None,
    out: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    method: str = "entropy",
    norm: str = "image",
    formula: str = "weighted",
    uint8_input: bool = False,
    return_branches: bool = False,
    risk: bool = False,
) -> ExportResult:
    """Load two fine-tuned checkpoints into a FusedSegmenter (or ONE into a SingleSegmenter when
    ``contrastive_ckpt`` is None) and export it (see :func:`export_model`). ``risk`` adds the
    per-frame risk output (last)."""
    from ..models.fused import load_fused, load_single
    from ..models.weights import check_checkpoint_path

    options = options or ExportOptions()
    spec = artifact_format(options.target, options.precision)
    _validate(options, Path(out), spec)
    for path in (generative_ckpt, contrastive_ckpt):
        if path is not None:
            check_checkpoint_path(path)  # the message every command gives ("is a directory", "no such checkpoint")
    if contrastive_ckpt is None:
        model = load_single(generative_ckpt, uint8_input=uint8_input, risk=risk)
    else:
        model = load_fused(generative_ckpt, contrastive_ckpt, method=method, norm=norm, formula=formula,
                           uint8_input=uint8_input, return_branches=return_branches, risk=risk)
    return export_model(model, out, options)


# ---------------------------------------------------------------------------------------------
# The job every step reads and writes


@dataclass
class _Job:
    model: Any  # an ExportableSegmenter, eval mode
    out: Path
    opts: ExportOptions
    spec: ArtifactFormat
    staging: Path
    result: ExportResult
    frames: np.ndarray | None = None
    frames_source: str = ""
    reference: np.ndarray | None = None
    weight_sum: np.ndarray | None = None
    reference_risk: np.ndarray | None = None
    risk: dict[str, Any] | None = None  # the card's risk entry (a model with the risk output)
    gflops: float | None = None
    fp32_onnx: Path | None = None  # the fp32 graph (staged, or reused)
    graph: Path | None = None  # the precision-explicit graph the artifact is built from (staged)
    pending: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final) to promote
    reports: list[tuple[Path, Path]] = field(default_factory=list)  # passed parity reports, promoted after the artifacts
    stale: list[Path] = field(default_factory=list)  # failed reports of an earlier export, removed on promotion

    def staged(self, final: Path) -> Path:
        return self.staging / final.name

    def keep(self, staged: Path, final: Path, *, intermediate: bool = False) -> None:
        self.pending.append((staged, final))
        if intermediate:
            self.result.intermediate.append(final)

    def promote(self) -> None:
        """Rename the staged files into place: the artifacts, then their passed parity reports
        (so a report never stands beside an artifact that is not there), then drop the failed
        reports an earlier refused export left under these names."""
        from .staging import promote

        for staged, final in self.pending + self.reports:
            promote(staged, final)
        for stale in self.stale:
            stale.unlink(missing_ok=True)
        self.pending.clear()
        self.reports.clear()
        self.stale.clear()


def export_model(model, out: str | os.PathLike, options: ExportOptions | None = None, **overrides: Any) -> ExportResult:
    """Export ``model`` (a FusedSegmenter or a SingleSegmenter) to ``out`` and write its parity
    report next to it.

    * onnx: ``out`` is the .onnx file at its precision; fp16/int8 keep the fp32 export beside it
      as ``<stem>.fp32.onnx``.
    * tensorrt: writes the precision-explicit ``<stem>.onnx`` (fp32; fp16 mixed; int8 symmetric
      Q/DQ), checks its ops against TensorRT's parser, then builds the strongly typed engine at
      ``out`` with its card in ``<out>.json``; where TensorRT or a GPU is missing raises
      :class:`ToolchainMissing` (exit code 3) after writing the ONNX.
    * openvino: ``out`` is NAME.xml (+ NAME.bin).
    * coreml: ``out`` is a .mlpackage with a grayscale image input of ``frame_shape``.

    ``options`` (an :class:`ExportOptions`); keyword ``overrides`` replace its fields.
    """
    from .staging import staging_dir

    opts = dataclasses.replace(options or ExportOptions(), **overrides)
    spec = artifact_format(opts.target, opts.precision)
    out = Path(out)
    _validate(opts, out, spec)
    missing = spec.missing()
    if missing and spec.target in ("openvino", "coreml"):
        raise ToolchainUnavailable(f"{spec.target} export unavailable: {missing} (pip install 'pocus-edge[{spec.target}]')")
    model = model.eval()
    risk = _risk_entry(model, opts)  # a bad qualify.json is refused before any work
    with staging_dir(out) as staging:
        job = _Job(model, out, opts, spec, staging, ExportResult(target=spec.target, precision=spec.precision, artifact=None),
                   risk=risk)
        for step in STEPS[spec.target]:
            step(job)
    return job.result


def _risk_entry(model, opts: ExportOptions) -> dict[str, Any] | None:
    """The card's ``risk`` entry of a model with the risk output (from ``opts.qualify`` when
    given); None for a model without it, where a qualify file is refused as a mistake."""
    if not getattr(model, "risk", False):
        if opts.qualify is not None or opts.qualify_model is not None:
            raise ExportError("--qualify sets the threshold of the risk output: export it with --risk")
        return None
    from .risk import risk_entry

    return risk_entry(model.risk_formula, opts.qualify, opts.qualify_model)


# ---------------------------------------------------------------------------------------------
# Steps


def _reference(job: _Job) -> None:
    """Parity frames and the PyTorch reference on them; GFLOPs per frame for the card."""
    from .onnx import gflops_per_frame

    opts = job.opts
    job.gflops = gflops_per_frame(job.model)
    if opts.parity_frames <= 0:
        return
    site = opts.parity_site if opts.parity_site is not None else opts.calib
    job.frames, job.frames_source = parity_mod.parity_frames(site, job.model.img_size, n=opts.parity_frames,
                                                             uint8_input=job.model.uint8_input, seed=opts.seed)
    job.reference, job.weight_sum, job.reference_risk = parity_mod.torch_reference_outputs(job.model, job.frames)


def _onnx_names(job: _Job) -> tuple[Path, Path]:
    """(final path of the precision-explicit graph, final path of its fp32 source)."""
    out = job.out
    if job.spec.target == "onnx":
        graph = out
    elif job.spec.target in ("tensorrt", "ort"):
        graph = out.with_suffix(".onnx") if out.suffix != ".onnx" else out.with_name(out.stem + ".trt.onnx")
    else:
        graph = out.with_suffix(".fp32.onnx")
    fp32 = graph if job.spec.graph == "fp32" else graph.with_name(graph.stem + ".fp32.onnx")
    return graph, fp32


def _graph(job: _Job) -> None:
    """The precision-explicit ONNX graph: fp32 export, then the fp16 or int8 pass."""
    from .onnx import build_card, export_onnx

    opts, spec = job.opts, job.spec
    graph_final, fp32_final = _onnx_names(job)
    if opts.fp32_onnx is not None:
        job.fp32_onnx = Path(opts.fp32_onnx)
        _check_reused_outputs(job)
    else:
        card = build_card(job.model, precision="fp32", batch=opts.batch, max_batch=opts.max_batch, opset=opts.opset, gflops=job.gflops,
                          risk=job.risk)
        job.fp32_onnx = export_onnx(job.model, job.staged(fp32_final), batch=opts.batch, max_batch=opts.max_batch,
                                    opset=opts.opset, card=card)
        if spec.target != "openvino":  # an IR is converted from it; the ONNX is not kept beside the IR
            job.keep(job.fp32_onnx, fp32_final, intermediate=fp32_final != graph_final)
    if spec.graph == "fp32":
        job.graph = job.fp32_onnx
    elif spec.graph == "fp16":
        from .quantize import convert_fp16

        job.graph = convert_fp16(job.fp32_onnx, job.staged(graph_final))
        job.keep(job.graph, graph_final)
    else:
        from .quantize import quantize_int8

        job.graph = quantize_int8(job.fp32_onnx, job.staged(graph_final), _calibration_reader(job),
                                  symmetric_activations=spec.graph == "int8-tensorrt")
        job.keep(job.graph, graph_final)
    if spec.target != "openvino":
        job.result.onnx_path = graph_final


def _check_reused_outputs(job: _Job) -> None:
    """A reused fp32 graph must have the outputs of the model it stands for (with or without
    risk): its parity would otherwise compare other outputs, or none."""
    from .onnx import read_onnx_card

    stated = read_onnx_card(job.fp32_onnx).get("outputs")
    if stated is not None and list(stated) != job.model.output_names():
        raise ExportError(f"{job.fp32_onnx}: outputs {list(stated)}, but the model exports {job.model.output_names()}")


def _calibration_reader(job: _Job):
    from ..card import EXPORT_INPUT_NAME
    from .quantize import ArrayCalibrationReader, SiteCalibrationReader

    opts = job.opts
    if opts.calibration_frames is not None:
        return ArrayCalibrationReader(opts.calibration_frames, input_name=EXPORT_INPUT_NAME, source="frames in memory")
    reader = SiteCalibrationReader(opts.calib, job.model.img_size, input_name=EXPORT_INPUT_NAME, n_frames=opts.calib_frames,
                                   uint8_input=job.model.uint8_input, seed=opts.seed)
    if opts.batch is not None and opts.batch > 1:
        reader.batch_size = opts.batch
    return reader


def _check_parity(job: _Job, staged: Path, final: Path, backend: str, precision: str, runner: Callable | None = None,
                  label: str | None = None) -> None:
    """The one parity step: the staged artifact through its inference backend against PyTorch.
    A passed report is staged and renamed into place with the artifact; a failed one is written
    beside the final name (``.parity-failed``, the reason for the refusal) and stops the export
    before any promotion."""
    if job.frames is None:
        return
    if runner is None:
        runner = parity_mod.backend_runner(staged, backend, outputs=job.model.risk)
    report = parity_mod.parity_report(final, job.model, job.frames, precision=precision, source=job.frames_source,
                                      bars=job.opts.bars, reference=job.reference, weight_sum=job.weight_sum,
                                      reference_risk=job.reference_risk, runner=runner, backend=label or backend)
    job.result.parity = report
    if report["passed"]:
        staged_paths = parity_mod.write_parity(report, job.staged(final))
        job.result.parity_paths = parity_mod.parity_paths(final)
        job.reports.extend(zip(staged_paths, job.result.parity_paths))
        job.stale.extend(parity_mod.failed_parity_paths(final))
    else:
        job.result.parity_paths = parity_mod.write_parity(report, final)
    parity_mod.enforce(report)


def _parity_graph(job: _Job) -> None:
    graph_final, _ = _onnx_names(job)
    # The graph's own precision; an fp32 graph under an OpenVINO bf16/int8 target is judged as fp32.
    _check_parity(job, job.graph, graph_final, "ort", job.spec.precision if job.spec.graph != "fp32" else "fp32",
                  label="onnxruntime-cpu")


def _promote(job: _Job) -> None:
    job.promote()
    if job.spec.target == "onnx":
        job.result.artifact = job.out


def _tensorrt_engine(job: _Job) -> None:
    """Op check, trtexec lines, then (where TensorRT and a GPU exist) the strongly typed engine."""
    from .tensorrt import build_engine, check_tensorrt_ops, describe_op_issues, tensorrt_available, trtexec_lines

    opts = job.opts
    onnx_final = job.result.onnx_path
    ops = check_tensorrt_ops(onnx_final)
    job.result.tensorrt_ops = ops
    write_json_atomic(Path(str(onnx_final) + ".tensorrt_ops.json"), ops)
    cache = Path(opts.timing_cache) if opts.timing_cache is not None else job.out.with_suffix(".timing.cache")
    shape = tuple(job.model.input_shape(1))
    from ..card import EXPORT_INPUT_NAME

    job.result.trtexec = trtexec_lines(onnx_final, job.out, input_name=EXPORT_INPUT_NAME, input_shape=shape,
                                       batch=opts.batch, max_batch=opts.max_batch, timing_cache=cache)
    if not ops["compatible"]:
        raise ExportError(f"{onnx_final}: {describe_op_issues(ops)}")
    available, why = tensorrt_available()
    if not available:
        raise ToolchainMissing(f"TensorRT engine not built: {why}; the ONNX is written and checked, build it with the trtexec line", job.result)
    staged = job.staged(job.out)
    build_engine(onnx_final, staged, input_name=EXPORT_INPUT_NAME, input_shape=shape, batch=opts.batch,
                 max_batch=opts.max_batch, timing_cache=cache)
    _check_parity(job, staged, job.out, "tensorrt", job.spec.precision)
    job.keep(staged, job.out)
    job.promote()
    job.result.artifact = job.out


def _openvino_ir(job: _Job) -> None:
    from .onnx import read_onnx_card
    from .openvino import export_openvino

    calibration = info = None
    if job.spec.precision == "int8":
        reader = _calibration_reader(job)
        calibration = [next(iter(feed.values())) for feed in iter(reader.get_next, None)]  # {input name: batch}
        info = reader.describe()
        info = info if isinstance(info, dict) else None
    staged = job.staged(job.out)
    export_openvino(job.fp32_onnx, staged, precision=job.spec.precision, card=read_onnx_card(job.fp32_onnx),
                    calibration=calibration, calibration_info=info)
    _check_parity(job, staged, job.out, "openvino", job.spec.precision)
    job.keep(staged, job.out)
    job.promote()
    job.result.artifact = job.out


def _coreml_package(job: _Job) -> None:
    """Core ML: the package with in-graph padding and resizing, and its parity (Core ML's own
    prediction on macOS; elsewhere the same in-graph preprocessing run in PyTorch)."""
    from .coreml import ProbeFrameModel, coremltools_status, export_coreml
    from .onnx import build_card

    model, opts = job.model, job.opts
    if model.uint8_input:
        raise ExportError("Core ML export: drop --uint8-input (the grayscale image input already takes probe pixels)")
    card = build_card(model, precision="fp16", batch=1, max_batch=1, opset=opts.opset, gflops=job.gflops, risk=job.risk)
    height, width = opts.frame_shape or (model.img_size, model.img_size)
    staged = export_coreml(model, job.staged(job.out), frame_shape=(height, width), card=card)
    job.keep(staged, job.out)
    if opts.parity_frames > 0:
        raw, source = _raw_frames(opts.parity_site if opts.parity_site is not None else opts.calib, height, width, opts.parity_frames, opts.seed)
        from ..data.transforms import preprocess_frame

        job.frames = np.stack([preprocess_frame(f, model.img_size) for f in raw])
        job.frames_source = source
        job.reference, job.weight_sum, job.reference_risk = parity_mod.torch_reference_outputs(model, job.frames)
        _, can_predict, message = coremltools_status()
        if can_predict:
            from ..inference import open_backend

            backend = open_backend(staged, "coreml")
            runner, label = (lambda _frames: backend.run(raw)), "coreml (macOS)"
        else:
            import torch

            wrapper = ProbeFrameModel(model, height, width).eval()

            def runner(_frames):
                with torch.no_grad():
                    x = torch.from_numpy(raw.astype(np.float32)[:, None] / 255.0)
                    outputs = [wrapper(x[i : i + 1]) for i in range(len(x))]
                if not model.risk:
                    return np.concatenate([o.numpy() for o in outputs])
                return {"prob": np.concatenate([o[0].numpy() for o in outputs]),
                        "risk": np.concatenate([o[1].numpy() for o in outputs])}

            label = "pytorch ProbeFrameModel (in-graph preprocessing; Core ML prediction needs macOS)"
            job.result.notes.append(f"Core ML prediction not run: {message}")
        _check_parity(job, staged, job.out, "coreml", "fp16", runner=runner, label=label)
    job.promote()
    job.result.artifact = job.out


def _ort_format(job: _Job) -> None:
    """ORT format: the precision-explicit graph (card noting the converting onnxruntime)
    converted by onnxruntime's tool, its required-operators config beside it, parity through
    onnxruntime loading the .ort file."""
    import onnx
    import onnxruntime

    from .onnx import read_onnx_card, set_card
    from .ort import config_path, convert_to_ort

    proto = onnx.load_model(str(job.graph))
    set_card(proto, {**read_onnx_card(job.graph), "ort_format": {"onnxruntime": onnxruntime.__version__}})
    carded = job.staging / (job.out.stem + ".card.onnx")
    onnx.save_model(proto, str(carded))
    staged, config = convert_to_ort(carded, job.staged(job.out))
    _check_parity(job, staged, job.out, "ort", job.spec.precision, label=f"onnxruntime {onnxruntime.__version__} (ORT format)")
    job.keep(staged, job.out)
    job.keep(config, config_path(job.out), intermediate=True)
    job.promote()
    job.result.artifact = job.out


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


# Each target's steps, in order. The format table says which graph, backend and file; these say
# how. A new target adds one line here and its rows in formats.ARTIFACTS.
STEPS: dict[str, tuple[Callable[[_Job], None], ...]] = {
    "onnx": (_reference, _graph, _parity_graph, _promote),
    "tensorrt": (_reference, _graph, _parity_graph, _promote, _tensorrt_engine),
    "openvino": (_reference, _graph, _openvino_ir),
    "coreml": (_reference, _coreml_package),
    "ort": (_reference, _graph, _parity_graph, _ort_format),
}
