"""The interpretable weight–score head: fixed queries, exact Σ w·s decomposition, masking, attention KL."""

from __future__ import annotations

import pytest
import torch

from aqa_cli.errors import AqaError
from aqa_cli.heads import HeadConfig
from aqa_cli.heads.interp import InterpConfig, InterpHead, attention_kl, sinusoidal_positions
from conftest import assert_close_across_instances, assert_same_model


SMALL = {"in_dim": 32, "hidden_dim": 32, "n_head": 4, "ffn_dim": 64, "score_min": 10.0, "score_max": 50.0}


def small_head(seed: int = 0, **overrides) -> InterpHead:
    torch.manual_seed(seed)
    return InterpHead(InterpConfig(**{**SMALL, **overrides}))


def trained_eval_head() -> InterpHead:
    """A small head whose BatchNorm running statistics are not the identity, in eval mode."""
    head = small_head()
    head.train()
    with torch.no_grad():
        head(torch.randn(4, 12, 32) * 2 + 0.5)
    return head.eval()


def padded(videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(v.shape[0] for v in videos)
    feats = torch.zeros(len(videos), length, videos[0].shape[1])
    mask = torch.zeros(len(videos), length, dtype=torch.bool)
    for i, v in enumerate(videos):
        feats[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return feats, mask


# ----------------------------------------------------------------------------------------------- config


def test_defaults_are_the_fisv_settings():
    c = InterpConfig()
    assert isinstance(c, HeadConfig)
    assert (c.in_dim, c.n_head, c.n_decoder, c.ffn_dim) == (1024, 4, 2, 1024)
    assert c.query_std == 5.0
    assert c.attention_weight == 1.0
    assert InterpHead.name == "interp" and InterpHead.config_class is InterpConfig
    assert InterpConfig.from_dict({"query_std": 2.0}).query_std == 2.0
    with pytest.raises(AqaError, match="unknown InterpConfig settings"):
        InterpConfig.from_dict({"query_variance": 2.0})


def test_default_config_forward_shapes():
    head = InterpHead(InterpConfig(score_min=0.0, score_max=45.0)).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 9, 1024))
    assert out.score.shape == (2,) and out.weights.shape == (2, 9) and out.clip_scores.shape == (2, 9)
    assert out.extras["self_attention"].shape == (2, 2, 9, 9)
    assert out.extras["cross_attention"].shape == (2, 2, 9, 9)


# ---------------------------------------------------------------------------------------------- queries


def test_queries_are_drawn_once_with_the_configured_spread():
    head = small_head(query_std=5.0, max_queries=512)
    content = head.query_content
    assert content.shape == (512, 32)
    assert not content.requires_grad
    # 16384 draws: the sample std of N(0, 25) is within 2 % of 5 with overwhelming probability.
    assert content.std().item() == pytest.approx(5.0, rel=0.02)
    assert content.var().item() == pytest.approx(25.0, rel=0.04)
    assert content.mean().abs().item() < 0.15
    # Saved in checkpoints, and a pure function of query_seed.
    assert torch.equal(head.state_dict()["query_content"], content)
    assert torch.equal(small_head(seed=123).query_content, content)
    assert not torch.equal(small_head(query_seed=1).query_content, content)
    assert small_head(query_std=2.0).query_content.std().item() == pytest.approx(2.0, rel=0.02)


def test_queries_survive_a_checkpoint_round_trip():
    head = small_head(query_seed=7)
    state = head.state_dict()
    other = small_head(query_seed=8)
    other.load_state_dict(state)
    assert torch.equal(other.query_content, head.query_content)
    assert_same_model(other, head)
    head.eval(), other.eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():  # two instances: equal within the cross-instance tolerance
        assert_close_across_instances(other(x).score, head(x).score)


