"""The on-disk layout of one site (one probe / domain). Sites are never mixed by any command.

::

    <site>/Images/<file>.png     uint8 grayscale frame
    <site>/Masks/<file>.png      uint8 label map (0 background, 1 metaphysis, 2 epiphysis,
                                 3 carpal bones); absent for unlabeled frames
    <site>/manifest.csv          filename, videoname, framenum, patient, view, labeled, split,
                                 ub_split

The released research code's CSV (``filename, videoname, framenum`` only) loads too: the
patient is then taken from the video name, ``labeled`` from the presence of a mask file,
and ``split`` is empty until ``pocus-edge split`` assigns one.
"""

from __future__ import annotations

import csv
import io
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..io import sha256_file

MANIFEST = "manifest.csv"
IMAGES = "Images"
MASKS = "Masks"
COLUMNS = ("filename", "videoname", "framenum", "patient", "view", "labeled", "split", "ub_split")
REQUIRED_COLUMNS = ("filename", "videoname", "framenum")  # the released code's CSV
LABEL_NAMES = {0: "background", 1: "metaphysis", 2: "epiphysis", 3: "carpal"}
# ``split``: the method's protocol. Source: train/val/test by patient. Target: "train" = every
# frame of the SSL patients (read as unlabeled images only), "test" = the labeled frames of the
# test patients, "" = unused (unlabeled frames of test patients).
SPLITS = ("train", "val", "test", "")
# ``ub_split`` (target only, optional): the upper-bound baseline's own train/val split of the
# labeled frames of the SSL patients. Never read by pretraining.
UB_SPLITS = ("train", "val", "")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: the last bytes of every PNG


@dataclass
class FrameRecord:
    """One row of a site manifest."""

    filename: str
    videoname: str
    framenum: int
    patient: str = ""
    view: str = ""
    labeled: bool = False
    split: str = ""
    ub_split: str = ""


@dataclass
class Site:
    """A validated site folder. ``records`` keep manifest order."""

    root: Path
    records: list[FrameRecord] = field(default_factory=list)
    name: str = ""

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    @property
    def masks_dir(self) -> Path:
        return self.root / MASKS

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def image_path(self, rec: FrameRecord) -> Path:
        return self.images_dir / rec.filename

    def mask_path(self, rec: FrameRecord) -> Path:
        return self.masks_dir / rec.filename

    def select(
        self,
        split: str | Sequence[str] | None = None,
        *,
        labeled: bool | None = None,
        ub_split: str | None = None,
    ) -> list[FrameRecord]:
        """Records of the given split(s) (None = all), optionally only (un)labeled ones, or
        (``ub_split``) the upper-bound baseline's train/val frames."""
        wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
        return [
            r
            for r in self.records
            if (wanted is None or r.split in wanted)
            and (labeled is None or r.labeled == labeled)
            and (ub_split is None or r.ub_split == ub_split)
        ]

    def patients(self, records: Iterable[FrameRecord] | None = None) -> list[str]:
        return sorted({r.patient for r in (self.records if records is None else records)})

    def manifest_sha256(self) -> str:
        """Hash of the manifest file's bytes: model cards record it as data provenance."""
        return sha256_file(self.manifest_path)

    def read_image(self, rec: FrameRecord) -> np.ndarray:
        return read_gray_png(self.image_path(rec))

    def read_mask(self, rec: FrameRecord) -> np.ndarray:
        if not rec.labeled:
            raise DataError(f"{self.mask_path(rec)}: frame {rec.filename!r} is unlabeled")
        return read_gray_png(self.mask_path(rec))


