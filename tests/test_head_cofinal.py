"""The CoFInAl head: its fixed ETF, the exact score decomposition, masks, the loss, and
equivalence with the official model on a random official-shaped state dict (CPU, seconds)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from aqa_cli.errors import AqaError
from conftest import assert_close_across_instances, assert_same_model
from aqa_cli.heads.cofinal import (
    CoFInAl,
    CoFInAlConfig,
    config_from_official,
    graph_regularisation,
    official_grade_values,
    simplex_etf,
    state_dict_from_official,
)


# Small enough for milliseconds; the paper's structure (P procedures, paper fine head) otherwise.
SMALL = {"in_dim": 64, "hidden_dim": 32, "n_head": 2, "n_subgrades": 16, "score_max": 25.0, "dropout": 0.0}
# The official forward: no procedure pooling, reverted head, regi + regressori fine head.
SMALL_OFFICIAL = dict(SMALL, n_procedures=0, revert_head=True, fine_head="official", fine_hidden=24,
                      coarse_step=0.01, grade_values=(-1.0, -0.8, 0.8, 1.0), revert_values=(1.0, 0.8, -0.8, -1.0))


def make(settings: dict, seed: int = 0) -> CoFInAl:
    torch.manual_seed(seed)
    return CoFInAl(CoFInAlConfig(**settings)).eval()


def padded(lengths: list[int], dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    mask = torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    # Padding holds garbage, not zeros: nothing of it may leak into a score.
    x = torch.where(mask.unsqueeze(-1), x, 100 * torch.randn(x.shape, generator=g))
    return x, mask


# ------------------------------------------------------------------------------------------------------- ETF

@pytest.mark.parametrize("dim,k", [(32, 16), (100, 100), (256, 100), (5, 2)])
def test_etf_is_a_simplex_frame(dim, k):
    e = simplex_etf(dim, k).double()
    gram = e.T @ e
    assert e.shape == (dim, k)
    assert torch.allclose(gram.diagonal(), torch.ones(k, dtype=e.dtype), atol=1e-6)  # equal (unit) norms
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-6)
    assert torch.equal(simplex_etf(dim, k), simplex_etf(dim, k))  # deterministic
    assert not torch.equal(simplex_etf(dim, k, seed=1), simplex_etf(dim, k))  # the seed is the rotation


def test_etf_too_few_dimensions_is_refused():
    with pytest.raises(AqaError):
        simplex_etf(8, 16)
    with pytest.raises(AqaError, match="simplex ETF"):
        CoFInAlConfig(hidden_dim=32, n_head=1, n_subgrades=64)


@pytest.mark.parametrize("settings", [SMALL, SMALL_OFFICIAL], ids=["paper", "official"])
def test_etf_is_a_fixed_buffer(settings):
    model = make(settings)
    assert "etf_vec1" in dict(model.named_buffers()) and "etf_vec1" in model.state_dict()
    assert all(p is not model.etf_vec1 for p in model.parameters())
    assert not model.etf_vec1.requires_grad
    assert torch.equal(make(settings, seed=5).etf_vec1, model.etf_vec1)  # same config, same frame
    before = model.etf_vec1.clone()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    x, mask = padded([12, 9], settings["in_dim"])
    for _ in range(2):
        total, _ = model.loss(model(x, mask), torch.tensor([10.0, 20.0]))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert torch.equal(model.etf_vec1, before)


# ------------------------------------------------------------------------------------- decomposition and masks

@pytest.mark.parametrize("settings", [SMALL, SMALL_OFFICIAL], ids=["paper", "official"])
def test_score_decomposes_exactly_over_the_clips(settings):
    model = make(settings)
    x, mask = padded([20, 7, 13], settings["in_dim"])
    with torch.no_grad():
        out = model(x, mask)
    coarse = (out.weights * out.clip_scores).sum(dim=1)
    assert torch.allclose(coarse + out.additive["fine"], out.score, atol=1e-5)
    assert torch.allclose(coarse, out.extras["coarse_score"], atol=1e-5)
    # the coarse score is Σ_g p_g·v_g with the reported grade probabilities and values
    expected = (out.extras["grade_probs"] * out.extras["grade_values"]).sum(dim=1)
    assert torch.allclose(coarse, expected, atol=1e-5)
    assert torch.allclose(out.extras["grade_probs"].sum(dim=1), torch.ones(3), atol=1e-6)
    assert (out.weights >= 0).all()
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(out.weights[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(out.clip_scores[~mask], torch.zeros(int((~mask).sum())))
    # the fine term is the sub-grade's step on the preset scale
    step = model.config.step_fine * model.config.score_span
    assert torch.allclose(out.additive["fine"], out.extras["subgrade"].float() * step, atol=1e-6)
    attn = out.extras["clip_attention"]
    assert torch.allclose(attn.sum(dim=-1), torch.ones(attn.shape[:2]), atol=1e-5)
    assert torch.equal(attn.masked_select(~mask.unsqueeze(1)), torch.zeros(attn.shape[1] * int((~mask).sum())))
    if "n_procedures" not in settings:
        proc = out.extras["procedure_attention"]
        assert proc.shape == (3, 5, x.shape[1])  # P = 5 procedures by default
        assert torch.allclose(attn, out.extras["grade_attention"] @ proc)


@pytest.mark.parametrize("settings", [
    {"score_max": 50.0},  # the paper's defaults
    {"n_procedures": 0, "revert_head": True, "fine_head": "official", "coarse_step": 0.01,
     "grade_values": (-1.0, -0.8, 0.8, 1.0), "score_max": 25.0},  # the official model at full size
], ids=["paper-default", "official-default"])
def test_batch_equals_single_videos_at_fis_v_lengths(settings):
    model = make(settings)
    lengths = [124, 302, 200]  # Fis-V: 124-clip training crops, whole videos of up to 302 clips at test
    x, mask = padded(lengths, 1024)
    with torch.no_grad():
        batch = model(x, mask)
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1, :n])
            assert torch.allclose(batch.score[i], alone.score[0], atol=1e-5)
            assert torch.equal(batch.extras["subgrade"][i], alone.extras["subgrade"][0])
            assert torch.allclose(batch.weights[i, :n], alone.weights[0], atol=1e-6)
            assert torch.allclose(batch.clip_scores[i, :n], alone.clip_scores[0], atol=1e-4)
            assert torch.allclose(batch.additive["fine"][i], alone.additive["fine"][0])


def test_inference_is_deterministic():
    model = make(SMALL)
    x, mask = padded([15, 11], SMALL["in_dim"])
    with torch.no_grad():
        a, b = model(x, mask), model(x, mask)
    assert torch.equal(a.score, b.score) and torch.equal(a.weights, b.weights)
    twin = make(SMALL)  # same seed, same config: same model (bitwise parameters; outputs within tolerance)
    assert_same_model(twin, model)
    with torch.no_grad():
        assert_close_across_instances(twin(x, mask).score, a.score)
    # no mask means every clip is real
    with torch.no_grad():
        full = model(x[:1, :15])
        assert torch.allclose(full.score, model(x[:1, :15], torch.ones(1, 15, dtype=torch.bool)).score)


def test_bad_input_raises_a_one_line_error():
    model = make(SMALL)
    with pytest.raises(AqaError) as err:
        model(torch.randn(1, 10, 65))
    assert "[B, T, 64]" in err.value.message and "\n" not in err.value.message
    with pytest.raises(AqaError):
        model(torch.randn(2, 10, 64), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(AqaError):
        model(torch.randn(10, 64))
    with pytest.raises(AqaError, match="fine_head"):
        CoFInAlConfig(fine_head="mlp")


def test_config_round_trips_through_json():
    config = CoFInAlConfig(**SMALL_OFFICIAL)
    assert CoFInAlConfig.from_dict(json.loads(config.to_json())) == config


def test_registry_builds_the_head():
    pytest.importorskip("aqa_cli.heads.interp")  # written on another branch
    from aqa_cli.heads import create_head

    assert isinstance(create_head("cofinal", dict(SMALL)), CoFInAl)


# ---------------------------------------------------------------------------------------------------- loss

def test_target_decomposition_follows_eq_6():
    model = make(dict(SMALL, score_max=1.0))
    c = model.config
    y = torch.tensor([0.0, 0.1234, 0.25, 0.5, 0.7499, 0.999, 1.0])
    grade, coarse, sub = model.decompose_target(y)
    assert grade.tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert (coarse + sub * c.step_fine <= y + 1e-6).all()
    inside = y < 1.0
    assert (y[inside] < coarse[inside] + (sub[inside] + 1) * c.step_fine + 1e-6).all()
    assert sub[-1] == c.n_subgrades - 1  # a perfect score: last sub-grade of the last grade
    # the official quantisation: labels ÷ 25, then 0.01 grades of 100 sub-grades of 1e-4
    official = make(dict(SMALL_OFFICIAL, n_subgrades=100))
    grade, coarse, sub = official.decompose_target(torch.tensor([17.5, 30.0]))
    assert grade.tolist() == [70, 120] and sub.tolist() == [0, 0]
    grade, coarse, sub = official.decompose_target(torch.tensor([0.123456 * 25, 17.55]))
    assert grade.tolist() == [12, 70] and sub.tolist() == [34, 20]  # 17.55 is 17.5499992 in float32


def test_graph_regularisation_is_zero_for_prototypes_ordered_by_quality():
    g, step = 5, 0.3
    angles = torch.arange(g) * step  # angle between grades i and j is |i − j|·step
    ordered = torch.stack([angles.cos(), angles.sin(), torch.zeros(g)], dim=1) * 3.0
    assert graph_regularisation(ordered).abs() < 1e-4
    shuffled = ordered[torch.tensor([2, 0, 4, 1, 3])]
    assert graph_regularisation(shuffled) > 0.05
    assert torch.isfinite(graph_regularisation(torch.ones(4, 8))).all()  # collapsed prototypes stay finite


@pytest.mark.parametrize("settings", [SMALL, SMALL_OFFICIAL], ids=["paper", "official"])
def test_loss_is_finite_and_training_reduces_it(settings):
    model = make(settings)
    model.train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, settings["in_dim"], generator=g)
    target = (torch.sigmoid(x.mean(dim=(1, 2)) * 20) * 20 + 2).detach()  # a learnable function of the clips
    out = model(x)
    total, parts = model.loss(out, target)
    assert set(parts) == {"score", "coarse", "fine", "graph"}
    assert all(math.isfinite(v) for v in parts.values()) and torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.prototype.weight.grad.abs().sum() > 0  # L_R and L_C reach the grade prototypes

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = float(total.detach())
    for _ in range(25):
        total, _ = model.loss(model(x), target)
        opt.zero_grad()
        total.backward()
        opt.step()
    end, _ = model.loss(model(x), target)
    assert float(end.detach()) < 0.7 * start


# ------------------------------------------------------------------------------------ official checkpoints

D_IN, HIDDEN, GRADES, SUBGRADES, FFN = 1024, 256, 4, 100, 768


def official_random_state(revert: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official ``cofinal`` (or ``GDLTETH2``) names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, scale: float | None = None) -> torch.Tensor:
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(fan_in))

    state: dict[str, torch.Tensor] = {}

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        state[prefix + ".weight"], state[prefix + ".bias"] = w(n_out, n_in), w(n_out, scale=0.1)

    def mha(prefix: str, d: int) -> None:
        state[prefix + ".in_proj_weight"], state[prefix + ".in_proj_bias"] = w(3 * d, d), w(3 * d, scale=0.1)
        linear(prefix + ".out_proj", d, d)

    def norm(prefix: str, d: int) -> None:
        state[prefix + ".weight"], state[prefix + ".bias"] = 1 + w(d, scale=0.1), w(d, scale=0.1)

    def batchnorm(prefix: str, d: int) -> None:
        norm(prefix, d)
        state[prefix + ".running_mean"] = w(d, scale=0.3)
        state[prefix + ".running_var"] = 0.5 + torch.rand(d, generator=g)
        state[prefix + ".num_batches_tracked"] = torch.tensor(1000)

    state["in_proj.0.weight"], state["in_proj.0.bias"] = w(D_IN // 2, D_IN).unsqueeze(-1), w(D_IN // 2, scale=0.1)
    batchnorm("in_proj.1", D_IN // 2)
    state["in_proj.3.weight"], state["in_proj.3.bias"] = w(HIDDEN, D_IN // 2).unsqueeze(-1), w(HIDDEN, scale=0.1)
    batchnorm("in_proj.4", HIDDEN)
    enc = "transformer.encoder.layers.0"
    mha(enc + ".self_attn", HIDDEN)
    linear(enc + ".linear1", FFN, HIDDEN)
    linear(enc + ".linear2", HIDDEN, FFN)
    norm(enc + ".norm1", HIDDEN)
    norm(enc + ".norm2", HIDDEN)
    norm("transformer.encoder.norm", HIDDEN)
    for i in range(2):
        dec = f"transformer.decoder.layers.{i}"
        mha(dec + ".self_attn", HIDDEN)
        mha(dec + ".multihead_attn", HIDDEN)
        linear(dec + ".linear1", FFN, HIDDEN)
        linear(dec + ".linear2", HIDDEN, FFN)
        for n in (1, 2, 3):
            norm(f"{dec}.norm{n}", HIDDEN)
    norm("transformer.decoder.norm", HIDDEN)
    state["prototype.weight"] = w(GRADES, HIDDEN, scale=1.0)
    linear("regressor", GRADES, HIDDEN)
    if revert:
        linear("regressor_revert", GRADES, HIDDEN)
    q, _ = torch.linalg.qr(torch.rand(SUBGRADES, SUBGRADES, generator=g, dtype=torch.float64))
    centring = torch.eye(SUBGRADES, dtype=torch.float64) - 1 / SUBGRADES
    state["etf_vec1"] = (math.sqrt(SUBGRADES / (SUBGRADES - 1)) * q @ centring).float()
    linear("regressori.0.1", 256, GRADES * HIDDEN)
    linear("regressori.0.2", SUBGRADES, 256)
    mha("regi.0", HIDDEN)
    return state


def reference_official_score(s: dict[str, torch.Tensor], video: torch.Tensor, activation: int,
                             revert: bool, n_head: int = 1) -> tuple[float, float, int, torch.Tensor]:
    """The official model's test-time prediction for ONE video [T, D_IN], written out from its
    definition: (prediction on the ÷25 scale, coarse part, sub-grade index, normalised fine feature)."""

    def lin(x, p):
        return x @ s[p + ".weight"].T + s[p + ".bias"]

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps=1e-5)

    def bn(x, p):
        return (x - s[p + ".running_mean"]) / torch.sqrt(s[p + ".running_var"] + 1e-5) * s[p + ".weight"] \
            + s[p + ".bias"]

    def attention(query, key_value, p):
        wq, wk, wv = s[p + ".in_proj_weight"].chunk(3)
        bq, bk, bv = s[p + ".in_proj_bias"].chunk(3)
        q, k, v = query @ wq.T + bq, key_value @ wk.T + bk, key_value @ wv.T + bv
        d = q.shape[-1] // n_head
        heads = []
        for h in range(n_head):
            sl = slice(h * d, (h + 1) * d)
            a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
            heads.append(a @ v[:, sl])
        return lin(torch.cat(heads, dim=-1), p + ".out_proj")

    def ffn(x, p):
        return lin(torch.relu(lin(x, p + ".linear1")), p + ".linear2")

    x = video @ s["in_proj.0.weight"][:, :, 0].T + s["in_proj.0.bias"]
    x = torch.relu(bn(x, "in_proj.1"))
    x = bn(x @ s["in_proj.3.weight"][:, :, 0].T + s["in_proj.3.bias"], "in_proj.4")
    enc = "transformer.encoder.layers.0"
    x = ln(x + attention(x, x, enc + ".self_attn"), enc + ".norm1")
    x = ln(x + ffn(x, enc), enc + ".norm2")
    memory = ln(x, "transformer.encoder.norm")
    q = s["prototype.weight"]
    for i in range(2):
        dec = f"transformer.decoder.layers.{i}"
        q = ln(q + attention(q, q, dec + ".self_attn"), dec + ".norm1")
        q = ln(q + attention(q, memory, dec + ".multihead_attn"), dec + ".norm2")
        q = ln(q + ffn(q, dec), dec + ".norm3")
    q = ln(q, "transformer.decoder.norm")  # [G, H]

    values, revert_values = official_grade_values(activation)

    def expected(p, vals):  # diagonal response per grade → σ → normalised → Σ p·v
        logit = (q * s[p + ".weight"]).sum(dim=-1) + s[p + ".bias"]
        prob = torch.sigmoid(logit) / torch.sigmoid(logit).sum()
        return float((prob * torch.tensor(vals)).sum())

    coarse = expected("regressor", values)
    if revert:
        coarse = (coarse + 1 - expected("regressor_revert", revert_values)) / 2
    # regi at batch size 1: without batch_first its "sequence" is one token long, so each
    # grade attends only to itself: out_proj(v_proj(q)).
    wv, bv = s["regi.0.in_proj_weight"].chunk(3)[2], s["regi.0.in_proj_bias"].chunk(3)[2]
    z = lin(q @ wv.T + bv, "regi.0.out_proj")
    h = lin(lin(z.reshape(1, -1), "regressori.0.1"), "regressori.0.2")
    h = h / h.norm(dim=1, keepdim=True)
    sub = int((h @ s["etf_vec1"]).argmax())
    return coarse + sub / 10000, coarse, sub, h[0]


@pytest.mark.parametrize("activation,revert", [(3, True), (2, True), (0, True), (1, False)],
                         ids=["cofinal-mode3", "cofinal-mode2", "cofinal-mode0", "gdlteth2-mode1"])
def test_official_checkpoint_gives_the_official_prediction(activation, revert):
    official = official_random_state(revert)
    buffer = io.BytesIO()  # a plain state dict through torch.save, as saved from nn.DataParallel
    torch.save({"module." + k: v for k, v in official.items()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    config = config_from_official(saved, activation=activation)
    assert (config.hidden_dim, config.n_grades, config.n_subgrades, config.n_procedures) == (256, 4, 100, 0)
    assert config.revert_head == revert and config.fine_head == "official" and config.score_max == 25.0
    model = CoFInAl(config).eval()
    state = state_dict_from_official(saved)
    assert set(state) == set(model.state_dict())  # the official names, nothing more, nothing less
    model.load_state_dict(state)  # strict
    assert torch.equal(model.etf_vec1, official["etf_vec1"])

    g = torch.Generator().manual_seed(7)
    for length in (40, 131):
        video = torch.randn(length, D_IN, generator=g)
        ref_score, ref_coarse, ref_sub, ref_fine = reference_official_score(official, video, activation, revert)
        with torch.no_grad():
            out = model(video.unsqueeze(0))
        assert torch.allclose(out.extras["fine_feature"][0], ref_fine, atol=1e-5)
        assert int(out.extras["subgrade"][0]) == ref_sub
        assert out.score[0].item() == pytest.approx(ref_score * 25, abs=1e-4)
        assert out.extras["coarse_score"][0].item() == pytest.approx(ref_coarse * 25, abs=1e-4)
        assert out.additive["fine"][0].item() == pytest.approx(ref_sub / 10000 * 25, abs=1e-6)