def test_queries_are_not_redrawn_or_trained():
    head = small_head()
    before = head.query_content.clone()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    head.train()
    for _ in range(3):
        out = head(torch.randn(3, 8, 32))
        loss, _ = head.loss(out, torch.tensor([20.0, 30.0, 40.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(head.query_content, before)
    assert "query_content" not in dict(head.named_parameters())


def test_number_of_queries_follows_the_clip_count():
    head = small_head(max_queries=8).eval()
    for length in (1, 5, 8, 13):  # 13 > max_queries: content rows wrap, positions do not
        with torch.no_grad():
            out = head(torch.randn(1, length, 32))
        assert out.extras["self_attention"].shape == (1, 2, length, length)
        assert out.extras["cross_attention"].shape == (1, 2, length, length)
        assert out.weights.shape == (1, length)
    q = head.queries(13)
    assert torch.allclose(q[9] - sinusoidal_positions(13, 32)[9], head.query_content[1], atol=1e-6)
    assert not torch.allclose(q[9], q[1])


def test_sinusoidal_positions():
    pe = sinusoidal_positions(6, 8)
    assert torch.allclose(pe[0, 0::2], torch.zeros(4)) and torch.allclose(pe[0, 1::2], torch.ones(4))
    assert pe[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0)).item())
    assert sinusoidal_positions(4, 7).shape == (4, 7)  # odd widths work


# ---------------------------------------------------------------------------------------- decomposition


def test_weighted_sum_is_the_score_and_padding_gets_nothing():
    head = trained_eval_head()
    feats, mask = padded([torch.randn(n, 32) for n in (3, 11, 7, 11)])
    with torch.no_grad():
        out = head(feats, mask)
    assert torch.allclose((out.weights * out.clip_scores).sum(1), out.score, atol=1e-5)
    assert torch.allclose(out.weights.sum(1), torch.ones(4), atol=1e-6)
    assert (out.weights >= 0).all()
    assert (out.weights[~mask] == 0).all() and (out.clip_scores[~mask] == 0).all()
    assert (out.weights[mask] > 0).all()
    assert out.additive == {}
    for key in ("self_attention", "cross_attention"):
        maps = out.extras[key]
        rows = maps.sum(-1)  # [B, L, T]
        real_rows = mask.unsqueeze(1).expand_as(rows)
        assert torch.allclose(rows[real_rows], torch.ones(()), atol=1e-5)
        assert (rows[~real_rows] == 0).all()
        # Padded keys get nothing either.
        assert (maps.transpose(-1, -2)[~real_rows] == 0).all()


def test_clip_scores_are_on_the_preset_scale():
    head = trained_eval_head()
    with torch.no_grad():
        unit = head.score_mlp(torch.zeros(1, 32)).squeeze()
    assert head.denormalise(unit).item() == pytest.approx(10.0 + 40.0 * unit.item())
    with torch.no_grad():
        out = head(torch.randn(2, 5, 32))
    # Scores live near the middle of [10, 50] at initialisation rather than near [0, 1].
    assert (out.score > 5.0).all() and (out.score < 55.0).all()


def test_padded_batch_matches_each_video_alone():
    head = trained_eval_head()
    videos = [torch.randn(n, 32) for n in (4, 12, 9, 12, 1)]
    feats, mask = padded(videos)
    with torch.no_grad():
        batch = head(feats, mask)
        for i, v in enumerate(videos):
            alone = head(v.unsqueeze(0))
            n = v.shape[0]
            assert batch.score[i].item() == pytest.approx(alone.score.item(), abs=1e-5)
            assert torch.allclose(batch.weights[i, :n], alone.weights[0], atol=1e-6)
            assert torch.allclose(batch.clip_scores[i, :n], alone.clip_scores[0], atol=1e-5)
            assert torch.allclose(batch.extras["cross_attention"][i, :, :n, :n], alone.extras["cross_attention"][0],
                                  atol=1e-6)


def test_a_mask_with_holes_scores_the_real_clips_in_order():
    head = trained_eval_head()
    video = torch.randn(6, 32)
    feats = torch.randn(1, 9, 32) * 100  # junk in the padded slots
    real = torch.tensor([0, 2, 3, 5, 6, 8])
    feats[0, real] = video
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, real] = True
    with torch.no_grad():
        holes = head(feats, mask)
        compact = head(video.unsqueeze(0))
    assert holes.score.item() == pytest.approx(compact.score.item(), abs=1e-5)
    assert torch.allclose(holes.weights[0, real], compact.weights[0], atol=1e-6)
    assert (holes.weights[0, ~mask[0]] == 0).all()
    assert torch.allclose(holes.extras["self_attention"][0][:, real][:, :, real], compact.extras["self_attention"][0],
                          atol=1e-6)


def test_inference_is_deterministic():
    head = trained_eval_head()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        a, b = head(x), head(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.weights, b.weights)
    # The same seed builds the same model.
    h1, h2 = small_head(seed=3).eval(), small_head(seed=3).eval()
    assert_same_model(h1, h2)
    with torch.no_grad():
        assert_close_across_instances(h1(x).score, h2(x).score)


# ------------------------------------------------------------------------------------------------- loss


