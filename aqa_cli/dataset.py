"""Labelled feature sets for training and evaluating heads: label files, feature folders, their pairing.

Four label formats are read, every row kept (the reference loaders skip the
first line of header-less files and lose a video):

* CSV with a header (``video,TES,PCS,deductions``): the first column is the id;
* the GDLT text format: no header, whitespace separated ``id TES PCS deductions``;
* the ACTION-NET Rhythmic Gymnastics format: tab separated, with a header
  (``file_name  Difficulty_Score  Execution_Score  Total_Score``);
* JSON (``.json``): a list of objects with a ``video`` (or ``id``) key, or an
  object mapping each id to its fields.

Besides the numbers, every column's text is kept, so text labels (action
classes, a caption) reach the heads that learn from them (``FeatureSet.aux``).
:func:`convert_mtl_aqa` writes the MTL-AQA release's annotation pickles as a CSV.

An id pairs with ``<features>/<id>.npy``. A labelled id without a feature file
is an error; feature files without a label are reported and left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aqa_cli.errors import AqaError, FeatureError
from aqa_cli.extract import load_features, read_sidecar

# Column names of the header-less GDLT text format (Fis-V).
GDLT_COLUMNS = ("id", "TES", "PCS", "deductions")


@dataclass
class Labels:
    path: Path
    format: str  # "csv", "gdlt", "rg" or "json"
    columns: list[str]  # label columns available
    ids: list[str]
    table: dict[str, list[float]]  # column → values, aligned with ids (NaN where a cell is not a number)
    text: dict[str, list[str]] = field(default_factory=dict)  # column → the cells as written ("" when empty)

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
    if path.suffix.lower() == ".json":
        return _read_json_labels(path, text)
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
    texts: dict[str, list[str]] = {c: [] for c in columns}
    for lineno, row in enumerate(body, start=2 if has_header else 1):
        if len(row) != len(columns) + 1:
            raise AqaError(f"line {lineno} has {len(row)} fields, expected {len(columns) + 1}", path=path,
                           fix="give every row the same columns")
        ids.append(_video_id(row[0]))
        for col, cell in zip(columns, row[1:]):
            table[col].append(_number(cell))
            texts[col].append(cell)
    _refuse_duplicates(ids, path)
    return Labels(path=path, format=fmt, columns=columns, ids=ids, table=table, text=texts)


def _video_id(cell: str) -> str:
    return Path(cell).stem if cell.endswith((".npy", ".mp4", ".avi", ".mkv")) else cell


def _number(cell: Any) -> float:
    if isinstance(cell, bool):
        return float(cell)
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def _refuse_duplicates(ids: list[str], path: Path) -> None:
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise AqaError(f"{len(dupes)} id(s) appear more than once (e.g. {dupes[0]!r})", path=path,
                       fix="keep one row per video")


def _read_json_labels(path: Path, text: str) -> Labels:
    """A list of objects holding ``video`` (or ``id``), or an object mapping ids to objects."""
    fix = 'give a list of objects such as {"video": "01_01", "final_score": 71.4, "caption": "..."}'
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AqaError(f"is not valid JSON ({exc.msg} at line {exc.lineno})", path=path, fix=fix) from None
    if isinstance(data, dict):
        records = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        records = []
        for n, item in enumerate(data, start=1):
            key = next((k for k in ("video", "id") if isinstance(item, dict) and k in item), None)
            if key is None:
                raise AqaError(f"record {n} has no \"video\" or \"id\" field", path=path, fix=fix)
            records.append((str(item[key]), {k: v for k, v in item.items() if k != key}))
    else:
        raise AqaError("holds neither a list nor an object of records", path=path, fix=fix)
    if not records:
        raise AqaError("the label file has no records", path=path, fix="add one record per video")
    columns: list[str] = []
    for n, (_, fields) in enumerate(records, start=1):
        if not isinstance(fields, dict):
            raise AqaError(f"record {n} is not an object", path=path, fix=fix)
        columns.extend(k for k in fields if k not in columns)
    ids = [_video_id(vid) for vid, _ in records]
    table: dict[str, list[float]] = {c: [] for c in columns}
    texts: dict[str, list[str]] = {c: [] for c in columns}
    for _, fields in records:
        for col in columns:
            value = fields.get(col)
            # A caption given as a list of words (as in the MTL-AQA release) is joined into one text.
            cell = "" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)
            table[col].append(_number(value) if not isinstance(value, list) else float("nan"))
            texts[col].append(cell)
    _refuse_duplicates(ids, path)
    return Labels(path=path, format="json", columns=columns, ids=ids, table=table, text=texts)


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
    # Every label column's text, aligned with ids: what heads learning more than the score read (Head.encode_labels).
    aux: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def feature_dim(self) -> int:
        return int(self.features[0].shape[1])

    def subset(self, index: np.ndarray | list[int]) -> FeatureSet:
        index = list(index)
        return FeatureSet(ids=[self.ids[i] for i in index], features=[self.features[i] for i in index],
                          targets=self.targets[index], feature_dir=self.feature_dir, labels_path=self.labels_path,
                          target_name=self.target_name, contract=self.contract, notes=self.notes,
                          aux={col: [values[i] for i in index] for col, values in self.aux.items()})

    def fingerprint(self, columns: Sequence[str] = ()) -> str:
        """sha256 over ids, targets and feature bytes: which data a checkpoint was trained on.

        ``columns`` adds those label columns' text (the ones a head learns from besides the target); without
        them the digest is what it always was, so earlier checkpoints' records stay comparable."""
        h = hashlib.sha256()
        for vid, feats, y in zip(self.ids, self.features, self.targets):
            h.update(vid.encode())
            h.update(np.float64(y).tobytes())
            h.update(np.ascontiguousarray(feats, dtype=np.float16).tobytes())
        lower = {c.lower(): c for c in self.aux}
        for name in columns:
            col = lower.get(name.lower())
            if col is not None:
                h.update(f"\0{col}\0".encode())
                for cell in self.aux[col]:
                    h.update(cell.encode() + b"\0")
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
    aux = {c: list(lab.text.get(c, [])) for c in lab.columns if c in lab.text}
    return FeatureSet(ids=list(lab.ids), features=feats, targets=values, feature_dir=feature_dir,
                      labels_path=lab.path, target_name=col, contract=contract, notes=notes, aux=aux)


