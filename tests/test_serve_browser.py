"""The serve page in a real browser: headless Chromium (the system's, `make browser-test` installs
Debian's) driven by Playwright. The page receives the stream and draws exactly the Python mask;
its counters add up; its in-page inference (onnxruntime-web, WASM) reproduces the golden vectors;
a page that stops reading loses frames without holding the pipeline; models the page cannot run
get a visible message. Skipped, with the reason, where Chromium or Playwright is absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pocus_edge.export.golden import read_golden, synthetic_frame, write_golden
from pocus_edge.metrics import binarize
from pocus_edge.runtime.pipeline import StreamOptions
from pocus_edge.runtime.serve_hub import ort_web_dir

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (make browser-test installs Debian's chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the dev extra)")
pytest.importorskip("aiohttp")
needs_ort_web = pytest.mark.skipif(ort_web_dir() is None, reason="onnxruntime-web is not installed (make web)")

from test_serve import _Serving  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A random-weight tiny student (float input, outputs spread around the threshold), exported."""
    import torch

    from pocus_edge.export import parity as parity_mod
    from pocus_edge.export.api import ExportOptions, export_model
    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.models.fused import SingleSegmenter
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    network = build_student("mobilenetv3", "tiny").eval().reparameterize()
    spread_head_logits(network, parity_mod.parity_frames(None, 64, n=4, seed=1)[0], std=3.0)
    out = tmp_path_factory.mktemp("student") / "student.onnx"
    export_model(SingleSegmenter(network, name="student").eval(), out, ExportOptions(batch=1, parity_frames=0))
    return out


@pytest.fixture(scope="module")
def page_server():
    """The page without a stream (in-page inference needs only the page and onnxruntime-web)."""
    from pocus_edge.runtime.serve import ServeServer
    from pocus_edge.runtime.serve_hub import FrameHub

    server = ServeServer(FrameHub(), "127.0.0.1", 0).start()
    yield server
    server.stop(0.1)


def _frames(folder: Path, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = [synthetic_frame(*shape, seed=7, phase=0.3 * i) for i in range(n)]
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"frame{i:03d}.png"), frame)
    return frames


def _python_mask(model: Path, frame: np.ndarray) -> np.ndarray:
    from pocus_edge.inference import open_backend
    from pocus_edge.runtime.overlay import to_frame_resolution

    backend = open_backend(model)
    prob = backend.run(backend.prepare(frame)[None])["prob"][0, 0]
    return binarize(to_frame_resolution(prob, frame.shape), backend.threshold)


def _canvas(page, canvas_id: str) -> np.ndarray:
    size = page.evaluate(f"() => [document.getElementById('{canvas_id}').height, document.getElementById('{canvas_id}').width]")
    data = page.evaluate(f"() => {{ const c = document.getElementById('{canvas_id}');"
                         " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }")
    return np.array(data, np.uint8).reshape(size[0], size[1], 4)


def test_page_shows_every_frame_with_the_python_mask_and_counters_that_add_up(browser, student, tmp_path):
    n = 12
    frames = _frames(tmp_path / "frames", n, (120, 160))
    serving = _Serving(tmp_path / "frames", student, wait_for_browser=60, linger=3, client_queue=64, fps=20.0,
                       options=StreamOptions(realtime=True, drop=False, progress=False))
    page = browser.new_page()
    page.goto(serving.url)
    page.wait_for_function("() => pocusEdge.end !== null && pocusEdge.shown && pocusEdge.shown.index === pocusEdge.lastIndex",
                           timeout=60_000)
    state = page.evaluate("() => ({received: pocusEdge.received, index: pocusEdge.shown.index, delivery: pocusEdge.delivery,"
                          " end: pocusEdge.end, messages: pocusEdge.messages, processed: document.getElementById('processed').textContent})")
    pixels = _canvas(page, "frame")
    page.close()
    result = serving.join()

    end = state["end"]
    assert end["frames_in"] == end["frames_processed"] + end["frames_dropped"] + end["frames_invalid"] == n
    assert state["received"] + state["delivery"]["dropped"] == end["frames_processed"] == result["frames_processed"]
    assert state["received"] == n and state["processed"] == str(n) and state["messages"] == []
    frame = frames[state["index"]]
    mask = _python_mask(student, frame)
    assert 0.05 < mask.mean() < 0.95
    rgb = pixels[..., :3].astype(int)
    coloured = rgb[..., 0] != rgb[..., 2]
    np.testing.assert_array_equal(coloured, mask)
    np.testing.assert_array_equal(rgb[~mask][:, 0], frame[~mask])  # unmasked pixels are the frame itself
    expected_red = np.floor(frame[mask] * 0.65 + 255 * 0.35)
    np.testing.assert_array_equal(rgb[mask][:, 0], expected_red)


