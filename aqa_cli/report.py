"""What ``aqa score`` writes: JSON objects, CSV tables, a PNG timeline and an HTML report.

Every file is written to a temporary name and renamed (:mod:`aqa_cli.fileio`), so
a run that is killed or fails never leaves half a file where a finished one was.
The HTML report is one self-contained page (images inlined as base64) that can be
mailed or opened offline: the total, the timeline, the middle frame of each clip
whose removal changes the score materially, and a table of every clip.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqa_cli.errors import AqaError
from aqa_cli.fileio import write_bytes, write_text
from aqa_cli.scoring import ClipScore, VideoScore

TOP_CLIPS = 5
# Colours of the timeline: ordinary clips' weights, the heaviest clips' weights, clip scores.
WEIGHT_COLOUR = "#4c72b0"
TOP_COLOUR = "#dd8452"
SCORE_COLOUR = "#2a9d55"
# The measured-effect panel: ordinary clips, and the clips that move the score most.
EFFECT_COLOUR = "#8c8c8c"
EFFECT_TOP_COLOUR = "#8e44ad"
BAND_COLOUR = "#ececec"  # the band of negligible effects


# ------------------------------------------------------------------------------------------------ text forms


def time_decimals(clips: Sequence[ClipScore]) -> int:
    """Decimals of a second that clip times need: the fewest (0, 1 or 2) that put every clip boundary within 5%
    of the shortest clip (1.28 s clips at 0.52 s, 1.80 s … need one: 0:00.5–0:01.8)."""
    if not clips:
        return 0
    shortest = min(max(c.end_s - c.start_s, 1e-6) for c in clips)
    bounds = [t for c in clips for t in (c.start_s, c.end_s)]
    for decimals in (0, 1):
        if max(abs(round(t, decimals) - t) for t in bounds) <= 0.05 * shortest:
            return decimals
    return 2


def format_time(seconds: float, decimals: int = 0) -> str:
    """m:ss, or m:ss.s with ``decimals`` (h:mm:ss from an hour on)."""
    seconds = round(max(seconds, 0.0), decimals)
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    width = 2 + (decimals + 1 if decimals else 0)
    text = f"{secs:0{width}.{decimals}f}"
    return f"{hours}:{minutes:02d}:{text}" if hours else f"{minutes}:{text}"


def format_range(clip: ClipScore, decimals: int = 1) -> str:
    return f"{format_time(clip.start_s, decimals)}–{format_time(clip.end_s, decimals)}"


def format_total(result: VideoScore, digits: int | None = None) -> str:
    """"31 / 40 points, 90% interval 26–36" (a scale not starting at 0 shows its range); the score is rounded to
    what its interval supports (:func:`aqa_cli.calibration.shown_digits`)."""
    digits = result.display_digits if digits is None else digits
    lo, hi, unit = result.scale.get("min", 0.0), result.scale.get("max"), result.scale.get("unit", "points")
    if hi is None:
        text = f"{result.score:.{digits}f} {unit}"
    elif lo:
        text = f"{result.score:.{digits}f} {unit} (scale {lo:g} to {hi:g})"
    else:
        text = f"{result.score:.{digits}f} / {hi:g} {unit}"
    if result.interval:
        text += f", {format_interval(result, digits)}"
    return text


def format_interval(result: VideoScore, digits: int | None = None) -> str:
    """"90% interval 26–36"."""
    digits = result.display_digits if digits is None else digits
    i = result.interval
    return f"{i['level']:.0%} interval {i['low']:.{digits}f}–{i['high']:.{digits}f}"


def rank_phrase(result: VideoScore) -> str:
    """"higher than 64% of the 400 Fis-V training videos" (their judged scores), or ""."""
    if not result.rank:
        return ""
    what = result.rank.get("dataset") or f"the {result.rank['of']} training videos"
    return f"higher than {result.rank['below']:.0%} of {what}"


def trust_lines(result: VideoScore) -> list[tuple[str, str]]:
    """How far to trust a result (with its parts, for a total), in words a coach reads: (kind, sentence) for what
    the interval means, why there is none, the domain check and clip scores off the scale; kind "warning" marks
    what undermines the score, "note" what qualifies it."""
    from aqa_cli.scoring import domain_sentence

    lines: list[tuple[str, str]] = []
    everything = (*result.parts, result)
    with_interval = next((r for r in everything if r.interval), None)
    if with_interval is not None:
        i = with_interval.interval
        lines.append(("info", f"the {i['level']:.0%} interval: for {round(100 * i['level'])} in 100 videos like the "
                              f"{i['calibrated_on']} it was checked on (cross-validation), the judges' score fell "
                              "inside it; the score is rounded to what it supports"))
    for r in everything:
        if r.interval_missing:
            lines.append(("note", f"no interval{' for ' + r.target if r.target else ''}: {r.interval_missing}"))
        if r.domain:
            lines.append(("info" if r.domain["in_domain"] else "warning", domain_sentence(r.domain)))
        elif r.domain_missing:
            lines.append(("note", f"no domain check: {r.domain_missing}"))
    if result.clip_scale_note:
        lines.append(("note", result.clip_scale_note))
    return list(dict.fromkeys(lines))


def heaviest(clips: Sequence[ClipScore], k: int = TOP_CLIPS) -> list[ClipScore]:
    """The ``k`` clips with the largest weights, heaviest first (ties: earlier first)."""
    return sorted(clips, key=lambda c: (-c.weight, c.index))[:k]


def highlight_count(n_clips: int) -> int:
    """How many of the heaviest clips to highlight: a few, and never most of a short video."""
    return min(3, max(1, n_clips // 4))


def largest_effects(clips: Sequence[ClipScore], k: int = TOP_CLIPS) -> list[ClipScore]:
    """The ``k`` clips whose removal moves the score most (largest |measured effect|), largest first."""
    known = [c for c in clips if c.effect is not None]
    return sorted(known, key=lambda c: (-abs(c.effect), c.index))[:k]


# An effect smaller than this share of the scale (0.2 points on a 0–10 scale, 1 on 0–50) is shown but never
# presented as a clip that matters: removing such a clip leaves the total where it was, to a reader.
MATERIAL_SHARE = 0.02


def material_threshold(result: VideoScore) -> float:
    """The smallest |effect| presented as moving the score: :data:`MATERIAL_SHARE` of the scale (0 without one)."""
    lo, hi = result.scale.get("min"), result.scale.get("max")
    return MATERIAL_SHARE * (hi - lo) if lo is not None and hi is not None and hi > lo else 0.0


def material_effects(result: VideoScore, k: int = TOP_CLIPS) -> list[ClipScore]:
    """Of the ``k`` clips that move the score most, those whose effect is material (:func:`material_threshold`)."""
    floor = material_threshold(result)
    return [c for c in largest_effects(result.clips, k) if abs(c.effect) >= floor]


@dataclass
class ClipMarks:
    """Which clips the table, the timeline and the report single out, and why (the legend under the table)."""

    moving: set[int]  # ◆ the clips that move the score most, where that effect is material
    heaviest: set[int]  # ★ the largest weights, only where the head's explanation is faithful
    lowest: int | None  # ▼ the lowest clip score, likewise
    per_video: int  # how many clips ◆ and ★ mark at most (highlight_count)
    threshold: float
    clips: int
    unit: str

    def legend(self) -> list[str]:
        """One line per mark in use: what singles those clips out, and how many it may mark."""
        n = self.per_video
        quota = f"1 clip per 4, at most 3: {n} here"
        floor = f"{self.threshold:.2f} {self.unit} ({100 * MATERIAL_SHARE:g}% of the scale)"
        lines = [f"◆ removing {'it' if n == 1 else 'each'} changes the score by {floor} or more: the "
                 f"{'largest such effect' if n == 1 else f'{n} largest such effects'} ({quota})" if self.moving
                 else f"◆ none: removing any one clip changes the score by less than {floor}"]
        if self.heaviest:
            lines.append(f"★ {'the heaviest weight' if n == 1 else f'the {n} heaviest weights'}: what the head "
                         f"counts most ({quota})")
        if self.lowest is not None:
            lines.append("▼ the lowest clip score")
        return lines

    def symbols(self, index: int) -> str:
        return ("◆" if index in self.moving else "") + ("★" if index in self.heaviest else "") + (
            "▼" if index == self.lowest else "")


def clip_marks(result: VideoScore) -> ClipMarks:
    """The marks of :class:`ClipMarks` for one scored video."""
    clips = result.clips
    n_marked = highlight_count(len(clips))
    # The head's own "heaviest" and "lowest score" are reasons only where its explanation is faithful; uniform
    # weights (the mtl head averages its clips) have no heaviest clip to point at either.
    uniform = len(clips) > 1 and max(c.weight for c in clips) - min(c.weight for c in clips) < 1e-9
    faithful = result.explanation_faithful
    low = lowest_scoring(clips) if faithful else None
    return ClipMarks(moving={c.index for c in material_effects(result, n_marked)},
                     heaviest=set() if uniform or not faithful else {c.index for c in heaviest(clips, n_marked)},
                     lowest=low.index if low is not None else None, per_video=n_marked,
                     threshold=material_threshold(result), clips=len(clips), unit=result.scale.get("unit", "points"))


def explanation_line(result: VideoScore) -> str:
    """One sentence on whether the head's weights and scores say what its clips do, with the measured ρ."""
    from aqa_cli.scoring import FAITHFUL_RHO

    if result.faithfulness is None:
        return "too few clips to check the head's weights and scores against what removing each clip does"
    rho = result.faithfulness
    if result.explanation_faithful:
        return (f"the head's weights and scores are faithful here: the clips they rank high are the ones whose "
                f"removal changes the score most (agreement ρ {rho:.2f}, 1 = the same order)")
    return (f"the head's weights and scores do NOT say what each clip does to this score (agreement ρ {rho:.2f} "
            f"with the measured effects, below {FAITHFUL_RHO}): read the effect column, not the weights")


