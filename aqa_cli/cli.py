"""The ``aqa`` command line: argument parsing and rendering only.

Every command calls into the library (``aqa_cli.extract``, ``aqa_cli.weights``
…) and renders what comes back with rich. Errors a user can fix arrive as
:class:`~aqa_cli.errors.AqaError` and are printed as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aqa_cli import render
from aqa_cli.errors import AqaError
from aqa_cli.inputs import FOLDER_RULE, find_inputs
from aqa_cli.render import err, out

app = typer.Typer(
    name="aqa",
    help="Action Quality Assessment for sports video: features, scores, and the clips behind them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from aqa_cli import __version__

        out.print(f"aqa {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Action Quality Assessment for sports video: features, scores, and the clips behind them."""


weights_app = typer.Typer(help="The weights registry: list, fetch, import and verify checkpoints.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.callback()
def _weights_registry() -> None:
    import aqa_cli.backbones  # noqa: F401 - the backbone families register their weights when imported

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (auto picks the GPU when there is one).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16 where the device computes it natively and "
                                                               "the backbone's bf16 drift is within bounds, else "
                                                               "fp32), fp32 (reproduces the recipe), bf16 or fp16 "
                                                               "(GPU). The sidecar records the one used.")]


@app.command()
def info() -> None:
    """Versions, devices, video decoders and cached weights."""
    import aqa_cli.backbones  # noqa: F401 - the backbone families register their weights when imported

    render.render_info()


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
    inputs: Annotated[list[Path], typer.Argument(help=f"Videos, or folders holding them. {FOLDER_RULE}")],
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
    found = find_inputs(inputs, features=False)
    videos = found.paths
    if found.skipped:
        err.print(f"[cyan]note[/cyan] {found.skipped_note()}", highlight=False)
    if not videos:
        raise AqaError("no videos found in " + ", ".join(map(str, inputs)), fix="pass video files or folders holding them")

    from aqa_cli.backbones import create_backbone
    from aqa_cli.extract import ExtractEvents, extract_to_folder
    from aqa_cli.validation import check_options, check_output_dir

    check_options(clip_len=clip_len, stride=stride, batch_size=batch_size, decode_workers=decode_workers,
                  workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                  threads_per_worker=threads_per_worker)
    check_output_dir(out_dir, "--out")

    if engine not in ("local", "ray"):
        raise AqaError(f"unknown engine {engine!r}", fix="use local or ray")
    ray_only = {"--address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
                "--threads-per-worker": threads_per_worker, "--cpus-per-worker": None if cpus_per_worker == 1.0 else 1}
    if engine == "local" and any(v is not None for v in ray_only.values()):
        given = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise AqaError(f"{given} only apply to --engine ray", fix="add --engine ray, or drop them")

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

    rate = render.ClipRate(time.perf_counter())
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

    render.render_extraction(outcomes, out_dir, show_pred=show_pred, bb=bb, weights=weights)
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


