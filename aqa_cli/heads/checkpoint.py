"""Head checkpoints: safetensors with the metadata that makes a score meaningful.

A checkpoint holds one head or an ensemble of heads of one kind (``members.<k>.``
prefixes), and records in its metadata: the head and its config, the preset,
target and score scale, the feature contract (backbone, feature size, recipe),
the sha256 of the training data, the seed, the epochs and training settings, the
cross-validation figures and the package version.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aqa_cli import __version__
from aqa_cli.errors import AqaError, FeatureError, WeightsError
from aqa_cli.heads import Head, HeadOutput, create_head
from aqa_cli.validation import check_head_metadata, check_head_tensors

CHECKPOINT_FORMAT = "aqa-head/1"
# Shown with the scores of a head marked as a demonstration model without a note of its own.
DEMONSTRATION_NOTE = "a demonstration model, not a judge-calibrated score"


class HeadEnsemble(nn.Module):
    """The mean of several heads' scores, with explanations that still add up.

    With member weights w_kt and scores s_kt: w_t = mean_k w_kt and
    s_t = Σ_k w_kt·s_kt / Σ_k w_kt, so Σ_t w_t·s_t = mean_k Σ_t w_kt·s_kt exactly;
    additive terms are averaged.
    """

    def __init__(self, members: list[Head]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self.name = members[0].name
        self.forward_reads_labels = members[0].forward_reads_labels

    def forward(self, features: Tensor, mask: Tensor | None = None, **labels: Any) -> HeadOutput:
        outs = [m(features, mask, **labels) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        w = torch.stack([o.weights for o in outs])  # [K, B, T]
        ws = torch.stack([o.weights * o.clip_scores for o in outs]).sum(0)
        wsum = w.sum(0)
        clip_scores = torch.where(wsum > 0, ws / wsum.clamp_min(torch.finfo(ws.dtype).tiny), torch.zeros_like(ws))
        additive = {k: torch.stack([o.additive[k] for o in outs]).mean(0) for k in outs[0].additive}
        member_scores = torch.stack([o.score for o in outs], dim=1)
        extras: dict[str, Tensor] = {"member_scores": member_scores}
        # Members share one config, hence the same grade values: the mean of their grade
        # probabilities is the ensemble's distribution over those values.
        if all("grade_probs" in o.extras and "grade_values" in o.extras for o in outs):
            extras["grade_probs"] = torch.stack([o.extras["grade_probs"] for o in outs]).mean(0)
            extras["grade_values"] = outs[0].extras["grade_values"]
        # Members share one schema: the mean of their class probabilities is the ensemble's. Text cannot be
        # averaged, so the commentary is the first member's.
        for key in outs[0].extras:
            if key.startswith("probs.") and all(key in o.extras for o in outs):
                extras[key] = torch.stack([o.extras[key] for o in outs]).mean(0)
            elif key in ("step_probs", "aux") and all(key in o.extras for o in outs):
                extras[key] = torch.stack([o.extras[key] for o in outs]).mean(0)
            elif key in ("caption_tokens", "body_linear", "execution_scale", "mask"):
                extras[key] = outs[0].extras[key]
        return HeadOutput(score=member_scores.mean(1), weights=w.mean(0), clip_scores=clip_scores,
                          additive=additive, extras=extras)


    def scores_without_each_clip(self, features: Tensor) -> Tensor | None:
        """The mean of the members' scores without each clip, where every member computes them exactly
        (``Head.scores_without_each_clip``); else None."""
        each = [getattr(m, "scores_without_each_clip", lambda _: None)(features) for m in self.members]
        if any(e is None for e in each):
            return None
        return torch.stack(each).mean(0)

    def describe(self, out: HeadOutput, index: int = 0) -> dict[str, Any]:
        """The first member's reading of the ensemble's output (members share one config)."""
        return self.members[0].describe(out, index)

    def inference_labels(self, data: Any) -> Any:
        return self.members[0].inference_labels(data)

    def apply_labels(self, scores: Any, data: Any) -> Any:
        """Members share one config, so the first member's label rule (e.g. × difficulty) is the ensemble's."""
        return self.members[0].apply_labels(scores, data)


@dataclass
class LoadedHead:
    path: Path
    model: nn.Module  # a Head or a HeadEnsemble, in eval mode
    head: str
    metadata: dict[str, str]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.metadata["config"])

    @property
    def contract(self) -> dict[str, Any]:
        return json.loads(self.metadata.get("contract", "{}"))

    @property
    def target(self) -> str:
        return self.metadata.get("target", "")

    @property
    def members(self) -> int:
        return int(self.metadata.get("members", "1"))

    @property
    def preset(self) -> str:
        return self.metadata.get("preset", "")

    def _json(self, key: str) -> dict[str, Any]:
        try:
            value = json.loads(self.metadata.get(key, "{}") or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def cv_spearman(self) -> float | None:
        """The mean cross-validated Spearman ρ recorded at training, if any."""
        value = self._json("cv").get("mean_spearman")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def cv_se(self) -> float | None:
        """The standard error of that mean: as recorded by a repeated CV, else std/√folds of the fold figures."""
        cv = self._json("cv")
        if isinstance(cv.get("se_spearman"), (int, float)):
            return float(cv["se_spearman"])
        rhos = cv.get("fold_spearman") or []
        if len(rhos) < 2:
            return None
        mean = sum(rhos) / len(rhos)
        return (sum((r - mean) ** 2 for r in rhos) / (len(rhos) - 1) / len(rhos)) ** 0.5

    @property
    def faithfulness(self) -> tuple[float | None, str]:
        """How far the head's own weights and scores say what each clip does (the mean ρ of predicted against
        measured clip effects) and where it was measured: on held-out videos when the CV measured it, else the
        figure bench/shipped_faithfulness.py recorded on training videos; (None, "") when never measured."""
        value = self._json("cv").get("explanation", {}).get("faithfulness")
        if isinstance(value, (int, float)):
            return float(value), "held-out"
        value = self._json("faithfulness").get("faithfulness")
        if isinstance(value, (int, float)):
            return float(value), "training videos"
        return None, ""

    @property
    def scale(self) -> dict[str, Any]:
        """{score_min, score_max, unit}: the metadata's, else the config's range."""
        try:
            scale = json.loads(self.metadata.get("scale", "{}") or "{}")
        except ValueError:
            scale = {}
        config = self.config
        return {"score_min": float(scale.get("score_min", config.get("score_min", 0.0))),
                "score_max": float(scale.get("score_max", config.get("score_max", 1.0))),
                "unit": str(scale.get("unit", "points"))}

    @property
    def demonstration(self) -> str | None:
        """The note of a head marked as a demonstration model (metadata ``demonstration``), else None."""
        note = self.metadata.get("demonstration", "")
        if note.lower() in ("", "false", "0", "no", "null"):
            return None
        return DEMONSTRATION_NOTE if note.lower() in ("true", "1", "yes") else note

    def required_features(self) -> dict[str, Any]:
        """The contract with its gaps filled: {backbone, weights, feature_dim, recipe (a name)}.

        A null recipe means the backbone's default recipe, and null weights the backbone's default
        weights: the Fis-V features the first heads were trained on carry no sidecar, but they were
        made with the backbone's published recipe and release weights.
        """
        contract = self.contract
        backbone = contract.get("backbone")
        recipe = contract.get("recipe")
        weights = contract.get("weights")
        if isinstance(recipe, dict):
            recipe = recipe.get("name")
        if (recipe is None or weights is None) and backbone:
            from aqa_cli.backbones import get_backbone_spec

            try:
                spec = get_backbone_spec(backbone)
                recipe, weights = recipe or spec.recipe.name, weights or spec.weights
            except AqaError:
                pass
        dim = contract.get("feature_dim", self.config.get("in_dim"))
        return {"backbone": backbone, "weights": weights, "feature_dim": None if dim is None else int(dim),
                "recipe": recipe}

    def check_weights(self, weights: str | None, where: str | Path, *, trust_features: bool = False,
                      source: dict | None = None) -> str | None:
        """Refuse features made with other backbone weights than the head's, unless ``trust_features``.

        Another checkpoint of the same architecture (fine-tuned, or trained elsewhere) puts its
        features in another space: a head trained on the release's features would score them with
        numbers that mean nothing, and nothing in the features shows it. So only the user can vouch
        for them. Returns the warning to show when they do, else None.
        """
        need = self.required_features()["weights"]
        if not weights or not need or weights == need:
            return None
        made = _describe_weights(weights, source)
        if trust_features:
            return (f"features made with {made}, not the {need} weights {self.path.name} was trained on: "
                    "scored because of --trust-features")
        from aqa_cli.weights import USER_PREFIX

        fix = "pass --trust-features if you know they match (e.g. the same weights saved again), or train a head " \
              "on these features with `aqa train`"
        if need.startswith(USER_PREFIX):
            fix = f"score with --backbone-weights FILE, the checkpoint file the head was trained with, or {fix}"
        raise FeatureError(f"features made with {made}, but {self.path.name} was trained on {need} features; another "
                           "checkpoint's features are another feature space, so the head's score would not mean "
                           "what it says", path=where, fix=fix)

    def check_contract(self, backbone: str | None, recipe: str | None, where: str | Path) -> None:
        """Refuse features from another backbone or recipe than the head was trained on."""
        need = self.required_features()
        if backbone and need["backbone"] and backbone != need["backbone"]:
            raise FeatureError(f"features come from the {backbone} backbone but {self.path.name} was trained on "
                               f"{need['backbone']} features", path=where,
                               fix=f"use --backbone {need['backbone']}: score the video itself, or extract its features "
                                   f"with `aqa extract-features --backbone {need['backbone']}`")
        if recipe and need["recipe"] and recipe != need["recipe"]:
            raise FeatureError(f"features follow the {recipe} recipe but {self.path.name} was trained on the "
                               f"{need['recipe']} recipe", path=where,
                               fix=f"use --backbone {need['backbone']} with its default recipe ({need['recipe']})")

    def check_features(self, features: list, ids: list[str], folder: Path, contract: dict | None = None, *,
                       trust_features: bool = False) -> str | None:
        """Refuse features that break the checkpoint's contract, naming the folder and the count.

        Returns a warning when features of other weights are let through by ``trust_features``."""
        want = int(self.config["in_dim"])
        wrong = [i for i, f in zip(ids, features) if f.shape[1] != want]
        if wrong:
            raise FeatureError(f"{len(wrong)} of {len(ids)} feature file(s) are {features[ids.index(wrong[0])].shape[1]}-d "
                               f"(e.g. {wrong[0]}.npy) but {self.path.name} expects {want}-d", path=folder,
                               fix=f"extract them with --backbone {self.contract['backbone']}"
                               if self.contract.get("backbone") else "extract them with the backbone it was trained on")
        made_by = (contract or {}).get("backbone", {})
        self.check_contract(made_by.get("name"), (contract or {}).get("recipe", {}).get("name"), folder)
        return self.check_weights(made_by.get("weights"), folder, trust_features=trust_features,
                                  source=made_by.get("weights_source"))

    def to(self, device: torch.device | str) -> LoadedHead:
        self.model.to(device)
        return self


def _describe_weights(weights: str, source: dict | None) -> str:
    """Backbone weights in words: a registry name, or a checkpoint file by its sha256 (and path)."""
    from aqa_cli.weights import USER_PREFIX

    if not weights.startswith(USER_PREFIX):
        return f"the {weights} weights"
    where = f" ({source['path']})" if source and source.get("path") else ""
    return f"the checkpoint file with sha256 {weights[len(USER_PREFIX):][:12]}…{where}"


def save_head(path: str | Path, members: list[Head], metadata: dict[str, Any], *, half: bool = False) -> Path:
    """Write ``members`` (one head or an ensemble) with ``metadata``; ``half`` stores float16 tensors."""
    from aqa_cli.weights import save_safetensors

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for k, member in enumerate(members):
        for name, t in member.state_dict().items():
            t = t.detach().cpu()
            if half and t.is_floating_point():
                t = t.half()
            tensors[f"members.{k}.{name}"] = t.contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "head": members[0].name, "config": members[0].config.to_json(),
            "members": str(len(members)), "storage": "float16" if half else "float32", "aqa_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, meta)
    return path


def load_head(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedHead:
    """Load a head checkpoint written by :func:`save_head`, in eval mode, as float32."""
    from aqa_cli.weights import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise WeightsError("head checkpoint not found", path=path,
                           fix="give a .safetensors file written by `aqa train` (see weights/README.md)")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"not an aqa head checkpoint (format {meta.get('format')!r})", path=path,
                           fix="train one with `aqa train`, or import an official one with `aqa weights import`")
    check_head_metadata(meta, path)
    try:
        n = int(meta.get("members", "1"))
        members = []
        for k in range(n):
            head = create_head(meta["head"], json.loads(meta["config"]))
            prefix = f"members.{k}."
            state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            check_head_tensors(state, head.state_dict(), path)
            head.load_state_dict({name: t.float() if t.is_floating_point() else t for name, t in state.items()},
                                 strict=True)
            members.append(head.eval())
    except WeightsError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, AqaError) as exc:
        raise WeightsError(f"does not fit its recorded head ({' '.join(str(exc).split())[:160]})", path=path,
                           fix="re-train it or download it again") from None
    model = members[0] if n == 1 else HeadEnsemble(members)
    model.eval().requires_grad_(False).to(device)
    return LoadedHead(path=path, model=model, head=meta["head"], metadata=meta)


OFFICIAL_FORMATS = ("gdlt", "cofinal")


def import_official_head(path: str | Path, fmt: str, out: str | Path, *, score_max: float = 25.0,
                         target: str = "", **config_args: Any) -> Path:
    """An official GDLT or CoFInAl ``state_dict`` checkpoint → our head checkpoint.

    The file is read with ``torch.load(weights_only=True)``. Parameter names are the
    official ones, so the state loads unchanged; the scale defaults to the official
    normaliser (labels ÷ 25), so our score is the official output × 25.
    ``config_args`` passes what shapes cannot tell (e.g. CoFInAl's ``activation``).
    """
    from aqa_cli.weights import load_torch_checkpoint

    path = Path(path)
    if fmt not in OFFICIAL_FORMATS:
        raise WeightsError(f"unknown head format {fmt!r}", path=path, fix=f"use one of: {', '.join(OFFICIAL_FORMATS)}")
    state = load_torch_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError("does not hold a state dict of tensors", path=path,
                           fix=f"pass the .pkl/.pth that the official {fmt} code saved with torch.save")
    if fmt == "gdlt":
        from aqa_cli.heads import gdlt as module
    else:
        from aqa_cli.heads import cofinal as module
    try:
        config = module.config_from_official(state, score_max=score_max, **config_args)
        head = create_head(fmt, config)
        missing, unexpected = head.load_state_dict(module.state_dict_from_official(state), strict=False)
    except (KeyError, IndexError, ValueError, RuntimeError, AqaError) as exc:
        raise WeightsError(f"is not an official {fmt} checkpoint ({' '.join(str(exc).split())[:160]})", path=path,
                           fix=f"pass a checkpoint saved by the official {fmt} repository") from None
    if missing or unexpected:
        names = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        raise WeightsError(f"keys do not match the official {fmt} model: {', '.join(names)}"
                           f"{' …' if len(missing) + len(unexpected) > 6 else ''}", path=path,
                           fix=f"pass a checkpoint saved by the official {fmt} repository")
    from aqa_cli.fileio import sha256_file

    meta = {"target": target, "source": str(path.name), "source_sha256": sha256_file(path),
            "source_format": fmt, "scale": {"score_min": config.score_min, "score_max": config.score_max},
            "contract": {"backbone": "vst", "feature_dim": config.in_dim}}
    return save_head(out, [head.eval()], meta)


def shipped_dir() -> Path:
    """The folder the trained heads ship in: the checkout's ``weights/``, or the installed package ``aqa_weights``.

    A source checkout (``pyproject.toml`` beside ``aqa_cli/``) reads its own ``weights/``, so a working tree never
    scores with another tree's heads; an installed wheel reads the copy installed with it (pyproject.toml maps
    ``weights/`` onto ``aqa_weights``). ``AQA_WEIGHTS_DIR`` points it elsewhere (tests and private deployments
    decide there what "shipped" means).
    """
    override = os.environ.get("AQA_WEIGHTS_DIR")
    if override:
        return Path(override)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "weights").is_dir():
        return root / "weights"
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("aqa_weights")))
    except ModuleNotFoundError:  # an install without its heads: the error that follows names this folder
        return root / "weights"


def shipped_heads() -> list[LoadedHead]:
    """The trained heads in ``weights/`` (those that load; a damaged one is skipped here and refused when used)."""
    found = []
    for path in sorted(shipped_dir().glob("*.safetensors")):
        try:
            found.append(load_head(path))
        except AqaError:
            continue
    return found
