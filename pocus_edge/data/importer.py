"""Turn a folder of cine videos (+ optional ITK-SNAP segmentations) into a site folder.

Videos: ``.mp4 .avi .mov .mkv .m4v`` (OpenCV) and DICOM (``.dcm``/``.dicom``, or any file with
the ``DICM`` preamble; multi-frame or single-frame, via pydicom). Colour frames are converted to
grayscale (OpenCV's BGR->gray luminance), DICOM ``MONOCHROME1`` is inverted, and DICOM pixels
stored with more than 8 bits are shifted down to 8.

Video names: the file's path relative to the videos folder, without extension, with ``/``
replaced by ``_`` (``P001/dorsal.mp4`` -> ``P001_dorsal``). Frames are named
``<video>_<framenum:05d>.png`` and numbered from 0 in decoding order.

Patients: ``patient_from`` is a regular expression searched in the relative path (without
extension); its first group (or the whole match) is the patient. Without it, a DICOM's
PatientID is used when present, else the video name up to the first ``_`` (the same rule a
released-code CSV without a patient column gets). ``view_from`` works the same for the view.

Segmentations (``labels_dir``): ``.nii.gz .nii .nrrd .nhdr .mha .mhd`` read with SimpleITK. A
label file belongs to the video whose relative path it mirrors (``LABELS/P001/dorsal.nii.gz``),
or, if it sits directly in ``labels_dir``, to the one video with its file name; an optional
``-seg``/``_seg``/``-label``/``_label``/``-labels``/``_labels`` suffix is ignored
(``dorsal-seg.nii.gz``). Axis convention: the label volume is the video stacked along z, i.e.
its size (x, y, z) is (frame width, frame height, number of frames), so that voxel (x, y, z)
is pixel (column x, row y) of frame z (SimpleITK's array view is ``[frame, row, column]``).
That is the geometry ITK-SNAP saves for a segmentation drawn on a volume built that way (see
README, "Bring your own data"); the importer compares sizes only, since a video carries no
spacing or orientation to compare. Label values must be integers 0-255 (1 metaphysis,
2 epiphysis, 3 carpal bones; any value >= 1 is bone for training).

A frame is labeled when its label slice has any non-zero voxel: ITK-SNAP users annotate a few
frames of a sweep and leave the rest empty. When every frame was annotated, frames without any
bone are labeled too: pass ``empty_slices="background"``.

All output goes to a temporary folder next to ``out`` that is renamed into place at the end;
any error (unreadable file, frame-count mismatch, wrong label geometry) raises one DataError
naming the file and leaves nothing behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_path
from .layout import MANIFEST, FrameRecord, Site, SiteWriter, _patient_from_video, load_site

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
DICOM_SUFFIXES = (".dcm", ".dicom")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_NAME_SUFFIXES = ("-seg", "_seg", "-label", "_label", "-labels", "_labels")
EMPTY_SLICES = ("unlabeled", "background")


@dataclass
class VideoSource:
    """One input video: its file, its key (relative path without extension) and kind."""

    path: Path
    key: str
    kind: str  # "video" | "dicom"

    @property
    def videoname(self) -> str:
        return self.key.replace("/", "_")


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for sfx in suffixes:
        if lower.endswith(sfx):
            return name[: -len(sfx)]
    return None


def find_videos(videos_dir: Path) -> list[VideoSource]:
    """Every video / DICOM file under ``videos_dir`` (recursively, sorted). A single file works too."""
    if videos_dir.is_file():
        candidates, base = [videos_dir], videos_dir.parent
    elif videos_dir.is_dir():
        candidates, base = sorted(p for p in videos_dir.rglob("*") if p.is_file()), videos_dir
    else:
        raise DataError(f"{videos_dir}: videos folder not found")
    sources = []
    for path in candidates:
        if any(part.startswith(".") for part in path.relative_to(base).parts):
            continue  # hidden files and folders (.DS_Store, partial downloads)
        rel = path.relative_to(base).as_posix()
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            sources.append(VideoSource(path, rel[: -len(path.suffix)], "video"))
        elif suffix in DICOM_SUFFIXES or (suffix == "" and _is_dicom(path)):
            sources.append(VideoSource(path, rel[: -len(path.suffix)] if path.suffix else rel, "dicom"))
    if not sources:
        raise DataError(
            f"{videos_dir}: no videos found (looked for {', '.join(VIDEO_SUFFIXES + DICOM_SUFFIXES)} and DICOM files)"
        )
    names: dict[str, Path] = {}
    for s in sources:
        if s.videoname in names:
            raise DataError(f"{s.path}: video name {s.videoname!r} clashes with {names[s.videoname]}")
        names[s.videoname] = s.path
    return sources


def match_labels(labels_dir: Path, sources: list[VideoSource]) -> dict[str, Path]:
    """Map video key -> label file. A label file that matches no video (or several) is an error:
    it is almost always a typo, and silently dropping annotations is worse than stopping."""
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: labels folder not found")
    by_key = {s.key: s for s in sources}
    by_stem: dict[str, list[VideoSource]] = {}
    for s in sources:
        by_stem.setdefault(s.key.rsplit("/", 1)[-1], []).append(s)
    matched: dict[str, Path] = {}
    for path in sorted(p for p in labels_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(labels_dir).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        key = _strip_suffix(rel, LABEL_SUFFIXES)
        if key is None:
            continue
        stripped = _strip_suffix(key, LABEL_NAME_SUFFIXES)
        candidates = [k for k in (key, stripped) if k]
        video = next((by_key[k] for k in candidates if k in by_key), None)
        if video is None and "/" not in key:
            for k in candidates:
                same = by_stem.get(k, [])
                if len(same) > 1:
                    raise DataError(
                        f"{path}: matches several videos ({', '.join(str(v.path) for v in same)}); "
                        "mirror the videos' folders under the labels folder"
                    )
                if same:
                    video = same[0]
                    break
        if video is None:
            raise DataError(f"{path}: label file matches no video (expected a video named like {candidates[-1]!r})")
        if video.key in matched:
            raise DataError(f"{path}: second label file for {video.path} (first: {matched[video.key]})")
        matched[video.key] = path
    return matched


def _frames_opencv(path: Path) -> Iterator[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DataError(f"{path}: unreadable video (OpenCV cannot open it)")
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if frame.ndim == 3:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            yield np.ascontiguousarray(frame, dtype=np.uint8)
    finally:
        capture.release()


def _dicom_frames(path: Path) -> tuple[np.ndarray, str]:
    """All frames of a DICOM file as uint8 (N, H, W), and its PatientID."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises several types for corrupt files
        raise DataError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"{path}: cannot decode DICOM pixels (transfer syntax {getattr(syntax, 'name', syntax)}; "
            f"{type(exc).__name__}: {exc}); compressed DICOM may need pylibjpeg or gdcm"
        ) from None
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(pixels)
    if frames == 1:
        pixels = pixels[None]
    if samples == 3:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise DataError(f"{path}: colour DICOM with unexpected pixel shape {pixels.shape}")
        import cv2

        pixels = np.stack([cv2.cvtColor(np.ascontiguousarray(f, dtype=np.uint8), cv2.COLOR_RGB2GRAY) for f in pixels])
    elif samples != 1 or pixels.ndim != 3:
        raise DataError(f"{path}: unsupported DICOM pixel layout (SamplesPerPixel {samples}, shape {pixels.shape})")
    bits = int(ds.get("BitsStored", 8))
    if pixels.dtype != np.uint8:
        if np.issubdtype(pixels.dtype, np.signedinteger) and pixels.min() < 0:
            raise DataError(f"{path}: signed DICOM pixels are not supported for ultrasound frames")
        if bits > 8:
            pixels = pixels.astype(np.int64) >> (bits - 8)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1: 0 is white
    return pixels, str(ds.get("PatientID", "") or "").strip()


