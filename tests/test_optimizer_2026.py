"""The 2026 records' optimizer (2026-05-20, unchanged on 2026-08-01 but for the MUDD rows) (NorMuon + Adam, issue 14), each piece against an oracle written from its
definition: Polar Express as the 2026 script has it, NorMuon's variance reduction along the smaller dimension,
cautious weight decay, Q/K orthogonalized by pairs of heads, the recipe table, Adam on odd steps only with the
even steps' gradients accumulated, the tied embedding and the state copy at the split, and 2 processes = 1.

The parameters are small fake modules with the names the recipe table expects (the model has them too).
"""

import math
import os
import types

import pytest
import torch
from torch import nn

import train_gpt as tg

HEADS, HEAD_DIM, DIM, LAYERS, VOCAB = 4, 8, 32, 2, 96


def config(*flags):
    return tg.parse_config(["--preset", "r2026", "--num-heads", str(HEADS), "--head-dim", str(HEAD_DIM),
                            "--model-dim", str(DIM), *flags])


def randn(*shape, scale=0.1, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return nn.Parameter(torch.randn(*shape, generator=g) * scale)


class FakeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk_w = randn(2, HEADS * HEAD_DIM, DIM)  # Q then K, heads' rows in order
        self.v_w = randn(HEADS * HEAD_DIM, DIM)
        self.proj_w = randn(DIM, HEADS * HEAD_DIM)
        self.value_gate_w = randn(HEADS, 12)


class FakeMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_w = randn(DIM, 4 * DIM)  # stored (dim, hidden) as ours: the 2026 factor must still be 2
        self.proj_w = randn(DIM, 4 * DIM)


class FakeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = FakeAttention(), FakeMLP()
        self.resid_lambda = randn(2)


class Fake2026(nn.Module):
    """The 2026 model's parameters (GPT.__init__ of the public script) under the names the recipe table expects;
    the head stored (dim, vocab) like the script's, so the tie is a transpose."""

    def __init__(self, vocab=VOCAB):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(FakeBlock() for _ in range(LAYERS))
        self.lm_head_w = randn(DIM, vocab)
        self.embed = nn.Embedding(vocab, DIM)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head_w.T)
        self.value_embeds = randn(2 * vocab, DIM)
        self.bigram_embed = nn.Embedding(50, 16)
        self.smear_gate = nn.Linear(12, 1, bias=False)
        self.post_lambdas = randn(LAYERS, 2)
        self.sa_lambdas, self.smear_lambda, self.skip_lambda = randn(LAYERS, 2), randn(1), randn(1)
        self.mudd_w1, self.mudd_w2, self.mudd_b2 = randn(2, 8, DIM), randn(2, 14, 8), randn(2, 14)
        self.mudd_gate_w1, self.mudd_gate_w2, self.mudd_gate_b2 = randn(2, 8, DIM), randn(2, 41, 8), randn(2, 41)
        self.mudd_gate_scale = randn(())


# The script's TrainingManager.param_table and defaults (NorMuon lr 0.023, wd 1.2; Adam lr 0.008, wd 0.005)
# per parameter: (optimizer, effective LR, betas, weight decay coefficient). Muon's LR includes the shape
# factor of the script's matrices (Q/K (2 x head_dim, dim): 1; MLP (hidden, dim): 2; MLP out: x 2 more).
R2026 = {
    "blocks.*.attn.qk_w": ("muon", 0.023, None, 1.2),
    "blocks.*.attn.v_w": ("muon", 0.023, None, 1.2),
    "blocks.*.attn.proj_w": ("muon", 0.023, None, 1.2),
    "blocks.*.mlp.fc_w": ("muon", 0.046, None, 1.2),
    "blocks.*.mlp.proj_w": ("muon", 0.092, None, 1.2),
    "blocks.*.attn.value_gate_w": ("adam", 0.008, (0.9, 0.99), 0.005),
    "blocks.*.resid_lambda": ("adam", 0.04, (0.9, 0.95), 0.0),
    "lm_head_w": ("adam", 0.008, (0.5, 0.95), 0.75),
    "embed.weight": ("adam", 0.008, (0.5, 0.95), 0.75),
    "value_embeds": ("adam", 0.6, (0.75, 0.95), 0.025),
    "bigram_embed.weight": ("adam", 0.6, (0.75, 0.95), 0.025),
    "smear_gate.weight": ("adam", 0.00008, (0.9, 0.99), 0.0),
    "post_lambdas": ("adam", 0.008, (0.9, 0.95), 0.0),
    "sa_lambdas": ("adam", 0.04, (0.9, 0.99), 0.0),
    "smear_lambda": ("adam", 0.04, (0.9, 0.99), 0.0),
    "skip_lambda": ("adam", 0.04, (0.9, 0.99), 0.0),
    # the seven MUDD rows (2026-08): Adam (0.9, 0.99), lr x 0.25 (MUDD) or x 0.1 (gates), wd x 1 or 0
    "mudd_w1": ("adam", 0.002, (0.9, 0.99), 0.005),
    "mudd_w2": ("adam", 0.002, (0.9, 0.99), 0.005),
    "mudd_b2": ("adam", 0.002, (0.9, 0.99), 0.0),
    "mudd_gate_w1": ("adam", 0.0008, (0.9, 0.99), 0.005),
    "mudd_gate_w2": ("adam", 0.0008, (0.9, 0.99), 0.005),
    "mudd_gate_b2": ("adam", 0.0008, (0.9, 0.99), 0.0),
    "mudd_gate_scale": ("adam", 0.0008, (0.9, 0.99), 0.0),
}


