"""The Triton kernels (--triton-kernels) against their PyTorch references, on CPU under the Triton interpreter at
small shapes; tests/test_gpu.py repeats the comparisons compiled on CUDA at full shapes.

TRITON_INTERPRET=1 is set per test (monkeypatch), not for the module: the kernels are built per mode when first
called (train_gpt.triton_kernels), so the compiled kernels of tests/test_gpu.py in the same pytest process are
untouched. Skipped where triton is not installed.

Tolerances. fp32 inputs: the kernels do the reference's fp32 math in another order (a sum over the vocabulary
per row, tile-wise dot products), so 1e-5 relative. bf16 outputs: both sides compute in fp32 and round once to
bf16, but the interpreter converts fp32 -> bf16 by truncation where the GPU rounds to nearest, so one bf16 unit
in the last place: relative 2^-7 (8 significant bits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

BF16_ULP = 2.0 ** -7


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference_head_loss(logits, targets, weights, cap, shift, div):
    """head_loss after its matmul, as the trainer computes it without --triton-kernels."""
    z = tg.softcap_logits(logits.float(), cap, shift, div)
    if weights is None:
        return F.cross_entropy(z, targets, reduction="sum")
    return tg.multi_token_cross_entropy(z, targets, weights)


def loss_and_grad(fn, logits, *args, grad_scale=1.0):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, *args)
    (loss * grad_scale).backward()
    return loss.detach(), logits.grad


def ce_case(rows, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 6).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[3:7] = 11  # the same target at consecutive positions: several weights hit one logit of a row
    targets[-1] = vocab - 1  # the last column (a partial block of the vocabulary)
    return logits, targets


# cap, shift, div: #28 (div 0 means cap/4) and 2026
SOFTCAPS = [(30.0, 0.0, 7.5), (23.0, 5.0, 7.5)]
# next-token only; 2026's first stage; a zero weight; offsets past several sequence ends (rows 10 < 4 + ...)
WEIGHTS = [None, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), (1.0, 0.0, 0.75, 0.5)]


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_fused_cross_entropy_matches_reference_fp32(softcap, weights):
    logits, targets = ce_case(10, 300, torch.float32)  # 300: one full block of 256 and a partial one
    w = None if weights is None else torch.tensor(weights)
    loss, grad = loss_and_grad(tg.softcapped_cross_entropy, logits, targets, w, *softcap, grad_scale=0.37)
    ref_loss, ref_grad = loss_and_grad(reference_head_loss, logits, targets, w, *softcap, grad_scale=0.37)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 0.25)])
def test_fused_cross_entropy_matches_reference_bf16(weights):
    """bf16 logits as the GPU head gives them: read as bf16 (no fp32 copy), gradient returned in bf16."""
    logits, targets = ce_case(12, 260, torch.bfloat16, seed=1)
    w = None if weights is None else torch.tensor(weights)
    loss, grad = loss_and_grad(tg.softcapped_cross_entropy, logits, targets, w, 23.0, 5.0, 7.5)
    ref_loss, ref_grad = loss_and_grad(reference_head_loss, logits, targets, w, 23.0, 5.0, 7.5)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=BF16_ULP, atol=1e-6)


def test_fused_cross_entropy_rows_and_no_grad():
    """Per-row losses are the reference's per position (terms past the end dropped); validation (no grad) works."""
    logits, targets = ce_case(6, 40, torch.float32)
    w = torch.tensor([1.0, 0.5, 0.25])
    losses, _ = tg.softcapped_ce_op()(logits, targets, w, 23.0, 5.0, 7.5)
    z = tg.softcap_logits(logits, 23.0, 5.0, 7.5)
    nll = torch.logsumexp(z, -1)[:, None] - z  # (rows, vocab)
    expected = torch.stack([sum(w[k] * nll[r, targets[r + k]] for k in range(3) if r + k < 6) for r in range(6)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(tg.softcapped_cross_entropy(logits, targets, None, 30.0, 0.0, 7.5),
                                   reference_head_loss(logits, targets, None, 30.0, 0.0, 7.5), rtol=1e-5, atol=0)


def test_head_loss_with_fused_ce_is_head_loss():
    """head_loss's hook: the matmul, then the kernel (2026 squash, multi-token weights), against its own code path."""
    g = torch.Generator().manual_seed(2)
    x, head_w = torch.randn(20, 32, generator=g), torch.randn(300, 32, generator=g) / 4
    targets, weights = torch.randint(0, 300, (20,), generator=g), torch.tensor([1.0, 0.5, 0.25])
    results = []
    for fused in (False, True):
        w = head_w.clone().requires_grad_()
        loss = tg.head_loss(x, w, targets, 23.0, None, mtp_weights=weights, logit_shift=5.0, logit_div=7.5, fused_ce=fused)
        loss.backward()
        results.append((loss.detach(), w.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 40, 150), (2, 72, 24), (1, 32, 32)])
def test_symmetric_matmul_matches_torch(shape):
    """X X^T (tiles above the diagonal, mirrored), batched, n and k not multiples of the tiles (32 x 32, k in
    blocks of 128 under the interpreter); then bA + cA^2."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gram = tg.symmetric_matmul(x)
    torch.testing.assert_close(gram, x @ x.mT, rtol=1e-5, atol=1e-5)
    assert torch.equal(gram[..., :32, 32:], gram[..., 32:, :32].mT)  # tile (0, 1) computed, tile (1, 0) its mirror
    poly = tg.symmetric_matmul(gram, alpha=-0.3, beta=1.7, add_input=True)
    torch.testing.assert_close(poly, torch.baddbmm(gram, gram, gram, beta=1.7, alpha=-0.3), rtol=1e-5, atol=1e-3)
    xb = x.bfloat16()
    gram_b = tg.symmetric_matmul(xb)
    assert gram_b.dtype == torch.bfloat16
    torch.testing.assert_close(gram_b.float(), xb.float() @ xb.float().mT, rtol=BF16_ULP, atol=1e-6)
    poly_b = tg.symmetric_matmul(gram_b, alpha=2.0, beta=-4.5, add_input=True)
    exact = torch.baddbmm(gram_b.float(), gram_b.float(), gram_b.float(), beta=-4.5, alpha=2.0)
    torch.testing.assert_close(poly_b.float(), exact, rtol=BF16_ULP, atol=1e-6 * exact.abs().max().item())


@pytest.mark.parametrize("shape", [(2, 24, 40), (40, 24)])
def test_orthogonalize_with_symmetric_kernels_matches_the_fused_steps(shape):
    """Five Polar Express steps in bf16 against the same steps in fp32. torch's bf16 steps (polar_step_fused) land
    2% from them; the kernels under the interpreter about 6%, because the interpreter truncates every fp32 -> bf16
    rounding (a bias that compounds over 5 steps x 3 products); a wrong coefficient or tile lands > 30% away.
    On CUDA (round to nearest) tests/test_gpu.py holds the kernels to torch's bf16 steps."""
    grads = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    coeffs, norm_safety, eps = tg.ORTHOGONALIZERS["polar_express_2026"]
    x = grads.bfloat16().float()
    x = x.mT if x.size(-2) > x.size(-1) else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * norm_safety + eps)
    for a, b, c in coeffs:
        x = tg.polar_step(x, a, b, c)
    exact = x.mT if grads.size(-2) > grads.size(-1) else x
    ref = tg.orthogonalize(grads, "polar_express_2026").float()
    out = tg.orthogonalize(grads, "polar_express_2026", symmetric=True).float()
    assert out.shape == ref.shape
    assert ((ref - exact).norm() / exact.norm()).item() < 0.03
    assert ((out - exact).norm() / exact.norm()).item() < 0.08