def read_gray_png(path: str | Path) -> np.ndarray:
    """Read an 8-bit image as a 2-D uint8 array; a missing or undecodable file raises DataError."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    buf = np.fromfile(p, dtype=np.uint8)
    problem = _png_problem(buf) if buf[:8].tobytes() == PNG_SIGNATURE else None
    if problem:
        # Found before the decoder, which would print its own message on stderr.
        raise DataError(f"{p}: corrupt PNG ({problem})")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise DataError(f"{p}: not a readable image (truncated or corrupt?)")
    if img.ndim == 3 and img.shape[2] == 2:
        img = img[..., 0]  # gray + alpha
    elif img.ndim == 3:
        # Colour exports of grayscale frames: take luminance, as the released code does (convert('L')).
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        raise DataError(f"{p}: expected 8-bit pixels, got {img.dtype}")
    return img


def write_gray_png(path: str | Path, img: np.ndarray, *, fsync: bool = True) -> None:
    """Write a 2-D uint8 array as PNG atomically (temp name + rename; see write_bytes_atomic)."""
    import cv2

    from ..io import write_bytes_atomic

    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"write_gray_png expects a 2-D uint8 array, got {img.dtype} {img.shape}")
    ok, enc = cv2.imencode(".png", img)
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, enc.tobytes(), fsync=fsync)


def _parse_bool(text: str) -> bool:
    return str(text).strip().lower() in {"1", "true", "yes", "y", "t"}


def read_manifest(path: str | Path) -> list[FrameRecord]:
    """Parse a manifest (ours or the released code's 3-column CSV). Raises DataError on bad rows."""
    return _read_manifest(Path(path))[0]


def _read_manifest(p: Path) -> tuple[list[FrameRecord], list[str]]:
    """Records and the header's column names."""
    if not p.is_file():
        raise DataError(f"{p}: manifest not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{p}: not a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{p}: missing column(s) {', '.join(missing)} (have: {', '.join(header) or 'none'})")
    records: list[FrameRecord] = []
    problems: list[str] = []
    for lineno, row in enumerate(reader, start=2):
        if None in row:  # csv puts surplus fields under the key None
            problems.append(f"line {lineno}: {len(header) + len(row[None])} fields but the header has {len(header)}")
            continue
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        try:
            framenum = int(float(row["framenum"]))
        except ValueError:
            problems.append(f"line {lineno}: framenum {row['framenum']!r} is not an integer")
            continue
        records.append(
            FrameRecord(
                filename=row["filename"],
                videoname=row["videoname"],
                framenum=framenum,
                patient=row.get("patient", ""),
                view=row.get("view", ""),
                labeled=_parse_bool(row["labeled"]) if "labeled" in row else False,
                split=row.get("split", ""),
                ub_split=row.get("ub_split", ""),
            )
        )
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(f"{p}: {len(problems)} bad row(s): " + "; ".join(problems[:10]) + more)
    return records, header


def write_manifest(path: str | Path, records: Sequence[FrameRecord]) -> None:
    """Write the full manifest atomically."""
    from ..io import write_text_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = asdict(r)
        row["labeled"] = int(bool(r.labeled))
        writer.writerow(row)
    write_text_atomic(path, buf.getvalue())


def _patient_from_video(videoname: str) -> str:
    # Released-code video names look like "<patient>_<view>..."; without a patient column the
    # best available grouping key is the prefix before the first underscore (or the whole name).
    return videoname.split("_", 1)[0] if "_" in videoname else videoname


def load_site(root: str | Path, *, check_images: bool = True, check_masks: bool = True) -> Site:
    """Load and validate a site folder, reporting *every* problem in one DataError.

    Checks: the folder, Images/ and manifest exist; no duplicate filenames; frame numbers
    strictly increase within a video (in manifest order); splits are known names; and (with
    ``check_images``) every image exists, is not truncated and has 8-bit pixels, and (with
    ``check_masks``; off for commands that never open a mask) every labeled frame has an 8-bit
    mask of the same size as its image. The file checks read PNG headers and last bytes, never
    decode (:func:`image_header`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: site folder not found")
    records, header = _read_manifest(root / MANIFEST)
    site = Site(root=root, records=records, name=root.name)
    has_labeled_col = "labeled" in header
    has_patient_col = "patient" in header
    problems: list[str] = []
    if not records:
        problems.append("manifest lists no frames")
    if not site.images_dir.is_dir():
        problems.append(f"{IMAGES}/ folder missing")
    seen: dict[str, int] = {}
    last_frame: dict[str, int] = {}
    for i, r in enumerate(records):
        if not r.filename:
            problems.append(f"row {i + 2}: empty filename")
            continue
        if _escapes_folder(r.filename):
            problems.append(f"row {i + 2}: filename {r.filename!r} must be a relative path inside {IMAGES}/")
            continue
        if r.filename in seen:
            problems.append(f"duplicate filename {r.filename!r} (rows {seen[r.filename] + 2} and {i + 2})")
        seen[r.filename] = i
        if not has_patient_col or not r.patient:
            r.patient = _patient_from_video(r.videoname)
        if not has_labeled_col:
            r.labeled = (site.masks_dir / r.filename).is_file()
        if r.split not in SPLITS:
            problems.append(f"{r.filename}: unknown split {r.split!r} (expected one of {', '.join(s for s in SPLITS if s)})")
        if r.ub_split not in UB_SPLITS:
            problems.append(f"{r.filename}: unknown ub_split {r.ub_split!r} (expected train, val or empty)")
        elif r.ub_split and not (r.labeled and r.split == "train"):
            # The upper-bound baseline trains on labeled frames of SSL-train patients only;
            # anything else would leak test frames into a baseline.
            problems.append(f"{r.filename}: ub_split {r.ub_split!r} on a frame that is not a labeled split=train frame")
        prev = last_frame.get(r.videoname)
        if prev is not None and r.framenum <= prev:
            problems.append(f"{r.filename}: frame numbers not increasing within video {r.videoname!r} ({prev} then {r.framenum})")
        last_frame[r.videoname] = r.framenum
    problems.extend(_split_leaks(records))
    if check_images and site.images_dir.is_dir():
        problems.extend(_file_problems(site, records, masks=check_masks))
    if problems:
        shown = "; ".join(problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"{root}: {len(problems)} problem(s): {shown}{more}")
    return site


def _escapes_folder(filename: str) -> bool:
    parts = Path(filename).parts
    return Path(filename).is_absolute() or ".." in parts or "\\" in filename


def _split_leaks(records: Sequence[FrameRecord]) -> list[str]:
    """A patient in two splits (or two upper-bound splits) leaks test data into training."""
    problems = []
    for column in ("split", "ub_split"):
        splits_of: dict[str, set[str]] = {}
        for r in records:
            value = getattr(r, column)
            if value:
                splits_of.setdefault(r.patient, set()).add(value)
        for patient, values in sorted(splits_of.items()):
            if len(values) > 1:
                problems.append(f"patient {patient!r} is in more than one {column} ({', '.join(sorted(values))})")
    return problems


def _png_problem(data: bytes | np.ndarray) -> str | None:
    """What is wrong with a PNG's chunk structure (a truncated file, a chunk whose checksum does
    not match its bytes), or None. A walk over the chunks: one CRC pass, no decompression."""
    data = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return "truncated"
        if zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return f"{bytes(data[pos + 4 : pos + 8]).decode('latin-1')} chunk checksum mismatch"
        if data[pos + 4 : pos + 8] == b"IEND":
            return None
        pos = end + 4
    return "truncated"


def image_header(path: str | Path) -> tuple[int, int, int]:
    """(height, width, bits per sample) of an image without decoding it.

    PNG: the IHDR chunk, and the IEND chunk must be within the file's last bytes (a truncated
    PNG has none). Other formats are decoded with OpenCV. DataError if the file cannot be read,
    is truncated or is not an image.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(26)
            if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 26:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - 1024))
                if PNG_END not in fh.read():
                    raise DataError(f"{p}: truncated PNG (no end chunk)")
                return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big"), head[24]
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if head[:8] == PNG_SIGNATURE:
        raise DataError(f"{p}: truncated PNG (no header chunk)")
    import cv2

    img = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if p.stat().st_size else None
    if img is None:
        raise DataError(f"{p}: not a readable image (truncated or corrupt?)")
    return img.shape[0], img.shape[1], img.dtype.itemsize * 8