def test_r2026_recipe_is_the_scripts_table():
    import fnmatch
    cfg = config()
    settings = tg.assign_params(Fake2026(), cfg)
    assert len(settings) == len(list(Fake2026().parameters()))
    for s in settings:
        (optimizer, lr, betas, decay), = [row for pattern, row in R2026.items() if fnmatch.fnmatchcase(s.name, pattern)]
        assert s.optimizer == optimizer, s.name
        assert s.effective_lr == pytest.approx(lr, rel=1e-12), s.name
        assert s.weight_decay == pytest.approx(decay, rel=1e-12), s.name
        if optimizer == "adam":
            assert s.betas == betas, s.name
    by_name = {s.name: s for s in settings}
    assert by_name["blocks.0.attn.qk_w"].matrix_shape == (2 * HEAD_DIM, DIM)  # two heads a matrix
    assert by_name["blocks.0.mlp.fc_w"].matrix_shape == (DIM, 4 * DIM)
    assert (cfg.orthogonalizer, cfg.normuon_beta2, cfg.adam_eps) == ("polar_express_2026", 0.9, 1e-10)


def test_mlp_factor_does_not_depend_on_storage_but_qk_pairs_need_whole_heads():
    rule = tg.ParamRule("w", "muon", "muon_lr", shape_lr="long/short")
    assert tg.matrix_shape_factor((768, 3072), rule) == tg.matrix_shape_factor((3072, 768), rule) == 2.0
    assert tg.matrix_shape_factor((768, 3072), tg.ParamRule("w", "muon", "muon_lr")) == 1.0
    pairs = tg.ParamRule("q", "muon", "muon_lr", matrices="head_pairs")
    with pytest.raises(ValueError, match="not whole pairs"):
        tg.muon_matrix_shape((3 * HEAD_DIM, DIM), pairs, config())


def test_print_recipe_shows_betas_and_decay_for_r2026():
    report = tg.recipe_report(config(), Fake2026())
    line = next(row for row in report.splitlines() if row.startswith("lm_head_w"))
    assert line.split()[-3:] == ["0.5,0.95", "0.75", "-"]
    line = next(row for row in report.splitlines() if row.startswith("blocks.*.attn.qk_w"))
    assert line.split()[-3:] == ["-", "1.2", f"{2 * HEAD_DIM}x{DIM}"]
    assert "odd steps only" in report and "polar_express_2026" in report
    assert "bigram_embed.weight" in tg.recipe_report(config())  # the ported 2026 GPT: every parameter has a row


# -----------------------------------------------------------------------------
# Polar Express as the 2026 script has it


