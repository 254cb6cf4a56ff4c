"""scripts/synthetic_world.py: seeded scenes, their prompts, and a detector that reads rendered frames back."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

from synthetic_world import (BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, Scene, Thing, detect, render,  # noqa: E402
                             sample_scene)

H = W = 64


def expected_centroid(thing, t):
    """Where the shape's centre of mass is, from the scene's own numbers (an upward triangle's lies
    a sixth of its side below the centre of its box)."""
    fx, fy = thing.centre(t)
    side = thing.size * min(H, W)
    return fx * W, fy * H + (side / 6 if thing.shape == "triangle" else 0.0)


def test_scenes_and_videos_are_reproducible_from_the_seed():
    a, b, c = (sample_scene(np.random.default_rng(s)) for s in (3, 3, 4))
    assert a == b and a != c
    assert np.array_equal(render(a, 9, H, W), render(b, 9, H, W))
    assert not np.array_equal(render(a, 9, H, W), render(c, 9, H, W))


def test_the_prompt_says_what_is_drawn():
    thing = Thing("circle", "red", 0.25, 0.3, 0.5, "right", 0.01, False)
    assert Scene((thing,), "dark blue").prompt() == "a red circle moving right on a dark blue background"
    two = Scene((thing, Thing("square", "yellow", 0.2, 0.7, 0.3, "down", 0.01, True)), "black")
    assert two.prompt() == ("a red circle moving right and a yellow square bouncing down on a black background")
    for seed in range(20):
        scene = sample_scene(np.random.default_rng(seed))
        words = scene.prompt()
        assert scene.background in words and all(t.colour in words and t.shape in words and t.direction in words
                                                  for t in scene.things)
        assert len({t.colour for t in scene.things}) == len(scene.things)  # colours tell objects apart


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", ["red", "white", "purple"])
def test_detector_reads_colour_shape_and_centroid(shape, colour):
    for background in BACKGROUNDS:
        thing = Thing(shape, colour, 0.3, 0.4, 0.45, "right", 0.01, False)
        frame = render(Scene((thing,), background), 1, H, W)[0]
        found = detect(frame, background)
        assert list(found) == [colour], (shape, background, found)
        f = found[colour]
        ex, ey = expected_centroid(thing, 0)
        assert f.shape == shape and abs(f.x - ex) < 1.0 and abs(f.y - ey) < 1.0, (f, ex, ey)
        assert detect(frame) == found  # the background found on its own


def full_pixels(thing):
    return np.all(render(Scene((thing,), "black"), 1, H, W)[0] == COLOURS[thing.colour], axis=-1).sum()


def test_detector_on_sampled_two_object_scenes():
    checked = 0
    for seed in range(60):
        scene = sample_scene(np.random.default_rng(seed), objects=2)
        video = render(scene, 2, H, W)
        masks = [np.all(video[0] == COLOURS[t.colour], axis=-1) for t in scene.things]
        visible = [m.sum() for m in masks]
        whole = [t for t, m in zip(scene.things, visible) if abs(m - full_pixels(t)) <= 0.05 * full_pixels(t)]
        found = detect(video[0], scene.background)
        for t in whole:  # not hidden behind the other object
            ex, ey = expected_centroid(t, 0)
            assert found[t.colour].shape == t.shape and abs(found[t.colour].x - ex) < 1.0, (seed, t, found)
            checked += 1
    assert checked > 60  # most objects are seen whole


def test_motion_is_steady_and_bouncing_stays_inside():
    for direction, (dx, dy) in DIRECTIONS.items():
        straight = Thing("square", "green", 0.2, 0.5, 0.5, direction, 0.01, False)
        path = [expected_centroid(straight, t) for t in range(20)]
        steps = np.diff(np.array(path), axis=0)
        assert np.allclose(steps, [dx * 0.01 * W, dy * 0.01 * H])
        video = render(Scene((straight,), "grey"), 20, H, W)
        seen = np.array([[detect(f, "grey")["green"].x, detect(f, "grey")["green"].y] for f in video])
        assert np.abs(seen - np.array(path)).max() < 1.0  # rendered where the scene says, every frame
        bouncing = Thing("circle", "orange", 0.3, 0.5, 0.5, direction, 0.037, True)
        centres = np.array([bouncing.centre(t) for t in range(300)])
        assert centres.min() >= 0.15 - 1e-9 and centres.max() <= 0.85 + 1e-9  # half the size from each edge
        moved = np.abs(np.diff(centres, axis=0)).max(axis=1)
        assert (moved <= 0.037 + 1e-9).all() and np.isclose(moved, 0.037).mean() > 0.9  # no jumps at the walls
