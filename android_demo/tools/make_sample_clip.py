"""Regenerate the app's bundled sample clip (app/src/main/assets/sample_clip/*.png): synthetic
ultrasound-like frames (speckle, a bone surface with its shadow) from the same generator as the
golden vectors, the bone curve moving a little each frame. Replace them with real probe frames
(8-bit grayscale PNGs, any size) to demo on real data.

    .venv/bin/python android_demo/tools/make_sample_clip.py [--frames 12] [--width 200] [--height 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pocus_edge.data.layout import write_gray_png
from pocus_edge.export.golden import synthetic_frame

CLIP_DIR = Path(__file__).resolve().parents[1] / "app" / "src" / "main" / "assets" / "sample_clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--height", type=int, default=150)
    parser.add_argument("--out", type=Path, default=CLIP_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("frame_*.png"):
        old.unlink()
    for k in range(args.frames):
        img = synthetic_frame(args.height, args.width, seed=100 + k, phase=0.15 * k)
        write_gray_png(args.out / f"frame_{k:03d}.png", img)
    print(f"wrote {args.frames} frames ({args.width}x{args.height}) to {args.out}")


if __name__ == "__main__":
    main()
