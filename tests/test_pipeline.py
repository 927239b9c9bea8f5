"""The streaming pipeline: outputs equal a brute-force reference, realtime drops the oldest
frames and counts them, counts add up, memory stays flat, bad frames never crash it."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from _models import ListSource

from pocus_edge.data.transforms import preprocess_frame
from pocus_edge.inference import count_onnx_flops, open_backend
from pocus_edge.runtime import protocol
from pocus_edge.runtime.overlay import to_frame_resolution
from pocus_edge.runtime.pipeline import (
    CallbackSink,
    MaskFileSink,
    OverlayVideoSink,
    StreamOptions,
    run_stream,
)
from pocus_edge.runtime.sources import FrameSource, RawStreamSource
from pocus_edge.runtime.stats import LatencyRecorder

SIZE = 32


class TinySegmenter(torch.nn.Module):
    """Stand-in for the fused graph: conv + per-pixel linear + sigmoid; optionally the five
    outputs of a FusedSegmenter exported with return_branches."""

    def __init__(self, branches: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.lin = torch.nn.Linear(4, 2)
        self.branches = branches

    def forward(self, x):
        h = torch.relu(self.conv(x * 4.0 - 2.0))
        p = torch.sigmoid(self.lin(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        p_g, p_c = p[:, :1], p[:, 1:]
        c_g, c_c = 1 - p_g * 0.5, 0.5 + p_c * 0.5
        fused = (p_g * c_g + p_c * c_c) / (c_g + c_c + 1e-6)
        if self.branches:
            return fused, p_g, p_c, c_g, c_c
        return fused


def _export(module, path, card=None):
    import onnx

    names = ["fused", "p_generative", "p_contrastive", "c_generative", "c_contrastive"] if module.branches else ["fused"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (torch.rand(2, 3, SIZE, SIZE),), str(path), dynamo=False,
            input_names=["frames"], output_names=names,
            dynamic_axes={"frames": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        )
    if card is not None:
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "pocus_edge_card", json.dumps(card)
        onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    plain = _export(TinySegmenter(), d / "plain.onnx")
    card = {"img_size": SIZE, "threshold": 0.5, "gflops_per_frame": 0.123, "precision": "fp32"}
    branches = _export(TinySegmenter(branches=True), d / "branches.onnx", card=card)
    return plain, branches




class SyntheticSource(FrameSource):
    """n frames generated on the fly (nothing kept): for long-stream memory tests."""

    def __init__(self, n, shape=(24, 30)):
        super().__init__()
        self.n, self.shape = n, shape

    def __iter__(self):
        rng = np.random.default_rng(0)
        for i in range(self.n):
            yield rng.integers(0, 256, size=self.shape, dtype=np.uint8), i * 33.3, i


class SlowBackend:
    """Deliberately slow: each batch takes ``delay_s``; output = the mean-intensity map."""

    name, precision, device, img_size, threshold = "slow", "fp32", "cpu", 16, 0.5

    def __init__(self, delay_s):
        self.delay_s = delay_s
        self.frames_seen = []

    def prepare(self, frame):
        return preprocess_frame(frame, self.img_size)

    def run(self, batch):
        time.sleep(self.delay_s)
        return {"prob": batch[:, :1].astype(np.float32)}

    def describe(self):
        return {"backend": self.name, "precision": self.precision, "device": self.device, "gflops_per_frame": None}


def _frames(n, seed=0, shape=(40, 52)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def test_ort_backend_matches_torch_and_reads_the_card(tiny_onnx):
    plain, branches = tiny_onnx
    module = TinySegmenter(branches=True).eval()
    be = open_backend(branches, "ort", threads=1)
    assert (be.img_size, be.precision, be.device, be.name) == (SIZE, "fp32", "cpu", "ort")
    assert be.gflops_per_frame == 0.123 and be.has_weight_map
    frames = _frames(3)
    x = np.stack([preprocess_frame(f, SIZE) for f in frames])
    np.testing.assert_array_equal(np.stack([be.prepare(f) for f in frames]), x)
    with torch.no_grad():
        ref = [t.numpy() for t in module(torch.from_numpy(x))]
    out = be.run(x)
    np.testing.assert_allclose(be.infer(x), ref[0], atol=1e-5)
    np.testing.assert_allclose(out["weight"], ref[3] / (ref[3] + ref[4] + 1e-6), atol=1e-5)
    # No card: the size comes from the graph and GFLOPs are counted.
    be2 = open_backend(plain, "ort", threads=1)
    assert be2.img_size == SIZE and not be2.has_weight_map
    assert be2.gflops_per_frame == pytest.approx(count_onnx_flops(plain) / 1e9)


def test_onnx_flop_count_matches_torch_flop_counter(tiny_onnx):
    from torch.utils.flop_counter import FlopCounterMode

    module = TinySegmenter().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.rand(1, 3, SIZE, SIZE))
    assert counter.get_total_flops() > 0
    assert count_onnx_flops(tiny_onnx[0]) == counter.get_total_flops()


def test_offline_stream_outputs_equal_a_brute_force_reference(tiny_onnx, tmp_path):
    import cv2

    _, branches = tiny_onnx
    module = TinySegmenter(branches=True).eval()
    frames = _frames(7, seed=1)
    be = open_backend(branches, "ort", threads=1)
    got = []
    sinks = [
        MaskFileSink(tmp_path / "masks.npz"),
        MaskFileSink(tmp_path / "pngs"),
        OverlayVideoSink(tmp_path / "overlay.mp4", fps=10),
        CallbackSink(got.append),
    ]
    report = run_stream(ListSource(frames), be, sinks=sinks, report_path=tmp_path / "r.json",
                        options=StreamOptions(batch_size=3, progress=False))
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert (report["frames_in"], report["frames_processed"], report["frames_dropped"], report["frames_invalid"]) == (7, 7, 0, 0)
    for key in ("latency_ms", "fps", "gflops_per_frame", "backend", "precision", "device"):
        assert key in report
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"}
    assert set(report["stages_ms"]) == {"decode", "preprocess", "infer", "postprocess"}
    assert report["gflops_per_frame"] == 0.123 and report["backend"] == "ort"
    npz = np.load(tmp_path / "masks.npz")
    assert sorted(npz.files) == [f"frame_{i:07d}" for i in range(7)]
    for i, f in enumerate(frames):
        with torch.no_grad():
            prob = module(torch.from_numpy(preprocess_frame(f, SIZE)[None]))[0][0, 0].numpy()
        ref_mask = to_frame_resolution(prob, f.shape) >= 0.5
        assert got[i].index == i
        np.testing.assert_array_equal(npz[f"frame_{i:07d}"] > 0, ref_mask)
        png = cv2.imread(str(tmp_path / "pngs" / f"{i:07d}.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(png > 0, ref_mask)
    cap = cv2.VideoCapture(str(tmp_path / "overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    ok, first = cap.read()
    # Frame panel + fusion-weight panel side by side.
    assert ok and first.shape[:2] == (40, 104)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_realtime_with_slow_backend_drops_oldest_and_counts(tmp_path):
    frames = _frames(60, shape=(16, 16))  # 60 frames at 100 fps = 0.6 s of stream
    backend = SlowBackend(delay_s=0.03)  # ~33 fps: cannot keep up
    seen = []
    report = run_stream(ListSource(frames, period_ms=10.0), backend, sinks=[CallbackSink(lambda r: seen.append(r.index))],
                        options=StreamOptions(realtime=True, queue_size=2, progress=False))
    assert report["frames_dropped"] > 20
    assert report["frames_in"] == 60
    assert report["frames_in"] == report["frames_processed"] + report["frames_dropped"] + report["frames_invalid"]
    assert seen == sorted(seen) and len(seen) == report["frames_processed"]
    # Dropping the oldest means the newest frame is always shown.
    assert seen[-1] == 59
    assert report["wall_s"] >= 0.55  # paced at the source's timestamps
    # The same run offline processes everything.
    report = run_stream(ListSource(frames, period_ms=10.0), SlowBackend(0.0), options=StreamOptions(progress=False))
    assert (report["frames_processed"], report["frames_dropped"]) == (60, 0)


def test_realtime_no_drop_paces_without_dropping():
    frames = _frames(20, shape=(8, 8))
    report = run_stream(ListSource(frames, period_ms=20.0), SlowBackend(0.0),
                        options=StreamOptions(realtime=True, drop=False, queue_size=1, progress=False))
    assert (report["frames_processed"], report["frames_dropped"]) == (20, 0)
    assert report["wall_s"] >= 0.37  # 19 intervals of 20 ms
    # Realtime with a 4x speed factor takes a quarter of the time.
    report = run_stream(ListSource(frames, period_ms=20.0), SlowBackend(0.0),
                        options=StreamOptions(realtime=True, drop=False, speed=4.0, progress=False))
    assert 0.09 <= report["wall_s"] < 0.3


def test_bad_frames_are_counted_not_fatal():
    frames = _frames(5, shape=(10, 10))
    frames[2] = np.zeros((10, 10, 4), dtype=np.uint8)  # not grayscale
    frames[3] = np.zeros((10, 10), dtype=np.float32)  # not uint8
    report = run_stream(ListSource(frames), SlowBackend(0.0), options=StreamOptions(progress=False))
    assert (report["frames_in"], report["frames_processed"], report["frames_invalid"]) == (5, 3, 2)
    assert sum(report["invalid_reasons"].values()) == 2


def test_raw_socket_stream_through_the_pipeline(tiny_onnx):
    rng = np.random.default_rng(5)
    good = [rng.integers(0, 256, size=(20, 30), dtype=np.uint8) for _ in range(4)]
    wire = bytearray()
    for k, f in enumerate(good):
        wire += protocol.encode_frame(f, 40.0 * k, k)
        if k == 1:
            wire += b"\x00garbage\xff" * 50  # a garbage run
            wire += protocol.encode_frame(f, 0.0)[:60]  # a truncated frame
    a, b = socket.socketpair()
    threading.Thread(target=lambda: (a.sendall(bytes(wire)), a.close()), daemon=True).start()
    src = RawStreamSource(b, frame_timeout=0.5, idle_timeout=2.0)
    report = run_stream(src, open_backend(tiny_onnx[0], "ort", threads=1), options=StreamOptions(realtime=True, progress=False))
    b.close()
    assert report["frames_processed"] == 4 and report["frames_invalid"] == 2 and report["frames_dropped"] == 0
    assert report["frames_in"] == 6
    assert report["source"]["live"] is True


def test_memory_stays_flat_over_a_long_stream():
    marks = {}

    def sample(r):
        if r.index in (300, 1999):
            marks[r.index] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        report = run_stream(SyntheticSource(2000), SlowBackend(0.0), sinks=[CallbackSink(sample)],
                            options=StreamOptions(realtime=False, queue_size=8, progress=False))
    finally:
        tracemalloc.stop()
    assert report["frames_processed"] == 2000
    assert marks[1999] - marks[300] < 256 * 1024, marks


def test_latency_reservoir_is_bounded_and_exact_below_capacity():
    rng = np.random.default_rng(0)
    values = rng.exponential(10.0, size=5000)
    exact = LatencyRecorder(capacity=10_000)
    small = LatencyRecorder(capacity=1000)
    for v in values:
        exact.add(float(v))
        small.add(float(v))
    assert exact.exact and exact.percentile(95) == pytest.approx(np.percentile(values, 95))
    assert not small.exact and small.samples.size == 1000
    # A uniform reservoir of 1000 estimates the median within a few percent.
    assert small.percentile(50) == pytest.approx(np.percentile(values, 50), rel=0.15)
    assert small.summary()["mean"] == pytest.approx(values.mean(), abs=1e-3)  # the mean is over all samples


def test_stream_command_on_an_image_folder_and_on_stdin(tiny_onnx, tmp_path, capsys):
    import subprocess
    import sys

    import cv2

    from pocus_edge.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(_frames(4, seed=9)):
        cv2.imwrite(str(folder / f"f{i}.png"), f)
    rc = main(["stream", str(folder), "--model", str(tiny_onnx[1]), "--report", str(tmp_path / "r.json"),
               "--masks", str(tmp_path / "m.npz"), "--threads", "1", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames_processed"] == 4 and report["source"]["kind"] == "ImageFolderSource"
    assert len(np.load(tmp_path / "m.npz").files) == 4
    assert main(["stream", str(folder), "--model", str(tmp_path / "missing.onnx"), "--no-progress"]) == 2
    assert "missing.onnx" in capsys.readouterr().err

    wire = b"".join(protocol.encode_frame(f, 30.0 * k, k) for k, f in enumerate(_frames(3, seed=4))) + b"junk"
    proc = subprocess.run(
        [sys.executable, "-m", "pocus_edge", "stream", "-", "--model", str(tiny_onnx[0]), "--threads", "1",
         "--report", str(tmp_path / "stdin.json"), "--no-progress"],
        input=wire, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    report = json.loads((tmp_path / "stdin.json").read_text())
    assert (report["frames_processed"], report["frames_invalid"], report["frames_in"]) == (3, 1, 4)


def test_absent_accelerators_are_reported_not_crashed(tiny_onnx, tmp_path):
    import onnxruntime

    from pocus_edge.cli import main
    from pocus_edge.errors import PocusError, ToolchainUnavailable

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ToolchainUnavailable, match="CUDAExecutionProvider"):
            open_backend(tiny_onnx[0], "ort", device="cuda")
    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:
        pytest.skip("TensorRT and a GPU are present: engines are built and run by the export tests")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ToolchainUnavailable):
        open_backend(engine, "tensorrt")
    # The CLI exits 3 ("cannot run here"), distinct from 2 (bad input).
    assert main(["stream", str(tmp_path), "--model", str(engine), "--backend", "tensorrt", "--no-progress"]) == 3
    with pytest.raises(PocusError, match="unknown backend"):
        open_backend(tiny_onnx[0], "tflite")


class StampedSource(FrameSource):
    """Recorded frames with given timestamps (ms)."""

    def __init__(self, stamps, shape=(8, 8)):
        super().__init__()
        self.stamps = stamps
        self.frames = _frames(len(stamps), shape=shape)

    def __len__(self):
        return len(self.stamps)

    def __iter__(self):
        for i, (f, t) in enumerate(zip(self.frames, self.stamps)):
            yield f, t, i


class _RecordingEvent(threading.Event):
    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return False


def test_realtime_pacing_rebases_timestamp_jumps_instead_of_sleeping_on_them():
    from pocus_edge.runtime.feed import Pacer as _Pacer

    # A /timing/time_ms jump to 1e12 used to wait ~31 years; a jump back then raced ahead.
    stamps = [0.0, 33.0, 66.0, 1e12, 1e12 + 33.0, 99.0, 132.0, -5e6, -5e6 + 33.0]
    stop = _RecordingEvent()
    pacer = _Pacer(speed=1.0, max_jump_s=10.0, stop=stop)
    for ts in stamps:
        pacer.wait_for(ts)
    assert pacer.rebased == 3  # forwards to 1e12, back to 99, back to -5e6
    assert stop.waits and max(stop.waits) <= 0.2
    # A gap within the bound is waited for (at the playback speed).
    stop = _RecordingEvent()
    pacer = _Pacer(speed=2.0, max_jump_s=10.0, stop=stop)
    for ts in (0.0, 8000.0):
        pacer.wait_for(ts)
    assert pacer.rebased == 0 and 3.9 < stop.waits[-1] <= 4.0
    # The same gap beyond the bound at a slower speed (8 s / 0.5 = 16 s of wall time) re-bases.
    pacer = _Pacer(speed=0.5, max_jump_s=10.0, stop=_RecordingEvent())
    for ts in (0.0, 8000.0):
        pacer.wait_for(ts)
    assert pacer.rebased == 1
    # Through the pipeline: every frame processed, the re-bases reported.
    report = run_stream(StampedSource(stamps), SlowBackend(0.0), options=StreamOptions(realtime=True, drop=False, progress=False))
    assert report["frames_processed"] == len(stamps) and report["timestamps_rebased"] == 3


@pytest.mark.parametrize("bad", [dict(speed=0.0), dict(speed=float("nan")), dict(max_time_jump_s=-1.0), dict(batch_size=0)])
def test_bad_stream_options_are_one_line_errors(bad):
    from pocus_edge.errors import ConfigError

    with pytest.raises(ConfigError):
        run_stream(StampedSource([0.0]), SlowBackend(0.0), options=StreamOptions(progress=False, **bad))


class NoiseBackend:
    """Full-resolution probability = the frame's brightness: random frames give masks that do
    not compress (so a small disk fills up)."""

    name, precision, device, threshold = "noise", "fp32", "cpu", 0.5

    def prepare(self, frame):
        return (frame.astype(np.float32) / 255.0)[None]

    def run(self, batch):
        return {"prob": batch}

    def describe(self):
        return {"backend": self.name, "precision": self.precision, "device": self.device}


def test_full_disk_mask_sink_is_one_line_and_leaves_nothing(tmp_path):
    from _fs import small_tmpfs

    from pocus_edge.errors import OutputError

    with small_tmpfs(tmp_path, "64k") as disk:
        src = ListSource(_frames(40, shape=(200, 200)))
        with pytest.raises(OutputError, match=r"masks\.npz: cannot write \(disk full\)") as err:
            run_stream(src, NoiseBackend(), sinks=[MaskFileSink(disk / "masks.npz")], report_path=tmp_path / "r.json",
                       options=StreamOptions(progress=False))
        assert err.value.exit_code == 2
        assert list(disk.iterdir()) == []  # neither the archive nor its temporary
        # The report of what was done is still written (on another disk).
        report = json.loads((tmp_path / "r.json").read_text())
        assert 0 < report["frames_processed"] < 40 and report["final"] is True


def test_stream_command_on_a_full_disk_exits_2_with_one_line(tiny_onnx, tmp_path, capsys):
    import cv2
    from _fs import small_tmpfs

    from pocus_edge.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(_frames(3, seed=2)):
        cv2.imwrite(str(folder / f"f{i}.png"), f)
    with small_tmpfs(tmp_path, "16k") as disk:
        filler = disk / "filler.bin"
        with open(filler, "wb", buffering=0) as fh:  # fill the disk to the last byte
            try:
                while True:
                    fh.write(b"\0" * 512)
            except OSError:
                pass
        capsys.readouterr()
        rc = main(["stream", str(folder), "--model", str(tiny_onnx[0]), "--threads", "1", "--no-progress",
                   "--report", str(disk / "report.json"), "--masks", str(disk / "masks.npz")])
        assert rc == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "disk full" in lines[0] and str(disk) in lines[0]
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


@pytest.mark.parametrize("card", [None, {"img_size": SIZE, "precision": "fp32"}, {"img_size": SIZE, "precision": "int8"}])
def test_report_precision_follows_the_models_input_type(tmp_path, card):
    """A graph with float16 input reports fp16 (also when a converter left the fp32 export's card
    on it); a float32 graph reports its card's precision, fp32 without one."""
    import onnx
    from onnx import TensorProto, helper

    for elem, expected in ((TensorProto.FLOAT16, "fp16" if (card or {}).get("precision") != "int8" else "int8"),
                           (TensorProto.FLOAT, (card or {}).get("precision", "fp32"))):
        inp = helper.make_tensor_value_info("frames", elem, ["batch", 3, SIZE, SIZE])
        out = helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])
        nodes = [helper.make_node("Cast", ["frames"], ["x"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["x"], ["fused"], axes=[1], keepdims=1)]
        model = helper.make_model(helper.make_graph(nodes, "mean", [inp], [out]), opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        if card is not None:
            model.metadata_props.append(onnx.StringStringEntryProto(key="pocus_edge_card", value=json.dumps(card)))
        path = tmp_path / f"m{elem}.onnx"
        onnx.save(model, str(path))
        report = run_stream(ListSource(_frames(2)), open_backend(path, threads=1), options=StreamOptions(progress=False))
        assert report["precision"] == expected, (elem, card)
        assert report["input_dtype"] == ("float16" if elem == TensorProto.FLOAT16 else "float32")
        assert report["frames_processed"] == 2
