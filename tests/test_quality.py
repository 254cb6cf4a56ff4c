"""scripts/quality.py's measures, checked on videos rendered from known scenes (ground truth)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

from quality import parse_prompt, score_video, starts  # noqa: E402
from synthetic_world import Scene, Thing, render, sample_scene  # noqa: E402

FRAMES = 129  # 33 latent frames: blocks of 8 start at latents 9, 17, 25
BALL = Thing("circle", "red", 0.3, 0.3, 0.5, "right", 0.01, True)
SCENE = Scene((BALL,), "dark blue")


def test_prompts_parse_back_to_their_scenes():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng)
        things, bg = parse_prompt(scene.prompt())
        assert things == [(t.colour, t.shape) for t in scene.things] and bg == scene.background


def test_a_rendered_scene_scores_as_adherent_continuous_and_seamless():
    video = render(SCENE, FRAMES, 96, 96)
    s = score_video(video, SCENE.prompt(), starts(33, 8))
    assert s["colour_found"] == 1.0 and s["shape_right"] == 1.0 and s["background_right"] == 1.0
    assert s["extra_objects"] == 0 and s["jumps"] == 0
    assert 0.9 < s["seam_change"] < 1.1 and 0.9 < s["seam_step"] < 1.1
    assert s["tracks"][0]["median_step"] == pytest.approx(0.01, rel=0.1)  # the scene's own speed
    assert s["median_step"] == s["tracks"][0]["median_step"]
    assert s["object_size"] == pytest.approx(0.3, abs=0.02)  # the ball's own size


def test_an_object_smeared_across_the_frame_is_too_big_and_still():
    """The failure the size and step columns are for: the prompted colour is there, as a band that
    spans the frame and no longer moves (what a causal rollout drifting off its training shows)."""
    video = render(Scene((), "dark blue"), FRAMES, 96, 96)
    video[:, 70:88, 4:92] = (220, 40, 40)  # a red bar along the bottom, the same in every frame
    s = score_video(video, SCENE.prompt(), starts(33, 8))
    assert s["colour_found"] == 1.0
    assert s["object_size"] > 0.85 and s["median_step"] == 0.0


def test_jumps_at_block_starts_are_seams():
    video = render(SCENE, FRAMES, 96, 96)
    jumped = Scene((Thing("circle", "red", 0.3, 0.3, 0.25, "right", 0.01, True),), "dark blue")
    other = render(jumped, FRAMES, 96, 96)
    for b in starts(33, 8)[::2]:  # every other block shows the ball a quarter of the frame higher
        first = 4 * b - 3
        video[first:first + 32] = other[first:first + 32]
    s = score_video(video, SCENE.prompt(), starts(33, 8))
    assert s["seam_step"] > 5 and s["seam_change"] > 2 and s["jumps"] >= 3
    assert s["colour_found"] == 1.0  # still the prompted object: the seam measures are what caught it


def test_a_video_of_something_else_is_not_adherent():
    wrong = Scene((Thing("square", "yellow", 0.3, 0.3, 0.5, "right", 0.01, True),), "grey")
    s = score_video(render(wrong, FRAMES, 96, 96), SCENE.prompt(), starts(33, 8))
    assert s["colour_found"] == 0.0 and s["background_right"] == 0.0 and s["extra_objects"] == 1.0
