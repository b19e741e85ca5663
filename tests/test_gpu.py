"""GPU-only fast paths against their CPU-tested fallbacks. Skipped where there is no CUDA (CI); run them on
a GPU machine with `python -m pytest tests/test_gpu.py -q`."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def at_stage(model, step=30):
    """The tiny schedule's step (30: stage 2, tied, the next-token loss; windows of 2 and 4 blocks)."""
    return tg.schedule_at(step, model.cfg)


def sample_tokens(length, device):
    tokens = tg.load_shard(str(REPO / "data/sample/sample_train_000001.bin"))[: length + 1]
    window = torch.from_numpy(tokens.astype("int64")).to(device)
    return window[:-1].int(), window[1:]


def test_compiled_blocks_match_eager():
    device = torch.device("cuda")
    inputs, targets = sample_tokens(1024, device)
    model = small_model(device)
    eager = model(inputs, targets, at_stage(model))
    model.compile_regions()
    compiled = model(inputs, targets, at_stage(model))
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-2)


def test_flex_attention_on_gpu_matches_dense_mask():
    device = torch.device("cuda")
    inputs, targets = sample_tokens(1024, device)
    model = small_model(device)
    with torch.no_grad():
        flex = model(inputs, targets, at_stage(model, 16))
        model.use_flex = False
        dense = model(inputs, targets, at_stage(model, 16))
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


# -----------------------------------------------------------------------------
# Triton kernels (--triton-kernels) compiled, at the record's shapes, against their PyTorch references; the same
# comparisons run under the interpreter at small shapes in tests/test_kernels.py. On CUDA both sides round fp32 to
# bf16 to nearest, so a bf16 output may differ by one unit in the last place (relative 2^-7) where the fp32 sums
# of the two sides straddle a rounding boundary.

BF16_ULP = 2.0 ** -7
needs_triton = pytest.mark.skipif(not tg.triton_available(), reason="needs triton")


@pytest.fixture
def compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_triton
@pytest.mark.parametrize("softcap, weights", [((30.0, 0.0, 0.0), None), ((23.0, 5.0, 7.5), (1.0, 0.5, 0.25)),
                                              ((23.0, 5.0, 7.5), (1.0, 0.0))])
