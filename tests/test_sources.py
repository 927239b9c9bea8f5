"""Frame sources: TeleMED .tvd.h5 (ROI crop, timing, lazy reads, clear errors), video,
image folders, multi-frame DICOM, and the SOURCE-string dispatcher."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest

from pocus_edge.errors import DataError
from pocus_edge.runtime.sources import (
    DicomSource,
    ImageFolderSource,
    TvdH5Source,
    VideoSource,
    open_source,
)


def _write_tvd(path, frames, times, roi=None, n_frames=None, skip=()):
    """Write a recording per the telemed package's schema v1 with h5py directly (independent of
    the runtime's own writer)."""
    with h5py.File(path, "w") as h5:
        if "frames" not in skip:
            h5.create_dataset("frames/gray", data=frames, chunks=(1,) + frames.shape[1:])
        if "times" not in skip:
            h5.create_dataset("timing/time_ms", data=times.astype(np.float64))
        h5.attrs["n_frames"] = len(frames) if n_frames is None else n_frames
        if roi is not None:
            for k, v in zip(("roi1_x1", "roi1_x2", "roi1_y1", "roi1_y2"), roi):
                h5.attrs[k] = v
    return path


def test_tvd_h5_streams_roi_crop_with_recorded_timing(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(23, 40, 60), dtype=np.uint8)
    times = np.cumsum(rng.uniform(20, 40, size=23)) + 1000.0  # irregular, as recorded
    x1, x2, y1, y2 = 5, 44, 3, 38  # 1-based inclusive: 40 columns, 36 rows
    path = _write_tvd(tmp_path / "rec.tvd.h5", frames, times, roi=(x1, x2, y1, y2))
    with open_source(path) as src:
        assert isinstance(src, TvdH5Source) and len(src) == 23
        got = list(src)
    assert [i for _, _, i in got] == list(range(23))
    for (frame, ts, i) in got:
        assert frame.shape == (36, 40) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, frames[i, y1 - 1 : y2, x1 - 1 : x2])
        assert ts == times[i]


def test_tvd_h5_reads_lazily(tmp_path):
    # 400 frames of 250x250 = 25 MB on disk; streaming the first frames must not load them all.
    frames = np.zeros((400, 250, 250), dtype=np.uint8)
    frames[:, 10, 10] = np.arange(400) % 256
    path = _write_tvd(tmp_path / "big.tvd.h5", frames, np.arange(400) * 33.0)
    del frames
    with TvdH5Source(path, chunk=8) as src:
        tracemalloc.start()
        it = iter(src)
        firsts = [next(it) for _ in range(20)]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert [f[0][10, 10] for f in firsts] == list(range(20))
    assert peak < 5 * 1024 * 1024, peak


