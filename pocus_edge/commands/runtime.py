"""`stream`: run an exported model over a frame source."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import DEVICE_HELP, Backend, complete_device, engine_of, resolve_device


def register(app: typer.Typer) -> None:
    @app.command("stream")
    def stream(
        source: str = typer.Argument(
            ...,
            help=(
                "Frames to segment: a TeleMED recording (*.tvd.h5), a video file, a folder of images, "
                "a (multi-frame) DICOM file, '-' for the raw protocol on stdin, tcp:PORT / "
                "tcp://HOST:PORT to listen for one raw-protocol sender at a time (docs/streaming.md), or "
                "igtl://HOST:PORT to receive IMAGE messages from an OpenIGTLink server such as PLUS or 3D Slicer "
                "(docs/openigtlink.md)."
            ),
        ),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=(
            "Exported model: .onnx (ort), OpenVINO .xml, a TensorRT .engine/.plan (with its .json card), a Core ML "
            ".mlpackage (macOS), or one checkpoint (a compact student, or one branch; torch). The fused pair as "
            "checkpoints: -g/-c instead."
        )),
        generative: Optional[Path] = typer.Option(None, "--generative", "-g", metavar="MODEL", help="With --contrastive: run the fused pair of fine-tuned checkpoints in PyTorch (no export)."),
        contrastive: Optional[Path] = typer.Option(None, "--contrastive", "-c", metavar="MODEL", help="The fine-tuned contrastive branch of the pair."),
        backend: Backend = typer.Option("auto", "--backend", help="auto (by the model's suffix) | ort | openvino | tensorrt | coreml | torch."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        providers: str = typer.Option("", "--providers", help="onnxruntime execution providers in priority order, e.g. tensorrt,cuda or openvino (those installed; CPU is always the fallback)."),
        threads: int = typer.Option(0, help="CPU threads for onnxruntime (0 = its default)."),
        realtime: bool = typer.Option(False, "--realtime", help="Release recorded frames at their own timestamps; when inference falls behind, drop the OLDEST queued frame (counted)."),
        no_drop: bool = typer.Option(False, "--no-drop", help="Never drop a frame (offline processing; with --realtime the run falls behind instead)."),
        queue_size: int = typer.Option(4, help="Frames buffered between the source and inference."),
        batch: int = typer.Option(1, "--batch", "-b", help="Micro-batch size (throughput runs; 1 = lowest latency)."),
        max_frames: int = typer.Option(0, help="Stop after this many frames (0 = whole source)."),
        speed: float = typer.Option(1.0, help="With --realtime: playback speed factor of recorded sources."),
        threshold: float = typer.Option(-1.0, help="Mask threshold on the fused probability (-1 = the model card's, 0.5)."),
        report: Path = typer.Option(None, "--report", help="Write the JSON report here (atomically; refreshed every 10 s on long streams)."),
        overlay: Path = typer.Option(None, "--overlay", help="Write an overlay MP4 here (mask fill + contour; fusion-weight panel when the model exports its branches)."),
        no_weight_map: bool = typer.Option(False, "--no-weight-map", help="Overlay without the fusion-weight panel."),
        masks: Path = typer.Option(None, "--masks", help="Per-frame masks: a folder of PNGs, or one .npz file."),
        bind: str = typer.Option("127.0.0.1", help="Address for tcp:PORT sources. Loopback by default; pass e.g. 0.0.0.0 explicitly to accept senders from other machines."),
        fps: float = typer.Option(30.0, help="Frame rate assumed for image folders (and DICOM without timing)."),
        frame_timeout: float = typer.Option(2.0, help=(
            "Raw streams: a frame must arrive whole within this many seconds of its first byte, else it is dropped "
            "(counted invalid) and the bytes after it are parsed."
        )),
        idle_timeout: float = typer.Option(10.0, help="Raw streams: end the stream after this many seconds without a valid frame (silence, garbage or a slow-drip sender)."),
        max_time_jump: float = typer.Option(10.0, help=(
            "With --realtime: a timestamp jump (forwards or backwards) of more than this many seconds re-bases the "
            "playback clock instead of being waited for (counted as timestamps_rebased)."
        )),
        accept_timeout: float = typer.Option(60.0, help="tcp sources: seconds to wait for the sender to connect."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="The live progress line (default: when stderr is a terminal)."),
        send: str = typer.Option(None, "--send", metavar="igtl://HOST:PORT", help=(
            "Also serve each mask as an OpenIGTLink IMAGE message (labels 0/1, the frame's timestamp, device name + "
            "'_mask') to clients such as a 3D Slicer connector; listens on loopback unless HOST is given."
        )),
        qualify: Optional[Path] = typer.Option(None, "--qualify", metavar="QUALIFY.json", help=(
            "Risk threshold and drift band from this `pocus-edge qualify` file instead of the model card "
            "(for a model exported with its risk output)."
        )),
        qualify_model: Optional[str] = typer.Option(None, "--qualify-model", metavar="NAME", help="Which model of the --qualify file (needed when it holds several)."),
    ) -> None:
        """Stream frames through a model: masks, overlay video, and latency/FPS/GFLOPs in a JSON report."""
        import json

        from ..runtime.pipeline import stream as run

        model_arg = _model_argument(model, generative, contrastive)
        result = run(
            source,
            model_arg,
            backend=backend,
            device=resolve_device(device, engine_of(backend, model_arg)),
            threads=threads or None,
            realtime=realtime,
            no_drop=no_drop,
            queue_size=queue_size,
            batch_size=batch,
            max_frames=max_frames or None,
            speed=speed,
            threshold=None if threshold < 0 else threshold,
            report=report,
            overlay=overlay,
            weight_map=not no_weight_map,
            masks=masks,
            bind=bind,
            fps=fps,
            frame_timeout=frame_timeout,
            idle_timeout=idle_timeout,
            max_time_jump_s=max_time_jump,
            accept_timeout=accept_timeout,
            progress=progress,
            on_listen=lambda host, port: typer.echo(f"listening on tcp://{host}:{port}", err=True),
            providers=[p.strip() for p in providers.split(",") if p.strip()] or None,
            send=send,
            on_send_listen=lambda host, port: typer.echo(f"serving masks on igtl://{host}:{port}", err=True),
            qualify=qualify,
            qualify_model=qualify_model,
        )
        keys = ("frames_in", "frames_processed", "frames_dropped", "frames_invalid", "latency_ms", "fps", "gflops_per_frame", "backend", "precision", "device")
        summary = {k: result[k] for k in keys}
        if result.get("risk") is not None:
            risk, drift = result["risk"], result["risk"].get("drift")
            summary["risk"] = {"median": risk["median"], "p95": risk["p95"], "frames_over_threshold": risk["frames_over_threshold"],
                               **({"alarms": drift["alarms"], "alarm_intervals": drift["alarm_intervals"], "alarm_now": drift["alarm_now"]}
                                  if drift else {"note": risk.get("note")})}
        typer.echo(json.dumps(summary, indent=2))


def _model_argument(model: Optional[str], generative: Optional[Path], contrastive: Optional[Path]) -> str:
    """The library's model argument: one artifact or checkpoint, or the fused pair ``GEN,CON``."""
    from ..errors import PocusError

    if (generative is None) != (contrastive is None):
        raise PocusError("give the fused pair as both -g GEN and -c CON")
    if generative is not None:
        if model is not None:
            raise PocusError("give --model (one model) or -g/-c (the fused pair), not both")
        return f"{generative},{contrastive}"
    if model is None:
        raise PocusError("give --model MODEL (an exported model or one checkpoint), or -g GEN -c CON (the fused pair)")
    if "," in model:
        typer.echo("note: --model GEN,CON is deprecated; use -g GEN -c CON", err=True)
    return model
