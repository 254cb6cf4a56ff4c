"""Build the parts of a model that one rank needs, and the schedulers and prompt encoder.

Two sources: the embedded ``tiny`` preset (built in-process from a seed) or a
local diffusers-format Wan2.1 folder (``model.path``), from which each rank
reads only the transformer tensors it owns.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from ..config import VAE_SPATIAL, Config, ConfigError  # noqa: F401  (VAE_SPATIAL re-exported)
from .wan import WanSlice

_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPE[name]


def check_model(cfg: Config) -> None:
    """Validate ``model.path`` / ``model.transformer_file`` from file metadata, no tensor read (ConfigError)."""
    from .original_wan import check_original_wan_file
    from .weights import WeightsError, check_model_dir, transformer_config

    m = cfg.model
    if not m.path:
        return
    try:
        config = check_model_dir(m.path, transformer_weights=not m.transformer_file)
    except WeightsError as e:
        raise ConfigError(f"--model: {e}") from None
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


def num_layers(cfg: Config) -> int:
    if cfg.model.path:
        from .weights import read_transformer_config

        return int(read_transformer_config(cfg.model.path)["num_layers"])
    from .tiny import TINY_TRANSFORMER

    return TINY_TRANSFORMER["num_layers"]


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
    if cfg.model.path:
        from . import original_wan, weights

        if cfg.model.transformer_file:
            config = weights.read_transformer_config(cfg.model.path)
            part, _ = original_wan.load_original_wan_slice(
                config, cfg.model.transformer_file, first, last, dtype=dtype, device=device
            )
        else:
            part, _ = weights.load_transformer_slice(cfg.model.path, first, last, dtype=dtype, device=device)
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


def _hub_bars(cfg: Config) -> None:
    """diffusers' and transformers' own loading bars follow ``output.progress`` (off: no bar of theirs)."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    for lib in (dl, tl):
        (lib.enable_progress_bar if cfg.output.progress else lib.disable_progress_bar)()


def load_vae(cfg: Config, device: torch.device | str = "cpu"):
    """The VAE, in float32, for the rank that writes the output."""
    if cfg.model.path:
        from diffusers import AutoencoderKLWan

        _hub_bars(cfg)
        vae = AutoencoderKLWan.from_pretrained(cfg.model.path, subfolder="vae", torch_dtype=torch.float32)
    else:
        from .tiny import tiny_vae

        vae = tiny_vae(cfg.model.weights_seed + 1)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(cfg: Config, device: torch.device | str = "cpu"):
    """Tokenizer and UMT5 encoder (in the model dtype, as WanPipeline loads it)."""
    if cfg.model.path:
        from transformers import AutoTokenizer, UMT5EncoderModel

        _hub_bars(cfg)
        tok = AutoTokenizer.from_pretrained(cfg.model.path, subfolder="tokenizer")
        # T5 activations overflow in float16: run the encoder in bfloat16 then.
        dtype = torch.bfloat16 if cfg.model.dtype == "float16" else torch_dtype(cfg.model.dtype)
        enc = UMT5EncoderModel.from_pretrained(cfg.model.path, subfolder="text_encoder", torch_dtype=dtype)
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

    def __init__(self, cfg: Config, device: torch.device | str):
        self.cfg, self.device = cfg, torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        self.loads = 0
        """Times the encoder was loaded."""

    def warm(self, prompts: list[str]) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._states))
        if not missing:
            return
        tokenizer, encoder = load_text_encoder(self.cfg, self.device)
        self.loads += 1
        states = encode_prompts(tokenizer, encoder, missing, self.cfg.model.text_len)
        del tokenizer, encoder
        print(f"[rank 0] text encoder loaded for {len(missing)} prompt(s), then freed", file=sys.stderr, flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for text, st in zip(missing, states):
            self._states[text] = st.to("cpu")

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

    With ``model.path`` the folder's UniPC settings are used; ``flow_shift``
    always comes from the run's config.
    """
    s = cfg.sampling
    if s.scheduler == "unipc":
        from diffusers import UniPCMultistepScheduler

        base = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000)
        if cfg.model.path:
            folder = Path(cfg.model.path) / "scheduler" / "scheduler_config.json"
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
