"""Model weights: validate a diffusers-format Wan2.1 T2V folder and load one rank's share of it.

A rank that owns transformer layers ``[first, last)`` never holds the whole
transformer in memory: the model skeleton is built on the ``meta`` device,
:class:`~dualpar.models.wan.WanSlice` drops the layers the rank does not own,
and only the owned tensors are read from the (memory-mapped) safetensors
files, one tensor at a time. For sharded weights the index tells which
shards hold those tensors; no other shard is opened.

Configs in the original Wan format are converted here; weights in the
original Wan naming are read by :mod:`dualpar.models.original_wan`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .wan import WanSlice

__all__ = [
    "TensorInfo",
    "WeightsError",
    "assemble_slice",
    "check_model_dir",
    "check_tensors",
    "convert_original_wan_config",
    "keep_fp32_names",
    "load_transformer_slice",
    "load_transformer_slice_from_state_dict",
    "read_transformer_config",
    "safetensors_info",
    "transformer_config",
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


def _check_weights(folder: Path, candidates: tuple[str, ...]) -> list[Path]:
    """The files holding the weights: one of ``candidates`` whole, or every shard of its index (all must exist)."""
    for name in candidates:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            shards = [folder / shard for shard in sorted(set(_read_index(index).values()))]
            for shard in shards:
                if not shard.is_file():
                    raise WeightsError(f"missing shard {shard} (listed in {index})")
            return shards
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


def check_model_dir(path: str | Path, *, transformer_weights: bool = True) -> dict:
    """Validate a local diffusers-format Wan2.1 text-to-video folder from file metadata only.

    Checks ``model_index.json``; the ``transformer``, ``vae``, ``text_encoder``,
    ``tokenizer`` and ``scheduler`` subfolders with their config files; a
    tokenizer vocabulary; that the weight files (or every shard an index
    lists) exist; that every safetensors weights file has a readable header
    and is as long as it says; and, with ``transformer_weights`` (off when
    another file supplies them), that the transformer weights pass
    :func:`check_tensors`. No tensor is read. Returns the transformer's
    config dict. Raises :class:`WeightsError` naming the first missing or
    malformed path.
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
    config_path = root / "transformer" / "config.json"
    _check_transformer_config(configs["transformer"], config_path)
    files = {sub: _check_weights(root / sub, candidates) for sub, candidates in _WEIGHT_CANDIDATES.items()}
    for sub in ("vae", "text_encoder"):
        for file in files[sub]:
            if file.suffix == ".safetensors":
                safetensors_info(file)  # a cut-off copy fails here rather than while loading
    if transformer_weights:
        _check_transformer_weights(root / "transformer", configs["transformer"], config_path)
    return configs["transformer"]


# -- checking weights against a config from their headers --------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """What a weights file says about one tensor, without reading it."""

    file: Path
    name: str
    """The name in the file (it differs from the model's for original-Wan files)."""
    shape: tuple[int, ...]
    dtype: str
    """As the format spells it: ``F32``, ``BF16``, ``I64`` (safetensors), ``float32`` (torch)."""
    floating: bool


