"""Build the parts of a model that one rank needs, and the schedulers and prompt encoder."""

from __future__ import annotations

import gc

import torch

from ..config import Config
from .wan import WanSlice

VAE_SPATIAL = 8

_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPE[name]


def num_layers(cfg: Config) -> int:
    from .tiny import TINY_TRANSFORMER

    return TINY_TRANSFORMER["num_layers"]


def load_slice(cfg: Config, first: int, last: int, device: torch.device) -> WanSlice:
    """Layers [first, last) (plus embedding / head at the ends), nothing else kept in memory."""
    from .tiny import tiny_transformer

    full = tiny_transformer(cfg.model.weights_seed)
    part = WanSlice(full, first, last)
    del full
    gc.collect()
    # diffusers keeps rope and the fp32-sensitive modules in fp32 for low-precision runs.
    part.to(device)
    if cfg.model.dtype != "float32":
        dt = torch_dtype(cfg.model.dtype)
        for name, mod in part.named_children():
            if name == "rope":
                continue
            mod.to(dt)
        for blk in part.layers:
            blk.scale_shift_table.data = blk.scale_shift_table.data.float()
        if part.has_embed:
            part.condition_embedder.time_embedder.float()
        if part.has_head:
            part.scale_shift_table.data = part.scale_shift_table.data.float()
    return part.eval().requires_grad_(False)


def load_vae(cfg: Config):
    from .tiny import tiny_vae

    return tiny_vae(cfg.model.weights_seed + 1).requires_grad_(False)


def load_text_encoder(cfg: Config):
    from .tiny import tiny_text_encoder, tiny_tokenizer

    tok = tiny_tokenizer()
    return tok, tiny_text_encoder(cfg.model.weights_seed + 2, len(tok)).requires_grad_(False)


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
    return out.float().cpu()


def make_scheduler(cfg: Config):
    """A scheduler with its timesteps set, as WanPipeline configures it."""
    s = cfg.sampling
    if s.scheduler == "unipc":
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=s.flow_shift
        )
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s.flow_shift)
    sched.set_timesteps(s.steps, device="cpu")
    sched.set_begin_index(0)
    return sched
