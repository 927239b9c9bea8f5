"""The overlay video: H.264 MP4 that browsers play, read back by a second library (OpenCV), and
never left undecodable under its final name (full disk, failing encoder, no PyAV)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
av = pytest.importorskip("av")

from pocus_edge.errors import DataError  # noqa: E402
from pocus_edge.runtime.overlay import OverlayCodecWarning, VideoSink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def frame(k: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Frame k: a dark background with a bright 32x32 square whose column moves with k, and a
    mid-gray band at the bottom - large flat areas, so lossy coding keeps them recognisable."""
    img = np.full((height, width, 3), 30, np.uint8)
    img[height - 16 :, :] = (128, 128, 128)
    col = 8 + 4 * k
    img[16:48, col : col + 32] = (230, 230, 230)
    return img


def boxes(path: Path) -> list[tuple[bytes, int]]:
    """Top-level MP4 boxes (type, offset)."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        out.append((kind, pos))
        if size < 8:
            break
        pos += size
    return out


def test_h264_overlay_decodes_with_opencv_and_plays_in_browsers(tmp_path):
    path = tmp_path / "overlay.mp4"
    sink = VideoSink(path, fps=25)
    for k in range(12):
        sink.write(frame(k))
    sink.close()
    assert sink.codec == "h264"
    # Second library: OpenCV decodes every frame, and frame 7 shows the square where it was drawn.
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        decoded.append(img)
    cap.release()
    assert len(decoded) == 12
    seventh = decoded[7].astype(int)
    assert seventh.shape == (96, 128, 3)
    assert np.abs(seventh - frame(7).astype(int)).mean() < 4.0
    square_cols = np.where(seventh[32].mean(axis=1) > 150)[0]
    assert abs(square_cols.min() - (8 + 4 * 7)) <= 1 and abs(square_cols.max() - (8 + 4 * 7 + 31)) <= 1
    # What browsers need: H.264 with 4:2:0 chroma, and the index (moov) before the media data.
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.frames == 12 and abs(float(stream.average_rate) - 25) < 1e-6
    kinds = [kind for kind, _ in boxes(path)]
    assert kinds.index(b"moov") < kinds.index(b"mdat")
    assert not [p for p in tmp_path.iterdir() if p.name != "overlay.mp4"]


def test_odd_frame_sizes_are_padded_to_even_and_decoded(tmp_path):
    path = tmp_path / "odd.mp4"
    sink = VideoSink(path, fps=30)
    for k in range(3):
        sink.write(frame(k, 75, 101))
    sink.close()
    cap = cv2.VideoCapture(str(path))
    ok, img = cap.read()
    assert ok and img.shape == (76, 102, 3)
    assert np.abs(img[:75, :101].astype(int) - frame(0, 75, 101).astype(int)).mean() < 4.0


def test_without_pyav_the_overlay_is_mp4v_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.warns(OverlayCodecWarning, match="browsers"):
        sink = VideoSink(tmp_path / "o.mp4", fps=10)
    for k in range(5):
        sink.write(frame(k))
    sink.close()
    assert sink.codec == "mp4v"
    cap = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    assert fourcc.lower() in ("mp4v", "fmp4")  # MPEG-4 part 2 (FFmpeg names it FMP4)
    cap.release()
    with pytest.raises(DataError, match="PyAV"):
        VideoSink(tmp_path / "p.mp4", codec="h264")


def test_a_writer_that_cannot_start_raises_one_data_error_and_leaves_nothing(tmp_path):
    # OpenCV picks the container from the suffix and has none for ".nosuchformat".
    sink = VideoSink(tmp_path / "x.nosuchformat", codec="mp4v")
    with pytest.raises(DataError, match=r"x\.nosuchformat: could not start the overlay video"):
        sink.write(frame(0))
    sink.close()  # the pipeline still closes its sinks: nothing left to do, no TypeError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_full_disk_never_leaves_a_video_under_the_final_name(tmp_path, codec):
    # A file-size limit makes every write past 60 kB fail with EFBIG, as a full disk does.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from pocus_edge.errors import DataError
        from pocus_edge.runtime.overlay import VideoSink
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        rng = np.random.default_rng(0)
        sink = VideoSink(sys.argv[1], fps=30, codec={codec!r})
        try:
            for k in range(40):
                sink.write(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
            sink.close()
        except DataError as exc:
            print("DataError:", exc)
            sys.exit(2)
        print("no error")
        """
    )
    target = tmp_path / "overlay.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"DataError: {target}:" in proc.stdout and "nothing was written" in proc.stdout
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
