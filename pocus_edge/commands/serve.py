"""`serve`: stream frames through a model and show them in a browser page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import DEVICE_HELP, Backend, complete_device, engine_of, resolve_device


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        source: str = typer.Argument(..., help="Frames to segment, as for `pocus-edge stream`: a *.tvd.h5 recording, a video file, a folder of images, a DICOM file, '-', tcp:PORT or igtl://HOST:PORT."),
        model: str = typer.Option(..., "--model", "-m", help="Exported model, as for `pocus-edge stream` (an .onnx file is also offered to the page for in-browser inference)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address of the page. Loopback by default; any other address needs --allow-remote and --token."),
        port: int = typer.Option(8765, "--port", help="TCP port of the page (0 picks a free one)."),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other than loopback (prints a warning; needs --token)."),
        token: str = typer.Option(None, "--token", help="Secret the page URL must carry (?token=...); required with --allow-remote."),
        wait_for_browser: float = typer.Option(0.0, "--wait-for-browser", help="Hold the stream up to this many seconds until a page connects (0: start at once)."),
        linger: float = typer.Option(2.0, "--linger", help="After the stream: seconds left for the pages to receive what is queued and the final report."),
        client_queue: int = typer.Option(2, "--client-queue", help="Frames queued per browser; a browser that reads slower loses the oldest (counted), the stream never waits."),
        backend: Backend = typer.Option("auto", "--backend", help="auto (by the model's suffix) | ort | openvino | tensorrt | coreml | torch."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        threads: int = typer.Option(0, help="CPU threads for onnxruntime (0 = its default)."),
        realtime: bool = typer.Option(False, "--realtime", help="Release recorded frames at their own timestamps; when inference falls behind, drop the OLDEST queued frame (counted)."),
        no_drop: bool = typer.Option(False, "--no-drop", help="Never drop a frame (with --realtime the run falls behind instead)."),
        queue_size: int = typer.Option(4, help="Frames buffered between the source and inference."),
        max_frames: int = typer.Option(0, help="Stop after this many frames (0 = whole source)."),
        speed: float = typer.Option(1.0, help="With --realtime: playback speed factor of recorded sources."),
        threshold: float = typer.Option(-1.0, help="Mask threshold on the fused probability (-1 = the model card's, 0.5)."),
        report: Path = typer.Option(None, "--report", help="Write the JSON stream report here (atomically), with what the pages were sent and lost under 'serve'."),
        fps: float = typer.Option(30.0, help="Frame rate assumed for image folders (and DICOM without timing)."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="The live progress line (default: when stderr is a terminal)."),
    ) -> None:
        """Stream frames through a model and show them in a browser: the frame with the bone mask,
        the fusion weight map, FPS, latency and frame counters, pushed over a WebSocket; the page
        can also run a student model itself (onnxruntime-web). docs/serve.md."""
        import json

        from ..runtime.pipeline import StreamOptions
        from ..runtime.serve import serve as run
        from ..runtime.serve_hub import is_loopback

        if allow_remote and token and not is_loopback(host):
            typer.secho(f"warning: serving on {host}: other machines can reach this page (with its token); "
                        "the stream is unencrypted, use it on a network you trust", fg=typer.colors.YELLOW, err=True)
        options = StreamOptions(realtime=realtime, drop=False if no_drop else None, queue_size=queue_size,
                                max_frames=max_frames or None, threshold=None if threshold < 0 else threshold, speed=speed,
                                progress=progress, report_every_s=10.0 if report is not None else None)
        result = run(
            source, model, host=host, port=port, token=token, allow_remote=allow_remote, wait_for_browser=wait_for_browser,
            linger=linger, client_queue=client_queue, backend=backend, device=resolve_device(device, engine_of(backend, model)), threads=threads or None,
            options=options, report=report, fps=fps,
            on_listen=lambda url: typer.echo(f"serving on {url}", err=True),
            on_waiting=lambda s: typer.echo(f"no page connected within {s:g} s; streaming anyway", err=True),
        )
        keys = ("frames_in", "frames_processed", "frames_dropped", "frames_invalid", "latency_ms", "fps", "serve")
        typer.echo(json.dumps({k: result[k] for k in keys}, indent=2))
