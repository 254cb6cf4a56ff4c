"""Streaming VAE decode: finished latent blocks to pixels, bit-identical to one decode of the whole video.

- :class:`StreamingDecoder` decodes normalized latent blocks frame by frame, keeping the VAE's
  temporal cache across blocks.
- :func:`to_uint8_frames` turns decoded frames into the uint8 RGB frames the MP4 takes.
"""

from __future__ import annotations

import numpy as np
import torch


class StreamingDecoder:
    """Decode a Wan video block by block, bit-identical to one ``vae.decode`` of the whole video.

    ``AutoencoderKLWan._decode`` already runs its decoder one latent frame at a time and
    carries temporal context between frames in a feature cache. Calling the public
    ``decode`` per block would reset that cache at every block boundary (and treat each
    block's first frame as the video's first frame), so instead this class runs the same
    per-frame loop itself and keeps the cache alive across blocks.

    Bit-identity also needs ``post_quant_conv`` (a 1x1x1 conv, run here per block rather
    than over the whole video) to give per-frame results that do not depend on the number
    of frames. That holds for the CPU kernels at real latent sizes; with tiny 2x2 latents
    they pick a different kernel and differ in the last bit.

    Tiled decoding is not supported: tiles keep independent caches and are blended.
    """

    def __init__(self, vae) -> None:
        if getattr(vae, "use_tiling", False):
            raise ValueError("StreamingDecoder does not support VAE tiling; call vae.disable_tiling() first")
        self.vae = vae
        self._feat_map: list | None = None
        self.latent_frames_done = 0
        self.reset()

    def reset(self) -> None:
        """Start a new video: drop the temporal cache."""
        # clear_cache() rebinds vae._feat_map to a fresh list; we keep our own reference,
        # so other uses of the VAE (encode/decode) between blocks cannot clobber our cache.
        self.vae.clear_cache()
        self._feat_map = self.vae._feat_map
        self.latent_frames_done = 0

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Position and temporal cache, as JSON-able metadata and named CPU tensors, for :meth:`load_state_dict`.

        The cache (``_feat_map``) holds one entry per causal conv of the decoder: ``None``
        (not run yet), ``"Rep"`` (an upsampling conv after only the first latent frame) or
        the tensor of its last input frames. The tensors are not copied when already on
        the CPU, which is safe because the decoder replaces cache entries, never updates them.
        """
        layout, tensors = [], {}
        for i, entry in enumerate(self._feat_map):
            if isinstance(entry, torch.Tensor):
                tensors[f"feat_map.{i}"] = entry.detach().cpu().contiguous()
                layout.append("tensor")
            elif entry is None or entry == "Rep":
                layout.append(entry)
            else:
                raise TypeError(f"cannot save VAE cache entry {i} of type {type(entry).__name__}")
        # first_chunk (the decoder's causal start) is latent_frames_done == 0
        return {"latent_frames_done": self.latent_frames_done, "feat_map": layout}, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue decoding where the decoder that returned ``state_dict()`` stopped."""
        from diffusers.utils.torch_utils import get_module_execution_device

        self.reset()
        if len(meta["feat_map"]) != len(self._feat_map):
            raise ValueError(f"the saved VAE cache has {len(meta['feat_map'])} entries, this VAE's decoder "
                             f"{len(self._feat_map)}: it was saved with another VAE")
        device = get_module_execution_device(self.vae)
        for i, kind in enumerate(meta["feat_map"]):
            if kind == "tensor":
                if f"feat_map.{i}" not in tensors:
                    raise ValueError(f"the saved VAE cache lacks tensor 'feat_map.{i}'")
                self._feat_map[i] = tensors[f"feat_map.{i}"].to(device)
            elif kind is None or kind == "Rep":
                self._feat_map[i] = kind
            else:
                raise ValueError(f"unknown VAE cache entry {kind!r}")
        self.latent_frames_done = meta["latent_frames_done"]

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalization exactly as diffusers' ``WanPipeline`` does before decoding."""
        # Local import: diffusers is heavy and latents-only runs never decode.
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.vae
        z_dim = vae.config.z_dim
        latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return latents / latents_std + latents_mean

    @torch.inference_mode()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of NORMALIZED latents ``[B, z, f, h, w]`` to pixels ``[B, 3, F, H, W]`` in [-1, 1].

        ``F`` is ``1 + 4 * (f - 1)`` for the video's first block and ``4 * f`` afterwards.
        """
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim:
            raise ValueError(f"expected latents [B, {self.vae.config.z_dim}, f, h, w], got {tuple(latents.shape)}")
        vae = self.vae
        # Same offload hook `vae.decode` triggers (apply_forward_hook), since we bypass it.
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)

        x = vae.post_quant_conv(self.denormalize(latents))
        outs = []
        for i in range(x.shape[2]):
            conv_idx = [0]  # per-frame cursor into the cache, as in `_decode`
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_map,
                    feat_idx=conv_idx,
                    first_chunk=self.latent_frames_done == 0,
                )
            )
            self.latent_frames_done += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Map a decoded video ``[1, 3, F, H, W]`` (or ``[3, F, H, W]``) in [-1, 1] to uint8 ``[F, H, W, 3]``.

    Same arithmetic as diffusers' ``VideoProcessor.postprocess_video`` for "pil" output.
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a single video, got batch size {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3, F, H, W] frames, got {tuple(video.shape)}")
    frames = (video * 0.5 + 0.5).clamp(0, 1)  # denormalize in the VAE's dtype, like diffusers
    frames = frames.permute(1, 2, 3, 0).cpu().float().numpy()
    return (frames * 255).round().astype(np.uint8)
