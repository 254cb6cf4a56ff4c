#!/usr/bin/env python
"""Train the tiny preset: a small Wan2.1-architecture model that learned the synthetic world.

Three stages on procedurally generated videos (``synthetic_world.py``: one or two coloured shapes
moving or bouncing over a plain background, the prompt made from the scene's parameters;
seeded, nothing downloaded):

1. the VAE (diffusers' ``AutoencoderKLWan``): reconstruction first on single frames (Wan's VAE
   encodes a video's first frame on its own), then on short clips with a small KL term; the
   latents' per-channel mean and std go into its config, where the engine reads them;
2. the transformer (``WanTransformer3DModel``, the tiny preset's size) with flow matching on the
   frozen VAE's latents: Wan's flow prediction (velocity = noise - clean), shifted timesteps,
   prompts dropped to the empty prompt 10% of the time so that guidance works. The tiny UMT5
   text encoder stays frozen at its seeded random weights; the tokenizer holds every word the
   prompts use, so a prompt is a dozen tokens;
3. a copy of that transformer fine-tuned for the engine's causal mode (``dit-causal``: block-causal
   attention over chunks with a noise level each, see :func:`causal_sample`), exported as the
   folder's ``transformer_causal/``, which ``--mode causal`` reads.

Every batch is drawn from a generator seeded by (seed, stage, step), so a run is reproducible
and a resumed run continues exactly where it stopped (state saved every ``--save-every`` steps
in ``--work``). The result is a diffusers-format folder (``--out``), loss curves as
``--work``/losses.png, and the VAE's held-out PSNR in ``--out``/training.json.

    python scripts/train_tiny.py [--out dualpar/models/tiny_trained] [--work runs/train-tiny]
        [--device cpu|cuda] [--threads N] [--vae-image-steps N] [--vae-clip-steps N] [--dit-steps N]
        [--causal-steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from synthetic_world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, render, sample_scene  # noqa: E402

SIZE = 96
"""Frame side the model is trained at (the demo's)."""
VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
TEXT_LEN = 32
LATENT_CLIP = 17
"""Latent frames of each encoded training clip (65 frames)."""
WINDOW = 13
"""Latent frames the transformer sees per sample: a DualParal block of 8 with 4 context frames and
a little more (windows are cut anywhere in a clip, so most do not start at the video's first frame)."""
SHIFT = 3.0
"""Timestep shift of training, equal to the demo's ``flow_shift``."""
OBJECT_WEIGHT = 4.0
"""Extra loss weight of the latent cells an object touches (the transformer's loss)."""
BANK = "latents-inview.pt"
"""The latent bank's file in ``--work``: clips whose objects stay in view, with their object masks."""
STAGES = ("vae-image", "vae-clip", "dit", "dit-causal")
CAUSAL_CHUNK = 3
"""Latent frames per chunk of the causal fine-tune (the engine's ``causal.chunk``; a clip's first chunk
takes the leftover, as the engine cuts a video)."""
MAX_GAP = 250
"""Largest position gap the causal fine-tune puts between a clip's early chunks and its later ones."""


def words() -> list[str]:
    """Every word a synthetic-world prompt can use."""
    out = ["a", "and", "on", "background", "moving", "bouncing"]
    for group in (COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS):
        for name in group:
            out += name.split()
    return list(dict.fromkeys(out))


def rng_for(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def clip_batch(rng: np.random.Generator, batch: int, frames: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` clips of ``frames`` frames (a random time into a random scene), cropped to ``crop``
    pixels at a random place, and a mask of the pixels an object covers."""
    xs, ms = [], []
    for _ in range(batch):
        scene = sample_scene(rng)
        t0 = int(rng.integers(0, 200))
        video = render(scene, t0 + frames, SIZE, SIZE)[t0:]
        y, x = (int(v) for v in rng.integers(0, SIZE - crop + 1, size=2))
        video = video[:, y:y + crop, x:x + crop]
        ms.append(torch.from_numpy((video != np.array(BACKGROUNDS[scene.background], np.uint8)).any(-1)))
        xs.append(to_tensor(video))
    return torch.stack(xs), torch.stack(ms)[:, None].float()


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` without its final clamp to [-1, 1], which would stop the gradients of
    saturated pixels; the same per-latent-frame loop with the decoder's temporal cache."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(x.shape[2]):
        idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


@torch.no_grad()
def inflate(vae) -> None:
    """Start the clips from the image VAE: every causal conv's kernel slices over past frames to zero
    (an image never used them: its causal padding is zeros), the temporal down-sampling convs pick
    the latest frame and the up-sampling ones copy their frame twice. Every frame is then coded as
    the image VAE codes it, and training on clips starts from there, not from random temporal
    layers (which made the later frames of a clip noise)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = set()
    for mod in vae.modules():
        if isinstance(mod, WanResample) and hasattr(mod, "time_conv"):
            w = mod.time_conv.weight  # [out, in, 3, 1, 1]
            eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
            w.zero_()
            for half in range(w.shape[0] // w.shape[1]):  # up-sampling: two frames from the channel halves
                w[half * w.shape[1]:(half + 1) * w.shape[1], :, -1, 0, 0] = eye
            mod.time_conv.bias.zero_()
            time_convs.add(mod.time_conv)
    for mod in vae.modules():
        if isinstance(mod, WanCausalConv3d) and mod not in time_convs and mod.weight.shape[2] > 1:
            mod.weight[:, :, :-1] = 0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Stage:
    """One training stage's resumable state: model and optimizer weights, the step, the losses."""

    def __init__(self, work: Path, name: str, model: torch.nn.Module, lr: float, total: int):
        self.path = work / f"{name}.pt"
        self.name, self.model, self.lr, self.total = name, model, lr, total
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        self.step, self.losses = 0, []
        if self.path.exists():
            st = torch.load(self.path, map_location="cpu", weights_only=True)
            model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["opt"])
            self.step, self.losses = int(st["step"]), [tuple(x) for x in st["losses"]]
            print(f"{name}: resumed at step {self.step}/{total}", file=sys.stderr)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "losses": self.losses}, tmp)
        tmp.replace(self.path)  # a kill while saving leaves the previous state whole

    def update(self, loss: torch.Tensor) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total, self.lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        self.losses.append((self.step, float(loss.detach())))

    def advance(self, loss: torch.Tensor, pb, save_every: int) -> None:
        """One optimizer step on ``loss``, the bar moved on, the state saved every ``save_every`` steps."""
        self.update(loss)
        pb.update(1)
        pb.set_postfix(loss=f"{self.losses[-1][1]:.4f}")
        if self.step % save_every == 0 or self.done():
            self.save()

    def done(self) -> bool:
        return self.step >= self.total