@needs_ort_web
def test_in_page_inference_reproduces_the_golden_vectors(browser, page_server, student, tmp_path):
    golden = tmp_path / "golden"
    write_golden(golden, model=student, n=4, seed=2, extra_sizes=(224,))
    index = read_golden(golden)
    images = []
    for case in index["cases"]:
        frame = np.load(golden / case["frame"])
        images.append(str(tmp_path / f"case{case['id']}.png"))
        cv2.imwrite(images[-1], frame)
    page = browser.new_page()
    page.goto(page_server.url)
    page.wait_for_function("() => window.pocusEdge && pocusEdge.preprocessGray", timeout=30_000)
    # The preprocessing port, bit for bit, at the model size and at 224 px.
    for case in index["cases"]:
        frame = np.load(golden / case["frame"])
        for entry in case["sizes"]:
            ported = page.evaluate("([g, h, w, s]) => Array.from(pocusEdge.preprocessGray(Uint8Array.from(g), h, w, s))",
                                   [frame.ravel().tolist(), frame.shape[0], frame.shape[1], entry["size"]])
            np.testing.assert_array_equal(np.array(ported, np.uint8).reshape(entry["size"], -1), np.load(golden / entry["gray"]))
    page.set_input_files("#local-model", str(student))
    page.wait_for_function("() => pocusEdge.local.session !== null || pocusEdge.messages.length > 0", timeout=60_000)
    assert page.evaluate("() => pocusEdge.messages") == []
    page.set_input_files("#local-images", images)
    page.wait_for_function("() => pocusEdge.local.done", timeout=60_000)
    results = page.evaluate("() => pocusEdge.local.results.map(r => ({name: r.name, prob: r.prob}))")
    fps = page.evaluate("() => pocusEdge.local.fps")
    page.close()
    assert [r["name"] for r in results] == [Path(p).name for p in images] and fps > 0
    threshold = np.float32(index["threshold"])
    for case, result in zip(index["cases"], results):
        expected = np.load(golden / case["prob"])
        prob = np.array(result["prob"], np.float32).reshape(expected.shape)
        np.testing.assert_allclose(prob, expected, atol=1e-4)
        settled = np.abs(expected - threshold) > 1e-4
        np.testing.assert_array_equal((prob > threshold)[settled], np.load(golden / case["mask"]).astype(bool)[settled])


def test_a_page_that_stops_reading_loses_frames_and_leaves_the_pipeline_alone(browser, student, tmp_path):
    n = 60
    _frames(tmp_path / "frames", n, (480, 640))  # ~345 kB per message: the page's buffers fill
    serving = _Serving(tmp_path / "frames", student, wait_for_browser=60, linger=1, client_queue=2, fps=20.0,
                       options=StreamOptions(realtime=True, drop=False, progress=False))
    page = browser.new_page()
    page.goto(serving.url)
    page.wait_for_function("() => pocusEdge.received > 0", timeout=60_000)
    # Freeze the page's JavaScript for longer than the 3 s stream: it reads nothing meanwhile.
    page.evaluate("() => { setTimeout(() => { const t = performance.now(); while (performance.now() - t < 8000) {} }, 0); }")
    result = serving.join()
    page.close()
    assert result["frames_in"] == result["frames_processed"] == n and result["frames_dropped"] == 0
    s = result["serve"]
    assert s["messages_dropped"] > 0, "the frozen page should have lost frames"
    assert s["messages_sent"] + s["messages_dropped"] == n


@needs_ort_web
def test_models_the_page_cannot_run_get_a_visible_message(browser, page_server, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def save(name, nodes, shape):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, shape[2], shape[3]])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)])
        model.ir_version = 8
        onnx.save(model, str(tmp_path / name))
        return str(tmp_path / name)

    wide = save("wide.onnx", [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], [1, 3, 100, 120])
    unknown = save("unknown_op.onnx", [helper.make_node("NoSuchOp", ["x"], ["y"], domain="org.example")], [1, 3, 64, 64])
    page = browser.new_page()
    page.goto(page_server.url)
    page.wait_for_function("() => window.pocusEdge && pocusEdge.loadModel", timeout=30_000)
    page.set_input_files("#local-model", wide)
    page.wait_for_function("() => pocusEdge.messages.length >= 1", timeout=60_000)
    page.set_input_files("#local-model", unknown)
    page.wait_for_function("() => pocusEdge.messages.length >= 2", timeout=60_000)
    shown = page.inner_text("#messages")
    page.close()
    assert "wide.onnx: input float32 (1,3,100,120) is not a segmenter's" in shown
    assert "onnxruntime-web cannot run unknown_op.onnx" in shown
