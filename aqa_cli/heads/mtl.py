"""Multitask C3D-AVG head: score, factorised action recognition and commentary
(Parmar and Morris, "What and How Well You Performed? A Multitask Learning Approach to
Action Quality Assessment", CVPR 2019).

The body is C3D-AVG's: clip features averaged over the video's real clips, then a
shared fully connected layer. Three task heads read it:

* **score**: a linear regressor; loss MSE + L1 on the score normalised to [0, 1];
* **action recognition**: one linear classifier per sub-task of a schema that is
  data (``subtasks`` in the config, from the preset): MTL-AQA's diving schema is
  rotation type, position, somersaults, twists, armstand; a new sport brings its
  own. Loss: cross-entropy summed over the sub-tasks;
* **commentary**: a GRU encoder over the clips and a GRU decoder over words. As in
  the paper, captioning reads the clips *before* averaging; here each clip goes
  through the shared body first, so the caption loss trains the body too (the
  original shares the C3D layers instead, which we keep frozen). Loss: the
  negative log-likelihood of the caption's words, summed over words and averaged
  over videos. The vocabulary is a config field, so checkpoints carry it.

Total: α·L_AQA + β·L_cls + γ·L_cap. A task whose labels are absent for a video (an
empty cell) or for the whole file (no column) drops out of the loss, so the head
also trains on scores alone.

The backbone is frozen: the original fine-tunes C3D end to end on 16-frame clips;
we train on features from our backbones (I3D or Video Swin), so only the body and
the task heads learn.

Explanation: the weights are uniform (w_t = 1/T over real clips) because the
model averages. The clip score s_t is the score head applied to clip t alone. With
the default nonlinear body (ReLU), f(mean x_t) ≠ mean f(x_t), so Σ w_t·s_t differs
from the score; the difference is reported as the additive term ``nonlinear_body``
so that Σ w_t·s_t + nonlinear_body = score holds exactly. With ``body = "linear"``
the two agree and the term is rounding only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.errors import AqaError
from aqa_cli.heads import Head, HeadConfig, HeadOutput, check_inputs

if TYPE_CHECKING:
    from aqa_cli.dataset import FeatureSet

# Token ids 0–3 are reserved; word k of the vocabulary is id 4 + k.
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Cells that mean "no label for this video".
MISSING = {"", "nan", "na", "n/a", "none", "null", "-"}
ADDITIVE = "nonlinear_body"

_WORD = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+(?:'[^\W\d_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers ("3.5" stays one token); punctuation is dropped."""
    return _WORD.findall(text.lower())


def build_vocab(captions: list[str]) -> list[str]:
    """Every word of the captions, most frequent first (ties alphabetical, so the order is reproducible)."""
    counts = Counter(w for c in captions for w in tokenize(c))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass
class MTLConfig(HeadConfig):
    # Width of the shared body. The official C3D-AVG maps 8192-d C3D pool5 features to 4096 (the presets say
    # what they use); 256 here keeps an untuned head small.
    hidden_dim: int = 256
    body: str = "mlp"  # "mlp": Linear + ReLU + dropout (as C3D-AVG's fc6); "linear": clip scores add up exactly
    # The action schema: [{"name", "classes": [...], "column" (default: name), "display" (default: classes)}].
    subtasks: list[dict[str, Any]] = field(default_factory=list)
    caption_column: str = "caption"
    # Caption words (token ids 4…). Empty: built from the training captions; given: captions must use only these.
    vocab: list[str] = field(default_factory=list)
    max_caption_len: int = 100  # words per caption, <eos> included (official max_cap_len)
    caption_hidden: int = 128
    word_dim: int = 64
    caption_layers: int = 1
    caption_dropout: float = 0.0  # between GRU layers (only with caption_layers > 1)
    beam_size: int = 1  # 1: greedy decoding; more: beam search with length-normalised log-probabilities
    alpha: float = 1.0  # weight of L_AQA
    beta: float = 1.0  # weight of L_cls
    gamma: float = 0.01  # weight of L_cap (official code: captioning loss × 0.01)


def _schema_error(reason: str) -> AqaError:
    return AqaError(f"mtl head: {reason}",
                    fix="give each sub-task a name and a list of distinct class names, e.g. "
                        "[[heads.mtl.model.subtasks]] name = \"position\" classes = [\"tuck\", \"pike\"]")


