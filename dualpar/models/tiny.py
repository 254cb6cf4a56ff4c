"""The embedded ``tiny`` preset: a seeded random-weight Wan2.1 model built in-process.

It has the real architecture (diffusers' ``WanTransformer3DModel`` and
``AutoencoderKLWan``, a ``UMT5EncoderModel`` text encoder and a T5 tokenizer),
only small, so that the whole engine runs on a CPU in minutes. Nothing is
downloaded: the same seed always gives the same weights, on every rank.
``scripts/make_tiny_checkpoint.py`` saves it as a diffusers-format folder.
"""

from __future__ import annotations

import torch

# Sizes of the tiny preset. The transformer keeps Wan's patch (1, 2, 2), 16
# latent channels and RoPE layout; only widths and depths shrink.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=512,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TINY_VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
TINY_TEXT_ENCODER = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=8,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
)
_WORDS = (
    "a an the of in on at and with by to from is are over under near through "
    "cat dog bird fish horse person people car train boat city street forest "
    "sea ocean river mountain sky cloud sun moon night day snow rain fire "
    "red blue green yellow white black golden bright dark slow fast "
    "walking running flying swimming driving dancing baking cooking "
    "kitchen cake flour window light video camera shot close up wide view"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"


def tiny_tokenizer(extra_words=()):
    """A small sentencepiece-unigram T5 tokenizer: whole words plus single characters.

    ``extra_words`` extends the vocabulary (the trained preset's: every word its prompts use,
    so that a prompt is one token per word)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in dict.fromkeys([*_WORDS, *extra_words])]
    vocab += [(c, -8.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(seed: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, **TINY_TEXT_ENCODER)
    return UMT5EncoderModel(cfg).eval()


def tiny_transformer(seed: int, config: dict | None = None):
    """The preset's transformer (or one of another ``config``, initialised the same way)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**(config or TINY_TRANSFORMER))
    # diffusers zero-initialises nothing here, but Wan checkpoints have
    # non-trivial biases; small random ones make every parameter matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def tiny_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_VAE).eval()


def tiny_components(seed: int = 0, *, transformer: bool = True, vae: bool = True, text: bool = True) -> dict:
    """Build the tiny preset's components (only those asked for) from ``seed``.

    Each part has its own derived seed, so building a subset gives the same
    weights as building everything.
    """
    out: dict = {}
    if transformer:
        out["transformer"] = tiny_transformer(seed)
    if vae:
        out["vae"] = tiny_vae(seed + 1)
    if text:
        tok = tiny_tokenizer()
        out["tokenizer"] = tok
        out["text_encoder"] = tiny_text_encoder(seed + 2, len(tok))
    return out