@app.command()
def score(
    inputs: Annotated[list[Path], typer.Argument(help="Videos, feature files (.npy with their .json sidecar from "
                                                      f"extract-features), or folders. {FOLDER_RULE} Feature files "
                                                      "are taken from folders too.")],
    preset: Annotated[Optional[str], typer.Option(help="Dataset preset: the target and its scale "
                                                       "(default fisv: TES, PCS and their total; or the --weights "
                                                       "checkpoint's).")] = None,
    head: Annotated[Optional[str], typer.Option(help="gdlt, cofinal, interp, additive, mtl or pose (default: the "
                                                     "preset's default shipped head, `aqa weights list`).")] = None,
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
    precision: PrecisionOpt = "auto",  # the interval dwarfs bf16's drift (docs/performance.md)
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (one object per video, a list for several) "
                                                          "instead of tables.")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per video (and head).")] = None,
    clips_csv: Annotated[Optional[Path], typer.Option("--clips-csv", help="Write one row per clip.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG timeline of clip weights and scores "
                                                      "(several videos: one file each, named after the video).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write one self-contained HTML page: totals, timelines, "
                                                        "the frames of the clips that change the score most, and a "
                                                        "table of every clip.")] = None,
    all_heads: Annotated[bool, typer.Option("--all-heads", help="Score with every shipped head of the preset and "
                                                                "show how far they agree.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the feature cache "
                                                              "($AQA_HOME/features).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Clips per backbone forward pass (default: 4 on "
                                                                  "a CPU; on a GPU as many as its free memory "
                                                                  "holds).")] = None,
    decoder: Annotated[str, typer.Option(help="auto (decord, else PyAV), decord or pyav.")] = "auto",
    effects: Annotated[str, typer.Option(help="Measure what each clip does to the score (the head run again without "
                                              "it): auto (unless a head without a one-pass shortcut meets a video "
                                              "of over 600 clips, where it costs minutes to an hour), always or "
                                              "never.")] = "auto",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the N clips that move the score most (by "
                                                           "measured effect) in each table.")] = None,
    level: Annotated[float, typer.Option(help="The intervals' level: the share of videos like the training videos "
                                              "whose judged score falls inside (calibrated by cross-validation).")] = 0.9,
    strict_domain: Annotated[bool, typer.Option("--strict-domain", help="Fail a video that is unlike the head's "
                                                                        "training videos instead of scoring it with a "
                                                                        "mark.")] = False,
) -> None:
    """Score videos: the total on the sport's scale, each clip's weight and score behind it, and what each clip
    measurably does to the score."""
    import json as _json

    # The inputs first, before torch is imported: a mistyped path is reported at once.
    outputs = [p for p in (csv_path, clips_csv, plot, report) if p is not None]
    found = find_inputs(inputs, features=True, exclude=outputs)
    paths = found.paths
    if not paths:
        raise AqaError("nothing to score in " + ", ".join(map(str, inputs))
                       + (f" ({found.skipped_note()})" if found.skipped else ""),
                       fix="pass videos, feature files, or folders holding them")

    from aqa_cli.cache import FeatureCache
    from aqa_cli.report import (
        clips_frame, json_payload, plot_paths, primary_results, scores_frame, write_csv, write_plot, write_report,
    )
    from aqa_cli.scoring import Scorer, ScoreEvents, choose_heads, head_agreement
    from aqa_cli.validation import check_distinct_outputs, check_options, check_output_file

    check_options(batch_size=batch_size, top=top)
    named = {"--csv": csv_path, "--clips-csv": clips_csv, "--plot": plot, "--report": report}
    for option, path in named.items():
        if path is not None:
            check_output_file(path, option)
    check_distinct_outputs(named)
    choice = choose_heads(preset, head, weights, all_heads=all_heads)
    for note in choice.notes:
        err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if found.skipped:
        err.print(f"[cyan]note:[/cyan] {found.skipped_note()}", highlight=False)

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
                    progress.console.print(f"[red]FAILED[/red] {r.error}", highlight=False)

    scorer = Scorer(choice, backbone=backbone, device=device, precision=precision,
                    cache=None if no_cache else FeatureCache(), batch_size=batch_size, decoder=decoder, events=Events(),
                    backbone_weights=backbone_weights, trust_features=trust_features,
                    effects=effects, level=level,
                    strict_domain=strict_domain)
    with progress:
        results = scorer.score_all(paths)
    agreement = head_agreement(results) if len(choice.heads) > 1 and not choice.total_target else None

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
            render.render_score(r, top)
        if agreement is not None:
            render.render_agreement(agreement)
        if len(paths) > 1:
            render.render_batch(results)
    for path in written:
        err.print(f"wrote {path}", highlight=False)
    bad = [r for r in results if not r.ok]
    if bad:
        err.print(f"[red]{len({str(r.input) for r in bad})} of {len(paths)} input(s) failed:[/red]")
        for r in bad:
            render.note(r.error or "failed", console=err)
        raise typer.Exit(1)


