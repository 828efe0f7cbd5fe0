"""How faithful the shipped heads' per-clip explanations are, on real Fis-V videos.

    python bench/shipped_faithfulness.py                     # every shipped fisv-* head, 40 videos
    python bench/shipped_faithfulness.py --videos 400 --write  # all videos; record the figures in the files

For each head: the mean and median over videos of ρ(D^, D), the predicted against the
measured effect of removing each clip (aqa_cli.effects), and the deletion-curve area.
The videos are every k-th of the 400 Fis-V training videos. Heads trained on all 400 see
them in training: faithfulness is a property of the explanation, not of accuracy, but the
figures of the heads trained with ``--folds`` come from held-out videos instead (their
logs, ``cv.explanation``). ``--write`` stores the figures in each checkpoint's metadata
(``faithfulness``; the tensors are untouched), where ``aqa weights list`` shows them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import OUT_DIR, cpu_model

REPO = Path(__file__).resolve().parents[1]
FISV = REPO.parent / "shared" / "data" / "fisv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=40, help="how many of the 400 videos (evenly spaced)")
    p.add_argument("--pattern", default="fisv-*", help="shipped heads (glob in weights/)")
    p.add_argument("--write", action="store_true", help="record the figures in each checkpoint's metadata")
    args = p.parse_args(argv)
    if not FISV.is_dir():
        print(f"{FISV} is absent: the Fis-V features live there", file=sys.stderr)
        return 2

    import numpy as np

    sys.path.insert(0, str(REPO))
    from aqa_cli.effects import explanation_report
    from aqa_cli.heads.checkpoint import load_head
    from aqa_cli.weights import read_safetensors, save_safetensors

    files = sorted((FISV / "features").glob("*.npy"), key=lambda f: int(f.stem) if f.stem.isdigit() else f.stem)
    step = max(1, len(files) // args.videos)
    chosen = files[::step][: args.videos]
    videos = [np.load(f).astype(np.float32) for f in chosen]
    print(f"CPU: {cpu_model()}; {len(videos)} Fis-V videos ({', '.join(f.stem for f in chosen[:5])}, …)")
    rows = []
    for path in sorted((REPO / "weights").glob(f"{args.pattern}.safetensors")):
        h = load_head(path)
        span = float(h.scale["score_max"]) - float(h.scale["score_min"])
        rep = explanation_report(h.model, videos, span)
        row = {"head": path.stem, **rep, "videos": [f.stem for f in chosen]}
        rows.append(row)
        print(f"{path.stem:26s} faithfulness mean {rep['faithfulness']:+.3f}  median {rep['faithfulness_median']:+.3f}"
              f"  deletion area {rep['deletion_area']:+.4f}", flush=True)
        if args.write:
            tensors, meta = read_safetensors(path)
            meta["faithfulness"] = json.dumps({k: rep[k] for k in ("faithfulness", "faithfulness_median",
                                                                    "deletion_area", "n")}
                                              | {"videos": "fisv-train every %dth" % step,
                                                 "command": "python bench/shipped_faithfulness.py --videos "
                                                            f"{args.videos} --write"})
            save_safetensors(tensors, path, meta)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "shipped_faithfulness.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
