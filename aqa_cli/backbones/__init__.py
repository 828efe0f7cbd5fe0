"""Frozen video backbones: one module per model family, one registry.

``create_backbone("i3d")`` returns a ready :class:`Backbone`: model built,
verified weights loaded (fetched on first use where the source allows), put on
the device, with the feature recipe attached. ``list_backbones()`` names them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.recipes import Recipe

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), where bf16 runs faster than fp32.

    Elsewhere torch still runs bf16, through slow fallbacks: measured 0.9 GFLOP/s for a bf16 GEMM
    on an AVX2-only EPYC against 127 GFLOP/s in fp32.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    # No /proc/cpuinfo (not Linux): oneDNN's own check, which also accepts AVX-512 without BF16.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 is computed natively on ``device`` (a GPU from Ampere on, or a CPU with BF16 units)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(requested: str, device: torch.device, spec: BackboneSpec) -> str:
    """The precision a backbone actually runs at: ``auto`` becomes bf16 or fp32, the others stay.

    ``auto`` picks bf16 only where the device computes it natively and the backbone's bf16 drift was
    measured within bounds (``spec.bf16_within_bounds``: per-clip cosine >= 0.999 against fp32 and
    the demo score within 0.05, ``bench/bench_precision.py``); otherwise fp32, the recipe's reference.
    """
    if requested not in PRECISIONS:
        raise AqaError(f"unknown precision {requested!r}", fix=f"choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16" if spec.bf16_within_bounds and native_bf16(device) else "fp32"


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
    # Whether --precision auto may pick bf16 (on native hardware): set from the measured drift, see resolve_precision.
    bf16_within_bounds: bool = False
    # Convolution-heavy backbones (I3D) let cuDNN time its algorithms once per input shape.
    cudnn_benchmark: bool = False


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
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.recipe = spec.recipe
        # A checkpoint given by path: {"path", "sha256", "format"} of the file the weights were converted from.
        self.weights_source = weights_source
        self._pinned: torch.Tensor | None = None
        self._clip_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def identity(self) -> dict:
        """What makes two feature files comparable, besides the recipe."""
        identity = {"name": self.spec.name, "weights": self.spec.weights, "weights_sha256": self.weights_sha256,
                    "feature_dim": self.spec.feature_dim, "precision": self.precision}
        if self.weights_source is not None:
            identity["weights_source"] = dict(self.weights_source)
        return identity

    def _to_device(self, clips: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(clips)
        if self.device.type != "cuda":
            return x.to(self.device)
        # A page-locked staging buffer, kept between batches, lets the copy run asynchronously (non_blocking).
        if self._pinned is None or self._pinned.shape != x.shape or self._pinned.dtype != x.dtype:
            self._pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self._pinned.copy_(x)
        return self._pinned.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [B, T, h, w, 3] → (features float32 [B, D], logits float32 [B, C] or None)."""
        x = self.recipe.normalize(self._to_device(clips))  # uint8 travels, four times fewer bytes than float32
        if self.precision == "fp16":
            with torch.autocast(device_type=self.device.type, dtype=torch.float16):
                out = self.model(x)
        else:
            # bf16: the weights were converted at creation, so the activations are bf16 too (no per-op casts).
            out = self.model(x.to(self.dtype))
        feats = out.features.float().cpu().numpy()
        logits = None if out.logits is None else out.logits.float().cpu().numpy()
        return feats, logits

    def auto_batch_size(self, cpu_default: int = 4, cap: int = 64) -> int:
        """Clips per forward pass when none is asked for: on a GPU, as many as 80% of its free memory holds.

        The memory of one clip is measured once, with a forward pass of one blank clip (the peak
        the allocator saw beyond what was already in use); a batch is taken to need that per clip.
        On a CPU the batch size does not change the speed much: ``cpu_default``.
        """
        if self.device.type != "cuda":
            return cpu_default
        if self._clip_bytes is None:
            h, w = self.recipe.input_size
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self(np.zeros((1, self.recipe.clip_len, h, w, 3), dtype=np.uint8))
            self._clip_bytes = max(torch.cuda.max_memory_allocated(self.device) - base, 1)
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(cap, 0.8 * free // self._clip_bytes)))

    # Per-frame outputs. Most backbones have none; the pose backbone also returns each frame's landmarks,
    # which extraction saves beside the features (the sidecar's companion file).
    frame_outputs: dict[str, str] = {}  # array name → what it holds, recorded in the sidecar

    def reset(self) -> None:
        """Called before each video: a backbone that follows something across clips forgets it here."""

    def run(self, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]:
        """(features, logits, per-frame arrays [B, T, ...] or None); the default has no per-frame output."""
        feats, logits = self(clips)
        return feats, logits, None


# The registry: each family module registers its backbones (and, in aqa_cli.weights, the checkpoints it converts)
# when it is imported; this package imports its families at the end of this file.
_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbones(*specs: BackboneSpec) -> None:
    """Add backbones to the registry (called by each family module for its own)."""
    for spec in specs:
        if spec.name in _BACKBONES and _BACKBONES[spec.name] is not spec:
            raise ValueError(f"backbone {spec.name!r} is registered twice")
        _BACKBONES[spec.name] = spec


def _registry() -> dict[str, BackboneSpec]:
    return _BACKBONES


def weights_specs() -> dict:
    """The weights registry (name → spec), holding every family's entries: the same dict as aqa_cli.weights'."""
    from aqa_cli.weights import registered_weights

    return registered_weights()


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


def _pool_in_float32(module: nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def _back_to_bf16(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.bfloat16)


def place_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Make ``model`` a frozen inference model on ``device`` at ``precision`` (in place; returned for chaining).

    bf16 converts every weight, so activations are bf16 too. Average pooling over 3-D windows then runs in
    float32 and is cast back: torch's CPU ``avg_pool3d`` has no bf16 kernel on any CPU (X3D's and SlowFast's
    heads pool that way; I3D's logits pool in float32 in its own forward), and a float32 mean keeps digits.
    """
    model.eval().requires_grad_(False).to(device, dtype=torch.bfloat16 if precision == "bf16" else None)
    if precision == "bf16":
        for m in model.modules():
            if isinstance(m, nn.AvgPool3d):
                m.register_forward_pre_hook(_pool_in_float32)
                m.register_forward_hook(_back_to_bf16)
    return model


def create_backbone(name: str, *, device: str = "auto", precision: str = "fp32", fetch: bool = True,
                    weights: str | None = None) -> Backbone:
    """Build backbone ``name`` with its verified weights on ``device``.

    ``weights`` picks another registry entry of the same architecture than the
    backbone's default (e.g. torchvision's Kinetics-400 Swin-B for ``vst``), or
    names a checkpoint file of that architecture (:func:`~aqa_cli.weights.is_weights_path`),
    converted once into the cache by its sha256.
    ``precision`` ``auto`` is resolved here (:func:`resolve_precision`); the
    backbone's ``precision`` is the one it runs at. bf16 converts the weights,
    so activations are bf16 too; fp16 is autocast, on a GPU only.
    """
    from aqa_cli.weights import get_spec, is_weights_path, load_user_weights, load_weights

    spec = get_backbone_spec(name)
    if precision not in PRECISIONS:
        raise AqaError(f"unknown precision {precision!r}", fix=f"choose one of: {', '.join(PRECISIONS)}")
    if spec.factory is not None:
        if weights is not None and weights != spec.weights:
            raise AqaError(f"the {name} backbone has no alternative weights", fix="drop --weights")
        dev = resolve_device(device)
        return spec.factory(spec, dev, resolve_precision(precision, dev, spec))
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
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, spec)
    if precision == "fp16" and dev.type == "cpu":
        raise AqaError("fp16 autocast needs a GPU", fix="use --precision bf16 on the CPU, or fp32")
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
    place_model(model, dev, precision)
    if dev.type == "cuda":
        # cuDNN's autotuner picks the fastest convolution algorithm for I3D's fixed shapes. The pick can
        # differ between processes, so on a GPU features agree run to run within float tolerance, not bitwise.
        torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    classes = json.loads(loaded.metadata["classes"]) if "classes" in loaded.metadata else None
    # The path as given now (the converted copy may have been made from the same bytes elsewhere).
    source = None if user is None else {"path": str(Path(weights).expanduser().resolve()),
                                        "sha256": user.metadata["source_sha256"],
                                        "format": user.metadata.get("source_format")}
    return Backbone(spec, model, weights_sha256=loaded.sha256, class_names=classes, device=dev, precision=precision,
                    weights_source=source)


# The families, last: each imports BackboneSpec from this package and registers itself.
from aqa_cli.backbones import i3d, pose, ptv_zoo, vst  # noqa: E402,F401
