"""Checkpoints of a run at iteration boundaries, without pickle: the one home of the format.

Everything with run state follows one protocol (after torchtitan's ``Stateful``):
``state_dict() -> (meta, tensors)``, JSON-able metadata and named tensors, and
``load_state_dict(meta, tensors)`` to continue from it. (An object that reopens files, the
run writer and its MP4 writer, is rebuilt from its saved state by a ``reopen`` constructor.)
A :class:`Checkpointer` composes the named parts of a run into one checkpoint.

A checkpoint is one safetensors file, ``checkpoint.safetensors`` in the run's output
directory, replaced atomically: tensors are stored as tensors, and everything else
(iteration, step counts, scheduler scalars, the writer's counters) as JSON in the file's
metadata: ``format`` (:data:`FORMAT`) and ``state``, an object with each part's meta under
the part's name, then the checkpoint's ``info`` (the run's config and id). Nothing is ever
unpickled, so a checkpoint from an untrusted place cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from .output import rundir

FILE = rundir.CHECKPOINT
FORMAT = 1


class ResumeError(ValueError):
    """The run cannot be resumed (checked before any model is built: one line, exit status 2)."""


def pack(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able description of ``obj``; its tensors go into ``tensors`` under ``name``-based keys."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().to("cpu").clone()  # views (e.g. of timesteps) must not share storage
        return {"tensor": name}
    if isinstance(obj, (list, tuple)):
        return {"list": [pack(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"dict": {str(k): pack(v, f"{name}.{k}", tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint {name} of type {type(obj).__name__}")


def unpack(desc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`pack` described, with fresh copies of its tensors."""
    if "tensor" in desc:
        return tensors[desc["tensor"]].clone()
    if "list" in desc:
        return [unpack(v, tensors) for v in desc["list"]]
    if "dict" in desc:
        return {k: unpack(v, tensors) for k, v in desc["dict"].items()}
    return desc["value"]


def scheduler_state(sched) -> dict:
    """A diffusers scheduler's mutable attributes (its config is rebuilt from the run's config)."""
    return {k: v for k, v in vars(sched).items() if k != "_internal_dict"}


def save(out_dir: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a whole checkpoint (``meta`` is the file's ``state`` object) atomically."""
    data = save_safetensors(tensors, metadata={"format": str(FORMAT), "state": json.dumps(meta)})
    return rundir.atomic_write(out_dir, FILE, data)


def read_meta(out_dir: str | Path) -> dict:
    """The checkpoint's JSON part only (cheap: no tensor is read)."""
    path = Path(out_dir) / FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
        if md.get("format") != str(FORMAT):
            raise ResumeError(f"--resume {out_dir}: {FILE} has unknown format {md.get('format')!r}")
        return json.loads(md["state"])
    except ResumeError:
        raise
    except Exception as e:  # a torn or foreign file
        raise ResumeError(f"--resume {out_dir}: cannot read {FILE}: {e}") from None


def remove(out_dir: str | Path) -> None:
    (Path(out_dir) / FILE).unlink(missing_ok=True)


def load(out_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A whole checkpoint: the file's ``state`` object and every tensor."""
    path = Path(out_dir) / FILE
    if not path.is_file():
        raise ResumeError(f"--resume {out_dir}: no {FILE} (the run stopped before its first checkpoint)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if md.get("format") != str(FORMAT):
            raise ResumeError(f"--resume {out_dir}: {FILE} has unknown format {md.get('format')!r}")
        return json.loads(md["state"]), tensors
    except ResumeError:
        raise
    except Exception as e:  # a torn or foreign file
        raise ResumeError(f"--resume {out_dir}: cannot read {FILE}: {e}") from None


def _prefix(name: str) -> str:
    """Where part ``name``'s tensors live in the file: FORMAT 1 keeps the engine's at the top
    level and every other part's under ``NAME.``."""
    return "" if name == "engine" else f"{name}."


def load_parts(out_dir: str | Path, names: tuple[str, ...]) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """The saved ``(meta, tensors)`` of each named part, for its ``load_state_dict`` or ``reopen``.

    The engine's tensors are the whole file's (FORMAT 1 does not separate them); it only
    reads the keys its meta names.
    """
    meta, tensors = load(out_dir)
    parts = {}
    for name in names:
        p = _prefix(name)
        parts[name] = meta[name], {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    return parts


class Checkpointer:
    """Save the named stateful parts of one run (``{"engine": state, "writer": writer}``) as one checkpoint.

    ``info`` (JSON-able: the run's config and id) is stored after the parts' meta. A part
    with ``when_written`` (the run writer) gives its state only once every block handed to it
    so far is on disk: :meth:`save` then takes the other parts' states at once and leaves the
    writing of the file to that part (its worker thread), so denoising need not wait.
    """

    def __init__(self, out_dir: str | Path, parts: dict[str, Any], info: dict) -> None:
        self.out_dir = out_dir
        self.parts = parts
        self.info = info
        deferred = [name for name, part in parts.items() if hasattr(part, "when_written")]
        if len(deferred) > 1:
            raise ValueError(f"only one part can defer its state, got {', '.join(deferred)}")
        self._deferred = deferred[0] if deferred else None

    def save(self) -> None:
        """Checkpoint every part: now, or once the deferring part's output is on disk."""
        now = {}
        for name, part in self.parts.items():
            if name != self._deferred:
                meta, tensors = part.state_dict()
                # copied now: the part goes on changing while the file waits to be written
                now[name] = meta, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        if self._deferred is None:
            self._write(now)
            return

        def write(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
            self._write({**now, self._deferred: (meta, tensors)})

        self.parts[self._deferred].when_written(write)

    def _write(self, states: dict[str, tuple[dict, dict[str, torch.Tensor]]]) -> None:
        meta, tensors = {}, {}
        for name in self.parts:  # in the parts' order, as FORMAT 1 files list them
            part_meta, part_tensors = states[name]
            meta[name] = part_meta
            tensors.update({_prefix(name) + k: v for k, v in part_tensors.items()})
        save(self.out_dir, {**meta, **self.info}, tensors)