@weights_app.command("list")
def weights_list() -> None:
    """Known checkpoints, where each comes from, its pinned sha256, and whether it is cached."""
    render.render_weights_list()


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
    with render.DownloadBar() as bar:
        path = fetch(name, force=force, log=bar.log, progress=bar, labels=labels)
    render.report_installed(name, path)


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
    render.report_installed(name, target)


@weights_app.command("labels")
def weights_labels(
    name: Annotated[str, typer.Argument(help="Registry name of cached weights.")],
    file: Annotated[Path, typer.Argument(help="Class names, one per line in logit order.")],
) -> None:
    """Attach class names to cached weights (e.g. DeepMind's label_map_600.txt for vst-k600)."""
    from aqa_cli.weights import set_labels

    render.report_installed(name, set_labels(name, file))


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
    head: Annotated[str, typer.Option(help="gdlt, cofinal, interp, additive (clip-additive: faithful by "
                                           "construction), mtl (also learns the label file's action and caption "
                                           "columns) or pose (pose features, exemplars).")],
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
    from aqa_cli.validation import check_options, check_output_file

    check_options(epochs=epochs, folds=folds, repeats=repeats, seed=seed)
    check_output_file(out_path, "--out")

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
    render.render_training(log, head=head, folds=folds)


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
    render.render_caption_check(summary, preset)


@app.command()
def evaluate(
    features: Annotated[Path, typer.Option(help="Folder of <id>.npy clip features.")],
    labels: Annotated[Path, typer.Option(help="Label file (CSV with a header, GDLT text or RG tab-separated).")],
    weights: Annotated[list[Path], typer.Option(help="Head checkpoint(s): --weights A B C, or --weights A "
                                                     "--weights B.")],
    more_weights: Annotated[Optional[list[Path]], typer.Argument(
        metavar="FILE", show_default=False,
        help="More head checkpoints to evaluate, e.g. B and C in `--weights A B C`.")] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="Label column(s): one for all, one per checkpoint, or none for each checkpoint's own.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (a list for several).")] = False,
    explanations: Annotated[bool, typer.Option(help="Also measure how faithful each head's per-clip explanations "
                                                    "are: one head pass per clip of every video, minutes on a "
                                                    "hundred videos.")] = False,
    trust_features: Annotated[bool, typer.Option(
        "--trust-features", help="Evaluate heads on features of other backbone weights than they were trained "
                                 "on (refused otherwise).")] = False,
    device: DeviceOpt = "auto",
    level: Annotated[float, typer.Option(help="The level of the intervals whose coverage is checked.")] = 0.9,
) -> None:
    """Spearman ρ, Pearson r, R-ℓ2×100 and MAE of trained heads on labelled features; with --explanations also the
    faithfulness of their per-clip explanations: ρ between the effect each clip's weight and score predicts and the measured
    effect of removing it (mean over videos), and the deletion-curve area."""
    import json as _json

    from aqa_cli.backbones import resolve_device
    from aqa_cli.evaluation import evaluate as run_evaluate

    with render.StepProgress() as progress:
        results, overall = run_evaluate(features, labels, [*weights, *(more_weights or [])], target,
                                        device=str(resolve_device(device)), trust_features=trust_features,
                                        explain=explanations, level=level, on_progress=progress.update)
    if json_out:
        rows = [r.to_dict() for r in results]
        payload = rows[0] if len(rows) == 1 else rows
        if overall is not None:
            payload = {"results": rows, "fisher_z_mean_spearman": overall}
        print(_json.dumps(payload, indent=2))
        return
    render.render_evaluation(results, overall, features=features, explanations=explanations)


def main(argv: list[str] | None = None) -> None:
    """The ``aqa`` entry point; ``argv`` (default ``sys.argv[1:]``) lets tests run the CLI in-process."""
    try:
        app(args=argv, prog_name="aqa")
    except AqaError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