_FEATURES_FROM = {"backbone": "computed from the video", "cache": "from the feature cache",
                  "file": "from a feature file"}


def head_description(result: VideoScore) -> str:
    """Which model scored the video, in plain words: its checkpoint, how many models it averages, how well it
    ranked videos it was not trained on, and where the features came from."""
    what = f"head {result.head_label} ({result.head}" + (
        f", the average of {result.members} models" if result.members > 1 else "") + ")"
    if result.cv_spearman is not None:
        what += (f": on videos it was not trained on, its ranking agrees with the reference scores at "
                 f"ρ {result.cv_spearman:.2f} (1 = the same order, 0 = unrelated)")
    return " · ".join([what, f"preset {result.preset or 'none'}",
                       f"backbone {result.backbone}, features {_FEATURES_FROM.get(result.features_source, '?')}"])


def lowest_scoring(clips: Sequence[ClipScore]) -> ClipScore | None:
    """The clip with the lowest score among those the head gives any weight."""
    weighted = [c for c in clips if c.weight > 0] or list(clips)
    return min(weighted, key=lambda c: (c.score, c.index)) if weighted else None


def json_payload(results: Sequence[VideoScore]) -> dict | list:
    """One object for one result, a list for several."""
    rows = [r.to_dict() for r in results]
    return rows[0] if len(rows) == 1 else rows


