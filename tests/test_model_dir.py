"""A diffusers-format model folder through ``launch/gen.py``: per-rank loading, exact outputs, clean errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gen
from test_parallel import ARGS, launch, read_blocks, reference

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny_dir(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-wan"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "make_tiny_checkpoint.py"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list((out / "transformer").glob("*.safetensors"))) > 1  # sharded, with an index
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


def test_two_ranks_from_model_folder_equal_the_preset_reference(root, tmp_path, tiny_dir):
    # The folder holds the tiny-random preset's weights: loading it shard by shard on
    # 2 ranks must give the same latents as the in-memory serial reference of that preset.
    res = launch(root, 2, tmp_path / "run", ["--model", str(tiny_dir)])
    assert "Loading weights" not in res.stderr and "%|" not in res.stderr  # --no-progress: no library's bars
    _, got = read_blocks(tmp_path / "run")
    ref = reference("unipc", preset="tiny-random")
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5


def run_bad(root, args, n=1, launcher="fork"):
    """A run that must be refused (exit status returned, not asserted)."""
    return gen(n, [*ARGS, "--no-decode", *args], launcher=launcher, expect=None, timeout=120)


@pytest.mark.parametrize("breakage,named", [
    ("model_index.json", "model_index.json"),
    ("transformer/config.json", "transformer/config.json"),
    ("transformer/diffusion_pytorch_model-00002-of-00010.safetensors", "00002-of-00010"),
    ("vae", "vae"),
])
def test_broken_model_folder_is_one_clear_error(root, tmp_path, tiny_dir, breakage, named):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    target = bad / breakage
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    res = run_bad(root, ["--model", str(bad), "--out", str(tmp_path / "out")])
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert named in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_malformed_model_index_and_missing_folder(root, tmp_path, tiny_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model_index.json").write_text("{not json")
    res = run_bad(root, ["--model", str(bad)])
    assert res.returncode == 2 and "model_index.json" in res.stderr and "Traceback" not in res.stderr
    res = run_bad(root, ["--model", str(tmp_path / "nowhere")])
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr


def test_broken_model_folder_stops_every_rank(root, tmp_path, tiny_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "transformer" / "config.json").unlink()
    res = run_bad(root, ["--model", str(bad)], n=2, launcher="real")  # what torchrun shows the user
    assert res.returncode != 0
    assert res.stderr.count("error: --model") == 1  # printed once, by rank 0


# -- corrupt weights: judged from file headers, before any rank loads anything -------------------

TENSOR = "blocks.3.attn1.to_q.weight"


def _rewrite_shard(d, change):
    """Apply ``change`` to the state dict of the shard holding TENSOR and save it back; the shard's name."""
    tdir = d / "transformer"
    shard = tdir / json.loads((tdir / INDEX).read_text())["weight_map"][TENSOR]
    sd = load_file(shard)
    change(sd)
    save_file(sd, shard, metadata={"format": "pt"})
    return shard.name


def _cut(path, keep):
    """Keep the first ``keep`` bytes of ``path`` (negative: drop that many from the end), as a cut-off copy."""
    path.write_bytes(path.read_bytes()[:keep])
    return f"{path.parent.name}/{path.name}"


def _junk(path, data):
    path.write_bytes(data)
    return f"{path.parent.name}/{path.name}"