def reference_mlp(x, fc_w, proj_w):
    return F.linear(F.relu(F.linear(x, fc_w.T)).square(), proj_w)  # MLP.forward


def mlp_grads(fn, x, fc_w, proj_w, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, fc_w, proj_w)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_matches_reference(dtype):
    """relu(x W1)^2 W2^T and its three gradients; 40 rows, width 80 and 72 hidden units are not multiples of the
    interpreter's tiles (32 x 64, k in blocks of 64)."""
    g = torch.Generator().manual_seed(0)
    x, fc_w, proj_w = (torch.randn(1, 40, 80, generator=g), torch.randn(80, 72, generator=g) / 9,
                       torch.randn(80, 72, generator=g) / 8)
    grad_out = torch.randn(1, 40, 80, generator=g)
    x, fc_w, proj_w, grad_out = (t.to(dtype) for t in (x, fc_w, proj_w, grad_out))
    fused = mlp_grads(tg.fused_mlp, x, fc_w, proj_w, grad_out)
    ref = mlp_grads(reference_mlp, x, fc_w, proj_w, grad_out)
    for name, a, b in zip(["out", "grad_x", "grad_fc_w", "grad_proj_w"], fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
        else:  # bf16: the reference rounds pre, post and relu'(pre) g separately; the kernel rounds once
            rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert rel < 2 * BF16_ULP, (name, rel)


def test_pre_and_post_of_the_mlp_kernel():
    """The forward epilogue writes pre = x W1 and post = relu(pre)^2; the backward one 2 (g W2) relu(pre)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 70, generator=g), torch.randn(70, 130, generator=g)
    pre, post = tg.matmul_relu2(a, b)
    torch.testing.assert_close(pre, a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, torch.relu(a @ b).square(), rtol=1e-5, atol=1e-4)
    grad = torch.randn(33, 70, generator=g)
    torch.testing.assert_close(tg.matmul_relu2(grad, b, aux=pre), 2 * (grad @ b) * torch.relu(pre), rtol=1e-5, atol=1e-4)


def hopper_signature(fn, pointers: dict, constexprs: dict) -> dict:
    """The signature a CUDA launch would give: pointer dtypes, constexprs, unit strides specialized to 1 (as
    triton's JIT does with an integer argument equal to 1), other integers i32, other scalars fp32."""
    floats = {"cap", "shift", "div", "alpha", "beta"}
    return {name: pointers.get(name) or ("constexpr" if name in constexprs else "fp32" if name in floats else "i32")
            for name in fn.arg_names}


TRITON_VERSION = tuple(int(v) for v in __import__("triton").__version__.split(".")[:2])


@pytest.mark.skipif(TRITON_VERSION < (3, 9), reason="written against triton 3.9's ASTSource and compile options")
def test_kernels_compile_for_hopper_without_a_gpu(monkeypatch, tmp_path):
    """The compiled (not interpreted) kernels, at the trainer's launch settings, through triton's whole pipeline to
    an sm_90 cubin (ptxas ships with triton): what the interpreter cannot check (types, layouts, tensor-core dots)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernels = tg.triton_kernels(False)
    bf16, f32, i64 = "*bf16", "*fp32", "*i64"
    ce_ptrs = dict(logits_ptr=bf16, targets_ptr=i64, weights_ptr=f32, loss_ptr=f32, lse_ptr=f32, grad_loss_ptr=f32,
                   grad_ptr=bf16)
    launches = [
        ("softcap_ce_forward", ce_ptrs, dict(N_WEIGHTS=3, ROWS=1, BLOCK=2048), 8, 3),
        ("softcap_ce_backward", ce_ptrs, dict(N_WEIGHTS=3, ROWS=1, BLOCK=2048, grad_loss_stride=0), 8, 3),
        ("symmetric_matmul", dict(x_ptr=bf16, out_ptr=bf16),
         dict(ADD_INPUT=True, UPCAST=False, BLOCK=128, BLOCK_K=64, stride_xc=1, stride_oc=1), 8, 3),
        ("symmetric_matmul", dict(x_ptr=bf16, out_ptr=bf16),
         dict(ADD_INPUT=False, UPCAST=False, BLOCK=64, BLOCK_K=64, stride_xc=1, stride_oc=1), 4, 3),
        ("matmul_relu2", dict(a_ptr=bf16, b_ptr=bf16, out_ptr=bf16, aux_ptr=bf16),
         dict(FORWARD=False, UPCAST=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, stride_ak=1, stride_bn=1,
              stride_on=1), 8, 3),
    ]
    for name, pointers, constexprs, warps, stages in launches:
        fn = kernels[name]
        source = ASTSource(fn=fn, signature=hopper_signature(fn, pointers, constexprs), constexprs=constexprs)
        compiled = tg.triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        assert compiled.asm["cubin"], name
        if name != "softcap_ce_forward" and name != "softcap_ce_backward":
            assert "warp_group_dot" in compiled.asm["ttgir"], name  # Hopper tensor cores (wgmma)


# -----------------------------------------------------------------------------
# The flag


def tiny_config(*extra):
    """The tiny preset, smaller still (the interpreter's cost is per kernel launch, program and operation)."""
    return tg.parse_config(["--preset", "tiny", "--device", "cpu", "--vocab-size", "384", "--stage-seq-len", "128,128,128,128",
                            "--stage-batch-tokens", "128,128,128,128", "--num-layers", "2", "--no-attn-layers", "",
                            "--long-window-layers", "0", "--paired-head-layers", "", "--value-embed-layers", "1",
                            "--skip-connection", "", "--attn-source-layer", "-1", "--no-mudd", "--xsa-layers", "", "--attn-gate-layers", "", "--dc-layer", "-1", "--bigram-rows", "0", "--model-dim", "64",
                            "--num-heads", "2", "--head-dim", "32", "--val-seq-len", "128", "--val-tokens", "128",
                            "--no-adam-odd-steps-only", "--embed-split-stage", "0", *extra])


def perturbed_model(cfg):
    torch.manual_seed(0)
    model = tg.GPT(cfg, 128)
    with torch.no_grad():  # the zero-init head and projections would hide the MLP and the optimizer from the loss
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_flag_wires_every_kernel_into_the_training_step(monkeypatch):
    """One train_step of a small model (vocab 384, 128 tokens, 2 layers of width 64) with and without
    --triton-kernels ce,symmetric,mlp: every kernel runs, the loss and the Adam updates (which follow the gradients
    of the ce and mlp kernels) agree to 1e-5. The Muon updates agree to 25%: the interpreter's truncation to bf16
    (see the orthogonalize test) is amplified by the first Polar Express step (slope ~20 near singular value 1)
    and lands anywhere in the step's band ~[0.7, 1.2]; measured 4-5% on the matrices, 18% on a 1 x 12 gate."""
    launched = []
    kernel = tg.kernel
    monkeypatch.setattr(tg, "kernel", lambda name: launched.append(name) or kernel(name))
    torch.manual_seed(1)
    inputs = torch.randint(0, 384, (128,), dtype=torch.int32)
    targets = torch.randint(0, 384, (128,))
    results = []
    for kernels in ("", "ce,symmetric,mlp"):
        cfg = tiny_config("--triton-kernels", kernels)
        tg.check_config(cfg, 1)
        model = perturbed_model(cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = tg.build_optimizers(model, cfg, tg.Comm())
        assert opt.muon.symmetric_kernels == ("symmetric" in kernels)
        assert all(block.mlp.fused == ("mlp" in kernels) for block in model.blocks)
        assert model.head_options(tg.schedule_at(1, cfg)).get("fused_ce", False) == ("ce" in kernels)
        loss = tg.train_step(model, [(inputs, targets)], opt, 1, cfg).item()
        results.append((loss, {n: p.detach() - before[n] for n, p in model.named_parameters()}))
    (plain_loss, plain_updates), (kernel_loss, kernel_updates) = results
    assert kernel_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, update in plain_updates.items():
        diff = (kernel_updates[name] - update).norm().item()
        muon = update.ndim >= 2 and "blocks." in name
        assert diff <= (0.25 if muon else 1e-5) * update.norm().item() + 1e-7, (name, diff, update.norm().item())
    assert set(launched) == {"softcap_ce_forward", "softcap_ce_backward", "matmul_relu2", "symmetric_matmul"}


def test_flag_is_checked_before_training(monkeypatch):
    with pytest.raises(tg.ConfigError, match=r"--triton-kernels 'ce,fast': unknown fast; choose from ce, symmetric, mlp"):
        tg.check_config(tiny_config("--triton-kernels", "ce,fast"), 1)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(tg.ConfigError, match=r"runs only under the Triton interpreter \(TRITON_INTERPRET=1"):
        tg.check_config(tiny_config("--triton-kernels", "ce"), 1)
    assert tg.check_config(tiny_config(), 1) == 1  # no kernels: nothing checked
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with pytest.raises(tg.ConfigError, match=r"--triton-kernels mlp needs triton: pip install triton"):
        tg.check_config(tiny_config("--triton-kernels", "mlp", "--device", "cuda"), 1)


def test_cli_refuses_the_flag_on_cpu_without_the_interpreter_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--preset", "tiny", "--device", "cpu",
                             "--log-dir", str(tmp_path), "--triton-kernels", "ce"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train_gpt.py: error: --triton-kernels ce on --device cpu runs only under the Triton interpreter "
        "(TRITON_INTERPRET=1, slow: for tests); leave the flag out on CPU"]
