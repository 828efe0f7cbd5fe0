"""What every scoring head promises: shapes, masks, the exact per-clip decomposition, determinism,
a planted penalty found in the right clip, checkpoints that round-trip, and clear bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.heads import create_head, list_heads
from aqa_cli.heads.checkpoint import HeadEnsemble, load_head, save_head
from conftest import assert_close_across_instances, assert_same_model

# Small configs: the same code paths as the published sizes, fast on a CPU.
SMALL = {
    "gdlt": {"in_dim": 16, "hidden_dim": 16, "dropout": 0.0, "score_min": 0.0, "score_max": 20.0},
    "cofinal": {"in_dim": 16, "hidden_dim": 16, "n_subgrades": 8, "fine_heads": 4, "dropout": 0.0,
                "score_min": 0.0, "score_max": 20.0},
    "interp": {"in_dim": 16, "hidden_dim": 16, "dropout": 0.0, "score_min": 0.0, "score_max": 20.0},
    "additive": {"in_dim": 16, "hidden_dim": 16, "dropout": 0.0, "score_min": 0.0, "score_max": 20.0},
}


def small_head(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_head(name, dict(SMALL[name])).eval()


def batch(lengths: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        x[i, n:] = 1e3  # garbage in padding must not matter
    return x, mask


def test_registry_lists_the_heads():
    assert set(list_heads()) >= {"gdlt", "cofinal", "interp", "additive"}
    assert set(SMALL) <= set(list_heads())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_masks_and_exact_decomposition(name):
    head = small_head(name)
    x, mask = batch([12, 7, 9])
    with torch.no_grad():
        out = head(x, mask)
    assert out.score.shape == (3,)
    assert out.weights.shape == out.clip_scores.shape == (3, 12)
    assert torch.all(out.weights >= 0)
    assert torch.all(out.weights[~mask] == 0), "padded clips must get zero weight"
    torch.testing.assert_close(out.weights.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    recon = (out.weights * out.clip_scores).sum(1) + out.additive_total()
    torch.testing.assert_close(recon, out.score, atol=1e-5, rtol=0)
    assert torch.isfinite(out.score).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_equals_single_and_is_deterministic(name):
    head = small_head(name)
    x, mask = batch([12, 7, 9])
    with torch.no_grad():
        out = head(x, mask)
        again = head(x, mask)
        for i, n in enumerate([12, 7, 9]):
            alone = head(x[i:i + 1, :n])
            torch.testing.assert_close(alone.score, out.score[i:i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.weights[0], out.weights[i, :n], atol=1e-5, rtol=0)
    assert torch.equal(out.score, again.score)  # the same instance twice: bitwise
    # A fresh head from the same seed is the same head: the same parameters bit for bit, and (another instance)
    # the same scores within the cross-instance tolerance.
    twin = small_head(name)
    assert_same_model(twin, head)
    with torch.no_grad():
        assert_close_across_instances(twin(x, mask).score, out.score)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrong_feature_size_is_refused(name):
    head = small_head(name)
    with pytest.raises(AqaError, match=r"\[B, T, 16\]"):
        head(torch.randn(1, 5, 32))


def planted(n: int, clips: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Videos whose score is 16 minus 8 for a fall; the fall is one clip marked along feature 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, clips, dim)).astype(np.float32)
    x[:, :, 0] = -2.0
    fall_at = np.full(n, -1)
    has_fall = rng.random(n) < 0.5
    for i in np.flatnonzero(has_fall):
        fall_at[i] = rng.integers(clips)
        x[i, fall_at[i], 0] = 4.0
    y = 16.0 - 8.0 * has_fall + rng.normal(0, 0.2, n)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)), fall_at


# An open finding, kept as strict xfails (an unexpected pass fails the run, so the day a head learns to
# localise, the marker must go). GDLT and CoFInAl explain a score through the grade queries' cross-attention;
# their encoder (and CoFInAl's procedure fusion) spreads the fall over every clip before the grades read it,
# so the attention need not point at it. The interpretable head's query t is tied to clip t only by its
# position encoding, and nothing makes query t attend to clip t (its local_window = 0 option does, and passes). Measured (this test; 1000 steps changes
# nothing): the fall clip had the lowest clip score in 0% (GDLT), 28% (CoFInAl) and 11% (interp) of falls,
# against 12.5% by chance, while every head predicted the score itself with r > 0.98.
NOT_LOCALISED = pytest.mark.xfail(strict=True, reason="per-clip scores do not (yet) localise a planted penalty")


@pytest.mark.parametrize("name, extra", [
    pytest.param("cofinal", {}, marks=NOT_LOCALISED),
    pytest.param("gdlt", {}, marks=NOT_LOCALISED),
    pytest.param("interp", {}, marks=NOT_LOCALISED),
    # Query t reads clip t alone (local_window 0): its weight and score are that clip's.
    pytest.param("interp", {"local_window": 0}, id="interp-local"),
    # The clip-additive head, as shipped for Fis-V (each clip alone) and with ±2 clips of context.
    pytest.param("additive", {"dropout": 0.5}, id="additive-shipped"),
    pytest.param("additive", {"context": 2}, id="additive-context2"),
])
def test_planted_penalty_lands_in_its_clip(name, extra):
    """One clip carries the penalty; after training, that clip's own score must be the video's lowest."""
    torch.manual_seed(0)
    head = create_head(name, {**SMALL[name], **extra})
    x, y, fall_at = planted(64, 8, 16, seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    for step in range(300):
        idx = torch.randperm(len(x))[:32]
        loss, _ = head.loss(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    xt, yt, fall_t = planted(40, 8, 16, seed=2)
    with torch.no_grad():
        out = head(xt)
    pred = out.score.numpy()
    assert np.corrcoef(pred, yt.numpy())[0, 1] > 0.9, "the head did not learn the planted score"
    falls = np.flatnonzero(fall_t >= 0)
    lowest = out.clip_scores.numpy()[falls].argmin(axis=1)
    hit_rate = float(np.mean(lowest == fall_t[falls]))
    # The shipped configurations must put the penalty in its own clip in at least 90% of falls.
    need = 0.9 if name == "additive" else 0.8
    assert hit_rate >= need, f"the fall clip had the lowest clip score in only {hit_rate:.0%} of falls"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpoint_round_trip(tmp_path, name):
    heads = [small_head(name, seed=s) for s in (0, 1)]
    x, mask = batch([10, 6])
    single = save_head(tmp_path / "one.safetensors", heads[:1], {"target": "TES", "contract": {"backbone": "vst"}})
    loaded = load_head(single)
    assert loaded.head == name and loaded.target == "TES" and loaded.contract == {"backbone": "vst"}
    assert_same_model(loaded.model, heads[0])  # float32 checkpoints keep every bit
    with torch.no_grad():  # a frozen loaded head runs other kernels than the trainable original: a tolerance
        assert_close_across_instances(loaded.model(x, mask).score, heads[0](x, mask).score)
    # An ensemble, stored in float16: scores are the members' mean, and its explanation still adds up.
    both = load_head(save_head(tmp_path / "two.safetensors", heads, {"target": "TES"}, half=True))
    assert isinstance(both.model, HeadEnsemble) and both.members == 2
    with torch.no_grad():
        out = both.model(x, mask)
        want = torch.stack([h(x, mask).score for h in heads]).mean(0)
    torch.testing.assert_close(out.score, want, atol=2e-2, rtol=0)
    torch.testing.assert_close((out.weights * out.clip_scores).sum(1) + out.additive_total(), out.score,
                               atol=1e-5, rtol=0)
    assert torch.all(out.weights[~mask] == 0)


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_head(bad)
    with pytest.raises(WeightsError, match="not found"):
        load_head(tmp_path / "missing.safetensors")
    from aqa_cli.weights import save_safetensors

    foreign = tmp_path / "foreign.safetensors"
    save_safetensors({"w": torch.zeros(2)}, foreign, {"format": "something-else"})
    with pytest.raises(WeightsError, match="not an aqa head checkpoint"):
        load_head(foreign)


# ---------------------------------------------------------------- the shared transformer pieces against torch's own


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("queries", [3, 40])  # 3 over 40 keys: the folded projections; 40: the plain ones
def test_attention_with_map_is_torchs_multihead_attention(heads, queries):
    from aqa_cli.heads.layers import attention_with_map

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, heads, batch_first=True).eval()
    q, memory = torch.randn(2, queries, 64), torch.randn(2, 40, 64)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 25:] = True
    causal = torch.rand(queries, 40) > 0.8
    causal[:, 0] = False
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}):
        with torch.no_grad():
            want, want_map = mha(q, memory, memory, need_weights=True, average_attn_weights=True, **kwargs)
            got, got_map = attention_with_map(mha, q, memory, memory, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_map, want_map, atol=1e-6, rtol=1e-5)
    # Gradients flow through either form the same way (training uses it too).
    mha.train()
    mha.dropout = 0.0
    grads = []
    for output in (lambda: mha(q, memory, memory, key_padding_mask=pad)[0],
                   lambda: attention_with_map(mha, q, memory, memory, key_padding_mask=pad)[0]):
        mha.zero_grad()
        output().square().sum().backward()
        grads.append(torch.cat([mha.in_proj_weight.grad.flatten(), mha.out_proj.weight.grad.flatten()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads", [1, 4])
def test_clip_encoder_is_torchs_transformer_encoder(heads):
    from aqa_cli.heads.layers import encoder

    torch.manual_seed(0)
    enc = encoder(64, heads, 2, 192, 0.0).eval()
    x = torch.randn(3, 17, 64)
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[1, 10:] = True
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pad}):
            want = torch.nn.TransformerEncoder.forward(enc, x, **kwargs)
            got = enc(x, **kwargs)
            real = ~pad if kwargs else torch.ones_like(pad)
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
            if heads == 1:  # torch's path for an odd head count is the same arithmetic, bit for bit
                assert torch.equal(got[real], want[real])
        projected = enc.project_first(x)
        assert projected.shape == (3, 17, 4 * 64)
        assert torch.equal(enc.forward_projected(projected, pad), enc(x, src_key_padding_mask=pad))