def read_label_volume(path: Path) -> np.ndarray:
    """A label volume as uint8 (frames, rows, columns); see the module docstring for the axes."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise DataError(f"{path}: unreadable label file ({first[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: label volume has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected 1")
    if image.GetDimension() not in (2, 3):
        raise DataError(f"{path}: label volume is {image.GetDimension()}-D, expected 3-D (width x height x frames)")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 2:
        array = array[None]  # a 2-D label image: one frame
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: label voxels of type {array.dtype} are not numbers")
    if array.size:
        low, high = array.min(), array.max()
        if low < 0 or high > 255 or (np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array))):
            raise DataError(f"{path}: label values must be integers 0-255 (found {low}..{high})")
    return array.astype(np.uint8)


def _check_label_geometry(label_path: Path, labels: np.ndarray, video: Path, n_frames: int, frame_shape: tuple[int, int]) -> None:
    h, w = frame_shape
    n, lh, lw = labels.shape
    if (lh, lw) != (h, w):
        hint = " (rows and columns swapped?)" if (lh, lw) == (w, h) else ""
        raise DataError(
            f"{label_path}: label slices are {lw}x{lh} (width x height) but the frames of {video} are {w}x{h}{hint}"
        )
    if n != n_frames:
        raise DataError(f"{label_path}: frame-count mismatch: {n} label slices but {video} has {n_frames} frames")


def _regex(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: bad regular expression {pattern!r} ({exc})") from None


def _extract(regex: re.Pattern, source: VideoSource, what: str) -> str:
    match = regex.search(source.key)
    if match is None:
        raise DataError(f"{source.path}: {what} pattern {regex.pattern!r} does not match {source.key!r}")
    value = next((g for g in match.groups() if g), None) if match.groups() else match.group(0)
    if not value:
        raise DataError(f"{source.path}: {what} pattern {regex.pattern!r} matched an empty string in {source.key!r}")
    return value


@dataclass
class ImportSummary:
    videos: int
    frames: int
    labeled: int
    patients: int


def import_videos(
    videos_dir: str | Path,
    out_dir: str | Path,
    *,
    labels_dir: str | Path | None = None,
    patient_from: str | None = None,
    view_from: str | None = None,
    empty_slices: str = "unlabeled",
    overwrite: bool = False,
    progress: Callable[[VideoSource, int], None] | None = None,
) -> Site:
    """Import videos (+ label volumes) into a new site folder ``out_dir``; returns the loaded Site.

    ``progress(video, frames)`` is called after each video. See the module docstring for naming,
    patients, label matching, the axis convention and ``empty_slices``.
    """
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if empty_slices not in EMPTY_SLICES:
        raise ConfigError(f"empty_slices must be one of {', '.join(EMPTY_SLICES)}, got {empty_slices!r}")
    patient_regex = _regex(patient_from, "--patient-from")
    view_regex = _regex(view_from, "--view-from")
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir}: already exists; choose a new folder or pass --overwrite")
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        # Replacing is only safe for something that is a site already: never wipe a random folder.
        raise DataError(f"{out_dir}: exists, is not empty and is not a site folder; refusing to replace it")
    sources = find_videos(videos_dir)
    label_files = match_labels(Path(labels_dir), sources) if labels_dir is not None else {}
    # Validate every name before decoding anything, so a typo fails in a second, not after an hour.
    patients = {
        s.key: _extract(patient_regex, s, "patient") if patient_regex else None for s in sources
    }
    views = {s.key: _extract(view_regex, s, "view") if view_regex else "" for s in sources}

    with atomic_path(out_dir, suffix=".importing", kind="dir", replaces=lambda p: (p / MANIFEST).is_file()) as tmp:
        writer = SiteWriter(tmp)
        for source in sources:
            labels = read_label_volume(label_files[source.key]) if source.key in label_files else None
            if source.kind == "dicom":
                frames_array, dicom_patient = _dicom_frames(source.path)
                frames: Iterator[np.ndarray] = iter(frames_array)
            else:
                frames, dicom_patient = _frames_opencv(source.path), ""
            patient = patients[source.key] or dicom_patient or _patient_from_video(source.videoname)
            count, shape = 0, None
            for index, frame in enumerate(frames):
                if shape is None:
                    shape = frame.shape
                    if labels is not None and labels.shape[1:] != shape:
                        _check_label_geometry(label_files[source.key], labels, source.path, labels.shape[0], shape)
                elif frame.shape != shape:
                    raise DataError(f"{source.path}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, earlier frames {shape[1]}x{shape[0]}")
                mask = None
                if labels is not None and index < labels.shape[0]:
                    slice_ = labels[index]
                    if empty_slices == "background" or slice_.any():
                        mask = slice_
                record = FrameRecord(
                    filename=f"{source.videoname}_{index:05d}.png",
                    videoname=source.videoname,
                    framenum=index,
                    patient=patient,
                    view=views[source.key],
                )
                writer.add(record, frame, mask)
                count += 1
            if count == 0:
                raise DataError(f"{source.path}: unreadable video (no frame could be decoded)")
            if labels is not None:
                _check_label_geometry(label_files[source.key], labels, source.path, count, shape)
            if progress is not None:
                progress(source, count)
        writer.close()  # writes the manifest and validates the folder
    return load_site(out_dir)


def read_video_frames(path: str | Path) -> np.ndarray:
    """All frames of one video or DICOM file as uint8 (frames, rows, columns), as the importer sees them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom(path):
        return _dicom_frames(path)[0]
    frames = list(_frames_opencv(path))
    if not frames:
        raise DataError(f"{path}: unreadable video (no frame could be decoded)")
    if any(f.shape != frames[0].shape for f in frames):
        raise DataError(f"{path}: frames of different sizes")
    return np.stack(frames)


def video_to_volume(video: str | Path, out: str | Path) -> Path:
    """Write a video as a 3-D image (x = column, y = row, z = frame; unit spacing) for ITK-SNAP.

    Segment it in ITK-SNAP and save the segmentation next to the other label files: its
    geometry is then exactly what :func:`import_videos` expects.
    """
    import SimpleITK as sitk

    out = Path(out)
    if _strip_suffix(out.name, LABEL_SUFFIXES) is None:
        raise ConfigError(f"{out}: use one of {', '.join(LABEL_SUFFIXES)}")
    volume = sitk.GetImageFromArray(read_video_frames(video))  # array [z, y, x] -> image (x, y, z)
    with atomic_path(out) as tmp:
        sitk.WriteImage(volume, str(tmp), True)
    return out


def import_summary(site: Site) -> ImportSummary:
    return ImportSummary(
        videos=len({r.videoname for r in site.records}),
        frames=len(site.records),
        labeled=sum(r.labeled for r in site.records),
        patients=len(site.patients()),
    )
