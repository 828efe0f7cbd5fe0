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


def note(text: str, *, style: str | None = None, indent: int = 2, console: Console | None = None) -> None:
    """A line of explanation under a table, wrapped to the terminal with its indent kept on every line."""
    console = console or out
    for line in Text(text, style=style or "").wrap(console, max(console.width - indent, 20)):
        line.rstrip()
        console.print(Text(" " * indent) + line, highlight=False)


def render_score(r, top_n: int | None = None) -> None:  # noqa: ANN001 - a VideoScore
    from aqa_cli.report import (
        clip_marks, explanation_line, format_range, head_description, heaviest, largest_effects,
        time_decimals,
    )

    marks = clip_marks(r)
    decimals = time_decimals(r.clips)
    shown = r.clips
    if top_n is not None and top_n < len(r.clips):
        # The N clips that matter most, by measured effect (by weight when effects are unknown), in time order.
        keep = {c.index for c in (largest_effects(r.clips, top_n) or heaviest(r.clips, top_n))}
        shown = [c for c in r.clips if c.index in keep]
    title = f"{r.input} · {r.head_label}" + (f" · the {len(shown)} of {len(r.clips)} clips with the largest effects"
                                             if len(shown) < len(r.clips) else "")
    table = Table(title=title, title_justify="left")
    table.add_column("clip", justify="right")
    table.add_column("time (m:ss)")
    table.add_column("weight", justify="right")
    table.add_column("score", justify="right")
    table.add_column("w·s", justify="right")
    table.add_column("effect", justify="right")
    table.add_column("")
    for c in shown:
        style = ("bold magenta" if c.index in marks.moving else "bold yellow" if c.index in marks.heaviest
                 else "red" if c.index == marks.lowest else None)
        effect = f"{c.effect:+.2f}" if c.effect is not None else "–"
        table.add_row(str(c.index), format_range(c, decimals), f"{c.weight:.3f}", f"{c.score:.2f}",
                      f"{c.contribution:.2f}", effect, marks.symbols(c.index), style=style)
    out.print(table)
    for line in marks.legend():
        note(line)
    render_trust(r)
    line = explanation_line(r)
    note(f"w·s = weight × score, the clip's part of the total; effect = the score minus the same head's score "
         f"without that clip. {line[0].upper() + line[1:]}.", style=None if r.explanation_faithful else "yellow")
    if r.additive:
        weighted = sum(c.contribution for c in r.clips)
        terms = " ".join(f"+ {k} {v:.2f}" for k, v in r.additive.items())
        note(f"= Σ w·s {weighted:.2f} {terms}")
    if r.extras.get("action_text"):
        note(f"action: {r.extras['action_text']}")
    if "commentary" in r.extras:
        said = r.extras["commentary"]
        note("commentary: " + (f'"{said}"' if said else "(none: the head was trained without captions)"))
    if r.extras.get("scale"):
        note(f"scale: {r.extras['scale']}")
    if r.extras.get("exemplars"):
        ex = r.extras["exemplars"]
        note(f"exemplars ({len(ex)}, score + difference): "
             + " · ".join(f"{e['id']} {e['score']:.2f} {e['difference']:+.2f}" for e in ex))
    if r.extras.get("steps"):
        note("steps: " + " · ".join(f"{run['step']} {run['start_s']:.2f}–{run['end_s']:.2f} s"
                                    if "start_s" in run else run["step"] for run in r.extras["steps"]))
    if r.extras.get("decomposition"):
        note(f"clip scores: {r.extras['decomposition']}")
    grades = r.extras.get("grades")
    if grades:
        note("grade probabilities: " + " · ".join(f"{g['value']:.1f}: {100 * g['prob']:.0f}%" for g in grades))
    if r.extras.get("member_scores"):
        members = r.extras["member_scores"]
        note(f"the {len(members)} averaged models' scores: " + " ".join(f"{s:.2f}" for s in members))
    note(head_description(r), style="dim")
    if r.demonstration:
        note(f"Note: {r.demonstration}", style="yellow")
    for w in r.warnings:
        note(f"warning: {w}", style="yellow")


def render_trust(r) -> None:  # noqa: ANN001 - a VideoScore
    """The score with its interval and rank (a total: each part's too), then what they mean, the domain check and
    any note, in words."""
    from aqa_cli.report import format_total, rank_phrase, trust_lines

    for q in (*r.parts, r):
        name = q.target if r.parts else "Total"
        rank = rank_phrase(q)
        note(f"{name}: {format_total(q)}" + (f" · {rank}" if rank else ""), style="bold", indent=0)
    for kind, line in trust_lines(r):
        style = {"warning": "bold red", "note": "yellow"}.get(kind)
        note(f"{'⚠ ' if kind == 'warning' else ''}{line[0].upper() + line[1:]}.", style=style)


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