def test_attention_kl_is_zero_for_equal_maps():
    maps = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    assert attention_kl(maps, maps.clone()).item() == 0.0
    # Zeros in both maps (padded keys) are fine.
    maps[..., -1] = 0
    maps = maps / maps.sum(-1, keepdim=True)
    assert attention_kl(maps, maps.clone()).item() == 0.0


def test_attention_kl_is_positive_and_matches_the_definition():
    self_maps = torch.softmax(torch.randn(2, 2, 4, 4), dim=-1)
    cross_maps = torch.softmax(torch.randn(2, 2, 4, 4), dim=-1)
    kl = attention_kl(self_maps, cross_maps)
    assert kl.item() > 0
    per_row = (cross_maps * (cross_maps.log() - self_maps.log())).sum(-1)  # [B, L, Q]
    assert kl.item() == pytest.approx(per_row.mean(dim=(0, 2)).sum().item(), rel=1e-5)
    # Padded rows do not count.
    row_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    expected = sum(per_row[b, :, row_mask[b]].sum(-1) for b in range(2)) / row_mask.sum()
    assert attention_kl(self_maps, cross_maps, row_mask).item() == pytest.approx(expected.sum().item(), rel=1e-5)
    with pytest.raises(ValueError):
        attention_kl(self_maps, cross_maps[..., :3])


def test_attention_kl_stays_finite_when_the_self_map_has_zeros():
    self_maps = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], requires_grad=True)
    cross_maps = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]], requires_grad=True)
    kl = attention_kl(self_maps, cross_maps)
    kl.backward()
    assert torch.isfinite(kl) and kl.item() > 10
    assert torch.isfinite(self_maps.grad).all() and torch.isfinite(cross_maps.grad).all()


def test_loss_components_and_a_few_steps_reduce_it():
    torch.manual_seed(0)
    head = small_head(dropout=0.0)
    feats, mask = padded([torch.randn(n, 32) for n in (6, 8, 5, 8, 7, 8, 4, 8)])
    target = 10.0 + 40.0 * torch.rand(8)
    head.train()
    total, parts = head.loss(head(feats, mask), target)
    assert torch.isfinite(total)
    assert set(parts) == {"mse", "attention_kl"}
    assert parts["attention_kl"] > 0
    assert total.item() == pytest.approx(parts["mse"] + head.config.attention_weight * parts["attention_kl"], rel=1e-5)
    first = total.item()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(25):
        total, parts = head.loss(head(feats, mask), target)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert total.item() < 0.5 * first


def test_attention_weight_scales_the_kl_term():
    head = small_head(attention_weight=0.0)
    out = head(torch.randn(2, 6, 32))
    total, parts = head.loss(out, torch.tensor([20.0, 30.0]))
    assert total.item() == pytest.approx(parts["mse"], rel=1e-6)


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_feature_dim_is_a_clear_error():
    head = small_head()
    with pytest.raises(AqaError) as info:
        head(torch.randn(1, 5, 48))
    msg = str(info.value)
    assert "\n" not in msg and "[B, T, 32]" in msg and "(1, 5, 48)" in msg


def test_bad_mask_is_a_clear_error():
    head = small_head()
    with pytest.raises(AqaError, match="mask of shape"):
        head(torch.randn(1, 5, 32), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(AqaError, match="no real clip"):
        head(torch.randn(2, 5, 32), torch.tensor([[True] * 5, [False] * 5]))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        InterpHead(InterpConfig(**{**SMALL, "hidden_dim": 30}))
    with pytest.raises(ValueError):
        InterpHead(InterpConfig(**{**SMALL, "query_std": 0.0}))


def test_local_window_reads_only_nearby_clips_and_pads_cleanly():
    from aqa_cli.heads import create_head
    from test_heads import SMALL, batch

    torch.manual_seed(0)
    head = create_head("interp", {**SMALL["interp"], "local_window": 1}).eval()
    x, mask = batch([12, 7, 9])
    with torch.no_grad():
        out = head(x, mask)
        alone = head(x[1:2, :7], mask[1:2, :7])
    cross = out.extras["cross_attention"][:, :, :7, :7]
    far = (torch.arange(7)[:, None] - torch.arange(7)[None, :]).abs() > 1
    assert torch.all(cross[1][:, far] == 0), "query t read a clip outside t ± 1"
    torch.testing.assert_close(out.score[1:2], alone.score, atol=1e-5, rtol=0)
    recon = (out.weights * out.clip_scores).sum(1)
    torch.testing.assert_close(recon, out.score, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="local_window"):
        create_head("interp", {**SMALL["interp"], "local_window": -1})
