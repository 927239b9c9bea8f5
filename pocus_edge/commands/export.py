"""`export`: both branches plus the fusion head as one graph (or one single network)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import ExportTarget, FusionFormula, FusionMethod, FusionNorm, Precision


def _frame_shape(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    from ..errors import ExportError

    parts = text.lower().replace("*", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise ExportError(f"--frame-shape expects HEIGHTxWIDTH (e.g. 480x640), got {text!r}") from None
    return height, width


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        generative: Optional[Path] = typer.Option(None, "--generative", "-g", help="Fine-tuned generative (MIM) branch checkpoint (RUN/model.safetensors)."),
        contrastive: Optional[Path] = typer.Option(None, "--contrastive", "-c", help="Fine-tuned contrastive branch checkpoint (RUN/model.safetensors)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-k", help=(
            "Instead of -g/-c: ONE network, exported without fusion (output 'prob'): a compact student checkpoint "
            "(card 'kind: student'; exported in its reparameterized inference form, its config in the card) or one "
            "fine-tuned branch."
        )),
        target: ExportTarget = typer.Option("onnx", "--target", "-t", "--format", help=(
            "The deployment target: onnx | tensorrt | openvino | coreml | ort (ORT format for onnxruntime minimal "
            "builds; --format is the same option). Here "
            "--target is a format, not the target site."
        )),
        out: Path = typer.Option(..., "--out", "-o", help=(
            "Output: *.onnx (onnx), *.engine (tensorrt; its precision-explicit ONNX and its .json card go next to "
            "it), *.xml (openvino, + .bin), *.mlpackage (coreml), *.ort (ort; its .onnx and "
            "NAME.required_operators.config go next to it)."
        )),
        precision: Precision = typer.Option("fp32", "--precision", "-p", help="fp32 | fp16 | int8 (onnx, tensorrt, ort); fp32 | bf16 | int8 (openvino); fp16 (coreml). int8 needs --calib."),
        calib: Optional[Path] = typer.Option(None, "--calib", help="TARGET site folder: its unlabeled frames calibrate int8 (masks are never read); its test split also serves the parity check."),
        calib_frames: int = typer.Option(64, "--calib-frames", help="Number of calibration frames drawn from the site's train split."),
        batch: int = typer.Option(1, "--batch", "-b", help="Fixed batch size of the graph (ignored with --dynamic-batch)."),
        dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Dynamic batch axis 1..--max-batch instead of a fixed batch."),
        max_batch: int = typer.Option(8, "--max-batch", help="Largest batch of a dynamic graph / TensorRT optimization profile."),
        uint8_input: bool = typer.Option(False, "--uint8-input", help="Graph input is uint8 grayscale (N,1,S,S): /255 and channel repeat happen in the graph (ONNX/TensorRT)."),
        fusion: FusionMethod = typer.Option("entropy", "--fusion", help="Confidence: entropy | margin | average."),
        fusion_norm: FusionNorm = typer.Option("image", "--fusion-norm", help="image (per frame, batch-independent; default) | batch (released code)."),
        fusion_formula: FusionFormula = typer.Option("weighted", "--fusion-formula", help="weighted (released code) | paper (1/2 of the weighted sum)."),
        branches: bool = typer.Option(False, "--branches", help="Also output each branch's probability and normalized confidence."),
        risk: bool = typer.Option(False, "--risk", help=(
            "Add the output 'risk' (N,1), last: one score per frame computed in the graph, batch independent "
            "(the pair: 1 - soft Dice of the two branches; one network: 1 - soft Dice of its map and its mask)."
        )),
        qualify: Optional[Path] = typer.Option(None, "--qualify", help=(
            "qualify.json of 'pocus-edge qualify': its risk threshold and drift band go into the card (needs --risk)."
        )),
        qualify_model: Optional[str] = typer.Option(None, "--qualify-model", help="The model of --qualify to take, when it holds several."),
        max_risk_diff: Optional[float] = typer.Option(None, "--max-risk-diff", help=(
            "Risk parity bar: largest allowed |artifact - pytorch| of the risk output at this precision "
            "(default: fp32 1e-4, fp16 5e-3, bf16 2e-2, int8 2e-2)."
        )),
        parity_site: Optional[Path] = typer.Option(None, "--parity-site", help="Site whose test frames the parity check uses (default: --calib; else random frames)."),
        parity_frames: int = typer.Option(8, "--parity-frames", help="Number of frames in the parity check."),
        max_diff: float = typer.Option(1e-4, "--max-diff", help="fp32 bar: largest allowed |onnx - pytorch| of the fused probability."),
        min_dice_fp16: float = typer.Option(0.98, "--min-dice-fp16", help="fp16 bar: mean mask Dice versus PyTorch."),
        min_dice_bf16: float = typer.Option(0.95, "--min-dice-bf16", help="bf16 bar (OpenVINO): mean mask Dice versus PyTorch."),
        min_dice_int8: float = typer.Option(0.95, "--min-dice-int8", help="int8 bar: mean mask Dice versus PyTorch."),
        frame_shape: Optional[str] = typer.Option(None, "--frame-shape", help="Core ML: probe frame HEIGHTxWIDTH of the image input (default: the model size)."),
        timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="TensorRT timing cache file (default: next to the engine)."),
        opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or newer)."),
    ) -> None:
        """Export both fine-tuned branches plus the fusion head as ONE graph (or one network,
        e.g. a compact student, with --checkpoint), with a parity report.

        Precision lives in the graph: fp16 is a mixed graph (branches fp16; sigmoids, confidences
        and fusion fp32), int8 a static Q/DQ graph calibrated on the unlabeled frames of --calib
        (fusion kept fp32). TensorRT builds a strongly typed engine from that graph (TensorRT 10.x
        or 11.x) on the GPU that will run it. The artifact is written only after its parity check
        passed; a failed check leaves nothing under --out (its report: OUT.parity-failed.md).

        Exit codes (docs/cli.md): 0 done; 1 parity failure; 2 bad input; 3 toolchain missing here
        (TensorRT/CUDA, OpenVINO, or macOS): for TensorRT the ONNX is still written and checked, and
        the trtexec line is printed.
        """
        import dataclasses

        from ..errors import ExportError
        from ..export.api import ExportOptions, ToolchainMissing, export_checkpoints
        from ..export.parity import ParityBars
        from ..io import check_output_dir, check_output_file

        if checkpoint is not None and (generative is not None or contrastive is not None):
            raise ExportError("give --checkpoint (one network) or --generative and --contrastive (the fused pair), not both")
        if checkpoint is None and (generative is None or contrastive is None):
            raise ExportError("give --generative and --contrastive (the fused pair), or --checkpoint for a single network")
        bars = ParityBars(fp32_max_abs=max_diff, fp16_min_dice=min_dice_fp16, bf16_min_dice=min_dice_bf16, int8_min_dice=min_dice_int8)
        if max_risk_diff is not None:
            if not max_risk_diff >= 0:
                raise ExportError(f"--max-risk-diff must be >= 0, got {max_risk_diff}")
            bars = dataclasses.replace(bars, **{f"risk_{p}_max_abs": max_risk_diff for p in ("fp32", "fp16", "bf16", "int8")})
        options = ExportOptions(
            target=target, precision=precision, calib=calib, calib_frames=calib_frames, parity_site=parity_site,
            parity_frames=parity_frames, bars=bars,
            batch=None if dynamic_batch else batch, max_batch=max_batch, opset=opset,
            frame_shape=_frame_shape(frame_shape), timing_cache=timing_cache, qualify=qualify, qualify_model=qualify_model,
        )
        # Before any work: never a folder where a file goes (or the reverse), never unwritable.
        (check_output_dir if out.suffix.lower() == ".mlpackage" else check_output_file)(out, what="--out")
        try:
            result = export_checkpoints(
                checkpoint if checkpoint is not None else generative, None if checkpoint is not None else contrastive,
                out, options, method=fusion, norm=fusion_norm, formula=fusion_formula,
                uint8_input=uint8_input, return_branches=branches, risk=risk,
            )
        except ToolchainMissing as exc:
            for line in exc.result.summary_lines():
                typer.echo(line)
            raise
        for line in result.summary_lines():
            typer.echo(line)
