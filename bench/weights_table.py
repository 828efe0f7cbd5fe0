"""Print the table of shipped heads in weights/README.md from their training logs (weights/*.log.json).

    python bench/weights_table.py                     # the heads in weights/
    python bench/weights_table.py RUN_DIR             # any folder of `aqa train` outputs
    python bench/weights_table.py weights 'fisv-*'    # only the files whose name matches

Every figure comes from a log written by `aqa train`; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "weights"


def checkpoint_meta(log: dict) -> dict:
    from safetensors import safe_open

    ck = FOLDER / Path(log["checkpoint"]).name
    with safe_open(str(ck), framework="pt") as fh:
        return dict(fh.metadata() or {})


def overrides(log: dict) -> dict:
    """Settings of the run that differ from what its preset and head give today: they need a --set."""
    sys.path.insert(0, str(REPO))
    from aqa_cli.heads import head_class
    from aqa_cli.presets import load_preset
    from aqa_cli.training import TrainSettings

    if not log.get("preset"):
        return {}
    preset = load_preset(log["preset"])
    model = {**vars(head_class(log["head"]).config_class()), **preset.model_settings(log["head"])}
    train = {**vars(TrainSettings()), **preset.train_settings(log["head"]), "crop": preset.train_clips}
    defaults = vars(head_class(log["head"]).config_class())
    diff = {k: v for k, v in log["config"].items() if model.get(k) != v}
    # A setting newer than the run: the run had the head's default.
    diff.update({k: defaults[k] for k in model if k not in log["config"] and model[k] != defaults[k]})
    diff.update({k: v for k, v in log["train_settings"].items() if k != "epochs" and train.get(k) != v})
    return diff


def command(log: dict) -> str:
    t = log["train_settings"]
    meta = checkpoint_meta(log)
    # The data paths as the run was given them (relative to the repository for the Fis-V runs).
    args = ["aqa", "train", "--features", log["features"], "--labels", log["labels"], "--target", log["target"], "--head", log["head"]]
    if log.get("preset"):
        args += ["--preset", log["preset"]]
    args += ["--epochs", str(t["epochs"]), "--folds", str(log.get("cv", {}).get("folds", 0))]
    if log.get("cv", {}).get("repeats", 1) > 1:
        args += ["--repeats", str(log["cv"]["repeats"])]
    args += ["--seed", str(log["seed"])]
    args += [f"--set {k}={json.dumps(v)}" for k, v in overrides(log).items()]
    if meta.get("final") == "folds":
        args += ["--final", "folds"]
    if meta.get("storage") == "float16":
        args += ["--half"]
    args += ["--device", "cpu", "--out", f"weights/{Path(log['checkpoint']).name}"]
    env = f"OMP_NUM_THREADS={log['torch_threads']} " if log.get("torch_threads") else ""
    return env + " ".join(a if a.startswith("--set ") else shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    global FOLDER
    argv = sys.argv[1:] if argv is None else argv
    FOLDER = Path(argv[0]) if argv else REPO / "weights"
    pattern = argv[1] if len(argv) > 1 else "*"
    logs = sorted(FOLDER.glob(f"{pattern}.log.json"))
    print("| file | head | target | CV folds | CV ρ per fold | CV ρ mean ± std (± s.e.) | out-of-fold ρ / R-ℓ2×100 / MAE "
          "| faithfulness (held out) | members | MB | training time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in logs:
        log = json.loads(path.read_text())
        cv = log.get("cv", {})
        ck = FOLDER / Path(log["checkpoint"]).name
        size = ck.stat().st_size / 1e6 if ck.is_file() else float("nan")
        members = int(checkpoint_meta(log).get("members", 1))
        repeats = cv.get("repeats", 1)
        per_fold = cv.get("fold_spearman", [])
        # Repeated K-fold: the folds of each repeat, one group per repeat.
        folds = "; ".join(" ".join(f"{r:.3f}" for r in per_fold[i:i + cv.get("folds", 5)])
                          for i in range(0, len(per_fold), cv.get("folds", 5)))
        what = f"{repeats} × {cv.get('folds', '-')}" if repeats > 1 else str(cv.get("folds", "-"))
        se = f" (± {cv['se_spearman']:.3f})" if "se_spearman" in cv else ""
        faith = cv.get("explanation", {}).get("faithfulness")
        oof = cv.get("oof", {})
        print(f"| `{ck.name}` | {log['head']} | {log['target']} | {what} | {folds} | "
              f"{cv.get('mean_spearman', float('nan')):.3f} ± {cv.get('std_spearman', float('nan')):.3f}{se} | "
              f"{oof.get('spearman', float('nan')):.3f} / {oof.get('rl2_x100', float('nan')):.2f} / "
              f"{oof.get('mae', float('nan')):.2f} | {f'{faith:.3f}' if faith is not None else 'not measured'} | "
              f"{members} | {size:.1f} | "
              f"{log['total_seconds'] / 60:.1f} min ({log.get('torch_threads', '?')} thread) |")
    print()
    for path in logs:
        print(f"- `{Path(json.loads(path.read_text())['checkpoint']).name}`: `{command(json.loads(path.read_text()))}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