def _file_problems(site: Site, records: Sequence[FrameRecord], *, masks: bool) -> list[str]:
    """Problems of the frames' files: missing, unreadable or truncated, not 8-bit, and (``masks``)
    a labeled frame's mask missing, unreadable, not 8-bit or of another size than its image."""
    problems: list[str] = []
    for r in records:
        img_path = site.image_path(r)
        if not img_path.is_file():
            problems.append(f"missing image {IMAGES}/{r.filename}")
            continue
        img = _header_or_problem(img_path, f"{IMAGES}/{r.filename}", "image", problems)
        if not (masks and r.labeled):
            continue
        mask_path = site.mask_path(r)
        if not mask_path.is_file():
            problems.append(f"labeled frame {r.filename!r} has no {MASKS}/{r.filename}")
            continue
        mask = _header_or_problem(mask_path, f"{MASKS}/{r.filename}", "mask", problems)
        if img is not None and mask is not None and img[:2] != mask[:2]:
            problems.append(f"{MASKS}/{r.filename}: mask is {mask[1]}x{mask[0]} but image is {img[1]}x{img[0]}")
    return problems


def _header_or_problem(path: Path, shown: str, what: str, problems: list[str]) -> tuple[int, int, int] | None:
    try:
        h, w, bits = image_header(path)
    except DataError as exc:
        detail = str(exc).split(": ", 1)[-1]
        problems.append(f"{shown}: unreadable {what} ({detail})")
        return None
    if bits > 8:
        kind = "label map (values 0-3)" if what == "mask" else "grayscale frame"
        problems.append(f"{shown}: {bits}-bit {what}; expected an 8-bit {kind}")
        return None
    return h, w, bits


