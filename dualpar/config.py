"""Run configuration: dataclasses, YAML loading, command-line overrides, validation.

All checks live here, so bad input is rejected before any model is built.
A config file has one section per dataclass below (``model``, ``video``,
``sampling``, ``parallel``, ``causal``, ``cache``, ``output``); every key is optional.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)
# Every enumerated choice is declared once, as the Literal type of its field (see choices()).
Dtype = Literal["float32", "bfloat16", "float16"]
Scheduler = Literal["unipc", "euler"]
Mode = Literal["bidirectional", "causal"]
Backend = Literal["auto", "nccl", "gloo"]
AttentionBackend = Literal["native", "cudnn", "efficient", "native-flash", "math", "flash", "flash3", "sage"]
CompileMode = Literal["off", "inductor", "aot_eager"]
Sampler = Literal["reinject", "euler"]
CausalSchedule = Literal["sequential", "staggered"]
RopeMode = Literal["absolute", "rebase"]
Preset = Literal["tiny", "tiny-random"]
"""Built-in models (``model.preset``)."""
HeadBudget = Literal["attention", "calibrated"]
"""Where Focused Forcing's head budgets come from (``causal.head_budget``)."""
PolicyName = Literal["full", "window", "topk", "focused"]
"""The KV-cache policies of causal mode (what ``kv_cache.make_policy`` builds)."""
CachePolicy = Literal["none", "reuse", "taylor", "newton"]
"""Timestep feature caching: how a skipped step's features are forecast (``forecast.Forecaster``)."""
CacheLevel = Literal["model", "stage"]
"""What is forecast: the whole noise prediction on rank 0, or each rank's own stage residual."""
NeighbourKV = Literal["reuse", "drop"]
"""What an older block attends to when its newer neighbour's step was forecast (no fresh K/V)."""
DecodeOn = Literal["first", "last", "extra"]
"""Which rank decodes and writes the video (``output.decode_on``)."""
VAE_TEMPORAL = 4  # Wan VAE: one latent frame per 4 frames (plus the first)
VAE_SPATIAL = 8

# Keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("output.out", "output.progress", "output.queue_blocks", "output.checkpoint_every",
                     "parallel.timeout_s", "parallel.join_timeout_s", "parallel.split", "parallel.profile",
                     "output.decode_on")
PER_VIDEO = ("sampling.prompt", "sampling.seed", "sampling.negative_prompt", "output.out")
"""Keys the videos of one job may differ in without rebuilding its engine (anything else: a new job)."""


MAX_FRAMES = 4 * 65536 + 1
"""Longest video (65537 latent frames, about 4.5 hours at 16 fps): the task list and manifest grow with it."""
MAX_PIXELS = 4096
"""Largest frame side (Wan2.1 is trained up to 1280)."""
MAX_FPS = 240


PRESET_DIRS = {"tiny": Path(__file__).resolve().parent / "models" / "tiny_trained"}
"""Presets read from a folder that ships with the package (the others are built in-process)."""
PRESET_TEXT_LEN = {"tiny": 32, "tiny-random": 512}
"""Each preset's prompt length when ``model.text_len`` is 0."""
MODEL_DEFAULTS = "dualpar_defaults.json"
"""A model folder's own defaults (``{"sampling": {"guidance": 2.0, ...}}``), under any value the user gives."""
CAUSAL_TRANSFORMER = "transformer_causal"
"""A model folder's optional transformer for ``--mode causal`` (same config, its own weights: a causal
fine-tune of the folder's ``transformer``), read in its place when ``model.transformer_file`` is empty."""
HEAD_IMPORTANCE = "head_importance.json"
"""A model folder's calibrated head importances (``causal.head_budget=calibrated``)."""


