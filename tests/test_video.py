"""Decoding: decord and PyAV agree; rotation, odd sizes, variable frame rate, GIF, and bad files."""

from __future__ import annotations

import numpy as np
import pytest

from aqa_cli.errors import VideoError
from aqa_cli.synthetic import index_frame, index_frames, read_index, write_video
from aqa_cli.inputs import find_inputs
from aqa_cli.video import open_video


def decode_all(path, decoder):
    with open_video(path, decoder=decoder) as reader:
        frames = [f for _, chunk in reader.iter_chunks(range(reader.info.num_frames)) for f in chunk]
        return reader.info, reader.timestamps, np.stack(frames)


def test_decoders_agree_frame_for_frame(tmp_path):
    path = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    info_d, ts_d, frames_d = decode_all(path, "decord")
    info_p, ts_p, frames_p = decode_all(path, "pyav")
    assert info_d.decoder == "decord" and info_p.decoder == "pyav"
    assert info_d.num_frames == info_p.num_frames == 40
    assert info_d.fps == info_p.fps == 25
    assert np.allclose(ts_d, ts_p, atol=1e-3)
    assert [read_index(f) for f in frames_p] == list(range(40))
    assert np.abs(frames_d.astype(int) - frames_p.astype(int)).max() <= 2


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotation_metadata_is_applied_identically_by_both_decoders(tmp_path, rotation):
    frame = index_frame(37, 120, 160)
    frame[:20, :20] = 255  # an asymmetric mark: top-left corner
    path = write_video(tmp_path / "r.mp4", [frame] * 4, 25, rotation=rotation)
    info_d, _, frames_d = decode_all(path, "decord")
    info_p, _, frames_p = decode_all(path, "pyav")
    assert info_d.rotation == info_p.rotation
    expected_shape = (160, 120) if rotation % 180 else (120, 160)
    assert frames_d.shape[1:3] == frames_p.shape[1:3] == expected_shape
    assert (info_p.height, info_p.width) == expected_shape
    # The display matrix angle is counter-clockwise, like np.rot90.
    want = np.rot90(frame, k=(info_p.rotation // 90) % 4)
    assert np.abs(frames_p[0].astype(int) - want).mean() < 2
    assert np.abs(frames_d[0].astype(int) - frames_p[0]).max() <= 2


def test_odd_frame_size(tmp_path):
    path = write_video(tmp_path / "odd.mp4", index_frames(12, 121, 161), 25)
    info, _, frames = decode_all(path, "auto")
    assert (info.height, info.width) == (121, 161) and frames.shape[1:3] == (121, 161)


def test_variable_frame_rate_timestamps_are_kept(tmp_path):
    times = [i * 0.04 for i in range(25)] + [1.0 + i * 0.08 for i in range(13)]
    path = write_video(tmp_path / "vfr.mp4", index_frames(38), 25, pts_seconds=times)
    for decoder in ("decord", "pyav"):
        info, ts, _ = decode_all(path, decoder)
        assert info.variable_frame_rate
        assert np.allclose(ts, times, atol=2e-3)


def test_gif_falls_back_to_pyav(tmp_path):
    path = write_video(tmp_path / "g.gif", index_frames(12), 10, codec="gif")
    info, _, frames = decode_all(path, "auto")
    assert info.decoder == "pyav" and info.num_frames == 12
    assert [read_index(f) for f in frames] == list(range(12))


def test_missing_empty_and_non_video_files_are_refused_with_a_fix(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        open_video(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4: the file is empty"):
        open_video(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 100)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a readable video") as exc:
        open_video(tmp_path / "notes.mp4")
    assert "\n" not in exc.value.message


def test_truncated_video_fails_with_a_clear_error(tmp_path, shared):
    data = (shared / "videos" / "arm_wrestling.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut\.mp4: .*(truncated|not a readable video|decod)"):
        info, _, frames = decode_all(cut, "auto")
        # A container whose index survives the cut still must not pretend the missing half exists.
        assert frames.shape[0] == info.num_frames


def test_find_videos_recurses_by_extension_and_keeps_explicit_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mp4", "a/b/y.MKV", "a/readme.txt"):
        (tmp_path / name).write_bytes(b"0")
    found = find_inputs([tmp_path / "a", tmp_path / "a" / "readme.txt", tmp_path / "a" / "x.mp4"], features=False)
    assert [p.name for p in found.paths] == ["y.MKV", "x.mp4", "readme.txt"] and found.skipped == []


def test_pyav_serves_everything_when_decord_is_missing(tmp_path, monkeypatch):
    import aqa_cli.video as video

    monkeypatch.setattr(video, "_decord", None)
    path = write_video(tmp_path / "a.mp4", index_frames(20), 25)
    info, _, frames = decode_all(path, "auto")
    assert info.decoder == "pyav" and [read_index(f) for f in frames] == list(range(20))
    assert video.available_decoders()["decord"] is None
    with pytest.raises(VideoError, match="decord is not installed"):
        open_video(path, decoder="decord")
