"""What a new user sees: which files a folder gives, error lines, 80-column output, marks and their legend, clip
times, the JSON/CSV head label, the timeline PNG, the HTML report and `aqa evaluate`'s defaults.

Everything runs in-process on small synthetic feature files (no backbone), in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aqa_cli.errors import AqaError
from aqa_cli.inputs import find_inputs
from aqa_cli.report import (
    clip_marks, format_range, format_time, material_effects, render_report, time_decimals, timeline_figure,
)
from aqa_cli.scoring import ClipScore, VideoScore
from conftest import REPO, invoke_aqa
from test_score import make_head

WIDTH = 80


def cells(line: str) -> int:
    from rich.cells import cell_len

    return cell_len(line)


@pytest.fixture()
def narrow(monkeypatch):
    """The consoles at 80 columns, as COLUMNS=80 sets them in a terminal (they were made at import)."""
    from aqa_cli import render

    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setattr(render.out, "_width", WIDTH)
    monkeypatch.setattr(render.err, "_width", WIDTH)


def write_features(path: Path, clips: int, *, times: list[tuple[float, float]] | None = None, seed: int = 0,
                   dim: int = 1024) -> Path:
    """An I3D-shaped feature file with the sidecar extract-features writes (the parts `score` reads)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, rng.normal(size=(clips, dim)).astype(np.float32))
    times = times or [(1.28 * k, 1.28 * (k + 1)) for k in range(clips)]
    sidecar = {"format": "aqa-features/1", "video": str(path.with_suffix(".mp4")), "shape": [clips, dim],
               "backbone": {"name": "i3d", "weights": "i3d-kinetics400"}, "recipe": {"name": "i3d-deepmind"},
               "clips": [{"index": k, "start_s": a, "end_s": b} for k, (a, b) in enumerate(times)]}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def result_with(effects: list[float], *, weights: list[float] | None = None, faithfulness: float = 0.9,
                scale_max: float = 10.0) -> VideoScore:
    weights = weights or [1 / len(effects)] * len(effects)
    clips = [ClipScore(k, 1.28 * k, 1.28 * (k + 1), w, 8.0 + 10 * e, effect=e) for k, (e, w) in
             enumerate(zip(effects, weights))]
    return VideoScore(input=Path("samples/x.mp4"), status="ok", preset="demo", head="interp",
                      head_path=Path("weights/demo-interp.safetensors"), backbone="i3d", score=8.0,
                      scale={"min": 0.0, "max": scale_max, "unit": "points"}, clips=clips, features_source="cache",
                      faithfulness=faithfulness, cv_spearman=0.847, members=5)


# ------------------------------------------------------------------------------------------ the input rule


