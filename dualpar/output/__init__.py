"""Streaming output of finished latent blocks.

The engine finishes a long video's latents block by block. Each finished block is decoded
with the Wan VAE (continuing its temporal cache, so the result is bit-identical to decoding
the whole video at once), appended to a fragmented MP4 and saved as latents, with a manifest
that always describes what is on disk. Memory therefore does not grow with video length, and
a crash loses nothing that was already written.

Import from the module that owns what you need (nothing is re-exported here):

- :mod:`.decode`: streaming VAE decode (``StreamingDecoder``, ``to_uint8_frames``).
- :mod:`.mp4`: fragmented MP4 muxing (``Mp4Writer``).
- :mod:`.rundir`: the run directory (every file name declared once, ``safe_join``,
  ``atomic_write``, clearing, checking for foreign files, the run lock). Light: no torch.
- :mod:`.writer`: the run writer (``RunWriter``: latents, video and manifest per block).
"""