SCRIPT_COEFFS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def polar_express_fp32(x, coeffs):
    """The definition in fp32: X / (1.02 |X|_F + 1e-6), then X <- aX + (bA + cA^2) X with A = X X^T."""
    x = x.double()
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).float()


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 64, 16)])
def test_2026_polar_express_uses_the_scripts_undivided_coefficients(shape):
    coeffs, norm_safety, eps = tg.ORTHOGONALIZERS["polar_express_2026"]
    assert coeffs == SCRIPT_COEFFS and (norm_safety, eps) == (1.02, 1e-6)
    assert tg.ORTHOGONALIZERS["polar_express"][0] != SCRIPT_COEFFS  # ours keeps its per-step safety
    grads = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = tg.orthogonalize(grads, "polar_express_2026")
    assert out.dtype == torch.bfloat16 and out.shape == grads.shape
    assert relative_error(out, polar_express_fp32(grads, SCRIPT_COEFFS)) < 0.05  # bf16 rounding (~3%)
    # the divided coefficients are another map (~13% apart): the output must not be that one
    assert relative_error(out, polar_express_fp32(grads, tg.polar_express_coeffs())) > 0.1


def test_bf16_products_on_a_cpu_are_the_exact_products_rounded_once(monkeypatch):
    # The orthogonalizer's bf16 matmuls on a CPU run in fp32 and round once (a GPU's bf16 matmul: fp32
    # accumulation); within one bf16 unit of the exact product everywhere, and mostly the exact product rounded.
    gen = torch.Generator().manual_seed(3)
    x, y, acc = (torch.randn(*shape, generator=gen).bfloat16() for shape in ((4, 48, 64), (4, 64, 40), (4, 48, 40)))
    exact = x.double() @ y.double()
    got = tg.product(x, y)
    assert got.dtype == torch.bfloat16
    assert (got.double() == exact.bfloat16().double()).float().mean().item() > 0.99
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all()
    fused = tg.add_product(acc, x, y, beta=0.5, alpha=-1.5)  # beta acc + alpha x y rounded once, not twice
    exact_fused = 0.5 * acc.double() - 1.5 * exact
    assert (fused.double() == exact_fused.bfloat16().double()).float().mean().item() > 0.99
    twice = (0.5 * acc + (-1.5 * (x @ y).double()).bfloat16()).double()  # the product rounded before the add
    assert (twice != exact_fused.bfloat16().double()).any()  # rounding twice is seen at this size
    # and torch's own bf16 CPU kernels agree: the orthogonalizer's output moves by bf16 noise only
    grads = torch.randn(3, 64, 160, generator=gen)
    emulated = tg.orthogonalize(grads, "polar_express_2026").float()
    monkeypatch.setattr(tg, "emulate_bf16_matmul", lambda x: False)
    native = tg.orthogonalize(grads, "polar_express_2026").float()
    assert relative_error(emulated, native) < 0.02


@pytest.mark.parametrize("side, split", [(1040, True), (1024, False), (40, False)])
def test_polar_step_rounds_bx_before_adding_ax_on_matrices_with_a_side_over_1024(side, split):
    # The script's split_baddbmm (its MLP bank, 3072 x 768): BX rounded to bf16, then aX added and rounded again;
    # smaller matrices take aX + BX rounded once (baddbmm). One rounding on the MLP matrices had moved their
    # weights 3x further from the script's than its own rounding noise (scratch comparison, issue 26).
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 16, side, generator=gen) / side ** 0.5).bfloat16()
    a, b, c = SCRIPT_COEFFS[1]
    gram = tg.product(x, x.mT)
    poly = tg.add_product(gram, gram, gram, beta=b, alpha=c)
    once = (a * x.double() + poly.double() @ x.double()).bfloat16()
    twice = ((poly.double() @ x.double()).bfloat16().double() + a * x.double()).bfloat16()
    assert (once == twice).float().mean().item() < 0.7  # the two roundings are told apart at this size
    got = tg.polar_step_fused(x, a, b, c)
    # each side's fp32 sums round like the exact ones in all but a few entries (fp32 accumulation)
    assert (got == (twice if split else once)).float().mean().item() > 0.999
    # a tall matrix is orthogonalized on its short side: the split follows its long side too
    tall = tg.orthogonalize(x.mT.float(), "polar_express_2026")
    assert torch.equal(tall, tg.orthogonalize(x.float(), "polar_express_2026").mT)


