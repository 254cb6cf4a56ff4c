"""The schedule simulator: exact on cases with a known answer (no timing of this machine)."""

import importlib.util
import os

import pytest


@pytest.fixture(scope="module")
def sim(root):
    spec = importlib.util.spec_from_file_location("simulate", os.path.join(root, "scripts", "simulate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_rank_is_the_sum_of_task_costs(sim):
    blocks, tasks, num_cat, steps, tpf, layers = sim.plan_for(129, 8, 4, 5, 1, 8, 96)
    model = {"layer": [1e-3, 0.0, 0.0], "fixed": [2e-3], "sched_s": 5e-4}
    out = sim.simulate(blocks, steps, num_cat, tpf, layers, model)
    expected = len(tasks) * (8 * 1e-3 + 2e-3 + 5e-4)
    assert out["wall_s"] == pytest.approx(expected) and out["idle"][0] == pytest.approx(0.0, abs=1e-9)


def test_two_balanced_ranks_approach_half_the_time(sim):
    model = {"layer": [1e-3, 0.0, 0.0], "fixed": [0.0, 0.0], "sched_s": 0.0}
    one = sim.simulate(*sim.plan_for(1025, 8, 4, 10, 1, 8, 96)[:1], 10, 4, 36, [(0, 8)],
                       {**model, "fixed": [0.0]}, latency_s=0.0)
    blocks, _, num_cat, steps, tpf, layers = sim.plan_for(1025, 8, 4, 10, 2, 8, 96)
    two = sim.simulate(blocks, steps, num_cat, tpf, layers, model, latency_s=0.0, bandwidth=float("inf"))
    assert 0.5 <= two["wall_s"] / one["wall_s"] < 0.56  # only the queue's ramp-up/down is lost


def test_projection_runs(root):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "simulate.py"), "--project"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| 8x")]
    assert len(rows) == 16 and all("x |" in r for r in rows)


# -- the per-rank memory model against a CPU measurement ------------------------------------------

def _peak_bytes(fn):
    """Peak bytes allocated on the CPU while ``fn()`` runs, over what was live before it, and its result.

    torch.profiler (profile_memory) records every allocation and free of the CPU allocator with its size;
    the peak of their running sum, in time order, is the most memory ``fn`` held at once. The profiler
    does not report frees of blocks allocated before it started, so ``fn`` must allocate whatever it
    will drop (see ``_forward_peak``)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = sorted((n.start_time_ns, n.extra_fields.alloc_size)
                    for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu")
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    assert events, "the profiler recorded no allocations"
    return peak, out


def test_memory_measurement_sees_allocations():
    import torch

    def f():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB: 6 MB live
        del a
        c = torch.empty(1500, 1000)  # 6 MB: 8 MB live
        return b, c

    peak, _ = _peak_bytes(f)
    assert peak == pytest.approx(8e6, rel=0.01)


def _wan_slice(dim, heads, ffn, layers, dtype):
    """A seeded WanSlice of all ``layers`` layers, cast as dualpar.models.loader casts the tiny preset
    (weights to ``dtype``, norms, modulation tables and RoPE kept in float32)."""
    from dualpar.models.weights import keep_fp32_names
    from dualpar.models.tiny import TINY_TRANSFORMER, tiny_transformer
    from dualpar.models.wan import WanSlice

    cfg = dict(TINY_TRANSFORMER, num_attention_heads=heads, attention_head_dim=dim // heads, ffn_dim=ffn,
               num_layers=layers)
    part = WanSlice(tiny_transformer(0, cfg), 0, layers)
    keep = keep_fp32_names()
    for name, p in part.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    return part.eval().requires_grad_(False)


def _forward_peak(part, shape, batch, text_len, dtype, backend=None):
    """Peak bytes of one ``forward_layers`` call over what a rank holds before it: weights, the text
    K/V, the incoming packet and the layers' feature-cache entries it reads. The call drops each
    layer's entry after the layer, so the entries are allocated inside the measured region and
    their bytes subtracted."""
    import torch
    from torch.nn.attention import sdpa_kernel

    from dualpar.models.wan import MOD_ROWS

    tpf = part.tokens_per_frame(shape.height, shape.width)
    g = torch.Generator().manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(dtype)

    def entries():  # filled in place: no float32 temporaries inside the measured region
        return [tuple(torch.empty(batch, shape.extra * tpf, part.dim, dtype=dtype).normal_(generator=g)
                      for _ in "kv") for _ in part.layers]

    with torch.no_grad():
        part.set_text(rand(batch, text_len, part.dim))
        packet = rand(batch, shape.frames * tpf + MOD_ROWS, part.dim)
        part.forward_layers(packet, shape, entries())  # builds the cached RoPE tables

        def call():
            ex = entries()
            nbytes = sum(t.numel() * t.element_size() for kv in ex for t in kv)
            if backend is None:
                part.forward_layers(packet, shape, ex)
            else:
                with sdpa_kernel(backend):
                    part.forward_layers(packet, shape, ex)
            return nbytes

        peak, nbytes = _peak_bytes(call)
    return peak - nbytes


# (dtype, dim, heads, ffn, context/extra/keep frames = num_cat, own frames >= num_cat, CFG rows one by one):
# the FFN peak (fp32, and bf16, whose norms and modulation upcast to float32), with a narrow FFN the
# self-attention peak (rotated q, the K/V buffers with the extra frames), and WanSlice.cfg_serial.
MEMORY_CASES = {
    "fp32, FFN peak": ("float32", 256, 4, 1024, 2, 2, False),
    "bf16, FFN peak": ("bfloat16", 256, 4, 1024, 2, 2, False),
    "fp32, narrow FFN: attention peak": ("float32", 256, 4, 256, 2, 2, False),
    "bf16, CFG rows one by one": ("bfloat16", 256, 4, 1024, 2, 4, True),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_activation_memory_matches_a_cpu_measurement(sim, case):
    """The model's activation term, from its per-tensor accounting of WanSlice._layer, against the
    measured peak of a real 2-layer forward over a block with context and extra frames (32x32
    latents, 256 tokens a frame: each [B, tokens, dim] tensor is ~1-3 MB, well above the few kB of
    norm statistics and kernel scratch the model leaves out). Tolerance 10%. SDPA on CPU picks its
    flash kernel here (no [B, heads, Nq, Nkv] scores; see the math test), so attn="flash"."""
    import torch

    from dualpar.models.wan import BlockShape

    torch.set_num_threads(1)
    dtype_name, dim, heads, ffn, num_cat, own, serial = MEMORY_CASES[case]
    dtype = getattr(torch, dtype_name)
    batch, text_len, hw, layers = 2, 16, 32, 2
    part = _wan_slice(dim, heads, ffn, layers, dtype)
    part.cfg_serial = serial
    shape = BlockShape(context=num_cat, own=own, extra=num_cat, keep=num_cat, height=hw, width=hw)
    measured = _forward_peak(part, shape, batch, text_len, dtype)
    tpf = part.tokens_per_frame(hw, hw)
    model = sim.memory_model(dim, ffn, heads, layers, 0, tpf, num_cat + own, num_cat, num_cat, batch, text_len,
                             torch.empty((), dtype=dtype).element_size(), attn="flash", cfg_serial=serial)
    assert measured == pytest.approx(model["activations"], rel=0.10), (case, measured, model)


def test_math_attention_memory_matches_a_cpu_measurement(sim):
    """With SDPA forced to its math backend the [B, heads, Nq, Nkv] scores are materialised: the
    model's attn="math" term against the measured peak (25%: torch's math path adds copies the model
    does not list), and the default CPU kernel measures far below it, i.e. it is flash-style."""
    import torch
    from torch.nn.attention import SDPBackend

    from dualpar.models.wan import BlockShape

    torch.set_num_threads(1)
    dim, heads, ffn, num_cat, own, batch, text_len, hw = 256, 4, 1024, 2, 2, 2, 16, 32
    part = _wan_slice(dim, heads, ffn, 2, torch.float32)
    shape = BlockShape(context=num_cat, own=own, extra=num_cat, keep=num_cat, height=hw, width=hw)
    args = (dim, ffn, heads, 2, 0, part.tokens_per_frame(hw, hw), num_cat + own, num_cat, num_cat, batch, text_len, 4)
    math_model = sim.memory_model(*args, attn="math")["activations"]
    flash_model = sim.memory_model(*args, attn="flash")["activations"]
    math = _forward_peak(part, shape, batch, text_len, torch.float32, backend=SDPBackend.MATH)
    default = _forward_peak(part, shape, batch, text_len, torch.float32)
    assert math == pytest.approx(math_model, rel=0.25), (math, math_model)
    assert math_model > 3 * flash_model and default < 0.5 * math_model


def test_memory_model_constants_follow_the_code(sim):
    """The buffer counts and the RoPE table width the model assumes are the ones the code uses."""
    import inspect

    import torch

    from dualpar import comm

    assert sim.SEND_BUFFERS == comm.SEND_SLOTS
    assert sim.RECV_BUFFERS == inspect.signature(comm.Comm.inbox).parameters["depth"].default + 1
    cos, _ = _wan_slice(64, 2, 128, 1, torch.bfloat16)._rope(2, 8, 8)
    assert cos.element_size() == sim.ROPE_BYTES


def test_memory_table_is_printed(root):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "simulate.py"), "--project"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("| model | ranks |"))
    assert all(c in header for c in ("| weights |", "| cache |", "| activations |", "| total |", "| fits |"))
    start = lines.index(header)
    table = lines[start:start + next(i for i, ln in enumerate(lines[start:]) if not ln.startswith("|"))]
    rows = [ln for ln in table if ln.startswith("| Wan2.1-")]
    assert len(rows) == 4 and all(len(r.split("|")) == len(header.split("|")) for r in rows)
    # and the projection with feature caching: both models, none and both levels at intervals 2-4
    def table_after(head):
        i = next(k for k, ln in enumerate(lines) if ln.startswith(head))
        rest = lines[i:]
        return [ln for ln in rest[:next((k for k, ln in enumerate(rest) if not ln.startswith("|")), len(rest))]
                if ln.startswith("| Wan2.1-")]

    cache = table_after("| model | level | interval |")
    assert len(cache) == 2 * 7 and all(" none | 1 | 100% |" in ln for ln in cache[::7])
    # and balanced stages: both models, two VAE speeds, decoding first/last/extra, even and auto
    balance = table_after("| model | VAE at |")
    assert len(balance) == 2 * 2 * 3 * 2 and sum(" | auto | " in ln for ln in balance) == 12
