"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder is on sys.path)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"
# The synthetic test video every benchmark uses: a moving scene, 640x360 at 25 fps.
FPS = 25.0
WIDTH, HEIGHT = 640, 360


def cpu_model() -> str:
    """The CPU's marketing name, so that figures from different machines are not compared by mistake."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def video_for(seconds: float) -> Path:
    """The cached synthetic video of this length under bench/out/videos, generated on first use."""
    from aqa_cli.synthetic import moving_scene, write_video

    path = OUT_DIR / "videos" / f"scene_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS:g}fps.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {path.name} ...", file=sys.stderr, flush=True)
        tmp = path.with_name(path.stem + ".partial.mp4")
        # Written under a temporary name so an interrupted run never leaves a short video in the cache.
        write_video(tmp, moving_scene(int(round(seconds * FPS)), HEIGHT, WIDTH), FPS)
        os.replace(tmp, path)
    return path