# ------------------------------------------------------------------------------------------------ CSV


def scores_frame(results: Sequence[VideoScore]):  # -> pandas.DataFrame
    import pandas as pd

    def trust(r: VideoScore) -> dict[str, Any]:
        i, d = (r.interval or {}) if r.ok else {}, (r.domain or {}) if r.ok else {}
        return {"target": r.target or None, "interval_low": i.get("low"), "interval_high": i.get("high"),
                "interval_level": i.get("level"), "interval_method": i.get("method"),
                "rank_below": (r.rank or {}).get("below") if r.ok else None, "domain_p": d.get("p_value"),
                "in_domain": d.get("in_domain")}

    rows = [{"path": str(r.input), "status": r.status, "score": r.score if r.ok else None,
             "score_min": r.scale.get("min"), "score_max": r.scale.get("max"), "unit": r.scale.get("unit"),
             "head": r.head_label, "preset": r.preset, "backbone": r.backbone, "clips": len(r.clips) if r.ok else None,
             "faithfulness": r.faithfulness if r.ok else None, "features": r.features_source or None,
             "error": r.error, **trust(r)} for r in results]
    columns = ["path", "status", "score", "score_min", "score_max", "unit", "head", "preset", "backbone", "clips",
               "faithfulness", "features", "error", "target", "interval_low", "interval_high", "interval_level",
               "interval_method", "rank_below", "domain_p", "in_domain"]
    # A nullable integer column: with a failed row (no clip count) a plain column would turn 7 into 7.0.
    return pd.DataFrame(rows, columns=columns).astype({"clips": "Int64"})


