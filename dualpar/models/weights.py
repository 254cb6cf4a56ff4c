"""Model weights: validate a diffusers-format Wan2.1 T2V folder and load one rank's share of it.

A rank that owns transformer layers ``[first, last)`` never holds the whole
transformer in memory: the model skeleton is built on the ``meta`` device,
:class:`~dualpar.models.wan.WanSlice` drops the layers the rank does not own,
and only the owned tensors are read from the (memory-mapped) safetensors
files, one tensor at a time. For sharded weights the index tells which
shards hold those tensors; no other shard is opened.

Checkpoints in the original Wan naming (Wan2.1 itself and its causal
fine-tunes: CausVid, Self-Forcing, LongLive, usually a ``.pt`` holding a
``generator`` / ``generator_ema`` state dict with a ``model.`` prefix) are
renamed to diffusers' names by :func:`convert_original_wan_state_dict`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .wan import WanSlice

__all__ = [
    "WeightsError",
    "check_model_dir",
    "convert_original_wan_config",
    "convert_original_wan_state_dict",
    "load_original_wan_file",
    "load_original_wan_slice",
    "load_transformer_slice",
    "load_transformer_slice_from_state_dict",
    "original_wan_key_map",
    "original_to_diffusers_key",
    "read_transformer_config",
    "transformer_keys_for",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"

# What the diffusers folder of a Wan2.1 text-to-video pipeline must contain.
_CONFIG_FILE = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHT_CANDIDATES = {
    # The transformer is read by this module with safetensors, so only that format will do.
    "transformer": (WEIGHTS_NAME,),
    "vae": (WEIGHTS_NAME, "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
_TOKENIZER_VOCAB = ("tokenizer.json", "spiece.model")

# diffusers' WanTransformer3DModel._keep_in_fp32_modules (read from the class when available).
_DEFAULT_KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

_EMBED_MODULES = frozenset({"patch_embedding", "condition_embedder"})
_HEAD_MODULES = frozenset({"norm_out", "proj_out", "scale_shift_table"})
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


class WeightsError(ValueError):
    """Model weights (folder, file or state dict) are missing something or malformed; the message is one line."""


# -- reading and validating a diffusers folder --------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"malformed JSON in {path}: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"malformed JSON in {path}: expected an object, got {type(data).__name__}")
    return data


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-weights index file."""
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"malformed index {path}: no 'weight_map' object")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"malformed index {path}: 'weight_map' values must be file names")
    return weight_map


def _check_weights(folder: Path, candidates: tuple[str, ...]) -> None:
    """One of ``candidates`` exists, either whole or as an index whose every shard exists."""
    for name in candidates:
        if (folder / name).is_file():
            return
        index = folder / (name + ".index.json")
        if index.is_file():
            for shard in sorted(set(_read_index(index).values())):
                if not (folder / shard).is_file():
                    raise WeightsError(f"missing shard {folder / shard} (listed in {index})")
            return
    wanted = " or ".join(f"{n}[.index.json]" for n in candidates)
    raise WeightsError(f"missing weights in {folder}: expected {wanted}")


def _check_transformer_config(cfg: dict, path: Path) -> None:
    cls = cfg.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel":
        raise WeightsError(f"{path}: _class_name is {cls!r}, expected 'WanTransformer3DModel'")
    layers = cfg.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise WeightsError(f"{path}: 'num_layers' must be a positive integer, got {layers!r}")
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise WeightsError(f"{path}: image-conditioned Wan models are not supported (text-to-video only)")


def check_model_dir(path: str | Path) -> dict:
    """Validate a local diffusers-format Wan2.1 text-to-video folder without loading weights.

    Checks ``model_index.json``; the ``transformer``, ``vae``, ``text_encoder``,
    ``tokenizer`` and ``scheduler`` subfolders with their config files; a
    tokenizer vocabulary; and that the weight files (or every shard an index
    lists) exist. Returns the transformer's config dict. Raises
    :class:`WeightsError` naming the first missing or malformed path.
    """
    root = Path(path)
    if not root.is_dir():
        raise WeightsError(f"model folder not found: {root}")
    _read_json(root / "model_index.json")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / sub).is_dir():
            raise WeightsError(f"missing folder: {root / sub}")
    configs = {sub: _read_json(root / sub / name) for sub, name in _CONFIG_FILE.items()}
    tok = root / "tokenizer"
    if not any((tok / name).is_file() for name in _TOKENIZER_VOCAB):
        raise WeightsError(f"missing tokenizer vocabulary in {tok}: expected {' or '.join(_TOKENIZER_VOCAB)}")
    if (tok / "tokenizer_config.json").exists():
        _read_json(tok / "tokenizer_config.json")
    _check_transformer_config(configs["transformer"], root / "transformer" / "config.json")
    for sub, candidates in _WEIGHT_CANDIDATES.items():
        _check_weights(root / sub, candidates)
    return configs["transformer"]