def bar(stage: Stage, args):
    from tqdm import tqdm

    return tqdm(total=stage.total, initial=stage.step, desc=stage.name, dynamic_ncols=True,
                disable=args.no_progress, smoothing=0.05)


def train_vae(args, work: Path, device: torch.device):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**VAE_CONFIG).to(device)
    for name, total, lr, batch, frames, crop, kl in (
        # single frames: crops smaller than a shape are enough (the VAE is local) and cheap; clips at
        # full size, since clips of 32-pixel crops taught the temporal layers the crops' borders
        ("vae-image", args.vae_image_steps, 5e-4, 16, 1, 32, 0.0),
        ("vae-clip", args.vae_clip_steps, 1e-4, 2, 9, SIZE, 1e-6),
    ):
        fresh = not (work / f"{name}.pt").exists()
        if name == "vae-clip" and fresh:
            inflate(vae)
        st = Stage(work, name, vae, lr, total)  # resumes from its own state, else goes on from the last stage
        with bar(st, args) as pb:
            while not st.done():
                rng = rng_for(args.seed, name, st.step)
                x, mask = clip_batch(rng, batch, frames, min(crop, SIZE))
                x, mask = x.to(device), mask.to(device)
                post = vae.encode(x).latent_dist
                # decoded from the posterior's mean: a sample's noise (the variance is nearly free under
                # so small a KL weight) slowed the clips down; the KL term still bounds the latents
                z = post.mode()
                y = decode_unclamped(vae, z)
                # objects are a small share of the pixels: weight them up, or a flat background wins
                weight = 1.0 + 4.0 * mask
                loss = (weight * (y - x).abs()).mean() + F.mse_loss(y, x)
                if kl:
                    loss = loss + kl * post.kl().mean()
                st.advance(loss, pb, args.save_every)
        if args.stop_after == name:
            break
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def vae_psnr(vae, device, seed: int, clips: int = 16) -> float:
    """Mean PSNR of held-out 17-frame clips at full size (a seed no training batch uses)."""
    rng = np.random.default_rng([seed, 99])
    vals = []
    for _ in range(clips):
        x, _ = clip_batch(rng, 1, 17, SIZE)
        x = x.to(device)
        vals.append(psnr(vae.decode(vae.encode(x).latent_dist.mode()).sample, x))
    return float(np.mean(vals))


