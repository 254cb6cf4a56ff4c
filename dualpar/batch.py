"""A batch of videos (``launch/ray_job.py --prompts FILE``): the prompts file, each video's config and
output directory, what an earlier run of the same batch left there, and ``batch.json``.

Pure bookkeeping: no Ray, and torch only when a checkpoint's header is read. The driver in
:mod:`ray_launch` decides with it which videos to make and how each one starts.

A prompts file holds one video per line. A line is either plain text (the prompt) or a JSON
object: ``{"prompt": ..., "seed": ..., "frames": ..., "out": ..., "negative_prompt": ...}`` plus any
``SECTION.KEY`` the command line's ``--set`` takes. Blank lines and lines starting with ``#`` are
skipped. Every line is checked in full before anything starts; the first bad one is named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Literal

from .config import PER_VIDEO, RESUMABLE_CHANGES, Config, ConfigError, check_text
from .output import rundir

LINE_KEYS = {"prompt": "sampling.prompt", "seed": "sampling.seed", "frames": "video.frames",
             "negative_prompt": "sampling.negative_prompt"}
"""A JSON line's short keys and the config keys they set (``out`` is the video's directory)."""
BATCH_FILE = "batch.json"

Start = Literal["new", "resume", "restart", "complete"]
"""How a video starts: nothing there yet; from its checkpoint; again from the start (what an earlier
attempt wrote is replaced: it had no usable checkpoint); not at all (its manifest says complete)."""


@dataclasses.dataclass
class Video:
    """One video of the batch."""

    index: int
    """Its place among the batch's videos (0-based)."""
    line: int
    """Its line in the prompts file (1-based; 0 for the command line's single video)."""
    cfg: Config
    """Its whole config; ``cfg.output.out`` is its run directory."""

    @property
    def out(self) -> str:
        return self.cfg.output.out

    def where(self) -> str:
        """How messages name it."""
        return f"line {self.line}" if self.line else self.out


def job_key(cfg: Config) -> str:
    """What a pipeline's loaded job depends on: videos with equal keys share one engine."""
    d = cfg.to_dict()
    for name in PER_VIDEO + RESUMABLE_CHANGES:
        section, _, key = name.partition(".")
        d[section].pop(key, None)
    return json.dumps(d, sort_keys=True)


def read_prompts(path: str, base: Config, world: int, root: str) -> list[Video]:
    """The videos of a prompts file, each config built on ``base`` and validated for ``world`` ranks;
    output directories default to ``root/prompt-NNN`` (relative ``out`` values are under ``root``).
    ConfigError naming the file and line for the first problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--prompts {path}: {e.strerror or e}") from None
    videos: list[Video] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.splitlines(), 1):
        where = f"--prompts {path} line {n}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text") from None
        if not text or text.startswith("#"):
            continue
        cfg = copy.deepcopy(base)
        out = None
        try:
            if text.startswith("{"):
                out = _apply_json(cfg, text)
            else:
                cfg.sampling.prompt = text
            cfg.output.out = _video_dir(root, out, len(videos))
            cfg.validate(world_size=world)  # the prompt's text included
            check_text(cfg.sampling.negative_prompt, "sampling.negative_prompt")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        key = os.path.normcase(cfg.output.out)
        if key in seen:
            raise ConfigError(f"{where}: out {cfg.output.out} is also line {seen[key]}'s; every video needs its own")
        seen[key] = n
        videos.append(Video(len(videos), n, cfg))
    if not videos:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return videos


def _apply_json(cfg: Config, text: str) -> str | None:
    try:
        item = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"not valid JSON ({e})") from None
    if not isinstance(item, dict):
        raise ConfigError("a line starting with '{' must be one JSON object")
    if "prompt" not in item:
        raise ConfigError("no \"prompt\" key")
    out = item.pop("out", None)
    if out is not None and (not isinstance(out, str) or not out.strip()):
        raise ConfigError(f"\"out\" must be a directory name, got {out!r}")
    for key, value in item.items():
        dotted = LINE_KEYS.get(key, key)
        if "." not in dotted:
            raise ConfigError(f"unknown key {key!r} (known: {', '.join(LINE_KEYS)}, out, or any SECTION.KEY)")
        if dotted in ("output.out", "output.progress"):
            raise ConfigError(f"{key!r} cannot be set per video (use \"out\" for the directory)")
        cfg.set(dotted, value, source=f"key {key!r}")
    return out


def _video_dir(root: str, out: str | None, index: int) -> str:
    path = os.path.normpath(os.path.join(root, out if out is not None else f"prompt-{index:03d}"))
    if os.path.abspath(path) == os.path.abspath(root):
        raise ConfigError(f"out {out!r} is the batch's own directory; each video needs a directory of its own")
    return path


def check_root(root: str) -> None:
    """The batch directory holds videos' directories and ``batch.json``, never a run of its own."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--out {root} exists and is not a directory")
    if os.path.isfile(os.path.join(root, rundir.MANIFEST)):
        raise ConfigError(f"--out {root} holds a single video's run; a batch needs a directory of its own")