def _transformer_dir(path: str | Path) -> Path:
    """Accept either the pipeline folder or its ``transformer`` subfolder."""
    root = Path(path)
    if (root / "transformer" / "config.json").is_file():
        return root / "transformer"
    if (root / "config.json").is_file():
        return root
    if not root.exists():
        raise WeightsError(f"model folder not found: {root}")
    raise WeightsError(f"missing file: {root / 'transformer' / 'config.json'}")


def read_transformer_config(path: str | Path) -> dict:
    """The transformer config of a pipeline folder, a transformer folder or a ``config.json``.

    A config in the original Wan format (``dim``, ``num_heads``, ...) is converted.
    """
    p = Path(path)
    cfg = _read_json(p) if p.is_file() else _read_json(_transformer_dir(p) / "config.json")
    return convert_original_wan_config(cfg) if _is_original_config(cfg) else cfg


# -- which tensors a rank owns ------------------------------------------------------------


def transformer_keys_for(config: Mapping[str, Any], first: int, last: int) -> Callable[[str], bool]:
    """A predicate on diffusers tensor names: does the rank owning layers ``[first, last)`` need it?

    It needs ``blocks.{i}.*`` for ``first <= i < last``; the patch and condition
    embedding on the first rank; ``norm_out``, ``proj_out`` and the output
    ``scale_shift_table`` on the last. RoPE has no weights.
    """
    n = int(config["num_layers"])
    if not 0 <= first < last <= n:
        raise ValueError(f"bad layer range [{first}, {last}) of {n}")
    top = set()
    if first == 0:
        top |= _EMBED_MODULES
    if last == n:
        top |= _HEAD_MODULES

    def owns(name: str) -> bool:
        m = _BLOCK_KEY.fullmatch(name)
        if m:
            return first <= int(m.group(1)) < last
        return name.split(".", 1)[0] in top

    return owns


def _model_name(slice_name: str, first: int) -> str:
    """Map a :class:`WanSlice` parameter name to the model's (``layers.j`` is ``blocks.first+j``)."""
    if slice_name.startswith("layers."):
        j, rest = slice_name[len("layers.") :].split(".", 1)
        return f"blocks.{first + int(j)}.{rest}"
    return slice_name


def keep_fp32_names() -> tuple[str, ...]:
    """Name components diffusers keeps in float32 when the model runs in bf16/fp16."""
    from diffusers import WanTransformer3DModel

    return tuple(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or _DEFAULT_KEEP_FP32)