class ConfigError(ValueError):
    """A configuration problem the user must fix; printed as one line, exit status 2."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    preset: Preset = "tiny"
    """Built-in model when ``path`` is empty: ``tiny`` is a small Wan2.1-architecture model trained on
    a synthetic world of coloured shapes (``scripts/train_tiny.py``; its folder ships with the package),
    ``tiny-random`` the same architecture with seeded random weights, built in-process (``weights_seed``)."""
    path: str = ""
    """Local diffusers-format Wan2.1 text-to-video folder (model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/); each rank reads only its own tensors."""
    transformer_file: str = ""
    """Optional transformer weights replacing the folder's: a .safetensors (or .pt, read with
    weights_only) state dict in the original Wan naming (Self-Forcing, CausVid, LongLive)."""
    causal_weights: bool = True
    """In ``--mode causal``, read the model folder's ``transformer_causal/`` (a causal fine-tune of its
    transformer, as the trained ``tiny`` preset ships) in place of ``transformer/`` when it has one;
    False: the bidirectional weights run causally as they are."""
    weights_seed: int = 0
    """Seed of the ``tiny-random`` preset's weights (identical on every rank)."""
    dtype: Dtype = "float32"
    """Compute dtype of the transformer."""
    text_len: int = 0
    """Prompt length in tokens after padding; 0: the model's own, its tokenizer's ``model_max_length``
    (32 for the trained ``tiny`` preset, whose prompts are a dozen words; Wan's 512), else 512."""
    attention: AttentionBackend = "native"
    """Attention kernel of the bidirectional layers: ``native`` (torch SDPA, which picks FlashAttention-2 /
    memory-efficient / cuDNN itself), ``cudnn``, ``efficient``, ``native-flash``, ``math`` (forced SDPA
    kernels), ``flash`` (flash-attn 2), ``flash3`` (FlashAttention-3), ``sage`` (SageAttention)."""
    compile: CompileMode = "off"
    """``torch.compile`` of each owned layer: ``off``, ``inductor`` (fused kernels; every block shape of the
    run is compiled before the ring starts), or ``aot_eager`` (traced, not fused: a cheap check)."""
    cfg_serial: bool = False
    """Run the two CFG rows (cond, uncond) through each layer one after the other instead of as a
    batch of two: about half the peak activation memory, for some speed."""

    def validate(self) -> None:
        """Raise ConfigError for the first problem of this section on its own."""
        if not 0 <= self.weights_seed < 2**63:
            raise ConfigError(f"model.weights_seed must be in [0, 2^63), got {self.weights_seed}")
        if not self.path and self.preset not in PRESET_TEXT_LEN:
            raise ConfigError(f"model.preset '{self.preset}' is unknown (available: {', '.join(PRESET_TEXT_LEN)}; "
                              "or give --model PATH)")
        if self.transformer_file and not self.path:
            raise ConfigError("model.transformer_file needs model.path (the folder gives config, VAE and text encoder)")
        _check_choices(self)
        if not 0 <= self.text_len <= 4096:
            raise ConfigError(f"model.text_len must be in [1, 4096] (or 0: the model's own), got {self.text_len}")

    @property
    def folder(self) -> str:
        """The diffusers-format folder the model is read from: ``path``, the trained preset's, or ""
        (``tiny-random``, built in-process)."""
        if self.path:
            return self.path
        return str(PRESET_DIRS[self.preset]) if self.preset in PRESET_DIRS else ""

    @property
    def tokens(self) -> int:
        """The prompt length in use: ``text_len``, or when it is 0 the model's own: its tokenizer's
        ``model_max_length`` (the trained preset's: 32; Wan's: 512), else 512."""
        if self.text_len:
            return self.text_len
        if not self.folder:
            return PRESET_TEXT_LEN.get(self.preset, 512)
        try:
            saved = json.loads((Path(self.folder) / "tokenizer" / "tokenizer_config.json").read_text())
            n = saved.get("model_max_length")
        except (OSError, ValueError, AttributeError):
            return 512
        return n if isinstance(n, int) and 1 <= n <= 4096 else 512  # tokenizers without one say 1e30


