"""The trained heads in weights/: their metadata, and their cross-validation figures reproduced from the files."""

from __future__ import annotations

import json

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
    assert contract == {"backbone": "vst", "feature_dim": 1024, "recipe": None}
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
