"""Clip geometry: counts, boundaries, trimming, padding and fps resampling."""

from __future__ import annotations

import numpy as np
import pytest

from aqa_cli.clips import plan_clips, resample
from aqa_cli.errors import VideoError
from aqa_cli.extract import iter_clip_batches, plan_for
from aqa_cli.recipes import Recipe
from aqa_cli.synthetic import index_frames, read_index, write_video
from aqa_cli.video import open_video


def stamps(n: int, fps: float) -> np.ndarray:
    return np.arange(n) / fps


def test_trim_removes_leftover_equally_from_head_and_tail():
    plan = plan_clips(stamps(100, 25), 25, clip_len=32)
    assert len(plan.clips) == 3
    assert (plan.trimmed_head, plan.trimmed_tail) == (2, 2)
    assert [(c.frame_start, c.frame_end) for c in plan.clips] == [(2, 34), (34, 66), (66, 98)]
    assert plan.clips[0].source_indices == tuple(range(2, 34))
    assert plan.clips[1].start_s == pytest.approx(34 / 25)
    assert plan.clips[1].end_s == pytest.approx(66 / 25)
    assert all(c.padded == 0 for c in plan.clips)


def test_trim_odd_leftover_puts_the_extra_frame_at_the_tail():
    plan = plan_clips(stamps(69, 25), 25, clip_len=32)
    assert (plan.trimmed_head, plan.trimmed_tail) == (2, 3)


def test_exact_multiple_is_not_trimmed():
    plan = plan_clips(stamps(96, 25), 25)
    assert len(plan.clips) == 3 and plan.trimmed_head == plan.trimmed_tail == 0


def test_pad_policy_keeps_every_frame_and_repeats_the_last():
    plan = plan_clips(stamps(100, 25), 25, leftover="pad")
    assert len(plan.clips) == 4
    last = plan.clips[-1]
    assert (last.frame_start, last.frame_end, last.padded) == (96, 100, 28)
    assert last.source_indices == (96, 97, 98, 99) + (99,) * 28
    assert last.end_s == pytest.approx(100 / 25)


def test_stride_and_clip_length_are_options():
    plan = plan_clips(stamps(100, 25), 25, clip_len=16, stride=8)
    # (100 - 16) // 8 + 1 = 11 clips spanning 96 frames, 2 trimmed each side
    assert len(plan.clips) == 11
    assert plan.clips[0].frame_start == 2 and plan.clips[1].frame_start == 10
    assert all(len(c.source_indices) == 16 for c in plan.clips)


def test_short_video_becomes_one_padded_clip_with_a_warning():
    plan = plan_clips(stamps(10, 25), 25)
    assert len(plan.clips) == 1
    assert plan.clips[0].padded == 22
    assert plan.clips[0].source_indices == tuple(range(10)) + (9,) * 22
    assert "fewer than one 32-frame clip" in plan.warnings[0]


def test_zero_frames_is_an_error():
    with pytest.raises(VideoError, match="zero decodable frames"):
        plan_clips(np.zeros(0), 25, path="empty.mp4")


def test_resample_30_to_25_picks_the_frame_on_screen():
    idx, fps, resampled = resample(stamps(300, 30), 30, 25)
    assert resampled and fps == 25 and len(idx) == 250
    # Timeline frame i shows source frame floor(i * 30 / 25).
    assert list(idx[:7]) == [0, 1, 2, 3, 4, 6, 7]
    assert np.array_equal(idx, (np.arange(250) * 30) // 25)


def test_resample_is_identity_at_the_same_rate_or_without_target():
    assert resample(stamps(50, 25), 25, 25)[2] is False
    idx, fps, resampled = resample(stamps(50, 30), 30, None)
    assert not resampled and fps == 30 and np.array_equal(idx, np.arange(50))


def test_resample_follows_real_timestamps_of_variable_frame_rate():
    # 1 s at 25 fps, then 1 s at 12.5 fps: each 25 fps slot must show the frame on screen at that time.
    ts = np.concatenate([np.arange(25) * 0.04, 1.0 + np.arange(13) * 0.08])
    idx, _, _ = resample(ts, 19.0, 25)
    assert len(idx) == 50
    assert list(idx[:25]) == list(range(25))
    assert list(idx[25:31]) == [25, 25, 26, 26, 27, 27]


def test_decoded_clips_deliver_the_planned_frames_30_to_25(tmp_path):
    """End to end on an encoded file: 96 frames at 30 fps → 80 at 25 fps → 2 clips, 8 trimmed each side."""
    path = write_video(tmp_path / "idx30.mp4", index_frames(96), 30)
    recipe = Recipe(name="identity-geometry", fps=25.0, resize_short=120, crop=(120, 160))
    for decoder in ("decord", "pyav"):
        with open_video(path, decoder=decoder) as reader:
            plan = plan_for(reader, recipe)
            assert plan.resampled and plan.timeline_frames == 80
            assert (plan.trimmed_head, plan.trimmed_tail) == (8, 8)
            got = []
            for _, batch in iter_clip_batches(reader, plan, recipe, batch_size=1):
                assert batch.shape == (1, 32, 120, 160, 3) and batch.dtype == np.uint8
                got.append([read_index(f) for f in batch[0]])
        expected = [[(i * 30) // 25 for i in range(8 + 32 * k, 8 + 32 * (k + 1))] for k in range(2)]
        assert got == expected, decoder


def test_normalize_returns_contiguous_clips_with_the_recipes_values():
    """The float clips the backbones read are contiguous [B, 3, T, h, w]: a copy of the permuted uint8 view
    would keep its strides, a channels-last layout on which I3D ran up to 25% slower on the CPU."""
    import torch

    from aqa_cli.recipes import GDLT_RECIPE, I3D_RECIPE

    clips = torch.randint(0, 256, (2, 4, 8, 6, 3), dtype=torch.uint8)
    for recipe in (I3D_RECIPE, GDLT_RECIPE):
        x = recipe.normalize(clips)
        assert x.shape == (2, 3, 4, 8, 6) and x.dtype == torch.float32 and x.is_contiguous()
        mean = torch.tensor(recipe.mean).view(1, 3, 1, 1, 1)
        std = torch.tensor(recipe.std).view(1, 3, 1, 1, 1)
        torch.testing.assert_close(x, (clips.permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std)
