"""Calibrate the shipped heads without retraining: their intervals from the out-of-fold predictions their training
logs keep, their domain check from their training features. Only the files' metadata and ``domain.*`` tensors
change; every trained tensor is copied byte for byte (checked here).

    python bench/calibrate_shipped.py                       # every weights/*.safetensors with a log beside it
    python bench/calibrate_shipped.py --demo-features /tmp/routines/features --demo-labels /tmp/routines/labels.csv

The demo head's training features are not in the repository: `python samples/make_routines.py --train-set 120 --out
DIR --extract` regenerates them (the log's data sha256 is checked, so other features are refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from numpy import stack as np_stack  # noqa: E402

from aqa_cli.dataset import load_feature_set  # noqa: E402
from aqa_cli.fileio import write_json  # noqa: E402
from aqa_cli.heads import head_class  # noqa: E402
from aqa_cli.presets import load_preset  # noqa: E402
from aqa_cli.training import calibrate_head_file  # noqa: E402
from aqa_cli.weights import read_safetensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="head files (default: every weights/*.safetensors)")
    parser.add_argument("--demo-features", type=Path, help="the demo routines' I3D features")
    parser.add_argument("--demo-labels", type=Path, help="the demo routines' labels.csv")
    args = parser.parse_args()
    files = args.files or sorted((ROOT / "weights").glob("*.safetensors"))
    for path in files:
        log_path = path.with_suffix(".log.json")
        log = json.loads(log_path.read_text())
        features, labels = Path(log["features"]), Path(log["labels"])
        if log.get("preset") == "demo":
            if args.demo_labels is None:
                print(f"skip {path.name}: pass --demo-labels (and --demo-features for its domain check)", flush=True)
                continue
            if args.demo_features is None:
                # The interval needs the labels alone; the domain check needs the features too.
                from aqa_cli.calibration import Calibration, store_in_head
                from aqa_cli.dataset import read_labels

                lab = read_labels(args.demo_labels)
                targets = dict(zip(lab.ids, map(float, lab.target(log["target"]))))
                calibration = Calibration.from_log(log, targets, dataset=f"the {len(targets)} synthetic training "
                                                                          "routines")
                if calibration.n != log["n_videos"]:
                    raise SystemExit(f"{args.demo_labels}: labels for {calibration.n} of {log['n_videos']} videos")
                before, _ = read_safetensors(path)
                store_in_head(path, calibration, None)
                assert all(before[k].equal(v) for k, v in read_safetensors(path)[0].items())
                log.update(calibration_cv=calibration.cv_coverage(), domain_missing="the training features were "
                           "not regenerated (bench/calibrate_shipped.py --demo-features)")
                write_json(log_path, log)
                print(f"{path.name}: interval only, ±{calibration.half_width(0.9):.2f}", flush=True)
                continue
            if len(list(args.demo_features.glob("*.npy"))) < log["n_videos"]:
                # Part of the training set regenerated (the I3D features take ~15 min of CPU for all 120): the
                # domain model from those routines (the first of the training seeds, the same renderer), the
                # interval kept as stored.
                from aqa_cli.calibration import DomainModel, read_calibration, store_in_head, video_descriptor
                from aqa_cli.extract import load_features

                ids = sorted(p.stem for p in args.demo_features.glob("*.npy"))
                descriptors = [video_descriptor(load_features(args.demo_features / f"{i}.npy")) for i in ids]
                domain = DomainModel.fit_calibrated(np_stack(descriptors), seed=int(log["seed"]),
                                                    label=f"{len(ids)} of the synthetic training routines")
                before, meta = read_safetensors(path)
                store_in_head(path, read_calibration(meta), domain)
                assert all(before[k].equal(v) for k, v in read_safetensors(path)[0].items() if k in before)
                log.pop("domain_missing", None)
                log.update(domain=domain.info())
                write_json(log_path, log)
                print(f"{path.name}: domain model on {len(ids)} routines, alpha {domain.alpha:.4f}", flush=True)
                continue
            features, labels = args.demo_features, args.demo_labels
        if not features.is_absolute():
            features, labels = ROOT / features, ROOT / labels
        data = load_feature_set(features, labels, log["target"])
        config = head_class(log["head"]).config_class.from_dict(log["config"])
        if data.fingerprint(head_class(log["head"]).label_columns(config)) != log["data_sha256"]:
            raise SystemExit(f"{features}: not the data {path.name} was trained on (sha256 differs)")
        before, _ = read_safetensors(path)
        preset = load_preset(log["preset"]) if log.get("preset") else None
        entries = calibrate_head_file(path, data, log, preset.dataset if preset else "", seed=int(log["seed"]))
        after, meta = read_safetensors(path)
        changed = [k for k in before if not before[k].equal(after[k]) or before[k].dtype != after[k].dtype]
        if changed or any(not k.startswith("domain.") for k in set(after) - set(before)):
            raise SystemExit(f"{path.name}: trained tensors changed ({changed[:3]})")
        # The log records what the file now holds, beside the figures it was calibrated from.
        log.update(entries)
        write_json(log_path, log)
        cv = entries.get("calibration_cv", {})
        print(f"{path.name}: 90% half-width ±{json.loads(meta['calibration_cv'])['mean_width'] / 2:.2f}, "
              f"CV coverage {cv.get('coverage', float('nan')):.3f}; domain model on {entries['domain']['calibrated_on']} "
              "videos" if "domain" in entries else f"{path.name}: {entries}", flush=True)


if __name__ == "__main__":
    main()