# ------------------------------------------------------------------------------------------------ MTL-AQA

# The per-dive keys of the release's final_annotations_dict.pkl that become columns, in this order.
MTL_AQA_FIELDS = ("final_score", "difficulty", "position", "armstand", "rotation_type", "ss_no", "tw_no")


def mtl_aqa_id(key: Any) -> str:
    """The id of a (video, clip) key: ``01_07``, the name the feature files must carry."""
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
        return f"{key[0]:02d}_{key[1]:02d}"
    return str(key)


def _load_annotation_pickle(path: str | Path, what: str) -> Any:
    from aqa_cli.safe_pickle import UnsafePickleError, load_annotation_pickle

    path = Path(path)
    if not path.is_file():
        raise AqaError(f"{what} not found", path=path, fix="give the file from the MTL-AQA release's Ready_2_Use folder")
    try:
        return load_annotation_pickle(path)
    except UnsafePickleError as exc:
        raise AqaError(f"refused: {exc}", path=path,
                       fix="annotation pickles may hold only containers, strings and numbers; re-export it as "
                           "plain data") from None
    except Exception as exc:  # a truncated or non-pickle file: any of several unpickling errors
        raise AqaError(f"is not a readable pickle ({type(exc).__name__})", path=path,
                       fix="download it again from the MTL-AQA release") from None