def existing(video: Video, overwrite: bool = False) -> Start:
    """How ``video`` starts given what its directory holds. ConfigError when the directory holds
    something that is not a run's, or a run of other settings (unless ``overwrite``)."""
    from .cli import checkpoint_problem

    out = video.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{video.where()}: {out} exists and is not a directory")
    others = rundir.foreign(out)
    if others:
        raise ConfigError(f"{video.where()}: {out} holds files that are not a run's ({', '.join(others[:3])}); "
                          "nothing is overwritten there: choose another out")
    try:
        with open(os.path.join(out, rundir.MANIFEST)) as f:
            manifest = json.load(f)
        old = Config.from_dict(manifest["config"])
    except FileNotFoundError:
        return "new"
    except (OSError, ValueError, KeyError, ConfigError) as e:
        if overwrite:
            return "restart"
        raise ConfigError(f"{video.where()}: cannot read {os.path.join(out, rundir.MANIFEST)} ({e}); "
                          "pass --overwrite to make the video again") from None
    if overwrite:
        return "restart"
    diff = old.differences(video.cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"{video.where()}: {out} holds a video of other settings ({'; '.join(diff)}); "
                          "choose another out, or pass --overwrite")
    if manifest.get("status") == "complete":
        return "complete"
    if video.cfg.resumable() and checkpoint_problem(out, manifest) is None:
        return "resume"
    return "restart"


class Record:
    """``batch.json`` in the batch directory: one entry per video (prompt, status, pipeline, attempts,
    wall time, frames, reason, output), rewritten atomically at every change. A video an earlier run
    completed keeps that run's figures (:meth:`skipped`)."""

    def __init__(self, root: str, videos: list[Video]):
        self.root = root
        self.previous: dict[str, dict] = {}
        try:
            if root:
                with open(os.path.join(root, BATCH_FILE)) as f:
                    self.previous = {e["out"]: e for e in json.load(f)["videos"] if isinstance(e, dict)}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or not ours to trust
        self.entries = [{"index": v.index, "line": v.line, "prompt": v.cfg.sampling.prompt, "seed": v.cfg.sampling.seed,
                         "frames": v.cfg.video.frames, "out": v.out, "status": "pending", "pipeline": None,
                         "attempts": 0, "wall_s": 0.0, "frames_written": 0, "reason": ""} for v in videos]

    def skipped(self, index: int, frames: int) -> None:
        """The video was complete before this run: the figures of the run that made it, if recorded."""
        e = self.entries[index]
        prev = self.previous.get(e["out"], {})
        if prev.get("prompt") == e["prompt"] and prev.get("status") == "complete":
            e.update({k: prev[k] for k in ("pipeline", "attempts", "wall_s") if k in prev})
        e.update(status="complete", frames_written=frames)

    def update(self, index: int, **fields) -> None:
        self.entries[index].update(fields)
        self.save()

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("complete", "running", "failed", "pending")}
        for e in self.entries:
            out[e["status"]] += 1
        return out

    def save(self) -> None:
        if self.root:
            data = {"videos": self.entries, "counts": self.counts()}
            rundir.atomic_write(self.root, BATCH_FILE, (json.dumps(data, indent=2) + "\n").encode())

    def table(self) -> str:
        """The batch as a plain-text table, one row per video."""
        rows = [("#", "status", "pipeline", "attempts", "wall s", "frames", "prompt")]
        for e in self.entries:
            prompt = e["prompt"] if len(e["prompt"]) <= 48 else e["prompt"][:45] + "..."
            status = e["status"] + (f" ({e['reason']})" if e["status"] == "failed" and e["reason"] else "")
            rows.append((str(e["index"]), status, "-" if e["pipeline"] is None else str(e["pipeline"]),
                         str(e["attempts"]), f"{e['wall_s']:.1f}", f"{e['frames_written']}/{e['frames']}", prompt))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
