#!/usr/bin/env python
"""One command that checks the GPU path and measures its stage times, in minutes on one GPU.

    python scripts/gpu_check.py                       # CUDA if available, full shapes
    python scripts/gpu_check.py --device cpu --quick  # the same checks at tiny shapes (what the tests run)

Writes ``DIR/gpu_check.json`` (rewritten after every section, so a run cut short
still leaves what it measured) and ``DIR/gpu_check.md`` (one table per section,
for BENCHMARKS.md's "GPU" section); ``DIR`` is ``--out``, else ``$OUT/gpu_check``
when ``$OUT`` is set, else ``outputs/gpu_check``. Sections:

1. ``versions``: python, torch, CUDA runtime, cuDNN, GPU, diffusers, transformers,
   PyAV, and which attention backends can run here.
2. ``tiny``: the tiny preset through ``dualpar.job.Job`` on the device in fp32 and
   bf16, bidirectional and causal; the MP4's frame count against the manifest; fp32
   latents against a CPU run (<= 1e-4); bf16 against fp32 (information only).
3. ``two_ranks_one_gpu``: ``torchrun`` with 2 ranks (gloo, both on the one device)
   against the 1-rank runs of section 2 (<= 1e-5).
4. ``wan13b``: Wan2.1-1.3B shapes with random weights (30 layers, bf16) at 480x832:
   time per block step and per layer (CUDA events) for a first block, a steady block
   with context and a block without neighbour K/V; peak memory; no host sync inside
   the layer stack (``torch.cuda.set_sync_debug_mode("error")``); the attention
   kernels that ran; the CFG rows one after the other (``cfg_serial``); embedding,
   head and one UniPC step.
5. ``wan14b_layer``: one Wan2.1-14B layer at 720x1280, scaled to a rank's 5 layers
   (40 layers on 8 ranks).
6. ``vae``: Wan2.1's VAE (random weights, fp32) through ``StreamingDecoder``: time
   per block of 8 latent frames at 480p and 720p.
7. ``projection``: the simulator (scripts/simulate.py) calibrated from section 4's
   stage times, projecting 1025 frames on 1 and 8 GPUs. A projection from measured
   single-GPU stage times, not a multi-GPU measurement.

Each section catches its own failure (recorded as ``{"error": ...}``) and the next
one runs; the exit status is 1 when any section failed or any check did not pass.
``--quick`` uses the tiny preset's model sizes at tiny shapes throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

T0 = time.perf_counter()

# -- model sizes and shapes ----------------------------------------------------------------------

WAN13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN14B = dict(WAN13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
LIMIT_DEVICE_VS_CPU = 1e-4
LIMIT_RANKS = 1e-5
LINK = dict(name="NVLink-class", latency_s=10e-6, bandwidth=300e9)
ATTN_KERNEL = re.compile(r"attention|attn|flash|fmha|cudnn|sdpa", re.I)


def _tiny_sizes():
    from dualpar.models.tiny import TINY_TRANSFORMER, TINY_VAE

    return TINY_TRANSFORMER, TINY_VAE


def settings(quick: bool) -> dict:
    """Every shape the sections use: real Wan2.1 sizes, or the tiny preset's at tiny shapes (``--quick``)."""
    tiny = dict(frames=89, height=32, width=48, block=4, num_cat=2, steps=4, text_len=32)
    if not quick:
        return dict(
            tiny=tiny,
            wan13b=dict(name="Wan2.1-1.3B", config=WAN13B, pixels=(480, 832), own=8, context=8, extra=8, keep=8,
                        text_len=512, reps=3, dtype="bfloat16", sched_frames=8),
            wan14b=dict(name="Wan2.1-14B", config=dict(WAN14B, num_layers=1), layers_total=40, ranks=8,
                        pixels=(720, 1280), own=8, context=8, extra=8, keep=8, text_len=512, reps=3,
                        dtype="bfloat16"),
            vae=dict(name="Wan2.1 VAE (default AutoencoderKLWan)", config={},
                     sizes=[("480p", 60, 104), ("720p", 90, 160)], block=8, reps=2),
            projection=dict(frames=1025, steps=50, block=8, num_cat=8, ranks=8, num_layers=30, pixels=(480, 832),
                            model="Wan2.1-1.3B 480x832"),
        )
    tt, tv = _tiny_sizes()
    return dict(
        tiny=dict(tiny, frames=49),
        wan13b=dict(name="tiny preset", config=dict(tt), pixels=(64, 64), own=4, context=4, extra=4, keep=4,
                    text_len=32, reps=3, dtype="bfloat16", sched_frames=4),
        wan14b=dict(name="the tiny preset", config=dict(tt, num_layers=1), layers_total=40, ranks=8,
                    pixels=(64, 96), own=4, context=4, extra=4, keep=4, text_len=32, reps=1, dtype="bfloat16"),
        vae=dict(name="tiny preset VAE", config=dict(tv), sizes=[("32x48", 4, 6), ("48x64", 6, 8)], block=4, reps=1),
        projection=dict(frames=1025, steps=50, block=4, num_cat=4, ranks=8, num_layers=tt["num_layers"],
                        pixels=(64, 64), model="tiny preset 64x64"),
    )


# -- helpers -------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def time_calls(fn, reps: int, dev: torch.device, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events on CUDA, perf_counter on CPU."""
    for _ in range(warmup):
        out = fn()
        del out
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        del out
    return times


def host_time(fn, dev: torch.device) -> float:
    """Wall seconds of one call, device work included (synchronised before and after)."""
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    dt = time.perf_counter() - t
    del out
    return dt