def test_orthogonalizer_input_is_scaled_in_fp32_and_rounded_once(monkeypatch):
    # The script's compiled polar_express (torch 2.10's inductor) folds X = g.bfloat16() into the division:
    # g / (1.02 |g|_F + 1e-6) from the fp32 g, rounded to bf16 once. Eager's chain (round g, its norm, x 1.02,
    # + eps, the quotient) put the weights 3x further from the script's than its own rounding noise.
    monkeypatch.setitem(tg.ORTHOGONALIZERS, "polar_express_2026", ([], 1.02, 1e-6))  # no steps: the scaled input
    g = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(4)) * 1e-3
    got = tg.orthogonalize(g, "polar_express_2026")
    once = (g / (g.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)).bfloat16()
    x = g.bfloat16()
    chain = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    assert not torch.equal(once, chain)
    assert got.dtype == torch.bfloat16 and torch.equal(got, once)


def test_normuon_scale_multiplies_the_update_in_fp32_and_rounds_once():
    # The script's compiled variance reduction folds final_scale.type_as(v) into the product: bf16(v x scale)
    # with the fp32 scale, not v x bf16(scale). Read off a step from zero weights at LR 1: the weights become
    # -update exactly (fp32 storage, no decay).
    shape = (48, 16)
    param = nn.Parameter(torch.zeros(*shape))
    muon = tg.DistributedMuon([(param, 1.0, shape, 0.0)], "polar_express_2026", tg.Comm(), 0.9)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    muon_step(muon, param, grad)
    u = tg.orthogonalize(grad, "polar_express_2026")  # momentum 0: the Nesterov input is the gradient
    mean_square = u.float().square().mean(-1, keepdim=True)
    norm = (mean_square.sum() * 16).sqrt()
    step = (mean_square * (1 - 0.9)).clamp_min(1e-10).rsqrt()
    scale = step * (norm / (mean_square * 16 * step.square()).sum().sqrt())
    once = (u.float() * scale).bfloat16()
    assert not torch.equal(once, u * scale.bfloat16())
    assert torch.equal(-param.detach(), once.float())


def test_muon_momentum_weight_is_one_minus_momentum_subtracted_in_fp32():
    # The script lerps its fp32 buffer with 1 - momentum_t, a 0-d fp32 tensor: 1 - fp32(0.95) = 0.0500000119,
    # where fp32(1 - 0.95) = 0.0500000007 would scale every buffer entry by another number.
    shape = (16, 48)
    param = nn.Parameter(torch.zeros(*shape))
    muon = tg.DistributedMuon([(param, 0.1, shape, 0.0)], "polar_express_2026", tg.Comm(), 0.9)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    param.grad = grad.clone()
    muon.reduce_gradients()
    muon.step(1.0, 0.95)
    scripts = torch.zeros(shape).lerp_(grad, torch.tensor(1.0) - torch.tensor(0.95))
    assert torch.equal(muon.groups[0].momentum.view(shape), scripts)
    assert not torch.equal(scripts, torch.zeros(shape).lerp_(grad, 1 - 0.95))


# -----------------------------------------------------------------------------
# NorMuon: momentum, Polar Express, variance reduction, cautious decay


def muon_for(param, matrix_shape, lr=0.1, decay=0.0, beta2=0.9):
    return tg.DistributedMuon([(param, lr, matrix_shape, decay)], "polar_express_2026", tg.Comm(), beta2)


def muon_step(muon, param, grad, lr_mult=1.0, momentum=0.0):
    param.grad = grad.clone()
    muon.reduce_gradients()
    muon.step(lr_mult, momentum)


def variance_reduced(updates, beta2, dim):
    """Oracle: mean square of each update over `dim`, its EMA from zero, each entry of the other dimension
    divided by the root of its EMA, then scaled back to the update's Frobenius norm."""
    ema, out = 0, []
    for u in updates:
        u = u.double()
        ema = beta2 * ema + (1 - beta2) * u.square().mean(dim, keepdim=True)
        v = u / ema.sqrt()
        out.append(v * u.norm() / v.norm())
    return out


