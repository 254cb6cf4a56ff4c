"""Invariant 2: one block over the whole video with no context is diffusers' WanPipeline."""

import pytest
import torch
from diffusers import WanPipeline

from dualpar.comm import Comm
from dualpar.config import Config
from dualpar.engine import Engine
from dualpar.models import loader
from dualpar.noise import NoisePool


@pytest.mark.parametrize("scheduler,guidance", [("unipc", 5.0), ("euler", 3.5), ("unipc", 1.0)])
def test_engine_equals_wan_pipeline(scheduler, guidance):
    cfg = Config()
    cfg.video.frames, cfg.video.height, cfg.video.width = 21, 32, 48  # 6 latent frames, 4x6 latents
    cfg.parallel.block, cfg.parallel.num_cat = 6, 0
    cfg.sampling.steps, cfg.sampling.scheduler, cfg.sampling.guidance = 6, scheduler, guidance
    cfg.sampling.flow_shift = 3.0
    cfg.model.text_len = 32
    cfg.validate()

    engine = Engine(cfg, Comm())
    engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    ours = engine.generate(keep_latents=True).blocks
    assert len(ours) == 1

    # The same components, run by diffusers' own pipeline.
    tok, te = loader.load_text_encoder(cfg)
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=loader.load_vae(cfg),
        scheduler=loader.make_scheduler(cfg),
        transformer=loader.load_transformer(cfg),
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = loader.encode_prompts(tok, te, [cfg.sampling.prompt, cfg.sampling.negative_prompt], cfg.model.tokens)
    noise = NoisePool(block=6, num_cat=0, channels=16, height=4, width=6, seed=cfg.sampling.seed).next_block(6)
    ref = pipe(
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        latents=noise,
        height=32,
        width=48,
        num_frames=21,
        num_inference_steps=cfg.sampling.steps,
        guidance_scale=guidance,
        output_type="latent",
    ).frames
    assert ref.shape == ours[0].shape
    diff = (ref - ours[0]).abs().max().item()
    assert diff <= 1e-4, diff
    # and the result is not trivially the input
    assert (ref - noise).abs().max().item() > 0.1


def test_prompt_encoding_matches_wan_pipeline():
    cfg = Config()
    cfg.model.text_len = 24
    tok, te = loader.load_text_encoder(cfg)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=None, scheduler=None, transformer=None)
    ref, neg = pipe.encode_prompt("a  red cat &amp; a dog", "blurry", max_sequence_length=24, device="cpu")
    ours = loader.encode_prompts(tok, te, ["a  red cat &amp; a dog", "blurry"], 24)
    assert torch.equal(ref, ours[:1]) and torch.equal(neg, ours[1:])