def test_one_input_rule_for_score_and_extract_features(tmp_path):
    for name in ("README.md", "make.py", "labels.csv", "lone.json", "notes.txt", "clip.mp4", "RAW", "sub/b.MKV",
                 ".hidden.mp4", ".cache/c.mp4", "f.npy", "f.json", "out.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    scored = find_inputs([tmp_path], features=True, exclude=[tmp_path / "out.csv"])
    assert [p.relative_to(tmp_path).as_posix() for p in scored.paths] == ["RAW", "clip.mp4", "f.npy", "sub/b.MKV"]
    assert scored.skipped_note() == ("skipped 5 files that are not videos (.csv, .json, .md, .py, .txt); "
                                     "name a file to try it anyway")
    extracted = find_inputs([tmp_path], features=False)
    assert [p.relative_to(tmp_path).as_posix() for p in extracted.paths] == ["RAW", "clip.mp4", "sub/b.MKV"]
    assert ".npy" in extracted.skipped_note() and ".json ×2" in extracted.skipped_note()
    # A file named outright is tried whatever it is, and is then no longer counted as skipped.
    named = find_inputs([tmp_path, tmp_path / "README.md"], features=True, exclude=[tmp_path / "out.csv"])
    assert named.paths[-1] == tmp_path / "README.md" and "skipped 4 files" in named.skipped_note()
    with pytest.raises(AqaError, match=r"nope\.mp4: no such file or folder — check the path"):
        find_inputs([tmp_path / "clip.mp4", tmp_path / "nope.mp4"], features=True)


def test_a_missing_file_is_reported_before_torch_is_imported():
    code = ("import sys\nfrom aqa_cli.cli import main\ntry:\n    main(['score', 'no-such-video.mp4'])\n"
            "except SystemExit as exc:\n    print('torch' in sys.modules, exc.code)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.stdout.split() == ["False", "2"], res.stderr
    assert res.stderr.strip() == "error: no-such-video.mp4: no such file or folder — check the path"


def test_a_non_video_named_outright_fails_in_one_clean_line(tmp_path):
    from aqa_cli.video import open_video

    (tmp_path / "notes.md").write_text("# not a video\n" * 20)
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    with pytest.raises(AqaError) as md:
        open_video(tmp_path / "notes.md")
    with pytest.raises(AqaError) as mp4:
        open_video(tmp_path / "notes.mp4")
    assert md.value.message == (f"{tmp_path / 'notes.md'}: not a readable video (a .md file) — pass a video file; "
                                "folders are searched for videos by extension")
    assert mp4.value.message.startswith(f"{tmp_path / 'notes.mp4'}: not a readable video (")
    for message in (md.value.message, mp4.value.message):
        assert "Errno" not in message and message.count(str(tmp_path)) == 1


# ------------------------------------------------------------------------------------------ the terminal


def test_a_batch_reads_at_80_columns_with_each_input_named_and_each_failure_twice(tmp_path, narrow, monkeypatch):
    head = make_head(tmp_path / "head.safetensors", "interp", preset="demo", cv=0.8)
    batch = tmp_path / "a-rather-long-folder-name-for-a-season-of-recordings"
    write_features(batch / "day1" / "routine.npy", 4, times=[(0.52, 1.80), (1.80, 3.08), (3.08, 4.36), (4.36, 5.64)])
    write_features(batch / "day2" / "routine.npy", 7, seed=1)
    write_features(batch / "narrow.npy", 3, dim=512)  # fails: 512-d features for a 1024-d head
    (batch / "README.md").write_text("notes\n")
    res = invoke_aqa("score", batch, "--weights", head, "--csv", tmp_path / "s.csv")
    assert res.returncode == 1
    lines = (res.stdout + res.stderr).splitlines()
    assert max(map(cells, lines)) <= WIDTH, [line for line in lines if cells(line) > WIDTH]
    text = res.stdout + res.stderr
    # The summary tells the two routine.npy apart by the part of their paths that differs.
    summary = res.stdout[res.stdout.index("summary"):]
    assert "day1/routine.npy" in summary and "day2/routine.npy" in summary and "narrow.npy" in summary, summary
    # The failure: once as it happens, once in the list at the end; not in the summary table.
    assert text.count("features are 512-d") == 2 and "features are 512-d" not in summary
    assert "skipped 1 file that is not a video (.md)" in res.stderr
    # Times with the precision the clips have; the marks explained under the table.
    assert "0:00.5–0:01.8" in res.stdout and "00:01" not in res.stdout, res.stderr
    # ◆ and its reason where an effect is material (2% of the scale), else the legend says that none stands out.
    assert ("◆ " in res.stdout and "1 clip per 4, at most 3" in res.stdout) or "◆ none: removing any one clip changes the score" in res.stdout


def test_a_folder_of_videos_and_notes_exits_0(tmp_path, narrow):
    head = make_head(tmp_path / "head.safetensors", "gdlt", preset="demo")
    folder = tmp_path / "samples"
    write_features(folder / "routine.npy", 5)
    for name in ("README.md", "make_samples.py", "routines.csv", "routines.json"):
        (folder / name).write_text("x\n")
    res = invoke_aqa("score", folder, "--weights", head)
    assert res.returncode == 0, res.stderr
    assert "FAILED" not in res.stderr and "skipped 4 files that are not videos" in res.stderr


def test_weights_list_fits_80_columns_without_cutting_a_hash(narrow):
    from aqa_cli.fileio import sha256_file

    res = invoke_aqa("weights", "list")
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
        # An address longer than the screen is the only thing allowed past it, whole, on a line of its own.
        assert cells(line) <= WIDTH or (" " not in line.strip() and "://" in line), line
    demo = REPO / "weights" / "demo-interp.safetensors"
    assert f"sha256 {sha256_file(demo)}" in res.stdout


def test_json_and_csv_name_the_same_head_for_ok_and_failed_rows(tmp_path):
    head = make_head(tmp_path / "my-head.safetensors", "gdlt", preset="demo")
    write_features(tmp_path / "in" / "good.npy", 3)
    write_features(tmp_path / "in" / "narrow.npy", 3, dim=512)
    res = invoke_aqa("score", tmp_path / "in", "--weights", head, "--json", "--csv", tmp_path / "s.csv")
    assert res.returncode == 1
    rows = json.loads(res.stdout)
    assert [(r["status"], r["head"], r["head_family"]) for r in rows] == [("ok", "my-head", "gdlt"),
                                                                          ("failed", "my-head", "gdlt")]
    assert pd.read_csv(tmp_path / "s.csv")["head"].tolist() == ["my-head", "my-head"]


# ------------------------------------------------------------------------------------------ times and marks


def test_clip_times_keep_the_precision_the_clips_have():
    clip = ClipScore(0, 0.52, 1.80, 1.0, 5.0)
    assert format_range(clip, time_decimals([clip])) == "0:00.5–0:01.8"
    whole = [ClipScore(k, 10.0 * k, 10.0 * (k + 1), 0.5, 5.0) for k in range(2)]
    assert time_decimals(whole) == 0 and format_range(whole[1], 0) == "0:10–0:20"
    assert time_decimals([ClipScore(0, 0.25, 0.5, 1.0, 5.0)]) == 2
    assert format_time(3725.25, 1) == "1:02:05.2" and format_time(59.96, 1) == "1:00.0"


def test_only_material_effects_are_marked_and_the_legend_says_why():
    negligible = clip_marks(result_with([0.04, -0.03, 0.02, -0.01, 0.05]))
    assert negligible.moving == set() and negligible.legend()[0].startswith("◆ none: removing any one clip")
    fall = result_with([0.04, -1.68, 0.02, -0.25, 0.05, 0.01, -0.02, 0.03], weights=[0.1] * 7 + [0.3])
    marks = clip_marks(fall)
    assert marks.moving == {1, 3} and marks.per_video == 2 and marks.heaviest == {7, 0}
    assert "0.20 points (2% of the scale) or more" in marks.legend()[0] and "2 here" in marks.legend()[0]
    assert marks.symbols(1) == "◆▼"
    # An unfaithful head's weights are not offered as reasons.
    assert clip_marks(result_with([0.5, -0.5, 0.1, 0.0], faithfulness=0.1)).heaviest == set()


# ------------------------------------------------------------------------------------------ PNG and report


def test_the_timeline_legend_covers_no_panel():
    fig = timeline_figure(result_with([0.04, -1.68, 0.02, -0.25, 0.05]))
    fig.canvas.draw()
    [legend] = fig.legends
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax
    labels = [t.get_text() for t in legend.get_texts()]
    assert "◆ moves the score most" in labels and any("negligible" in t for t in labels)


def test_the_report_speaks_plainly_and_lists_every_clip():
    page = render_report([result_with([0.04, -0.03, 0.02, -0.01, 0.05])])
    for jargon in ("CV ρ", "-model ensemble", "w·s"):
        assert jargon not in page
    assert page.count("<h1>") == 1 and "<h2>" not in page  # one video: its name once
    assert "No single clip stands out" in page and "clips that change the score most" not in page
    table = page[page.index('<table class="per-clip">'):]
    assert table[:table.index("</table>")].count("<tr") == 6  # the per-clip table: a header and 5 clips
    assert "the average of 5 models" in page and "its ranking agrees with the reference scores at ρ 0.85" in page
    fall = render_report([result_with([0.04, -1.68, 0.02, -0.25, 0.05])])
    assert "The clips that change the score most" in fall and "clip 1, 0:01.3–0:02.6" in fall
    assert len(material_effects(result_with([0.04, -1.68, 0.02, -0.25, 0.05]))) == 2


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_measures_explanations_only_when_asked_and_shows_progress(tmp_path):
    from test_train_cli import TRAIN_ARGS, write_set

    write_set(tmp_path / "f", n=12)
    ck = tmp_path / "m.safetensors"
    res = invoke_aqa("train", "--features", tmp_path / "f", "--labels", tmp_path / "f" / "labels.csv", *TRAIN_ARGS,
                     "--out", ck)
    assert res.returncode == 0, res.stderr
    args = ("evaluate", "--features", tmp_path / "f", "--labels", tmp_path / "f" / "labels.csv", "--weights", ck)
    plain = invoke_aqa(*args, "--json")
    assert plain.returncode == 0, plain.stderr
    assert "faithfulness" not in json.loads(plain.stdout) and "m.safetensors (1/1): scoring 12 videos" in plain.stderr
    explained = invoke_aqa(*args, "--json", "--explanations")
    assert {"faithfulness", "deletion_area"} <= set(json.loads(explained.stdout))
    assert "m.safetensors (1/1): explanations" in explained.stderr