@pytest.mark.parametrize("shape, dim", [((48, 16), -1), ((16, 48), -2)])
def test_normuon_evens_out_the_larger_dimension_and_keeps_the_norm(shape, dim):
    param = nn.Parameter(torch.zeros(*shape))  # zero weights: nothing to decay, the step is -lr x update
    muon = muon_for(param, shape)
    grads = [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    steps, expected_inputs = [], []
    for grad in grads:
        before = param.detach().clone()
        expected_inputs.append(tg.orthogonalize(grad, "polar_express_2026").float())
        muon_step(muon, param, grad)
        steps.append((before - param.detach()) / 0.1)
    expected = variance_reduced(expected_inputs, 0.9, dim)
    for got, want, raw in zip(steps, expected, expected_inputs):
        assert relative_error(got, want) < 0.01  # the scaled update is rounded to bf16, as the script's
        assert got.norm().item() == pytest.approx(raw.norm().item(), rel=0.01)
    # after one step every entry of the larger dimension has the same mean square (the EMA is that step's)
    spread = steps[0].square().mean(dim)
    assert (spread.max() / spread.min()).item() == pytest.approx(1.0, abs=0.02)
    raw_spread = expected_inputs[0].square().mean(dim)
    assert (raw_spread.max() / raw_spread.min()).item() > 1.05  # while the orthogonalized update was uneven


def test_cautious_decay_only_where_update_and_weight_agree_in_sign():
    param = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0, 3.0])
    update = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 0.0])
    lr, decay = 0.1, 0.25
    expected = [p - (p * decay if u * p >= 0 else 0.0) - lr * u for p, u in zip(param.tolist(), update.tolist())]
    assert tg.cautious_decay_and_step_(param.clone(), update, lr, decay).tolist() == pytest.approx(expected)
    assert expected[1] == pytest.approx(-1.1) and expected[0] == pytest.approx(0.65)  # kept vs decayed


def test_muon_decay_is_weight_decay_times_base_lr_times_effective_lr():
    # A zero gradient gives a zero update, which agrees with every weight: pure decay, at the script's scale
    # p <- p (1 - wd x (base LR x schedule) x (effective LR x schedule)).
    cfg = config()
    model = nn.Module()
    model.blocks = nn.ModuleList([FakeBlock()])
    settings = {s.name: s for s in tg.assign_params(model, cfg) if s.optimizer == "muon"}
    proj = settings["blocks.0.mlp.proj_w"]
    muon = tg.DistributedMuon([(proj.param, proj.effective_lr, proj.matrix_shape, proj.weight_decay * proj.base_lr)],
                              "polar_express_2026", tg.Comm(), 0.9)
    before = proj.param.detach().clone()
    muon_step(muon, proj.param, torch.zeros_like(before), lr_mult=1.5)
    shrink = 1 - 1.2 * (0.023 * 1.5) * (0.092 * 1.5)
    assert torch.allclose(proj.param.detach(), before * shrink, rtol=1e-6, atol=0)


def test_qk_pairs_of_heads_are_orthogonalized_separately():
    qk = nn.Parameter(torch.zeros(2, HEADS * HEAD_DIM, DIM))
    muon = muon_for(qk, (2 * HEAD_DIM, DIM), beta2=0.0)  # plain Muon: the grouping alone
    grad = torch.randn(qk.shape, generator=torch.Generator().manual_seed(3))
    muon_step(muon, qk, grad)
    step = -qk.detach() / 0.1
    rows = 2 * HEAD_DIM
    for which in range(2):  # Q, K
        for pair in range(HEADS // 2):
            block = slice(pair * rows, (pair + 1) * rows)
            alone = tg.orthogonalize(grad[which, block], "polar_express_2026").float()
            assert torch.allclose(step[which, block], alone, atol=1e-6)
    whole_q = tg.orthogonalize(grad[0], "polar_express_2026").float()
    assert relative_error(step[0], whole_q) > 0.2  # orthogonalizing all of Q at once is another update


# -----------------------------------------------------------------------------
# Adam: betas, cautious decay, odd steps only, the tied embedding


def adam_oracle(param, grads, lr, betas, eps, decay, steps_taken):
    """One Adam step (bias-corrected, eps beside sqrt(v)) per gradient, with cautious decay lr^2 x decay where
    the step and the weight agree strictly in sign."""
    beta1, beta2 = betas
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(param, dtype=torch.float64)
    for t, g in enumerate(grads, start=steps_taken + 1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step = m / (v.sqrt() + eps) * lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        p = p - step - p * ((step * p) > 0) * lr * lr * decay
    return p.float(), m.float(), v.float()


def test_adam_per_parameter_betas_and_cautious_decay():
    a, b = randn(5, 3, seed=1), randn(7, seed=2)
    start = [a.detach().clone(), b.detach().clone()]
    adam = tg.DistributedAdam([(a, 0.01, (0.5, 0.95), 3.0), (b, 0.02, (0.9, 0.99), 0.0)], 1e-10, tg.Comm())
    grads = {id(a): [], id(b): []}
    for step in range(3):
        for p in (a, b):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + p.numel()))
            grads[id(p)].append(p.grad.clone())
        adam.reduce_gradients()
        adam.step(1.0)
    for p, x, lr, betas, decay in [(a, start[0], 0.01, (0.5, 0.95), 3.0), (b, start[1], 0.02, (0.9, 0.99), 0.0)]:
        expected, _, _ = adam_oracle(x, grads[id(p)], lr, betas, 1e-10, decay, 0)
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6)
    undecayed, _, _ = adam_oracle(start[0], grads[id(a)], 0.01, (0.5, 0.95), 1e-10, 0.0, 0)
    assert (a.detach() - undecayed).abs().max() > 1e-5  # the decay is there


class TwoParamModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = nn.Module()
        self.blocks[0].attn.v_w = randn(16, 16, seed=1)
        self.post_lambdas = randn(4, seed=2)


def schedule(step, adam_step, lr_mult=1.0, momentum=0.9):
    return types.SimpleNamespace(step=step, adam_step=adam_step, lr_mult=lr_mult, muon_momentum=momentum)


def backward(model, seed):
    """Stands in for a backward pass: adds a gradient to every parameter (accumulating as autograd does)."""
    g = torch.Generator().manual_seed(seed)
    added = {}
    for name, p in model.named_parameters():
        added[name] = torch.randn(p.shape, generator=g)
        p.grad = added[name].clone() if p.grad is None else p.grad + added[name]
    return added


def test_adam_steps_on_odd_steps_with_the_even_steps_gradients_added():
    model, cfg = TwoParamModel(), config("--embed-split-stage", "0")  # nothing tied
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    x0 = model.post_lambdas.detach().clone()
    v_before = model.blocks[0].attn.v_w.detach().clone()
    assert not opt.adam.accepting  # step 0 is even: the hooks start no Adam reduction
    g0 = backward(model, 0)
    tg.step_optimizers(opt, model, schedule(0, adam_step=False))
    assert torch.equal(model.post_lambdas.detach(), x0) and torch.equal(model.post_lambdas.grad, g0["post_lambdas"])
    assert model.blocks[0].attn.v_w.grad is None and not torch.equal(model.blocks[0].attn.v_w.detach(), v_before)
    assert opt.adam.accepting
    g1 = backward(model, 1)
    tg.step_optimizers(opt, model, schedule(1, adam_step=True))
    # one Adam step (its first: bias correction t = 1) on the sum of both steps' gradients
    expected, _, _ = adam_oracle(x0, [g0["post_lambdas"] + g1["post_lambdas"]], 0.008, (0.9, 0.95), 1e-10, 0.0, 0)
    assert torch.allclose(model.post_lambdas.detach(), expected, rtol=0, atol=1e-7)
    assert model.post_lambdas.grad is None and opt.adam.step_count == 1 and not opt.adam.accepting


def test_step_optimizers_with_adam_every_step_and_nothing_tied_is_the_plain_sequence():
    cfg = tg.parse_config(["--preset", "tiny", "--num-layers", "2", "--no-attn-layers", "1", "--long-window-layers", "0",
                           "--paired-head-layers", "", "--value-embed-layers", "0", "--skip-connection", "",
                           "--attn-source-layer", "-1", "--no-mudd", "--xsa-layers", "", "--attn-gate-layers", "",
                           "--dc-layer", "-1", "--post-gate-layer", "1", "--no-adam-odd-steps-only",
                           "--embed-split-stage", "0"])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tg.GPT(cfg, 512))
    opts = [tg.build_optimizers(m, cfg, tg.Comm()) for m in models]
    assert opts[0].split_step == -1 and opts[0].adam.tied is None and opts[0].adam.accepting
    ids = torch.randint(0, 50000, (257,), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        for m in models:
            m(ids[:-1], ids[1:], tg.schedule_at(step, cfg)).backward()
        s = tg.schedule_at(step, cfg)
        tg.step_optimizers(opts[0], models[0], s)
        opts[1].adam.reduce_gradients()  # reduce, step both, clear
        opts[1].muon.reduce_gradients()
        opts[1].adam.step(s.lr_mult)
        opts[1].muon.step(s.lr_mult, s.muon_momentum)
        models[1].zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert a.grad is None


class TiedModel(nn.Module):
    def __init__(self, vocab=VOCAB):
        super().__init__()
        self.lm_head_w = randn(DIM, vocab, seed=1)  # (dim, vocab): the embedding is its transpose
        self.embed = nn.Embedding(vocab, DIM)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head_w.T)
        self.post_lambdas = randn(4, seed=2)


