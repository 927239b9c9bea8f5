"""What `pocus-edge serve` costs, and what the page's in-browser inference does, on this machine.

    python benchmarks/bench_serve.py --out serve_bench.json [--frames 150] [--screenshots docs/]

Needs Chromium (Debian's `chromium`), Playwright for Python and `make web` (onnxruntime-web).
Model: the `paper`-preset mobilenetv3 student (224 px, random weights: speed does not depend on
them), fp32 ONNX. Frames: synthetic 480x640 probe frames written as PNGs.

1. Added latency of serve: `stream` without outputs vs `serve` with one headless Chromium page
   attached, both released at 15 FPS (realtime, drop oldest), end-to-end latency p50/p95 and FPS.
2. A page that stops reading: serve with the page's JavaScript frozen for the whole run; the
   pipeline's FPS, latency and drops next to the frames the page lost.
3. In-page inference at 224 px: the page (onnxruntime-web, WASM, threads when cross-origin
   isolated) segments the frames from PNG files; Python onnxruntime runs the same frames.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from pocus_edge.export.golden import synthetic_frame
from pocus_edge.inference import open_backend
from pocus_edge.runtime.pipeline import StreamOptions, run_stream
from pocus_edge.runtime.serve import serve
from pocus_edge.runtime.sources import open_source

FPS = 15.0


def export_student(out: Path, preset: str = "paper", uint8: bool = False, fused: bool = False) -> Path:
    import torch

    from pocus_edge.config import model_preset
    from pocus_edge.export import parity as parity_mod
    from pocus_edge.export.api import ExportOptions, export_model
    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.models.fused import FusedSegmenter, SingleSegmenter
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    if fused:
        from pocus_edge.models.transunet import TransUNet

        cfg = model_preset(preset)
        frames = parity_mod.parity_frames(None, cfg.img_size, n=4, seed=1)[0]
        branches = [TransUNet(cfg).eval(), TransUNet(cfg).eval()]
        for branch in branches:
            spread_head_logits(branch, frames, std=3.0)
        model = FusedSegmenter(*branches, return_branches=True).eval()
    else:
        network = build_student("mobilenetv3", preset).eval().reparameterize()
        spread_head_logits(network, parity_mod.parity_frames(None, network.cfg.img_size, n=4, seed=1)[0], std=3.0)
        model = SingleSegmenter(network, uint8_input=uint8, name="student").eval()
    return export_model(model, out, ExportOptions(batch=1, parity_frames=0)).artifact


def write_frames(folder: Path, n: int, shape=(480, 640)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"frame{i:04d}.png")
        cv2.imwrite(str(paths[-1]), synthetic_frame(*shape, seed=3, phase=0.05 * i))
    return paths


def summary(report: dict) -> dict:
    keys = ("frames_in", "frames_processed", "frames_dropped", "fps")
    return {**{k: report[k] for k in keys}, "latency_ms": {k: report["latency_ms"][k] for k in ("p50", "p95")},
            **({"serve": report["serve"]} if "serve" in report else {})}


def run_stream_only(folder: Path, model: Path) -> dict:
    backend = open_backend(model)
    source = open_source(str(folder))
    try:
        return summary(run_stream(source, backend, options=StreamOptions(realtime=True, progress=False)))
    finally:
        source.close()
        backend.close()


def run_serve_with_page(browser, folder: Path, model: Path, *, freeze: bool, screenshot: Path | None = None) -> dict:
    listening, box = threading.Event(), {}

    def target():
        box["report"] = serve(str(folder), str(model), port=0, wait_for_browser=60, linger=1, fps=FPS,
                              options=StreamOptions(realtime=True, progress=False),
                              on_listen=lambda url: (box.__setitem__("url", url), listening.set()))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    listening.wait(60)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(box["url"])
    page.wait_for_function("() => pocusEdge.received > 0", timeout=60_000)
    if freeze:
        page.evaluate("() => { setTimeout(() => { const t = performance.now(); while (performance.now() - t < 60000) {} }, 0); }")
    elif screenshot is not None:
        page.check("#show-weight")
        time.sleep(2.0)
        page.screenshot(path=str(screenshot), full_page=True)
    thread.join(600)
    page.close()
    return summary(box["report"])


def in_page_fps(browser, model: Path, images: list[Path], url: str, screenshot: Path | None = None) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.set_input_files("#local-model", str(model))
    page.wait_for_function("() => pocusEdge.local.session !== null || pocusEdge.messages.length > 0", timeout=120_000)
    page.set_input_files("#local-images", [str(p) for p in images])
    page.wait_for_function("() => pocusEdge.local.done", timeout=600_000)
    out = page.evaluate("() => { const ms = [...pocusEdge.local.inferMs].sort((a, b) => a - b);"
                        " return {frames: pocusEdge.local.count, fps: pocusEdge.local.fps, infer_p50_ms: ms[Math.floor(ms.length / 2)],"
                        " threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated, info: document.getElementById('local-info').textContent}; }")
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return out


def python_fps(model: Path, images: list[Path]) -> dict:
    backend = open_backend(model)
    frames = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in images]
    backend.run(backend.prepare(frames[0])[None])  # warm-up
    infer_ms = []
    t0 = time.perf_counter()
    for frame in frames:
        x = backend.prepare(frame)[None]
        t1 = time.perf_counter()
        backend.run(x)
        infer_ms.append((time.perf_counter() - t1) * 1000)
    total = time.perf_counter() - t0
    return {"frames": len(frames), "fps": len(frames) / total, "infer_p50_ms": float(np.median(infer_ms))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--screenshots", type=Path, default=None, help="also write serve_stream.png and serve_in_page.png here")
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from pocus_edge.runtime.serve import ServeServer
    from pocus_edge.runtime.serve_hub import FrameHub

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        model = export_student(work / "student.onnx")
        images = write_frames(work / "frames", args.frames)
        results: dict = {"machine": {"cpu": platform.processor() or platform.machine()}, "frames": args.frames,
                         "frame_shape": [480, 640], "model": "mobilenetv3 student, paper preset (224 px), fp32 ONNX", "fps_in": FPS}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
            results["chromium"] = browser.version
            results["stream"] = run_stream_only(work / "frames", model)
            results["serve_with_page"] = run_serve_with_page(browser, work / "frames", model, freeze=False)
            results["serve_with_frozen_page"] = run_serve_with_page(browser, work / "frames", model, freeze=True)
            server = ServeServer(FrameHub(), "127.0.0.1", 0).start()
            try:
                shot = args.screenshots / "serve_in_page.png" if args.screenshots else None
                results["in_page_224"] = in_page_fps(browser, model, images, server.url, shot)
            finally:
                server.stop(0.1)
            results["python_onnxruntime_224"] = python_fps(model, images)
            if args.screenshots:
                fused = export_student(work / "fused.onnx", preset="tiny", fused=True)
                run_serve_with_page(browser, write_frames(work / "shots", 90, (240, 320))[0].parent, fused, freeze=False,
                                    screenshot=args.screenshots / "serve_stream.png")
            browser.close()
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
