"""A small synthetic video world: seeded scenes of one or two coloured shapes moving over a plain
background, the prompt that describes each scene, and a detector that reads a frame back.

It is what a model small enough for these CPUs can learn (the training data of a trained tiny
preset) and what its videos can be checked against (prompt adherence, trajectories, seams):

    from synthetic_world import sample_scene, render, detect
    scene = sample_scene(np.random.default_rng(0))
    scene.prompt()          # "a red circle moving right on a dark blue background"
    video = render(scene, frames=17, height=64, width=64)   # uint8 [17, 64, 64, 3]
    detect(video[0], scene.background)   # {"red": Found(shape="circle", x=..., y=..., pixels=...)}

Everything is numpy and deterministic given the generator; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
           "white": (240, 240, 240), "orange": (240, 140, 30), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": (10, 10, 10), "dark blue": (20, 30, 80), "grey": (110, 110, 110),
               "dark green": (20, 60, 30)}
SHAPES = ("circle", "square", "triangle")
# direction -> unit step (x right, y down); "bouncing" objects reflect off the frame's edges
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# a shape's share of its bounding box, which tells the shapes apart (a triangle: half the box)
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Thing:
    """One object: what it is and how it moves, in units of the frame (0..1), per frame."""

    shape: str
    colour: str
    size: float
    """Side (or diameter) as a fraction of the frame's shorter side."""
    x: float
    y: float
    """Centre at frame 0, as fractions of the width and height."""
    direction: str
    speed: float
    """Fraction of the frame's width (or height) travelled per frame."""
    bouncing: bool

    def words(self) -> str:
        return f"a {self.colour} {self.shape} {'bouncing' if self.bouncing else 'moving'} {self.direction}"

    def centre(self, t: int) -> tuple[float, float]:
        """The centre at frame ``t`` (fractions of width and height); a bouncing object reflects
        so that it stays inside the frame."""
        dx, dy = DIRECTIONS[self.direction]
        half = self.size / 2
        out = []
        for start, d in ((self.x, dx), (self.y, dy)):
            p = start + d * self.speed * t
            if self.bouncing:
                lo, span = half, 1 - 2 * half  # the centre's free range, folded like a triangle wave
                q = (p - lo) % (2 * span)
                p = lo + (q if q <= span else 2 * span - q)
            out.append(p)
        return out[0], out[1]


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str

    def prompt(self) -> str:
        return " and ".join(t.words() for t in self.things) + f" on a {self.background} background"


def sample_scene(rng: np.random.Generator, objects: int | None = None) -> Scene:
    """A random scene: one or two objects of distinct colours, each seen whole at frame 0."""
    n = objects if objects is not None else int(rng.integers(1, 3))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    things = []
    for colour in colours:
        size = float(rng.uniform(0.2, 0.35))
        things.append(Thing(shape=str(rng.choice(SHAPES)), colour=str(colour), size=size,
                            x=float(rng.uniform(size / 2, 1 - size / 2)), y=float(rng.uniform(size / 2, 1 - size / 2)),
                            direction=str(rng.choice(list(DIRECTIONS))), speed=float(rng.uniform(0.005, 0.02)),
                            bouncing=bool(rng.integers(0, 2))))
    return Scene(tuple(things), str(rng.choice(list(BACKGROUNDS))))


def _mask(thing: Thing, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    """Pixels covered by ``thing`` centred at pixel (cx, cy), sampled at pixel centres."""
    side = thing.size * min(height, width)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    u, v = (xs - cx) / side, (ys - cy) / side  # in units of the side, centred
    if thing.shape == "circle":
        return u * u + v * v <= 0.25
    if thing.shape == "square":
        return (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    # an upward isosceles triangle filling its box: apex at the top middle, base at the bottom
    inside = (v >= -0.5) & (v <= 0.5)
    return inside & (np.abs(u) <= (v + 0.5) / 2)


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """The scene as uint8 RGB frames ``[frames, height, width, 3]``; later objects are drawn on top."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    for t in range(frames):
        for thing in scene.things:
            fx, fy = thing.centre(t)
            video[t][_mask(thing, fx * width, fy * height, height, width)] = COLOURS[thing.colour]
    return video


@dataclass(frozen=True)
class Found:
    shape: str
    x: float
    y: float
    """Centroid in pixels."""
    pixels: int
    span: int = 0
    """The longer side of its bounding box, in pixels."""


def detect(frame: np.ndarray, background: str | None = None, min_pixels: int = 12) -> dict[str, Found]:
    """The objects in one uint8 RGB frame, by colour: each pixel goes to its nearest palette colour
    (background included), and a colour with at least ``min_pixels`` pixels is an object whose
    shape is read from how much of its bounding box it fills. ``background`` None: the most
    common background colour is taken."""
    names = list(COLOURS) + list(BACKGROUNDS)
    palette = np.array([COLOURS.get(n) or BACKGROUNDS[n] for n in names], dtype=np.float32)
    dist = ((frame[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1)
    nearest = dist.argmin(-1)
    if background is None:
        counts = np.bincount(nearest.ravel(), minlength=len(names))[len(COLOURS):]
        background = list(BACKGROUNDS)[int(counts.argmax())]
    found = {}
    for i, name in enumerate(COLOURS):
        ys, xs = np.nonzero(nearest == i)
        if len(xs) < min_pixels or COLOURS[name] == BACKGROUNDS[background]:
            continue
        bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        fill = len(xs) / (bw * bh)
        shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
        found[name] = Found(shape, float(xs.mean() + 0.5), float(ys.mean() + 0.5), int(len(xs)), max(bw, bh))
    return found
