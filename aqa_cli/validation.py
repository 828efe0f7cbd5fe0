"""Checks at every boundary where outside data enters ``aqa``, in one place.

Whatever a user (or someone who can write into a shared folder) hands over is checked
here before it is used, and refused with one line that names the file and the fix:

- numeric command-line options (:func:`check_options`): a range each, so that no value
  can make ``aqa`` allocate the machine away or overflow, refused before any work;
- output paths (:func:`check_output_file`, :func:`check_output_dir`, :func:`check_distinct_outputs`):
  checked before the backbone runs, so that hours of work never end in an unwritable file;
- head checkpoints (:func:`check_head_metadata`, :func:`check_head_tensors`): every metadata
  field's type, the score scale, and tensors of the dtype the head's own parameters have;
- feature sidecars (:func:`check_sidecar`) and feature arrays (:func:`check_feature_array`): every
  field's type, a floating dtype that agrees with the sidecar, the shape, finite values of a
  plausible size; the feature cache reads its entries through the same checks;
- names that become paths (:func:`check_preset_name`): a preset is a name, never a path.

A check raises :class:`~aqa_cli.errors.AqaError` (its subclasses for files); nothing here
writes, reads a file, or imports a model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aqa_cli.errors import AqaError, FeatureError, WeightsError

# ------------------------------------------------------------------------------------------------ options

# (lowest, highest) of each numeric option, by its Python name. The highest values are far beyond any use, and low
# enough that no single one makes a run allocate more than a few GB: 512 frames is 16 times the longest recipe clip;
# a forward pass of 4 × 512 frames at 224² is 1.2 GB of uint8 and 4.8 GB as float32, hence MAX_FRAMES_PER_PASS.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "clip_len": (1, 512),
    "stride": (1, 100_000),
    "batch_size": (1, 1024),
    "decode_workers": (1, 64),
    "top": (1, 1_000_000),
    "workers": (1, 4096),
    "threads_per_worker": (1, 1024),
    "gpus_per_worker": (0, 64),
    "cpus_per_worker": (0, 1024),
    "epochs": (1, 100_000),
    "folds": (0, 1000),
    "repeats": (1, 1000),
    "seed": (0, 2**32 - 1),
    "score_max": (1e-9, 1e9),
}
# Frames in one forward pass (clips × clip length) when both are given: the default 4 × 32 is 128, a GPU's
# automatic batch at most 64 × 32 = 2048.
MAX_FRAMES_PER_PASS = 2048


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(**values: float | int | None) -> None:
    """Refuse a numeric option outside :data:`OPTION_RANGES` (None: not given), before any work starts."""
    for name, value in values.items():
        if value is None:
            continue
        lo, hi = OPTION_RANGES[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not lo <= value <= hi:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            shown = shown if len(shown) <= 24 else shown[:20] + "…"
            raise AqaError(f"{_flag(name)} {shown} is out of range", fix=f"give a value from {lo:g} to {hi:g}")
    clip_len, batch = values.get("clip_len"), values.get("batch_size")
    if clip_len is not None and batch is not None and clip_len * batch > MAX_FRAMES_PER_PASS:
        raise AqaError(f"--clip-len {clip_len} × --batch-size {batch} is {clip_len * batch} frames in one forward "
                       f"pass, more than {MAX_FRAMES_PER_PASS}", fix="lower --batch-size")


# ------------------------------------------------------------------------------------------------ output paths


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_folder(folder: Path, option: str) -> None:
    """``folder`` exists as a writable folder, or can be made (its nearest existing ancestor is one)."""
    where = _nearest_existing(folder)
    if not where.is_dir():
        raise AqaError(f"{option}: {where} is a file, not a folder", path=folder, fix=f"choose another {option}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise AqaError(f"{option}: the folder {where} is not writable", path=folder,
                       fix=f"choose another {option}, or make {where} writable")


def check_writable_cache(folder: str | Path, *, fix: str) -> Path:
    """``$AQA_HOME``'s weights folder can take the weights about to be fetched or imported (before any download)."""
    folder = Path(folder)
    where = _nearest_existing(folder)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise WeightsError(f"the weights cache {folder} cannot be written ({where} is "
                           f"{'not a folder' if not where.is_dir() else 'not writable'})",
                           fix=f"set AQA_HOME to a writable folder, then {fix}")
    return folder