def in_view(scene, t0: int, frames: int) -> bool:
    """Whether every object's centre stays inside the frame from frame ``t0`` on for ``frames`` frames:
    a clip whose prompt names an object that has left (a "moving" one, late in its scene) teaches
    the transformer that prompted objects may be missing."""
    for thing in scene.things:
        for t in range(t0, t0 + frames):
            x, y = thing.centre(t)
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                return False
    return True


def in_view_clip(rng: np.random.Generator, frames: int):
    """A scene and a start frame whose objects all stay in view for ``frames`` frames (drawn again
    until they do: bouncing objects always do, moving ones only early in their scene)."""
    while True:
        scene = sample_scene(rng)
        t0 = int(rng.integers(0, 400))
        if in_view(scene, t0, frames):
            return scene, t0


def latent_mask(covered: np.ndarray) -> torch.Tensor:
    """Pixels an object covers ``[F, H, W]`` -> the latent cells they touch ``[L, H/8, W/8]``: a latent
    frame codes the first frame alone, then four frames each (Wan's VAE), a cell 8x8 pixels."""
    m = torch.from_numpy(covered).float()
    f, h, w = m.shape
    m = torch.cat([m[:1], m[1:].view((f - 1) // 4, 4, h, w).amax(1)])
    return F.max_pool2d(m[:, None], 8)[:, 0].bool()


@torch.no_grad()
def latent_bank(vae, device, seed: int, n: int, args) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``n`` encoded clips of LATENT_CLIP latent frames whose objects stay in view, unnormalized, with
    their prompts and the latent cells their objects touch."""
    from tqdm import tqdm

    rng = np.random.default_rng([seed, 7])
    lat, prompts, masks = [], [], []
    frames = 1 + 4 * (LATENT_CLIP - 1)
    for _ in tqdm(range(0, n, 4), desc="encode", disable=args.no_progress, dynamic_ncols=True):
        xs = []
        for _ in range(4):
            scene, t0 = in_view_clip(rng, frames)
            video = render(scene, t0 + frames, SIZE, SIZE)[t0:]
            xs.append(to_tensor(video))
            masks.append(latent_mask((video != np.array(BACKGROUNDS[scene.background], np.uint8)).any(-1)))
            prompts.append(scene.prompt())
        lat.append(vae.encode(torch.stack(xs).to(device)).latent_dist.mode().cpu())
    return torch.cat(lat)[:n], prompts[:n], torch.stack(masks)[:n]


def load_bank(args, work: Path, device: torch.device, vae, clips: int | None = None):
    """The latent bank (encoded once, then read back from ``work``)."""
    bank_path = work / BANK
    if bank_path.exists():
        saved = torch.load(bank_path, weights_only=True)
        return saved["latents"], saved["prompts"], saved["masks"]
    lat, prompts, masks = latent_bank(vae, device, args.seed, clips or args.clips, args)
    if clips is None:
        torch.save({"latents": lat, "prompts": prompts, "masks": masks}, bank_path)
    return lat, prompts, masks


def export_current(args, device: torch.device) -> int:
    """Export whatever the stages in ``--work`` reached (e.g. to try it while training goes on)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from dualpar.models.tiny import TINY_TRANSFORMER

    work = args.work
    vae = AutoencoderKLWan(**VAE_CONFIG)
    states = [n for n in ("vae-clip", "vae-image") if (work / f"{n}.pt").exists()]
    if not states:
        print(f"error: nothing to export: no VAE state in {work}", file=sys.stderr)
        return 2
    vae.load_state_dict(torch.load(work / f"{states[0]}.pt", weights_only=True)["model"])
    vae.to(device).eval().requires_grad_(False)
    torch.manual_seed(args.seed + 3)
    dit = WanTransformer3DModel(**TINY_TRANSFORMER)
    if (work / "dit.pt").exists():
        dit.load_state_dict(torch.load(work / "dit.pt", weights_only=True)["model"])
    causal = None
    if (work / "dit-causal.pt").exists():
        causal = WanTransformer3DModel(**TINY_TRANSFORMER)
        causal.load_state_dict(torch.load(work / "dit-causal.pt", weights_only=True)["model"])
    lat, _, _ = load_bank(args, work, device, vae, clips=None if (work / BANK).exists() else 8)
    tok, enc = text_parts(args.seed)
    reached = {n: int(torch.load(work / f"{n}.pt", weights_only=True)["step"]) for n in STAGES
               if (work / f"{n}.pt").exists()}
    totals = {"vae-image": args.vae_image_steps, "vae-clip": args.vae_clip_steps, "dit": args.dit_steps,
              "dit-causal": args.causal_steps}
    info = {"partial": any(reached.get(n, 0) < totals[n] for n in STAGES if totals[n]), "stages": reached}
    export(args.out, vae, dit.eval(), tok, enc, lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4)), info,
           causal.eval() if causal is not None else None)
    print(f"wrote {args.out} from {info['stages']}", file=sys.stderr)
    return 0


def text_parts(seed: int):
    from dualpar.models.tiny import tiny_text_encoder, tiny_tokenizer

    tok = tiny_tokenizer(words())
    return tok, tiny_text_encoder(seed + 2, len(tok))


@dataclass
class DitData:
    """What the transformer trains on: the latent bank normalized as the engine's latents are, with
    its object masks, and the encoded prompts."""

    lat: torch.Tensor
    """[clips, C, LATENT_CLIP, h, w], (x - mean) / std."""
    masks: torch.Tensor
    """Latent cells an object touches, [clips, LATENT_CLIP, h, w]."""
    states: torch.Tensor
    """Text-encoder states of every distinct prompt, the empty one last."""
    ids: torch.Tensor
    """Each clip's row of ``states``."""
    mean: torch.Tensor
    std: torch.Tensor
    """The bank's per-channel latent mean and std (stored in the VAE's config)."""

    @property
    def empty(self) -> int:
        return len(self.states) - 1


def dit_data(args, work: Path, device: torch.device, vae, tok, enc) -> DitData:
    from dualpar.models.loader import encode_prompts

    lat, prompts, masks = load_bank(args, work, device, vae)
    mean, std = lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4))
    view = (1, -1, 1, 1, 1)
    lat = (lat - mean.view(view)) / std.view(view)  # what the engine's latents are: x / std after - mean
    unique = sorted(set(prompts)) + [""]
    states = encode_prompts(tok, enc.to(device), unique, TEXT_LEN).cpu()
    index = {p: i for i, p in enumerate(unique)}
    return DitData(lat, masks, states, torch.tensor([index[p] for p in prompts]), mean, std)