def measure_once(fn, dev: torch.device, sync_check: bool) -> dict:
    """One call of ``fn``: peak memory over what was live before it (CUDA), and whether a host sync
    happened inside it (``set_sync_debug_mode("error")``; CUDA only)."""
    out = {}
    if dev.type != "cuda":
        res = fn()
        del res
        out["sync_debug"] = "n/a on cpu" if sync_check else None
        out["activations_bytes"] = out["peak_bytes"] = None
        return out
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        res = fn()
        del res
        out["sync_debug"] = "passed" if sync_check else None
    except RuntimeError as e:
        if not (sync_check and "synchroniz" in str(e).lower()):
            raise
        out["sync_debug"] = f"raised: {str(e).splitlines()[0][:300]}"
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    out["activations_bytes"] = peak - base
    out["peak_bytes"] = peak
    return out


def attention_kernels(fn, dev: torch.device) -> dict:
    """Names (and call counts) of the kernels and ops of one call of ``fn`` that look like attention."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        res = fn()
        sync(dev)
    del res
    kernels, ops = {}, {}
    for e in prof.key_averages():
        name = e.key
        on_device = "CUDA" in str(getattr(e, "device_type", "")) or "cuda" in str(getattr(e, "device_type", ""))
        if on_device and ATTN_KERNEL.search(name):
            kernels[name[:160]] = kernels.get(name[:160], 0) + e.count
        elif not on_device and re.search(r"scaled_dot_product|attention|flash", name, re.I):
            ops[name[:160]] = ops.get(name[:160], 0) + e.count
    if dev.type != "cuda":
        kernels = dict(ops)  # on CPU the ATen ops are the kernels
    return {"kernels": kernels, "ops": ops}


def load_simulator():
    spec = importlib.util.spec_from_file_location("dualpar_simulate", os.path.join(ROOT, "scripts", "simulate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def version_of(dist: str, module: str | None = None) -> str:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        pass
    try:
        mod = __import__(module or dist)
        return str(getattr(mod, "__version__", "installed"))
    except Exception:
        return "missing"


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return out + [""]


@contextlib.contextmanager
def logged_stderr(path: str):
    """Engine logs (``[rank 0] ...``) of a section go to ``path``, not the console."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stderr(f):
        yield


def tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# -- the report ----------------------------------------------------------------------------------