def distinct_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest trailing part that no other path ends with: the basename, unless two share it (then
    ``a/x.mp4`` and ``b/x.mp4``)."""
    parts = {p: Path(p).parts or (p,) for p in dict.fromkeys(paths)}
    names = {}
    for p, own in parts.items():
        for k in range(1, len(own) + 1):
            tail = own[-k:]
            if not any(q != p and other[-k:] == tail for q, other in parts.items()):
                break
        names[p] = str(Path(*tail))
    return names


def render_batch(results) -> None:  # noqa: ANN001 - list[VideoScore]
    """One row per input (and head): the score, the clip that moves it most, whether the video is like the head's
    training videos, and whether it failed (the reason is in the list of failures printed after it)."""
    from aqa_cli.report import format_range, format_total, material_effects, time_decimals

    names = distinct_names([str(r.input) for r in results])
    heads = list(dict.fromkeys(r.head_label for r in results if r.head_label))
    several_heads = len(heads) > 1
    title = "summary" + (f" ({heads[0]})" if len(heads) == 1 else "")
    table = Table(title=title, title_justify="left")
    table.add_column("input", overflow="fold")
    if several_heads:
        table.add_column("head", overflow="fold")
    table.add_column("score")
    table.add_column("clip that moves it most", overflow="fold")
    table.add_column("faithful", justify="right")
    # Whether each video is like the head's training videos, where a head checks it (the p-value is in its table).
    show_domain = any(r.ok and r.domain for r in results)
    if show_domain:
        table.add_column("domain")
    table.add_column("status")
    several_targets = len({r.target for r in results if r.ok and r.target}) > 1
    for r in results:
        top = material_effects(r, 1) if r.ok else []
        if top:
            moves = f"{top[0].index}: {format_range(top[0], time_decimals(r.clips))}, {top[0].effect:+.2f}"
        else:
            moves = "none stands out" if r.ok else "–"
        faith = f"{r.faithfulness:.2f}" if r.ok and r.faithfulness is not None else "–"
        domain = "–" if not r.ok or not r.domain else "like" if r.domain["in_domain"] else "[bold red]UNLIKE[/bold red]"
        label = f"{r.target} " if r.target and r.ok and several_targets else ""
        score = label + format_total(r).replace(f" {r.scale.get('unit', 'points')}", "", 1) if r.ok else "–"
        row = [names[str(r.input)], *([r.head_label] if several_heads else []), score, moves, faith,
               *([domain] if show_domain else []), "[green]ok[/green]" if r.ok else "[red]failed[/red]"]
        table.add_row(*row)
    out.print(table)
    scored = [r for r in results if r.ok]
    if scored:
        note(f"score in {scored[0].scale.get('unit', 'points')}; clip: its number, time and effect (the score minus "
             f"the score without it); faithful: 1 when the head's weights rank the clips as their effects do.")


def json_field(meta: dict, key: str) -> dict:
    import json as _json

    try:
        return _json.loads(meta.get(key, "{}")) or {}
    except ValueError:
        return {}


class StepProgress:
    """A progress line on stderr for a run of named steps, some counted (``update(what, done, total)``); a log file
    (stderr not a terminal) gets one line per step instead of a live bar."""

    def __init__(self) -> None:
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True)
        self.task = self.bar.add_task("", total=None)
        self.last = ""

    def update(self, what: str, done: int, total: int | None) -> None:
        if not err.is_terminal and what != self.last:
            err.print(f"[dim]{what}…[/dim]", highlight=False)
        self.last = what
        self.bar.update(self.task, description=what, completed=done, total=total)

    def __enter__(self) -> StepProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


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
    """Known checkpoints, where each comes from, its pinned sha256, and whether it is cached.

    One block per checkpoint, one fact per line, so that nothing is cut mid-word at 80 columns: a full sha256 takes
    75 of them; an address longer than the terminal is printed whole on its own line, to be copied."""
    from aqa_cli.fileio import sha256_file
    from aqa_cli.heads.checkpoint import shipped_heads
    from aqa_cli.weights import cached_path, is_cached, list_specs

    def field(label: str, value: str) -> None:
        if 4 + len(label) + 1 + len(value) <= out.width or " " in value:
            note(f"{label} {value}", indent=4)
        else:  # an address or path with no space to break at: whole, on a line of its own, indented if it fits
            note(label, indent=4)
            out.print(" " * (6 if 6 + len(value) <= out.width else 0) + value, soft_wrap=True, highlight=False)

    out.print("[bold]backbone weights[/bold] (fetched on first use; `aqa weights fetch NAME`)")
    for s in list_specs():
        cached = is_cached(s.name)
        out.print(f"  [bold]{s.name}[/bold] · {s.kind} · {'cached' if cached else 'not cached'}", highlight=False)
        field("from", s.source)
        pin = s.describe_pin()
        field("sha256" if s.pin_kind == "sha256" else "pin", pin)
        if cached:
            field("file", str(cached_path(s.name)))
    out.print("[bold]scoring heads[/bold] (shipped in weights/)")
    for h in shipped_heads():
        cv = json_field(h.metadata, "cv")
        what = f"{h.head} head, {h.metadata.get('preset') or h.target}" + (
            f", {cv_folds(cv)} CV ρ {cv['mean_spearman']:.3f}" if cv else "")
        faith, where = h.faithfulness
        what += f", faithfulness {faith:.2f} ({where})" if faith is not None else ", faithfulness not measured"
        out.print(f"  [bold]{h.path.stem}[/bold]", highlight=False)
        note(what, indent=4)
        field("sha256", sha256_file(h.path))
        field("file", str(h.path))


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
    for r in results:
        render_interval_check(r.weights.name, r.metrics)


def render_interval_check(name: str, m: dict) -> None:
    """`aqa evaluate`'s interval and domain figures for one head: on these videos, and by its cross-validation."""
    i = m.get("interval")
    if i:
        cv = i["cv"]
        out.print(f"  {name}: {i['level']:.0%} intervals (±{i['half_width']:.2f}) hold {i['coverage']:.1%} of these "
                  f"{i['n']} videos' labels, mean width {i['mean_width']:.2f}; cross-validation inside its training "
                  f"videos: coverage {cv['coverage']:.1%}, mean width {cv['mean_width']:.2f}", highlight=False)
    elif m.get("interval_missing"):
        out.print(f"  {name}: no interval: {m['interval_missing']}", highlight=False, style="yellow")
    d = m.get("domain")
    if d:
        out.print(f"  {name}: the domain check flags {d['flagged']} of these videos ({d['flag_rate']:.1%}; calibrated "
                  f"to about {d['alpha']:.0%} of videos like its training videos)", highlight=False)
