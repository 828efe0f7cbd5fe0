"""The trained heads in weights/: their metadata, and their cross-validation figures reproduced from the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aqa_cli.dataset import load_feature_set
from aqa_cli.heads import head_class
from aqa_cli.heads.checkpoint import load_head, shipped_dir
from aqa_cli.metrics import report, spearman
from aqa_cli.training import fold_assignment, predict

SHIPPED = sorted(shipped_dir().glob("fisv-*.safetensors"))


def test_weights_folder_stays_small():
    total = sum(p.stat().st_size for p in shipped_dir().glob("*") if p.is_file())
    assert total < 120e6, f"weights/ holds {total / 1e6:.0f} MB, over the 120 MB budget"


def test_every_fisv_target_and_head_ships():
    assert {p.stem for p in SHIPPED} == {f"fisv-{t}-{h}" for t in ("tes", "pcs")
                                         for h in ("gdlt", "cofinal", "interp", "additive")}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_head_reproduces_its_log(path, shared):
    """A shipped head is the model its training log describes: a fold ensemble's fold models give, on the videos
    each never saw, the ρ its metadata records; a single model gives its log's in-sample figures."""
    loaded = load_head(path)
    meta = loaded.metadata
    cv = json.loads(meta["cv"])
    contract = json.loads(meta["contract"])
    # Newer files also name the backbone's weights (None: the backbone's own, any release of them).
    assert {k: v for k, v in contract.items() if v is not None} == {"backbone": "vst", "feature_dim": 1024}
    assert contract["recipe"] is None
    assert meta["preset"] == path.stem.rsplit("-", 1)[0] and meta["target"] in ("TES", "PCS")
    data = load_feature_set(shared / "data" / "fisv" / "features", shared / "data" / "fisv" / "train.csv",
                            meta["target"])
    columns = head_class(loaded.head).label_columns(head_class(loaded.head).config_class.from_dict(loaded.config))
    assert data.fingerprint(columns) == meta["data_sha256"], "trained on other data than ../shared/data/fisv"
    assert cv["folds"] == 5 and len(cv["fold_spearman"]) == 5 * cv.get("repeats", 1)
    if meta.get("final") != "folds":
        log = json.loads(path.with_suffix(".log.json").read_text())
        assert log["cv"] == cv and log["data_sha256"] == meta["data_sha256"]
        fit = report(predict(loaded.model, data.features), data.targets)
        # float16 storage moves scores by < 1e-2 points.
        assert fit["spearman"] == pytest.approx(log["train_fit"]["spearman"], abs=0.005)
        assert fit["mae"] == pytest.approx(log["train_fit"]["mae"], abs=0.02)
        return
    members = list(loaded.model.members)
    assign = fold_assignment(data.targets, cv["folds"], int(meta["seed"]))
    for k, member in enumerate(members):
        held_out = data.subset(np.flatnonzero(assign == k))
        rho = spearman(predict(member, held_out.features), held_out.targets)
        # float16 storage moves scores by < 1e-2 points; ρ by at most a rank swap or two.
        assert rho == pytest.approx(cv["fold_spearman"][k], abs=0.01), f"fold {k + 1}"


@pytest.mark.parametrize("target", ["tes", "pcs"])
def test_a_faithful_head_ships_for_each_target(target, shared):
    """The clip-additive head's explanation is true: its held-out faithfulness (recorded by cross-validation) is
    at least 0.9, and the file reproduces that on held-out videos of its own fold models."""
    from aqa_cli.effects import explanation_report

    path = shipped_dir() / f"fisv-{target}-additive.safetensors"
    loaded = load_head(path)
    cv = json.loads(loaded.metadata["cv"])
    assert cv["explanation"]["faithfulness"] >= 0.9
    data = load_feature_set(shared / "data" / "fisv" / "features", shared / "data" / "fisv" / "train.csv",
                            loaded.metadata["target"])
    assign = fold_assignment(data.targets, cv["folds"], int(loaded.metadata["seed"]))
    member = loaded.model.members[0]
    held_out = [data.features[i] for i in np.flatnonzero(assign == 0)[:10]]
    assert explanation_report(member, held_out, 50.0)["faithfulness"] >= 0.9


def test_each_fisv_preset_scores_with_a_faithful_head_no_less_accurate_than_the_best_within_noise():
    """The default head: the most accurate by CV ρ unless a faithful head is within the noise of it (the larger
    CV standard error); on the shipped Fis-V heads that is the faithful additive head for both targets."""
    from aqa_cli.scoring import FAITHFUL_HEAD_RHO, choose_heads, shipped_heads_for

    for preset in ("fisv-tes", "fisv-pcs"):
        candidates = shipped_heads_for(preset)
        chosen = choose_heads(preset).heads[0]
        assert chosen.head == "additive" and chosen.faithfulness[0] >= FAITHFUL_HEAD_RHO
        best = candidates[0]
        assert best.cv_spearman - chosen.cv_spearman <= max(best.cv_se, chosen.cv_se)


def test_the_default_head_rule_prefers_the_faithful_head_only_within_noise():
    from aqa_cli.heads.checkpoint import LoadedHead
    from aqa_cli.scoring import default_head

    def head(name: str, rho: float, se: float, faith: float | None) -> LoadedHead:
        cv = {"mean_spearman": rho, "se_spearman": se, "folds": 5}
        if faith is not None:
            cv["explanation"] = {"faithfulness": faith}
        return LoadedHead(path=Path(f"{name}.safetensors"), model=None, head=name, metadata={"cv": json.dumps(cv)})

    accurate, faithful = head("cofinal", 0.775, 0.016, 0.39), head("additive", 0.772, 0.008, 0.999)
    assert default_head([accurate, faithful]) is faithful  # 0.003 apart, within 0.016
    far = head("additive", 0.750, 0.008, 0.999)
    assert default_head([accurate, far]) is accurate  # 0.025 apart: beyond the noise, accuracy wins
    unfaithful = head("interp", 0.772, 0.008, 0.5)
    assert default_head([accurate, unfaithful]) is accurate  # only a faithful head may take its place
