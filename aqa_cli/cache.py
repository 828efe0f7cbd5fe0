"""The feature cache: a video's clip features, kept so that the backbone runs once per video.

The backbone is by far the slowest step of scoring. Its output depends only on the
video's bytes, the backbone, its weights, the recipe and the numeric precision, so
those (the video by its sha256, the weights by theirs, the recipe in full) make the
key. Scoring the same video with another head or preset finds the features here.

An entry is an ordinary feature pair (``<key>.npy`` plus a sidecar ``<key>.json``
in the format of :func:`aqa_cli.extract.make_sidecar`) under
``$AQA_HOME/features/<key[:2]>/``. Both files are written atomically, the sidecar
last, and the sidecar records the ``.npy``'s sha256: an entry that is incomplete,
damaged (in its bytes, or in meaning: a field of the wrong type, checked by
:mod:`aqa_cli.validation` as for any feature file) or made for another key is
deleted and recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from aqa_cli.errors import FeatureError
from aqa_cli.extract import load_features, read_sidecar
from aqa_cli.fileio import remove_stale_temporaries, sha256_file, write_json, write_npy

CACHE_VERSION = 1


def cache_key(*, video_sha256: str, backbone: str, weights: str, weights_sha256: str, recipe: dict,
              precision: str) -> str:
    """A hex digest of everything that decides a video's features."""
    material = {"cache_version": CACHE_VERSION, "video_sha256": video_sha256, "backbone": backbone,
                "weights": weights, "weights_sha256": weights_sha256, "recipe": recipe, "precision": precision}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    from aqa_cli.weights import aqa_home

    return aqa_home() / "features"


class FeatureCache:
    """Features by :func:`cache_key`; ``root`` defaults to ``$AQA_HOME/features``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        """(features float32 [T, D], sidecar) for ``key``, or None when absent or not intact."""
        npy, js = self.paths(key)
        if not js.is_file():
            return None
        try:
            sidecar = read_sidecar(js)
            if sidecar.get("cache_key") != key or sidecar.get("features_sha256") != sha256_file(npy):
                raise FeatureError("cache entry does not match its key or its features' sha256", path=js)
            # read_sidecar checked every field's type; a cache entry must also have those it is read by.
            if not isinstance(sidecar.get("recipe"), dict) or not isinstance(sidecar.get("backbone"), dict):
                raise FeatureError("cache entry records no recipe or backbone", path=js)
            features = load_features(npy, sidecar)
        except (FeatureError, OSError):
            self.discard(key)
            return None
        return features, sidecar

    def put(self, key: str, features: np.ndarray, sidecar: dict) -> None:
        """Store an entry; the sidecar, written last, marks it complete. Raises OSError when the disk refuses."""
        npy, js = self.paths(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(npy.parent)
        js.unlink(missing_ok=True)
        write_npy(npy, np.ascontiguousarray(features, dtype=np.float32))
        write_json(js, {**sidecar, "features_file": npy.name, "cache_key": key,
                        "features_sha256": sha256_file(npy)})

    def discard(self, key: str) -> None:
        for path in self.paths(key):
            with contextlib.suppress(OSError):
                path.unlink()