def _target_dtype(name: str, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> torch.dtype:
    # Same rule as diffusers' loader: a name component listed in _keep_in_fp32_modules stays fp32.
    if any(part in keep_fp32 for part in name.split(".")):
        return torch.float32
    return dtype


# -- building a slice ---------------------------------------------------------------------


def _empty_slice(config: Mapping[str, Any], first: int, last: int) -> WanSlice:
    """A WanSlice whose parameters are all on ``meta``, and a real (CPU) RoPE."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    n = int(config["num_layers"])
    if not 0 <= first < last <= n:
        raise ValueError(f"bad layer range [{first}, {last}) of {n}")
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(config))
    part = WanSlice(model, first, last)  # unowned layers go away with `model`
    del model
    # RoPE tables are non-persistent buffers, absent from checkpoints: compute them for real.
    meta_rope = part.rope
    part.rope = WanRotaryPosEmbed(meta_rope.attention_head_dim, meta_rope.patch_size, meta_rope.max_seq_len)
    return part


def _assemble(
    config: Mapping[str, Any],
    first: int,
    last: int,
    *,
    available: Callable[[str], bool],
    read: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]],
    origin: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[WanSlice, set[str]]:
    """Fill an empty slice with the tensors ``read`` yields for the owned names.

    ``read`` is only ever asked for owned names, and its tensors are copied
    (cast, moved) one at a time, so peak memory is the slice plus one tensor.
    The copy matters on CPU: safetensors and ``torch.load(mmap=True)`` hand
    out views of the mapped file, and weights must not change (or fault) if
    the file is rewritten while the engine runs.
    """
    part = _empty_slice(config, first, last)
    device = torch.device(device)
    shapes = {}
    names = {}  # model name -> slice name, in module order
    for slice_name, p in part.state_dict(keep_vars=True).items():
        ckpt = _model_name(slice_name, first)
        names[ckpt] = slice_name
        shapes[ckpt] = p.shape
    for ckpt in names:
        if not available(ckpt):
            raise WeightsError(f"{origin}: missing tensor {ckpt!r}")

    keep_fp32 = keep_fp32_names() if dtype.is_floating_point else ()
    state: dict[str, torch.Tensor] = {}
    for ckpt, t in read(list(names)):
        if t.shape != shapes[ckpt]:
            raise WeightsError(
                f"{origin}: tensor {ckpt!r} has shape {tuple(t.shape)}, the model expects {tuple(shapes[ckpt])}"
            )
        target = _target_dtype(ckpt, dtype, keep_fp32) if t.is_floating_point() else t.dtype
        state[names[ckpt]] = t.to(device=device, dtype=target, copy=True)
    part.load_state_dict(state, strict=True, assign=True)
    part.rope.to(device)
    part.eval().requires_grad_(False)
    leftover = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
    if leftover:  # would mean WanSlice holds a tensor that is neither a weight nor rope
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover}")
    return part, set(names)


def load_transformer_slice(
    path: str | Path,
    first: int,
    last: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[WanSlice, set[str]]:
    """Load layers ``[first, last)`` of a diffusers Wan transformer from safetensors.

    ``path`` is the pipeline folder or its ``transformer`` subfolder. Only the
    owned tensors are read, only from the shards that hold them; parameters in
    diffusers' ``_keep_in_fp32_modules`` stay float32, the rest become
    ``dtype``. Returns the slice (eval mode, no grad) and the set of tensor
    names that were read.
    """
    tdir = _transformer_dir(path)
    config = _read_json(tdir / "config.json")
    _check_transformer_config(config, tdir / "config.json")

    if (tdir / WEIGHTS_NAME).is_file():
        single = tdir / WEIGHTS_NAME
        with safe_open(str(single), framework="pt", device="cpu") as f:
            keys = set(f.keys())
        weight_map = dict.fromkeys(keys, WEIGHTS_NAME)
        origin = str(single)
    elif (tdir / WEIGHTS_INDEX_NAME).is_file():
        weight_map = _read_index(tdir / WEIGHTS_INDEX_NAME)
        origin = str(tdir / WEIGHTS_INDEX_NAME)
    else:
        raise WeightsError(f"missing weights in {tdir}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")

    def read(names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(weight_map[name], []).append(name)
        for fname, group in by_file.items():
            file = tdir / fname
            if not file.is_file():
                raise WeightsError(f"missing shard {file} (listed in {origin})")
            with safe_open(str(file), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in group:
                    if name not in present:
                        raise WeightsError(f"{file}: missing tensor {name!r} (the index says it is here)")
                    yield name, f.get_tensor(name)

    return _assemble(
        config,
        first,
        last,
        available=weight_map.__contains__,
        read=read,
        origin=origin,
        dtype=dtype,
        device=device,
    )


def load_transformer_slice_from_state_dict(
    config: Mapping[str, Any] | str | Path,
    state_dict: Mapping[str, torch.Tensor],
    first: int,
    last: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[WanSlice, set[str]]:
    """Build layers ``[first, last)`` from a state dict in diffusers naming.

    ``config`` is a transformer config dict or a path :func:`read_transformer_config`
    accepts. Only owned entries are touched (so a memory-mapped state dict is
    paged in only for them); they are copied, never aliased. Other entries are
    ignored. Returns the slice and the set of names used.
    """
    cfg = read_transformer_config(config) if isinstance(config, (str, Path)) else dict(config)
    if _is_original_config(cfg):
        cfg = convert_original_wan_config(cfg)

    def read(names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, state_dict[name]

    return _assemble(
        cfg,
        first,
        last,
        available=state_dict.__contains__,
        read=read,
        origin="state dict",
        dtype=dtype,
        device=device,
    )


# -- original Wan naming --------------------------------------------------------------------

# Original module path -> diffusers module path (the parameter leaf, weight/bias, is kept).
_ORIGINAL_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.norm": "norm_out",
}
_ORIGINAL_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm1": "norm1",
    # The two namings number the norms differently: the original `norm3` is
    # the (affine) cross-attention norm, diffusers' `norm2`; the original
    # `norm2` precedes the FFN, diffusers' `norm3`.
    "norm3": "norm2",
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Whole parameters (no weight/bias leaf).
_ORIGINAL_PARAMS = {"head.modulation": "scale_shift_table"}
_ORIGINAL_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
# Tensors some implementations keep in their state dict that hold no weights.
_ORIGINAL_IGNORED = frozenset({"freqs"})
# Wrappers around the network's own names: training checkpoints nest the
# generator (and its EMA) and often prefix `model.` (a wrapper module).
_WRAPPERS = ("generator", "generator_ema")
_NAME_PREFIXES = ("state_dict.", "module.", "model.", "diffusion_model.", "_orig_mod.")


def original_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of one original-Wan tensor name (no prefixes), or None if unknown."""
    if key in _ORIGINAL_PARAMS:
        return _ORIGINAL_PARAMS[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        i, rest = m.groups()
        if rest in _ORIGINAL_BLOCK_PARAMS:
            return f"blocks.{i}.{_ORIGINAL_BLOCK_PARAMS[rest]}"
        table, prefix = _ORIGINAL_BLOCK, f"blocks.{i}."
    else:
        table, prefix, rest = _ORIGINAL_TOP, "", key
    if "." not in rest:
        return None
    module, leaf = rest.rsplit(".", 1)
    if module not in table or leaf not in ("weight", "bias"):
        return None
    return f"{prefix}{table[module]}.{leaf}"


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
        if name in _ORIGINAL_IGNORED:
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
    cfg = read_transformer_config(config) if isinstance(config, (str, Path)) else dict(config)
    if _is_original_config(cfg):
        cfg = convert_original_wan_config(cfg)
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

        return _assemble(
            cfg,
            first,
            last,
            available=key_map.__contains__,
            read=read,
            origin=str(p),
            dtype=dtype,
            device=device,
        )


def _is_original_config(cfg: Mapping[str, Any]) -> bool:
    return "num_attention_heads" not in cfg and "dim" in cfg and "num_heads" in cfg


def convert_original_wan_config(cfg: Mapping[str, Any]) -> dict:
    """A diffusers ``WanTransformer3DModel`` config from an original Wan ``config.json``
    (``dim``, ``ffn_dim``, ``num_heads``, ``num_layers``, ...; text-to-video only)."""
    if cfg.get("model_type", "t2v") != "t2v":
        raise WeightsError(f"only text-to-video Wan models are supported, got model_type {cfg['model_type']!r}")
    try:
        dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
        out = {
            "patch_size": list(cfg.get("patch_size", (1, 2, 2))),
            "num_attention_heads": heads,
            "attention_head_dim": dim // heads,
            "in_channels": int(cfg.get("in_dim", 16)),
            "out_channels": int(cfg.get("out_dim", 16)),
            "text_dim": int(cfg.get("text_dim", 4096)),
            "freq_dim": int(cfg.get("freq_dim", 256)),
            "ffn_dim": int(cfg["ffn_dim"]),
            "num_layers": int(cfg["num_layers"]),
            "cross_attn_norm": bool(cfg.get("cross_attn_norm", True)),
            "qk_norm": "rms_norm_across_heads" if cfg.get("qk_norm", True) else None,
            "eps": float(cfg.get("eps", 1e-6)),
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024,
        }
    except KeyError as e:
        raise WeightsError(f"original Wan config lacks {e.args[0]!r}") from None
    if dim % heads:
        raise WeightsError(f"original Wan config: dim {dim} is not a multiple of num_heads {heads}")
    return out