def clips_frame(results: Sequence[VideoScore]):  # -> pandas.DataFrame
    import pandas as pd

    rows = [{"path": str(r.input), "head": r.head_label, "preset": r.preset, "clip": c.index, "start_s": c.start_s,
             "end_s": c.end_s, "weight": c.weight, "score": c.score, "contribution": c.contribution,
             "effect": c.effect, "predicted_effect": c.predicted_effect, "faithfulness": r.faithfulness}
            for r in results if r.ok for c in r.clips]
    columns = ["path", "head", "preset", "clip", "start_s", "end_s", "weight", "score", "contribution", "effect",
               "predicted_effect", "faithfulness"]
    return pd.DataFrame(rows, columns=columns)


def write_csv(path: str | Path, frame) -> Path:  # noqa: ANN001 - a pandas.DataFrame
    """Write ``frame`` atomically (no index column)."""
    return write_text(path, frame.to_csv(index=False))


# ------------------------------------------------------------------------------------------------ timeline


def timeline_png(result: VideoScore, *, width_in: float = 10.0, dpi: int = 100) -> bytes:
    """:func:`timeline_figure` as PNG bytes."""
    buf = io.BytesIO()
    timeline_figure(result, width_in=width_in, dpi=dpi).savefig(buf, format="png")
    return buf.getvalue()


