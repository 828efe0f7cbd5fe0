"""Presets: one TOML file per dataset target, holding its score scale, training crop and, for each
head, the papers' hyper-parameters. Data, not code: ``list_presets()`` reads this folder."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aqa_cli.errors import AqaError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    target: str
    description: str
    unit: str
    score_min: float
    score_max: float
    train_clips: int  # consecutive clips per training crop; 0 = whole sequences
    feature_dim: int
    backbone: str
    heads: dict[str, Any] = field(default_factory=dict)
    # A preset for a demonstration model (synthetic data, not a real sport): true, or a note to show with scores.
    demonstration: bool | str = False
    # A preset that sums other presets' scores (fisv: TES + PCS): their names. It scores with their heads and
    # adds the total; it has no heads of its own to train.
    combine: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def demonstration_note(self) -> str | None:
        if not self.demonstration:
            return None
        from aqa_cli.heads.checkpoint import DEMONSTRATION_NOTE

        return self.demonstration if isinstance(self.demonstration, str) else DEMONSTRATION_NOTE

    def train_settings(self, head: str) -> dict[str, Any]:
        return dict(self.heads.get(head, {}).get("train", {}))

    def model_settings(self, head: str) -> dict[str, Any]:
        """The head's config values, with the preset's scale and feature size."""
        model = dict(self.heads.get(head, {}).get("model", {}))
        model.update(score_min=self.score_min, score_max=self.score_max, in_dim=self.feature_dim)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dataset": self.dataset, "target": self.target, "unit": self.unit,
                "score_min": self.score_min, "score_max": self.score_max, "train_clips": self.train_clips,
                "feature_dim": self.feature_dim, "backbone": self.backbone}


def list_presets() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load_preset(name: str) -> Preset:
    """The preset called ``name``: a name from :func:`list_presets`, never a path."""
    from aqa_cli.validation import check_preset_name

    check_preset_name(name)
    path = HERE / f"{name}.toml"
    if name not in list_presets() or not path.is_file():
        raise AqaError(f"unknown preset {name!r}", fix=f"choose one of: {', '.join(list_presets())}")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    known = {f for f in Preset.__dataclass_fields__ if f not in ("path",)}
    return Preset(**{k: v for k, v in data.items() if k in known}, path=path)