def tied_optimizers(model, comm, split_step):
    opt = tg.build_optimizers(model, config(), comm)
    assert opt.adam.tied is not None and opt.split_step == 847  # the r2026 split step
    opt.split_step = split_step
    return opt


def test_tied_embedding_trains_as_the_head_then_takes_its_adam_state_at_the_split():
    model = TiedModel()
    opt = tied_optimizers(model, tg.Comm(), split_step=1)
    head0 = model.lm_head_w.detach().clone()
    grads = [backward(model, 0)]
    tg.step_optimizers(opt, model, schedule(0, adam_step=False))
    grads.append(backward(model, 1))
    tg.step_optimizers(opt, model, schedule(1, adam_step=True))  # the split step: tied, then untied
    summed = sum(g["lm_head_w"] + g["embed.weight"].T for g in grads)  # both steps, both uses of the tensor
    expected, m, v = adam_oracle(head0, [summed], 0.008, (0.5, 0.95), 1e-10, 150 * 0.005, 0)
    assert torch.allclose(model.lm_head_w.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.embed.weight.detach(), model.lm_head_w.detach().T)
    assert opt.adam.tied is None
    head_entry = opt.adam.entries[opt.adam.entry_of(model.lm_head_w)]
    embed_entry = opt.adam.entries[opt.adam.entry_of(model.embed.weight)]
    assert torch.equal(embed_entry["exp_avg"], head_entry["exp_avg"].T)
    assert torch.equal(embed_entry["exp_avg_sq"], head_entry["exp_avg_sq"].T)
    assert torch.allclose(head_entry["exp_avg"], m, atol=1e-7)
    # after the split the embedding goes on from the copied moments with its own gradient (bias correction t = 2)
    embed1 = model.embed.weight.detach().clone()
    g2 = backward(model, 2)
    tg.step_optimizers(opt, model, schedule(2, adam_step=False))
    g3 = backward(model, 3)
    tg.step_optimizers(opt, model, schedule(3, adam_step=True))
    g = (g2["embed.weight"] + g3["embed.weight"]).double()
    m2, v2 = 0.5 * m.T.double() + 0.5 * g, 0.95 * v.T.double() + 0.05 * g * g
    step = m2 / (v2.sqrt() + 1e-10) * 0.008 * math.sqrt(1 - 0.95 ** 2) / (1 - 0.5 ** 2)
    want = embed1.double() - step - embed1.double() * ((step * embed1.double()) > 0) * 0.008 ** 2 * 0.75
    assert torch.allclose(model.embed.weight.detach(), want.float(), rtol=0, atol=1e-6)
    assert not torch.equal(model.embed.weight.detach(), model.lm_head_w.detach().T)


# -----------------------------------------------------------------------------
# 2 gloo processes = 1 process: NorMuon banks, sharded Adam, odd steps, the tie and the split


def _worker_2026(rank, world_size, port, out_dir):
    import torch.distributed as dist
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = Fake2026(vocab=2048)  # head and embedding large enough to be sharded on 2 ranks
    model.lm_head_w.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    model.embed.weight.data.copy_(model.lm_head_w.data.T)
    opt = tied_optimizers(model, tg.Comm(rank, world_size), split_step=1)
    if world_size > 1:
        assert opt.adam.entries[opt.adam.entry_of(model.lm_head_w)]["sharded"]
    for step in range(4):
        g = torch.Generator().manual_seed(100 + step)
        for p in model.parameters():
            mean_grad, offset = torch.randn(p.shape, generator=g), torch.randn(p.shape, generator=g)
            local = mean_grad + offset * (1 if rank == 0 else -1) if world_size > 1 else mean_grad
            p.grad = local if p.grad is None else p.grad + local
        tg.step_optimizers(opt, model, schedule(step, adam_step=step % 2 == 1, lr_mult=1.5, momentum=0.9))
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"w{world_size}_r{rank}.pt"))
    opt.close()
    if world_size > 1:
        dist.destroy_process_group()


