"""Importer round trip on videos, a multi-frame DICOM and label volumes the test writes itself,
and each refusal (nothing half-written)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from pocus_edge.data.importer import import_videos
from pocus_edge.data.layout import load_site
from pocus_edge.errors import DataError

H, W, N = 24, 32, 3  # the AVI's frames
DH, DW, DN = 20, 28, 4  # the DICOM's frames


def frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    # Smooth-ish content so even a lossy fallback codec stays close.
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (h // 4, w // 4), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(n)])


def write_video(path, video: np.ndarray) -> int:
    """Write grayscale frames; returns the pixel tolerance of the codec used (FFV1 is lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for fourcc, tol in (("FFV1", 0), ("MJPG", 12)):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (video.shape[2], video.shape[1]), isColor=False)
        if writer.isOpened():
            for f in video:
                writer.write(f)
            writer.release()
            return tol
    pytest.skip("OpenCV here can write neither FFV1 nor MJPG video")


def write_dicom(path, video: np.ndarray, patient_id: str, *, bits: int = 8, photometric: str = "MONOCHROME2") -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "US"
    ds.Rows, ds.Columns = video.shape[1:3]
    ds.NumberOfFrames = video.shape[0]
    ds.SamplesPerPixel = 3 if video.ndim == 4 else 1
    if video.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    allocated = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(video, dtype=np.uint8 if allocated == 8 else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def write_labels(path, labels: np.ndarray) -> None:
    """labels: (frames, rows, columns) -> a volume of size (columns, rows, frames), as ITK-SNAP saves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(labels)
    assert image.GetSize() == labels.shape[::-1]
    sitk.WriteImage(image, str(path))


def avi_labels() -> np.ndarray:
    labels = np.zeros((N, H, W), np.uint8)
    labels[0, 2:10, 3:12] = 1
    labels[0, 12:20, 3:9] = 3
    labels[2, 5:9, 20:30] = 2  # frame 1 stays empty: not annotated
    return labels


def dicom_labels() -> np.ndarray:
    labels = np.zeros((DN, DH, DW), np.uint8)
    labels[1, 4:16, 5:25] = 1
    return labels


@pytest.fixture
def inputs(tmp_path):
    videos, labels = tmp_path / "videos", tmp_path / "labels"
    avi = frames(N, H, W, seed=1)
    dcm = frames(DN, DH, DW, seed=2)
    tol = write_video(videos / "P001" / "dorsal.avi", avi)
    write_dicom(videos / "P002_volar.dcm", dcm, patient_id="PID-2")
    write_labels(labels / "P001" / "dorsal-seg.nii.gz", avi_labels())
    write_labels(labels / "P002_volar.nrrd", dicom_labels())
    return {"videos": videos, "labels": labels, "avi": avi, "dcm": dcm, "tol": tol, "root": tmp_path}


def test_round_trip(inputs):
    out = inputs["root"] / "site"
    site = import_videos(inputs["videos"], out, labels_dir=inputs["labels"], view_from=r"(dorsal|volar)")
    assert load_site(out).records == site.records
    by_video = {}
    for r in site.records:
        by_video.setdefault(r.videoname, []).append(r)
    assert sorted(by_video) == ["P001_dorsal", "P002_volar"]
    for name, video, labels, patient, view in (
        ("P001_dorsal", inputs["avi"], avi_labels(), "P001", "dorsal"),
        ("P002_volar", inputs["dcm"], dicom_labels(), "PID-2", "volar"),  # DICOM PatientID wins
    ):
        records = by_video[name]
        assert [r.framenum for r in records] == list(range(len(video)))
        assert {r.patient for r in records} == {patient} and {r.view for r in records} == {view}
        for r, frame, label in zip(records, video, labels):
            image = site.read_image(r)
            tol = inputs["tol"] if name.endswith("dorsal") else 0  # DICOM pixels are exact
            assert np.abs(image.astype(int) - frame).max() <= tol
            assert r.labeled == bool(label.any())
            if r.labeled:
                np.testing.assert_array_equal(site.read_mask(r), label)
    assert sum(r.labeled for r in site.records) == 3


def test_patient_regex_and_background_slices(inputs):
    out = inputs["root"] / "site"
    site = import_videos(
        inputs["videos"], out, labels_dir=inputs["labels"], patient_from=r"^(P\d+)", empty_slices="background"
    )
    assert site.patients() == ["P001", "P002"]
    assert all(r.labeled for r in site.records), "every slice of a labeled video counts when empty = background"
    blank = [r for r in site.records if r.videoname == "P001_dorsal" and r.framenum == 1][0]
    assert site.read_mask(blank).max() == 0


def test_videos_without_labels(inputs):
    site = import_videos(inputs["videos"], inputs["root"] / "site")
    assert len(site.records) == N + DN and not any(r.labeled for r in site.records)
    assert not site.masks_dir.exists()


def _refused(inputs, match, **kwargs):
    out = inputs["root"] / "site"
    before = sorted(p.name for p in inputs["root"].iterdir())
    with pytest.raises(DataError, match=match) as info:
        import_videos(inputs["videos"], out, labels_dir=kwargs.pop("labels_dir", inputs["labels"]), **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists(), "nothing half-written"
    assert sorted(p.name for p in inputs["root"].iterdir()) == before, "no temporary folder left behind"
    return str(info.value)


def test_refuses_frame_count_mismatch(inputs):
    # The DICOM's label gets one slice too many; the AVI (imported first) is already written to the temp folder.
    write_labels(inputs["labels"] / "P002_volar.nrrd", np.zeros((DN + 1, DH, DW), np.uint8))
    message = _refused(inputs, "frame-count mismatch")
    assert "P002_volar.nrrd" in message and f"{DN + 1} label slices" in message and f"{DN} frames" in message


def test_refuses_too_few_slices(inputs):
    write_labels(inputs["labels"] / "P001" / "dorsal-seg.nii.gz", avi_labels()[:2])
    assert "dorsal-seg.nii.gz" in _refused(inputs, "frame-count mismatch: 2 label slices")


def test_refuses_swapped_geometry(inputs):
    write_labels(inputs["labels"] / "P001" / "dorsal-seg.nii.gz", np.zeros((N, W, H), np.uint8))
    assert "dorsal-seg.nii.gz" in _refused(inputs, "rows and columns swapped")


def test_refuses_wrong_frame_size(inputs):
    write_labels(inputs["labels"] / "P002_volar.nrrd", np.zeros((DN, DH, DW + 1), np.uint8))
    _refused(inputs, f"label slices are {DW + 1}x{DH}")


def test_refuses_unreadable_video(inputs):
    (inputs["videos"] / "P003_broken.mp4").write_bytes(b"\x00not a video" * 50)
    assert "P003_broken.mp4" in _refused(inputs, "unreadable video")


def test_refuses_corrupt_dicom(inputs):
    (inputs["videos"] / "P004.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
    assert "P004.dcm" in _refused(inputs, "DICOM")


def test_refuses_corrupt_label_file(inputs):
    (inputs["labels"] / "P002_volar.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    assert "P002_volar.nrrd" in _refused(inputs, "unreadable label file")


def test_refuses_bad_label_values(inputs):
    write_labels(inputs["labels"] / "P002_volar.nrrd", np.full((DN, DH, DW), 300, np.uint16))
    _refused(inputs, "label values must be integers 0-255")


def test_refuses_unmatched_label_file(inputs):
    write_labels(inputs["labels"] / "P009_radial.nii.gz", np.zeros((1, 2, 2), np.uint8))
    assert "P009_radial.nii.gz" in _refused(inputs, "matches no video")


def test_refuses_unmatched_patient_regex(inputs):
    assert "P002_volar.dcm" in _refused(inputs, "does not match", patient_from=r"^P\d+/")


def test_refuses_empty_folder(inputs, tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no videos found"):
        import_videos(tmp_path / "nothing", tmp_path / "site")


def test_existing_output(inputs):
    out = inputs["root"] / "site"
    import_videos(inputs["videos"], out)
    with pytest.raises(DataError, match="already exists"):
        import_videos(inputs["videos"], out, labels_dir=inputs["labels"])
    replaced = import_videos(inputs["videos"], out, labels_dir=inputs["labels"], overwrite=True)
    assert sum(r.labeled for r in replaced.records) == 3
    assert sorted(p.name for p in inputs["root"].iterdir()) == ["labels", "site", "videos"]
    (inputs["root"] / "notes").mkdir()
    (inputs["root"] / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a site folder"):
        import_videos(inputs["videos"], inputs["root"] / "notes", overwrite=True)
    assert (inputs["root"] / "notes" / "keep.txt").read_text() == "mine"


def test_video_to_volume_matches_the_import_convention(inputs):
    # A user builds the ITK-SNAP volume with video_to_volume, draws labels on it and saves them
    # with the same geometry; the importer must put slice z on frame z with rows/columns intact.
    from pocus_edge.data.importer import video_to_volume

    volume_path = video_to_volume(inputs["videos"] / "P002_volar.dcm", inputs["root"] / "volar.nii.gz")
    volume = sitk.ReadImage(str(volume_path))
    assert volume.GetSize() == (DW, DH, DN)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), inputs["dcm"])
    labels = (sitk.GetArrayFromImage(volume) > 128).astype(np.uint8) * 2
    segmentation = sitk.GetImageFromArray(labels)
    segmentation.CopyInformation(volume)
    sitk.WriteImage(segmentation, str(inputs["labels"] / "P002_volar.nrrd"))
    site = import_videos(inputs["videos"], inputs["root"] / "site", labels_dir=inputs["labels"])
    for r in (r for r in site.records if r.videoname == "P002_volar"):
        image = site.read_image(r)
        assert r.labeled == bool((image > 128).any())
        if r.labeled:
            np.testing.assert_array_equal(site.read_mask(r), (image > 128).astype(np.uint8) * 2)


@pytest.mark.parametrize("kind", ["12-bit MONOCHROME1", "RGB"])
def test_dicom_pixel_conversions(tmp_path, kind):
    from pocus_edge.data.importer import read_video_frames

    gray = frames(2, 8, 10, seed=5)
    if kind == "RGB":
        rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
        write_dicom(tmp_path / "v" / "a.dcm", rgb, "P", photometric="RGB")
        expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])
    else:
        # 12 bits stored: the top 8 bits are kept; MONOCHROME1 (0 = white) is inverted.
        stored = gray.astype(np.uint16) << 4 | 0x9
        write_dicom(tmp_path / "v" / "a.dcm", stored, "P", bits=12, photometric="MONOCHROME1")
        expected = 255 - gray
    np.testing.assert_array_equal(read_video_frames(tmp_path / "v" / "a.dcm"), expected)
    site = import_videos(tmp_path / "v", tmp_path / "site")
    np.testing.assert_array_equal(np.stack([site.read_image(r) for r in site.records]), expected)
