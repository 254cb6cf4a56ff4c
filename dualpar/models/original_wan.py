"""Transformer weights in the original Wan naming: the name table, renaming, checking and loading a slice.

Wan2.1 itself and its causal fine-tunes (CausVid, Self-Forcing, LongLive)
ship the network under its original names (``blocks.N.self_attn.q.weight``,
``head.head``, ...), usually as a ``.pt`` holding a ``generator`` /
``generator_ema`` state dict with a ``model.`` prefix. One table,
:data:`ORIGINAL_TO_DIFFUSERS`, says what each name is called in diffusers;
both directions of renaming are read from it.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .wan import WanSlice
from .weights import (
    TensorInfo,
    WeightsError,
    assemble_slice,
    check_tensors,
    load_transformer_slice_from_state_dict,
    safetensors_info,
    transformer_config,
)

__all__ = [
    "ORIGINAL_TO_DIFFUSERS",
    "check_original_wan_file",
    "convert_original_wan_state_dict",
    "diffusers_to_original_key",
    "load_original_wan_file",
    "load_original_wan_slice",
    "original_to_diffusers_key",
    "original_wan_key_map",
]

# Original name -> diffusers name. "{i}" is a block index; a trailing "*" is the
# parameter leaf (weight or bias) of a module, kept as it is; entries without
# "*" are parameters themselves.
ORIGINAL_TO_DIFFUSERS = {
    "patch_embedding.*": "patch_embedding.*",
    "text_embedding.0.*": "condition_embedder.text_embedder.linear_1.*",
    "text_embedding.2.*": "condition_embedder.text_embedder.linear_2.*",
    "time_embedding.0.*": "condition_embedder.time_embedder.linear_1.*",
    "time_embedding.2.*": "condition_embedder.time_embedder.linear_2.*",
    "time_projection.1.*": "condition_embedder.time_proj.*",
    "head.head.*": "proj_out.*",
    "head.norm.*": "norm_out.*",
    "head.modulation": "scale_shift_table",
    "blocks.{i}.self_attn.q.*": "blocks.{i}.attn1.to_q.*",
    "blocks.{i}.self_attn.k.*": "blocks.{i}.attn1.to_k.*",
    "blocks.{i}.self_attn.v.*": "blocks.{i}.attn1.to_v.*",
    "blocks.{i}.self_attn.o.*": "blocks.{i}.attn1.to_out.0.*",
    "blocks.{i}.self_attn.norm_q.*": "blocks.{i}.attn1.norm_q.*",
    "blocks.{i}.self_attn.norm_k.*": "blocks.{i}.attn1.norm_k.*",
    "blocks.{i}.cross_attn.q.*": "blocks.{i}.attn2.to_q.*",
    "blocks.{i}.cross_attn.k.*": "blocks.{i}.attn2.to_k.*",
    "blocks.{i}.cross_attn.v.*": "blocks.{i}.attn2.to_v.*",
    "blocks.{i}.cross_attn.o.*": "blocks.{i}.attn2.to_out.0.*",
    "blocks.{i}.cross_attn.norm_q.*": "blocks.{i}.attn2.norm_q.*",
    "blocks.{i}.cross_attn.norm_k.*": "blocks.{i}.attn2.norm_k.*",
    "blocks.{i}.norm1.*": "blocks.{i}.norm1.*",
    # The two namings number the norms differently: the original `norm3` is
    # the (affine) cross-attention norm, diffusers' `norm2`; the original
    # `norm2` precedes the FFN, diffusers' `norm3`.
    "blocks.{i}.norm3.*": "blocks.{i}.norm2.*",
    "blocks.{i}.norm2.*": "blocks.{i}.norm3.*",
    "blocks.{i}.ffn.0.*": "blocks.{i}.ffn.net.0.proj.*",
    "blocks.{i}.ffn.2.*": "blocks.{i}.ffn.net.2.*",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
}
_DIFFUSERS_TO_ORIGINAL = {v: k for k, v in ORIGINAL_TO_DIFFUSERS.items()}

# Tensors some implementations keep in their state dict that hold no weights.
_IGNORED = frozenset({"freqs"})
# Wrappers around the network's own names: training checkpoints nest the
# generator (and its EMA) and often prefix `model.` (a wrapper module).
_WRAPPERS = ("generator", "generator_ema")
_NAME_PREFIXES = ("state_dict.", "module.", "model.", "diffusion_model.", "_orig_mod.")
_BLOCK_PREFIX = re.compile(r"blocks\.(\d+)\.(?=.)")
_LEAF = re.compile(r"\.(weight|bias)$")


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """``key`` renamed by a table of :data:`ORIGINAL_TO_DIFFUSERS`'s form, or None if no entry matches."""
    block = _BLOCK_PREFIX.match(key)
    pattern = "blocks.{i}." + key[block.end() :] if block else key
    leaf = _LEAF.search(pattern)
    if leaf:
        pattern = pattern[: leaf.start()] + ".*"
    new = table.get(pattern)
    if new is None:
        return None
    if leaf:
        new = new[:-1] + leaf.group(1)
    return new.replace("{i}", block.group(1)) if block else new


