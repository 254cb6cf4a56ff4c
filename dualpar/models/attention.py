"""Which attention kernel the layers use: one name per choice, mapped onto diffusers' dispatcher.

``model.attention`` picks the kernel of the bidirectional layers' self- and
cross-attention (diffusers' ``dispatch_attention_fn`` backends). ``native`` is
torch's ``scaled_dot_product_attention``, which itself picks FlashAttention-2,
memory-efficient or cuDNN kernels on GPUs; the others force one kernel or use
an installed package. Kernels fetched from a model hub at run time are left
out: runs must work offline. The causal mode's masked attention always uses
torch SDPA (its per-frame masks are not supported by the flash kernels).
"""

from __future__ import annotations

from ..config import ConfigError, choices

# our name -> diffusers AttentionBackendName value
DIFFUSERS_NAME = {
    "native": "native",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "native-flash": "_native_flash",
    "math": "_native_math",
    "flash": "flash",
    "flash3": "_flash_3",
    "sage": "sage",
}
assert tuple(DIFFUSERS_NAME) == choices("model.attention")  # one entry per config choice, same order
NEEDS_CUDA = {"cudnn", "efficient", "native-flash", "flash", "flash3", "sage"}


def backend(name: str):
    """The diffusers backend for ``name``."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(DIFFUSERS_NAME[name])


def check(name: str, device_type: str) -> None:
    """ConfigError unless ``name`` can run here (package installed, device suitable)."""
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    if name not in DIFFUSERS_NAME:
        raise ConfigError(f"model.attention must be one of {choices('model.attention')}, got '{name}'")
    if name in NEEDS_CUDA and device_type != "cuda":
        raise ConfigError(f"model.attention {name} needs a CUDA device (this run is on {device_type}); use native")
    try:
        _check_attention_backend_requirements(backend(name))
    except RuntimeError as e:
        raise ConfigError(f"model.attention {name}: {str(e).splitlines()[0]}") from None


def available(device_type: str) -> dict[str, str]:
    """Every choice with ``ok`` or why it cannot run here."""
    out = {}
    for name in DIFFUSERS_NAME:
        try:
            check(name, device_type)
            out[name] = "ok"
        except ConfigError as e:
            out[name] = str(e)
    return out