def safetensors_info(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's :class:`TensorInfo` from a safetensors file's header; no tensor data is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                info = f.get_slice(name)
                dtype = info.get_dtype()
                # safetensors' float types are F16/F32/F64, BF16 and F8_*; the rest are ints and BOOL
                out[name] = TensorInfo(path, name, tuple(info.get_shape()), dtype, dtype.startswith(("F", "BF")))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: {_why_unreadable(path, e)}") from None
    return out


def _why_unreadable(path: Path, err: Exception) -> str:
    """Words for a safetensors file that safe_open refused; a cut-off copy or download is the usual cause.

    The format: 8 bytes (little-endian header length N), N bytes of JSON
    header, then the data, whose extent the header's ``data_offsets`` give.
    """
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > 100_000_000:  # safetensors' own header size limit
                return f"not a safetensors file ({detail})"
            if 8 + n > size:
                return f"truncated: the header alone is {8 + n} bytes, the file has {size}"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"not a safetensors file ({detail})"
    if 8 + n + end > size:
        return f"truncated: the header describes {8 + n + end} bytes, the file has {size}"
    return f"unreadable safetensors file ({detail})"


def _expected_shapes(config: Mapping[str, Any], config_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the transformer ``config`` describes, read off a model built on ``meta``."""
    from diffusers import WanTransformer3DModel

    try:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(dict(config))
    except Exception as e:  # any failure to build is a config the model cannot have
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{config_path}: not a buildable Wan transformer config ({detail})") from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorInfo],
    source: str | Path,
    config_path: str | Path,
    missing: Callable[[str], str] | None = None,
) -> None:
    """Check weights (diffusers name -> :class:`TensorInfo`) against the transformer ``config``.

    The weights, from ``source``, must hold at least ``num_layers`` layers,
    and every tensor of the model with the shape the config implies and a
    floating-point dtype; extra tensors are ignored, as loading ignores them.
    ``missing(name)`` words the error for an absent tensor (default: absent
    from ``source``). Raises :class:`WeightsError`.
    """
    layers = 1 + max((int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.fullmatch(k))), default=-1)
    if config["num_layers"] > layers:
        raise WeightsError(f"{config_path}: num_layers is {config['num_layers']}, but {source} holds {layers} layers")
    for name, shape in _expected_shapes(config, config_path).items():
        info = tensors.get(name)
        if info is None:
            raise WeightsError(missing(name) if missing else f"{source}: missing tensor {name!r}")
        if info.shape != shape:
            raise WeightsError(
                f"{info.file}: tensor {info.name!r} has shape {info.shape}, the config ({config_path}) implies {shape}"
            )
        if not info.floating:
            raise WeightsError(f"{info.file}: tensor {info.name!r} is {info.dtype}, not a floating-point type")


def check_transformer_dir(tdir: str | Path) -> None:
    """Validate a transformer subfolder (``config.json`` and weights) from file metadata only."""
    tdir = Path(tdir)
    config_path = tdir / "config.json"
    config = _read_json(config_path)
    _check_transformer_config(config, config_path)
    _check_weights(tdir, _WEIGHT_CANDIDATES["transformer"])
    _check_transformer_weights(tdir, config, config_path)


def _check_transformer_weights(tdir: Path, config: Mapping[str, Any], config_path: Path) -> None:
    """:func:`check_tensors` on a transformer folder's weights, read as the loader reads them."""
    if (tdir / WEIGHTS_NAME).is_file():
        check_tensors(config, safetensors_info(tdir / WEIGHTS_NAME), tdir / WEIGHTS_NAME, config_path)
        return
    index = tdir / WEIGHTS_INDEX_NAME
    weight_map = _read_index(index)
    shards = {shard: safetensors_info(tdir / shard) for shard in sorted(set(weight_map.values()))}
    # a tensor counts only where the index says it is: that is where loading looks
    tensors = {name: shards[shard][name] for name, shard in weight_map.items() if name in shards[shard]}

    def missing(name: str) -> str:
        if name in weight_map:
            return f"{tdir / weight_map[name]}: missing tensor {name!r} (listed there by {index})"
        return f"{index}: no tensor {name!r}"

    check_tensors(config, tensors, index, config_path, missing)


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


def transformer_config(config: Mapping[str, Any] | str | Path) -> dict:
    """A diffusers transformer config from a config dict (either format) or a path
    :func:`read_transformer_config` accepts."""
    if isinstance(config, (str, Path)):
        return read_transformer_config(config)
    return convert_original_wan_config(config) if _is_original_config(config) else dict(config)


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


def assemble_slice(
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

    return assemble_slice(
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
    cfg = transformer_config(config)

    def read(names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, state_dict[name]

    return assemble_slice(
        cfg,
        first,
        last,
        available=state_dict.__contains__,
        read=read,
        origin="state dict",
        dtype=dtype,
        device=device,
    )


# -- original Wan configs --------------------------------------------------------------------


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