def _shard(d, i=1):
    return sorted((d / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[i]


def _set_config(d, **changes):
    path = d / "transformer" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return "config.json"


def _original_state(layers=None):
    """The tiny-random preset's transformer in the original Wan naming, as Self-Forcing ships it (``model.`` prefix)."""
    from test_weights import to_original_names

    from dualpar.models.tiny import tiny_transformer

    sd = to_original_names(tiny_transformer(0).state_dict())
    if layers is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < layers}
    return {"model." + k: v.contiguous() for k, v in sd.items()}


def _transformer_file(tmp, name, write):
    """Write a --transformer-file with ``write(path)``; the options that use it."""
    path = tmp / name
    write(path)
    return ["--transformer-file", str(path)]


def _save_original(sd, cut=False):
    """A writer of ``sd`` as a file of the path's type (nested under ``generator`` in a .pt), optionally cut off."""
    def write(path):
        if path.suffix == ".safetensors":
            save_file(sd, path)
        else:
            torch.save({"generator": sd}, path)
        if cut:
            _cut(path, -100)
    return write


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def _as_int(sd, key):
    return dict(sd, **{key: sd[key].to(torch.int64)})


# Each breaks a copy of the tiny folder (or adds a --transformer-file) and returns
# (extra options, what the one error line must name, what it must say is wrong).
CORRUPTIONS = {
    "shard cut in its data": lambda d, t: ([], _cut(_shard(d), -100), "truncated"),
    "shard cut in its header": lambda d, t: ([], _cut(_shard(d), 40), "truncated"),
    "shard not safetensors": lambda d, t: ([], _junk(_shard(d), b"hello, not weights"), "not a safetensors file"),
    "int tensor": lambda d, t: ([], _rewrite_shard(d, lambda sd: sd.update({TENSOR: sd[TENSOR].to(torch.int32)})),
                                "I32, not a floating-point type"),
    "missing tensor": lambda d, t: ([], _rewrite_shard(d, lambda sd: sd.pop(TENSOR)), f"missing tensor '{TENSOR}'"),
    "wrong shape": lambda d, t: ([], _rewrite_shard(d, lambda sd: sd.update({TENSOR: sd[TENSOR][:-1]})),
                                 f"'{TENSOR}' has shape"),
    "num_layers beyond the weights": lambda d, t: ([], _set_config(d, num_layers=10), "num_layers is 10"),
    "config implies other shapes": lambda d, t: ([], _set_config(d, ffn_dim=4096), "the config"),
    "vae cut": lambda d, t: ([], _cut(d / "vae" / "diffusion_pytorch_model.safetensors", -100), "truncated"),
    "text encoder cut": lambda d, t: ([], _cut(d / "text_encoder" / "model.safetensors", 1000), "truncated"),
    "file junk safetensors": lambda d, t: (
        _transformer_file(t, "junk.safetensors", lambda p: _junk(p, os.urandom(4096))),
        "junk.safetensors", "not a safetensors file"),
    "file junk pt": lambda d, t: (
        _transformer_file(t, "junk.pt", lambda p: _junk(p, b"PK\x03\x04 not a torch file")),
        "junk.pt", "cannot load"),
    "file not a Wan state dict": lambda d, t: (
        _transformer_file(t, "other.pt", lambda p: torch.save({"encoder.weight": torch.ones(2)}, p)),
        "other.pt", "unrecognised tensor 'encoder.weight'"),
    "file in diffusers naming": lambda d, t: (
        _transformer_file(t, "diffusers.safetensors", lambda p: save_file(
            {k: v.contiguous() for k, v in load_file(_shard(d, 0)).items()}, p)),
        "diffusers.safetensors", "unrecognised tensor"),
    "file missing tensor": lambda d, t: (
        _transformer_file(t, "gen.pt", _save_original(_without(_original_state(), "model.blocks.5.cross_attn.k.bias"))),
        "gen.pt", "missing tensor 'blocks.5.cross_attn.k.bias'"),
    "file with fewer layers": lambda d, t: (
        _transformer_file(t, "gen.safetensors", _save_original(_original_state(layers=6))),
        "gen.safetensors", "holds 6 layers"),
    "file int tensor": lambda d, t: (
        _transformer_file(t, "gen.pt", _save_original(_as_int(_original_state(), "model.head.head.weight"))),
        "gen.pt", "int64, not a floating-point type"),
    "file cut": lambda d, t: (
        _transformer_file(t, "gen.safetensors", _save_original(_original_state(), cut=True)),
        "gen.safetensors", "truncated"),
}
# These go through the real launcher (a separate process); the rest call the CLI in-process.
THROUGH_LAUNCHER = {"shard cut in its data", "file junk safetensors"}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_weights_are_one_clear_error_before_loading(root, tmp_path, tiny_dir, monkeypatch, capsys, kind):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    extra, named, what = CORRUPTIONS[kind](bad, tmp_path)
    args = ["--model", str(bad), *extra, "--out", str(tmp_path / "out")]
    if kind in THROUGH_LAUNCHER:
        res = run_bad(root, args, launcher="real")
        code, err = res.returncode, res.stderr
    else:
        from dualpar import cli

        monkeypatch.setattr(cli, "run", lambda cfg, args: pytest.fail(f"{kind}: validation passed"))
        code = cli.main([*ARGS, "--no-decode", *args])
        err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0] and what in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("name,layers_hw", [("wan2.1-t2v-1.3b-480p.yaml", (480, 832, 3.0)),
                                            ("wan2.1-t2v-14b-720p.yaml", (720, 1280, 5.0))])
def test_shipped_real_model_configs_parse_and_validate(root, name, layers_hw):
    from dualpar.config import load_config

    cfg = load_config(os.path.join(root, "configs", name))
    h, w, shift = layers_hw
    assert (cfg.video.height, cfg.video.width, cfg.sampling.flow_shift) == (h, w, shift)
    assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.parallel.block, cfg.parallel.num_cat) == (50, 5.0, 8, 8)
    assert cfg.model.dtype == "bfloat16" and cfg.video.frames == 1025
    cfg.validate(world_size=8, num_layers=30)


def test_shipped_self_forcing_config_matches_its_training(root):
    from dualpar.config import load_config, resolve_budget

    cfg = load_config(os.path.join(root, "configs", "self-forcing-1.3b-480p.yaml"))
    cfg.validate(world_size=8, num_layers=30)
    c, lat = cfg.causal, cfg.video.latent_frames
    assert cfg.sampling.mode == "causal" and cfg.sampling.guidance == 1.0  # distilled: no CFG
    assert lat % c.chunk == 0  # every chunk is 3 latent frames, as Self-Forcing generates them
    # Self-Forcing's local_attn_size (21, its training length) counts the chunk being generated
    assert c.policy == "window" and resolve_budget(c.budget, lat) + c.chunk == 21


def test_original_wan_naming_file_through_the_launcher(root, tmp_path, tiny_dir):
    # The tiny-random preset's transformer renamed to the original Wan naming (as
    # Self-Forcing ships it: nested under "generator", prefixed "model.")
    # must give exactly the same video latents.
    import torch
    from safetensors.torch import save_file
    from test_weights import to_original_names

    from dualpar.models.tiny import tiny_transformer

    sd = to_original_names(tiny_transformer(0).state_dict())
    for fmt in ("safetensors", "pt"):
        path = tmp_path / f"generator.{fmt}"
        if fmt == "pt":
            torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, path)
        else:
            save_file({"generator.model." + k: v.contiguous() for k, v in sd.items()}, str(path))
        launch(root, 2, tmp_path / f"run-{fmt}", ["--model", str(tiny_dir), "--transformer-file", str(path)])
        _, got = read_blocks(tmp_path / f"run-{fmt}")
        ref = reference("unipc", preset="tiny-random")
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5
