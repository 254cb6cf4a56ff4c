"""scripts/train_tiny.py: reproducible from its seed, resumable to the same weights, and what it
writes is a model folder the engine runs. Tiny sizes and a few steps: the script, not the model."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import gen

SMALL = ["--size", "32", "--vae-image-steps", "3", "--vae-clip-steps", "2", "--clips", "4", "--dit-steps", "2",
         "--causal-steps", "2", "--dit-batch", "2", "--save-every", "1", "--threads", "1", "--no-progress"]
PARTS = ("vae", "transformer", "transformer_causal")


def train(root, work, out, *extra):
    res = subprocess.run([sys.executable, str(Path(root) / "scripts" / "train_tiny.py"), "--work", str(work),
                          "--out", str(out), *SMALL, *extra], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(out):
    return {part: load_file(Path(out) / part / "diffusion_pytorch_model.safetensors") for part in PARTS}


def test_a_resumed_training_equals_an_uninterrupted_one_and_the_engine_runs_it(root, tmp_path):
    train(root, tmp_path / "wa", tmp_path / "a")
    first = train(root, tmp_path / "wb", tmp_path / "b", "--stop-after", "vae-clip")
    assert not (tmp_path / "b").exists() and "dit" not in first.stderr
    second = train(root, tmp_path / "wb", tmp_path / "b")
    assert "vae-clip: resumed at step 2/2" in second.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(a[part][k].equal(b[part][k]) for k in a[part]), part
    assert (tmp_path / "wa" / "losses.png").stat().st_size > 0

    # the folder is a model: the engine loads and runs it (2 ranks, one block)
    res = gen(2, ["--model", str(tmp_path / "a"), "--frames", "9", "--height", "32", "--width", "32", "--steps", "2",
                  "--block", "3", "--num-cat", "1", "--set", "model.text_len=32", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "done: 9 frames" in res.stderr, res.stderr[-2000:]
    # causal mode reads the causal fine-tune (its own weights), unless told not to
    assert any(not a["transformer"][k].equal(a["transformer_causal"][k]) for k in a["transformer"])
    causal = ["--model", str(tmp_path / "a"), "--mode", "causal", "--frames", "13", "--height", "32", "--width", "32",
              "--set", "causal.timesteps=1000,500", "--set", "model.text_len=32", "--no-progress", "--no-decode"]
    res = gen(1, causal + ["--out", str(tmp_path / "causal")])
    assert "weights transformer_causal/" in res.stderr, res.stderr[-2000:]
    res = gen(1, causal + ["--out", str(tmp_path / "causal-bidir"), "--set", "model.causal_weights=false"])
    assert "weights transformer_causal/" not in res.stderr, res.stderr[-2000:]
    # each run computed what diffusers' model with those weights computes (read here straight from the files)
    for run, part in (("causal", "transformer_causal"), ("causal-bidir", "transformer")):
        got = chunk_latents(tmp_path / run)
        ref = causal_reference_of(tmp_path / "a", part, a[part])
        assert len(got) == len(ref) == 1 and (got[0] - ref[0]).abs().max().item() <= 1e-5, run
    assert (chunk_latents(tmp_path / "causal")[0] - chunk_latents(tmp_path / "causal-bidir")[0]).abs().max() > 1e-3

    # a causal fine-tune of another shape is refused before anything runs
    cfg_path = tmp_path / "a" / "transformer_causal" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"num_layers": 8', '"num_layers": 7'))
    res = gen(1, causal + ["--out", str(tmp_path / "causal-bad")], expect=2)
    assert "transformer_causal/config.json differs from" in res.stderr and not (tmp_path / "causal-bad").exists()


def test_the_causal_training_forward_is_diffusers_forward_with_a_block_causal_mask():
    """train_tiny's causal forward (built from the engine's causal pieces, differentiable) equals diffusers'
    own ``WanTransformer3DModel.forward`` with per-token timesteps and a block-causal self-attention mask
    (the processor wrapper of ``reference.causal_reference``) when the positions are the frames' own."""
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_tiny

    from dualpar.models.causal_wan import CausalWan
    from dualpar.models.tiny import tiny_transformer
    from dualpar.models.wan import WanSlice
    from dualpar.reference import _BlockCausal

    model = tiny_transformer(0)
    cw = CausalWan(WanSlice(model, 0, len(model.blocks)))
    g = torch.Generator().manual_seed(0)
    b, frames, h, w = 2, 8, 4, 6
    xt, text = torch.randn(b, 16, frames, h, w, generator=g), torch.randn(b, 7, model.config.text_dim, generator=g)
    timesteps = torch.rand(b, frames, generator=g) * 1000
    chunk_of, positions, _, _ = train_tiny.causal_sample(np.random.default_rng(0), frames, b)
    allowed = chunk_of[None, :] <= chunk_of[:, None]
    ours = train_tiny.causal_forward(cw, xt, timesteps, text, list(range(frames)), allowed)
    tpf = (h // 2) * (w // 2)
    procs = [blk.attn1.processor for blk in model.blocks]
    mask = allowed.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)[None, None]
    for blk, proc in zip(model.blocks, procs):
        blk.attn1.set_processor(_BlockCausal(proc, mask))
    with torch.no_grad():
        ref = model(xt, timesteps.repeat_interleave(tpf, 1), text, return_dict=False)[0].float()
    assert ours.requires_grad and (ours.detach() - ref).abs().max().item() <= 1e-5
    # the mask matters: a bidirectional pass differs
    full = train_tiny.causal_forward(cw, xt, timesteps, text, list(range(frames)), torch.ones_like(allowed))
    assert (full.detach() - ref).abs().max().item() > 1e-3
    assert chunk_of.tolist() == [0] * 5 + [1] * 3 and len(positions) == frames  # the engine's split: first takes the leftover


def chunk_latents(out):
    man = json.loads((Path(out) / "manifest.json").read_text())
    assert man["status"] == "complete", man
    return [load_file(Path(out) / b["latents"])["latents"] for b in man["blocks"]]


def causal_reference_of(folder, part, state):
    """``reference.causal_reference`` (diffusers' own model re-run with a block-causal mask) for the
    test's causal run, with the transformer built from ``part``'s config and weights ``state``."""
    import torch
    from diffusers import WanTransformer3DModel

    from dualpar.config import Config, apply_model_defaults
    from dualpar.models import loader
    from dualpar.reference import causal_reference

    cfg = Config()
    cfg.model.path = str(folder)
    apply_model_defaults(cfg)
    for key, val in {"video.frames": 13, "video.height": 32, "video.width": 32, "model.text_len": 32,
                     "sampling.mode": "causal", "causal.timesteps": "1000,500"}.items():
        cfg.set(key, val)
    model = WanTransformer3DModel.from_config(json.loads((Path(folder) / part / "config.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    tok, enc = loader.load_text_encoder(cfg)
    s = cfg.sampling
    states = loader.encode_prompts(tok, enc, [s.prompt, s.negative_prompt] if s.guidance > 1 else [s.prompt], 32)
    with torch.no_grad():
        return causal_reference(cfg, model.eval(), states)


def test_bad_arguments_are_refused(root, tmp_path):
    res = subprocess.run([sys.executable, str(Path(root) / "scripts" / "train_tiny.py"), "--size", "30",
                          "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--size must be a positive multiple of 16" in res.stderr
    assert not (tmp_path / "w").exists()