def check_frame_files(site: Site, records: Sequence[FrameRecord], *, masks: bool = False) -> None:
    """Every listed frame's image (and with ``masks`` its mask) exists, is not truncated, is
    8-bit and matches in size: header reads, no decoding. One DataError listing the problems."""
    problems = _file_problems(site, records, masks=masks)
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(f"{site.root}: {len(problems)} problem(s) with the frame files: {shown}{more}")


class SiteWriter:
    """Write a site folder frame by frame (simulator, importer); the manifest is written last,
    atomically, so an interrupted write never leaves a manifest that points at missing files."""

    def __init__(self, root: str | Path, *, overwrite: bool = False, fsync_frames: bool = True):
        # fsync_frames=False (the simulator): frames are not flushed one by one, which costs
        # more than rendering them on a busy disk; the data can be regenerated from its seed.
        self.fsync_frames = fsync_frames
        self.root = Path(root)
        if (self.root / MANIFEST).exists() and not overwrite:
            raise DataError(f"{self.root}: already holds a site (manifest.csv exists); pass overwrite")
        (self.root / IMAGES).mkdir(parents=True, exist_ok=True)
        self.records: list[FrameRecord] = []
        self._filenames: set[str] = set()

    def add(self, record: FrameRecord, image: np.ndarray, mask: np.ndarray | None = None) -> None:
        if mask is not None and mask.shape != image.shape:
            raise DataError(f"{record.filename}: mask shape {mask.shape} != image shape {image.shape}")
        if record.filename in self._filenames:
            raise DataError(f"{self.root}: duplicate filename {record.filename!r}")
        if mask is not None and mask.dtype != np.uint8:
            if mask.size and (mask.min() < 0 or mask.max() > 255 or not np.array_equal(mask, np.round(mask))):
                raise DataError(f"{record.filename}: mask values must be integers 0-255")
        self._filenames.add(record.filename)
        write_gray_png(self.root / IMAGES / record.filename, image, fsync=self.fsync_frames)
        if mask is not None:
            (self.root / MASKS).mkdir(exist_ok=True)
            write_gray_png(self.root / MASKS / record.filename, mask.astype(np.uint8), fsync=self.fsync_frames)
        record.labeled = mask is not None
        self.records.append(record)

    def write_manifest(self) -> None:
        """Write the manifest (last, atomically) without loading the site back."""
        write_manifest(self.root / MANIFEST, self.records)

    def close(self) -> Site:
        self.write_manifest()
        return load_site(self.root)
