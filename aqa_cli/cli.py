"""The ``aqa`` command line: argument parsing and rendering only.

Every command calls into the library (``aqa_cli.extract``, ``aqa_cli.weights``
…) and renders what comes back with rich. Errors a user can fix arrive as
:class:`~aqa_cli.errors.AqaError` and are printed as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from aqa_cli import __version__
from aqa_cli.errors import AqaError

app = typer.Typer(
    name="aqa",
    help="Action Quality Assessment for sports video: features, scores, and the clips behind them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
weights_app = typer.Typer(help="The weights registry: list, fetch, import and verify checkpoints.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

out = Console()
err = Console(stderr=True)

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (auto picks the GPU when there is one).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16 where the device computes it natively and "
                                                               "the backbone's bf16 drift is within bounds, else "
                                                               "fp32), fp32 (reproduces the recipe), bf16 or fp16 "
                                                               "(GPU). The sidecar records the one used.")]


@app.command()
def info() -> None:
    """Versions, devices, video decoders and cached weights."""
    import torch

    from aqa_cli.video import available_decoders
    from aqa_cli.weights import aqa_home, cached_path, is_cached, list_specs

    table = Table(title=f"aqa {__version__}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("python", platform.python_version())
    for pkg in ("torch", "torchvision", "pytorchvideo", "numpy", "typer", "rich", "pandas", "safetensors", "matplotlib"):
        table.add_row(pkg, _version(pkg))
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


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


class _ClipRate(ProgressColumn):
    """Clips per second over the whole run, not the jittery instantaneous rate."""

    def __init__(self, start: float):
        super().__init__()
        self.start = start
        self.done = 0

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        return Text(f"{rate:5.2f} clips/s", style="cyan")


@contextlib.contextmanager
def _interrupted_hint():
    """Ctrl-C: say what is kept (typer turns KeyboardInterrupt into exit status 130 without a word)."""
    try:
        yield
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: complete videos are kept; run the same command again to resume")
        raise typer.Exit(130) from None


@app.command("extract-features")
def extract_features(
    inputs: Annotated[list[Path], typer.Argument(help="Videos, or folders searched recursively by video extension.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for <stem>.npy and <stem>.json.")],
    backbone: Annotated[str, typer.Option(help="Feature extractor: i3d (Kinetics-400 I3D), vst (Video Swin-B "
                                                "Kinetics-600, the published AQA features) or pose (MediaPipe "
                                                "BlazePose landmarks; needs mediapipe, see the README).")] = "i3d",
    weights: Annotated[Optional[str], typer.Option(help="Other weights of the same architecture: a registry name "
                                                        "(see `aqa weights list`) or a checkpoint file (official "
                                                        "mmcv Video Swin, torchvision swin3d_b, DeepMind I3D, a "
                                                        "pytorchvideo zoo file), converted once and cached by its "
                                                        "sha256; default: the backbone's own.")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Clips per forward pass (default: 4 on a CPU; "
                                                                  "on a GPU as many as its free memory holds).")] = None,
    decode_workers: Annotated[Optional[int], typer.Option(min=1, help="Videos decoded at a time, ahead of the "
                                                                      "backbone (default: 1 on a CPU, 4 on a GPU).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Re-extract videos whose outputs are complete.")] = False,
    show_pred: Annotated[bool, typer.Option("--show-pred", help="Print the Kinetics top-5 and store it.")] = False,
    clip_len: Annotated[Optional[int], typer.Option(min=1, help="Frames per clip (recipe default: 32).")] = None,
    stride: Annotated[Optional[int], typer.Option(min=1, help="Frames between clip starts (default: clip length).")] = None,
    leftover: Annotated[Optional[str], typer.Option(help="trim (published: equal head/tail) or pad (repeat last frame).")] = None,
    decoder: Annotated[str, typer.Option(help="auto (decord, else PyAV), decord or pyav.")] = "auto",
    engine: Annotated[str, typer.Option(help="local (this process, one video after the other) or ray (Ray "
                                             "workers, each holding a backbone; needs aqa[ray]).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="--engine ray: join this running Ray cluster (also "
                                                        "RAY_ADDRESS); --out must then be on a filesystem every "
                                                        "node shares. Default: a new local instance on "
                                                        "127.0.0.1, stopped at the end.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="--engine ray: workers (default: one per GPU, "
                                                               "or per --threads-per-worker CPUs).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0, help="--engine ray: GPUs per worker "
                                                                         "(default 1 when the cluster has GPUs "
                                                                         "and --device is not cpu).")] = None,
    cpus_per_worker: Annotated[float, typer.Option(min=0, help="--engine ray: CPUs Ray reserves per "
                                                               "worker.")] = 1.0,
    threads_per_worker: Annotated[Optional[int], typer.Option(min=1, help="--engine ray: torch threads per "
                                                                          "worker (default: the local engine's, "
                                                                          "for the same bytes).")] = None,
) -> None:
    """Extract one feature per clip for each video: DIR/<stem>.npy plus a JSON sidecar."""
    from aqa_cli.backbones import create_backbone
    from aqa_cli.extract import ExtractEvents, extract_to_folder
    from aqa_cli.video import find_videos

    if engine not in ("local", "ray"):
        raise AqaError(f"unknown engine {engine!r}", fix="use local or ray")
    ray_only = {"--address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
                "--threads-per-worker": threads_per_worker, "--cpus-per-worker": None if cpus_per_worker == 1.0 else 1}
    if engine == "local" and any(v is not None for v in ray_only.values()):
        given = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise AqaError(f"{given} only apply to --engine ray", fix="add --engine ray, or drop them")

    videos = find_videos(inputs)
    if not videos:
        raise AqaError("no videos found in " + ", ".join(map(str, inputs)), fix="pass video files or folders holding them")
    if leftover is not None and leftover not in ("trim", "pad"):
        raise AqaError(f"unknown leftover policy {leftover!r}", fix="use trim or pad")
    if engine == "ray":
        from aqa_cli.ray_engine import import_ray

        import_ray()  # installed?
        # The driver's copy, on its CPU: the weights are checked (and fetched) here, before any cluster
        # work, and its identity and recipe decide which outputs are complete. The workers build their own.
        bb = create_backbone(backbone, device="cpu", precision="fp32", weights=weights)
        where = f"Ray workers ({device}, {precision})"
    else:
        bb = create_backbone(backbone, device=device, precision=precision, weights=weights)
        where = f"{bb.device} ({bb.precision}{', chosen by auto' if precision == 'auto' else ''})"
    # Non-overlapping clips stay non-overlapping when only the length changes.
    bb.recipe = bb.recipe.replace(clip_len=clip_len, stride=stride or clip_len, leftover=leftover)
    err.print(f"[bold]{bb.name}[/bold] on {where}, recipe {bb.recipe.name}: "
              f"{bb.recipe.clip_len}-frame clips every {bb.recipe.stride} at {bb.recipe.timeline_fps or 'source'} fps")

    rate = _ClipRate(time.perf_counter())
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate,
                        TimeElapsedColumn(), console=err)

    class Events(ExtractEvents):
        def __init__(self) -> None:
            self.videos = progress.add_task("videos", total=len(videos))
            self.clips = progress.add_task("clips", total=None)

        def video_started(self, video: Path) -> None:
            progress.reset(self.clips, total=None, description=f"[dim]{video.name}[/dim]")

        def video_planned(self, video: Path, clips: int) -> None:
            progress.update(self.clips, total=clips)

        def clips_done(self, n: int) -> None:
            rate.done += n
            progress.advance(self.clips, n)

        def video_finished(self, outcome) -> None:  # noqa: ANN001
            progress.advance(self.videos)
            if outcome.status == "failed":
                progress.console.print(f"[red]FAILED[/red] {outcome.error}", highlight=False)
            for w in outcome.warnings:
                progress.console.print(f"[yellow]warning[/yellow] {outcome.video}: {w}", highlight=False)

        def note(self, text: str) -> None:
            progress.console.print(f"[cyan]note[/cyan] {text}", highlight=False)

    with progress, _interrupted_hint():
        if engine == "ray":
            from aqa_cli.extract import ExtractSettings
            from aqa_cli.ray_engine import RayOptions, extract_with_ray

            events = Events()
            # Workers report whole videos: the clips bar counts the clips of finished videos.
            progress.update(events.clips, description="clips")
            options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                                 cpus_per_worker=cpus_per_worker, threads_per_worker=threads_per_worker)
            settings = ExtractSettings(batch_size=batch_size, show_pred=show_pred, decoder=decoder,
                                       overwrite=overwrite)
            outcomes = extract_with_ray(videos, bb, out_dir, options, settings, backbone=backbone, weights=weights,
                                        device=device, precision=precision, events=events)
        else:
            # On a GPU decoding is the slower side: several videos are decoded at once, ahead of the backbone.
            decoders = decode_workers or (4 if bb.device.type == "cuda" else 1)
            outcomes = extract_to_folder(videos, bb, out_dir, overwrite=overwrite, batch_size=batch_size,
                                         show_pred=show_pred, decoder=decoder, events=Events(),
                                         decode_workers=decoders)

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
        raise typer.Exit(1)


@app.command()
def score(
    inputs: Annotated[list[Path], typer.Argument(help="Videos, feature files (.npy with their .json sidecar), or "
                                                      "folders, taken recursively.")],
    preset: Annotated[Optional[str], typer.Option(help="Dataset preset: the target and its scale "
                                                       "(default fisv-pcs, or the --weights checkpoint's).")] = None,
    head: Annotated[Optional[str], typer.Option(help="gdlt, cofinal, interp or mtl (default: the preset's shipped head "
                                                     "with the best cross-validated ρ).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="A head checkpoint (.safetensors) instead of a shipped "
                                                         "one.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Feature extractor (default: the one in the head's "
                                                         "feature contract).")] = None,
    backbone_weights: Annotated[Optional[str], typer.Option(
        "--backbone-weights", help="The backbone's weights: a registry name or a checkpoint file of its architecture "
                                   "(as extract-features --weights; --weights here is the head).")] = None,
    trust_features: Annotated[bool, typer.Option(
        "--trust-features", help="Let a head score features of other backbone weights than it was trained on "
                                 "(refused otherwise: another checkpoint's features are another feature space).")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (one object per video, a list for several) "
                                                          "instead of tables.")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per video (and head).")] = None,
    clips_csv: Annotated[Optional[Path], typer.Option("--clips-csv", help="Write one row per clip.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG timeline of clip weights and scores "
                                                      "(several videos: one file each, named after the video).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write one self-contained HTML page: totals, timelines and "
                                                        "the heaviest clips' frames.")] = None,
    all_heads: Annotated[bool, typer.Option("--all-heads", help="Score with every shipped head of the preset and "
                                                                "show how far they agree.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the feature cache "
                                                              "($AQA_HOME/features).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Clips per backbone forward pass (default: 4 on "
                                                                  "a CPU; on a GPU as many as its free memory "
                                                                  "holds).")] = None,
    decoder: Annotated[str, typer.Option(help="auto (decord, else PyAV), decord or pyav.")] = "auto",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the N clips that move the score most (by "
                                                           "measured effect) in each table.")] = None,
) -> None:
    """Score videos: the total on the sport's scale, each clip's weight and score behind it, and what each clip
    measurably does to the score."""
    import json as _json

    from aqa_cli.cache import FeatureCache
    from aqa_cli.report import (
        clips_frame, json_payload, plot_paths, primary_results, scores_frame, write_csv, write_plot, write_report,
    )
    from aqa_cli.scoring import Scorer, ScoreEvents, choose_heads, find_inputs, head_agreement

    choice = choose_heads(preset, head, weights, all_heads=all_heads)
    for note in choice.notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    outputs = [p for p in (csv_path, clips_csv, plot, report) if p is not None]
    paths = find_inputs(inputs, exclude=outputs)
    if not paths:
        raise AqaError("nothing to score in " + ", ".join(map(str, inputs)),
                       fix="pass videos, feature files, or folders holding them")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True)

    class Events(ScoreEvents):
        def __init__(self) -> None:
            self.inputs = progress.add_task("inputs", total=len(paths))
            self.clips = progress.add_task("clips", total=None, visible=False)

        def input_started(self, path: Path) -> None:
            progress.reset(self.clips, total=None, description=f"[dim]{path.name}[/dim]", visible=False)

        def backbone_loading(self, name: str) -> None:
            progress.update(self.clips, description=f"[dim]loading the {name} backbone ({device}, {precision})…[/dim]",
                            visible=True)

        def clips_planned(self, path: Path, clips: int) -> None:
            progress.update(self.clips, total=clips, visible=True)

        def clips_done(self, n: int) -> None:
            progress.advance(self.clips, n)

        def input_finished(self, results) -> None:  # noqa: ANN001 - list[VideoScore]
            progress.advance(self.inputs)
            for r in results:
                if not r.ok:
                    progress.console.print(f"[red]FAILED[/red] {r.error}", highlight=False, soft_wrap=True)

    scorer = Scorer(choice, backbone=backbone, device=device, precision=precision,
                    cache=None if no_cache else FeatureCache(), batch_size=batch_size, decoder=decoder, events=Events(),
                    backbone_weights=backbone_weights, trust_features=trust_features)
    with progress:
        results = scorer.score_all(paths)
    agreement = head_agreement(results) if len(choice.heads) > 1 else None

    written = []
    if csv_path is not None:
        written.append(write_csv(csv_path, scores_frame(results)))
    if clips_csv is not None:
        written.append(write_csv(clips_csv, clips_frame(results)))
    if plot is not None:
        placed = plot_paths(plot, results)
        written.extend(write_plot(path, r) for path, r in placed)
        if not placed:
            err.print("[yellow]note:[/yellow] no video was scored, so no timeline was plotted", highlight=False)
    if report is not None:
        written.append(write_report(report, results, agreement=agreement))

    if json_out:
        print(_json.dumps(json_payload(results), indent=2, allow_nan=False))
    else:
        for r in primary_results(results):
            _render_score(r, top)
        if agreement is not None:
            _render_agreement(agreement)
        if len(paths) > 1:
            _render_batch(results)
    for path in written:
        err.print(f"wrote {path}", highlight=False)
    bad = [r for r in results if not r.ok]
    if bad:
        err.print(f"[red]{len({str(r.input) for r in bad})} of {len(paths)} input(s) failed:[/red]")
        for r in bad:
            err.print(f"  {r.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _render_score(r, top_n: int | None = None) -> None:  # noqa: ANN001 - a VideoScore
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


def _render_agreement(agreement: dict) -> None:
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


def _render_batch(results) -> None:  # noqa: ANN001 - list[VideoScore]
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


@weights_app.command("list")
def weights_list() -> None:
    """Known checkpoints, where each comes from, its pinned sha256, and whether it is cached."""
    from aqa_cli.weights import cached_path, is_cached, list_specs

    t = Table()
    for col in ("name", "kind", "source", "pinned (source file)", "cached"):
        t.add_column(col, overflow="fold")
    for s in list_specs():
        t.add_row(s.name, s.kind, s.source, s.describe_pin(), str(cached_path(s.name)) if is_cached(s.name) else "no")
    from aqa_cli.fileio import sha256_file
    from aqa_cli.heads.checkpoint import shipped_heads

    for h in shipped_heads():
        cv = _json_field(h.metadata, "cv")
        what = f"{h.head} head, {h.metadata.get('preset') or h.target}" + (
            f", {cv['folds']}-fold CV ρ {cv['mean_spearman']:.3f}" if cv else "")
        faith, where = h.faithfulness
        what += f", faithfulness {faith:.2f} ({where})" if faith is not None else ", faithfulness not measured"
        t.add_row(h.path.stem, "head", f"{what} (shipped in weights/)", f"sha256 {sha256_file(h.path)}", str(h.path))
    out.print(t)


def _json_field(meta: dict, key: str) -> dict:
    import json as _json

    try:
        return _json.loads(meta.get(key, "{}")) or {}
    except ValueError:
        return {}


class _DownloadBar:
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

    def __enter__(self) -> _DownloadBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bar.stop()


def _report_installed(name: str, target: Path) -> None:
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


@weights_app.command("fetch")
def weights_fetch(
    name: Annotated[str, typer.Argument(help="Registry name, see `aqa weights list`.")],
    force: Annotated[bool, typer.Option(help="Fetch again even when cached.")] = False,
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line in logit order, for a "
                                                        "checkpoint that has none.")] = None,
) -> None:
    """Download (resumable), verify against the pins, and convert to safetensors in the cache."""
    from aqa_cli.weights import fetch, is_cached

    if is_cached(name) and not force:
        out.print(f"{name}: already cached (use --force to fetch again)")
        return
    with _DownloadBar() as bar:
        path = fetch(name, force=force, log=bar.log, progress=bar, labels=labels)
    _report_installed(name, path)


@weights_app.command("import")
def weights_import(
    path: Annotated[Path, typer.Argument(help="The downloaded checkpoint, or the archive that holds it.")],
    name: Annotated[str, typer.Option(help="Registry name it should become.")],
    format: Annotated[str, typer.Option("--format", help="auto (detect), or the checkpoint's format: mmcv (the "
                                        "official Video Swin release), torchvision (a swin3d_b state dict), "
                                        "gdlt or cofinal (an official head state dict).")] = "auto",
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line in logit order (the Kinetics-600 "
                                                        "release has none).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Head formats: where to write the converted head "
                                                     "(default $AQA_HOME/weights/heads/NAME.safetensors).")] = None,
    score_max: Annotated[float, typer.Option(help="Head formats: the official label normaliser (÷25).")] = 25.0,
    label_column: Annotated[Optional[str], typer.Option("--target", help="Head formats: the target it scores, e.g. TES.")] = None,
) -> None:
    """Import a checkpoint downloaded by hand (verified against the registry's pins), or an official
    GDLT / CoFInAl head checkpoint (--format gdlt|cofinal) into our head format."""
    from aqa_cli.heads.checkpoint import OFFICIAL_FORMATS, import_official_head
    from aqa_cli.weights import import_file, weights_dir

    if format in OFFICIAL_FORMATS:
        target = Path(out) if out else weights_dir() / "heads" / f"{name}.safetensors"
        import_official_head(path, format, target, score_max=score_max, target=label_column or "")
        err.print(f"imported {path} ({format}, scores ×{score_max:g}) → {target}", highlight=False)
        return
    target = import_file(name, path, fmt=format, labels=labels)
    _report_installed(name, target)


@weights_app.command("labels")
def weights_labels(
    name: Annotated[str, typer.Argument(help="Registry name of cached weights.")],
    file: Annotated[Path, typer.Argument(help="Class names, one per line in logit order.")],
) -> None:
    """Attach class names to cached weights (e.g. DeepMind's label_map_600.txt for vst-k600)."""
    from aqa_cli.weights import set_labels

    _report_installed(name, set_labels(name, file))


@weights_app.command("verify")
def weights_verify() -> None:
    """Re-hash every cached checkpoint against the sha256 recorded when it was converted."""
    from aqa_cli.weights import list_specs, verify

    bad = 0
    for s in list_specs():
        ok, detail = verify(s.name)
        if detail == "not cached":
            out.print(f"[dim]{s.name}: not cached[/dim]")
        elif ok:
            out.print(f"[green]ok[/green] {s.name} {detail}")
        else:
            bad += 1
            out.print(f"[red]DAMAGED[/red] {s.name}: {detail} — run `aqa weights fetch {s.name} --force`")
    if bad:
        raise typer.Exit(1)


@app.command()
def train(
    features: Annotated[Path, typer.Option(help="Folder of <id>.npy clip features.")],
    labels: Annotated[Path, typer.Option(help="Labels: CSV with a header, JSON records, GDLT text (id TES PCS ded) or RG tab-separated.")],
    target: Annotated[str, typer.Option(help="The label column to learn, e.g. TES or PCS.")],
    head: Annotated[str, typer.Option(help="gdlt, cofinal, interp or mtl (which also learns the label file's "
                                           "action and caption columns).")],
    out_path: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.safetensors); the log goes beside it (.log.json).")],
    preset: Annotated[Optional[str], typer.Option(help="Dataset preset (scale, crop, the paper's settings), e.g. fisv-tes.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Override the preset's epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, dropout, crops, shuffling and folds.")] = 0,
    folds: Annotated[int, typer.Option(min=0, help="K-fold cross-validation inside the data first (0: none).")] = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Repeat the K-fold cross-validation over this many fold draws "
                                                     "(repeated K-fold; its standard error is reported).")] = 1,
    final: Annotated[str, typer.Option(help="all: one model on every video; folds: ship the K fold models as an ensemble.")] = "all",
    half: Annotated[bool, typer.Option(help="Store float16 tensors (half the file size).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE over the preset's training or model settings (repeatable), e.g. --set lr=0.005.")] = None,
    cv_from: Annotated[Optional[Path], typer.Option(help="With --folds K --final all: take the cross-validation from "
                                                         "the log of an earlier run of the same job (checked) instead "
                                                         "of recomputing it, and train only the final model.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a scoring head on clip features; optionally cross-validate it first."""
    import json as _json

    from aqa_cli.backbones import resolve_device
    from aqa_cli.training import TrainJob, run_train_job

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise AqaError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set lr=0.005")
        try:
            overrides[key.strip()] = _json.loads(value)
        except ValueError:
            overrides[key.strip()] = value
    job = TrainJob(features=str(features), labels=str(labels), target=target, head=head, out=str(out_path), preset=preset,
                   epochs=epochs, seed=seed, folds=folds, repeats=repeats, final=final, device=str(resolve_device(device)), half=half,
                   overrides=overrides, cv_from=str(cv_from) if cv_from else None)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=err, transient=False) as progress:
        task = progress.add_task("training", total=None, info="")

        def on_epoch(fold, epoch, rec):
            where = f"fold {fold + 1}/{folds}" if fold is not None else "final"
            if fold is not None and repeats > 1:
                where += f" (× {repeats} repeats)"
            info = f"loss {rec['loss']:.4f}" + (f"  val ρ {rec['val_spearman']:.3f}" if "val_spearman" in rec else "")
            progress.update(task, description=f"{head} {where}", completed=epoch, total=rec["of"], info=info)
            if not err.is_terminal and (epoch % 10 == 0 or epoch == rec["of"]):
                # A log file gets a line every 10 epochs instead of a live bar.
                err.print(f"{head} {where} epoch {epoch}/{rec['of']}: {info}", highlight=False)

        def on_stage(name, done, total):
            progress.update(task, description=name)

        log = run_train_job(job, on_epoch=on_epoch, on_stage=on_stage)
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


@app.command("convert-labels")
def convert_labels(
    annotations: Annotated[Path, typer.Argument(help="The MTL-AQA release's final_annotations_dict.pkl.")],
    out_path: Annotated[Path, typer.Option("--out", help="The label CSV to write.")],
    captions: Annotated[Optional[Path], typer.Option(help="final_captions_dict.pkl, for the caption column.")] = None,
    split: Annotated[Optional[Path], typer.Option(help="Keep only the keys listed here (train_split_0.pkl, "
                                                       "test_split_0.pkl).")] = None,
    preset: Annotated[str, typer.Option(help="Preset whose mtl schema names the sub-task codes.")] = "mtl-aqa",
) -> None:
    """Turn MTL-AQA's annotation pickles into a label CSV for `aqa train --head mtl` (read with a restricted
    unpickler: containers, strings and numbers only)."""
    from aqa_cli.dataset import convert_mtl_aqa
    from aqa_cli.heads.mtl import check_schema
    from aqa_cli.presets import load_preset

    schema = check_schema(load_preset(preset).model_settings("mtl").get("subtasks", []))
    summary = convert_mtl_aqa(annotations, out_path, captions=captions, split=split, subtasks=schema)
    out.print(f"wrote {summary['out']}: {summary['rows']} dives, {summary['captions']} with a caption", highlight=False)
    check = summary.get("caption_check")
    if check:
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


@app.command()
def evaluate(
    features: Annotated[Path, typer.Option(help="Folder of <id>.npy clip features.")],
    labels: Annotated[Path, typer.Option(help="Label file (CSV with a header, GDLT text or RG tab-separated).")],
    weights: Annotated[list[Path], typer.Option(help="Head checkpoint(s): --weights A B C, or --weights A "
                                                     "--weights B.")],
    more_weights: Annotated[Optional[list[Path]], typer.Argument(
        metavar="FILE", show_default=False,
        help="The checkpoints after the first in `--weights A B C` (an option takes one value; the rest arrive "
             "here).")] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="Label column(s): one for all, one per checkpoint, or none for each checkpoint's own.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (a list for several).")] = False,
    explanations: Annotated[bool, typer.Option(help="Also measure how faithful each head's per-clip explanations "
                                                    "are (one head pass per clip of every video).")] = True,
    trust_features: Annotated[bool, typer.Option(
        "--trust-features", help="Evaluate heads on features of other backbone weights than they were trained "
                                 "on (refused otherwise).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Spearman ρ, Pearson r, R-ℓ2×100 and MAE of trained heads on labelled features, and the faithfulness of
    their per-clip explanations: ρ between the effect each clip's weight and score predicts and the measured
    effect of removing it (mean over videos), and the deletion-curve area."""
    import json as _json

    from aqa_cli.backbones import resolve_device
    from aqa_cli.evaluation import evaluate as run_evaluate

    results, overall = run_evaluate(features, labels, [*weights, *(more_weights or [])], target,
                                    device=str(resolve_device(device)), trust_features=trust_features,
                                    explain=explanations)
    if json_out:
        rows = [r.to_dict() for r in results]
        payload = rows[0] if len(rows) == 1 else rows
        if overall is not None:
            payload = {"results": rows, "fisher_z_mean_spearman": overall}
        print(_json.dumps(payload, indent=2))
        return
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


def main() -> None:
    try:
        app()
    except AqaError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
