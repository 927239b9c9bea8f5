"""The shared preprocessing against a hand computation (exact rational arithmetic) and OpenCV."""

from __future__ import annotations

import math
from fractions import Fraction

import cv2
import numpy as np
import pytest

from pocus_edge.data.transforms import (
    pad_to_square,
    preprocess_batch,
    preprocess_frame,
    preprocess_gray,
    preprocess_mask,
    resize_bilinear,
    resize_square,
)
from pocus_edge.errors import DataError

# A 2-row x 3-column frame; padded at the bottom to 3x3.
FRAME_2x3 = np.array([[10, 200, 37], [255, 0, 99]], dtype=np.uint8)


def hand_bilinear(img: list[list[int]], m: int) -> list[list[Fraction]]:
    """Textbook bilinear resize of a square n x n grid to m x m, half-pixel centres, edge
    clamping, in exact fractions: each output pixel from its four neighbours."""
    n = len(img)

    def source(i: int) -> tuple[int, int, Fraction]:
        s = (Fraction(i) + Fraction(1, 2)) * Fraction(n, m) - Fraction(1, 2)
        s = min(max(s, Fraction(0)), Fraction(n - 1))
        lo = math.floor(s)
        return lo, min(lo + 1, n - 1), s - lo

    out = []
    for y in range(m):
        y0, y1, wy = source(y)
        row = []
        for x in range(m):
            x0, x1, wx = source(x)
            row.append(
                (1 - wy) * (1 - wx) * img[y0][x0]
                + (1 - wy) * wx * img[y0][x1]
                + wy * (1 - wx) * img[y1][x0]
                + wy * wx * img[y1][x1]
            )
        out.append(row)
    return out


def padded_2x3() -> list[list[int]]:
    rows = [list(map(int, r)) for r in FRAME_2x3]
    return rows + [[0, 0, 0]]  # zero padding at the bottom makes it square


@pytest.mark.parametrize("size", [2, 4, 6, 3])
def test_preprocess_frame_matches_hand_computation(size):
    # Sizes 2, 4, 6 give dyadic weights (exact in float64), so equality must be exact,
    # including the half-up rounding of ties; size 3 is the identity after padding.
    expected = hand_bilinear(padded_2x3(), size)
    expected_u8 = np.array([[math.floor(v + Fraction(1, 2)) for v in row] for row in expected], dtype=np.uint8)
    got_gray = preprocess_gray(FRAME_2x3, size)
    np.testing.assert_array_equal(got_gray, expected_u8)
    got = preprocess_frame(FRAME_2x3, size)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    for channel in got:
        np.testing.assert_array_equal(channel, expected_u8.astype(np.float32) / np.float32(255))
    assert got.min() >= 0 and got.max() <= 1


def test_ties_round_half_up():
    # 2 -> 1 along each axis averages four pixels: (1 + 2 + 2 + 2) / 4 = 1.75 -> 2, (0+0+1+2)/4 = 0.75 -> 1,
    # and a 1 x 2 pair (2, 3) resized to 1 x 1 is 2.5 -> 3 (half up; half-to-even would give 2).
    assert resize_bilinear(np.array([[1, 2], [2, 2]], np.uint8), 1, 1)[0, 0] == 2
    assert resize_bilinear(np.array([[0, 0], [1, 2]], np.uint8), 1, 1)[0, 0] == 1
    assert resize_bilinear(np.array([[2, 3]], np.uint8), 1, 1)[0, 0] == 3
    assert resize_bilinear(np.array([[0, 1]], np.uint8), 1, 1)[0, 0] == 1


@pytest.mark.parametrize("shape, size", [((48, 64), 32), ((64, 48), 100), ((37, 53), 64), ((5, 5), 224)])
def test_float_resize_agrees_with_opencv(shape, size):
    # OpenCV's float INTER_LINEAR samples the same grid; only the 8-bit path (fixed point) differs.
    img = np.random.default_rng(1).random(shape).astype(np.float32) * 255
    square = pad_to_square(img)
    ours = resize_square(square, size)
    theirs = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # The 8-bit result is that float result rounded half up.
    u8 = np.floor(square).astype(np.uint8)
    ref = cv2.resize(u8.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    assert np.abs(resize_square(u8, size).astype(np.float32) - np.floor(ref + 0.5)).max() <= 1
    assert np.mean(resize_square(u8, size) != np.floor(ref + 0.5)) < 0.01


def test_pad_to_square_bottom_right():
    tall = np.arange(1, 13, dtype=np.uint8).reshape(4, 3)
    wide = tall.T.copy()
    for frame in (tall, wide):
        padded = pad_to_square(frame)
        h, w = frame.shape
        assert padded.shape == (max(h, w), max(h, w))
        np.testing.assert_array_equal(padded[:h, :w], frame)
        assert padded[h:, :].sum() == 0 and padded[:, w:].sum() == 0
    same = np.ones((3, 3), np.uint8)
    np.testing.assert_array_equal(pad_to_square(same), same)


def test_preprocess_mask_binarizes_then_resizes():
    labels = np.array([[0, 1, 2], [3, 0, 0]], dtype=np.uint8)
    binary = [[int(v >= 1) for v in row] for row in labels] + [[0, 0, 0]]
    for size in (2, 4, 6):
        expected = np.array([[float(v > Fraction(1, 2)) for v in row] for row in hand_bilinear(binary, size)])
        got = preprocess_mask(labels, size)
        assert got.shape == (1, size, size) and got.dtype == np.float32
        np.testing.assert_array_equal(got[0], expected)
    # Label identity must not matter, only >= 1.
    np.testing.assert_array_equal(preprocess_mask(labels, 6), preprocess_mask((labels > 0).astype(np.uint8) * 3, 6))


def test_batch_of_mixed_sizes():
    frames = [np.full((4, 6), 255, np.uint8), np.zeros((7, 3), np.uint8), FRAME_2x3]
    batch = preprocess_batch(frames, 8)
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == np.float32
    for frame, item in zip(frames, batch):
        np.testing.assert_array_equal(item, preprocess_frame(frame, 8))
    # All-white 4x6 frame: the top 4/6 of the output rows are white, the padded bottom rows black.
    assert batch[0, 0, 0].min() == 1.0 and batch[0, 0, -1].max() == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((4, 4), np.float32),
        np.zeros((0, 4), np.uint8),
        np.zeros((4,), np.uint8),
        np.full((2, 2), np.nan, np.float32),
    ],
)
def test_bad_frames_refused(bad):
    with pytest.raises(DataError):
        preprocess_frame(bad, 8)
