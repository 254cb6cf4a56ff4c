"""Discrete-event model of the pipelined block-wise schedule: wall time and idle fraction per rank.

    python scripts/simulate.py --calibrate outputs/a/trace.json --config configs/tiny-random.yaml \\
        --frames 513 --block 4 --num-cat 2 --ranks 2

The model walks the same task list as the engine (dualpar.schedule.make_tasks):
each rank runs its tasks in order; a task starts on rank r when rank r is free
and the packet from rank r-1 has arrived (finish + latency + bytes/bandwidth);
rank 0 also waits, as the engine does, for the predictions its next input
needs (or when 2 x ranks tasks are in flight) and spends a scheduler step on
each. Compute per task and rank is ``a + b*Nq + c*Nq*Nkv`` per layer (Nq query
tokens, Nkv key tokens incl. the cached context) plus rank 0's embedding and
the last rank's head, fitted by least squares to the compute spans of one
traced run (``launch/gen.py --trace``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dualpar import schedule as sch  # noqa: E402


def task_tokens(task, blocks, num_cat, steps, tpf):
    lay = sch.layout(task, blocks, num_cat, steps)
    nq = (lay.context + lay.own) * tpf
    return nq, nq + lay.extra * tpf


def features(nq, nkv):
    return [1.0, nq, nq * nkv]


def calibrate(trace_path, plan_args, per_rank=False):
    """Per-layer cost coefficients, per-rank fixed costs, scheduler-step cost, from one traced run.

    ``per_rank``: each rank its own per-token and per-pair layer coefficients (``layer_by_rank``; the
    constant per-layer term merges into the rank's fixed cost): where something else shares a rank's
    device or cores (its writer thread decoding), that rank's layers run slower than the others'."""
    blocks, tasks, num_cat, steps, tpf, layers = plan_args
    events = [e for e in json.load(open(trace_path))["traceEvents"] if e.get("ph") == "X"]
    by_index = {t.index: t for t in tasks}
    rows, ys = [], []
    for e in events:
        if e["cat"] != "compute":
            continue
        t = by_index[e["args"]["task"]]
        nq, nkv = task_tokens(t, blocks, num_cat, steps, tpf)
        n_layers = layers[e["pid"]][1] - layers[e["pid"]][0]
        onehot = [1.0 if e["pid"] == r else 0.0 for r in range(len(layers))]
        if per_rank:
            row = [f * n_layers * h for h in onehot for f in features(nq, nkv)[1:]] + onehot
        else:  # per-layer features scaled by the rank's layer count, plus one fixed term per rank
            row = [f * n_layers for f in features(nq, nkv)] + onehot
        rows.append(row)
        ys.append(e["dur"] / 1e6)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    sched = [e["dur"] / 1e6 for e in events if e["cat"] == "scheduler"]
    if per_rank:
        w = len(layers)
        by_rank = [[0.0, *coef[2 * r: 2 * r + 2]] for r in range(w)]
        return {"layer": by_rank[0], "layer_by_rank": by_rank, "fixed": coef[2 * w:].tolist(),
                "sched_s": float(np.median(sched))}
    return {"layer": coef[:3].tolist(), "fixed": coef[3:].tolist(), "sched_s": float(np.median(sched))}


# Hop model of the calibrated (CPU, gloo) case; the fit absorbs what it misses.
HOP = dict(latency_s=1e-3, bandwidth=2e9, packet_bytes_per_token=1024)


def simulate(blocks, steps, num_cat, tpf, layers, model, latency_s=HOP["latency_s"], bandwidth=HOP["bandwidth"],
             packet_bytes_per_token=HOP["packet_bytes_per_token"], full=None, level="model", decode=None):
    """Predicted loop wall time and idle fraction per rank.

    ``layers``: the split (a contiguous range per ring rank). ``decode``: ``(rank, seconds per block)``
    or ``(rank, seconds per block, queue)``: the rank that decodes and writes each finished block
    (``output.decode_on``: 0, the last ring rank, or ``len(layers)``, an extra rank off the ring) and
    its cost. The block reaches it when rank 0 has applied its last step. Without ``queue`` the
    decoding occupies that rank before its next task (a device it shares); with it, the rank's writer
    thread decodes on a core of its own, and the rank waits only when ``queue`` blocks are already
    waiting for it (``output.queue_blocks``).

    ``full``: per step, computed (True) or forecast (timestep feature caching, see
    ``dualpar.schedule.full_steps``). At ``level`` ``model`` a forecast task never enters the ring:
    rank 0 spends a scheduler step on it (the forecast costs about as much) when its turn to be
    applied comes; at ``stage`` it flows as usual and every rank skips its layers (its fixed cost
    stays: embedding on rank 0, head on the last)."""
    world = len(layers)
    tasks = sch.make_tasks(len(blocks), steps, full)
    in_flight = 2 * world
    ranks = world + (1 if decode is not None and decode[0] >= world else 0)
    free = [0.0] * ranks
    busy = [0.0] * ranks
    pred_at = {}  # task -> time its prediction reaches rank 0
    applied = -1
    off_ring = {t.index for t in tasks if not t.full and level == "model"}
    ring = [t.index for t in tasks if t.index not in off_ring]
    nth = {i: k for k, i in enumerate(ring)}

    def cost(rank, task):
        fixed = model["fixed"][rank] if rank < len(model["fixed"]) else 0.0
        if not task.full:
            return fixed
        nq, nkv = task_tokens(task, blocks, num_cat, steps, tpf)
        n = layers[rank][1] - layers[rank][0]
        coef = model["layer_by_rank"][rank] if "layer_by_rank" in model else model["layer"]
        return n * float(np.dot(coef, features(nq, nkv))) + fixed

    def hop(task):
        nq, _ = task_tokens(task, blocks, num_cat, steps, tpf)
        return latency_s + nq * packet_bytes_per_token / bandwidth

    writer = []  # background writer: when each block's decoding ends

    def decode_block(t):
        if decode is None:
            return
        r, cost = decode[0], decode[1]
        arrive = t + (latency_s if r else 0.0)
        if len(decode) < 3:
            free[r] = max(free[r], arrive) + cost
            busy[r] += cost
            return
        queue = decode[2]
        if r < world and len(writer) >= queue:  # a full queue: the rank waits for the oldest one's turn
            free[r] = max(free[r], writer[-queue])
        writer.append(max(writer[-1] if writer else 0.0, arrive) + cost)

    def apply_upto(need):
        nonlocal applied
        while applied < need:
            j = applied + 1
            t = free[0] if (world == 1 or j in off_ring) else max(free[0], pred_at[j])
            free[0] = t + model["sched_s"]
            busy[0] += model["sched_s"]
            applied = j
            if tasks[j].last_step:
                decode_block(free[0])

    # Rank 0 drives the order; other ranks follow task by task.
    for task in tasks:
        if task.index in off_ring:
            if world == 1:
                apply_upto(task.index)
            continue
        k = nth[task.index]
        apply_upto(max(task.needs, ring[k - in_flight] if k >= in_flight else -1))
        start = free[0]
        c = cost(0, task)
        free[0] = start + c
        busy[0] += c
        t_done = free[0]
        for r in range(1, world):
            arr = t_done + hop(task)
            start = max(free[r], arr)
            c = cost(r, task)
            free[r] = start + c
            busy[r] += c
            t_done = free[r]
        if world > 1:
            pred_at[task.index] = t_done + latency_s
        else:
            free[0] += model["sched_s"]
            busy[0] += model["sched_s"]
            applied = task.index
            if task.last_step:
                decode_block(free[0])
    apply_upto(len(tasks) - 1)
    wall = max(free)  # the loop: the writer's last blocks are decoded after it (end to end, not the loop)
    return {"wall_s": wall, "idle": [1 - b / wall for b in busy]}


def plan_for(frames, block, num_cat, steps, ranks, num_layers, hw):
    latent = (frames - 1) // 4 + 1
    blocks = sch.split_blocks(latent, block)
    h, w = (hw, hw) if isinstance(hw, int) else hw
    tpf = (h // 8 // 2) * (w // 8 // 2)
    return blocks, sch.make_tasks(len(blocks), steps), num_cat, steps, tpf, sch.split_layers(num_layers, ranks)


# Assumptions of the projection (stated, not measured): sustained bf16 throughput
# as a fraction of the dense peak, and the link between neighbouring GPUs.
EFFICIENCY = 0.4
GPUS = {
    "8x RTX 4090, PCIe (no P2P, via host)": dict(short="RTX 4090", peak_flops=165e12, bandwidth=12e9,
                                                 latency_s=30e-6, link="PCIe through the host", mem_gb=24),
    "8x H100 SXM, NVLink": dict(short="H100", peak_flops=989e12, bandwidth=300e9, latency_s=10e-6,
                                link="NVLink", mem_gb=80),
}
MODELS = {
    "Wan2.1-1.3B 480x832": dict(layers=30, dim=1536, ffn=8960, heads=12, hw=(480, 832), params=1.3e9),
    "Wan2.1-14B 720x1280": dict(layers=40, dim=5120, ffn=13824, heads=40, hw=(720, 1280), params=14e9),
}
PROJECT_CASES = ((1, 8), (8, 4), (8, 8), (8, 16))  # (ranks, block); the first is the 1-GPU reference


def flops_model(dim, ffn, flops, batch=2, text_len=512):
    """Per-layer cost coefficients from FLOPs: projections and FFN per token, attention per token pair."""
    per_token = batch * (12 * dim * dim + 4 * dim * ffn + 4 * text_len * dim)
    per_pair = batch * 4 * dim
    return {"layer": [0.0, per_token / flops, per_pair / flops], "sched_s": 2e-3}


# -- per-rank memory ------------------------------------------------------------------------------
#
# What one rank holds while it runs a task, derived from the code (dualpar/models/wan.py's
# forward_layers and block_forward, dualpar/stage.py's FeatureCache, dualpar/comm.py's buffers), in bytes.
# A [B, n, dim] tensor in the model dtype is the unit; norms and modulation run in float32
# (``x.float()``), so some transients are 4 bytes/element even in bf16.

RECV_BUFFERS = 3  # comm.Inbox: receives posted ``depth`` (2) ahead into a ring of depth + 1 buffers per peer
SEND_BUFFERS = 3  # comm.SEND_SLOTS: reused send buffers per link, the output packet is written into one
ROPE_BYTES = 4  # WanRotaryPosEmbed's cos/sin tables are float32; x * cos promotes to them
UNIPC_COPIES = 4  # rank 0, per in-flight block: its latents, UniPC's 2 model outputs and last sample (float32)


def layer_params(dim, ffn):
    """Parameters of one WanTransformerBlock: self- and cross-attention (q, k, v, out with biases, q/k RMS
    norm weights), norm2 (affine), the FFN (two linears with biases) and the 6-row modulation table."""
    attn = 4 * (dim * dim + dim) + 2 * dim
    return 2 * attn + 2 * dim + (dim * ffn + ffn) + (ffn * dim + dim) + 6 * dim


def embed_params(dim, text_dim=4096, freq_dim=256, in_channels=16, patch=4):
    """Rank 0's embeddings: patch embedding, text embedder (2 linears), time embedder (2), time projection to 6 rows."""
    return (in_channels * patch * dim + dim) + (text_dim * dim + dim + dim * dim + dim) \
        + (freq_dim * dim + dim + dim * dim + dim) + (dim * 6 * dim + 6 * dim)


def head_params(dim, out_channels=16, patch=4):
    return dim * out_channels * patch + out_channels * patch + 2 * dim  # proj_out and its scale/shift table


def layer_checkpoints(dim, ffn, heads, q_tokens, kv_tokens, batch, text_len, bytes_per_el, attn="flash",
                      x_in=True):
    """Bytes live at each point of ``wan.block_forward`` (the layer of ``WanSlice.forward_layers``) where a new peak can occur, beyond what is live
    before ``forward_layers`` starts (weights, the incoming packet, caches, text K/V, RoPE tables).

    Returns ``{name: (bytes, kept)}``: ``kept`` is the share of this layer's new feature-cache entry
    (the clones of K and then V over the kept frames) alive at that point, counted by the caller.
    ``x_in``: the layer's input is a tensor of its own, held by forward_layers' loop for the whole layer
    (False for the first layer, whose input is a view of the packet)."""
    b, n, m, s = bytes_per_el, q_tokens, kv_tokens, text_len
    e = m - n  # appended newer-neighbour tokens
    tok = batch * dim  # elements per token of a [B, tokens, dim] tensor
    up = 4 if b != 4 else 0  # x.float() copies only when the model dtype is not float32
    down = b if b != 4 else 0  # .type_as(x) back from float32 copies only then
    t = max(b, ROPE_BYTES)  # x1 * cos: promoted to the table dtype

    def a(k):  # a [B, k, dim] tensor in the model dtype
        return k * tok * b

    def rms(k):  # torch.nn.RMSNorm transients over its input: upcast, x * rsqrt in fp32, back-cast, * weight
        return k * tok * (up + 4 + down + b)

    def norm_mod(k):  # (norm(x.float()) * (1 + scale) + shift).type_as(x): two float32 tensors at once
        return k * tok * max(up + 4, 4 + 4, 4 + down)

    def rope(k):  # apply_rope: x1*cos, x2*sin and their difference, each half width, in the promoted dtype
        return k * tok * 3 * t // 2

    def scores(k):  # math attention: scores, softmax probabilities [B, heads, n, k], _safe_softmax's -inf mask
        return 0 if attn == "flash" else batch * heads * n * k * (2 * b + 1)

    lse = batch * heads * n * 4  # flash attention's float32 log-sum-exp [B, heads, n]
    flat = 0 if attn == "flash" else a(n)  # flash writes [B, n, heads, hd]: flatten(2, 3) is a view; math copies
    scaled = 0 if attn == "flash" else a(n) + a(m)  # math scales q and k into new tensors first
    mod = batch * 6 * dim * 4  # scale_shift_table + tproj.float(): [B, 6, dim] float32, chunked into views
    base = (a(n) if x_in else 0) + mod
    h = a(n)  # the normed, modulated input of each sub-block (a local of block_forward until replaced)
    return {
        "norm1": (base + norm_mod(n), 0),
        "q/k norm": (base + h + a(n) + a(n) + rms(n), 0),  # q, k = to_k(h), RMSNorm of k
        # K of the kept frames cloned; q rotated: q, k, rotated q and the temporaries
        "q rope": (base + h + a(n) + a(n) + a(n) + rope(n), 0.5),
        # rotated q, k, the [B, n + e, heads, hd] key buffer the own keys rotate into
        "k rope": (base + h + a(n) + a(n) + a(m) + rope(n), 0.5),
        "k rope, extra": (base + h + a(n) + a(m) + rope(e), 0.5),  # the newer block's keys into the buffer
        "v": (base + h + a(n) + a(m) + a(m), 1),  # rotated q, keys, values [B, n + e, dim]; V of kept cloned
        "self-attention": (base + h + a(n) + a(m) + a(m) + scaled + a(n) + lse + scores(m), 1),
        "attn out proj": (base + h + a(n) + a(m) + a(m) + a(n) + flat + a(n), 1),  # + out, to_out[0](out)
        # x.float() + attn * gate (attn stays a local of block_forward until it returns)
        "residual 1": (base + h + a(n) + n * tok * (up + 4 + 4), 1),
        "norm2": (base + a(n) + a(n) + h + n * tok * max(up + 4, 4 + down), 1),  # x, attn, old h, new h
        "cross q norm": (base + a(n) + a(n) + h + a(n) + rms(n), 1),
        "cross-attention": (base + a(n) + a(n) + h + a(n) + a(n) + flat + a(n) + scores(s), 1),
        "norm3": (base + a(n) + a(n) + h + norm_mod(n), 1),
        # x.float() is evaluated before ffn(h): x, attn, h, x.float(), proj(h) and gelu of it [B, n, ffn]
        "FFN": (base + a(n) + a(n) + h + n * tok * up + 2 * n * batch * ffn * b, 1),
        "residual 3": (base + a(n) + a(n) + h + n * tok * max(up + 8, 2 * up + b), 1),
    }


def memory_model(dim, ffn, heads, layers_on_rank, params_per_layer, tpf, frames, extra, num_cat, batch, text_len,
                 bytes_per_el, attn="flash", keep=None, role="middle", packet_frames=None, other_params=0,
                 state_bytes=0, rope_tokens=None, pred_bytes=0, cfg_serial=False):
    """Per-rank memory in bytes while a task of ``frames`` (context + own) latent frames, ``extra``
    appended newer-neighbour frames and ``keep`` (default ``num_cat``, at most the own frames) kept frames runs.

    * ``weights``: the owned layers (+ ``other_params``: embeddings on rank 0, head on the last).
    * ``cache``: the FeatureCache entries held when the task starts, one per owned layer: the newer
      block's K and V [B, extra*tpf, dim] (extra = num_cat in steady state; the newest block, extra 0,
      starts with the cache empty: the previous iteration's oldest block took it).
    * ``text_kv``: each owned layer's cross-attention K/V of the prompt [B, text_len, dim] (set_text),
      plus the cached RoPE tables (float32 cos and sin [tokens, head_dim] per distinct task length).
    * ``activations``: the peak of one forward_layers call over what was live before it: the worst
      point of one layer (layer_checkpoints) plus the net growth of the cache during the call (each
      layer's new K/V are cloned while its old entry, taken from the cache, lives until the layer ends).
      ``cfg_serial`` (WanSlice.cfg_serial): the CFG rows run through each layer one after the other,
      so the layer's transients are those of batch 1, next to the [B, n, dim] output being filled
      and the rows' kept K/V (concatenated at the end of the layer); caches and packets keep batch B.
    * ``packets``: communication buffers, allocated once at the largest packet [B, frames*tpf + 7, dim]:
      a middle rank's receive ring (RECV_BUFFERS) and send slots (SEND_BUFFERS, the output packet is
      written into one); rank 0 embeds into a packet of its own and sends (and receives predictions);
      the last rank receives packets and sends predictions; one rank alone holds just the embedded
      packet. The output packet a single rank allocates, and the head's transients, come after the
      layers (below the layer peak) and are not added.
    * ``state``: rank 0's latents and scheduler history (``state_bytes``, from the caller).
    """
    b = bytes_per_el
    keep = num_cat if keep is None else keep
    packet_frames = frames if packet_frames is None else packet_frames
    n, m = frames * tpf, (frames + extra) * tpf
    entry_new = 2 * batch * keep * tpf * dim * b  # this task's kept K/V of one layer
    entry_old = 2 * batch * extra * tpf * dim * b  # the newer block's K/V one layer reads (taken from the cache)
    serial = cfg_serial and batch == 2
    peak, where = 0, None
    for i in range(layers_on_rank):
        done = i * (entry_new - entry_old)  # entries kept by earlier layers, less the old ones they dropped
        x_in = n * batch * dim * b if i > 0 else 0
        if not serial:
            points = {name: (live + done + kept * entry_new)
                      for name, (live, kept) in layer_checkpoints(dim, ffn, heads, n, m, batch, text_len, b, attn,
                                                                  x_in=i > 0).items()}
        else:  # WanSlice._rows_one_by_one: out = empty_like(x), then each row's layer on views of the row
            row = entry_new // batch  # one row's kept K/V
            held = x_in + n * batch * dim * b + done  # the layer's input, the [B, n, dim] output being filled
            points = {}
            for r in range(batch):  # the row's input is a view of x; earlier rows' kept K/V are held
                for name, (live, kept) in layer_checkpoints(dim, ffn, heads, n, m, 1, text_len, b, attn,
                                                            x_in=False).items():
                    points[f"row {r}: {name}"] = held + r * row + kept * row + live
            points["kept K/V concat"] = held + 2 * entry_new  # the rows' clones and the batch-B entry
        for name, live in points.items():
            if live > peak:
                peak, where = live, f"layer {i}: {name}"
    cache = layers_on_rank * entry_old
    rope_tokens = m if rope_tokens is None else rope_tokens
    text_kv = layers_on_rank * 2 * batch * text_len * dim * b + 2 * rope_tokens * (dim // heads) * ROPE_BYTES
    packet = batch * (packet_frames * tpf + 7) * dim * b
    n_packets = {"only": 1, "first": 1 + SEND_BUFFERS, "middle": RECV_BUFFERS + SEND_BUFFERS,
                 "last": RECV_BUFFERS}[role]
    n_preds = {"only": 0, "first": RECV_BUFFERS, "middle": 0, "last": SEND_BUFFERS}[role]
    weights = (layers_on_rank * params_per_layer + other_params) * b
    out = {"weights": weights, "cache": cache, "text_kv": text_kv, "activations": peak,
           "packets": n_packets * packet + n_preds * pred_bytes, "state": state_bytes}
    out["total"] = sum(out.values())
    out["peak_at"] = where
    return out


def rank_memory(m, frames, steps, num_cat, ranks, block, batch=2, bytes_per_el=2, attn="flash", text_len=512,
                cfg_serial=False):
    """memory_model for every rank of a run, at each rank's worst task; returns the per-rank list
    (bytes) and the index of the rank with the largest total."""
    blocks, tasks, nc, st, tpf, layers = plan_for(frames, block, num_cat, steps, ranks, m["layers"], m["hw"])
    lays = sorted({sch.layout(t, blocks, nc, st) for t in tasks}, key=lambda la: (la.context, la.own, la.extra))
    lat_h, lat_w = m["hw"][0] // 8, m["hw"][1] // 8
    latent = 16 * max(b.frames for b in blocks) * lat_h * lat_w * 4  # one block's float32 latents [1, 16, F, h, w]
    # Rank 0 (DenoiseState): the in-flight blocks with their UniPC history, and one finished block's tail.
    state = (sch.max_in_flight(st, len(blocks)) * UNIPC_COPIES + 1) * latent
    common = dict(dim=m["dim"], ffn=m["ffn"], heads=m["heads"], params_per_layer=layer_params(m["dim"], m["ffn"]),
                  tpf=tpf, num_cat=nc, batch=batch, text_len=text_len, bytes_per_el=bytes_per_el, attn=attn,
                  cfg_serial=cfg_serial,
                  packet_frames=max(la.context + la.own for la in lays), pred_bytes=latent,
                  rope_tokens=sum(f * tpf for f in {la.context + la.own + la.extra for la in lays}))
    per_rank = []
    for r, (a, b) in enumerate(layers):
        role = "only" if ranks == 1 else "first" if r == 0 else "last" if r == ranks - 1 else "middle"
        other = (embed_params(m["dim"]) if role in ("only", "first") else 0) \
            + (head_params(m["dim"]) if role in ("only", "last") else 0)
        worst = max((memory_model(layers_on_rank=b - a, frames=la.context + la.own, extra=la.extra, keep=la.keep,
                                  role=role, other_params=other,
                                  state_bytes=state if role in ("only", "first") else 0, **common)
                     for la in lays), key=lambda x: x["total"])
        per_rank.append(dict(worst, rank=r, role=role, layers=b - a))
    return per_rank, max(range(ranks), key=lambda r: per_rank[r]["total"])


MEMORY_KEYS = ("weights", "cache", "text_kv", "activations", "packets", "state", "total")


def _memory_gb(m, frames, steps, num_cat, ranks, block, cfg_serial=False):
    per_rank, worst = rank_memory(m, frames, steps, num_cat, ranks, block, cfg_serial=cfg_serial)
    w = per_rank[worst]
    return dict({f"{k}_gb": w[k] / 1e9 for k in MEMORY_KEYS}, rank=worst, role=w["role"], layers=w["layers"],
                peak_at=w["peak_at"])


def _project_one(g, m, frames, steps, num_cat, ranks, block, full=None, level="model"):
    blocks, tasks, nc, st, tpf, layers = plan_for(frames, block, num_cat, steps, ranks, m["layers"], m["hw"])
    model = dict(flops_model(m["dim"], m["ffn"], EFFICIENCY * g["peak_flops"]), fixed=[0.0] * ranks)
    bytes_per_token = 2 * m["dim"] * 2  # CFG rows, bf16
    out = simulate(blocks, st, nc, tpf, layers, model, latency_s=g["latency_s"], bandwidth=g["bandwidth"],
                   packet_bytes_per_token=bytes_per_token, full=full, level=level)
    n = max(b - a for a, b in layers)
    mem = _memory_gb(m, frames, steps, num_cat, ranks, block)
    # One steady-state hop against one stage's compute for the same task (the largest stage).
    task = tasks[len(tasks) // 2]
    nq, nkv = task_tokens(task, blocks, nc, st, tpf)
    packet = nq * bytes_per_token
    hop = {"packet_mb": packet / 1e6, "hop_s": g["latency_s"] + packet / g["bandwidth"],
           "stage_compute_s": n * float(np.dot(model["layer"], features(nq, nkv)))}
    return {"ranks": ranks, "block": block, "layers": [b - a for a, b in layers], "wall_s": out["wall_s"],
            "idle": out["idle"], "mem_gb": mem["weights_gb"] + mem["cache_gb"], "memory": mem, "hop": hop}


# GPU memory for the fit column (GB as sold), and the share a run may plan to use: the rest is
# headroom for the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation.
MEMORY_GPUS = (("RTX 4090", 24), ("RTX 6000 Ada/L40S", 48), ("H100", 80), ("H200", 141))
USABLE = 0.9


def fits(total_gb):
    return [name for name, gb in MEMORY_GPUS if total_gb <= USABLE * gb]


def memory_table(frames=1025, steps=50, num_cat=8, block=8, ranks=(1, 8)):
    """Per-rank memory of both models at ``block``/``num_cat`` (bf16, flash attention, CFG batch 2), with
    the CFG rows through each layer together and one after the other (``model.cfg_serial``)."""
    rows = []
    for mname, m in MODELS.items():
        for n in ranks:
            two = _memory_gb(m, frames, steps, num_cat, n, block)
            one = _memory_gb(m, frames, steps, num_cat, n, block, cfg_serial=True)
            rows.append(dict(model=mname, ranks=n, block=block, num_cat=num_cat, batch2=two, cfg_serial=one,
                             fits=fits(two["total_gb"]), fits_cfg_serial=fits(one["total_gb"])))
    return rows


def projection(frames=1025, steps=50, num_cat=8):
    """Projected wall time, idle and per-rank memory for the real models on 8 GPUs, plus balanced rank counts."""
    rows, balanced = [], []
    for gname, g in GPUS.items():
        for mname, m in MODELS.items():
            base = None
            for ranks, block in PROJECT_CASES:
                r = _project_one(g, m, frames, steps, num_cat, ranks, block)
                base = base or r["wall_s"]
                rows.append(dict(r, gpus=gname, model=mname, speedup=base / r["wall_s"]))
            # Rank counts next to 8 that divide the layer count, when 8 does not.
            ranks = PROJECT_CASES[-1][0]
            if m["layers"] % ranks:
                divisors = [d for d in range(2, m["layers"] + 1) if m["layers"] % d == 0]
                for d in (max(d for d in divisors if d < ranks), min(d for d in divisors if d > ranks)):
                    r = _project_one(g, m, frames, steps, num_cat, d, 8)
                    balanced.append(dict(r, gpus=gname, model=mname, speedup=base / r["wall_s"]))
    return {"frames": frames, "steps": steps, "num_cat": num_cat, "efficiency": EFFICIENCY, "gpus": GPUS,
            "models": MODELS, "rows": rows, "balanced": balanced,
            "memory": {"rows": memory_table(frames, steps, num_cat), "gpus": dict(MEMORY_GPUS), "usable": USABLE,
                       "dtype": "bfloat16", "attn": "flash"}}


CACHE_GPUS = "8x H100 SXM, NVLink"
CACHE_INTERVALS = (2, 3, 4)


def cache_projection(frames=1025, steps=50, num_cat=8, ranks=8, block=8, warmup=2, last=1):
    """Projected wall time and idle with timestep feature caching (both levels, intervals 2-4) against
    none, for both models on 8 GPUs: what the schedule alone gives, fidelity aside."""
    g = GPUS[CACHE_GPUS]
    rows = []
    for mname, m in MODELS.items():
        base = _project_one(g, m, frames, steps, num_cat, ranks, block)
        rows.append(dict(model=mname, level="none", interval=1, computed=1.0, wall_s=base["wall_s"],
                         idle=base["idle"], speedup=1.0))
        for level in ("model", "stage"):
            for interval in CACHE_INTERVALS:
                full = sch.full_steps(steps, warmup, interval, last)
                r = _project_one(g, m, frames, steps, num_cat, ranks, block, full=full, level=level)
                rows.append(dict(model=mname, level=level, interval=interval, computed=sum(full) / steps,
                                 wall_s=r["wall_s"], idle=r["idle"], speedup=base["wall_s"] / r["wall_s"]))
    return {"gpus": CACHE_GPUS, "frames": frames, "steps": steps, "ranks": ranks, "block": block,
            "num_cat": num_cat, "warmup": warmup, "last": last, "rows": rows}


def cache_markdown(data: dict) -> str:
    lines = [f"Projected with feature caching: {data['frames']} frames, {data['steps']} steps (warm-up "
             f"{data['warmup']}, last {data['last']}), {data['ranks']} ranks of {data['gpus']}, block {data['block']}, "
             f"num_cat {data['num_cat']}; layer time only (the forecasts' fidelity is measured, not projected).", "",
             "| model | level | interval | steps computed | wall s | speed-up | max idle |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['level']} | {r['interval']} | {r['computed']:.0%} | {r['wall_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {max(r['idle']):.0%} |")
    return "\n".join(lines)


# Wan2.1's VAE decoder: FLOPs per output pixel of one frame, counted with torch's FlopCounterMode on
# diffusers' AutoencoderKLWan (default config, 127 M parameters) through StreamingDecoder (its convolutions
# are linear in the pixels). Run in float32; TF32 tensor cores at the projection's EFFICIENCY.
VAE_FLOPS_PER_PIXEL = 8.44e6
TF32_PEAK = {"H100": 495e12, "RTX 4090": 82.6e12}
BALANCE_GPUS = "8x H100 SXM, NVLink"


def _balance_profile(g, m, frames, steps, num_cat, block, vae_efficiency=EFFICIENCY):
    """The cost profile ``parallel.split=auto`` would measure, from the FLOPs model (per layer and task:
    the mean over the run's tasks) and the VAE's FLOPs per decoded block."""
    from dualpar.balance import Profile

    blocks, tasks, nc, st, tpf, _ = plan_for(frames, block, num_cat, steps, 1, m["layers"], m["hw"])
    model = flops_model(m["dim"], m["ffn"], EFFICIENCY * g["peak_flops"])
    per_layer = np.mean([float(np.dot(model["layer"], features(*task_tokens(t, blocks, nc, st, tpf)))) for t in tasks])
    h, w = m["hw"]
    frame_s = VAE_FLOPS_PER_PIXEL * h * w / (vae_efficiency * TF32_PEAK[g["short"]])
    decode_s = frame_s * frames / len(blocks)
    return Profile(layer_s=float(per_layer), first_s=model["sched_s"], last_s=0.0, decode_s=decode_s), model, len(tasks)


VAE_EFFICIENCIES = (EFFICIENCY, 0.04)
"""The VAE's share of the TF32 peak: the matmuls' (an optimistic bound) and a tenth of it (3-D convolutions
with a temporal cache run far below the matmuls; ``scripts/gpu_check.py``'s ``vae`` section measures it)."""


def balance_projection(frames=1025, steps=50, num_cat=8, block=8, gpus=8):
    """Wall time and idle per rank on 8 GPUs for both models: even vs auto split, with decoding on the
    first rank, the last, or an extra rank (7 denoising + 1 decoding), at two VAE efficiencies."""
    from dualpar.balance import best_split

    g = GPUS[BALANCE_GPUS]
    rows = []
    for (mname, m), vae_eff in itertools.product(MODELS.items(), VAE_EFFICIENCIES):
        prof, model, n_tasks = _balance_profile(g, m, frames, steps, num_cat, block, vae_eff)
        base = None
        for decode_on in ("first", "last", "extra"):
            ring = gpus - 1 if decode_on == "extra" else gpus
            where = {"first": 0, "last": ring - 1, "extra": ring}[decode_on]
            blocks, _, nc, st, tpf, _ = plan_for(frames, block, num_cat, steps, ring, m["layers"], m["hw"])
            for split in ("even", "auto"):
                counts = (best_split(m["layers"], ring, prof, n_tasks, len(blocks), where) if split == "auto"
                          else [b - a for a, b in sch.split_layers(m["layers"], ring)])
                layers = sch.split_layers(m["layers"], ring, counts)
                out = simulate(blocks, st, nc, tpf, layers, dict(model, fixed=[0.0] * ring), latency_s=g["latency_s"],
                               bandwidth=g["bandwidth"], packet_bytes_per_token=2 * m["dim"] * 2,
                               decode=(where, prof.decode_s))
                base = base or out["wall_s"]
                rows.append(dict(model=mname, vae_efficiency=vae_eff, decode_s=prof.decode_s * len(blocks),
                                 decode_on=decode_on, split=split, counts=counts, wall_s=out["wall_s"],
                                 idle=out["idle"], speedup=base / out["wall_s"]))
    return {"gpus": BALANCE_GPUS, "frames": frames, "steps": steps, "block": block, "num_cat": num_cat,
            "efficiency": EFFICIENCY, "vae_flops_per_pixel": VAE_FLOPS_PER_PIXEL, "rows": rows}


def balance_markdown(data: dict) -> str:
    lines = [f"Projected balanced stages: {data['frames']} frames, {data['steps']} steps, {data['gpus']}, block "
             f"{data['block']}, num_cat {data['num_cat']}; decoding every block with Wan2.1's VAE "
             f"({data['vae_flops_per_pixel'] / 1e6:.2f} MFLOPs per output pixel, at a share of the TF32 peak: the "
             f"layers' {data['efficiency']:.0%}, or 4%); speed-up against the even split with decoding on rank 0 "
             "at the same VAE speed. Decode s: the whole video's decoding.", "",
             "| model | VAE at | decode s | decode on | split | layers per rank | wall s | speed-up | idle per rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        idle = " ".join(f"{x:.0%}" for x in r["idle"])
        lines.append(f"| {r['model']} | {r['vae_efficiency']:.0%} | {r['decode_s']:.0f} | {r['decode_on']} | "
                     f"{r['split']} | {','.join(map(str, r['counts']))} | {r['wall_s']:.0f} | {r['speedup']:.2f}x | "
                     f"{idle} |")
    return "\n".join(lines)


def project(frames=1025, steps=50, num_cat=8):
    data = projection(frames, steps, num_cat)
    print(f"projection: {frames} frames, {steps} steps, num_cat {num_cat}, CFG, bf16\n")
    print("| GPUs | model | ranks | block | wall s | speed-up vs 1 GPU | max idle | weights+cache GB/rank "
          "| total GB/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['gpus']} | {r['model']} | {r['ranks']} | {r['block']} | {r['wall_s']:.0f} | {r['speedup']:.2f}x | "
              f"{max(r['idle']):.0%} | {r['mem_gb']:.1f} | {r['memory']['total_gb']:.1f} |")
    print()
    for r in data["balanced"]:
        print(f"balanced: {r['gpus']}, {r['model']}: {r['ranks']} ranks, block {r['block']}: {r['wall_s']:.0f} s, "
              f"max idle {max(r['idle']):.0%}")
    print("\n" + memory_markdown(data["memory"], frames))
    data["cache"] = cache_projection(frames, steps, num_cat)
    print("\n" + cache_markdown(data["cache"]))
    data["balance"] = balance_projection(frames, steps, num_cat)
    print("\n" + balance_markdown(data["balance"]))
    return data


def memory_markdown(mem: dict, frames: int) -> str:
    """The per-rank memory table (weights, cache, activations, ...) and which cards it fits, as markdown."""
    first = mem["rows"][0]
    lines = [f"Per-rank memory, GB (1e9 bytes): {frames} frames, block {first['block']}, num_cat {first['num_cat']}, "
             "bf16, CFG batch 2, flash attention; the rank with the largest total.", "",
             "| model | ranks | rank (layers) | weights | cache | text K/V + RoPE | activations | packets | rank-0 state "
             "| total | fits | activations, CFG rows serial | total, CFG rows serial | fits, CFG rows serial |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in mem["rows"]:
        b2, b1 = r["batch2"], r["cfg_serial"]
        lines.append(f"| {r['model']} | {r['ranks']} | {b2['rank']} ({b2['layers']}) | {b2['weights_gb']:.2f} | "
                     f"{b2['cache_gb']:.2f} | {b2['text_kv_gb']:.2f} | {b2['activations_gb']:.2f} | "
                     f"{b2['packets_gb']:.2f} | {b2['state_gb']:.2f} | {b2['total_gb']:.1f} | "
                     f"{', '.join(r['fits']) or 'none'} | {b1['activations_gb']:.2f} | {b1['total_gb']:.1f} | "
                     f"{', '.join(r['fits_cfg_serial']) or 'none'} |")
    gpus = ", ".join(f"{n} {gb} GB" for n, gb in mem["gpus"].items())
    peaks = sorted({r[k]["peak_at"].split(": ")[-1] for r in mem["rows"] for k in ("batch2", "cfg_serial")})
    lines += ["", f"Note: \"fits\" = total <= {mem['usable']:.0%} of the card ({gpus}): ~{1 - mem['usable']:.0%} is "
              "left for the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation. Activations = the peak "
              f"of one layer's eager forward over the worst task (at: {', '.join(peaks)}) plus the net growth of the "
              f"feature cache during it; packets = receive ring ({RECV_BUFFERS}) + send slots ({SEND_BUFFERS}) at the "
              "largest packet on a middle rank, the embedded packet + send slots on rank 0. \"CFG rows serial\" "
              "(model.cfg_serial: the two CFG rows through each layer one after the other) shrinks only the "
              "activations; caches, text K/V and packets keep both rows. Not counted: the text encoder (rank 0, "
              "before denoising), VAE decoding on rank 0, torch.compile'd layers (fewer transients)."]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", action="store_true", help="project Wan2.1 1.3B/14B at 1025 frames on 8 GPUs")
    p.add_argument("--calibrate", help="trace.json of a measured run (launch/gen.py --trace)")
    p.add_argument("--calib-frames", type=int)
    p.add_argument("--calib-block", type=int)
    p.add_argument("--calib-num-cat", type=int)
    p.add_argument("--calib-ranks", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--num-cat", type=int)
    p.add_argument("--ranks", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hw", type=int, default=96, help="square frame size in pixels")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.project:
        _write(args.json, project())
        return
    if args.calibrate is None:
        p.error("give --calibrate TRACE with the calibration and target settings, or --project")
    cal = plan_for(args.calib_frames, args.calib_block, args.calib_num_cat, args.steps, args.calib_ranks,
                   args.layers, args.hw)
    model = calibrate(args.calibrate, cal)
    blocks, _, num_cat, steps, tpf, layers = plan_for(args.frames, args.block, args.num_cat, args.steps, args.ranks,
                                                      args.layers, args.hw)
    # Fixed per-rank costs transfer by role: first rank, middle ranks (none fitted: 0), last rank.
    fixed = model["fixed"]
    model = dict(model, fixed=[fixed[0]] + [0.0] * (args.ranks - 2) + [fixed[-1]] if args.ranks > 1
                 else [fixed[0] + fixed[-1]])
    out = simulate(blocks, steps, num_cat, tpf, layers, model)
    result = {"model": model, "prediction": out, "hop": HOP}
    print(json.dumps(result))
    _write(args.json, result)


def _write(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