def timeline_figure(result: VideoScore, *, width_in: float = 10.0, dpi: int = 100):  # -> matplotlib Figure
    """The clips over time: above, weight as bars and score as a line; below, each clip's measured effect
    on the score. The clips the table marks (:func:`clip_marks`) are highlighted in both, and one legend above the
    panels, outside them, says what every colour and mark means."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    clips = result.clips
    marks = clip_marks(result)
    starts = np.array([c.start_s for c in clips])
    widths = np.array([max(c.end_s - c.start_s, 1e-3) for c in clips])
    weights = np.array([c.weight for c in clips])
    scores = np.array([c.score for c in clips])
    decimals = time_decimals(clips)

    # A figure object of its own (not pyplot): no global backend switch, nothing kept between calls. The
    # constrained layout makes room for the legend above the panels instead of drawing it over the bars.
    fig = Figure(figsize=(width_in, 6.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_fx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.bar(starts, weights, width=widths * 0.95, align="edge",
           color=[TOP_COLOUR if c.index in marks.heaviest else WEIGHT_COLOUR for c in clips])
    ax.set_ylabel("weight")
    ax.set_ylim(0, max(float(weights.max()) * 1.15 if len(weights) else 1.0, 1e-6))
    ax_fx.set_xlabel("time (m:ss)")
    # Whole-second ticks read m:ss; others get the clips' decimals.
    ax_fx.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: format_time(x, 0 if abs(x - round(x)) < 1e-6 else max(decimals, 1))))
    effects = np.array([c.effect if c.effect is not None else 0.0 for c in clips])
    ax_fx.bar(starts, effects, width=widths * 0.95, align="edge",
              color=[EFFECT_TOP_COLOUR if c.index in marks.moving else EFFECT_COLOUR for c in clips])
    ax_fx.axhline(0.0, color="#555555", lw=0.8)
    # The band of effects too small to matter (MATERIAL_SHARE of the scale), and an axis that always shows it:
    # effects of a few hundredths must look as small as they are, not fill the panel.
    if marks.threshold > 0:
        ax_fx.axhspan(-marks.threshold, marks.threshold, color=BAND_COLOUR, zorder=0)
        ax_fx.set_ylim(1.15 * min(float(effects.min()), -marks.threshold),
                       1.15 * max(float(effects.max()), marks.threshold))
    ax_fx.set_ylabel(f"effect ({result.scale.get('unit', 'points')})")
    ax_fx.set_title("what removing each clip does to the score: the score minus the score without it", fontsize=9)
    ax2 = ax.twinx()
    ax2.plot(starts + widths / 2, scores, "o-", color=SCORE_COLOUR, lw=1.6, ms=4)
    if marks.lowest is not None:
        low = next(c for c in clips if c.index == marks.lowest)
        ax2.plot([low.start_s + (low.end_s - low.start_s) / 2], [low.score], "v", color="#c0392b", ms=10)
    lo, hi = result.scale.get("min"), result.scale.get("max")
    if lo is not None and hi is not None and hi > lo:
        pad = 0.05 * (hi - lo)
        ax2.set_ylim(min(lo, float(scores.min()) if len(scores) else lo) - pad,
                     max(hi, float(scores.max()) if len(scores) else hi) + pad)
    ax2.set_ylabel(f"clip score ({result.scale.get('unit', 'points')})")

    handles = [Patch(color=WEIGHT_COLOUR, label="clip weight"),
               Line2D([], [], color=SCORE_COLOUR, marker="o", ms=4, lw=1.6, label="clip score")]
    if marks.heaviest:
        handles.append(Patch(color=TOP_COLOUR, label="★ heaviest weight"))
    if marks.lowest is not None:
        handles.append(Line2D([], [], color="#c0392b", marker="v", ms=8, lw=0, label="▼ lowest clip score"))
    handles.append(Patch(color=EFFECT_COLOUR, label="effect of a clip"))
    if marks.moving:
        handles.append(Patch(color=EFFECT_TOP_COLOUR, label="◆ moves the score most"))
    if marks.threshold > 0:
        handles.append(Patch(color=BAND_COLOUR, label=f"effects under {marks.threshold:.2f} "
                                                      f"({100 * MATERIAL_SHARE:g}% of the scale): negligible"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    flag = "" if not result.domain or result.domain["in_domain"] else "  [UNLIKE THE TRAINING VIDEOS]"
    fig.suptitle(f"{Path(result.input).name}: {result.target + ' ' if result.target else ''}{format_total(result)}"
                 f"  ({result.head_label}){flag}", fontsize=11)
    return fig


def write_plot(path: str | Path, result: VideoScore) -> Path:
    png = timeline_png(result)
    return write_bytes(path, png)


def plot_paths(path: str | Path, results: Sequence[VideoScore]) -> list[tuple[Path, VideoScore]]:
    """Where each video's timeline goes: ``path`` for one video, ``<stem>-<video stem><suffix>`` for several."""
    path = Path(path)
    firsts = primary_results(results)
    if len(firsts) == 1:
        return [(path, firsts[0])]
    used: dict[str, int] = {}
    placed = []
    for r in firsts:
        stem = Path(r.input).stem
        used[stem] = used.get(stem, 0) + 1
        name = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
        placed.append((path.with_name(f"{path.stem}-{name}{path.suffix or '.png'}"), r))
    return placed


def primary_results(results: Sequence[VideoScore]) -> list[VideoScore]:
    """The first head's successful result per input (the best head when several score each input); a total of
    several parts (fisv: TES + PCS) is the input's whole result, so it comes first."""
    seen: set[str] = set()
    firsts = []
    for r in sorted(results, key=lambda r: not r.parts):
        if r.ok and str(r.input) not in seen:
            seen.add(str(r.input))
            firsts.append(r)
    order = list(dict.fromkeys(str(r.input) for r in results))
    return sorted(firsts, key=lambda r: order.index(str(r.input)))