def train_dit(args, work: Path, device: torch.device, data: DitData):
    from dualpar.models.tiny import TINY_TRANSFORMER
    from diffusers import WanTransformer3DModel

    lat, masks, states, ids = data.lat, data.masks, data.states, data.ids
    torch.manual_seed(args.seed + 3)
    dit = WanTransformer3DModel(**TINY_TRANSFORMER).to(device).train()
    st = Stage(work, "dit", dit, args.dit_lr, args.dit_steps)
    with bar(st, args) as pb:
        while not st.done():
            rng = rng_for(args.seed, "dit", st.step)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            pick = torch.from_numpy(rng.integers(0, len(lat), size=args.dit_batch))
            start = rng.integers(0, LATENT_CLIP - WINDOW + 1, size=args.dit_batch)
            x0 = torch.stack([lat[i, :, s:s + WINDOW] for i, s in zip(pick.tolist(), start.tolist())])
            # objects cover a few latent cells: weighted up, as in the VAE's loss, or the background wins
            weight = 1.0 + OBJECT_WEIGHT * torch.stack(
                [masks[i, s:s + WINDOW] for i, s in zip(pick.tolist(), start.tolist())])[:, None].float()
            text = states[ids[pick]]
            drop = torch.from_numpy(rng.random(args.dit_batch) < 0.1)
            text[drop] = states[data.empty]
            u = torch.rand(args.dit_batch, generator=gen)
            sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # Wan's shifted flow-matching time
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            x0, xt, noise, text, weight = (v.to(device) for v in (x0, xt, noise, text, weight))
            pred = dit(xt, (sigma * 1000).to(device), text, return_dict=False)[0]
            loss = (weight * (pred.float() - (noise - x0).float()) ** 2).mean()
            st.advance(loss, pb, args.save_every)
    return dit.eval().requires_grad_(False)


