"""The pytorchvideo model zoo as backbones: X3D-M, SlowFast-R50 (8x8) and MViT-B (16x4), Kinetics-400.

The three families share everything but their builder and their input, so they live in one file. Each
network is built by pytorchvideo's own hub builder (``pytorchvideo.models.hub.x3d_m``,
``slowfast_r50``, ``mvit_base_16x4``, with ``pretrained=False``: nothing is downloaded by pytorchvideo),
and the zoo's checkpoint is loaded into it by aqa's registry: fetched from the zoo's address, checked,
and converted once to safetensors.

Checkpoint layout. The zoo's ``.pyth`` files are PySlowFast checkpoints whose ``model_state`` is the
state dict of exactly the module the hub builder makes (the hub loads it with
``model.load_state_dict(checkpoint["model_state"])``); their other entries (epoch, optimizer state, the
config as a YAML string) are ignored. So the key mapping is the identity, and it is checked as strictly
as the Video Swin renaming: every key present, none left over, every shape the builder's, and the
classifier's weight and bias agreeing on the class count.

Features. The clip feature is what the classifier reads: the head's pooled activations averaged over
the positions that remain (X3D: the 2048-d output of its projected pool; SlowFast: both pathways'
pooled maps concatenated, 2048 + 256 = 2304; MViT: the 768-d class token after the final norm). The
logits are the classifier's linear projection of that feature, before any softmax (pytorchvideo's X3D
head applies one; averaging clips and the softmax of ``--show-pred`` happen after).

Recipes (data, below): PySlowFast tests these models at 30 fps, ``frame length x sample rate`` frames,
the short side scaled to the test crop and a centre crop, values in [0, 1] normalised with mean 0.45 and
std 0.225 per channel. X3D-M: 16x5, 256 (the X3D-M config and pytorchvideo's hub tutorial; mmaction's
X3D-M test pipeline has the same resize 256 and centre crop 256). SlowFast-R50: 32x2 with alpha 4 (the
slow pathway takes 8 of the 32 frames, as PySlowFast's PackPathway picks them), 256. MViT-B: 16x4, 224
(its position embeddings are for 16x224x224 exactly).

Class order. The zoo's models predict Kinetics-400 in the order of PySlowFast's
``kinetics_classnames.json`` (the id map pytorchvideo's hub tutorial loads); its ids are the class names'
alphabetical ranks, which is torchvision's and DeepMind's list (checked on 34 of its entries, every
parenthesised and capitalised name among them). Not checked against the real checkpoints' predictions,
which could not be downloaded here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from aqa_cli.backbones import BackboneSpec, register_backbones
from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.recipes import Recipe
from aqa_cli.weights import WeightsSpec, guess_architecture, load_torch_checkpoint, register_weights, state_dict_of

ZOO_ROOT = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics"
# PySlowFast's Kinetics normalisation, used by every model of the zoo.
ZOO_MEAN = (0.45, 0.45, 0.45)
ZOO_STD = (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class ZooModel:
    """One zoo family: how to build it, where its weights are, and the recipe its features follow."""

    backbone: str  # aqa's backbone name
    weights: str  # its registry entry
    architecture: str  # the weights' architecture (also the folder for checkpoints given by path)
    family: str  # the family guess_architecture names ("x3d", "slowfast", "mvit")
    hub_builder: str  # the builder in pytorchvideo.models.hub
    classes_kwarg: str  # the builder's argument for the class count
    url: str
    recipe: Recipe
    feature_dim: int
    description: str

    def build_net(self, num_classes: int = 400) -> nn.Module:
        """pytorchvideo's own model for this family (random weights; pytorchvideo downloads nothing)."""
        from pytorchvideo.models import hub

        return getattr(hub, self.hub_builder)(pretrained=False, **{self.classes_kwarg: num_classes})


