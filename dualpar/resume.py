"""Checkpoints of a run at iteration boundaries, without pickle.

A checkpoint is one safetensors file, ``checkpoint.safetensors`` in the run's
output directory, replaced atomically: tensors are stored as tensors, and
everything else (iteration, step counts, scheduler scalars, the writer's
counters) as JSON in the file's metadata. Nothing is ever unpickled, so a
checkpoint from an untrusted place cannot run code.
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