@dataclass(kw_only=True, slots=True)
class VideoConfig:
    frames: int = 1025
    """Output frames; Wan needs 4k+1 (1025 frames = 257 latent frames)."""
    height: int = 96
    """Frame height in pixels; a multiple of 16 (VAE x8, patch x2)."""
    width: int = 96
    """Frame width in pixels; a multiple of 16."""
    fps: int = 16
    """Frame rate written into the MP4 (Wan2.1 uses 16)."""

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL + 1

    def validate(self) -> None:
        """Raise ConfigError for the first problem of this section on its own."""
        if self.frames < 1 or (self.frames - 1) % VAE_TEMPORAL:
            lo = (self.frames - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1
            near = sorted({max(lo, 1), max(lo + VAE_TEMPORAL, 1 + VAE_TEMPORAL)})
            raise ConfigError(f"--frames {self.frames} is not of the form 4k+1 (Wan's VAE); try "
                              + " or ".join(map(str, near)))
        if self.frames > MAX_FRAMES:
            raise ConfigError(f"--frames {self.frames} is past the longest supported video ({MAX_FRAMES} frames, "
                              f"about {(MAX_FRAMES - 1) / 16 / 3600:.1f} hours at 16 fps)")
        for name, val in (("height", self.height), ("width", self.width)):
            if val < 16 or val % 16:
                raise ConfigError(f"video.{name} {val} must be a positive multiple of 16 (VAE x8, patch x2)")
            if val > MAX_PIXELS:
                raise ConfigError(f"video.{name} {val} is past {MAX_PIXELS} pixels")
        if not 1 <= self.fps <= MAX_FPS:
            raise ConfigError(f"video.fps must be in [1, {MAX_FPS}], got {self.fps}")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    prompt: str = "a red circle bouncing right on a dark blue background"
    """Text prompt (the default is one the trained ``tiny`` preset knows: a scene of its synthetic world)."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance (Wan's by default; a model folder's
    ``dualpar_defaults.json`` may set its own: the trained ``tiny`` preset's is empty)."""
    steps: int = 10
    """Denoising steps per block (the queue holds at most this many blocks)."""
    scheduler: Scheduler = "unipc"
    """``unipc`` (UniPCMultistepScheduler, flow prediction) or ``euler`` (FlowMatchEulerDiscreteScheduler)."""
    flow_shift: float = 3.0
    """Timestep shift of the flow-matching schedule (Wan: 3.0 at 480p, 5.0 at 720p)."""
    guidance: float = 5.0
    """Classifier-free guidance scale; <= 1 disables guidance (one batch row instead of two)."""
    seed: int = 0
    """Seed of the shared noise pool and its permutations."""
    mode: Mode = "bidirectional"
    """``bidirectional`` (block-wise DualParal schedule) or ``causal`` (chunk-by-chunk with KV caches,
    settings in the ``causal`` section)."""

    def validate(self) -> None:
        """Raise ConfigError for the first problem of this section on its own."""
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"sampling.steps must be in [1, 1000], got {self.steps}")
        _check_choices(self)
        if not 0.0 < self.flow_shift <= 100.0:
            raise ConfigError(f"sampling.flow_shift must be in (0, 100], got {self.flow_shift}")
        if not 0.0 <= self.guidance <= 100.0:
            raise ConfigError(f"sampling.guidance must be in [0, 100], got {self.guidance}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"sampling.seed must be in [0, 2^63), got {self.seed}")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    block: int = 8
    """Latent frames per block (paper: 8). The first block also takes the leftover frames."""
    num_cat: int = 4
    """Context latent frames borrowed from each neighbour block (paper: 8); 0 disables context."""
    shared_noise: bool = True
    """Draw every block's noise from one shared pool, re-permuted per block (DualParal: consistent global
    dynamics at no cost); false: fresh noise for every block (the ablation)."""
    timeout_s: float = 120.0
    """Longest wait for a peer's message while generating; past it the run fails, naming the peer."""
    join_timeout_s: float = 300.0
    """Longest wait at start-up for every rank to join (a rank never started, a wrong MASTER_ADDR)."""
    split: str = "even"
    """Layers per rank: ``even`` (sizes differ by at most one, the spare layers to the middle ranks),
    one count per rank, comma-separated (``2,3,3``: 8 layers on 3 ranks), or ``auto``: the split whose
    slowest stage is fastest under the cost profile measured on this setup (rank 0 embeds and steps
    the scheduler, the last rank runs the head, one rank decodes), re-chosen after every video of a
    batch from that video's timings (``even`` until a first video has been measured)."""
    profile: str = ""
    """Where ``split=auto`` keeps its measured cost profiles (one JSON file, by setup); empty:
    ``$DUALPAR_CACHE_DIR/profiles.json``, by default ``~/.cache/dualpar/profiles.json``."""
    backend: Backend = "auto"
    """Process-group backend: ``auto`` (NCCL on GPUs, gloo on CPUs), ``nccl``, or ``gloo`` (on GPUs it
    stages tensors through pinned host memory, so several ranks can share one GPU: for checks)."""

    def validate(self) -> None:
        """Raise ConfigError for the first problem of this section on its own."""
        if self.block < 1:
            raise ConfigError(f"parallel.block must be >= 1, got {self.block}")
        if not 0 <= self.num_cat <= self.block:
            raise ConfigError(f"parallel.num_cat must be in [0, block={self.block}], got {self.num_cat}")
        _check_choices(self)
        if not 1.0 <= self.timeout_s <= 86400.0:
            raise ConfigError(f"parallel.timeout_s must be in [1, 86400], got {self.timeout_s}")
        if not 1.0 <= self.join_timeout_s <= 86400.0:
            raise ConfigError(f"parallel.join_timeout_s must be in [1, 86400], got {self.join_timeout_s}")
        self.layer_counts()

    def layer_counts(self) -> list[int] | None:
        """The split's layer count per rank (None: ``even`` or ``auto``); ConfigError for a malformed split."""
        if self.split in ("even", "auto"):
            return None
        parts = str(self.split).split(",")
        if not all(_FRAME.fullmatch(p.strip()) and int(p) >= 1 for p in parts):
            raise ConfigError(f"parallel.split must be 'even', 'auto' or a layer count >= 1 per rank, comma-separated "
                              f"(e.g. 2,3,3), got {self.split!r}")
        return [int(p) for p in parts]


@dataclass(kw_only=True, slots=True)
class CausalConfig:
    chunk: int = 3
    """Latent frames generated per chunk (Self-Forcing, LongLive: 3). The first chunk takes the leftover."""
    timesteps: str = "1000,750,500,250"
    """Comma-separated denoising timesteps per chunk (before the shift), highest first."""
    shift: float = 5.0
    """Timestep shift: sigma = shift*s / (1 + (shift-1)*s) with s = t/1000 (Self-Forcing: 5)."""
    sampler: Sampler = "reinject"
    """``reinject``: predict x0, re-noise it to the next timestep with fresh noise (Self-Forcing);
    ``euler``: a deterministic flow-matching Euler step."""
    schedule: CausalSchedule = "staggered"
    """``sequential``: one chunk at a time (all steps, then commit); ``staggered``: a new chunk enters
    every iteration, so up to steps+1 chunks are in flight and N ranks stay busy."""
    policy: PolicyName = "full"
    """Committed frames each query frame attends to: ``full``, ``window`` (sliding window + sink),
    ``topk`` (attention top-k) or ``focused`` (Focused Forcing)."""
    budget: float = 0.25
    """Frames attended per query frame (>= 1: frames; < 1: fraction of the video's latent frames);
    ignored by ``full``."""
    sink: int = 3
    """First latent frames pinned in the cache (attended by ``window``; never evicted by the others)."""
    pool: int = 0
    """Frames ``topk``/``focused`` keep to choose from (0: 1.5 x budget); bounds their memory."""
    sample: int = 0
    """Queries per frame sampled to score history frames (``topk``, ``focused``); 0: about 1.5% of a
    frame's tokens, at least 4."""
    diversity: float = 0.3
    """Weight of redundancy against relevance in ``focused`` selection, in [0, 1)."""
    head_budget: HeadBudget = "attention"
    """How ``focused`` splits its budget over heads: ``attention`` (by each head's sampled attention share
    on history, measured as it goes) or ``calibrated`` (by head importances measured once per model,
    ``head_importance.json`` in the model folder, written by ``scripts/calibrate_heads.py``)."""
    rope: RopeMode = "absolute"
    """``absolute`` frame positions (Wan's 1024-position table bounds the video to 1024 latent frames)
    or ``rebase`` (positions shifted back once the video passes the table)."""

    def timestep_list(self) -> list[int]:
        return [int(t) for t in self.timesteps.split(",") if t.strip()]

    def validate(self, video: VideoConfig) -> None:
        """Raise ConfigError for the first problem of this section, for the (valid) ``video``."""
        lat = video.latent_frames
        if self.chunk < 1:
            raise ConfigError(f"causal.chunk must be >= 1, got {self.chunk}")
        if self.chunk > lat:
            need = (self.chunk - 1) * VAE_TEMPORAL + 1
            raise ConfigError(f"--frames {video.frames} gives {lat} latent frames, fewer than one chunk of "
                              f"{self.chunk}; use at least {need} frames or a smaller --chunk (causal.chunk)")
        try:
            ts = self.timestep_list()
        except ValueError:
            raise ConfigError(f"causal.timesteps must be comma-separated integers, got '{self.timesteps}'") from None
        if not ts or any(not 0 < t <= 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"causal.timesteps must be decreasing integers in (0, 1000], got '{self.timesteps}'")
        if not 0.0 < self.shift <= 100.0:
            raise ConfigError(f"causal.shift must be in (0, 100], got {self.shift}")
        _check_choices(self)
        try:
            budget_frames = resolve_budget(self.budget, lat)
        except ValueError:
            raise ConfigError(f"causal.budget must be a fraction in (0, 1) or a whole number of frames, "
                              f"got {self.budget}") from None
        if self.policy == "window" and budget_frames <= self.sink:
            raise ConfigError(f"causal.budget ({budget_frames} frames) must exceed causal.sink ({self.sink}) for "
                              "the window policy: the sink frames count toward the budget")
        if self.sink < 0 or self.pool < 0 or self.sample < 0:
            raise ConfigError("causal.sink, causal.pool and causal.sample must be >= 0")
        if not 0.0 <= self.diversity < 1.0:
            raise ConfigError(f"causal.diversity must be in [0, 1), got {self.diversity}")
        if self.rope == "absolute" and lat > 1024:
            raise ConfigError(f"{lat} latent frames pass RoPE's 1024 positions; set causal.rope=rebase")


@dataclass(kw_only=True, slots=True)
class CacheConfig:
    policy: CachePolicy = "none"
    """``none`` (every step computed), ``reuse`` (a skipped step repeats the last computed features),
    ``taylor`` (TaylorSeer: a Taylor expansion in the step index from finite differences of the last
    computed steps) or ``newton`` (the polynomial through the last ``order + 1`` computed steps,
    extrapolated in the noise level: exact for polynomial trajectories, whatever the spacing)."""
    level: CacheLevel = "model"
    """``model``: rank 0 forecasts a block's whole noise prediction, and a forecast step never enters
    the ring (no rank works on it); ``stage``: every rank forecasts its own layers' residual (output
    minus input hidden states), packets still flow and every rank skips its layers."""
    order: int = 1
    """Polynomial order of ``taylor`` and ``newton`` (1 or 2); lower while fewer steps were computed."""
    warmup: int = 2
    """Denoising steps computed in full before the first forecast (per block)."""
    interval: int = 2
    """After the warm-up, every ``interval``-th step is computed and the others forecast (1: all computed)."""
    last: int = 1
    """Final steps always computed in full (per block; at least the last, which leaves the block clean)."""
    neighbour: NeighbourKV = "reuse"
    """An older block whose newer neighbour's step was forecast has no fresh context K/V: ``reuse`` the
    K/V of the neighbour's last computed step, or ``drop`` the newer context for that step."""

    def validate(self, steps: int) -> None:
        """Raise ConfigError for the first problem of this section, for ``steps`` denoising steps."""
        _check_choices(self)
        if self.policy in ("taylor", "newton") and self.order not in (1, 2):
            raise ConfigError(f"cache.order must be 1 or 2, got {self.order}")
        if self.warmup < 1:
            raise ConfigError(f"cache.warmup must be >= 1 (a forecast needs a computed step), got {self.warmup}")
        if not 1 <= self.interval <= 1000:
            raise ConfigError(f"cache.interval must be in [1, 1000], got {self.interval}")
        if not 1 <= self.last <= steps:
            raise ConfigError(f"cache.last must be in [1, steps={steps}], got {self.last}")

    def full_steps(self, steps: int) -> list[bool]:
        """Per denoising step, whether it is computed (True) or forecast (see :func:`schedule.full_steps`)."""
        from .schedule import full_steps

        if self.policy == "none":
            return [True] * steps
        return full_steps(steps, self.warmup, self.interval, self.last)


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    out: str = ""
    """Output directory (video.mp4, latents/, manifest.json); empty: ``outputs/run-<date>-<time>``."""
    decode: bool = True
    """Decode finished blocks with the VAE and write the MP4 (off: latents and manifest only)."""
    save_latents: bool = True
    """Write each finished block's latents as safetensors."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    checkpoint_every: int = 8
    """Iterations between checkpoints of the engine state (for --resume); 0 turns them off."""
    queue_blocks: int = 8
    """Finished blocks that may wait for decoding before denoising pauses (bounds memory)."""
    decode_on: DecodeOn = "first"
    """Which rank decodes and writes the output: ``first`` (rank 0, which also embeds and steps the
    scheduler), ``last`` (the last rank, fed each finished block's latents), or ``extra``: one more
    rank than the layers run on (the last rank of the world) that only decodes and writes, taking
    the VAE off the ranks that denoise."""

    def validate(self) -> None:
        """Raise ConfigError for the first problem of this section on its own."""
        if self.checkpoint_every < 0:
            raise ConfigError(f"output.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not 1 <= self.queue_blocks <= 1024:
            raise ConfigError(f"output.queue_blocks must be in [1, 1024], got {self.queue_blocks}")
        _check_choices(self)


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model and in which dtype."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Length, resolution and frame rate."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Prompt, steps, scheduler, guidance, seed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Block size and context size of the block-wise schedule."""
    causal: CausalConfig = field(default_factory=CausalConfig)
    """Chunks, timesteps and KV-cache policy of the causal mode."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Timestep feature caching: which denoising steps are forecast instead of computed, and how."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where and what to write."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ring_size(self, world_size: int) -> int:
        """Ranks that run layers: all of them, or all but the last with ``output.decode_on=extra``."""
        return world_size - 1 if self.output.decode_on == "extra" and world_size > 1 else world_size

    def resumable(self) -> bool:
        """Whether a run of this config takes checkpoints and can be resumed: not in causal mode, and with
        feature caching only at ``cache.level=model`` with ``cache.neighbour=drop`` (a stage's forecast
        history and its neighbours' reused K/V live on every rank, and checkpoints hold rank 0's state)."""
        c = self.cache
        return self.sampling.mode != "causal" and (c.policy == "none" or (c.level == "model" and c.neighbour == "drop"))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        cfg = cls()
        cfg.update(data, source)
        return cfg

    def update(self, data: dict, source: str = "config") -> None:
        """Set every ``section: {key: value}`` of ``data`` (type-checked)."""
        cfg = self
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        for section, values in data.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(_SECTIONS)})")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{section}' must be a mapping")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)

    def differences(self, other: "Config", ignore: tuple[str, ...] = ()) -> list[str]:
        """``section.key: mine -> other`` for every differing key not in ``ignore``."""
        a, b, out = self.to_dict(), other.to_dict(), []
        for section in a:
            for key in a[section]:
                name = f"{section}.{key}"
                if name not in ignore and a[section][key] != b[section][key]:
                    out.append(f"{name}: {a[section][key]!r} -> {b[section][key]!r}")
        return out

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        """Set ``section.key`` with a type check (ints are accepted for floats)."""
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known in '{section}': {', '.join(fields)})")
        want = _FIELD_TYPES[(section, key)]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(
                f"{source}: '{dotted}' must be {want.__name__}, got {type(value).__name__} ({value!r})"
            )
        setattr(obj, key, value)

    def validate(self, world_size: int = 1, num_layers: int | None = None) -> None:
        """Raise ConfigError for the first problem found: each section's own, then those across sections."""
        for name in _SECTIONS:
            _check_finite(getattr(self, name))
        v, s, p, m = self.video, self.sampling, self.parallel, self.model
        v.validate()
        p.validate()
        if s.mode != "causal" and v.latent_frames < p.block:  # causal mode cuts chunks, checked below
            need = (p.block - 1) * VAE_TEMPORAL + 1
            raise ConfigError(
                f"--frames {v.frames} gives {v.latent_frames} latent frames, fewer than one block of "
                f"{p.block}; use at least {need} frames or a smaller --block"
            )
        s.validate()
        m.validate()
        if m.compile != "off" and s.mode == "causal":
            raise ConfigError("model.compile applies to the bidirectional mode (causal chunks change shape with "
                              "their history); set model.compile=off")
        if m.attention != "native" and s.mode == "causal":
            raise ConfigError("model.attention applies to the bidirectional mode; causal mode's masked attention "
                              "uses torch SDPA (model.attention=native)")
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        self.output.validate()
        ring = self.ring_size(world_size)
        if self.output.decode_on == "extra" and world_size < 2:
            raise ConfigError("output.decode_on=extra needs one rank more than the layers run on: at least 2 ranks "
                              "(--nproc 2: one denoises, one decodes)")
        if self.output.decode_on == "extra" and not self.output.decode:
            raise ConfigError("output.decode_on=extra gives a rank only decoding to do, but decoding is off "
                              "(--no-decode); drop one of them")
        if num_layers is not None and ring > num_layers:
            extra = " (plus the decoding rank)" if ring != world_size else ""
            raise ConfigError(
                f"{ring} ranks{extra} but the model has only {num_layers} DiT layers; use at most {num_layers} ranks"
                + extra
            )
        counts = p.layer_counts()
        if counts is not None and len(counts) != ring:
            what = f"{ring} denoising rank(s) (the last of {world_size} only decodes)" if ring != world_size \
                else f"{world_size} rank(s)"
            raise ConfigError(f"parallel.split gives {len(counts)} layer counts for {what}")
        if counts is not None and num_layers is not None and sum(counts) != num_layers:
            raise ConfigError(f"parallel.split {p.split} adds up to {sum(counts)} layers; the model has {num_layers}")
        prompt_schedule(s.prompt, v.frames, causal=s.mode == "causal")
        if s.mode == "causal":
            self.causal.validate(v)  # the causal section is read in causal mode only
        self.cache.validate(s.steps)
        if self.cache.policy != "none" and s.mode == "causal":
            raise ConfigError("cache.policy applies to the bidirectional mode (causal mode's few steps leave "
                              "little to forecast); set cache.policy=none")


_SCHEDULE_BAR = re.compile(r"(?<!\\)\|")
"""A ``|`` that starts the next entry of a prompt schedule (``\\|`` is a literal ``|``)."""
_FRAME = re.compile(r"[0-9]+")
"""A schedule's start frame: plain ASCII digits (``str.isdigit`` also says yes to '²', which ``int`` refuses)."""


def check_text(text: str, what: str) -> None:
    """ConfigError unless ``text`` is text: valid UTF-8 (no bytes the terminal could not decode) and
    no control characters but tab and newline (binary data)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} is not valid UTF-8 text") from None
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"), None)
    if bad is not None:
        raise ConfigError(f"{what} holds the control character {bad!r}: binary data, not text")


def _literal(text: str) -> str:
    return text.replace("\\|", "|")


def prompt_schedule(prompt: str, frames: int, causal: bool = True) -> list[tuple[int, str]]:
    """``'text A | 240: text B'`` -> ``[(0, 'text A'), (240, 'text B')]``: prompts by starting output frame.

    A plain prompt is a schedule of one entry. ``\\|`` is a literal ``|`` in either mode. Schedules
    are causal mode's: with ``causal`` false, a ``|`` is an error that says so.
    """
    check_text(prompt, "sampling.prompt")
    parts = [p.strip() for p in _SCHEDULE_BAR.split(prompt)]
    if len(parts) == 1:
        return [(0, _literal(prompt))]
    if not causal:
        raise ConfigError("a prompt schedule ('text | FRAME: text') needs --mode causal; "
                          "write \\| for a literal '|' in a prompt")
    out = [(0, _literal(parts[0]))]
    for part in parts[1:]:
        head, colon, text = part.partition(":")
        if not colon or not _FRAME.fullmatch(head.strip()) or not text.strip():
            raise ConfigError(f"prompt schedule: expected 'FRAME: text' after '|' (FRAME in digits 0-9), got "
                              f"'{part}'; write \\| for a literal '|'")
        start = int(head)
        if start <= out[-1][0] or start >= frames:
            raise ConfigError(f"prompt schedule: start frame {start} must increase and be < {frames} frames")
        out.append((start, _literal(text.strip())))
    if not out[0][1]:
        raise ConfigError("prompt schedule: the first prompt is empty")
    return out


def resolve_budget(budget: float, total_frames: int) -> int:
    """A KV budget in frames: ``budget`` >= 1 counts frames (a whole number), 0 < ``budget`` < 1 is a
    fraction of the video's ``total_frames`` latent frames (at least one frame); ValueError otherwise."""
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a finite number > 0, got {budget}")
    if budget < 1:
        return max(1, math.ceil(budget * total_frames))
    if budget != int(budget):
        raise ValueError(f"a budget of 1 or more counts frames and must be a whole number, got {budget}")
    return int(budget)


def choices(key: str) -> tuple:
    """The allowed values of the enumerated config key ``section.key`` (its field's Literal type);
    ``()`` for a key that is not enumerated."""
    return _CHOICES.get(key, ())


def _check_choices(section) -> None:
    """ConfigError unless every enumerated key of the config section ``section`` holds an allowed value."""
    name = _SECTION_NAMES[type(section)]
    for f in dataclasses.fields(section):
        allowed, val = choices(f"{name}.{f.name}"), getattr(section, f.name)
        if allowed and val not in allowed:
            raise ConfigError(f"{name}.{f.name} must be one of {allowed}, got '{val}'")


def _check_finite(section) -> None:
    """ConfigError for a NaN or infinite value in any float key of the config section ``section``."""
    name = _SECTION_NAMES[type(section)]
    for f in dataclasses.fields(section):
        val = getattr(section, f.name)
        if _FIELD_TYPES[(name, f.name)] is float and not math.isfinite(val):
            raise ConfigError(f"{name}.{f.name} must be a finite number, got {val}")


_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
_SECTION_NAMES: dict[type, str] = {cls: name for name, cls in get_type_hints(Config).items()}
_FIELD_TYPES: dict[tuple[str, str], type] = {}
_CHOICES: dict[str, tuple] = {}
for _cls, _sec in _SECTION_NAMES.items():
    for _key, _hint in get_type_hints(_cls).items():
        if get_origin(_hint) is Literal:
            _CHOICES[f"{_sec}.{_key}"] = get_args(_hint)
            _hint = type(get_args(_hint)[0])
        _FIELD_TYPES[(_sec, _key)] = _hint


def model_defaults(m: ModelConfig) -> tuple[dict, str]:
    """The sections a model folder sets by default (its ``MODEL_DEFAULTS`` file) and the file's path;
    ``({}, "")`` for none."""
    if not m.folder:
        return {}, ""
    path = Path(m.folder) / MODEL_DEFAULTS
    if not path.is_file():
        return {}, ""
    try:
        return json.loads(path.read_text()), str(path)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def apply_model_defaults(cfg: Config) -> Config:
    """Set ``cfg``'s model folder's own defaults on it (as the command line does before the user's
    values): for configs built in code, e.g. references, to match what a run of that model uses."""
    defaults, source = model_defaults(cfg.model)
    cfg.update(defaults, source=source)
    return cfg


def load_config(path: str | None, base: Config | None = None) -> Config:
    """Read a YAML config file over ``base`` (default: the defaults); no file: ``base``."""
    cfg = base if base is not None else Config()
    if path is None:
        return cfg
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {what}") from None
    cfg.update(data or {}, source=str(path))
    return cfg