def check_schema(subtasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The schema with its defaults filled in (column = name, display = classes); refuses a malformed one."""
    out, names = [], set()
    for i, sub in enumerate(subtasks):
        if not isinstance(sub, dict):
            raise _schema_error(f"sub-task {i + 1} is not a table")
        unknown = set(sub) - {"name", "classes", "column", "display", "cues"}
        if unknown:
            raise _schema_error(f"sub-task {i + 1} has unknown keys {sorted(unknown)}")
        name = sub.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _schema_error(f"sub-task {i + 1} needs a name of letters, digits and underscores, not {name!r}")
        if name in names:
            raise _schema_error(f"sub-task {name!r} appears twice")
        names.add(name)
        classes = sub.get("classes")
        if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
                or len({c.lower() for c in classes}) != len(classes)):
            raise _schema_error(f"sub-task {name!r} needs at least two distinct class names")
        display = sub.get("display", classes)
        if not isinstance(display, list) or len(display) != len(classes):
            raise _schema_error(f"sub-task {name!r}: display must list one text per class")
        # Words a caption uses for each class (may be empty for a class without one): what the converter's
        # caption check counts to see whether code k really is class k.
        cues = sub.get("cues", [[] for _ in classes])
        if (not isinstance(cues, list) or len(cues) != len(classes)
                or not all(isinstance(c, list) and all(isinstance(w, str) and w.strip() for w in c) for c in cues)):
            raise _schema_error(f"sub-task {name!r}: cues must list one list of words per class")
        out.append({"name": name, "classes": list(classes), "column": str(sub.get("column", name)),
                    "display": [str(d) for d in display], "cues": [[w.lower() for w in c] for c in cues]})
    return out


def _find_column(aux: dict[str, list[str]], name: str) -> str | None:
    for col in aux:
        if col.lower() == name.lower():
            return col
    return None


def _class_index(cell: str, classes: list[str]) -> int | None:
    """A cell's class: its name (any case), or a number equal to a numeric class name ("3.50" → "3.5")."""
    low = cell.lower()
    for k, c in enumerate(classes):
        if c.lower() == low:
            return k
    try:
        value = float(cell)
    except ValueError:
        return None
    for k, c in enumerate(classes):
        try:
            if math.isclose(float(c), value, abs_tol=1e-9):
                return k
        except ValueError:
            continue
    return None


def encode_class_labels(subtasks: list[dict[str, Any]], data: FeatureSet) -> dict[str, Tensor]:
    """``cls.<name>`` → class index per video (−1: no label); an unknown class name is an error naming the file."""
    labels: dict[str, Tensor] = {}
    for sub in subtasks:
        col = _find_column(data.aux, sub["column"])
        idx = torch.full((len(data),), -1, dtype=torch.long)
        if col is not None:
            bad = []
            for i, cell in enumerate(data.aux[col]):
                cell = cell.strip()
                if cell.lower() in MISSING:
                    continue
                k = _class_index(cell, sub["classes"])
                if k is None:
                    bad.append((data.ids[i], cell))
                else:
                    idx[i] = k
            if bad:
                raise AqaError(f"{len(bad)} row(s) have an unknown {col} class (e.g. {bad[0][1]!r} for id "
                               f"{bad[0][0]!r}; known: {', '.join(sub['classes'])})", path=data.labels_path,
                               fix=f"use one of those class names (or leave the cell empty), or add the class to "
                                   f"the {sub['name']} sub-task of the head's schema")
        labels[f"cls.{sub['name']}"] = idx
    return labels


def encode_captions(config: MTLConfig, data: FeatureSet) -> Tensor | None:
    """Token ids [videos, L] (word ids then <eos>, 0-padded; an all-zero row: no caption), None without a
    caption column. Words outside a given vocabulary are an error naming the file."""
    col = _find_column(data.aux, config.caption_column)
    if col is None:
        return None
    index = {w: 4 + k for k, w in enumerate(config.vocab)}
    rows: list[list[int]] = []
    unknown: list[tuple[str, str]] = []
    for vid, text in zip(data.ids, data.aux[col]):
        words = [] if text.strip().lower() in MISSING else tokenize(text)
        if not words:
            rows.append([])
            continue
        unknown.extend((vid, w) for w in words if w not in index)
        rows.append([index.get(w, UNK) for w in words[: config.max_caption_len - 1]] + [EOS])
    if unknown:
        distinct = list(dict.fromkeys(w for _, w in unknown))
        raise AqaError(f"the {col} column uses {len(distinct)} word(s) outside the head's caption vocabulary of "
                       f"{len(config.vocab)} words (e.g. {distinct[0]!r} for id {unknown[0][0]!r})",
                       path=data.labels_path,
                       fix="train without a fixed vocab setting so the vocabulary is built from these captions, "
                           "or keep the captions to the vocabulary's words")
    width = max((len(r) for r in rows), default=0)
    tokens = torch.zeros(len(rows), max(width, 1), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens


class MTLHead(Head):
    name = "mtl"
    config_class = MTLConfig

    def __init__(self, config: MTLConfig):
        super().__init__(config)
        c = config
        if c.body not in ("mlp", "linear"):
            raise AqaError(f"mtl head: unknown body {c.body!r}", fix="use body = \"mlp\" or \"linear\"")
        if c.max_caption_len < 2 or c.beam_size < 1:
            raise AqaError("mtl head: max_caption_len must be ≥ 2 and beam_size ≥ 1", fix="fix the head's settings")
        if len(set(c.vocab)) != len(c.vocab) or any(w in SPECIALS for w in c.vocab):
            raise AqaError("mtl head: the caption vocabulary has repeated or reserved words",
                           fix="give each word once, without <pad>, <bos>, <eos> or <unk>")
        self.schema = check_schema(c.subtasks)
        layers: list[nn.Module] = [nn.Linear(c.in_dim, c.hidden_dim)]
        if c.body == "mlp":
            layers += [nn.ReLU(), nn.Dropout(c.dropout)]
        self.body = nn.Sequential(*layers)
        self.score_fc = nn.Linear(c.hidden_dim, 1)
        self.classifiers = nn.ModuleDict({s["name"]: nn.Linear(c.hidden_dim, len(s["classes"])) for s in self.schema})
        rnn_dropout = c.caption_dropout if c.caption_layers > 1 else 0.0
        self.encoder = nn.GRU(c.hidden_dim, c.caption_hidden, c.caption_layers, batch_first=True, dropout=rnn_dropout)
        self.embed = nn.Embedding(len(SPECIALS) + len(c.vocab), c.word_dim, padding_idx=PAD)
        self.decoder = nn.GRU(c.word_dim, c.caption_hidden, c.caption_layers, batch_first=True, dropout=rnn_dropout)
        self.word_out = nn.Linear(c.caption_hidden, len(SPECIALS) + len(c.vocab))

    # -- the label hooks (see aqa_cli.heads.Head)

    @classmethod
    def label_columns(cls, config: MTLConfig) -> list[str]:
        return [s["column"] for s in check_schema(config.subtasks)] + [config.caption_column]

    @classmethod
    def prepare_config(cls, config: MTLConfig, data: FeatureSet) -> MTLConfig:
        """Build the vocabulary from the captions when the config has none, then check every label."""
        col = _find_column(data.aux, config.caption_column)
        if not config.vocab and col is not None:
            config = dataclasses.replace(config, vocab=build_vocab(data.aux[col]))
        encode_class_labels(check_schema(config.subtasks), data)
        encode_captions(config, data)
        return config

    def encode_labels(self, data: FeatureSet) -> dict[str, Tensor]:
        labels = encode_class_labels(self.schema, data)
        tokens = encode_captions(self.config, data)
        if tokens is not None and self.config.vocab:
            labels["caption"] = tokens
        return labels

    # -- model

    def forward(self, features: Tensor, mask: Tensor | None = None) -> HeadOutput:
        mask = check_inputs(features, mask, self.config.in_dim)
        real = mask.unsqueeze(-1)
        # Padding is zeroed, not multiplied by 0, so that whatever it holds (even NaN) cannot leak in.
        x = features.masked_fill(~real, 0.0)
        counts = mask.sum(dim=1, keepdim=True).to(x.dtype)
        weights = mask.to(x.dtype) / counts
        pooled = x.sum(dim=1) / counts  # C3D-AVG: the mean over the real clips
        h = self.body(pooled)
        score = self.denormalise(self.score_fc(h).squeeze(-1))

        per_clip = self.body(x)  # [B, T, H]: the same body on each clip alone
        clip_scores = self.denormalise(self.score_fc(per_clip).squeeze(-1)) * mask
        gap = score - (weights * clip_scores).sum(dim=1)

        extras: dict[str, Tensor] = {}
        for s in self.schema:
            logits = self.classifiers[s["name"]](h)
            extras[f"logits.{s['name']}"] = logits
            extras[f"probs.{s['name']}"] = logits.softmax(dim=-1)
        state = self._encode(per_clip, mask)  # [B, layers, H]
        extras["caption_state"] = state
        extras["body_linear"] = torch.full_like(score, float(self.config.body == "linear"))
        if not self.training and self.config.vocab:
            extras["caption_tokens"] = self.generate(state)
        return HeadOutput(score=score, weights=weights, clip_scores=clip_scores, additive={ADDITIVE: gap},
                          extras=extras)

    def _encode(self, per_clip: Tensor, mask: Tensor) -> Tensor:
        """The encoder GRU's final state [B, layers, H] over each video's real clips, in order."""
        # Real clips first (stable), so a video with holes in its mask is read as its real clips in order.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        compact = per_clip.gather(1, order.unsqueeze(-1).expand_as(per_clip))
        lengths = mask.sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(compact, lengths, batch_first=True, enforce_sorted=False)
        _, last = self.encoder(packed)
        return last.transpose(0, 1)

    def _step(self, tokens: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder step: tokens [N] and hidden [layers, N, H] → log-probabilities [N, V] and the new hidden."""
        out, hidden = self.decoder(self.embed(tokens.unsqueeze(1)), hidden)
        logits = self.word_out(out[:, 0])
        # <pad> and <bos> are never generated.
        logits[:, PAD] = float("-inf")
        logits[:, BOS] = float("-inf")
        return logits.log_softmax(dim=-1), hidden

    @torch.no_grad()
    def generate(self, state: Tensor, beam_size: int | None = None) -> Tensor:
        """Captions [B, L] (word ids, then <eos>, 0-padded) from encoder states [B, layers, H]."""
        k = self.config.beam_size if beam_size is None else beam_size
        if k == 1:
            return self._greedy(state)
        rows = [self._beam(state[i], k) for i in range(state.shape[0])]
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, dtype=torch.long, device=state.device)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=state.device)
        return out

    def _greedy(self, state: Tensor) -> Tensor:
        batch = state.shape[0]
        hidden = state.transpose(0, 1).contiguous()
        token = torch.full((batch,), BOS, dtype=torch.long, device=state.device)
        done = torch.zeros(batch, dtype=torch.bool, device=state.device)
        steps = []
        for _ in range(self.config.max_caption_len):
            logp, hidden = self._step(token, hidden)
            token = torch.where(done, torch.full_like(token, PAD), logp.argmax(dim=-1))
            steps.append(token)
            done = done | (token == EOS)
            if bool(done.all()):
                break
        return torch.stack(steps, dim=1)

    def _beam(self, state: Tensor, k: int) -> list[int]:
        """Beam search for one video; finished hypotheses are ranked by mean log-probability per word, so
        longer captions are not penalised merely for having more terms."""
        hidden = state.unsqueeze(1).contiguous()  # [layers, 1, H]
        beams: list[tuple[float, list[int]]] = [(0.0, [])]
        finished: list[tuple[float, list[int]]] = []
        for _ in range(self.config.max_caption_len):
            last = torch.tensor([b[1][-1] if b[1] else BOS for b in beams], device=state.device)
            logp, new_hidden = self._step(last, hidden)  # hidden holds one column per beam
            total = torch.tensor([b[0] for b in beams], device=state.device).unsqueeze(1) + logp
            top = total.flatten().topk(min(k, total.numel()))
            candidates = []
            for value, flat in zip(top.values.tolist(), top.indices.tolist()):
                src, word = divmod(flat, logp.shape[1])
                candidates.append((value, beams[src][1] + [word], src))
            keep = []
            for value, seq, src in candidates:
                if seq[-1] == EOS or len(seq) == self.config.max_caption_len:
                    finished.append((value, seq))
                else:
                    keep.append((value, seq, src))
            if not keep or len(finished) >= k:
                break
            beams = [(v, s) for v, s, _ in keep]
            hidden = new_hidden[:, [src for _, _, src in keep]]
        if not finished:
            finished = [(v, s) for v, s in beams]
        best = max(finished, key=lambda f: (f[0] / len(f[1]), -len(f[1])))
        return best[1]

    # -- loss

    def loss(self, out: HeadOutput, target: Tensor,
             labels: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        pred, true = self.normalise(out.score), self.normalise(target)
        aqa = F.mse_loss(pred, true) + F.l1_loss(pred, true)
        total = c.alpha * aqa
        parts = {"aqa": float(aqa.detach())}
        labels = labels or {}
        cls_terms = []
        for s in self.schema:
            y = labels.get(f"cls.{s['name']}")
            if y is None or not bool((y >= 0).any()):
                continue  # no video of the batch has this sub-task's label: it drops out
            have = y >= 0
            cls_terms.append(F.cross_entropy(out.extras[f"logits.{s['name']}"][have], y[have]))
        if cls_terms:
            cls = torch.stack(cls_terms).sum()  # Σ over sub-tasks, as in the paper's L_cls
            total = total + c.beta * cls
            parts["cls"] = float(cls.detach())
        tokens = labels.get("caption")
        if tokens is not None:
            have = tokens[:, 0] != PAD
            if bool(have.any()):
                cap = self.caption_nll(out.extras["caption_state"][have], tokens[have])
                total = total + c.gamma * cap
                parts["cap"] = float(cap.detach())
        return total, parts

    def caption_nll(self, state: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced NLL, summed over each caption's words (and <eos>), averaged over the captions."""
        width = int((tokens != PAD).sum(dim=1).max())
        tokens = tokens[:, :width]
        inputs = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
        out, _ = self.decoder(self.embed(inputs), state.transpose(0, 1).contiguous())
        logp = self.word_out(out).log_softmax(dim=-1)
        nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * (tokens != PAD)
        return nll.sum(dim=1).mean()

    # -- reading the outputs

    def words(self, tokens: Tensor) -> list[str]:
        """Token ids → words, up to <eos>."""
        vocab = list(SPECIALS) + list(self.config.vocab)
        words = []
        for t in tokens.tolist():
            if t in (EOS, PAD):
                break
            words.append(vocab[t] if 0 <= t < len(vocab) else SPECIALS[UNK])
        return words

    def describe(self, out: HeadOutput, index: int = 0) -> dict[str, Any]:
        """The recognised action, the commentary and how the clip scores relate to the total, as plain data."""
        action = []
        for s in self.schema:
            probs = out.extras.get(f"probs.{s['name']}")
            if probs is None:
                continue
            row = probs[index].detach()
            k = int(row.argmax())
            action.append({"task": s["name"], "class": s["classes"][k], "display": s["display"][k],
                           "prob": float(row[k])})
        tokens = out.extras.get("caption_tokens")
        commentary = " ".join(self.words(tokens[index])) if tokens is not None and tokens.shape[1] else None
        linear = bool(out.extras["body_linear"][index]) if "body_linear" in out.extras else False
        gap = float(out.additive[ADDITIVE][index].detach()) if ADDITIVE in out.additive else 0.0
        if linear:
            note = ("clip weights are uniform (the clips are averaged) and each clip score is the score head on that "
                    "clip alone; the body is linear, so Σ w·s equals the total exactly (the additive term "
                    f"{ADDITIVE} = {gap:+.1e} is rounding)")
        else:
            note = ("clip weights are uniform (the clips are averaged) and each clip score is the score head on that "
                    "clip alone; the body is nonlinear, so Σ w·s does not equal the total: the difference "
                    f"{gap:+.2f} is the additive term {ADDITIVE}, and Σ w·s + {ADDITIVE} = total exactly")
        return {"action": action, "action_text": ", ".join(a["display"] for a in action) or None,
                "commentary": commentary, "clip_scores_sum_exactly": linear, "decomposition": note}

