"""Build the parts of a model that one rank needs, and the schedulers and prompt encoder.

Two sources: a diffusers-format Wan2.1 folder (``model.path``, or the trained
``tiny`` preset's, which ships with the package), from which each rank reads
only the transformer tensors it owns; or the ``tiny-random`` preset, built
in-process from a seed.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from ..config import VAE_SPATIAL, Config, ConfigError  # noqa: F401  (VAE_SPATIAL re-exported)
from .wan import WanSlice

_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPE[name]


def transformer_dir(cfg: Config) -> Path | None:
    """The folder the transformer is read from: the model folder's ``transformer_causal/`` in causal mode
    (when it has one and ``model.causal_weights``), else its ``transformer/``; None for ``tiny-random``."""
    from ..config import CAUSAL_TRANSFORMER

    m = cfg.model
    if not m.folder:
        return None
    causal = Path(m.folder) / CAUSAL_TRANSFORMER
    if cfg.sampling.mode == "causal" and m.causal_weights and not m.transformer_file and causal.is_dir():
        return causal
    return Path(m.folder) / "transformer"


def check_model(cfg: Config) -> None:
    """Validate ``model.path`` / ``model.transformer_file`` from file metadata, no tensor read (ConfigError)."""
    from .original_wan import check_original_wan_file
    from .weights import WeightsError, check_model_dir, check_transformer_dir, read_transformer_config, transformer_config

    m = cfg.model
    if not m.folder:
        return
    what = "--model" if m.path else f"model.preset {m.preset}"
    try:
        tdir = transformer_dir(cfg)
        config = check_model_dir(m.folder, transformer_weights=not m.transformer_file and tdir.name == "transformer")
        if tdir.name != "transformer":
            check_transformer_dir(tdir)
            own = {k: v for k, v in read_transformer_config(tdir).items() if not k.startswith("_")}
            if own != {k: v for k, v in config.items() if not k.startswith("_")}:
                raise WeightsError(f"{tdir / 'config.json'} differs from {Path(m.folder) / 'transformer' / 'config.json'}"
                                   " (a causal fine-tune keeps the transformer's shape)")
    except WeightsError as e:
        hint = "" if m.path else " (train it with scripts/train_tiny.py, or use model.preset=tiny-random)"
        raise ConfigError(f"{what}: {e}{hint}") from None
    if m.transformer_file:
        p = Path(m.transformer_file)
        if not p.is_file():
            raise ConfigError(f"model.transformer_file: no such file {p}")
        if p.suffix not in (".safetensors", ".pt", ".pth"):
            raise ConfigError(f"model.transformer_file: {p} is not .safetensors, .pt or .pth")
        try:
            check_original_wan_file(transformer_config(config), p, Path(m.path) / "transformer" / "config.json")
        except WeightsError as e:
            raise ConfigError(f"model.transformer_file: {e}") from None


def head_importance(cfg: Config) -> list[list[float]] | None:
    """The calibrated head importances [layer][head] when ``causal.head_budget`` asks for them (ConfigError
    when the model folder has none, or ones of another shape); None otherwise."""
    from ..config import HEAD_IMPORTANCE

    if cfg.sampling.mode != "causal" or cfg.causal.policy != "focused" or cfg.causal.head_budget != "calibrated":
        return None
    if not cfg.model.folder:
        raise ConfigError("causal.head_budget=calibrated needs a model folder (--model, or the trained tiny "
                          "preset): the tiny-random preset has no calibration")
    path = Path(cfg.model.folder) / HEAD_IMPORTANCE
    if not path.is_file():
        raise ConfigError(f"causal.head_budget=calibrated: no {path}; measure it with scripts/calibrate_heads.py")
    try:
        table = json.loads(path.read_text())["importance"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a head-importance file (no 'importance' table)") from None
    heads = _heads(cfg)
    if (not isinstance(table, list) or len(table) != num_layers(cfg)
            or any(not isinstance(r, list) or len(r) != heads for r in table)
            or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for r in table for v in r)):
        raise ConfigError(f"{path}: expected {num_layers(cfg)} rows of {heads} non-negative importances")
    return [[float(v) for v in r] for r in table]


def _heads(cfg: Config) -> int:
    if cfg.model.folder:
        from .weights import read_transformer_config

        return int(read_transformer_config(cfg.model.folder)["num_attention_heads"])
    from .tiny import TINY_TRANSFORMER

    return TINY_TRANSFORMER["num_attention_heads"]


def num_layers(cfg: Config) -> int:
    if cfg.model.folder:
        from .weights import read_transformer_config

        return int(read_transformer_config(cfg.model.folder)["num_layers"])
    from .tiny import TINY_TRANSFORMER

    return TINY_TRANSFORMER["num_layers"]


def latent_channels(cfg: Config) -> int:
    """Channels of the latents the transformer predicts (what the VAE decodes)."""
    if cfg.model.folder:
        from .weights import read_transformer_config

        c = read_transformer_config(cfg.model.folder)
        return int(c.get("out_channels") or c["in_channels"])
    from .tiny import TINY_TRANSFORMER

    return TINY_TRANSFORMER["out_channels"]


def load_transformer(cfg: Config):
    """The whole transformer (diffusers' ``WanTransformer3DModel``, float32, on the CPU): for
    references and baselines that run the model outside the engine."""
    if cfg.model.transformer_file:
        raise ConfigError("load_transformer reads the folder's own transformer, not model.transformer_file")
    if cfg.model.folder:
        from diffusers import WanTransformer3DModel
        from safetensors.torch import load_file

        from .weights import read_transformer_config

        # built and filled here: diffusers' from_pretrained refuses this model without accelerate
        tdir = transformer_dir(cfg)
        model = WanTransformer3DModel.from_config(read_transformer_config(tdir))
        state = {}
        for shard in sorted(tdir.glob("*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval().requires_grad_(False)
    from .tiny import tiny_transformer

    return tiny_transformer(cfg.model.weights_seed)


def load_slice(cfg: Config, first: int, last: int, device: torch.device) -> WanSlice:
    """Layers [first, last) (plus embedding / head at the ends), nothing else kept in memory,
    set up with the run's attention kernel and CFG-row mode."""
    from . import attention

    part = _load_slice(cfg, first, last, device)
    part.attention = attention.backend(cfg.model.attention)
    part.cfg_serial = cfg.model.cfg_serial
    return part


def _load_slice(cfg: Config, first: int, last: int, device: torch.device) -> WanSlice:
    dtype = torch_dtype(cfg.model.dtype)
    if cfg.model.folder:
        from . import original_wan, weights

        if cfg.model.transformer_file:
            config = weights.read_transformer_config(cfg.model.folder)
            part, _ = original_wan.load_original_wan_slice(
                config, cfg.model.transformer_file, first, last, dtype=dtype, device=device
            )
        else:
            part, _ = weights.load_transformer_slice(transformer_dir(cfg), first, last, dtype=dtype, device=device)
        return part.eval().requires_grad_(False)

    from .weights import keep_fp32_names
    from .tiny import tiny_transformer

    full = tiny_transformer(cfg.model.weights_seed)
    part = WanSlice(full, first, last)
    del full
    gc.collect()
    part.to(device)
    if dtype != torch.float32:
        keep = keep_fp32_names()
        for name, p in part.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return part.eval().requires_grad_(False)


def _have_accelerate() -> bool:
    """diffusers' low-memory loading needs accelerate; without it, ask for the plain way rather than
    let diffusers print a paragraph recommending the install on every load."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _hub_bars(cfg: Config) -> None:
    """diffusers' and transformers' own loading bars follow ``output.progress`` (off: no bar of theirs)."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    for lib in (dl, tl):
        (lib.enable_progress_bar if cfg.output.progress else lib.disable_progress_bar)()


def load_vae(cfg: Config, device: torch.device | str = "cpu"):
    """The VAE, in float32, for the rank that writes the output."""
    if cfg.model.folder:
        from diffusers import AutoencoderKLWan

        _hub_bars(cfg)
        vae = AutoencoderKLWan.from_pretrained(cfg.model.folder, subfolder="vae", torch_dtype=torch.float32,
                                               low_cpu_mem_usage=_have_accelerate())
    else:
        from .tiny import tiny_vae

        vae = tiny_vae(cfg.model.weights_seed + 1)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(cfg: Config, device: torch.device | str = "cpu"):
    """Tokenizer and UMT5 encoder (in the model dtype, as WanPipeline loads it)."""
    if cfg.model.folder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        _hub_bars(cfg)
        tok = AutoTokenizer.from_pretrained(cfg.model.folder, subfolder="tokenizer")
        # T5 activations overflow in float16: run the encoder in bfloat16 then.
        dtype = torch.bfloat16 if cfg.model.dtype == "float16" else torch_dtype(cfg.model.dtype)
        enc = UMT5EncoderModel.from_pretrained(cfg.model.folder, subfolder="text_encoder", torch_dtype=dtype)
    else:
        from .tiny import tiny_text_encoder, tiny_tokenizer

        tok = tiny_tokenizer()
        enc = tiny_text_encoder(cfg.model.weights_seed + 2, len(tok))
    return tok, enc.to(device).eval().requires_grad_(False)


class PromptCache:
    """UMT5 states per prompt text, on rank 0: each text is encoded once and kept (on the host).

    The encoder (UMT5-XXL: about 11 GB) is loaded for each batch of texts not
    seen yet and freed right after, so it is never resident while denoising;
    :meth:`warm` encodes a whole batch of videos' prompts with one load.
    """

    KEEP = 64
    """Texts kept at most (the least recently used go first): a long batch's prompts would otherwise pile
    up on the host (8 MB each at Wan's 512 x 4096)."""

    def __init__(self, cfg: Config, device: torch.device | str):
        self.cfg, self.device = cfg, torch.device(device)
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.loads = 0
        """Times the encoder was loaded."""

    def warm(self, prompts: list[str]) -> None:
        for p in prompts:
            if p in self._states:
                self._states.move_to_end(p)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._states))
        if not missing:
            return
        tokenizer, encoder = load_text_encoder(self.cfg, self.device)
        self.loads += 1
        states = encode_prompts(tokenizer, encoder, missing, self.cfg.model.tokens)
        del tokenizer, encoder
        print(f"[rank 0] text encoder loaded for {len(missing)} prompt(s), then freed", file=sys.stderr, flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for text, st in zip(missing, states):
            self._states[text] = st.to("cpu")
        wanted = set(prompts)
        for text in list(self._states)[:max(0, len(self._states) - self.KEEP)]:
            if text not in wanted:  # never the texts just asked for
                del self._states[text]

    def states(self, prompts: list[str]) -> torch.Tensor:
        """States [len(prompts), text_len, d] on the device (encodes the texts not seen yet)."""
        self.warm(prompts)
        return torch.stack([self._states[p] for p in prompts]).to(self.device)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_len: int) -> torch.Tensor:
    """UMT5 states [len(prompts), max_len, d], zeroed past each prompt's end, as WanPipeline does."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    enc = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    dev = next(text_encoder.parameters()).device
    states = text_encoder(enc.input_ids.to(dev), enc.attention_mask.to(dev)).last_hidden_state
    lens = enc.attention_mask.gt(0).sum(dim=1)
    out = torch.zeros_like(states)
    for i, n in enumerate(lens.tolist()):
        out[i, :n] = states[i, :n]
    return out


def make_scheduler(cfg: Config, device: torch.device | str = "cpu"):
    """A scheduler with its timesteps set, as WanPipeline configures it.

    With a model folder its UniPC settings are used; ``flow_shift``
    always comes from the run's config.
    """
    s = cfg.sampling
    if s.scheduler == "unipc":
        from diffusers import UniPCMultistepScheduler

        base = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000)
        if cfg.model.folder:
            folder = Path(cfg.model.folder) / "scheduler" / "scheduler_config.json"
            saved = json.loads(folder.read_text())
            if saved.get("_class_name") == "UniPCMultistepScheduler":
                base = {k: v for k, v in saved.items() if not k.startswith("_")}
        sched = UniPCMultistepScheduler.from_config({**base, "flow_shift": s.flow_shift})
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s.flow_shift)
    sched.set_timesteps(s.steps, device=device)
    sched.set_begin_index(0)
    return sched
