"""The GPU-facing options on CPU: they change how, not what, is computed (or are refused up front)."""

import pytest

from test_parallel import launch, read_blocks


@pytest.fixture(scope="module")
def plain(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    launch(root, 1, out)
    return read_blocks(out)[1]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_cfg_rows_one_by_one_equal_the_batch(root, tmp_path, plain):
    launch(root, 2, tmp_path / "run", ["--set", "model.cfg_serial=true"])
    assert _max_diff(read_blocks(tmp_path / "run")[1], plain) <= 1e-6


def test_compiled_layers_equal_eager_and_compile_before_the_ring(root, tmp_path, plain):
    # aot_eager traces the layer with dynamo (the path inductor takes) without generating kernels
    res = launch(root, 1, tmp_path / "run", ["--set", "model.compile=aot_eager"])
    assert _max_diff(read_blocks(tmp_path / "run")[1], plain) <= 1e-6
    assert "compiled the layers (aot_eager) for 6 block shapes" in res.stderr


def test_forced_math_attention_matches_native(root, tmp_path, plain):
    launch(root, 1, tmp_path / "run", ["--set", "model.attention=math"])
    assert _max_diff(read_blocks(tmp_path / "run")[1], plain) <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["--set", "model.attention=flash"], "model.attention flash needs a CUDA device"),
    (["--set", "model.attention=nope"], "model.attention must be one of"),
    (["--set", "model.compile=max"], "model.compile must be one of"),
    (["--set", "parallel.backend=mpi"], "parallel.backend must be one of"),
    (["--mode", "causal", "--set", "model.compile=inductor"], "model.compile applies to the bidirectional mode"),
])
def test_bad_gpu_options_fail_before_loading(root, tmp_path, args, message):
    res = launch(root, 1, tmp_path / "run", args, expect=2)
    assert message in res.stderr and "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_prompt_and_negative_prompt_encoded_with_one_encoder_load(root, tmp_path):
    res = launch(root, 1, tmp_path / "run", ["--guidance", "5"])  # with guidance (the trained preset's is off)
    assert res.stderr.count("text encoder loaded") == 1
    assert "text encoder loaded for 2 prompt(s), then freed" in res.stderr
