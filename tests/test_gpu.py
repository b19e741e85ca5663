"""GPU-only fast paths against their CPU-tested fallbacks. Skipped where there is no CUDA (CI); run them on
a GPU machine with `python -m pytest tests/test_gpu.py -q`."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(device, **overrides):
    args = ["--preset", "tiny", "--device", "cuda"] + [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    cfg = tg.parse_config(args)
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1024).to(device)
    with torch.no_grad():  # zero-init projections and head would hide most of the network from the loss
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.compute_dtype, model.use_flex = torch.bfloat16, True
    return model


def sample_tokens(length, device):
    tokens = tg.load_shard(str(REPO / "data/sample/sample_train_000001.bin"))[: length + 1]
    window = torch.from_numpy(tokens.astype("int64")).to(device)
    return window[:-1].int(), window[1:]


def test_compiled_blocks_match_eager():
    device = torch.device("cuda")
    inputs, targets = sample_tokens(1024, device)
    model = small_model(device)
    eager = model(inputs, targets, 4)
    model.compile_regions()
    compiled = model(inputs, targets, 4)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-2)


def test_flex_attention_on_gpu_matches_dense_mask():
    device = torch.device("cuda")
    inputs, targets = sample_tokens(1024, device)
    model = small_model(device)
    with torch.no_grad():
        flex = model(inputs, targets, 3)
        model.use_flex = False
        dense = model(inputs, targets, 3)
    assert flex.item() == pytest.approx(dense.item(), rel=1e-2)


def test_compiled_flex_attention_with_a_tensor_scale_is_the_float_scale():
    # YaRN's per-stage scale is a tensor (no recompile per stage): inside the compiled kernel q.k x 1 x s must
    # be the same product as q.k x s, forward and backward.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 6, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ids = torch.zeros(1024, dtype=torch.int32, device="cuda")
    ids[[0, 300, 700]] = tg.EOT_TOKEN
    mask = tg.flex_token_window_mask(ids, 384)
    scale = 0.1138629436
    results = []
    for s in (scale, torch.tensor(scale, device="cuda")):
        out = torch.compile(tg.attend, dynamic=False)(q, k, v, mask, s)
        out.float().square().sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for as_float, as_tensor in zip(*results):
        torch.testing.assert_close(as_tensor, as_float, rtol=0, atol=0)