def test_fused_cross_entropy_full_vocab_matches_reference(compiled_triton, softcap, weights):
    """16,384 rows of the 50,304-token vocabulary in bf16 (a third of a 49,152-token training sequence)."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    rows, vocab = 16_384, 50_304
    logits = (torch.randn(rows, vocab, device=device, generator=g) * 4).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=device, generator=g)
    targets[100:110] = 7  # repeated targets: several weights on one logit of a row
    w = None if weights is None else torch.tensor(weights, device=device)

    def run(fn):
        leaf = logits.detach().clone().requires_grad_()
        loss = fn(leaf)
        (loss * 0.5).backward()
        return loss.detach(), leaf.grad

    def reference(leaf):
        z = tg.softcap_logits(leaf.float(), *softcap)
        return F.cross_entropy(z, targets, reduction="sum") if w is None else tg.multi_token_cross_entropy(z, targets, w)

    loss, grad = run(lambda leaf: tg.softcapped_cross_entropy(leaf, targets, w, *softcap))
    ref_loss, ref_grad = run(reference)
    assert grad.dtype == torch.bfloat16 and grad.shape == ref_grad.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)  # fp32 sums of 16K x 50K terms in other orders
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=BF16_ULP, atol=1e-3 * ref_grad.float().abs().max().item())
    assert relative_error(grad, ref_grad) < 1e-3


@needs_triton
@pytest.mark.parametrize("shape", [(3, 768, 3072), (24, 768, 3072), (4, 768, 768), (2, 128, 768)])
def test_symmetric_matmul_full_shapes_match_torch(compiled_triton, shape):
    """Muon's stacks: MLP (768 x 3072) on 8 GPUs (3, 64 x 64 tiles) and on 1 (24, 128 x 128 tiles), attention
    (768 x 768), and a matrix of one tile row."""
    x = torch.randn(*shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)).bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    gram = tg.symmetric_matmul(x)
    ref = torch.bmm(x, x.mT)
    torch.testing.assert_close(gram.float(), ref.float(), rtol=BF16_ULP, atol=1e-3 * ref.float().abs().max().item())
    assert torch.equal(gram, gram.mT) or relative_error(gram, gram.mT) < 1e-3
    b, c = -22.48329292557795, 15.878769915207462  # the first Polar Express step's
    poly = tg.symmetric_matmul(gram, alpha=c, beta=b, add_input=True)
    ref_poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
    assert relative_error(poly, ref_poly) < 2 * BF16_ULP


@needs_triton
@pytest.mark.parametrize("shape", [(3, 768, 3072), (3, 3072, 768), (4, 768, 768)])
def test_orthogonalize_with_symmetric_kernels_full_shapes(compiled_triton, shape):
    grads = torch.randn(*shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    ref = tg.orthogonalize(grads, "polar_express_2026")
    out = tg.orthogonalize(grads, "polar_express_2026", symmetric=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert relative_error(out, ref) < 0.03


@needs_triton
def test_fused_mlp_full_shapes_match_reference(compiled_triton):
    """One 16,384-token slice at width 768, hidden 3072, bf16 (the GPU's compute dtype)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16_384, 768, device="cuda", generator=g).bfloat16()
    fc_w = (torch.randn(768, 3072, device="cuda", generator=g) / 768 ** 0.5).bfloat16()
    proj_w = (torch.randn(768, 3072, device="cuda", generator=g) / 3072 ** 0.5).bfloat16()
    grad_out = torch.randn(1, 16_384, 768, device="cuda", generator=g).bfloat16()

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, fc_w, proj_w)]
        out = fn(*leaves)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    fused = run(tg.fused_mlp)
    ref = run(lambda a, w1, w2: F.linear(F.relu(F.linear(a, w1.T)).square(), w2))
    for name, a, b in zip(["out", "grad_x", "grad_fc_w", "grad_proj_w"], fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert relative_error(a, b) < 2 * BF16_ULP, name  # the reference rounds pre, post, relu'(pre) g apart


@needs_triton
def test_triton_kernels_flag_in_the_compiled_model(compiled_triton):
    """--triton-kernels ce,mlp in the compiled bf16 model (custom ops inside torch.compile regions): the same loss
    and gradients as without, to bf16 precision."""
    device = torch.device("cuda")
    inputs, targets = sample_tokens(1024, device)
    results = []
    for kernels in ("", "ce,mlp"):
        model = small_model(device, **({"triton-kernels": kernels} if kernels else {}))
        model.compile_regions()
        loss = model(inputs, targets, at_stage(model))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (kernel_loss, kernel_grads) = results
    assert kernel_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in plain_grads.items():
        assert relative_error(kernel_grads[name], grad) < 0.05, name


class _NoLog:
    def log(self, line, console=True):
        pass


def test_timed_steps_have_no_host_syncs_and_no_recompiles():
    # The timed loop's train_step, compiled, with the FP8 head where the GPU has it: after the warm-up steps no
    # dynamo recompile (an error here) and no synchronizing CUDA call (set_sync_debug_mode "error" raises on
    # .item(), a blocking copy to or from the host, nonzero, ...). The batch is built outside, as run_training does.
    device = torch.device("cuda")
    cfg = tg.parse_config(["--preset", "tiny", "--device", "cuda", "--compile", "--fp8-head", "--warmup-steps", "2",
                           "--train-steps", "12", "--stage-steps", "0,3,6,10", "--extension-steps", "2",
                           "--muon-momentum-warmup-steps", "2", "--muon-momentum-cooldown-steps", "1"])
    torch._dynamo.reset()
    model = tg.build_model(cfg, device, 1, _NoLog())
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    loader = tg.make_train_loader(cfg, tg.resolve_files(cfg.train_files, "--train-files"), 0, 1, device)
    for step in tg.warmup_steps(cfg):
        tg.train_step(model, loader.batch_for(tg.schedule_at(step, cfg)), opt, step, cfg)
    torch.cuda.synchronize()
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):  # the warm-up steps span every stage start
        for step in range(cfg.train_steps):
            batch = loader.batch_for(tg.schedule_at(step, cfg))
            torch.cuda.set_sync_debug_mode("error")
            try:
                losses.append(tg.train_step(model, batch, opt, step, cfg))
            finally:
                torch.cuda.set_sync_debug_mode(0)
    loader.close()
    opt.close()
    assert all(torch.isfinite(loss) for loss in losses)
    torch._dynamo.reset()


