"""Frozen video backbones: one module per model family, one registry.

``create_backbone("i3d")`` returns a ready :class:`Backbone`: model built,
verified weights loaded (fetched on first use where the source allows), put on
the device, with the feature recipe attached. ``list_backbones()`` names them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.recipes import Recipe

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its model, its weights, and the recipe its features follow."""

    name: str
    description: str
    weights: str
    recipe: Recipe
    feature_dim: int
    # Builds the model and loads a converted state dict (and its safetensors metadata) into it.
    build: Callable[[dict[str, torch.Tensor], dict[str, str]], nn.Module] | None = None
    # A backbone whose model is not a torch module in our weights registry (MediaPipe's pose estimator ships
    # inside its own package) builds itself: factory(spec, device, precision) → Backbone.
    factory: Callable[[BackboneSpec, torch.device, str], Backbone] | None = None


class Backbone:
    """A loaded backbone: uint8 clips in, one feature (and the classifier's logits) per clip out."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, *, weights_sha256: str, class_names: list[str] | None,
                 device: torch.device, precision: str, weights_source: dict | None = None):
        self.spec = spec
        self.model = model
        self.weights_sha256 = weights_sha256
        self.class_names = class_names
        self.device = device
        self.precision = precision
        self.recipe = spec.recipe
        # A checkpoint given by path: {"path", "sha256", "format"} of the file the weights were converted from.
        self.weights_source = weights_source

    @property
    def name(self) -> str:
        return self.spec.name

    def identity(self) -> dict:
        """What makes two feature files comparable, besides the recipe."""
        identity = {"name": self.spec.name, "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                    "feature_dim": self.spec.feature_dim}
        if self.weights_source is not None:
            identity["weights_source"] = dict(self.weights_source)
        return identity

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [B, T, h, w, 3] → (features float32 [B, D], logits float32 [B, C] or None)."""
        x = torch.as_tensor(clips).to(self.device, non_blocking=True)
        x = self.recipe.normalize(x)
        if self.precision == "fp32":
            out = self.model(x)
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                out = self.model(x)
        feats = out.features.float().cpu().numpy()
        logits = None if out.logits is None else out.logits.float().cpu().numpy()
        return feats, logits

    # Per-frame outputs. Most backbones have none; the pose backbone also returns each frame's landmarks,
    # which extraction saves beside the features (the sidecar's companion file).
    frame_outputs: dict[str, str] = {}  # array name → what it holds, recorded in the sidecar

    def reset(self) -> None:
        """Called before each video: a backbone that follows something across clips forgets it here."""

    def run(self, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]:
        """(features, logits, per-frame arrays [B, T, ...] or None); the default has no per-frame output."""
        feats, logits = self(clips)
        return feats, logits, None


def _registry() -> dict[str, BackboneSpec]:
    from aqa_cli.backbones import i3d, pose, ptv_zoo, vst

    return {spec.name: spec for spec in (i3d.BACKBONE, vst.BACKBONE, pose.BACKBONE, *ptv_zoo.BACKBONES)}


def weights_specs() -> dict:
    """Weights registry entries contributed by the backbone modules."""
    from aqa_cli.backbones import i3d, ptv_zoo, vst

    return {spec.name: spec for spec in (i3d.WEIGHTS, *vst.WEIGHTS, *ptv_zoo.WEIGHTS)}


def list_backbones() -> list[str]:
    return sorted(_registry())


def get_backbone_spec(name: str) -> BackboneSpec:
    reg = _registry()
    if name not in reg:
        raise AqaError(f"unknown backbone {name!r}", fix=f"choose one of: {', '.join(sorted(reg))}")
    return reg[name]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AqaError("CUDA was requested but no GPU is visible to torch", fix="use --device cpu or --device auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AqaError(f"unknown device {device!r}", fix="use auto, cpu or cuda") from None


def create_backbone(name: str, *, device: str = "auto", precision: str = "fp32", fetch: bool = True,
                    weights: str | None = None) -> Backbone:
    """Build backbone ``name`` with its verified weights on ``device``.

    ``weights`` picks another registry entry of the same architecture than the
    backbone's default (e.g. torchvision's Kinetics-400 Swin-B for ``vst``), or
    names a checkpoint file of that architecture (:func:`~aqa_cli.weights.is_weights_path`),
    converted once into the cache by its sha256.
    """
    from aqa_cli.weights import get_spec, is_weights_path, load_user_weights, load_weights

    spec = get_backbone_spec(name)
    if precision not in PRECISIONS:
        raise AqaError(f"unknown precision {precision!r}", fix=f"choose one of: {', '.join(PRECISIONS)}")
    if spec.factory is not None:
        if weights is not None and weights != spec.weights:
            raise AqaError(f"the {name} backbone has no alternative weights", fix="drop --weights")
        return spec.factory(spec, resolve_device(device), precision)
    dev = resolve_device(device)
    if precision == "fp16" and dev.type == "cpu":
        raise AqaError("fp16 autocast needs a GPU", fix="use --precision bf16 on the CPU, or fp32")
    user = None
    if weights is not None and is_weights_path(weights):
        user = load_user_weights(get_spec(spec.weights), weights)
        spec = dataclasses.replace(spec, weights=user.name,
                                   feature_dim=int(user.metadata.get("feature_dim", spec.feature_dim)))
    elif weights is not None and weights != spec.weights:
        default_arch = get_spec(spec.weights).architecture
        if get_spec(weights).architecture != default_arch:
            same = [w for w, s in weights_specs().items() if s.architecture == default_arch]
            raise AqaError(f"weights {weights!r} do not fit the {name} backbone",
                           fix=f"choose one of: {', '.join(sorted(same))}")
        spec = dataclasses.replace(spec, weights=weights)
    loaded = user or load_weights(spec.weights, fetch_missing=fetch)
    try:
        model = spec.build(loaded.tensors, loaded.metadata)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WeightsError(
            f"does not fit the {name} architecture ({' '.join(str(exc).split())[:160]})",
            path=weights if user else loaded.path,
            fix="pass a checkpoint of this architecture" if user else
            f"re-fetch with `aqa weights fetch {spec.weights} --force`",
        ) from None
    model.eval().requires_grad_(False).to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False  # same algorithms every run: the same video gives the same features
    classes = json.loads(loaded.metadata["classes"]) if "classes" in loaded.metadata else None
    # The path as given now (the converted copy may have been made from the same bytes elsewhere).
    source = None if user is None else {"path": str(Path(weights).expanduser().resolve()),
                                        "sha256": user.metadata["source_sha256"],
                                        "format": user.metadata.get("source_format")}
    return Backbone(spec, model, weights_sha256=loaded.sha256, class_names=classes, device=dev, precision=precision,
                    weights_source=source)