def test_2026_optimizer_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp
    from test_train_gpt import free_port
    mp.spawn(_worker_2026, args=(2, free_port(), str(tmp_path)), nprocs=2)
    _worker_2026(0, 1, 0, str(tmp_path))
    one = torch.load(tmp_path / "w1_r0.pt")
    optimizer_of = {s.name: s.optimizer for s in tg.assign_params(Fake2026(vocab=2048), config())}
    for rank in range(2):
        two = torch.load(tmp_path / f"w2_r{rank}.pt")
        for (name, _), a, b in zip(Fake2026(vocab=2048).named_parameters(), one, two):
            # Adam is smooth in fp32-equal means; Polar Express in bf16 turns their last bits into ~1e-4
            tolerance = 2e-3 if optimizer_of[name] == "muon" else 1e-5
            torch.testing.assert_close(b, a, rtol=0, atol=tolerance, msg=name)
    names = [name for name, _ in Fake2026(vocab=2048).named_parameters()]
    head, embed = one[names.index("lm_head_w")], one[names.index("embed.weight")]
    assert (embed - head.T).abs().max() > 1e-4  # split at step 1, then trained apart


def test_a_reduction_a_hook_starts_on_an_even_step_does_not_count_the_embedding_twice():
    model = TiedModel()
    opt = tied_optimizers(model, tg.Comm(), split_step=847)
    head0 = model.lm_head_w.detach().clone()
    g0 = backward(model, 0)
    opt.adam.accepting = True  # as if the hooks were armed on the even step: the head's unit starts, folding
    opt.adam.grad_ready(model.lm_head_w)
    opt.adam.grad_ready(model.embed.weight)
    assert opt.adam.launched[opt.adam.entry_of(model.lm_head_w)]
    tg.step_optimizers(opt, model, schedule(0, adam_step=False))
    g1 = backward(model, 1)
    tg.step_optimizers(opt, model, schedule(1, adam_step=True))
    summed = sum(g["lm_head_w"] + g["embed.weight"].T for g in (g0, g1))
    expected, _, _ = adam_oracle(head0, [summed], 0.008, (0.5, 0.95), 1e-10, 150 * 0.005, 0)
    assert torch.allclose(model.lm_head_w.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.embed.weight.detach(), model.lm_head_w.detach().T) and opt.adam.tied is not None


def test_a_bf16_adam_parameter_keeps_fp32_moments():
    # the 2026 value embeddings are a bf16 parameter: Adam's moments stay fp32, the step is rounded once
    start = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    param = nn.Parameter(start.bfloat16())
    adam = tg.DistributedAdam([(param, 0.6, (0.75, 0.95), 0.025)], 1e-10, tg.Comm())
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    param.grad = grad.bfloat16()
    adam.reduce_gradients()
    adam.step(1.0)
    entry = adam.entries[0]
    assert entry["exp_avg"].dtype == torch.float32 and param.dtype == torch.bfloat16
    expected, m, _ = adam_oracle(start.bfloat16().float(), [grad.bfloat16().float()], 0.6, (0.75, 0.95), 1e-10, 0.025, 0)
    assert torch.allclose(entry["exp_avg"], m, atol=1e-7)
    assert torch.equal(param.detach(), expected.bfloat16())


def test_mlp_matrices_share_one_group_each_at_its_own_lr():
    # The script's MLP bank: input and output matrices orthogonalized together (even sharding), the output
    # at 2x. A zero gradient is pure decay, so each matrix's shrink shows its own effective LR.
    cfg = config()
    model = nn.Module()
    model.blocks = nn.ModuleList([FakeBlock(), FakeBlock()])
    settings = [s for s in tg.assign_params(model, cfg) if s.name.endswith(("mlp.fc_w", "mlp.proj_w"))]
    muon = tg.DistributedMuon([(s.param, s.effective_lr, s.matrix_shape, s.weight_decay * s.base_lr) for s in settings],
                              "polar_express_2026", tg.Comm(), 0.9)
    assert len(muon.groups) == 1 and len(muon.groups[0].views) == 4
    before = [s.param.detach().clone() for s in settings]
    for s in settings:
        s.param.grad = torch.zeros_like(s.param)
    muon.reduce_gradients()
    muon.step(1.0, 0.9)
    for s, b in zip(settings, before):
        lr = 0.092 if s.name.endswith("proj_w") else 0.046
        assert torch.allclose(s.param.detach(), b * (1 - 1.2 * 0.023 * lr), rtol=1e-6, atol=0), s.name