X3D_M = ZooModel(
    backbone="x3d-m", weights="x3d-m-k400", architecture="x3d_m", family="x3d", hub_builder="x3d_m",
    classes_kwarg="model_num_class", url=f"{ZOO_ROOT}/X3D_M.pyth",
    recipe=Recipe(name="ptv-x3d-m", fps=30.0, clip_len=16, stride=16, sampling_rate=5, resize_short=256,
                  crop=(256, 256), mean=ZOO_MEAN, std=ZOO_STD),
    feature_dim=2048,
    description="X3D-M (pytorchvideo zoo, Kinetics-400, 16x5): projected-pool output pooled to 2048-d per clip",
)
SLOWFAST_R50 = ZooModel(
    backbone="slowfast-r50", weights="slowfast-r50-k400", architecture="slowfast_r50", family="slowfast",
    hub_builder="slowfast_r50", classes_kwarg="model_num_class", url=f"{ZOO_ROOT}/SLOWFAST_8x8_R50.pyth",
    recipe=Recipe(name="ptv-slowfast-r50", fps=30.0, clip_len=32, stride=32, sampling_rate=2, slowfast_alpha=4,
                  resize_short=256, crop=(256, 256), mean=ZOO_MEAN, std=ZOO_STD),
    feature_dim=2304,
    description="SlowFast-R50 8x8 (pytorchvideo zoo, Kinetics-400, 32x2, alpha 4): both pathways pooled, 2304-d",
)
MVIT_B_16X4 = ZooModel(
    backbone="mvit-b-16x4", weights="mvit-b-16x4-k400", architecture="mvit_base_16x4", family="mvit",
    hub_builder="mvit_base_16x4", classes_kwarg="head_num_classes", url=f"{ZOO_ROOT}/MVIT_B_16x4.pyth",
    recipe=Recipe(name="ptv-mvit-b-16x4", fps=30.0, clip_len=16, stride=16, sampling_rate=4, resize_short=224,
                  crop=(224, 224), mean=ZOO_MEAN, std=ZOO_STD),
    feature_dim=768,
    description="MViT-B 16x4 (pytorchvideo zoo, Kinetics-400): class token after the final norm, 768-d",
)

ZOO = (X3D_M, SLOWFAST_R50, MVIT_B_16X4)


class ZooOutput(NamedTuple):
    features: torch.Tensor
    """[B, D] what the classifier reads (see the module docstring)."""
    logits: torch.Tensor
    """[B, num_classes] its linear projection, before any softmax."""


def slow_pathway_index(frames: int, alpha: int) -> torch.Tensor:
    """The frames the slow pathway takes: ``frames // alpha`` of them, evenly spaced from first to last."""
    return torch.linspace(0, frames - 1, frames // alpha).long()


class ZooBackbone(nn.Module):
    """A zoo network with the outputs the Backbone contract asks for. Input: float [B, 3, T, H, W], normalised."""

    def __init__(self, model: ZooModel, net: nn.Module) -> None:
        super().__init__()
        self.zoo = model
        self.net = net

    def inputs(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        alpha = self.zoo.recipe.slowfast_alpha
        if alpha is None:
            return x
        return [x.index_select(2, slow_pathway_index(x.shape[2], alpha).to(x.device)), x]

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse clips the network cannot take: its head pools over the recipe's clip length (and MViT's
        position embeddings fix its whole input size)."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected input [B, 3, T, H, W], got {tuple(x.shape)}")
        recipe = self.zoo.recipe
        if self.zoo.family == "mvit" and tuple(x.shape[2:]) != (recipe.clip_len, *recipe.crop):
            raise AqaError(f"{self.zoo.backbone} takes clips of exactly {recipe.clip_len}x{recipe.crop[0]}x"
                           f"{recipe.crop[1]}, got {'x'.join(map(str, x.shape[2:]))}",
                           fix="drop --clip-len (its position embeddings are for that size)")
        if x.shape[2] < recipe.clip_len:
            raise AqaError(f"{self.zoo.backbone} takes clips of at least {recipe.clip_len} frames, got {x.shape[2]}",
                           fix=f"drop --clip-len, or give it {recipe.clip_len} or more")

    def forward(self, x: torch.Tensor) -> ZooOutput:
        self.check_input(x)
        net, h = self.net, self.inputs(x)
        if self.zoo.family == "mvit":
            # MultiscaleVisionTransformers.forward up to its head; the head pools the class token.
            h = net.patch_embed(h)
            h = net.cls_positional_encoding(h)
            if net.pos_drop is not None:
                h = net.pos_drop(h)
            if net.norm_patch_embed is not None:
                h = net.norm_patch_embed(h)
            thw = net.cls_positional_encoding.patch_embed_shape
            for block in net.blocks:
                h, thw = block(h, thw)
            if net.norm_embed is not None:
                h = net.norm_embed(h)
            features = net.head.sequence_pool(h)
        else:
            # pytorchvideo's Net: the blocks, then a ResNetBasicHead (pool, dropout, projection, activation).
            *body, head = net.blocks
            for block in body:
                h = block(h)
            if head.pool is not None:
                h = head.pool(h)
            features = h.float().mean(dim=(2, 3, 4))
        classifier = self._classifier(net)
        # The feature is averaged in float32 whatever the model's dtype; the classifier reads it in its own.
        return ZooOutput(features=features.float(), logits=classifier(features.to(classifier.weight.dtype)))

    @staticmethod
    def _classifier(net: nn.Module) -> nn.Linear:
        return net.head.proj if hasattr(net, "head") else net.blocks[-1].proj


# ------------------------------------------------------------------------------------------ checkpoints

def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _classifier_key(model: ZooModel) -> str:
    return "head.proj" if model.family == "mvit" else f"blocks.{6 if model.family == 'slowfast' else 5}.proj"


