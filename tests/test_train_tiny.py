"""scripts/train_tiny.py: reproducible from its seed, resumable to the same weights, and what it
writes is a model folder the engine runs. Tiny sizes and a few steps: the script, not the model."""

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import gen

SMALL = ["--size", "32", "--vae-image-steps", "3", "--vae-clip-steps", "2", "--clips", "4", "--dit-steps", "2",
         "--dit-batch", "2", "--save-every", "1", "--threads", "1", "--no-progress"]


def train(root, work, out, *extra):
    res = subprocess.run([sys.executable, str(Path(root) / "scripts" / "train_tiny.py"), "--work", str(work),
                          "--out", str(out), *SMALL, *extra], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(out):
    return {part: load_file(Path(out) / part / "diffusion_pytorch_model.safetensors") for part in ("vae", "transformer")}


def test_a_resumed_training_equals_an_uninterrupted_one_and_the_engine_runs_it(root, tmp_path):
    train(root, tmp_path / "wa", tmp_path / "a")
    first = train(root, tmp_path / "wb", tmp_path / "b", "--stop-after", "vae-clip")
    assert not (tmp_path / "b").exists() and "dit" not in first.stderr
    second = train(root, tmp_path / "wb", tmp_path / "b")
    assert "vae-clip: resumed at step 2/2" in second.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(a[part][k].equal(b[part][k]) for k in a[part]), part
    assert (tmp_path / "wa" / "losses.png").stat().st_size > 0

    # the folder is a model: the engine loads and runs it (2 ranks, one block)
    res = gen(2, ["--model", str(tmp_path / "a"), "--frames", "9", "--height", "32", "--width", "32", "--steps", "2",
                  "--block", "3", "--num-cat", "1", "--set", "model.text_len=32", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "done: 9 frames" in res.stderr, res.stderr[-2000:]


def test_bad_arguments_are_refused(root, tmp_path):
    res = subprocess.run([sys.executable, str(Path(root) / "scripts" / "train_tiny.py"), "--size", "30",
                          "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--size must be a positive multiple of 16" in res.stderr
    assert not (tmp_path / "w").exists()
