"""Labelled feature sets for training and evaluating heads: label files, feature folders, their pairing.

Three label formats are read, every row kept (the reference loaders skip the
first line of header-less files and lose a video):

* CSV with a header (``video,TES,PCS,deductions``): the first column is the id;
* the GDLT text format: no header, whitespace separated ``id TES PCS deductions``;
* the ACTION-NET Rhythmic Gymnastics format: tab separated, with a header
  (``file_name  Difficulty_Score  Execution_Score  Total_Score``).

An id pairs with ``<features>/<id>.npy``. A labelled id without a feature file
is an error; feature files without a label are reported and left out.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aqa_cli.errors import AqaError, FeatureError
from aqa_cli.extract import load_features, read_sidecar

# Column names of the header-less GDLT text format (Fis-V).
GDLT_COLUMNS = ("id", "TES", "PCS", "deductions")


@dataclass
class Labels:
    path: Path
    format: str  # "csv", "gdlt" or "rg"
    columns: list[str]  # score columns available
    ids: list[str]
    table: dict[str, list[float]]  # column → values, aligned with ids

    def target(self, name: str) -> np.ndarray:
        col = self.column(name)
        return np.asarray(self.table[col], dtype=np.float64)

    def column(self, name: str) -> str:
        for col in self.columns:
            if col.lower() == name.lower():
                return col
        raise AqaError(f"no column {name!r} (columns: {', '.join(self.columns)})", path=self.path,
                       fix=f"choose --target from: {', '.join(self.columns)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_labels(path: str | Path) -> Labels:
    """Read a label file in any of the three formats (detected from its first line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AqaError("label file not found", path=path, fix="check the --labels path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AqaError(f"cannot read the label file ({type(exc).__name__})", path=path,
                       fix="give a CSV or whitespace-separated text file") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise AqaError("the label file is empty (0 rows)", path=path, fix="give a file with one row per video")
    first = lines[0]
    if "," in first:
        fmt, rows = "csv", list(csv.reader(lines))
    elif "\t" in first:
        fmt, rows = "rg", [ln.split("\t") for ln in lines]
    else:
        fmt, rows = "gdlt", [ln.split() for ln in lines]
    rows = [[cell.strip() for cell in row] for row in rows]
    has_header = not all(_is_number(cell) for cell in rows[0][1:]) if len(rows[0]) > 1 else False
    if has_header:
        header, body = rows[0], rows[1:]
        columns = header[1:]
    else:
        if fmt == "csv":
            raise AqaError("a CSV label file needs a header row naming its columns", path=path,
                           fix="add a header such as `video,TES,PCS`")
        header, body = None, rows
        width = len(rows[0]) - 1
        columns = list(GDLT_COLUMNS[1:1 + width]) + [f"col{i}" for i in range(len(GDLT_COLUMNS) - 1, width)]
    if not body:
        raise AqaError("the label file has a header but no rows", path=path, fix="add one row per video")
    ids: list[str] = []
    table: dict[str, list[float]] = {c: [] for c in columns}
    for lineno, row in enumerate(body, start=2 if has_header else 1):
        if len(row) != len(columns) + 1:
            raise AqaError(f"line {lineno} has {len(row)} fields, expected {len(columns) + 1}", path=path,
                           fix="give every row the same columns")
        ids.append(Path(row[0]).stem if row[0].endswith((".npy", ".mp4", ".avi", ".mkv")) else row[0])
        for col, cell in zip(columns, row[1:]):
            try:
                value = float(cell)
            except ValueError:
                value = float("nan")
            table[col].append(value)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise AqaError(f"{len(dupes)} id(s) appear more than once (e.g. {dupes[0]!r})", path=path,
                       fix="keep one row per video")
    return Labels(path=path, format=fmt, columns=columns, ids=ids, table=table)


@dataclass
class FeatureSet:
    """Videos with their clip features [T_i, D] and target scores, in label-file order."""

    ids: list[str]
    features: list[np.ndarray]
    targets: np.ndarray
    feature_dir: Path
    labels_path: Path
    target_name: str
    contract: dict = field(default_factory=dict)  # backbone/recipe of the features, from the sidecars
    notes: list[str] = field(default_factory=list)  # e.g. unlabelled feature files left out

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def feature_dim(self) -> int:
        return int(self.features[0].shape[1])

    def subset(self, index: np.ndarray | list[int]) -> FeatureSet:
        index = list(index)
        return FeatureSet(ids=[self.ids[i] for i in index], features=[self.features[i] for i in index],
                          targets=self.targets[index], feature_dir=self.feature_dir, labels_path=self.labels_path,
                          target_name=self.target_name, contract=self.contract, notes=self.notes)

    def fingerprint(self) -> str:
        """sha256 over ids, targets and feature bytes: which data a checkpoint was trained on."""
        h = hashlib.sha256()
        for vid, feats, y in zip(self.ids, self.features, self.targets):
            h.update(vid.encode())
            h.update(np.float64(y).tobytes())
            h.update(np.ascontiguousarray(feats, dtype=np.float16).tobytes())
        return h.hexdigest()


def load_feature_set(feature_dir: str | Path, labels: str | Path | Labels, target: str, *,
                     expected_dim: int | None = None) -> FeatureSet:
    """Pair ``<feature_dir>/<id>.npy`` with the labels' ``target`` column, checking everything."""
    feature_dir = Path(feature_dir)
    lab = labels if isinstance(labels, Labels) else read_labels(labels)
    if not feature_dir.is_dir():
        raise AqaError("feature folder not found", path=feature_dir,
                       fix="give the folder written by `aqa extract-features`")
    col = lab.column(target)
    values = lab.target(col)
    bad = [i for i, v in zip(lab.ids, values) if not np.isfinite(v)]
    if bad:
        raise AqaError(f"{len(bad)} row(s) have no numeric {col} (e.g. id {bad[0]!r})", path=lab.path,
                       fix="fill in or remove those rows")
    available = {p.stem: p for p in feature_dir.glob("*.npy")}
    missing = [i for i in lab.ids if i not in available]
    if missing:
        raise FeatureError(f"{len(missing)} of {len(lab.ids)} labelled video(s) have no feature file "
                           f"(e.g. {missing[0]}.npy)", path=feature_dir,
                           fix=f"extract them, or remove their rows from {lab.path.name}")
    unlabelled = sorted(set(available) - set(lab.ids))
    notes = []
    if unlabelled:
        notes.append(f"{feature_dir}: {len(unlabelled)} feature file(s) have no row in {lab.path.name} "
                     f"(e.g. {unlabelled[0]}.npy) and are left out")
    feats: list[np.ndarray] = []
    contract: dict = {}
    for vid in lab.ids:
        npy = available[vid]
        arr = load_features(npy)
        if arr.shape[0] == 0:
            raise FeatureError("has zero clips", path=npy, fix="re-extract it from a longer video")
        if expected_dim is not None and arr.shape[1] != expected_dim:
            raise FeatureError(f"features are {arr.shape[1]}-d but the head expects {expected_dim}-d", path=npy,
                               fix="extract features with the backbone the head was trained on")
        if feats and arr.shape[1] != feats[0].shape[1]:
            raise FeatureError(f"features are {arr.shape[1]}-d while {lab.ids[0]}.npy is {feats[0].shape[1]}-d",
                               path=npy, fix="extract every video with the same backbone")
        sidecar = npy.with_suffix(".json")
        if not contract and sidecar.is_file():
            try:
                side = read_sidecar(sidecar)
                contract = {"backbone": side.get("backbone", {}), "recipe": side.get("recipe", {})}
            except AqaError:
                pass
        feats.append(arr)
    return FeatureSet(ids=list(lab.ids), features=feats, targets=values, feature_dir=feature_dir,
                      labels_path=lab.path, target_name=col, contract=contract, notes=notes)
