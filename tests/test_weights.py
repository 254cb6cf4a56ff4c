"""Loading model weights (diffusers folders and original-Wan files) one rank's share at a time."""

import contextlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file

from dualpar.models import original_wan as ow
from dualpar.models import weights as wt
from dualpar.models.tiny import tiny_transformer
from dualpar.models.wan import BlockShape
from dualpar.schedule import split_layers

LAYERS = 8  # the tiny preset's depth
RANKS = [(n, r) for n in (1, 2, 3) for r in range(n)]
GUIDANCE = 5.0


def _script(root):
    path = Path(root) / "scripts" / "make_tiny_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def diffusers_loading():
    """Let diffusers' ``from_pretrained`` load a Wan transformer without ``accelerate``.

    diffusers 0.42 refuses to honour ``_keep_in_fp32_modules`` without
    accelerate (it needs ``low_cpu_mem_usage``); in float32 the list changes
    nothing, so the reference loads without it.
    """
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, root):
    out = tmp_path_factory.mktemp("ckpt") / "wan-tiny"
    _script(root).make_tiny_checkpoint(out, seed=0, max_shard_size="1MB")
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    with diffusers_loading():
        return WanTransformer3DModel.from_pretrained(model_dir / "transformer").eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn(1, 16, 3, 4, 6, generator=g)
    embeds = torch.randn(2, 8, 32, generator=g)  # [cond, uncond] text-encoder states
    return latents, embeds, torch.tensor([700.0])


def _slice_state(part, first):
    """A slice's weights under the model's names (``layers.j`` -> ``blocks.first+j``)."""
    out = {}
    for name, t in part.state_dict().items():
        if name.startswith("layers."):
            j, rest = name[len("layers.") :].split(".", 1)
            name = f"blocks.{first + int(j)}.{rest}"
        out[name] = t
    return out


def _run_slices(parts, inputs):
    """Chain the ranks' slices over one block, as the engine does with no context."""
    latents, embeds, t = inputs
    _, _, f, h, w = latents.shape
    shape = BlockShape(context=0, own=f, extra=0, keep=0, height=h, width=w)
    text = parts[0].text_context(embeds)
    packet = parts[0].embed(latents, t, batch=2)
    for part in parts:
        part.set_text(text)
        packet, _ = part.forward_layers(packet, shape)
    return parts[-1].head(packet, shape, GUIDANCE)


@torch.no_grad()
def _run_diffusers(model, inputs):
    latents, embeds, t = inputs
    out = model(hidden_states=torch.cat([latents, latents]), timestep=t.expand(2), encoder_hidden_states=embeds).sample
    return out[1:] + GUIDANCE * (out[:1] - out[1:])


# -- the tiny-folder script ------------------------------------------------------------------