def original_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of one original-Wan tensor name (no prefixes), or None if unknown."""
    return _rename(key, ORIGINAL_TO_DIFFUSERS)


def diffusers_to_original_key(key: str) -> str | None:
    """The original-Wan name of one diffusers tensor name, or None if it has none."""
    return _rename(key, _DIFFUSERS_TO_ORIGINAL)


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _NAME_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def original_wan_key_map(keys: Iterable[str], *, prefer_ema: bool = False, strict: bool = True) -> dict[str, str]:
    """Map diffusers names to the original-Wan keys (possibly wrapped) that hold them.

    ``keys`` are flat, dot-joined names as found in a file: a nested
    ``{"generator": {"model.blocks.0...": t}}`` flattens to
    ``generator.model.blocks.0...``. When a ``generator`` and a
    ``generator_ema`` are both present, ``prefer_ema`` picks the EMA one;
    if only one is, it is used. Keys outside the chosen wrapper are ignored.
    With ``strict``, an unrecognised key raises :class:`WeightsError`;
    otherwise it is dropped.
    """
    keys = list(keys)
    unwrapped = {}
    for k in keys:
        u = k[len("state_dict.") :] if k.startswith("state_dict.") else k
        unwrapped[k] = u
    present = {w for w in _WRAPPERS if any(u.startswith(w + ".") for u in unwrapped.values())}
    wrapper = None
    if present:
        order = _WRAPPERS[::-1] if prefer_ema else _WRAPPERS
        wrapper = next(w for w in order if w in present)

    out: dict[str, str] = {}
    for k, u in unwrapped.items():
        if wrapper is not None:
            if not u.startswith(wrapper + "."):
                continue
            u = u[len(wrapper) + 1 :]
        name = _strip_prefixes(u)
        if name in _IGNORED:
            continue
        new = original_to_diffusers_key(name)
        if new is None:
            if strict:
                raise WeightsError(f"unrecognised tensor {k!r} in an original-Wan (text-to-video) checkpoint")
            continue
        if new in out:
            raise WeightsError(f"tensors {out[new]!r} and {k!r} both map to {new!r}")
        out[new] = k
    if not out:
        raise WeightsError("no Wan transformer tensors found in the checkpoint")
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Dot-join nested mappings; keep only tensor leaves (drops step counters and the like)."""
    flat: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            flat[key] = v
        elif isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
    return flat