def _code(value: Any) -> int | None:
    """An integer class code (numpy integers and integral floats included), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        code = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return code if code == value else None


def _caption_text(caption: Any) -> str:
    """A release caption (a string or a list of words) as one line; ``<eos>``-style markers dropped."""
    if isinstance(caption, (list, tuple)):
        caption = " ".join(str(w) for w in caption if not (str(w).startswith("<") and str(w).endswith(">")))
    return " ".join(str(caption).split())


def convert_mtl_aqa(annotations: str | Path, out: str | Path, *, captions: str | Path | None = None,
                    split: str | Path | None = None, subtasks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The release's ``final_annotations_dict.pkl`` (and ``final_captions_dict.pkl``) → one label CSV.

    Rows are ``video,final_score,difficulty,<sub-task columns>,caption``, one per (video, clip) key, id
    ``VV_CC``; ``split`` (``train_split_0.pkl``) keeps the listed keys only. Sub-task codes are integers in
    the release; with ``subtasks`` (the head's schema) code k is written as the k-th class name, else as the
    number. Captions (a string or a list of words) have their whitespace collapsed; ``<eos>``-style markers
    are dropped. Pickles are read with the restricted unpickler. Returns a summary.
    """
    from aqa_cli.fileio import write_text

    ann = _load_annotation_pickle(annotations, "annotation pickle")
    if not isinstance(ann, dict) or not ann or not all(isinstance(v, dict) for v in ann.values()):
        raise AqaError("does not map (video, clip) keys to annotation dicts", path=annotations,
                       fix="give final_annotations_dict.pkl from the MTL-AQA release")
    caps: dict = {}
    if captions is not None:
        caps = _load_annotation_pickle(captions, "captions pickle")
        if not isinstance(caps, dict):
            raise AqaError("does not map (video, clip) keys to captions", path=captions,
                           fix="give final_captions_dict.pkl from the MTL-AQA release")
    keys = list(ann)
    if split is not None:
        listed = _load_annotation_pickle(split, "split pickle")
        if not isinstance(listed, (list, tuple)):
            raise AqaError("is not a list of (video, clip) keys", path=split, fix="give train_split_0.pkl or "
                                                                                    "test_split_0.pkl")
        missing = [k for k in listed if k not in ann]
        if missing:
            raise AqaError(f"{len(missing)} listed key(s) have no annotation (e.g. {missing[0]!r})", path=split,
                           fix="use the split file from the same release folder as the annotations")
        keys = list(listed)
    schema = {s["column"]: s for s in (subtasks or [])}
    columns = ["video", *MTL_AQA_FIELDS, "caption"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    bad: list[str] = []
    n_captions = 0
    for key in sorted(keys, key=lambda k: (str(type(k)), k)):
        fields = ann[key]
        row: list[Any] = [mtl_aqa_id(key)]
        for name in MTL_AQA_FIELDS:
            value = fields.get(name)
            if name in schema and value is not None:
                classes = schema[name]["classes"]
                code = _code(value)
                if code is None or not 0 <= code < len(classes):
                    bad.append(f"{name}={value!r} for {key!r}")
                    value = ""
                else:
                    value = classes[code]
            row.append("" if value is None else value)
        caption = _caption_text(caps.get(key, ""))
        n_captions += bool(caption)
        row.append(caption)
        writer.writerow(row)
    if bad:
        raise AqaError(f"{len(bad)} sub-task code(s) fall outside the schema (e.g. {bad[0]})", path=annotations,
                       fix="check the schema's class lists against the release (code k is the k-th class)")
    write_text(out, buf.getvalue())
    summary: dict[str, Any] = {"rows": len(keys), "captions": n_captions, "out": str(out)}
    if caps and subtasks:
        summary["caption_check"] = caption_check({k: ann[k] for k in keys}, caps, subtasks)
    return summary


def caption_check(annotations: dict, captions: dict, subtasks: list[dict[str, Any]],
                  min_captions: int = 5) -> list[dict[str, Any]]:
    """Does code k of each sub-task really mean the schema's class k? The release stores integer codes and
    never names them; its captions (the commentators' words) do. For every sub-task with ``cues`` and every code,
    the share of that code's captions that use each class's cue words, and a verdict: ``agrees`` when the
    schema's class is the one named most, ``disagrees`` when another class is named most (in at least a third
    of the captions that name any), else ``no evidence`` (fewer than ``min_captions`` captions name a class).
    A class without cue words ("no armstand") agrees when no other class is named in a fifth of its captions,
    and disagrees when one is named in a third.
    """
    rows = []
    for sub in subtasks:
        cues = sub.get("cues") or []
        if not any(cues):
            continue
        patterns = [re.compile("|".join(rf"\b{re.escape(w)}\b" for w in c)) if c else None for c in cues]
        by_code: dict[int, list[str]] = {}
        for key, fields in annotations.items():
            code = _code(fields.get(sub["column"]))
            caption = _caption_text(captions.get(key, "")).lower()
            if code is not None and 0 <= code < len(sub["classes"]) and caption.strip():
                by_code.setdefault(code, []).append(caption)
        for code in sorted(by_code):
            caps = by_code[code]
            hits = [sum(bool(p.search(c)) for c in caps) if p is not None else 0 for p in patterns]
            named = sum(any(p is not None and p.search(c) for p in patterns) for c in caps)
            best = max(range(len(hits)), key=lambda k: hits[k])
            if patterns[code] is None:  # a class without words of its own ("no armstand"): others must be rare
                top = hits[best] / len(caps)
                verdict = ("no evidence" if len(caps) < min_captions else "agrees" if top < 0.2
                           else "disagrees" if top >= 1 / 3 else "no evidence")
            elif named < min_captions or hits[best] == 0:
                verdict = "no evidence"
            elif hits[code] == hits[best]:
                verdict = "agrees"
            else:
                verdict = "disagrees" if hits[best] >= named / 3 else "no evidence"
            rows.append({"subtask": sub["name"], "code": code, "schema_class": sub["classes"][code],
                         "captions": len(caps), "named": named, "most_named": sub["classes"][best],
                         "shares": {sub["classes"][k]: round(h / len(caps), 3) for k, h in enumerate(hits)
                                    if patterns[k] is not None},
                         "verdict": verdict})
    return rows