def class_count(model: ZooModel, state: Mapping[str, Any]) -> int:
    """The classifier's class count; its weight and bias must agree."""
    key = _classifier_key(model)
    weight, bias = state.get(f"{key}.weight"), state.get(f"{key}.bias")
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"missing: {key}.weight and {key}.bias (the classifier)")
    if weight.shape[0] != bias.shape[0]:
        raise ValueError(f"wrong class count: the classifier's weight has {weight.shape[0]} classes, "
                         f"its bias {bias.shape[0]}")
    return int(weight.shape[0])


def check_state_dict(model: ZooModel, state: Mapping[str, Any], num_classes: int) -> dict[str, torch.Tensor]:
    """Check a zoo-layout state dict against the builder's; ValueError names every problem."""
    # Built for real, not on the meta device: MViT's builder reads values of the tensors it makes.
    expected = model.build_net(num_classes).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    not_tensor = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensor),
                 (f"shape (checkpoint vs {model.hub_builder})", bad_shape)) if keys]
    if problems:
        raise ValueError(f"not a {model.hub_builder} checkpoint; " + "; ".join(problems))
    return {k: state[k].to(v.dtype).contiguous() for k, v in expected.items()}


def _kinetics400_classes() -> list[str]:
    # torchvision's Kinetics-400 list: DeepMind's label map, and the zoo's alphabetical id order.
    from torchvision.models.video import R3D_18_Weights

    return list(R3D_18_Weights.KINETICS400_V1.meta["categories"])


def convert_checkpoint(model: ZooModel, path: Path, fmt: str = "auto", *,
                       num_classes: int | None = 400) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A zoo checkpoint (``{"model_state": ...}``, or the bare state dict) → the builder's state dict and metadata.

    ``num_classes`` None takes the class count the file has (a checkpoint of one's own, by path).
    """
    obj = load_torch_checkpoint(path)
    try:
        if fmt not in ("auto", "pytorchvideo"):
            raise ValueError(f"unknown format {fmt!r} (pytorchvideo zoo checkpoints have one)")
        state = state_dict_of(obj)
        if not isinstance(state, Mapping):
            raise ValueError(f"holds a {type(obj).__name__}, not a dict of tensors")
        seen = guess_architecture(obj)
        if seen is not None and seen.family != model.family:
            raise ValueError(f"this is {seen.what}, not a pytorchvideo {model.hub_builder} checkpoint"
                             + (f"; use --backbone {seen.backbone}" if seen.backbone else ""))
        found = class_count(model, state)
        if num_classes is not None and found != num_classes:
            raise ValueError(f"its classifier has {found} classes but {model.weights} is a {num_classes}-class model "
                             "(a checkpoint of your own goes by path: --weights FILE / --backbone-weights FILE)")
        tensors = check_state_dict(model, state, found)
    except ValueError as exc:
        raise WeightsError(str(exc), path=path, fix=f"pass a pytorchvideo {model.hub_builder} checkpoint "
                                                    f"(the zoo's {Path(model.url).name} layout)") from None
    extra = {"source_format": "pytorchvideo", "feature_dim": str(model.feature_dim), "num_classes": str(found),
             "zoo_model": model.hub_builder}
    if found == 400:
        extra["classes"] = json.dumps(_kinetics400_classes())
        extra["classes_source"] = "torchvision's Kinetics-400 list (the zoo's alphabetical class ids)"
    return tensors, extra


def _build(model: ZooModel) -> Callable[[dict[str, torch.Tensor], dict[str, str]], nn.Module]:
    def build(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> nn.Module:
        net = model.build_net(class_count(model, tensors))
        net.load_state_dict(tensors, strict=True)
        return ZooBackbone(model, net).eval()

    return build


def _weights_spec(model: ZooModel) -> WeightsSpec:
    # The registry entry is the 400-class release; a file given by path keeps its own class count.
    convert = partial(convert_checkpoint, model, num_classes=400)
    convert_user = partial(convert_checkpoint, model, num_classes=None)
    # The zoo publishes neither checksums nor sizes (its hub code downloads without a hash check, and no
    # size is given in its model zoo tables), so the first file accepted is trusted (as for vst-k600).
    return WeightsSpec(name=model.weights, kind="backbone", architecture=model.architecture,
                       description=model.description, source=model.url, source_sha256="", convert=convert,
                       url=model.url, formats=("pytorchvideo",), convert_user=convert_user)


WEIGHTS = tuple(_weights_spec(m) for m in ZOO)
BACKBONES = tuple(BackboneSpec(name=m.backbone, description=m.description, weights=m.weights, recipe=m.recipe,
                               feature_dim=m.feature_dim, build=_build(m)) for m in ZOO)

register_backbones(*BACKBONES)
register_weights(*WEIGHTS)