def convert_original_wan_state_dict(
    sd: Mapping[str, Any], *, prefer_ema: bool = False, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an original-Wan state dict (Wan2.1, CausVid, Self-Forcing, LongLive) to diffusers names.

    Accepts the network's own names, optionally prefixed with ``model.``, and
    nested under ``generator`` / ``generator_ema`` (and ``state_dict``), as
    nested mappings or dot-joined flat keys. Tensors are not copied. See
    :func:`original_wan_key_map` for ``prefer_ema`` and ``strict``.
    """
    flat = _flatten(sd)
    return {new: flat[old] for new, old in original_wan_key_map(flat, prefer_ema=prefer_ema, strict=strict).items()}


def load_original_wan_file(path: str | Path) -> dict[str, Any]:
    """Read an original-Wan checkpoint file as it is stored (names not converted).

    ``.safetensors`` is read with safetensors (flat, dot-joined names). A
    ``.pt``/``.pth`` file is read only with ``torch.load(weights_only=True)``
    (no arbitrary code), memory-mapped when its format allows.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"missing file: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    if p.suffix not in (".pt", ".pth"):
        raise WeightsError(f"unsupported checkpoint file type {p.suffix!r}: {p} (use .safetensors, .pt or .pth)")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (non-zip) serialization cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"cannot load {p}: it holds objects other than tensors and plain containers "
            "(only weights_only loading is allowed)"
        ) from None
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise WeightsError(f"cannot load {p}: {lines[0] if lines else type(e).__name__}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{p}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


def load_original_wan_slice(
    config: Mapping[str, Any] | str | Path,
    path: str | Path,
    first: int,
    last: int,
    *,
    prefer_ema: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[WanSlice, set[str]]:
    """Load layers ``[first, last)`` from one original-Wan checkpoint file.

    ``config`` is the transformer config (diffusers or original format, or a
    path to it). A ``.safetensors`` file is opened lazily and only owned
    tensors are read; a ``.pt`` file is memory-mapped, so unowned tensors stay
    on disk. Returns the slice and the set of diffusers names loaded.
    """
    cfg = transformer_config(config)
    p = Path(path)
    if p.suffix != ".safetensors":
        sd = convert_original_wan_state_dict(load_original_wan_file(p), prefer_ema=prefer_ema)
        return load_transformer_slice_from_state_dict(cfg, sd, first, last, dtype=dtype, device=device)
    if not p.is_file():
        raise WeightsError(f"missing file: {p}")
    with safe_open(str(p), framework="pt", device="cpu") as f:
        key_map = original_wan_key_map(f.keys(), prefer_ema=prefer_ema)

        def read(names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
            for name in names:
                yield name, f.get_tensor(key_map[name])

        return assemble_slice(
            cfg,
            first,
            last,
            available=key_map.__contains__,
            read=read,
            origin=str(p),
            dtype=dtype,
            device=device,
        )


def check_original_wan_file(
    config: Mapping[str, Any], path: str | Path, config_path: str | Path, *, prefer_ema: bool = False
) -> None:
    """Check an original-Wan transformer file against the (diffusers) transformer ``config``, as
    :func:`~dualpar.models.weights.check_tensors` does, before any rank loads it.

    A ``.safetensors`` file is judged by its header; a ``.pt``/``.pth`` file is
    memory-mapped, so only its pickled structure is read (a legacy, non-zip
    ``.pt`` cannot be mapped and is read whole). Raises :class:`WeightsError`
    naming the file.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        stored = safetensors_info(p)
    else:
        flat = _flatten(load_original_wan_file(p))
        stored = {
            k: TensorInfo(p, k, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_floating_point())
            for k, t in flat.items()
        }
    try:
        key_map = original_wan_key_map(stored, prefer_ema=prefer_ema)
    except WeightsError as e:  # its messages name tensors, not the file
        raise WeightsError(f"{p}: {e}") from None

    def missing(name: str) -> str:
        return f"{p}: missing tensor {diffusers_to_original_key(name) or name!r} (diffusers {name!r})"

    check_tensors(config, {new: stored[old] for new, old in key_map.items()}, p, config_path, missing)
