"""Balanced stages: a layer split from measured cost (pure logic; no torch, no process group).

A pipeline runs at the pace of its slowest stage. Each rank's load over one video is its layers'
time plus its own extra work: rank 0 embeds every task and applies every scheduler step, the last
rank runs the head and guidance, and whichever rank decodes (``output.decode_on``) shares its device
with the VAE for every finished block (its writer thread decodes while the rank computes). A
:class:`Profile` holds those costs per unit (one layer on one task, rank 0's share of one task, the
head's, one block's decoding), measured on a finished video
(:meth:`Profile.from_run`), so it carries over to another split, rank count or video length of the
same setup. :func:`best_split` is the contiguous split that minimises the slowest stage's load.

Profiles are stored per setup (model, dtype, device, frame size, block, context, CFG batch, mode)
in one JSON file (:class:`ProfileStore`), so ``parallel.split=auto`` starts the next run from what
the last one measured; a batch of videos re-splits after each video from that video's figures.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CHANGE = 0.03
"""A new split is taken only when it predicts the slowest stage at least this much faster (noise
in one video's timings must not move layers back and forth)."""


@dataclass(frozen=True)
class Profile:
    """Costs per unit of work, in seconds, measured on one setup."""

    layer_s: float
    """One DiT layer on one task (mean over the video's computed tasks)."""
    first_s: float
    """Rank 0's own work per task: embedding the input and applying the scheduler step."""
    last_s: float
    """The last rank's own work per task: the output head and the guidance combine."""
    decode_s: float
    """What decoding and writing one block adds to the decoding rank's own time: measured as that rank's
    layer time over the others' per layer (the VAE shares its device, or its cores), plus any wait
    for a full output queue (in ``first_s``/``last_s``). On a GPU it is about the VAE's time; on a
    CPU with cores to spare, about nothing."""

    @classmethod
    def from_run(cls, ranks: list[dict], layers: list[int], tasks: int, blocks: int, decode_rank: int | None) -> "Profile":
        """The profile of a finished video. ``ranks``: per rank ``busy_s`` (all compute) and ``layers_s`` (in
        the layers); ``layers``: each ring rank's layer count; ``tasks``: computed tasks per rank; ``blocks``:
        blocks written; ``decode_rank``: who decoded (None: nobody; ``len(layers)``: an extra rank)."""
        tasks, ring = max(tasks, 1), len(layers)
        clean = [r for r in range(ring) if r != decode_rank] or list(range(ring))
        layer_s = sum(ranks[r]["layers_s"] for r in clean) / (sum(layers[r] for r in clean) * tasks)
        decode_s = 0.0
        if decode_rank is not None and decode_rank < ring and clean != list(range(ring)):
            excess = ranks[decode_rank]["layers_s"] - layers[decode_rank] * layer_s * tasks
            decode_s = excess / max(blocks, 1)
        first = ranks[0]["busy_s"] - ranks[0]["layers_s"]
        if ring == 1:  # one rank does both ends: split its own time evenly between them
            first_s = last_s = first / (2 * tasks)
        else:
            first_s = first / tasks
            last_s = (ranks[ring - 1]["busy_s"] - ranks[ring - 1]["layers_s"]) / tasks
        return cls(layer_s=max(layer_s, 0.0), first_s=max(first_s, 0.0), last_s=max(last_s, 0.0),
                   decode_s=max(decode_s, 0.0))

    def loads(self, split: list[int], tasks: int, blocks: int, decode_rank: int | None) -> list[float]:
        """Predicted busy seconds per ring rank over one video of ``tasks`` tasks and ``blocks`` blocks."""
        out = [n * self.layer_s * tasks for n in split]
        out[0] += self.first_s * tasks
        out[-1] += self.last_s * tasks
        if decode_rank is not None and decode_rank < len(split):
            out[decode_rank] += self.decode_s * blocks
        return out

    def describe(self, decode_on: str) -> str:
        where = {"first": "rank 0", "last": "the last rank", "extra": "its own rank"}.get(decode_on, decode_on)
        text = (f"{self.layer_s * 1e3:.2f} ms per layer and task, rank 0 +{self.first_s * 1e3:.2f} ms per task "
                f"(embedding, scheduler), last rank +{self.last_s * 1e3:.2f} ms (head, guidance)")
        if self.decode_s:
            text += f", decoding +{self.decode_s:.2f} s per block on {where}"
        return text


def best_split(num_layers: int, ring: int, profile: Profile, tasks: int, blocks: int,
               decode_rank: int | None) -> list[int]:
    """The contiguous split (layers per ring rank, each >= 1) whose slowest stage is fastest under
    ``profile``; among equally fast ones the one closest to the even split (``schedule.split_layers``),
    so that layers move only when that makes the slowest stage faster."""
    from .schedule import split_layers

    if not 1 <= ring <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {ring} ranks")
    # A split's load on rank r depends on r and its own count only: minimax over compositions by
    # dynamic programming, from the last rank backwards.
    fixed = profile.loads([0] * ring, tasks, blocks, decode_rank)
    per_layer = profile.layer_s * tasks
    even = [b - a for a, b in split_layers(num_layers, ring)]

    def load(r: int, n: int) -> float:
        return fixed[r] + n * per_layer

    # best[r][k]: (slowest load, distance from even, counts) for ranks r.. taking k layers
    best: list[dict[int, tuple[float, float, tuple[int, ...]]]] = [dict() for _ in range(ring + 1)]
    best[ring][0] = (0.0, 0.0, ())
    for r in range(ring - 1, -1, -1):
        left = ring - r
        for k in range(left, num_layers - r + 1):
            cands = []
            for n in range(1, k - (left - 1) + 1):
                rest = best[r + 1].get(k - n)
                if rest is None:
                    continue
                slow = max(load(r, n), rest[0])
                cands.append((round(slow, 12), rest[1] + (n - even[r]) ** 2, (n,) + rest[2]))
            if cands:
                best[r][k] = min(cands)
    return list(best[0][num_layers][2])


def decode_rank(decode_on: str, ring: int, decode: bool) -> int | None:
    """The rank that decodes: 0, the last ring rank, the extra rank after the ring, or None (no decoding)."""
    if not decode:
        return None
    return {"first": 0, "last": ring - 1, "extra": ring}[decode_on]


def profile_key(cfg, device: str) -> str:
    """The setup a profile belongs to: what changes the cost per unit (not the length, split or rank count)."""
    m, v, p = cfg.model, cfg.video, cfg.parallel
    model = m.path or f"preset:{m.preset}"
    if m.transformer_file:
        model += f"+{m.transformer_file}"
    batch = 2 if cfg.sampling.guidance > 1.0 else 1
    mode = cfg.sampling.mode
    if mode == "causal":
        mode += f"/{cfg.causal.chunk}/{cfg.causal.policy}/{cfg.causal.budget:g}"
    return (f"{model}|{m.dtype}|{device}|{v.height}x{v.width}|block {p.block}|num_cat {p.num_cat}|batch {batch}|"
            f"{mode}|attention {m.attention}|compile {m.compile}")


def default_store_path() -> Path:
    base = os.environ.get("DUALPAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dualpar")
    return Path(base) / "profiles.json"


class ProfileStore:
    """Measured profiles by setup, in one JSON file (written atomically; a damaged file counts as empty)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_store_path()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Profile | None:
        entry = self._read().get(key)
        try:
            return Profile(**{k: float(entry[k]) for k in ("layer_s", "first_s", "last_s", "decode_s")})
        except (TypeError, KeyError, ValueError):
            return None

    def put(self, key: str, profile: Profile) -> None:
        data = self._read()
        data[key] = asdict(profile)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
