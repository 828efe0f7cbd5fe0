"""Render the bundled sample video(s) into samples/.

The sample is synthetic (a textured background with a moving disc, drawn with
numpy and encoded with PyAV), so it carries no third-party rights and can be
reproduced byte for byte on any machine:

    python samples/make_samples.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aqa_cli.synthetic import moving_scene, write_video

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    # 6.4 s at 25 fps = 160 frames = five 32-frame clips, at a phone-like 16:9 size.
    path = write_video(args.out / "moving_disc.mp4", moving_scene(160, 360, 640, seed=7), 25, crf=28)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