def test_script_writes_a_sharded_reloadable_pipeline(model_dir):
    shards = sorted((model_dir / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((model_dir / "transformer" / wt.WEIGHTS_INDEX_NAME).read_text())
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert wt.check_model_dir(model_dir)["num_layers"] == LAYERS

    with diffusers_loading():
        pipe = WanPipeline.from_pretrained(model_dir)  # a local folder: no network
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    # the default checkpoint is exactly the tiny-random preset (built in-process from the seed)
    preset = tiny_transformer(0).state_dict()
    loaded = pipe.transformer.state_dict()
    assert preset.keys() == loaded.keys()
    assert all(torch.equal(preset[k], loaded[k]) for k in preset)


def test_script_sizes(root):
    mod = _script(root)
    cfg = mod.transformer_config(dim=256, heads=4, layers=3)
    sizes = (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"])
    assert sizes == (4, 64, 1024, 3)
    base = mod.transformer_config(dim=1024, heads=8)
    layers = mod.layers_for_size(base, 300, torch.bfloat16)
    assert 6 <= layers <= 10  # ~33.6 MB per bf16 layer at dim 1024, ffn 4096


# -- loading one rank's share ---------------------------------------------------------------


@pytest.mark.parametrize("world,rank", RANKS)
def test_slice_reads_exactly_its_tensors(model_dir, reference, monkeypatch, world, rank):
    first, last = split_layers(LAYERS, world)[rank]
    opened = []
    real_open = wt.safe_open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(wt, "safe_open", recording_open)
    part, loaded = wt.load_transformer_slice(model_dir, first, last)

    ref = reference.state_dict()
    owns = wt.transformer_keys_for(reference.config, first, last)
    owned = {k for k in ref if owns(k)}
    assert loaded == owned
    state = _slice_state(part, first)
    assert state.keys() == owned
    for k in owned:
        assert state[k].dtype == torch.float32 and torch.equal(state[k], ref[k]), k

    # only the shards holding owned tensors were opened
    weight_map = json.loads((model_dir / "transformer" / wt.WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    assert set(opened) == {weight_map[k] for k in owned}
    if world > 1:
        assert len(set(opened)) < len(set(weight_map.values()))

    # RoPE tables are real, recomputed, and equal diffusers'
    assert torch.equal(part.rope.freqs_cos, reference.rope.freqs_cos)
    assert torch.equal(part.rope.freqs_sin, reference.rope.freqs_sin)
    assert not any(t.is_meta for t in [*part.parameters(), *part.buffers()])
    params = list(part.parameters())
    assert len(params) == len(owned) and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert not any(p.requires_grad for p in params) and not part.training


def test_transformer_keys_for_ends():
    cfg = {"num_layers": 8}
    mid = wt.transformer_keys_for(cfg, 2, 5)
    assert mid("blocks.2.attn1.to_q.weight") and mid("blocks.4.ffn.net.2.bias")
    assert not mid("blocks.5.attn1.to_q.weight") and not mid("blocks.1.norm2.weight")
    assert not mid("patch_embedding.weight") and not mid("scale_shift_table") and not mid("proj_out.bias")
    ends = wt.transformer_keys_for(cfg, 0, 8)
    assert ends("patch_embedding.weight") and ends("condition_embedder.time_proj.bias")
    assert ends("scale_shift_table") and ends("norm_out.weight") and ends("proj_out.weight")
    assert not ends("rope.freqs_cos")
    with pytest.raises(ValueError):
        wt.transformer_keys_for(cfg, 3, 9)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loaded_slices_match_diffusers_forward(model_dir, reference, inputs, world):
    parts = [wt.load_transformer_slice(model_dir, a, b)[0] for a, b in split_layers(LAYERS, world)]
    with torch.no_grad():
        ours = _run_slices(parts, inputs)
    ref = _run_diffusers(reference, inputs)
    assert ours.shape == ref.shape == inputs[0].shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_low_precision_keeps_fp32_modules(model_dir, reference):
    part, _ = wt.load_transformer_slice(model_dir / "transformer", 0, LAYERS, dtype=torch.bfloat16)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, t in _slice_state(part, 0).items():
        want = torch.float32 if any(p in keep for p in name.split(".")) else torch.bfloat16
        assert t.dtype == want, name
    assert part.layers[0].norm2.weight.dtype == torch.float32
    assert part.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert part.layers[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(part.rope.freqs_cos, reference.rope.freqs_cos)


def test_state_dict_missing_or_misshapen_tensor(reference):
    sd = dict(reference.state_dict())
    del sd["blocks.4.attn2.to_k.bias"]
    part, keys = wt.load_transformer_slice_from_state_dict(reference.config, sd, 0, 4)  # not owned: fine
    assert "blocks.4.attn2.to_k.bias" not in keys
    with pytest.raises(wt.WeightsError, match=re.escape("'blocks.4.attn2.to_k.bias'")):
        wt.load_transformer_slice_from_state_dict(reference.config, sd, 4, 8)
    sd = dict(reference.state_dict(), **{"blocks.0.attn1.to_q.weight": torch.zeros(3, 3)})
    with pytest.raises(wt.WeightsError, match="blocks.0.attn1.to_q.weight.*shape"):
        wt.load_transformer_slice_from_state_dict(reference.config, sd, 0, 1)


# -- original Wan naming --------------------------------------------------------------------

# diffusers -> original Wan names, written out independently of the code's table.
_TO_ORIGINAL = [
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # cross-attention norm
    (r"blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),  # pre-FFN norm
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"patch_embedding\.", "patch_embedding."),
]


def to_original_names(sd):
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TO_ORIGINAL:
            new, n = re.subn("^" + pattern, repl, k)
            if n:
                out[new] = v
                break
        else:
            raise AssertionError(f"no original name for {k}")
    return out


@pytest.fixture(scope="module")
def varied_state(reference):
    """The reference weights with non-trivial cross-attention norm scales (ones in the preset)."""
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    for i in range(LAYERS):
        w = sd[f"blocks.{i}.norm2.weight"]
        sd[f"blocks.{i}.norm2.weight"] = 1 + 0.3 * torch.randn(w.shape, generator=g)
    return sd


def test_original_names_map_like_diffusers(varied_state):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    orig = to_original_names(varied_state)
    assert "blocks.0.norm3.weight" in orig and not any(".norm2." in k for k in orig)
    ours = ow.convert_original_wan_state_dict(orig)
    theirs = convert_wan_transformer_to_diffusers(dict(orig))
    assert ours.keys() == theirs.keys() == varied_state.keys()
    assert all(ours[k] is theirs[k] is varied_state[k] for k in ours)
    assert ow.original_to_diffusers_key("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert ow.original_to_diffusers_key("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert ow.original_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert ow.original_to_diffusers_key("blocks.3.modulation") == "blocks.3.scale_shift_table"
    assert ow.original_to_diffusers_key("blocks.3.cross_attn.k_img.weight") is None
    # the reverse direction, read from the same table, gives the independent renaming back
    assert [ow.diffusers_to_original_key(k) for k in varied_state] == list(orig)
    assert ow.diffusers_to_original_key("blocks.3.attn2.to_out.0.bias") == "blocks.3.cross_attn.o.bias"
    assert ow.diffusers_to_original_key("rope.freqs_cos") is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_original_wan_file_matches_diffusers_twin(tmp_path, model_dir, reference, varied_state, inputs, suffix):
    orig = {"model." + k: v for k, v in to_original_names(varied_state).items()}
    ema = {k: torch.zeros_like(v) for k, v in orig.items()}
    path = tmp_path / f"generator{suffix}"
    if suffix == ".safetensors":  # flat names: the nesting becomes a dotted prefix
        flat = {f"generator.{k}": v for k, v in orig.items()}
        flat |= {f"generator_ema.{k}": v for k, v in ema.items()}
        save_file(flat, path)
    else:
        torch.save({"generator": orig, "generator_ema": ema, "step": 120}, path)

    raw = ow.load_original_wan_file(path)
    sd = ow.convert_original_wan_state_dict(raw)
    assert sd.keys() == varied_state.keys()
    assert all(torch.equal(sd[k], varied_state[k]) for k in sd)
    assert all(not t.any() for t in ow.convert_original_wan_state_dict(raw, prefer_ema=True).values())

    cfg = reference.config
    twin, _ = wt.load_transformer_slice_from_state_dict(cfg, varied_state, 0, LAYERS)
    part, keys = wt.load_transformer_slice_from_state_dict(cfg, sd, 0, LAYERS)
    assert keys == set(varied_state)
    # the cross-attention norm (diffusers norm2) got the original norm3's varied scale
    assert torch.equal(part.layers[2].norm2.weight, varied_state["blocks.2.norm2.weight"])
    assert part.layers[2].norm3.weight is None  # pre-FFN norm: no affine parameters
    with torch.no_grad():
        assert torch.equal(_run_slices([part], inputs), _run_slices([twin], inputs))

    # straight from the file, a middle rank reads only its own tensors
    first, last = split_layers(LAYERS, 3)[1]
    mid, keys = ow.load_original_wan_slice(model_dir, path, first, last)  # config from the folder
    owns = wt.transformer_keys_for(cfg, first, last)
    assert keys == {k for k in varied_state if owns(k)}
    state = _slice_state(mid, first)
    assert all(torch.equal(state[k], varied_state[k]) for k in keys)


def test_original_names_strict_and_nesting():
    t = torch.ones(2)
    nested = {"state_dict": {"generator": {"model.blocks.0.ffn.0.weight": t}}}
    assert ow.convert_original_wan_state_dict(nested) == {"blocks.0.ffn.net.0.proj.weight": t}
    assert ow.convert_original_wan_state_dict({"blocks.0.self_attn.o.bias": t}) == {"blocks.0.attn1.to_out.0.bias": t}
    with pytest.raises(wt.WeightsError, match="img_emb.proj.0.weight"):
        ow.convert_original_wan_state_dict({"model.blocks.0.ffn.0.weight": t, "model.img_emb.proj.0.weight": t})
    loose = ow.convert_original_wan_state_dict({"blocks.0.ffn.0.weight": t, "img_emb.proj.0.weight": t}, strict=False)
    assert loose.keys() == {"blocks.0.ffn.net.0.proj.weight"}


def test_original_config_conversion():
    cfg = wt.convert_original_wan_config(
        {"dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v",
         "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512, "eps": 1e-6}
    )  # fmt: skip
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]) == (12, 128, 30)
    with pytest.raises(wt.WeightsError, match="i2v"):
        wt.convert_original_wan_config({"dim": 8, "num_heads": 2, "ffn_dim": 8, "num_layers": 1, "model_type": "i2v"})


# -- validating a folder ----------------------------------------------------------------------


def _break_model_index(d):
    (d / "model_index.json").unlink()
    return "model_index.json"


def _break_transformer_config(d):
    (d / "transformer" / "config.json").unlink()
    return str(Path("transformer") / "config.json")


def _break_shard(d):
    shard = sorted((d / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    return shard.name


def _break_json(d):
    (d / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000,')
    return str(Path("scheduler") / "scheduler_config.json")


def _break_index(d):
    (d / "transformer" / wt.WEIGHTS_INDEX_NAME).write_text("[1, 2")
    return wt.WEIGHTS_INDEX_NAME


def _break_tokenizer(d):
    (d / "tokenizer" / "tokenizer.json").unlink()
    return "tokenizer"


def _break_vae(d):
    shutil.rmtree(d / "vae")
    return "vae"


BREAKERS = [
    _break_model_index,
    _break_transformer_config,
    _break_shard,
    _break_json,
    _break_index,
    _break_tokenizer,
    _break_vae,
]


@pytest.mark.parametrize("breaker", BREAKERS)
def test_check_model_dir_names_the_problem(model_dir, tmp_path, breaker):
    d = tmp_path / "wan"
    shutil.copytree(model_dir, d)
    assert wt.check_model_dir(d)["num_layers"] == LAYERS
    culprit = breaker(d)
    with pytest.raises(wt.WeightsError) as err:
        wt.check_model_dir(d)
    msg = str(err.value)
    assert culprit in msg and str(d) in msg and "\n" not in msg
    if breaker is _break_json:
        assert "malformed JSON" in msg


def test_missing_shard_fails_only_the_ranks_that_need_it(model_dir, tmp_path):
    d = tmp_path / "wan"
    shutil.copytree(model_dir, d)
    name = _break_shard(d)
    index = json.loads((d / "transformer" / wt.WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    lost = {k for k, shard in index.items() if shard == name}
    assert not any(wt.transformer_keys_for({"num_layers": LAYERS}, 0, 2)(k) for k in lost)
    assert any(wt.transformer_keys_for({"num_layers": LAYERS}, 6, LAYERS)(k) for k in lost)
    wt.load_transformer_slice(d, 0, 2)  # never opens the lost shard
    with pytest.raises(wt.WeightsError, match=re.escape(name)):
        wt.load_transformer_slice(d, 6, LAYERS)
    with pytest.raises(wt.WeightsError, match="model folder not found"):
        wt.load_transformer_slice(tmp_path / "nowhere", 0, 1)


class _NotAWeight:
    pass


def test_original_file_is_read_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"generator": {"blocks.0.ffn.0.weight": torch.ones(2)}, "extra": _NotAWeight()}, path)
    with pytest.raises(wt.WeightsError, match="only weights_only loading"):
        ow.load_original_wan_file(path)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(wt.WeightsError, match="unsupported checkpoint file type"):
        ow.load_original_wan_file(tmp_path / "w.ckpt")