def causal_forward(cw, xt: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, positions: list[int],
                   allowed: torch.Tensor) -> torch.Tensor:
    """The transformer over whole clips ``xt`` [B, C, F, H, W] with per-frame ``timesteps`` [B, F], RoPE
    ``positions`` (one per frame) and the frame-level attention mask ``allowed`` [F, F] (query frame,
    key frame; True = may attend): with a block-causal mask, what the engine's causal mode computes for
    chunks in flight over their committed history (``reference.causal_reference``). ``cw`` is a
    :class:`CausalWan` over the whole model; ``text`` the text-encoder states [B, S, text_dim]. Returns
    the flow prediction [B, C, F, H, W] (float32), differentiable."""
    from dualpar.models.wan import block_forward

    m = cw.m
    b, _, frames, h, w = xt.shape
    x = m.patch_embedding(xt.to(m.dtype)).flatten(2).transpose(1, 2)  # [B, F * T, dim]
    tpf = x.shape[1] // frames
    temb, tproj = cw.frame_conditioning(timesteps.reshape(-1))
    temb, tproj = temb.view(b, frames, -1), tproj.view(b, frames, 6, -1)
    cross = m.cross_kv(m.text_context(text))
    mask = allowed.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1).to(x.device)

    def attention(a, hid):
        q = cw._rotate(a.norm_q(a.to_q(hid)).unflatten(2, (a.heads, -1)), positions, h, w)
        k = cw._rotate(a.norm_k(a.to_k(hid)).unflatten(2, (a.heads, -1)), positions, h, w)
        v = a.to_v(hid).unflatten(2, (a.heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return a.to_out[1](a.to_out[0](out.transpose(1, 2).flatten(2, 3).type_as(q))), None

    for i, blk in enumerate(m.layers):
        x, _ = block_forward(blk, x, tproj, cross[i], attention)
    return cw.frame_head(x, temb, h, w)


def causal_sample(rng: np.random.Generator, frames: int, batch: int):
    """One batch's layout for the causal fine-tune: the chunk of every frame, RoPE positions, the
    frame-level attention mask and each sample's noise level per chunk (shift not yet applied).

    * Noise never decreases from a chunk to the next: older chunks are cleaner, as in the engine's
      staggered schedule (chunks in flight at later steps) and its sequential one (all history clean,
      30% of the samples here). A prefix of chunks is often clean (their K/V are what a commit pass
      writes) and the loss counts only noisy frames.
    * Half the batches put a position gap of up to ``MAX_GAP`` between the early chunks and the rest:
      history far back (the window policy's sink frames, a long full cache), which a 17-frame clip
      would otherwise never show.
    * Half the batches hide a random share of each chunk's older frames from it: history thinned
      as a KV policy (window, topk, focused) selects it.
    """
    from dualpar.schedule import split_blocks

    blocks = split_blocks(frames, CAUSAL_CHUNK)
    chunk_of = torch.tensor([blk.id for blk in blocks for _ in range(blk.frames)])
    n = len(blocks)
    positions = list(range(frames))
    if rng.random() < 0.5:
        cut, gap = int(rng.integers(1, n)), int(rng.integers(1, MAX_GAP + 1))
        positions = [p + gap * int(chunk_of[p] >= cut) for p in positions]
    older = chunk_of[None, :] < chunk_of[:, None]
    keep = torch.ones(frames, frames, dtype=torch.bool)
    if rng.random() < 0.5:
        share = rng.uniform(0.3, 1.0)
        keep = torch.from_numpy(rng.random((n, frames)) < share)[chunk_of]  # one draw per (chunk, frame)
    allowed = (chunk_of[None, :] == chunk_of[:, None]) | (older & keep)
    u = np.sort(rng.random((batch, n)), axis=1)
    for row in range(batch):
        if rng.random() < 0.3:
            u[row, :-1] = 0.0
        else:
            u[row, :int(rng.integers(0, n))] = 0.0
    return chunk_of, positions, allowed, torch.from_numpy(u).float()


def train_dit_causal(args, work: Path, device: torch.device, dit, data: DitData):
    """Fine-tune a copy of the trained transformer for the engine's causal mode (block-causal attention,
    per-chunk noise levels; see :func:`causal_sample`), from the bidirectional weights."""
    import copy

    from dualpar.models.causal_wan import CausalWan
    from dualpar.models.wan import WanSlice

    lat, masks, states, ids = data.lat, data.masks, data.states, data.ids
    dit = copy.deepcopy(dit).train().requires_grad_(True)
    cw = CausalWan(WanSlice(dit, 0, len(dit.blocks)))
    st = Stage(work, "dit-causal", dit, args.causal_lr, args.causal_steps)
    frames = lat.shape[2]
    with bar(st, args) as pb:
        while not st.done():
            rng = rng_for(args.seed, "dit-causal", st.step)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            pick = torch.from_numpy(rng.integers(0, len(lat), size=args.dit_batch))
            chunk_of, positions, allowed, u = causal_sample(rng, frames, args.dit_batch)
            sigma = (SHIFT * u / (1 + (SHIFT - 1) * u))[:, chunk_of]  # [B, F]
            x0 = lat[pick]
            weight = (1.0 + OBJECT_WEIGHT * masks[pick][:, None].float()) * (sigma > 0)[:, None, :, None, None]
            text = states[ids[pick]]
            text[torch.from_numpy(rng.random(args.dit_batch) < 0.1)] = states[data.empty]
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma[:, None, :, None, None]
            xt = (1 - s) * x0 + s * noise
            x0, xt, noise, text, weight = (v.to(device) for v in (x0, xt, noise, text, weight))
            pred = causal_forward(cw, xt, (sigma * 1000).to(device), text, positions, allowed)
            err = weight * (pred - (noise - x0).float()) ** 2  # the noisy frames' weighted mean:
            loss = err.sum() / (weight > 0).expand_as(err).sum().clamp(min=1)
            st.advance(loss, pb, args.save_every)
    return dit.eval().requires_grad_(False)


def plot(work: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot", file=sys.stderr)
        return None
    names = [n for n in STAGES if (work / f"{n}.pt").exists()]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        losses = np.array(torch.load(work / f"{name}.pt", weights_only=True)["losses"])
        ax.plot(losses[:, 0], losses[:, 1], lw=0.4, alpha=0.4, color="C0")
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses[:, 1], np.ones(k) / k, mode="valid")
        ax.plot(losses[k - 1:, 0], smooth, color="C1")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    path = work / "losses.png"
    fig.savefig(path, dpi=110)
    return path


GUIDANCE = 2.0
"""The trained preset's default guidance. On 257-frame videos of the shipped weights (two prompts) the
prompted colour was found in 88-100% of the frames at guidance 1, 94-100% at 2, 65-100% at 3; at 2 the
objects nobody asked for fell from 2.0-3.3 per frame to 0.1-2.1 and the centroid's jumps from 5-20 to
0-1; at 3 the green square faded. (The first weights, trained on fewer clips without the object
weighting, lost the prompted colour at guidance 2.)"""


def write_defaults(out: Path) -> None:
    """The folder's own defaults (``dualpar_defaults.json``): this model's guidance, and no negative
    prompt (it was trained to drop prompts to the empty one, and never saw Wan's negative prompt)."""
    from dualpar.config import MODEL_DEFAULTS

    (out / MODEL_DEFAULTS).write_text(json.dumps({"sampling": {"guidance": GUIDANCE, "negative_prompt": ""}},
                                                 indent=1) + "\n")


def final_loss(work: Path, stage: str) -> float:
    """Mean loss of a stage's last 100 steps."""
    return float(np.mean([x[1] for x in torch.load(work / f"{stage}.pt", weights_only=True)["losses"][-100:]]))


def export(out: Path, vae, dit, tok, enc, mean, std, info: dict, causal=None) -> None:
    """The model folder: diffusers' layout, plus ``CAUSAL_TRANSFORMER`` (the causal fine-tune) when given."""
    from dualpar.config import CAUSAL_TRANSFORMER

    from diffusers import UniPCMultistepScheduler, WanPipeline

    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    tok.model_max_length = TEXT_LEN  # the prompt length the engine uses for this folder (model.text_len 0)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=SHIFT)
    # the transformer is stored in bfloat16 (half the bytes in the repository; loading casts it to the
    # run's dtype); the VAE stays float32, which diffusers' loader would otherwise keep as stored
    pipe = WanPipeline(tokenizer=tok, text_encoder=enc.cpu(), vae=vae.cpu(), scheduler=scheduler,
                       transformer=dit.cpu().to(torch.bfloat16))
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    if causal is not None:
        causal.cpu().to(torch.bfloat16).save_pretrained(out / CAUSAL_TRANSFORMER)
    write_defaults(out)
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    global SIZE  # --size: the data functions read the module's frame side
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dualpar" / "models" / "tiny_trained",
                    help="diffusers-format folder written at the end")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "train-tiny",
                    help="resumable state, latent bank and loss plot")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=SIZE, help="frame side of the training videos (a multiple of 16)")
    ap.add_argument("--vae-image-steps", type=int, default=3000)
    ap.add_argument("--vae-clip-steps", type=int, default=250)
    ap.add_argument("--clips", type=int, default=800, help="encoded clips the transformer trains on")
    ap.add_argument("--dit-steps", type=int, default=3000)
    ap.add_argument("--dit-batch", type=int, default=16)
    ap.add_argument("--dit-lr", type=float, default=8e-4)
    ap.add_argument("--causal-steps", type=int, default=1500,
                    help="steps of the causal fine-tune (the weights of --mode causal; 0: none)")
    ap.add_argument("--causal-lr", type=float, default=3e-4)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--stop-after", choices=STAGES, help="stop after this stage (resume later)")
    ap.add_argument("--export-only", action="store_true",
                    help="no training: export what --work holds now (a run may still be writing it)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if min(args.vae_image_steps, args.vae_clip_steps, args.dit_steps, args.clips, args.save_every) < 1 \
            or args.causal_steps < 0:
        print("error: step counts, --clips and --save-every must be >= 1 (--causal-steps >= 0)", file=sys.stderr)
        return 2
    if args.size < 16 or args.size % 16:
        print("error: --size must be a positive multiple of 16", file=sys.stderr)
        return 2
    SIZE = args.size
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.export_only:
        return export_current(args, device)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    vae = train_vae(args, args.work, device)
    info = {"vae_psnr_db": vae_psnr(vae, device, args.seed), "seed": args.seed,
            "steps": {"vae-image": args.vae_image_steps, "vae-clip": args.vae_clip_steps, "dit": args.dit_steps,
                      "dit-causal": args.causal_steps}}
    print(f"VAE held-out PSNR {info['vae_psnr_db']:.2f} dB", file=sys.stderr)
    plot(args.work)
    if args.stop_after in ("vae-image", "vae-clip"):
        return 0
    tok, enc = text_parts(args.seed)
    data = dit_data(args, args.work, device, vae, tok, enc)
    dit = train_dit(args, args.work, device, data)
    info["dit_final_loss"] = final_loss(args.work, "dit")
    causal = None
    if args.stop_after != "dit" and args.causal_steps:
        causal = train_dit_causal(args, args.work, device, dit, data)
        info["dit_causal_final_loss"] = final_loss(args.work, "dit-causal")
    info["minutes"] = round((time.time() - t0) / 60, 1)
    print(f"loss plot: {plot(args.work)}", file=sys.stderr)
    export(args.out, vae, dit, tok, enc, data.mean, data.std, info, causal)
    print(f"wrote {args.out} ({info})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
