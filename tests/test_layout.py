"""Site layout: write -> load -> validate round trip, the released code's CSV, and every planted defect."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pocus_edge.data.layout import (
    COLUMNS,
    FrameRecord,
    SiteWriter,
    load_site,
    read_gray_png,
    read_manifest,
    write_gray_png,
)
from pocus_edge.errors import DataError


def frame(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def write_site(root, *, n_videos: int = 2, n_frames: int = 3, labeled=lambda v, f: True):
    writer = SiteWriter(root)
    images, masks = {}, {}
    for v in range(n_videos):
        for f in range(n_frames):
            name = f"P{v}_dorsal_{f:03d}.png"
            img = frame(12, 16, seed=10 * v + f)
            mask = (img // 64).astype(np.uint8) if labeled(v, f) else None  # labels 0..3
            writer.add(FrameRecord(name, f"P{v}_dorsal", f, patient=f"P{v}", view="dorsal"), img, mask)
            images[name], masks[name] = img, mask
    return writer.close(), images, masks


def test_round_trip(tmp_path):
    site, images, masks = write_site(tmp_path / "site", labeled=lambda v, f: f != 1)
    again = load_site(tmp_path / "site")
    assert again.records == site.records
    assert [r.filename for r in again.records] == list(images)
    header = (tmp_path / "site" / "manifest.csv").read_text().splitlines()[0]
    assert header.split(",") == list(COLUMNS)
    for rec in again.records:
        np.testing.assert_array_equal(again.read_image(rec), images[rec.filename])
        assert rec.labeled == (masks[rec.filename] is not None)
        if rec.labeled:
            np.testing.assert_array_equal(again.read_mask(rec), masks[rec.filename])
        else:
            assert not again.mask_path(rec).exists()
            with pytest.raises(DataError, match="unlabeled"):
                again.read_mask(rec)
    assert again.patients() == ["P0", "P1"]
    assert len(again.select(labeled=True)) == 4
    assert len(again.manifest_sha256()) == 64


def test_released_code_csv_loads(tmp_path):
    # The released research code's layout: Images/, Masks/ and a filename,videoname,framenum CSV.
    root = tmp_path / "released"
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rows = ["filename,videoname,framenum"]
    for video, patient in (("S01_volar", "S01"), ("S02_radial", "S02"), ("S03", "S03")):
        for f in (4, 7, 9):
            name = f"{video}_{f}.png"
            write_gray_png(root / "Images" / name, frame(8, 10, f))
            if f != 7:  # frame 7 has no mask: it loads as unlabeled
                write_gray_png(root / "Masks" / name, np.zeros((8, 10), np.uint8))
            rows.append(f"{name},{video},{f}")
    (root / "manifest.csv").write_text("\r\n".join(rows) + "\r\n")
    site = load_site(root)
    assert len(site.records) == 9
    assert site.patients() == ["S01", "S02", "S03"]  # from the video name's prefix
    assert [r.labeled for r in site.records[:3]] == [True, False, True]
    assert all(r.split == "" and r.ub_split == "" for r in site.records)


def test_missing_column_refused(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("filename,framenum\na.png,0\n")
    with pytest.raises(DataError, match="videoname"):
        read_manifest(path)


def _planted(tmp_path, plant):
    root = tmp_path / "site"
    write_site(root, labeled=lambda v, f: True)
    plant(root)
    with pytest.raises(DataError) as info:
        load_site(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message
    return message


def _edit_manifest(root, edit):
    path = root / "manifest.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _set(line: str, column: str, value: str) -> str:
    """The manifest line with one column replaced (our manifests have no quoted fields)."""
    fields = line.split(",")
    fields[COLUMNS.index(column)] = value
    return ",".join(fields)


DEFECTS = {
    "missing image": (lambda r: (r / "Images" / "P0_dorsal_001.png").unlink(), "missing image Images/P0_dorsal_001.png"),
    "missing mask": (lambda r: (r / "Masks" / "P1_dorsal_002.png").unlink(), "has no Masks/P1_dorsal_002.png"),
    "mask size": (
        lambda r: write_gray_png(r / "Masks" / "P0_dorsal_002.png", np.zeros((12, 15), np.uint8)),
        "Masks/P0_dorsal_002.png: mask is 15x12 but image is 16x12",
    ),
    "duplicate": (lambda r: _edit_manifest(r, lambda ls: ls + [_set(ls[1], "framenum", "5")]), "duplicate filename 'P0_dorsal_000.png'"),
    "frame order": (lambda r: _edit_manifest(r, lambda ls: [ls[0], ls[2], ls[1]] + ls[3:]), "frame numbers not increasing within video 'P0_dorsal'"),
    "unknown split": (lambda r: _edit_manifest(r, lambda ls: ls[:1] + [_set(ls[1], "split", "holdout")] + ls[2:]), "unknown split 'holdout'"),
    "unknown ub_split": (lambda r: _edit_manifest(r, lambda ls: ls[:1] + [_set(ls[1], "ub_split", "test")] + ls[2:]), "unknown ub_split 'test'"),
    "ub_split outside SSL train": (
        lambda r: _edit_manifest(r, lambda ls: ls[:1] + [_set(_set(ls[1], "split", "test"), "ub_split", "train")] + ls[2:]),
        "ub_split 'train' on a frame that is not a labeled split=train frame",
    ),
    "bad framenum": (lambda r: _edit_manifest(r, lambda ls: ls[:1] + [_set(ls[1], "framenum", "zero")] + ls[2:]), "framenum 'zero' is not an integer"),
    "no images folder": (lambda r: shutil.rmtree(r / "Images"), "Images/ folder missing"),
    "empty manifest": (lambda r: _edit_manifest(r, lambda ls: ls[:1]), "manifest lists no frames"),
    "escaping filename": (lambda r: _edit_manifest(r, lambda ls: ls + ["../x.png,P9,0,P9,,0,,"]), "must be a relative path"),
    "patient in two splits": (
        lambda r: _edit_manifest(r, lambda ls: ls[:1] + [_set(l, "split", "train" if i == 0 else "test") for i, l in enumerate(ls[1:4])] + ls[4:]),
        "patient 'P0' is in more than one split (test, train)",
    ),
    "extra field": (lambda r: _edit_manifest(r, lambda ls: ls[:1] + [ls[1] + ",extra"] + ls[2:]), "9 fields but the header has 8"),
    "corrupt mask": (lambda r: (r / "Masks" / "P1_dorsal_000.png").write_bytes(b"not a png"), "Masks/P1_dorsal_000.png: unreadable mask"),
    "truncated image": (
        lambda r: _truncate(r / "Images" / "P1_dorsal_001.png"),
        "Images/P1_dorsal_001.png: unreadable image (truncated PNG (no end chunk))",
    ),
    "truncated mask": (lambda r: _truncate(r / "Masks" / "P0_dorsal_000.png"), "Masks/P0_dorsal_000.png: unreadable mask (truncated PNG"),
    "16-bit mask": (
        lambda r: _write_png16(r / "Masks" / "P1_dorsal_002.png", np.ones((12, 16), np.uint16)),
        "Masks/P1_dorsal_002.png: 16-bit mask; expected an 8-bit label map",
    ),
    "16-bit image": (
        lambda r: _write_png16(r / "Images" / "P0_dorsal_001.png", np.full((12, 16), 4000, np.uint16)),
        "Images/P0_dorsal_001.png: 16-bit image; expected an 8-bit grayscale frame",
    ),
}


def _truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _write_png16(path, img):
    import cv2

    assert cv2.imwrite(str(path), img)


@pytest.mark.parametrize("name", list(DEFECTS))
def test_each_planted_defect_named(tmp_path, name):
    plant, expected = DEFECTS[name]
    assert expected in _planted(tmp_path, plant)


def test_all_problems_in_one_error(tmp_path):
    def plant(root):
        for key in ("missing image", "missing mask", "mask size", "duplicate"):
            DEFECTS[key][0](root)

    message = _planted(tmp_path, plant)
    assert "4 problem(s)" in message
    for key in ("missing image", "missing mask", "mask size", "duplicate"):
        assert DEFECTS[key][1] in message


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(DataError, match="site folder not found"):
        load_site(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest not found"):
        load_site(tmp_path / "empty")


def test_site_writer_refusals(tmp_path):
    writer = SiteWriter(tmp_path / "s")
    img = np.zeros((4, 5), np.uint8)
    writer.add(FrameRecord("a.png", "v", 0), img)
    with pytest.raises(DataError, match="duplicate"):
        writer.add(FrameRecord("a.png", "v", 1), img)
    with pytest.raises(DataError, match="mask shape"):
        writer.add(FrameRecord("b.png", "v", 1), img, np.zeros((5, 4), np.uint8))
    with pytest.raises(DataError, match="0-255"):
        writer.add(FrameRecord("c.png", "v", 2), img, np.full((4, 5), 300, np.int32))
    writer.close()
    with pytest.raises(DataError, match="already holds a site"):
        SiteWriter(tmp_path / "s")


def test_gray_png_reader(tmp_path):
    import cv2

    img = frame(6, 7, 3)
    color = np.dstack([img, img, img])
    cv2.imwrite(str(tmp_path / "c.png"), color)
    np.testing.assert_array_equal(read_gray_png(tmp_path / "c.png"), img)
    cv2.imwrite(str(tmp_path / "w.png"), img.astype(np.uint16) * 256)
    with pytest.raises(DataError, match="8-bit"):
        read_gray_png(tmp_path / "w.png")
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match="not a readable image"):
        read_gray_png(tmp_path / "t.png")


def test_truncation_and_bit_depth_are_found_from_headers_without_decoding(tmp_path, monkeypatch):
    import cv2

    from pocus_edge.data import layout

    root = tmp_path / "site"
    write_site(root)
    _truncate(root / "Images" / "P0_dorsal_002.png")
    _write_png16(root / "Masks" / "P1_dorsal_001.png", np.ones((12, 16), np.uint16))
    # A whole site is validated from PNG headers and tails: nothing is decoded.
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("load_site decoded an image"))
    with pytest.raises(DataError) as info:
        load_site(root)
    assert "2 problem(s)" in str(info.value)
    assert layout.image_header(root / "Images" / "P1_dorsal_000.png") == (12, 16, 8)
    assert layout.image_header(root / "Masks" / "P1_dorsal_001.png") == (12, 16, 16)


def test_image_header_agrees_with_a_full_decode(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(1, 1), (7, 300), (257, 3)]):
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for ext in (".png", ".jpg", ".bmp"):
            path = tmp_path / f"{k}{ext}"
            assert cv2.imwrite(str(path), img)
            from pocus_edge.data.layout import image_header

            assert image_header(path)[:2] == cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2] == (h, w)


def test_commands_that_never_open_masks_check_only_images(tmp_path, monkeypatch):
    from pocus_edge.data import layout

    root = tmp_path / "site"
    write_site(root)
    _write_png16(root / "Masks" / "P0_dorsal_000.png", np.ones((12, 16), np.uint16))
    opened = []
    real = layout.image_header
    monkeypatch.setattr(layout, "image_header", lambda p: opened.append(str(p)) or real(p))
    site = load_site(root, check_masks=False)  # export calibration and parity: images only
    assert opened and not any("/Masks/" in p for p in opened)
    _truncate(root / "Images" / "P1_dorsal_000.png")
    with pytest.raises(DataError, match="P1_dorsal_000.png: unreadable image"):
        load_site(root, check_masks=False)
    with pytest.raises(DataError, match="problem"):
        layout.check_frame_files(site, site.records)


def _corrupt_pixels(path):
    """Flip a byte inside the compressed pixels: header and end chunk stay intact."""
    data = bytearray(path.read_bytes())
    i = data.find(b"IDAT")
    data[i + 10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_pixels_are_one_line_naming_the_file_without_decoder_noise(tmp_path, capfd):
    img = frame(30, 40, 1)
    write_gray_png(tmp_path / "a.png", img)
    _corrupt_pixels(tmp_path / "a.png")
    capfd.readouterr()
    with pytest.raises(DataError, match=r"a\.png: corrupt PNG \(IDAT chunk checksum mismatch\)"):
        read_gray_png(tmp_path / "a.png")
    assert capfd.readouterr().err == ""  # libpng would have printed its own line


def _cli_lines(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    return lines


def test_finetune_refuses_a_mask_of_another_size_before_training(tiny_sites, tmp_path, capsys):
    from pocus_edge.cli import main
    from pocus_edge.data.layout import load_site as load

    source = tmp_path / "source"
    shutil.copytree(tiny_sites[0], source)
    rec = next(r for r in load(source).records if r.labeled)
    write_gray_png(source / "Masks" / rec.filename, np.zeros((5, 7), np.uint8))
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(source), "--out", str(run), "--preset", "tiny", "--max-steps", "1"]) == 2
    lines = _cli_lines(capsys)
    assert len(lines) == 1 and f"Masks/{rec.filename}: mask is 7x5" in lines[0]
    assert not run.exists()  # nothing was started


def test_a_frame_that_fails_to_decode_mid_training_is_one_line(tiny_sites, tmp_path, capsys):
    from pocus_edge.cli import main
    from pocus_edge.data.layout import load_site as load

    source = tmp_path / "source"
    shutil.copytree(tiny_sites[0], source)
    for rec in load(source).select("train"):
        _corrupt_pixels(source / "Images" / rec.filename)
    assert main(["finetune", "--data", str(source), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "1"]) == 2
    lines = _cli_lines(capsys)
    assert len(lines) == 1 and "corrupt PNG" in lines[0] and "/Images/" in lines[0]
