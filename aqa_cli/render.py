"""What the ``aqa`` command line prints: tables, marks, summaries and progress bars (rich).

``cli.py`` parses arguments and calls the library; everything a person reads on the terminal is drawn here, from
the library's result objects, so the wording of the output lives in one place.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from aqa_cli import __version__

out = Console()
err = Console(stderr=True)


def package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def render_info() -> None:
    """Versions, devices, video decoders and cached weights."""
    import torch

    from aqa_cli.video import available_decoders
    from aqa_cli.weights import aqa_home, cached_path, is_cached, list_specs

    table = Table(title=f"aqa {__version__}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("python", platform.python_version())
    for pkg in ("torch", "torchvision", "pytorchvideo", "numpy", "typer", "rich", "pandas", "safetensors", "matplotlib"):
        table.add_row(pkg, package_version(pkg))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        table.add_row("devices", f"cuda ({names}), cpu ({torch.get_num_threads()} threads)")
    else:
        table.add_row("devices", f"cpu ({torch.get_num_threads()} threads); no CUDA device")
    for name, version in available_decoders().items():
        table.add_row(f"decoder {name}", version or "[red]not available[/red]")
    table.add_row("AQA_HOME", str(aqa_home()))
    for spec in list_specs():
        state = f"cached ({cached_path(spec.name).stat().st_size / 2**20:.0f} MiB)" if is_cached(spec.name) else "not cached"
        table.add_row(f"weights {spec.name}", state)
    out.print(table)


class ClipRate(ProgressColumn):
    """Clips per second over the whole run, not the jittery instantaneous rate."""

    def __init__(self, start: float):
        super().__init__()
        self.start = start
        self.done = 0

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        return Text(f"{rate:5.2f} clips/s", style="cyan")


def render_score(r, top_n: int | None = None) -> None:  # noqa: ANN001 - a VideoScore
    from aqa_cli.report import (
        explanation_line, format_range, format_total, heaviest, highlight_count, largest_effects, lowest_scoring,
    )

    n_marked = highlight_count(len(r.clips))
    moving = {c.index for c in largest_effects(r.clips, n_marked)}
    # The head's own "heaviest" and "lowest score" are reasons only where its explanation is faithful; uniform
    # weights (the mtl head averages its clips) have no heaviest clip to point at either.
    uniform = len(r.clips) > 1 and max(c.weight for c in r.clips) - min(c.weight for c in r.clips) < 1e-9
    faithful = r.explanation_faithful
    top = set() if uniform or not faithful else {c.index for c in heaviest(r.clips, n_marked)}
    low = lowest_scoring(r.clips) if faithful else None
    shown = r.clips
    if top_n is not None and top_n < len(r.clips):
        # The N clips that matter most, by measured effect (by weight when effects are unknown), in time order.
        keep = {c.index for c in (largest_effects(r.clips, top_n) or heaviest(r.clips, top_n))}
        shown = [c for c in r.clips if c.index in keep]
    title = f"{r.input} · {r.head_label}" + (f" · the {len(shown)} of {len(r.clips)} clips that move the score most"
                                             if len(shown) < len(r.clips) else "")
    table = Table(title=title, title_justify="left")
    table.add_column("clip", justify="right")
    table.add_column("time")
    table.add_column("weight", justify="right")
    table.add_column("score", justify="right")
    table.add_column("w·s", justify="right")
    table.add_column("effect", justify="right")
    table.add_column("")
    for c in shown:
        marks, style = [], None
        if c.index in moving:
            marks.append("◆ top effect")
            style = "bold magenta"
        if c.index in top:
            marks.append("★ heaviest")
            style = style or "bold yellow"
        if low is not None and c.index == low.index:
            marks.append("▼ lowest score")
            style = style or "red"
        effect = f"{c.effect:+.2f}" if c.effect is not None else "–"
        table.add_row(str(c.index), format_range(c), f"{c.weight:.3f}", f"{c.score:.2f}", f"{c.contribution:.2f}",
                      effect, ", ".join(marks), style=style)
    out.print(table)
    out.print(f"[bold]Total: {format_total(r)}[/bold]", highlight=False)
    line = explanation_line(r)
    out.print(f"  effect = score − the same head's score without that clip. {line[0].upper() + line[1:]}.",
              highlight=False, style=None if faithful else "yellow")
    if r.additive:
        weighted = sum(c.contribution for c in r.clips)
        terms = " ".join(f"+ {k} {v:.2f}" for k, v in r.additive.items())
        out.print(f"  = Σ w·s {weighted:.2f} {terms}", highlight=False)
    if r.extras.get("action_text"):
        out.print(f"  action: {r.extras['action_text']}", highlight=False)
    if "commentary" in r.extras:
        line = r.extras["commentary"]
        shown = f'"{line}"' if line else "(none: the head was trained without captions)"
        out.print(f"  commentary: {shown}", highlight=False)
    if r.extras.get("scale"):
        out.print(f"  scale: {r.extras['scale']}", highlight=False)
    if r.extras.get("exemplars"):
        ex = r.extras["exemplars"]
        out.print(f"  exemplars ({len(ex)}, score + difference): "
                  + " · ".join(f"{e['id']} {e['score']:.2f} {e['difference']:+.2f}" for e in ex), highlight=False)
    if r.extras.get("steps"):
        out.print("  steps: " + " · ".join(f"{run['step']} {run['start_s']:.2f}–{run['end_s']:.2f} s"
                                          if "start_s" in run else run["step"] for run in r.extras["steps"]),
                  highlight=False)
    if r.extras.get("decomposition"):
        out.print(f"  clip scores: {r.extras['decomposition']}", highlight=False)
    grades = r.extras.get("grades")
    if grades:
        out.print("  grade probabilities: " + " · ".join(f"{g['value']:.1f}: {100 * g['prob']:.0f}%" for g in grades),
                  highlight=False)
    if r.extras.get("member_scores"):
        out.print("  ensemble members: " + " ".join(f"{s:.2f}" for s in r.extras["member_scores"]), highlight=False)
    cv = f", CV ρ {r.cv_spearman:.3f}" if r.cv_spearman is not None else ""
    members = f", {r.members}-model ensemble" if r.members > 1 else ""
    out.print(f"  preset {r.preset or 'none'} · head {r.head} ({r.head_path.name if r.head_path else '?'}{members}{cv})"
              f" · backbone {r.backbone} (features from {r.features_source})", highlight=False, style="dim")
    if r.demonstration:
        out.print(f"  [yellow]Note: {r.demonstration}[/yellow]", highlight=False)
    for w in r.warnings:
        out.print(f"  [yellow]warning[/yellow] {w}", highlight=False)


def render_agreement(agreement: dict) -> None:
    heads = agreement["heads"]
    # Shipped heads share the preset prefix (fisv-pcs-gdlt, fisv-pcs-interp): the columns show what differs.
    prefix = os.path.commonprefix(heads) if len(heads) > 1 else ""
    prefix = prefix[: prefix.rfind("-") + 1]
    table = Table(title=f"agreement between heads{f' ({prefix}…)' if prefix else ''}", title_justify="left")
    table.add_column("input", overflow="fold")
    for h in heads:
        table.add_column(h[len(prefix):], justify="right")
    table.add_column("spread (% of scale)", justify="right")
    table.add_column("same top-effect clip")
    for v in agreement["videos"]:
        table.add_row(Path(v["video"]).name, *[f"{v['scores'][h]:.2f}" if h in v["scores"] else "–" for h in heads],
                      f"{v['spread']:.2f} ({100 * v['spread_of_scale']:.0f}%)",
                      "yes" if v["top_effect_clip_agrees"] else "no")
    out.print(table)
    for p in agreement["pairwise_spearman"]:
        out.print(f"  Spearman ρ {p['heads'][0]} vs {p['heads'][1]}: {p['spearman']:.3f} over {p['n']} inputs",
                  highlight=False)


def render_batch(results) -> None:  # noqa: ANN001 - list[VideoScore]
    from aqa_cli.report import format_range, format_total, largest_effects

    table = Table(title="summary", title_justify="left")
    for col in ("input", "head", "score", "moves the score most", "faithfulness", "status"):
        table.add_column(col)
    for r in results:
        top = largest_effects(r.clips, 1) if r.ok else []
        moves = f"clip {top[0].index} ({format_range(top[0])}, {top[0].effect:+.2f})" if top else "–"
        faith = f"{r.faithfulness:.2f}" if r.ok and r.faithfulness is not None else "–"
        table.add_row(str(r.input), r.head_label, format_total(r) if r.ok else "–", moves, faith,
                      "[green]ok[/green]" if r.ok else f"[red]failed[/red]: {r.error}")
    out.print(table)


def json_field(meta: dict, key: str) -> dict:
    import json as _json

    try:
        return _json.loads(meta.get(key, "{}")) or {}
    except ValueError:
        return {}


class DownloadBar:
    """A rich download bar that appears with the first byte (not at all when nothing is downloaded)."""

    def __init__(self) -> None:
        from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        self.bar = Progress(TextColumn("download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=err)
        self.task = self.bar.add_task("download", total=None)
        self.started = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        self.bar.update(self.task, completed=done, total=total)

    def log(self, message: str) -> None:
        self.bar.console.print(message, highlight=False, soft_wrap=True)

    def __enter__(self) -> DownloadBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bar.stop()


def report_installed(name: str, target: Path) -> None:
    from aqa_cli.weights import read_safetensors

    _, meta = read_safetensors(target)
    out.print(f"{name}: {target}")
    out.print(f"  source sha256 {meta.get('source_sha256')} ({meta.get('source_check')})", highlight=False)
    if meta.get("source_check", "").startswith("unpinned"):
        err.print("[yellow]warning[/yellow] this file could not be checked against the official release's pin",
                  highlight=False)
    if "classes" in meta:
        out.print(f"  class names: {meta.get('classes_source', 'from the checkpoint package')}", highlight=False)
    elif "num_classes" in meta:
        out.print(f"  no class names: --show-pred prints class indices until you run "
                  f"`aqa weights labels {name} FILE`", highlight=False)


def cv_folds(cv: dict) -> str:
    """"5-fold", or "3 × 5-fold" for a cross-validation repeated over several fold draws."""
    repeats = int(cv.get("repeats", 1))
    return f"{repeats} × {cv['folds']}-fold" if repeats > 1 else f"{cv['folds']}-fold"


def render_weights_list() -> None:
    """Known checkpoints, where each comes from, its pinned sha256, and whether it is cached."""
    from aqa_cli.fileio import sha256_file
    from aqa_cli.heads.checkpoint import shipped_heads
    from aqa_cli.weights import cached_path, is_cached, list_specs

    t = Table()
    for col in ("name", "kind", "source", "pinned (source file)", "cached"):
        t.add_column(col, overflow="fold")
    for s in list_specs():
        t.add_row(s.name, s.kind, s.source, s.describe_pin(), str(cached_path(s.name)) if is_cached(s.name) else "no")
    for h in shipped_heads():
        cv = json_field(h.metadata, "cv")
        what = f"{h.head} head, {h.metadata.get('preset') or h.target}" + (
            f", {cv_folds(cv)} CV ρ {cv['mean_spearman']:.3f}" if cv else "")
        faith, where = h.faithfulness
        what += f", faithfulness {faith:.2f} ({where})" if faith is not None else ", faithfulness not measured"
        t.add_row(h.path.stem, "head", f"{what} (shipped in weights/)", f"sha256 {sha256_file(h.path)}", str(h.path))
    out.print(t)


def render_extraction(outcomes, out_dir: Path, *, show_pred: bool, bb, weights: str | None) -> None:  # noqa: ANN001
    """The top-5 tables (--show-pred), the counts, and the failures of an extract-features run."""
    if show_pred:
        if bb.weights_source is not None and bb.class_names is None:
            err.print(f"[yellow]note[/yellow] {weights} carries no class names, so classes are shown by index",
                      highlight=False)
        elif bb.class_names is None:
            err.print(f"[yellow]note[/yellow] {bb.spec.weights} has no class names, so classes are shown by index; "
                      f"add them with `aqa weights labels {bb.spec.weights} FILE`", highlight=False)
        for o in outcomes:
            if o.predictions:
                shown = weights if bb.weights_source is not None else bb.spec.weights
                t = Table(title=f"{o.video.name}: top-5 classes ({shown})", title_justify="left")
                t.add_column("label")
                t.add_column("prob", justify="right")
                for p in o.predictions:
                    t.add_row(p["label"], f"{p['prob']:.4f}")
                out.print(t)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("extracted", "skipped", "failed")}
    out.print(f"{counts['extracted']} extracted, {counts['skipped']} skipped (already complete), "
              f"{counts['failed']} failed → {out_dir}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        err.print("[red]Failures:[/red]")
        for o in failed:
            err.print(f"  {o.error}", highlight=False, soft_wrap=True)


def render_training(log: dict, *, head: str, folds: int) -> None:
    """The cross-validation table of an `aqa train` run, and where its checkpoint went."""
    for note in log.get("notes", []):
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if "cv" in log:
        cv = log["cv"]
        what = f"{cv.get('repeats', 1)} × {folds}-fold" if cv.get("repeats", 1) > 1 else f"{folds}-fold"
        table = Table(title=f"{what} cross-validation ({log['target']}, {log['n_videos']} videos)")
        table.add_column("fold", justify="right")
        table.add_column("videos", justify="right")
        table.add_column("Spearman ρ", justify="right")
        for k, (rho, n) in enumerate(zip(cv["fold_spearman"], cv["fold_sizes"]), start=1):
            table.add_row(str(k), str(n), f"{rho:.3f}")
        table.add_row("mean ± std", "", f"{cv['mean_spearman']:.3f} ± {cv['std_spearman']:.3f}", style="bold")
        if "se_spearman" in cv:
            table.add_row("mean ± s.e.", "", f"{cv['mean_spearman']:.3f} ± {cv['se_spearman']:.3f}", style="bold")
        out.print(table)
        if "explanation" in cv:
            ex = cv["explanation"]
            out.print(f"explanations (held-out videos): faithfulness ρ(D^, D) {ex['faithfulness']:.3f}, "
                      f"deletion area {ex['deletion_area']:+.4f} of the scale")
        out.print(f"out-of-fold: ρ {cv['oof']['spearman']:.3f}, Pearson {cv['oof']['pearson']:.3f}, "
                  f"R-ℓ2×100 {cv['oof']['rl2_x100']:.3f}, MAE {cv['oof']['mae']:.2f}")
    out.print(f"wrote {log['checkpoint']} ({log['train_seconds']:.0f} s) and its log "
              f"{Path(log['checkpoint']).with_suffix('.log.json')}")


def render_caption_check(summary: dict, preset: str) -> None:
    """convert-labels: what was written, and whether the captions agree with the preset's class names."""
    out.print(f"wrote {summary['out']}: {summary['rows']} dives, {summary['captions']} with a caption", highlight=False)
    check = summary.get("caption_check")
    if not check:
        return
    table = Table(title="Do the captions name each code's class? (share of that code's captions using the words)",
                  title_justify="left")
    for col in ("sub-task", "code", "schema class", "captions", "named in captions", "verdict"):
        table.add_column(col)
    for row in check:
        shares = " · ".join(f"{name} {100 * v:.0f}%" for name, v in row["shares"].items())
        style = {"agrees": "green", "disagrees": "bold red"}.get(row["verdict"])
        table.add_row(row["subtask"], str(row["code"]), row["schema_class"], str(row["captions"]), shares,
                      row["verdict"], style=style)
    out.print(table)
    wrong = sorted({r["subtask"] for r in check if r["verdict"] == "disagrees"})
    if wrong:
        out.print(f"[bold red]warning[/bold red] the captions disagree with preset {preset}'s class order for "
                  f"{', '.join(wrong)}: the names written above may be wrong; reorder those classes in the "
                  "preset (code k is the k-th class) and convert again", highlight=False)


def render_evaluation(results, overall: float | None, *, features: Path, explanations: bool) -> None:  # noqa: ANN001
    """The metrics table of `aqa evaluate`."""
    for r in results:
        for note in r.notes:
            err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    table = Table(title=f"evaluation on {features}")
    cols = ["weights", "head", "target", "n", "Spearman ρ", "Pearson r", "R-ℓ2×100", "MAE"]
    if explanations:
        cols += ["faithfulness", "deletion area"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("weights", "head", "target") else "right")
    for r in results:
        m = r.metrics
        row = [r.weights.name, r.head, r.target, str(m["n"]), f"{m['spearman']:.3f}", f"{m['pearson']:.3f}",
               f"{m['rl2_x100']:.3f}", f"{m['mae']:.2f}"]
        if explanations:
            row += [f"{m['faithfulness']:.3f}", f"{m['deletion_area']:+.4f}"]
        table.add_row(*row)
    out.print(table)
    if overall is not None:
        out.print(f"Fisher-z mean Spearman ρ: [bold]{overall:.3f}[/bold]")