def check_output_file(path: str | Path, option: str) -> Path:
    """A file ``aqa`` will write (``--csv``, ``--report`` …): not a folder, in a folder it can write."""
    path = Path(path)
    if path.is_dir():
        raise AqaError(f"{option} names a folder", path=path, fix=f"give {option} a file name, e.g. {path / 'out'}")
    if path.exists() and not path.is_file() and not path.is_symlink():
        raise AqaError(f"{option} names something that is not a regular file", path=path, fix="choose another name")
    _check_writable_folder(path.parent, option)
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """A folder ``aqa`` will write into (``--out``): a folder, or absent under a writable one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AqaError(f"{option} names an existing file, not a folder", path=path,
                       fix=f"give {option} a folder (it is made if absent)")
    _check_writable_folder(path, option)
    return path


def check_distinct_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse two options that name the same file: the second would silently replace the first."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise AqaError(f"{seen[key]} and {option} name the same file", path=path,
                           fix=f"give {option} another name")
        seen[key] = option


# ------------------------------------------------------------------------------------------------ names

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def check_preset_name(name: object, *, where: str = "--preset", path: str | Path | None = None) -> str:
    """A preset is named, never given by path (a name with a folder or ``..`` would read any TOML file).
    ``path``: the file that names it (a head checkpoint), refused as a :class:`WeightsError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        from aqa_cli.presets import list_presets

        error = AqaError if path is None else WeightsError
        raise error(f"{where} {str(name)[:60]!r}, not a preset name", path=path,
                    fix=f"choose one of: {', '.join(list_presets())}")
    return name


# ------------------------------------------------------------------------------------------------ head checkpoints

# An ensemble of more members than this is not something `aqa train` makes (its folds are at most a few dozen).
MAX_MEMBERS = 256


def _json_object(meta: Mapping[str, str], key: str, path: Path, *, required: bool = False) -> dict[str, Any]:
    import json

    if key not in meta:
        if required:
            raise WeightsError(f"its metadata has no {key!r}", path=path, fix="re-train it or download it again")
        return {}
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise WeightsError(f"its metadata {key!r} is not a JSON object", path=path, fix="re-train it or download it again")
    return value


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_scale(scale: Mapping[str, Any], path: Path, what: str) -> None:
    lo, hi = scale.get("score_min"), scale.get("score_max")
    for key, v in (("score_min", lo), ("score_max", hi)):
        if v is not None and not _number(v):
            raise WeightsError(f"its {what} {key} {v!r} is not a finite number", path=path,
                               fix="re-train it or download it again")
    if _number(lo) and _number(hi) and not lo < hi:
        raise WeightsError(f"its {what} runs from {lo:g} to {hi:g} (the minimum must be below the maximum)",
                           path=path, fix="re-train it or download it again")
    if "unit" in scale and not isinstance(scale["unit"], str):
        raise WeightsError(f"its {what} unit is not text", path=path, fix="re-train it or download it again")


def check_head_metadata(meta: Mapping[str, str], path: str | Path) -> None:
    """Refuse a head checkpoint whose metadata fields have the wrong types or make no sense.

    Metadata values are strings (safetensors); JSON ones must hold what :func:`save_head` writes.
    """
    from aqa_cli.heads import list_heads

    path = Path(path)
    head = meta.get("head")
    if head not in list_heads():
        raise WeightsError(f"records an unknown head {str(head)[:40]!r}", path=path,
                           fix=f"a head checkpoint holds one of: {', '.join(list_heads())}")
    members = meta.get("members", "1")
    if not (isinstance(members, str) and members.isdigit() and 1 <= int(members) <= MAX_MEMBERS):
        raise WeightsError(f"records {str(members)[:20]!r} members (1 to {MAX_MEMBERS} expected)", path=path,
                           fix="re-train it or download it again")
    config = _json_object(meta, "config", path, required=True)
    _check_scale(config, path, "config's scale")
    if "in_dim" in config and not (isinstance(config["in_dim"], int) and config["in_dim"] > 0):
        raise WeightsError(f"its config in_dim {config['in_dim']!r} is not a positive integer", path=path,
                           fix="re-train it or download it again")
    _check_scale(_json_object(meta, "scale", path), path, "scale")
    contract = _json_object(meta, "contract", path)
    for key in ("backbone", "weights"):
        if contract.get(key) is not None and not isinstance(contract[key], str):
            raise WeightsError(f"its contract's {key} is not a name", path=path, fix="re-train it or download it again")
    dim = contract.get("feature_dim")
    if dim is not None and not (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
        raise WeightsError(f"its contract's feature_dim {dim!r} is not a positive integer", path=path,
                           fix="re-train it or download it again")
    recipe = contract.get("recipe")
    if recipe is not None and not isinstance(recipe, str) and not (isinstance(recipe, dict)
                                                                 and isinstance(recipe.get("name"), str)):
        raise WeightsError("its contract's recipe is neither a name nor a recipe", path=path,
                           fix="re-train it or download it again")
    for key in ("cv", "faithfulness"):
        if key in meta:
            _json_object(meta, key, path)
    if meta.get("preset"):
        check_preset_name(meta["preset"], where="records the preset", path=path)


def check_head_tensors(state: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path) -> None:
    """Refuse tensors whose dtype is not of the kind the head's own parameter has (a float weight stored as
    bool or int computes nonsense), or that hold NaN or inf."""
    import torch

    for name, t in state.items():
        want = expected.get(name)
        if want is None:
            continue  # the strict state-dict load names missing and unexpected keys
        if want.is_floating_point() != t.is_floating_point() or (not t.is_floating_point() and t.dtype != want.dtype):
            raise WeightsError(f"tensor {name} is {str(t.dtype).replace('torch.', '')}, the head needs "
                               f"{str(want.dtype).replace('torch.', '')}", path=path,
                               fix="re-train it or download it again")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"tensor {name} holds NaN or inf", path=path, fix="re-train it or download it again")


def check_score_in_scale(score: float, scale: Mapping[str, Any], head: str, path: str | Path) -> None:
    """Refuse a score outside the scale it is reported on: no trained head on sound features leaves it, so such a
    number is not a score (a damaged head, or features unlike the ones it was trained on)."""
    lo, hi = scale.get("min"), scale.get("max")
    if not (_number(lo) and _number(hi)):
        return
    slack = 1e-6 * (hi - lo)  # float32 rounding at the ends of the scale
    if not lo - slack <= score <= hi + slack:
        raise FeatureError(f"{head} gave {score:.6g}, outside its scale {lo:g}–{hi:g}: not a valid score", path=path,
                           fix=f"check that these features come from the video and backbone {head} expects; "
                               "if they do, re-train or re-download the head")


# ------------------------------------------------------------------------------------------------ feature files

# Beyond this, a value is not a backbone's feature: the largest of the 400 Fis-V VST feature files is 4.7
# (max |x|, `python -m aqa_cli.validation /path/to/features`); 1e6 is 2·10⁵ times that, and far enough from
# float32's 3.4e38 that a head's products and sums stay finite.
MAX_ABS_FEATURE = 1e6
FLOAT_DTYPES = ("float16", "float32", "float64")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(path: Path, what: str) -> FeatureError:
    return FeatureError(f"damaged sidecar: {what}", path=path, fix="re-extract it (extract-features --overwrite)")


def check_sidecar(data: object, path: str | Path) -> dict[str, Any]:
    """Refuse a sidecar whose fields have the wrong types; returns it. ``format`` is checked by the reader."""
    path = Path(path)
    if not isinstance(data, dict):
        raise _fail(path, "not a JSON object")
    for key in ("video", "video_sha256", "features_file", "dtype", "aqa_version", "cache_key", "features_sha256"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _fail(path, f"{key} is not text")
    sha = data.get("video_sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _fail(path, "video_sha256 is not a sha256")
    if data.get("dtype") is not None and data["dtype"] not in FLOAT_DTYPES:
        raise _fail(path, f"dtype {data['dtype'][:20]!r} is not one of {', '.join(FLOAT_DTYPES)}")
    shape = data.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n) and n >= 0 for n in shape)):
        raise _fail(path, "shape is not [clips, dim]")
    for key in ("backbone", "recipe", "source", "timeline", "frames", "video_stat"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise _fail(path, f"{key} is not a JSON object")
    backbone = data.get("backbone") or {}
    for key in ("name", "weights", "weights_sha256", "precision"):
        if backbone.get(key) is not None and not isinstance(backbone[key], str):
            raise _fail(path, f"backbone.{key} is not text")
    if backbone.get("weights_source") is not None and not isinstance(backbone["weights_source"], dict):
        raise _fail(path, "backbone.weights_source is not a JSON object")
    recipe = data.get("recipe") or {}
    if recipe and not isinstance(recipe.get("name"), str):
        raise _fail(path, "recipe.name is not text")
    if recipe.get("clip_len") is not None and not (_is_int(recipe["clip_len"]) and recipe["clip_len"] > 0):
        raise _fail(path, "recipe.clip_len is not a positive integer")
    timeline = data.get("timeline") or {}
    if timeline.get("timeline_frames") is not None and not _is_int(timeline["timeline_frames"]):
        raise _fail(path, "timeline.timeline_frames is not an integer")
    if timeline.get("fps") is not None and not (_number(timeline["fps"]) and timeline["fps"] > 0):
        raise _fail(path, "timeline.fps is not a positive number")
    for where, warnings in (("source.warnings", (data.get("source") or {}).get("warnings")),
                            ("warnings", data.get("warnings"))):
        if warnings is not None and not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            raise _fail(path, f"{where} is not a list of texts")
    clips = data.get("clips")
    if not isinstance(clips, list):
        raise _fail(path, "clips is not a list")
    if len(clips) != shape[0]:
        raise _fail(path, f"it lists {len(clips)} clips for shape {shape}")
    for k, clip in enumerate(clips):
        if not isinstance(clip, dict):
            raise _fail(path, f"clip {k} is not a JSON object")
        if not (_number(clip.get("start_s")) and _number(clip.get("end_s"))):
            raise _fail(path, f"clip {k} has no numeric start_s and end_s")
        for key in ("index", "source_frame_start", "source_frame_end"):
            if clip.get(key) is not None and not (_is_int(clip[key]) and clip[key] >= 0):
                raise _fail(path, f"clip {k}'s {key} is not a whole number")
    for key in ("frames_file",):
        name = data.get(key)
        if name is not None and not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")):
            raise _fail(path, f"{key} is not a file name beside it")
    if data.get("predictions") is not None and not isinstance(data["predictions"], list):
        raise _fail(path, "predictions is not a list")
    return data


def check_feature_array(arr: np.ndarray, sidecar: Mapping[str, Any] | None, path: str | Path) -> None:
    """Refuse features that are not a 2-D floating array agreeing with the sidecar's shape and dtype.

    Integer, boolean or complex arrays would be converted to numbers a head was never trained on and scored
    as if nothing were wrong, so they are failed inputs, as is anything the sidecar does not describe.
    """
    path = Path(path)
    if arr.dtype.kind != "f" or arr.dtype.fields is not None:
        raise FeatureError(f"holds {arr.dtype} values, not floating-point features", path=path, fix="re-extract it")
    if arr.ndim != 2:
        raise FeatureError(f"features must be 2-D [clips, dim], got shape {tuple(arr.shape)}", path=path,
                           fix="re-extract it")
    if sidecar is not None:
        if list(arr.shape) != list(sidecar.get("shape") or []):
            raise FeatureError(f"shape {tuple(arr.shape)} differs from the sidecar's {sidecar.get('shape')}",
                               path=path, fix="re-extract it")
        want = sidecar.get("dtype")
        if want is not None and arr.dtype != np.dtype(want):
            raise FeatureError(f"holds {arr.dtype} values but its sidecar says {want}", path=path,
                               fix="re-extract it")


def check_feature_values(features: np.ndarray, path: str | Path) -> None:
    """Refuse NaN, inf, and values no backbone makes (beyond :data:`MAX_ABS_FEATURE`), naming the clips."""
    finite = np.isfinite(features)
    if not finite.all():
        bad = int((~finite).any(axis=1).sum())
        raise FeatureError(f"{bad} clip(s) contain NaN or inf", path=path, fix="re-extract it")
    big = (np.abs(features) > MAX_ABS_FEATURE).any(axis=1)
    if big.any():
        raise FeatureError(f"{int(big.sum())} clip(s) hold values up to {float(np.abs(features).max()):.3g}, far "
                           f"beyond any backbone's features (|x| ≤ {MAX_ABS_FEATURE:g})", path=path,
                           fix="the feature file is damaged or not made by a backbone: re-extract it")


def _max_abs(folder: str) -> None:
    """Print the largest |feature| of the .npy files under ``folder`` (the figure MAX_ABS_FEATURE rests on)."""
    largest, n = 0.0, 0
    for f in sorted(Path(folder).rglob("*.npy")):
        largest, n = max(largest, float(np.abs(np.load(f, mmap_mode="r")).max())), n + 1
    print(f"{n} feature files, max |x| = {largest:.4g}")


if __name__ == "__main__":
    import sys

    _max_abs(sys.argv[1])