# ------------------------------------------------------------------------------------------------ HTML report


def middle_frames(video: str | Path, clips: Sequence[ClipScore], *, width: int = 320) -> dict[int, bytes]:
    """JPEG bytes of each clip's middle source frame, by clip index, read with our decoder."""
    from PIL import Image

    from aqa_cli.video import open_video

    wanted: dict[int, int] = {}
    for c in clips:
        if c.source_frame_start is not None and c.source_frame_end is not None:
            wanted[c.index] = (int(c.source_frame_start) + int(c.source_frame_end) - 1) // 2
    if not wanted:
        return {}
    frames: dict[int, np.ndarray] = {}
    with open_video(video) as reader:
        for idxs, chunk in reader.iter_chunks(sorted(set(wanted.values()))):
            for i, frame in zip(idxs, chunk):
                frames[i] = frame
    out = {}
    for clip_index, frame_index in wanted.items():
        image = Image.fromarray(frames[frame_index])
        image.thumbnail((width, width * 4))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        out[clip_index] = buf.getvalue()
    return out


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1080px;
       color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .sub { color: #666; margin-top: 0; }
section { border-top: 1px solid #ddd; padding-top: 1rem; margin-top: 1.5rem; }
.total { font-size: 2.4rem; font-weight: 700; margin: 0.3rem 0; }
.demo { background: #fff3cd; border: 1px solid #e0c36b; padding: 0.4rem 0.7rem; border-radius: 4px; }
.meta { color: #555; font-size: 0.9rem; } .timeline { width: 100%; max-width: 1000px; }
.clips { display: flex; flex-wrap: wrap; gap: 0.8rem; }
figure { margin: 0; width: 200px; } figure img { width: 200px; border-radius: 3px; }
figcaption { font-size: 0.85rem; color: #333; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { padding: 0.2rem 0.6rem; text-align: left; }
tr:nth-child(even) { background: #f5f5f5; } .failed { color: #b00020; } .note { color: #8a6d3b; } .unfaithful { font-weight: 600; }
table.per-clip td:not(:nth-child(2)) { text-align: right; } tr.moving { color: #8e44ad; font-weight: 600; }
th small { font-weight: 400; color: #666; } .legend { color: #444; font-size: 0.85rem; padding-left: 1.2rem; }
"""

# Marks every image once the page has loaded: data-rendered="yes" when it decoded to a picture.
# A browser test reads it back from the DOM; a reader never sees it.
_SCRIPT = """window.addEventListener('load', function () {
  for (const img of document.images) { img.dataset.rendered = (img.complete && img.naturalWidth > 0) ? 'yes' : 'no'; }
});"""


def _clip_table(result: VideoScore, marks: ClipMarks) -> str:
    """Every clip in time order: when, its weight and score, its part of the total, its measured effect, marks."""
    e = html.escape
    decimals = time_decimals(result.clips)
    unit = e(result.scale.get("unit", "points"))
    rows = []
    for c in result.clips:
        effect = f"{c.effect:+.2f}" if c.effect is not None else "–"
        cls = ' class="moving"' if c.index in marks.moving else ""
        rows.append(f"<tr{cls}><td>{c.index}</td><td>{e(format_range(c, decimals))}</td><td>{c.weight:.3f}</td>"
                    f"<td>{c.score:.2f}</td><td>{c.contribution:.2f}</td><td>{effect}</td>"
                    f"<td>{e(marks.symbols(c.index))}</td></tr>")
    head = ("<tr><th>clip</th><th>time (m:ss)</th><th>weight<br><small>how much it counts</small></th>"
            f"<th>clip score<br><small>{unit}</small></th><th>weight × score<br><small>its part of the total</small>"
            "</th><th>effect<br><small>total minus the total without it</small></th><th></th></tr>")
    legend = "".join(f"<li>{e(line)}</li>" for line in marks.legend())
    return (f'<table class="per-clip">{head}{"".join(rows)}</table><ul class="legend">{legend}</ul>')


def _video_section(k: int, result: VideoScore, others: Sequence[VideoScore], *, heading: bool) -> str:
    e = html.escape
    marks = clip_marks(result)
    parts = [f'<section id="video-{k}">']
    if heading:  # one video: the page's own title names it already
        parts.append(f"<h2>{e(Path(result.input).name)}</h2>")
    parts.append(f'<p class="total">{e(result.target + ": " if result.target else "")}{e(format_total(result))}</p>')
    for part in result.parts:
        parts.append(f'<p class="total">{e(part.target)}: {e(format_total(part))}</p>')
    for r in (*result.parts, result):
        if r.rank:
            parts.append(f'<p class="meta">{e(r.target or "score")}: {e(rank_phrase(r))}, as judged.</p>')
    for kind, line in trust_lines(result):
        parts.append(f'<p class="{"note unfaithful" if kind == "warning" else "note" if kind == "note" else "meta"}">'
                     f'{e(line)}.</p>')
    if result.demonstration:
        parts.append(f'<p class="demo">Note: {e(result.demonstration)}.</p>')
    parts.append(f'<p class="meta">{e(head_description(result))} · {len(result.clips)} clips · '
                 f'{e(str(result.input))}</p>')
    lines = []
    if result.additive:
        lines.append("added to the clips' parts: " + ", ".join(f"{e(k)} {v:+.2f}" for k, v in result.additive.items()))
    if result.extras.get("action_text"):
        lines.append(f"action: {e(result.extras['action_text'])}")
    if result.extras.get("commentary"):
        lines.append(f"commentary: &ldquo;{e(result.extras['commentary'])}&rdquo;")
    if result.extras.get("decomposition"):
        lines.append(f"clip scores: {e(result.extras['decomposition'])}")
    grades = result.extras.get("grades")
    if grades:
        lines.append("grade probabilities: " + ", ".join(f"{g['value']:.1f}: {100 * g['prob']:.0f}%" for g in grades))
    if lines:
        parts.append("<p>" + "<br>".join(lines) + "</p>")
    for w in result.warnings:
        parts.append(f'<p class="note">warning: {e(w)}</p>')
    parts.append(f'<img class="timeline" id="timeline-{k}" alt="timeline of clip weights, scores and effects" '
                 f'src="{_data_uri(timeline_png(result), "image/png")}">')
    if others:
        rows = "".join(f"<tr><td>{e(o.head_label)}</td><td>{o.score:.2f}</td></tr>" for o in others)
        parts.append(f"<h3>All heads</h3><table><tr><th>head</th><th>score</th></tr>{rows}</table>")

    # Frames of the clips whose removal changes the score materially (measured), largest first; where none does,
    # the page says so instead of presenting negligible effects as the ones that matter.
    moving = material_effects(result)
    floor = f"{material_threshold(result):.2f} {result.scale.get('unit', 'points')}"
    if moving:
        parts.append(f"<h3>The clips that change the score most</h3><p>Removing each of these clips changes the "
                     f"score by {e(floor)} or more ({100 * MATERIAL_SHARE:g}% of the scale), largest first.</p>")
    else:
        parts.append(f"<h3>No single clip stands out</h3><p>Removing any one clip changes the score by less than "
                     f"{e(floor)} ({100 * MATERIAL_SHARE:g}% of the scale): the score comes from the performance "
                     "as a whole.</p>")
    thumbs: dict[int, bytes] = {}
    reason = None
    # Where the video is not there (or cannot be verified) the page says so, whether or not frames would be shown.
    if result.video is None and result.video_note:
        reason = result.video_note
    elif result.video is None and result.features_source == "file":
        reason = ("the video these features were made from is not reachable (moved, changed or never recorded), "
                  "so no frames are shown")
    elif moving and result.video is not None:
        try:
            thumbs = middle_frames(result.video, moving)
        except AqaError as exc:
            reason = f"frames could not be read ({exc.message})"
        if not thumbs and reason is None:
            reason = "the clips' source frames are not recorded, so no frames are shown"
    if reason:
        parts.append(f'<p class="note no-video">{e(reason)}.</p>')
    figures = []
    decimals = time_decimals(result.clips)
    for c in moving:
        img = (f'<img class="thumb" alt="middle frame of clip {c.index}" src="{_data_uri(thumbs[c.index], "image/jpeg")}">'
               if c.index in thumbs else "")
        # effect = S − S(without the clip): a positive effect means the score would be lower without it.
        change = f"{abs(c.effect):.2f} {result.scale.get('unit', 'points')} {'lower' if c.effect > 0 else 'higher'}"
        figures.append(f"<figure>{img}<figcaption>clip {c.index}, {format_range(c, decimals)}<br>"
                       f"without it the score would be {e(change)}</figcaption></figure>")
    if figures:
        parts.append(f'<div class="clips">{"".join(figures)}</div>')
    parts.append("<h3>Every clip</h3>")
    parts.append(_clip_table(result, marks))
    parts.append(f'<p class="{"explained" if result.explanation_faithful else "note unfaithful"}">'
                 f'{e(explanation_line(result)[0].upper() + explanation_line(result)[1:])}.</p></section>')
    return "\n".join(parts)


def render_report(results: Sequence[VideoScore], *, agreement: dict[str, Any] | None = None) -> str:
    """The HTML page for ``results`` (several heads per input: the first is shown in full)."""
    e = html.escape
    firsts = primary_results(results)
    inputs = list(dict.fromkeys(str(r.input) for r in results))
    name = Path(inputs[0]).name if len(inputs) == 1 else f"{len(inputs)} inputs"
    body = [f"<h1>{e(name)}</h1>"]
    head_names = ", ".join(dict.fromkeys(r.head_label for r in results if r.head_label))
    body.append(f'<p class="sub">scored by aqa · {len(firsts)} of {len(inputs)} scored · head: {e(head_names)}</p>')
    if len(inputs) > 1:
        rows = []
        for path in inputs:
            mine = [r for r in results if str(r.input) == path]
            best = next((r for r in mine if r.ok), None)
            cell = e(format_total(best)) if best else f'<span class="failed">failed: {e(mine[0].error or "")}</span>'
            rows.append(f"<tr><td>{e(Path(path).name)}</td><td>{cell}</td></tr>")
        body.append(f"<table><tr><th>input</th><th>score</th></tr>{''.join(rows)}</table>")
    for k, first in enumerate(firsts):
        others = [r for r in results if r.ok and str(r.input) == str(first.input)]
        body.append(_video_section(k, first, others if len(others) > 1 else [], heading=len(inputs) > 1))
    for path in inputs:
        bad = [r for r in results if str(r.input) == path and not r.ok]
        if bad and all(not r.ok for r in results if str(r.input) == path):
            body.append(f'<section><h2>{e(Path(path).name)}</h2><p class="failed">{e(bad[0].error or "failed")}</p>'
                        "</section>")
    if agreement and agreement.get("pairwise_spearman"):
        rows = "".join(f"<tr><td>{e(p['heads'][0])} · {e(p['heads'][1])}</td><td>{p['spearman']:.3f}</td>"
                       f"<td>{p['n']}</td></tr>" for p in agreement["pairwise_spearman"])
        body.append(f"<section><h2>Agreement between heads</h2><p>How alike two heads rank the videos (Spearman ρ: "
                    f"1 = the same order, 0 = unrelated).</p><table><tr><th>heads</th><th>ρ</th>"
                    f"<th>videos</th></tr>{rows}</table></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>aqa score report: {e(name)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def write_report(path: str | Path, results: Sequence[VideoScore], *, agreement: dict[str, Any] | None = None) -> Path:
    page = render_report(results, agreement=agreement)
    return write_text(path, page)
