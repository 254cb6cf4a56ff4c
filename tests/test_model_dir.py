"""A diffusers-format model folder through the real launcher: per-rank loading, exact outputs, clean errors."""

import os
import shutil
import subprocess
import sys

import pytest

from test_parallel import ARGS, launch, read_blocks, reference


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
    # The folder holds the tiny preset's weights: loading it shard by shard on
    # 2 ranks must give the same latents as the in-memory serial reference.
    launch(root, 2, tmp_path / "run", ["--model", str(tiny_dir)])
    _, got = read_blocks(tmp_path / "run")
    ref = reference("unipc")
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5


def run_bad(root, args, n=1):
    cmd = [sys.executable]
    if n > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cmd += [os.path.join(root, "launch", "gen.py"), *ARGS, "--no-decode", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


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
    res = run_bad(root, ["--model", str(bad)], n=2)
    assert res.returncode != 0
    assert res.stderr.count("error: --model") == 1  # printed once, by rank 0


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


def test_original_wan_naming_file_through_the_launcher(root, tmp_path, tiny_dir):
    # The tiny preset's transformer renamed to the original Wan naming (as
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
        ref = reference("unipc")
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5
