"""Invariant 1: the pipelined engine on N ranks computes exactly the serial reference.

Runs ``launch/gen.py`` on N gloo ranks on CPU (forked by the tests' fork
server; tests/test_cli.py runs the real launcher's ranks against one rank) and
compares every block's latents with :func:`dualpar.reference.serial_reference`,
an independent plain implementation of the schedule's semantics.
"""

import json

import av
import pytest
import torch
from safetensors.torch import load_file

from conftest import gen
from dualpar.config import Config, apply_model_defaults
from dualpar.models import loader
from dualpar.reference import serial_reference

# 23 latent frames in blocks of 4 -> 5 blocks (7, 4, 4, 4, 4): not a multiple of 2, 3 or 4.
ARGS = ["--frames", "89", "--height", "32", "--width", "48", "--block", "4", "--num-cat", "2", "--steps", "4",
        "--set", "model.text_len=32", "--seed", "11", "--no-progress"]


def launch(root, n, out, extra=(), decode=False, timeout=300, base=ARGS, expect=0, launcher="fork", env=None):
    """``launch/gen.py`` on ``n`` ranks with ``base`` then ``extra`` options (see :func:`conftest.gen`)."""
    args = [*base, *extra, "--out", str(out)] + ([] if decode else ["--no-decode"])
    return gen(n, args, launcher=launcher, expect=expect, timeout=timeout, env=env)


def read_blocks(out):
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete", man
    return man, [load_file(out / b["latents"])["latents"] for b in man["blocks"]]


_REF = {}


def reference(scheduler, preset="tiny", shared_noise=True):
    """The serial reference of ``ARGS`` (on the default, trained preset unless told)."""
    key = (scheduler, preset, shared_noise)
    if key not in _REF:
        cfg = Config()
        cfg.model.preset, cfg.parallel.shared_noise = preset, shared_noise
        apply_model_defaults(cfg)  # what the run of that preset uses (the trained one: its guidance)
        for k, v in {"video.frames": 89, "video.height": 32, "video.width": 48, "parallel.block": 4,
                     "parallel.num_cat": 2, "sampling.steps": 4, "model.text_len": 32, "sampling.seed": 11,
                     "sampling.scheduler": scheduler}.items():
            cfg.set(k, v)
        model = loader.load_slice(cfg, 0, loader.num_layers(cfg), torch.device("cpu"))
        tok, te = loader.load_text_encoder(cfg)
        states = loader.encode_prompts(tok, te, [cfg.sampling.prompt, cfg.sampling.negative_prompt], 32)
        _REF[key] = serial_reference(cfg, model, model.text_context(states))
    return _REF[key]


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_n_ranks_equal_serial_reference(root, tmp_path, n, scheduler):
    launch(root, n, tmp_path / "run", ["--scheduler", scheduler])
    man, got = read_blocks(tmp_path / "run")
    ref = reference(scheduler)
    assert [b.shape[2] for b in got] == [7, 4, 4, 4, 4]
    assert len(got) == len(ref) == man["blocks_total"] == 5
    diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
    assert diff <= 1e-5, f"{n} ranks differ from the serial reference by {diff}"


@pytest.mark.parametrize("split", ["1,3,4", "4,3,1"])
def test_an_uneven_layer_split_equals_the_serial_reference(root, tmp_path, split):
    res = launch(root, 3, tmp_path / "run", ["--set", f"parallel.split={split}"])
    counts = [int(c) for c in split.split(",")]
    ends = [sum(counts[:r + 1]) for r in range(3)]
    for r in range(3):  # each rank really holds the layers the split gives it
        assert f"[rank {r}] layers [{ends[r] - counts[r]}, {ends[r]}) of 8" in res.stderr, res.stderr[-2000:]
    _, got = read_blocks(tmp_path / "run")
    assert max((a - b).abs().max().item() for a, b in zip(got, reference("unipc"))) <= 1e-5


def test_a_layer_split_that_misses_layers_is_refused_before_loading(root, tmp_path):
    res = launch(root, 2, tmp_path / "run", ["--set", "parallel.split=3,3"], expect=None)
    assert res.returncode != 0 and "parallel.split 3,3 adds up to 6 layers; the model has 8" in res.stderr
    # both ranks check it; rank 0 alone says so (the fork server gives every rank's stderr)
    assert res.stderr.count("error: parallel.split") == 1 and not (tmp_path / "run" / "manifest.json").exists()


def test_context_changes_the_result(root, tmp_path):
    # Guards the test above: without context the latents must differ, so equality is not vacuous.
    launch(root, 2, tmp_path / "nocat", ["--num-cat", "0"])
    _, got = read_blocks(tmp_path / "nocat")
    ref = reference("unipc")
    assert max((a - b).abs().max().item() for a, b in zip(got[1:], ref[1:])) > 1e-3


def test_fresh_noise_per_block_equals_its_serial_reference(root, tmp_path):
    # the shared-noise ablation: every block draws fresh noise, on the ranks as in the reference
    launch(root, 2, tmp_path / "fresh", ["--set", "parallel.shared_noise=false"])
    _, got = read_blocks(tmp_path / "fresh")
    ref, shared = reference("unipc", shared_noise=False), reference("unipc")
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got[1:], shared[1:])) > 1e-3


def test_two_ranks_stream_a_complete_mp4(root, tmp_path):
    launch(root, 2, tmp_path / "video", decode=True)
    man, got = read_blocks(tmp_path / "video")
    assert max((a - b).abs().max().item() for a, b in zip(got, reference("unipc"))) <= 1e-5
    assert man["frames_written"] == man["frames_total"] == 89
    with av.open(str(tmp_path / "video" / "video.mp4")) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 89
    assert (frames[0].width, frames[0].height) == (48, 32)