def test_tvd_h5_errors_are_clear(tmp_path):
    frames = np.zeros((4, 20, 30), dtype=np.uint8)
    times = np.arange(4) * 30.0
    good = _write_tvd(tmp_path / "good.tvd.h5", frames, times)
    data = good.read_bytes()
    truncated = tmp_path / "cut.tvd.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.tvd.h5"):
        list(TvdH5Source(truncated))
    missing = _write_tvd(tmp_path / "notime.tvd.h5", frames, times, skip=("times",))
    with pytest.raises(DataError, match="missing dataset /timing/time_ms"):
        TvdH5Source(missing)
    missing = _write_tvd(tmp_path / "noframes.tvd.h5", frames, times, skip=("frames",))
    with pytest.raises(DataError, match="missing dataset /frames/gray"):
        TvdH5Source(missing)
    oob = _write_tvd(tmp_path / "roi.tvd.h5", frames, times, roi=(1, 31, 1, 20))  # x2 > width 30
    with pytest.raises(DataError, match="out of bounds"):
        TvdH5Source(oob)
    short = _write_tvd(tmp_path / "short.tvd.h5", frames, times, n_frames=9)
    with pytest.raises(DataError, match="n_frames=9"):
        TvdH5Source(short)
    with pytest.raises(DataError, match="not a readable HDF5"):
        (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
        TvdH5Source(tmp_path / "junk.h5")


def test_video_source_reads_frames_and_timing(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (48, 32), isColor=True)
    originals = []
    for k in range(10):
        gray = np.full((32, 48), 20 * k + 10, dtype=np.uint8)
        originals.append(gray)
        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    writer.release()
    with open_source(path) as src:
        assert isinstance(src, VideoSource)
        got = list(src)
    assert len(got) == 10
    for (frame, ts, i), orig in zip(got, originals):
        assert frame.shape == (32, 48) and frame.dtype == np.uint8
        assert abs(float(frame.mean()) - float(orig.mean())) < 3  # MJPG is lossy
        assert ts == pytest.approx(i * 40.0)
    with pytest.raises(DataError, match="OpenCV cannot open"):
        (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
        VideoSource(tmp_path / "bad.mp4")


def test_image_folder_natural_order_and_corrupt_file_counted(tmp_path):
    import cv2

    for k in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"frame{k}.png"), np.full((8, 8), k, dtype=np.uint8))
    (tmp_path / "frame5.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(tmp_path, fps=20)
    assert isinstance(src, ImageFolderSource)
    got = list(src)
    assert [int(f[0, 0]) for f, _, _ in got] == [1, 2, 10]
    assert src.frames_invalid == 1
    # The timestamp follows the file's place in the folder, so a skipped file leaves a gap.
    assert [ts for _, ts, _ in got] == [0.0, 50.0, 150.0]


def _write_dicom(path, frames, *, bits_stored=8, frame_time=None, photometric="MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US multi-frame
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if frames.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frame_time is not None:
        ds.FrameTime = frame_time
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_multiframe(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(6, 16, 20), dtype=np.uint8)
    path = _write_dicom(tmp_path / "cine.dcm", frames, frame_time=25.0)
    with open_source(path) as src:
        assert isinstance(src, DicomSource) and len(src) == 6
        got = list(src)
    for (frame, ts, i), orig in zip(got, frames):
        np.testing.assert_array_equal(frame, orig)
        assert ts == pytest.approx(25.0 * i)
    # 12-bit data in 16-bit words is reduced to its top 8 bits; MONOCHROME1 is inverted.
    frames16 = rng.integers(0, 4096, size=(3, 8, 8), dtype=np.uint16)
    path = _write_dicom(tmp_path / "deep", frames16, bits_stored=12, photometric="MONOCHROME1")
    got = list(open_source(path))  # no suffix: recognised by the DICM preamble
    for (frame, _, _), orig in zip(got, frames16):
        np.testing.assert_array_equal(frame, 255 - (orig >> 4).astype(np.uint8))
    with pytest.raises(DataError, match="not a readable DICOM"):
        (tmp_path / "x.dcm").write_bytes(b"garbage")
        DicomSource(tmp_path / "x.dcm")


def test_open_source_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "nope.mp4")


def _tvd_with(tmp_path, name, **attrs):
    frames = np.zeros((3, 10, 12), dtype=np.uint8)
    path = _write_tvd(tmp_path / f"{name}.tvd.h5", frames, np.arange(3) * 33.0, roi=(1, 12, 1, 10))
    with h5py.File(path, "a") as h5:
        for key, value in attrs.items():
            if key == "times":
                del h5["timing/time_ms"]
                h5.create_dataset("timing/time_ms", data=value)
            else:
                h5.attrs[key] = value
    return path


@pytest.mark.parametrize(
    "attrs, fragment",
    [
        (dict(n_frames="3"), "n_frames must be a whole number, got text"),
        (dict(n_frames=np.nan), "n_frames must be a whole number, got nan"),
        (dict(n_frames=2.5), "n_frames must be a whole number, got 2.5"),
        (dict(n_frames=np.array([3, 3])), "n_frames must be one whole number, got an array of shape (2,)"),
        (dict(n_frames=-1), "n_frames must be >= 0, got -1"),
        (dict(roi1_x1="1"), "roi1_x1 must be a whole number, got text"),
        (dict(roi1_x2=np.inf), "roi1_x2 must be a whole number, got inf"),
        (dict(roi1_y1=-4), "roi1_y1 must be >= 1, got -4"),
        (dict(roi1_y2=np.zeros((2, 2))), "roi1_y2 must be one whole number"),
        (dict(times=np.array([b"0.0", b"33.3", b"66.6"])), "time_ms must hold numbers (milliseconds), got text"),
    ],
)
def test_malformed_tvd_h5_attributes_are_one_line_errors(tmp_path, attrs, fragment):
    # These raised ValueError/TypeError from a bare int() (a traceback from the command).
    path = _tvd_with(tmp_path, "bad", **attrs)
    with pytest.raises(DataError) as err:
        open_source(path)
    assert fragment in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_well_formed_attribute_variants_still_load(tmp_path):
    # One-element arrays and whole floats are what some writers store: they are accepted.
    path = _tvd_with(tmp_path, "ok", n_frames=np.array([3]), roi1_x2=12.0)
    with TvdH5Source(path) as src:
        assert len(src) == 3 and src.roi == (0, 10, 0, 12)