def test_compiled_glue_on_gpu_trains_as_eager_glue(monkeypatch):
    # --compile-glue on CUDA: BlockMasks built by inductor-generated code (argsort, the mask_mod's closure over
    # graph outputs), the compiled stem (embedding backward as inductor's scatter-add) and final norm, against the
    # same model without them: the 2026 structure in 4 layers at 2,048 and 4,096 tokens, tied (stage 0,
    # multi-token weights) and untied (stage 2). The blocks and head run on dynamo's eager backend in both, so
    # only the glue is compiled by inductor (seconds, not minutes). bf16: loss within 1e-3, gradients 2e-2.
    from test_compile_glue import compile_with
    compile_with(monkeypatch, "inductor")
    device = torch.device("cuda")
    args = ["--preset", "r2026", "--device", "cuda", "--compile", "--model-dim", "256", "--num-heads", "2",
            "--head-dim", "128", "--num-layers", "4", "--no-attn-layers", "2", "--long-window-layers", "0,3",
            "--value-embed-layers", "1,3", "--skip-connection", "1,2", "--attn-source-layer", "2", "--post-gate-layer", "2", "--xsa-layers", "1", "--attn-gate-layers", "1,3", "--dc-layer", "3",
            "--paired-head-layers", "0", "--bigram-rows", "4099", "--bigram-dim", "64",
            "--stage-seq-len", "2048,4096,4096,4096", "--stage-batch-tokens", "2048,4096,4096,4096",
            "--stage-steps", "0,4,8,12", "--train-steps", "16", "--extension-steps", "2",
            "--val-seq-len", "4096", "--val-tokens", "4096"]
    inputs, targets = sample_tokens(4096, device)
    losses, grads = {}, {}
    for glue in (False, True):
        torch._dynamo.reset()
        cfg = tg.parse_config(args + (["--compile-glue"] if glue else []))
        torch.manual_seed(0)
        model = tg.GPT(cfg, 4096).to(device)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.compute_dtype, model.use_flex = torch.bfloat16, True
        model.mtp_weight_table = tg.mtp_weight_table(cfg, device)
        model.compile_regions()
        for step in (1, 10):
            schedule = tg.schedule_at(step, cfg)
            model.zero_grad(set_to_none=True)
            loss = model(inputs[: schedule.seq_len], targets[: schedule.seq_len], schedule)
            loss.backward()
            losses[glue, step] = loss.item()
            grads[glue, step] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    for step in (1, 10):
        assert losses[True, step] == pytest.approx(losses[False, step], rel=1e-3)
        assert grads[True, step].keys() == grads[False, step].keys()
        for name, grad in grads[False, step].items():
            assert relative_error(grads[True, step][name], grad) < 2e-2, (step, name)
    torch._dynamo.reset()


def test_compiled_fp8_head_on_gpu_equals_eager():
    # What the head runs on Hopper (the compiled scale-and-casts and matmuls) against the eager formulas
    if not tg.fp8_supported(torch.device("cuda")):
        pytest.skip("FP8 matmul needs compute capability 8.9+")
    torch.manual_seed(0)
    tokens, vocab, dim = 4096, 50304, 768
    x_scale, w_scale, grad_scale = tg.fp8_head_scales(tg.parse_config([]), 1)  # the record's: 768 x 50304
    x_f8 = (tg.rms_norm(torch.randn(tokens, dim, device="cuda")) / x_scale).to(torch.float8_e4m3fn)
    w_f8 = (torch.randn(vocab, dim, device="cuda") * 0.02 / w_scale).to(torch.float8_e4m3fn)
    grad = (torch.randn(tokens, vocab, device="cuda") * 1e-3).bfloat16()
    args = (grad, x_f8, w_f8, x_scale, w_scale, grad_scale)
    eager = tg.fp8_backward_matmuls(*args)
    compiled = tg.fp8_backward_compiled()(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    x, w = tg.rms_norm(torch.randn(tokens, dim, device="cuda")).bfloat16(), torch.randn(vocab, dim, device="cuda") * 0.02
    eager = tg.fp8_forward_matmul(x, w, x_scale, w_scale)
    compiled = tg.fp8_forward_compiled()(x, w, x_scale, w_scale)
    for a, b in zip(eager, compiled):
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if b.element_size() == 1 else b)