class Report:
    def __init__(self, out: str, args, device: torch.device):
        self.out, self.device = out, device
        os.makedirs(out, exist_ok=True)
        self.data = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                     "device": str(device), "device_name": device_name(device), "quick": bool(args.quick),
                     "sections": {}, "failed": [], "status": "running"}

    def section(self, name: str) -> dict:
        res = {}
        self.data["sections"][name] = res
        return res

    def write(self) -> None:
        self._atomic("gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")
        self._atomic("gpu_check.md", markdown(self.data))

    def _atomic(self, name: str, text: str) -> None:
        path = os.path.join(self.out, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def failed_checks(res: dict) -> list[str]:
    return [k for k, v in res.get("checks", {}).items() if not v.get("pass")]


# -- 1. versions ---------------------------------------------------------------------------------


def sec_versions(res: dict, ctx: dict) -> None:
    dev = ctx["device"]
    res["python"] = platform.python_version()
    res["platform"] = platform.platform()
    res["torch"] = torch.__version__
    res["cuda_runtime"] = torch.version.cuda or "none"
    res["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    res["cuda_available"] = torch.cuda.is_available()
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        res["gpu"] = p.name
        res["gpu_memory_gb"] = round(p.total_memory / 1e9, 1)
        res["compute_capability"] = f"{p.major}.{p.minor}"
        res["gpus_visible"] = torch.cuda.device_count()
        for key, get in (("tf32_matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
                         ("tf32_cudnn", lambda: torch.backends.cudnn.allow_tf32)):
            try:
                res[key] = get()
            except Exception as e:  # the flags' API moves between torch versions
                res[key] = f"unknown ({type(e).__name__})"
    else:
        res["gpu"] = "none"
    res["cpu_cores"] = os.cpu_count()
    for dist, mod in (("diffusers", None), ("transformers", None), ("av", None), ("safetensors", None),
                      ("numpy", None), ("flash-attn", "flash_attn"), ("sageattention", None), ("ray", None)):
        res[dist] = version_of(dist, mod)
    from dualpar.models import attention

    res["attention"] = attention.available(dev.type)


def md_versions(res: dict) -> list[str]:
    rows = [[k, v] for k, v in res.items() if k not in ("attention", "error", "traceback", "elapsed_s")]
    out = table(["what", "version / value"], rows)
    if "attention" in res:
        out += ["Attention backends (`model.attention`):", ""]
        out += table(["backend", "status"], [[k, v] for k, v in res["attention"].items()])
    return out


# -- 2. the tiny preset through Job --------------------------------------------------------------


def tiny_config(g: dict, mode: str, dtype: str, out: str, decode: bool = True):
    from dualpar.config import Config, apply_model_defaults

    cfg = apply_model_defaults(Config())  # as launch/gen.py's 2 ranks (compared with this) see the preset
    for k, v in {"video.frames": g["frames"], "video.height": g["height"], "video.width": g["width"],
                 "parallel.block": g["block"], "parallel.num_cat": g["num_cat"], "sampling.steps": g["steps"],
                 "model.text_len": g["text_len"], "model.dtype": dtype, "sampling.mode": mode,
                 "output.out": out, "output.progress": False, "output.decode": decode}.items():
        cfg.set(k, v, source="gpu_check")
    if mode == "causal":
        cfg.set("causal.policy", "window", source="gpu_check")
        cfg.set("causal.budget", 6.0, source="gpu_check")
        cfg.set("causal.sink", 1, source="gpu_check")
    cfg.validate()
    return cfg


def tiny_flags(g: dict, mode: str) -> list[str]:
    """The launch/gen.py options of :func:`tiny_config` (fp32)."""
    flags = ["--frames", str(g["frames"]), "--height", str(g["height"]), "--width", str(g["width"]),
             "--block", str(g["block"]), "--num-cat", str(g["num_cat"]), "--steps", str(g["steps"]),
             "--set", f"model.text_len={g['text_len']}", "--no-progress"]
    if mode == "causal":
        flags += ["--mode", "causal", "--policy", "window", "--budget", "6", "--set", "causal.sink=1"]
    return flags


def run_job(cfg, device: str, log_path: str) -> tuple[float, float]:
    """One video with the in-process :class:`dualpar.job.Job` (world size 1: no process group);
    seconds to build the job (the model's slice) and to generate (text encoder, loop, VAE, MP4)."""
    from dualpar.job import Job

    with logged_stderr(log_path):
        t = time.perf_counter()
        job = Job(cfg, device=device)
        built = time.perf_counter() - t
        ok = False
        try:
            job.generate(cfg, overwrite=True)
            ok = True
        finally:
            job.close(abort=not ok)
        return built, time.perf_counter() - t - built


def read_latents(out: str) -> tuple[dict, torch.Tensor]:
    from safetensors.torch import load_file

    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    if man["status"] != "complete":
        raise RuntimeError(f"{out}: run status {man['status']} ({man.get('reason')})")
    lat = torch.cat([load_file(os.path.join(out, b["latents"]))["latents"].float() for b in man["blocks"]], dim=2)
    return man, lat


def mp4_frames(path: str):
    try:
        import av
    except ImportError:
        return "skipped: PyAV missing"
    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def sec_tiny(res: dict, ctx: dict) -> None:
    g, dev, base = ctx["settings"]["tiny"], ctx["device"], ctx["out"]
    devname = str(dev)
    res["geometry"] = dict(g)
    res["runs"], res["checks"], res["info"] = [], {}, {}
    logs = os.path.join(base, "logs", "tiny.log")
    res["log"] = logs
    lat = {}
    for mode in ("bidirectional", "causal"):
        for dtype in ("float32", "bfloat16"):
            out = os.path.join(base, f"tiny-{mode}-{dtype}")
            say(f"  tiny: {mode} {dtype} on {devname}")
            build, wall = run_job(tiny_config(g, mode, dtype, out, decode=ctx["av"]), devname, logs)
            man, lat[(mode, dtype)] = read_latents(out)
            frames = man["frames_written"]
            n = mp4_frames(os.path.join(out, "video.mp4")) if ctx["av"] else "skipped: PyAV missing"
            row = dict(mode=mode, dtype=dtype, device=devname, build_s=build, wall_s=wall, frames=frames,
                       frames_total=man["frames_total"], mp4_frames=n, out=out)
            res["runs"].append(row)
            if not isinstance(n, str):
                res["checks"][f"MP4 frames = manifest frames, {mode} {dtype}"] = {
                    "value": n, "expected": frames, "pass": n == frames == g["frames"]}
            ctx.setdefault("one_rank", {})[mode] = os.path.join(base, f"tiny-{mode}-float32")
            ctx.setdefault("one_rank_latents", {})[mode] = lat[(mode, "float32")]
            res.setdefault("_progress", []).append(f"{mode} {dtype}")
            ctx["report"].write()
        # fp32 on the device against a CPU run of the same config (latents only)
        out = os.path.join(base, f"tiny-{mode}-float32-cpu")
        say(f"  tiny: {mode} float32 on cpu (reference)")
        _, wall = run_job(tiny_config(g, mode, "float32", out, decode=False), "cpu", logs)
        _, ref = read_latents(out)
        diff = (lat[(mode, "float32")] - ref).abs().max().item()
        res["checks"][f"fp32 {devname} vs cpu, {mode}"] = {"value": diff, "limit": LIMIT_DEVICE_VS_CPU,
                                                            "pass": diff <= LIMIT_DEVICE_VS_CPU,
                                                            "cpu_wall_s": wall}
        res["info"][f"bf16 vs fp32, {mode}"] = (lat[(mode, "bfloat16")] - lat[(mode, "float32")]).abs().max().item()
        ctx["report"].write()
    res.pop("_progress", None)


def md_tiny(res: dict) -> list[str]:
    out = []
    if "geometry" in res:
        g = res["geometry"]
        out += [f"{g['frames']} frames at {g['height']}x{g['width']}, block {g['block']}, num_cat {g['num_cat']}, "
                f"{g['steps']} steps, text_len {g['text_len']}; causal: window policy, budget 6, sink 1.", ""]
    out += table(["mode", "dtype", "device", "Job build s", "generate s", "frames (manifest)", "MP4 frames"],
                 [[r["mode"], r["dtype"], r["device"], f"{r['build_s']:.1f}", f"{r['wall_s']:.1f}", r["frames"],
                   r["mp4_frames"]]
                  for r in res.get("runs", [])])
    out += md_checks(res)
    if res.get("info"):
        out += table(["information", "max abs diff"], [[k, f"{v:.3g}"] for k, v in res["info"].items()])
    return out


def md_checks(res: dict) -> list[str]:
    rows = []
    for k, v in res.get("checks", {}).items():
        val = v.get("value")
        lim = v.get("limit", v.get("expected", ""))
        rows.append([k, f"{val:.3g}" if isinstance(val, float) else val, lim, "pass" if v.get("pass") else "FAIL"])
    return table(["check", "value", "limit / expected", "result"], rows) if rows else []


# -- 3. two ranks on the one device --------------------------------------------------------------


def one_rank(ctx: dict, mode: str) -> torch.Tensor:
    """Section 2's fp32 1-rank latents on the device (run now if section 2 did not get there)."""
    have = ctx.get("one_rank_latents", {})
    if mode in have:
        return have[mode]
    out = os.path.join(ctx["out"], f"tiny-{mode}-float32-1rank")
    run_job(tiny_config(ctx["settings"]["tiny"], mode, "float32", out, decode=False), str(ctx["device"]),
            os.path.join(ctx["out"], "logs", "two_ranks_one_gpu.log"))
    return read_latents(out)[1]


def sec_two_ranks(res: dict, ctx: dict) -> None:
    g, dev, base = ctx["settings"]["tiny"], ctx["device"], ctx["out"]
    res["runs"], res["checks"] = [], {}
    timeout = 150 if dev.type == "cuda" else 180
    for mode in ("bidirectional", "causal"):
        ref = one_rank(ctx, mode)
        out = os.path.join(base, f"tiny-{mode}-float32-2ranks")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "launch", "gen.py"), *tiny_flags(g, mode), "--set", "parallel.backend=gloo",
               "--no-decode", "--overwrite", "--out", out]
        if dev.type == "cuda":
            cmd += ["--device", "cuda"]
        log_path = os.path.join(base, "logs", f"two_ranks_{mode}.log")
        say(f"  two ranks: {mode}: {' '.join(os.path.basename(c) if i < 2 else c for i, c in enumerate(cmd))}")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t = time.perf_counter()
        with open(log_path, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun ({mode}) exited with {proc.returncode}: {tail(log_path, 1500)}")
        man, lat = read_latents(out)
        if lat.shape != ref.shape:
            raise RuntimeError(f"{mode}: 2-rank latents {tuple(lat.shape)} vs 1-rank {tuple(ref.shape)}")
        diff = (lat - ref).abs().max().item()
        res["runs"].append(dict(mode=mode, wall_s=wall, blocks=man["blocks_written"], out=out, log=log_path,
                                world_size=2, backend="gloo", device=str(dev)))
        res["checks"][f"2 ranks vs 1 rank, {mode}"] = {"value": diff, "limit": LIMIT_RANKS, "pass": diff <= LIMIT_RANKS}
        ctx["report"].write()


def md_two_ranks(res: dict) -> list[str]:
    out = table(["mode", "ranks", "backend", "device", "wall s (torchrun, incl. start-up)", "blocks"],
                [[r["mode"], r["world_size"], r["backend"], r["device"], f"{r['wall_s']:.1f}", r["blocks"]]
                 for r in res.get("runs", [])])
    return out + md_checks(res)


# -- 4./5. Wan2.1 transformer shapes with random weights -----------------------------------------


@torch.no_grad()
def random_transformer(config: dict, dev: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``WanTransformer3DModel`` of ``config`` with random weights, built on the meta device and
    materialised on ``dev`` (seconds, even for 14B sizes); fp32 where diffusers keeps fp32."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from dualpar.models.weights import keep_fp32_names

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model.to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    keep = keep_fp32_names()
    for name, p in model.named_parameters():
        leaf = name.split(".")[-2] if "." in name else name
        if name.endswith("scale_shift_table"):
            p.normal_(0.0, dim ** -0.5, generator=gen)
        elif "norm" in leaf and name.endswith(".weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02, generator=gen)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.normal_(0.0, fan_in ** -0.5, generator=gen)
        if dtype != torch.float32 and not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    r = model.rope  # its tables are buffers computed at init: rebuild them (to_empty left them garbage)
    model.rope = WanRotaryPosEmbed(r.attention_head_dim, r.patch_size, r.max_seq_len).to(dev)
    return model.eval().requires_grad_(False)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Bench:
    """A WanSlice with random text context, packets and neighbour K/V for given block shapes."""

    def __init__(self, model, s: dict, dev: torch.device):
        from dualpar.models import attention
        from dualpar.models.wan import WanSlice

        self.dev, self.s = dev, s
        self.slice = WanSlice(model, 0, len(model.blocks))
        self.slice.attention = attention.backend("native")
        self.L = len(self.slice.layers)
        self.dim = self.slice.dim
        self.lat_h, self.lat_w = s["pixels"][0] // 8, s["pixels"][1] // 8
        self.tpf = self.slice.tokens_per_frame(self.lat_h, self.lat_w)
        dt = self.slice.dtype
        g = torch.Generator(device=dev).manual_seed(1)
        self.dtype = dt
        self.text = torch.randn(2, s["text_len"], self.dim, dtype=dt, device=dev, generator=g)
        self.slice.set_text(self.text)
        self.gen = g
        self._extra: dict[int, list] = {}

    def shape(self, context: int, extra: int):
        from dualpar.models.wan import BlockShape

        return BlockShape(context=context, own=self.s["own"], extra=extra, keep=self.s["keep"],
                          height=self.lat_h, width=self.lat_w)

    def packet(self, shape):
        lat = torch.randn(1, 16, shape.frames, self.lat_h, self.lat_w, device=self.dev, generator=self.gen)
        return self.slice.embed(lat, torch.tensor(500.0, device=self.dev), batch=2)

    def extra(self, frames: int):
        """Per layer (k, v) [2, frames*tpf, dim], as the feature cache would hand them over."""
        if frames == 0:
            return None
        if frames not in self._extra:
            n = frames * self.tpf
            self._extra[frames] = [
                (torch.randn(2, n, self.dim, dtype=self.dtype, device=self.dev, generator=self.gen),
                 torch.randn(2, n, self.dim, dtype=self.dtype, device=self.dev, generator=self.gen))
                for _ in range(self.L)]
        return self._extra[frames]

    def call(self, packet, shape):
        ex = self.extra(shape.extra)
        return lambda: self.slice.forward_layers(packet, shape, list(ex) if ex is not None else None)

    def input_bytes(self, shape) -> dict:
        el = torch.empty((), dtype=self.dtype).element_size()
        return {"feature_cache_bytes": 2 * self.L * 2 * shape.extra * self.tpf * self.dim * el,
                "text_kv_bytes": 2 * self.L * 2 * self.s["text_len"] * self.dim * el,
                "packet_bytes": 2 * (shape.frames * self.tpf + 7) * self.dim * el}


def measure_shape(b: Bench, name: str, context: int, extra: int, reps: int, sync_check: bool = True) -> dict:
    shape = b.shape(context, extra)
    packet = b.packet(shape)
    fn = b.call(packet, shape)
    times = time_calls(fn, reps, b.dev)
    once = measure_once(fn, b.dev, sync_check)
    nq = shape.frames * b.tpf
    row = dict(shape=name, context=shape.context, own=shape.own, extra=shape.extra, keep=shape.keep,
               nq=nq, nkv=nq + shape.extra * b.tpf, times_s=times, block_step_s=median(times),
               per_layer_s=median(times) / b.L, **once, **b.input_bytes(shape))
    del packet, fn
    return row


def memory_model_estimate(sim, b: Bench, cfg: dict, row: dict) -> dict | None:
    """scripts/simulate.py's per-rank memory model for the same task, if that function is there."""
    if not hasattr(sim, "memory_model"):
        return None
    try:
        dim, ffn = b.dim, cfg["ffn_dim"]
        m = sim.memory_model(dim=dim, ffn=ffn, heads=cfg["num_attention_heads"], layers_on_rank=b.L,
                             params_per_layer=sim.layer_params(dim, ffn), tpf=b.tpf,
                             frames=row["context"] + row["own"], extra=row["extra"], num_cat=row["keep"], batch=2,
                             text_len=b.s["text_len"], bytes_per_el=torch.empty((), dtype=b.dtype).element_size(),
                             keep=row["keep"], role="middle")
        return {k: m[k] for k in ("activations", "peak_at") if k in m}
    except Exception as e:  # the model's signature may move; this is information only
        return {"error": f"{type(e).__name__}: {e}"}


def build_bench(res: dict, s: dict, dev: torch.device) -> "Bench":
    """The section's random-weight model on the device, wrapped for timing; records what it built."""
    res["model"], res["dtype"], res["pixels"] = s["name"], s["dtype"], list(s["pixels"])
    t = time.perf_counter()
    model = random_transformer(s["config"], dev, getattr(torch, s["dtype"]))
    sync(dev)
    res["build_s"] = time.perf_counter() - t
    return Bench(model, s, dev)


@torch.no_grad()
def sec_wan13b(res: dict, ctx: dict) -> None:
    s, dev = ctx["settings"]["wan13b"], ctx["device"]
    b = build_bench(res, s, dev)
    res["layers"], res["tokens_per_frame"], res["dim"] = b.L, b.tpf, b.dim
    res["weights_bytes"] = param_bytes(b.slice)
    res["layer_weights_bytes"] = param_bytes(b.slice.layers[0])
    res["shapes"] = []
    say(f"  wan13b: built {b.L} layers in {res['build_s']:.1f} s, weights {gb(res['weights_bytes'])} GB")
    for name, c, e in (("first block", 0, s["extra"]), ("steady block", s["context"], s["extra"]),
                       ("no neighbour K/V", 0, 0)):
        row = measure_shape(b, name, c, e, s["reps"])
        res["shapes"].append(row)
        say(f"  wan13b: {name}: {ms(row['block_step_s'])} ms per block step, sync check {row['sync_debug']}")
        ctx["report"].write()
    steady = res["shapes"][1]
    sim = ctx.get("sim")
    est = memory_model_estimate(sim, b, s["config"], steady) if sim is not None else None
    if est is not None:
        res["memory_model_steady"] = est
    # attention kernels of one steady call
    shape = b.shape(s["context"], s["extra"])
    packet = b.packet(shape)
    try:
        res["attention"] = attention_kernels(b.call(packet, shape), dev)
    except Exception as e:  # a profiler without CUPTI should not hide the timings
        res["attention"] = {"error": f"{type(e).__name__}: {e}"}
    # CFG rows one after the other
    b.slice.cfg_serial = True
    try:
        serial = measure_shape(b, "steady block, cfg_serial", s["context"], s["extra"], s["reps"], sync_check=False)
    finally:
        b.slice.cfg_serial = False
    serial["time_ratio"] = serial["block_step_s"] / steady["block_step_s"]
    if serial["activations_bytes"] is not None and steady["activations_bytes"]:
        serial["activations_ratio"] = serial["activations_bytes"] / steady["activations_bytes"]
        serial["peak_ratio"] = serial["peak_bytes"] / steady["peak_bytes"]
    res["cfg_serial"] = serial
    ctx["report"].write()
    # rank 0's and the last rank's fixed costs: embedding, head (+ CFG), one UniPC step
    lat = torch.randn(1, 16, shape.frames, b.lat_h, b.lat_w, device=dev)
    ts = torch.tensor(500.0, device=dev)
    res["embed_s"] = median(time_calls(lambda: b.slice.embed(lat, ts, batch=2), max(s["reps"], 2), dev))
    res["head_s"] = median(time_calls(lambda: b.slice.head(packet, shape, 5.0), max(s["reps"], 2), dev))
    res["sched_step_s"], res["sched_note"] = unipc_step(dev, s["sched_frames"], b.lat_h, b.lat_w)
    res["checks"] = {}
    for row in res["shapes"]:
        if dev.type == "cuda":
            res["checks"][f"no host sync in the layer stack, {row['shape']}"] = {
                "value": row["sync_debug"], "pass": row["sync_debug"] == "passed"}
        res["checks"][f"timing positive, {row['shape']}"] = {"value": row["block_step_s"], "limit": "> 0",
                                                              "pass": row["block_step_s"] > 0}
    ctx["stage_times"] = res
    del b, packet, lat
    free(dev)


def unipc_step(dev: torch.device, frames: int, h: int, w: int) -> tuple[float, str]:
    """Seconds of one UniPC (flow, 50 steps) scheduler step on a block's float32 latents (median of steps 1-3)."""
    from dualpar.config import Config
    from dualpar.models import loader

    cfg = Config()
    cfg.set("sampling.steps", 50)
    sched = loader.make_scheduler(cfg, dev)
    x = torch.randn(1, 16, frames, h, w, device=dev)
    times = []
    for i in range(4):
        pred = torch.randn_like(x)
        sync(dev)
        t = time.perf_counter()
        x = sched.step(pred, sched.timesteps[i], x, return_dict=False)[0]
        sync(dev)
        times.append(time.perf_counter() - t)
    return median(times[1:]), f"UniPC step on [1, 16, {frames}, {h}, {w}] fp32, host wall time, median of steps 1-3"


def md_wan13b(res: dict) -> list[str]:
    out = []
    if "model" in res:
        out += [f"{res['model']} shapes, random weights, {res.get('layers', '?')} layers, {res['dtype']}, "
                f"{res['pixels'][0]}x{res['pixels'][1]} ({res.get('tokens_per_frame', '?')} tokens per latent frame), "
                f"CFG batch 2, attention `native`; weights {gb(res.get('weights_bytes'))} GB; built in "
                f"{res.get('build_s', 0):.1f} s. Activations = peak during the call over what was live before it "
                "(weights, packet, neighbour K/V, text K/V).", ""]
    rows = [[r["shape"], r["context"], r["own"], r["extra"], r["nq"], r["nkv"], ms(r["block_step_s"]),
             ms(r["per_layer_s"]), gb(r["activations_bytes"]), gb(r["peak_bytes"]), r["sync_debug"]]
            for r in res.get("shapes", [])]
    if "cfg_serial" in res:
        r = res["cfg_serial"]
        rows.append([r["shape"], r["context"], r["own"], r["extra"], r["nq"], r["nkv"], ms(r["block_step_s"]),
                     ms(r["per_layer_s"]), gb(r["activations_bytes"]), gb(r["peak_bytes"]), "-"])
    out += table(["shape", "context", "own", "extra", "Nq", "Nkv", "ms / block step", "ms / layer",
                  "activations GB", "peak GB", "host sync check"], rows)
    if "cfg_serial" in res:
        r = res["cfg_serial"]
        extra = (f", activations x{r['activations_ratio']:.2f}, peak x{r['peak_ratio']:.2f}"
                 if "activations_ratio" in r else "")
        out += [f"CFG rows one after the other (`cfg_serial`) vs batched: time x{r['time_ratio']:.2f}{extra}.", ""]
    if "embed_s" in res:
        out += [f"Fixed costs: embedding {ms(res['embed_s'])} ms, head + CFG {ms(res['head_s'])} ms, "
                f"scheduler step {ms(res['sched_step_s'])} ms ({res['sched_note']}).", ""]
    if "memory_model_steady" in res:
        m = res["memory_model_steady"]
        if "activations" in m:
            out += [f"scripts/simulate.py memory_model, steady block: activations {gb(m['activations'])} GB "
                    f"(peak at {m.get('peak_at')}).", ""]
    att = res.get("attention")
    if att:
        if "error" in att:
            out += [f"Attention kernels: profiler failed ({att['error']}).", ""]
        else:
            out += table(["attention kernel that ran (steady block)", "calls"],
                         [[f"`{k}`", v] for k, v in att["kernels"].items()] or [["(none matched)", 0]])
    return out + md_checks(res)


@torch.no_grad()
def sec_wan14b(res: dict, ctx: dict) -> None:
    from dualpar.schedule import split_layers

    s, dev = ctx["settings"]["wan14b"], ctx["device"]
    b = build_bench(res, s, dev)
    res["tokens_per_frame"] = b.tpf
    res["layer_weights_bytes"] = param_bytes(b.slice.layers[0])
    row = measure_shape(b, "steady block", s["context"], s["extra"], s["reps"])
    res["layer"] = row
    n = max(hi - lo for lo, hi in split_layers(s["layers_total"], s["ranks"]))
    res["rank_layers"] = n
    res["ranks"], res["layers_total"] = s["ranks"], s["layers_total"]
    res["rank_time_s"] = n * row["per_layer_s"]
    if row["activations_bytes"] is not None:
        res["rank_memory_bytes"] = n * res["layer_weights_bytes"] + row["activations_bytes"]
        res["rank_memory_with_caches_bytes"] = res["rank_memory_bytes"] + n * (
            row["feature_cache_bytes"] + row["text_kv_bytes"])
    else:
        res["rank_memory_bytes"] = res["rank_memory_with_caches_bytes"] = None
    res["checks"] = {"timing positive": {"value": row["per_layer_s"], "limit": "> 0", "pass": row["per_layer_s"] > 0}}
    if dev.type == "cuda":
        res["checks"]["no host sync in the layer"] = {"value": row["sync_debug"], "pass": row["sync_debug"] == "passed"}
    del b
    free(dev)


def md_wan14b(res: dict) -> list[str]:
    if "layer" not in res:
        return []
    r = res["layer"]
    out = [f"One layer of {res['model']}, random weights, {res['dtype']}, {res['pixels'][0]}x{res['pixels'][1]} "
           f"({res['tokens_per_frame']} tokens per latent frame), steady block (context {r['context']} + own "
           f"{r['own']}, extra {r['extra']}), CFG batch 2. Scaled to a rank's {res['rank_layers']} layers "
           f"({res['layers_total']} layers on {res['ranks']} ranks): time x{res['rank_layers']}; memory = weights "
           f"x{res['rank_layers']} + the one-layer activation peak (+ feature cache and text K/V x"
           f"{res['rank_layers']} in the last column).", ""]
    out += table(["ms / layer", "layer weights GB", "activations GB", "rank: s / block step", "rank: GB",
                  "rank: GB incl. caches"],
                 [[ms(r["per_layer_s"]), gb(res["layer_weights_bytes"]), gb(r["activations_bytes"]),
                   f"{res['rank_time_s']:.3f}", gb(res["rank_memory_bytes"]), gb(res["rank_memory_with_caches_bytes"])]])
    return out + md_checks(res)


# -- 6. VAE ----------------------------------------------------------------------------------------


@torch.no_grad()
def sec_vae(res: dict, ctx: dict) -> None:
    from diffusers import AutoencoderKLWan

    from dualpar.output.decode import StreamingDecoder

    s, dev = ctx["settings"]["vae"], ctx["device"]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as Job sets it: fixed shapes per block
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        vae = AutoencoderKLWan(**s["config"])
    vae = vae.eval().requires_grad_(False)
    sync(dev)
    res["model"], res["build_s"], res["weights_bytes"] = s["name"], time.perf_counter() - t, param_bytes(vae)
    res["sizes"], res["checks"] = [], {}
    for name, h, w in s["sizes"]:
        dec = StreamingDecoder(vae)
        first = torch.randn(1, 16, 1, h, w, device=dev)
        t_first = host_time(lambda: dec.decode_block(first), dev)
        blk = torch.randn(1, 16, s["block"], h, w, device=dev)
        frames = []

        def step():
            out = dec.decode_block(blk)
            frames.append(out.shape[2])
            return out

        times = time_calls(step, s["reps"], dev)
        once = measure_once(step, dev, sync_check=False)
        row = dict(size=name, latent=f"{h}x{w}", pixels=f"{h * 8}x{w * 8}", first_block_s=t_first,
                   block_latent_frames=s["block"], block_frames=frames[-1], times_s=times, block_s=median(times),
                   per_frame_s=median(times) / frames[-1], activations_bytes=once["activations_bytes"],
                   peak_bytes=once["peak_bytes"])
        res["sizes"].append(row)
        res["checks"][f"{name}: {s['block']} latent frames -> {4 * s['block']} frames"] = {
            "value": frames[-1], "expected": 4 * s["block"], "pass": all(f == 4 * s["block"] for f in frames)}
        say(f"  vae: {name}: {ms(row['block_s'])} ms per block of {s['block']} latent frames")
        del dec, first, blk
        free(dev)
        ctx["report"].write()
    del vae
    free(dev)


def md_vae(res: dict) -> list[str]:
    out = [f"{res.get('model')}, random weights, fp32, `StreamingDecoder` (temporal cache kept across blocks); "
           "time per block after a first block of one latent frame (1 frame) and one warm-up block.", ""]
    out += table(["size", "latents", "first block (1 frame) s", "latent frames / block", "frames / block",
                  "s / block", "ms / frame", "peak GB"],
                 [[r["size"], r["latent"], f"{r['first_block_s']:.3f}", r["block_latent_frames"], r["block_frames"],
                   f"{r['block_s']:.3f}", ms(r["per_frame_s"]), gb(r["peak_bytes"])] for r in res.get("sizes", [])])
    return out + md_checks(res)


# -- 7. projection -------------------------------------------------------------------------------


def calibrate(stage: dict) -> dict:
    """Per-layer ``a + b*Nq + c*Nq*Nkv`` from three measured shapes (negative coefficients clipped to 0)."""
    import numpy as np

    sim_features = [[1.0, r["nq"], r["nq"] * r["nkv"]] for r in stage["shapes"][:3]]
    y = [r["per_layer_s"] for r in stage["shapes"][:3]]
    A = np.array(sim_features, dtype=np.float64)
    coef = np.linalg.solve(A, np.array(y, dtype=np.float64))
    clipped = [max(0.0, float(c)) for c in coef]
    fit = (A @ np.array(clipped)).tolist()
    return {"layer": clipped, "raw": coef.tolist(), "measured_per_layer_s": y, "fitted_per_layer_s": fit}


def sec_projection(res: dict, ctx: dict) -> None:
    from dualpar.schedule import split_layers

    stage = ctx.get("stage_times")
    if not stage or len(stage.get("shapes", [])) < 3:
        raise RuntimeError("needs section wan13b's stage times (three shapes)")
    p, sim = ctx["settings"]["projection"], ctx.get("sim") or load_simulator()
    cal = calibrate(stage)
    res["note"] = ("PROJECTION from measured single-GPU stage times (section wan13b), run through the schedule "
                   "simulator (scripts/simulate.py); not a multi-GPU measurement.")
    res["calibration"] = cal
    # a packet: 2 CFG rows x tokens x the model width, in bf16
    res["link"] = dict(LINK, packet_bytes_per_token=2 * stage["dim"] * 2)
    res["plan"] = dict(p)
    res["fixed"] = {"embed_s": stage["embed_s"], "head_s": stage["head_s"], "sched_s": stage["sched_step_s"],
                    "sched_note": stage["sched_note"]}
    rows = []
    for ranks in (1, p["ranks"]):
        blocks, tasks, num_cat, steps, tpf, _ = sim.plan_for(p["frames"], p["block"], p["num_cat"], p["steps"],
                                                              ranks, p["num_layers"], p["pixels"])
        layers = split_layers(p["num_layers"], ranks)
        fixed = [stage["embed_s"] + stage["head_s"]] if ranks == 1 else \
            [stage["embed_s"]] + [0.0] * (ranks - 2) + [stage["head_s"]]
        model = {"layer": cal["layer"], "fixed": fixed, "sched_s": stage["sched_step_s"]}
        out = sim.simulate(blocks, steps, num_cat, tpf, layers, model, latency_s=LINK["latency_s"],
                           bandwidth=LINK["bandwidth"], packet_bytes_per_token=res["link"]["packet_bytes_per_token"])
        rows.append(dict(ranks=ranks, layers=[hi - lo for lo, hi in layers], tasks=len(tasks), blocks=len(blocks),
                         tokens_per_frame=tpf, wall_s=out["wall_s"], idle=out["idle"], max_idle=max(out["idle"])))
    for r in rows:
        r["speedup"] = rows[0]["wall_s"] / r["wall_s"]
    res["rows"] = rows
    res["speedup"] = rows[-1]["speedup"]
    res["checks"] = {f"projected speed-up on {p['ranks']} ranks": {"value": res["speedup"], "limit": "> 1",
                                                                   "pass": res["speedup"] > 1.0}}


def md_projection(res: dict) -> list[str]:
    if "rows" not in res:
        return []
    p, c, link = res["plan"], res["calibration"], res["link"]
    a, b, cc = c["layer"]
    out = [f"**{res['note']}**", "",
           f"{p['model']}, {p['frames']} frames, {p['steps']} steps, block {p['block']}, num_cat {p['num_cat']}, "
           f"CFG. Per layer: {a * 1e3:.3g} ms + {b * 1e9:.3g} ns x Nq + {cc * 1e12:.3g} ps x Nq x Nkv (solved from the "
           f"three measured shapes, negatives clipped to 0); embedding {ms(res['fixed']['embed_s'])} ms (rank 0), "
           f"head {ms(res['fixed']['head_s'])} ms (last rank), scheduler step {ms(res['fixed']['sched_s'])} ms "
           f"(rank 0). Link ({link['name']}, assumed): {link['latency_s'] * 1e6:.0f} us + packet / "
           f"{link['bandwidth'] / 1e9:.0f} GB/s, packet = 2 rows x tokens x {link['packet_bytes_per_token'] // 4} x "
           "2 bytes.", ""]
    out += table(["ranks", "layers per rank", "projected wall s", "speed-up vs 1 GPU", "max idle per rank"],
                 [[r["ranks"], ",".join(map(str, r["layers"])), f"{r['wall_s']:.0f}", f"{r['speedup']:.2f}x",
                   f"{r['max_idle']:.0%}"] for r in res["rows"]])
    return out + md_checks(res)


# -- driver ----------------------------------------------------------------------------------------

SECTIONS = [
    ("versions", "1. versions: versions and attention backends", sec_versions, md_versions),
    ("tiny", "2. tiny: the tiny preset through Job, fp32 and bf16, both modes", sec_tiny, md_tiny),
    ("two_ranks_one_gpu", "3. two_ranks_one_gpu: 2 ranks (gloo) on one device vs 1 rank", sec_two_ranks,
     md_two_ranks),
    ("wan13b", "4. wan13b: Wan2.1-1.3B shapes, 30 layers, random weights, 480x832", sec_wan13b, md_wan13b),
    ("wan14b_layer", "5. wan14b_layer: one Wan2.1-14B layer at 720x1280", sec_wan14b, md_wan14b),
    ("vae", "6. vae: VAE decode per block, 480p and 720p", sec_vae, md_vae),
    ("projection", "7. projection: 1025 frames on 8 GPUs (simulator calibrated from section 4)", sec_projection,
     md_projection),
]
TITLES = {name: title for name, title, _, _ in SECTIONS}
MD = {name: md for name, _, _, md in SECTIONS}


def markdown(data: dict) -> str:
    out = [f"# GPU check — {data['date'][:10]} — {data['device_name']}", "",
           f"Device `{data['device']}`{' (--quick: tiny shapes)' if data['quick'] else ''}; "
           f"command `{data['command']}`; status **{data['status']}**"
           + (f" (failed: {', '.join(data['failed'])})" if data["failed"] else "") + ".", ""]
    for name, res in data["sections"].items():
        out += [f"## {TITLES.get(name, name)}", ""]
        if "elapsed_s" in res:
            out += [f"_{res['elapsed_s']:.1f} s_", ""]
        if "error" in res:
            out += [f"**error**: `{res['error'][:500]}`", ""]
        try:
            out += MD[name](res)
        except Exception as e:  # partial results of a failed section may lack keys
            out += [f"(table unavailable: {type(e).__name__}: {e})", ""]
    return "\n".join(out) + "\n"


def default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "gpu_check")
    return os.path.join("outputs", "gpu_check")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model sizes and shapes (what the tests run)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT/gpu_check, else outputs/gpu_check)")
    p.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="sections not started by this many seconds are skipped (recorded as failed), so the "
                        "report is complete within a hard time limit (default 540)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(TITLES)
    if unknown:
        print(f"error: unknown sections {sorted(unknown)} (known: {', '.join(TITLES)})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dev = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    out = os.path.abspath(args.out or default_out())
    report = Report(out, args, dev)
    ctx = {"device": dev, "out": out, "settings": settings(args.quick), "report": report,
           "av": importlib.util.find_spec("av") is not None}
    try:
        ctx["sim"] = load_simulator()
    except Exception as e:
        say(f"simulator not importable: {e}")
    say(f"gpu_check on {dev} ({report.data['device_name']}){' --quick' if args.quick else ''} -> {out}")
    report.write()
    for name, title, fn, _ in SECTIONS:
        if only is not None and name not in only:
            continue
        res = report.section(name)
        say(f"start {title}")
        t = time.perf_counter()
        try:
            if t - T0 > args.deadline_s:
                raise TimeoutError(f"skipped: {t - T0:.0f} s elapsed, past --deadline-s {args.deadline_s:.0f}")
            fn(res, ctx)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                res["error"] = "interrupted"
                res["elapsed_s"] = time.perf_counter() - t
                report.data["failed"].append(name)
                report.data["status"] = "interrupted"
                report.write()
                raise
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-4000:]
            say(f"  {name} FAILED: {res['error'][:400]}")
        res["elapsed_s"] = time.perf_counter() - t
        bad = failed_checks(res)
        if "error" in res or bad:
            report.data["failed"].append(name)
        if bad:
            say(f"  {name}: checks failed: {', '.join(bad)}")
        say(f"end {name} ({res['elapsed_s']:.1f} s){' FAILED' if name in report.data['failed'] else ''}")
        if dev.type == "cuda":
            free(dev)
        report.write()
    report.data["status"] = "failed" if report.data["failed"] else "passed"
    report.data["total_s"] = time.perf_counter() - T0
    report.write()
    say(f"done in {report.data['total_s']:.1f} s: {report.data['status']}"
        + (f" ({', '.join(report.data['failed'])})" if report.data["failed"] else "")
        + f"; {os.path.join(out, 'gpu_check.json')}, {os.path.join(out, 'gpu_check.md')}")
    return 1 if report.data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
