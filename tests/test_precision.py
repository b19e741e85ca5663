"""Issue 19: the record starts from the 2026 script's weights and keeps them in the script's precisions.

The init of every parameter group (the attention output projection drawn like V, not zero), each parameter's
storage dtype by default and under --fp32-masters, Adam's step into a bf16 weight (fp32 moments, the fp32 update
rounded once), Muon's bf16 weights with 16 low bits (the exact fp32 master, its truncation in the weight), and a
checkpoint round trip that resumes bit-exactly with these dtypes.
"""

import pytest
import torch
from torch import nn

import train_gpt as tg


def record_cfg(*flags):
    """The record's structure (11 layers, every component) at a CPU width: what the init statistics need."""
    return tg.parse_config(["--model-dim", "256", "--num-heads", "2", "--head-dim", "128", "--vocab-size", "4096",
                            "--bigram-rows", "4099", "--bigram-dim", "64", "--bigram-sign-rows", "256", *flags])


def tiny_cfg(*flags):
    return tg.parse_config(["--preset", "tiny", "--device", "cpu", *flags])


# -----------------------------------------------------------------------------
# Init: the script's distributions (r2026.py 1156-1258)


def test_the_record_model_starts_from_the_scripts_distributions():
    cfg = record_cfg()
    torch.manual_seed(0)
    params = dict(tg.GPT(cfg, 256).named_parameters())
    dim = cfg.model_dim
    bound = 3 ** 0.5 * 0.5 / dim ** 0.5
    uniform = [n for n in params if n.endswith(("attn.qk_w", "attn.v_w", "attn.proj_w", "mlp.fc_w"))]
    assert len(uniform) == 10 * 3 + 11  # every attention layer's Q/K, V and O; every MLP's input matrix
    for name in uniform:
        p = params[name].detach()
        assert p.abs().max() <= bound and p.std().item() == pytest.approx(0.5 / dim ** 0.5, rel=0.03), name
        assert p.mean().abs() < 0.05 * p.std(), name
    assert all(not params[f"blocks.{i}.attn.proj_w"].detach().eq(0).all() for i in range(11) if i != 6)  # O is not zero
    assert params["lm_head_w"].detach().std().item() == pytest.approx(0.005, rel=0.03)
    assert torch.equal(params["embed.weight"], params["lm_head_w"])  # tied at first: a copy of the head
    for i in range(len(cfg.value_embed_layers)):
        assert params[f"value_embeds.{i}.weight"].detach().std().item() == pytest.approx(0.01, rel=0.03)
    # zeros: every MLP output matrix, the 4 value gates, the smear gate, the bigram table, the smear lambda and the
    # second matrices of MUDD and of the MUDD gates
    zeros = [n for n in params if n.endswith(("mlp.proj_w", "gate_w", "gate.weight", "bigram_embed.weight",
                                               "smear_lambda", "mudd_w2", "mudd_gate_w2"))]
    assert len(zeros) == 11 + 4 + 1 + 1 + 1 + 2
    assert all(params[n].detach().eq(0).all() for n in zeros)
    for name in ("mudd_w1", "mudd_gate_w1"):  # kaiming_uniform(a=sqrt(5)) on (64, 768): U(+-1/sqrt(768))
        p = params[name].detach()
        assert p.abs().max() <= dim ** -0.5 and p.std().item() == pytest.approx(dim ** -0.5 / 3 ** 0.5, rel=0.03), name
    constants = {"resid_lambdas": 1.1 ** 0.5, "post_lambdas": 1.0, "skip_lambda": -1.5, "mudd_gate_scale": 0.1}
    for name, value in constants.items():
        assert torch.equal(params[name].detach(), torch.full_like(params[name], value)), name
    assert params["blocks.0.attn.sa_lambdas"].tolist() == [0.5, 1.0]
    # --print-recipe reads the same init from the parameters' tags
    assert params["blocks.0.attn.proj_w"].init == f"U(+-{bound:.4g})" and params["embed.weight"].init == "copy of lm_head_w"


# -----------------------------------------------------------------------------
# Storage: bf16 but the lambdas (r2026.py 1908-1915); --fp32-masters: everything fp32


def test_each_parameter_is_stored_as_the_script_stores_it_and_fp32_under_the_flag():
    record = tg.build_model(tiny_cfg(), torch.device("cpu"), 1, None)
    fp32 = tg.build_model(tiny_cfg("--fp32-masters"), torch.device("cpu"), 1, None)
    names = [n for n, _ in record.named_parameters()]
    lambdas = [n for n in names if "lambda" in n]
    assert sorted(lambdas) == sorted(["resid_lambdas", "post_lambdas", "smear_lambda", "skip_lambda"]
                                     + [f"blocks.{i}.attn.sa_lambdas" for i in (0, 1, 3)])
    fp32_params = dict(fp32.named_parameters())
    for name, p in record.named_parameters():  # the MUDD weights and biases bf16, the gates' scale fp32 (as the script)
        assert p.dtype == (torch.float32 if name in lambdas + ["mudd_gate_scale"] else torch.bfloat16), name
        assert fp32_params[name].dtype == torch.float32, name
        assert torch.equal(p.detach(), fp32_params[name].detach().to(p.dtype)), name  # rounded to nearest, once
    assert record.bigram_signs.dtype == torch.bfloat16 and torch.equal(record.bigram_signs.float(), fp32.bigram_signs)
    # the optimizers' state: Adam's moments fp32; Muon's momentum fp32 and, for bf16 weights, 16 low bits per owned
    # matrix; the reduce-scatter's shards in the gradients' dtype
    for model, bf16 in ((record, True), (fp32, False)):
        opt = tg.build_optimizers(model, tiny_cfg(), tg.Comm(0, 2))
        assert all(e["exp_avg"].dtype == e["exp_avg_sq"].dtype == torch.float32 for e in opt.adam.entries)
        embed = opt.adam.entries[opt.adam.entry_of(model.embed.weight)]
        assert embed["sharded"] and embed["grad"].dtype == (torch.bfloat16 if bf16 else torch.float32)
        for group in opt.muon.groups:
            assert group.momentum.dtype == torch.float32
            assert group.grad_shard.dtype == group.gathered.dtype == (torch.bfloat16 if bf16 else torch.float32)
            if bf16:
                assert group.low_bits.dtype == torch.int16 and group.low_bits.shape == group.momentum.shape
                assert not group.low_bits.any()  # at init the master is the rounded weight
            else:
                assert group.low_bits is None
    report = {line.split()[0]: line.split() for line in tg.recipe_report(tiny_cfg("--fp32-masters")).splitlines()}
    assert report["blocks.*.attn.v_w"][4:6] == ["fp32", "mom:fp32"]


# -----------------------------------------------------------------------------
# Adam on a bf16 weight (r2026.py 822-857): fp32 moments, the update formed in fp32, rounded once into the weight


def test_adam_steps_a_bf16_weight_by_its_fp32_update_rounded_once():
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(64, 64, generator=g) * 0.05).bfloat16()
    param = nn.Parameter(start.clone())
    lr, betas, decay, eps = 0.6, (0.75, 0.95), 0.025, 1e-10
    adam = tg.DistributedAdam([(param, lr, betas, decay)], eps, tg.Comm())
    p, m, v = start.float(), torch.zeros(64, 64), torch.zeros(64, 64)
    bf16_arithmetic = start.clone()
    for t in range(1, 4):
        grad = (torch.randn(64, 64, generator=g) * 0.01).bfloat16()
        param.grad = grad.clone()
        adam.reduce_gradients()
        adam.step(1.0)
        m = betas[0] * m + (1 - betas[0]) * grad.float()
        v = betas[1] * v + (1 - betas[1]) * grad.float() ** 2
        u = m / (v.sqrt() + eps) * (lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t))
        u = u + lr * lr * decay * p * (u * p > 0)
        p = (p - u).bfloat16().float()
        assert torch.equal(param.detach(), p.bfloat16()), t
        assert torch.allclose(adam.entries[0]["exp_avg"], m, rtol=1e-6, atol=0)
        bf16_arithmetic = bf16_arithmetic - u.bfloat16()  # the update rounded first, then a bf16 subtraction
    assert adam.entries[0]["exp_avg"].dtype == torch.float32 and param.dtype == torch.bfloat16
    assert not torch.equal(param.detach(), bf16_arithmetic)  # two roundings: another result


# -----------------------------------------------------------------------------
# Muon's bf16 weights with 16 low bits (r2026.py 909-925): the fp32 master exact, the weight its truncation


def truncated(master: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each fp32 value, as bf16: rounding toward zero."""
    return (master.view(torch.int32) & -65536).view(torch.float32).bfloat16()


def test_muon_bf16_weights_with_low_bits_step_exactly_as_fp32_masters():
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 64), (2, 32, 64), (64, 32)]
    starts = [(torch.rand(*s, generator=g) * 2 - 1).mul(0.03).bfloat16() for s in shapes]
    masters = [nn.Parameter(s.float()) for s in starts]  # the fp32 path: --fp32-masters
    weights = [nn.Parameter(s.clone()) for s in starts]  # the record's: bf16 + low bits, 0 at init
    lrs = [0.023, 0.046, 0.023]

    def muon(params):
        return tg.DistributedMuon([(p, lr, (32, 64) if p.shape[-1] == 64 else (64, 32), 1.2 * 0.023)
                                   for p, lr in zip(params, lrs)], "polar_express_2026", tg.Comm(), 0.9)

    fp32_opt, bf16_opt = muon(masters), muon(weights)
    assert [g.low_bits is None for g in fp32_opt.groups + bf16_opt.groups] == [True, True, False, False]
    for step in range(3):
        for master, weight in zip(masters, weights):
            grad = (torch.randn(master.shape, generator=g) * 0.01).bfloat16()
            master.grad, weight.grad = grad.float(), grad
        for opt in (fp32_opt, bf16_opt):
            opt.reduce_gradients()
            opt.step(1.0, 0.9)
        for fp32_group, bf16_group in zip(fp32_opt.groups, bf16_opt.groups):
            joined = tg.join_low_bits(bf16_group.own_params(), bf16_group.low_bits)
            assert torch.equal(joined, fp32_group.own_params()), step  # the master, bit for bit
        for master, weight in zip(masters, weights):
            assert torch.equal(weight.detach(), truncated(master.detach())), step  # the forward reads the truncation
    rounded = [m.detach().bfloat16() for m in masters]
    assert any(not torch.equal(w.detach(), r) for w, r in zip(weights, rounded))  # truncation is not rounding here


# -----------------------------------------------------------------------------
# Checkpoint: the low bits are saved and restored, so a resumed run goes on bit-exactly


def token_batch(schedule, seed):
    ids = torch.randint(0, 50000, (schedule.seq_len + 1,), generator=torch.Generator().manual_seed(seed))
    ids[0] = tg.EOT_TOKEN
    return [(ids[:-1], ids[1:])] * (schedule.batch_tokens // schedule.seq_len)


def trained(model, opt, cfg, steps):
    for step in steps:
        tg.train_step(model, token_batch(tg.schedule_at(step, cfg), step), opt, step, cfg)


def test_optimizer_state_round_trip_resumes_bit_exactly_with_bf16_weights():
    cfg = tiny_cfg()
    model = tg.build_model(cfg, torch.device("cpu"), 1, None)
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    trained(model, opt, cfg, [0, 1])  # ends on an Adam step: no gradient is left accumulating
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = tg.optimizer_state(opt, tg.Comm())
    low_bits = [s["low_bits"] for s in state["muon"]]
    assert all(b.dtype == torch.int16 for b in low_bits) and all(b.any() for b in low_bits)
    trained(model, opt, cfg, [2, 3])

    resumed = tg.build_model(cfg, torch.device("cpu"), 1, None)
    resumed_opt = tg.build_optimizers(resumed, cfg, tg.Comm())
    with torch.no_grad():
        resumed.load_state_dict(weights)
    tg.load_optimizer_state(resumed_opt, state, tg.Comm())
    trained(resumed, resumed_opt, cfg, [2, 3])
    for name, p in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], p), name


def test_a_run_resumed_after_the_split_ends_bit_identical_to_an_unbroken_one(tmp_path):
    # The whole trainer (main, one process) on the small 2026 configuration of test_distributed_2026: a checkpoint
    # at step 6, after the split (step 5), holds the bf16 weights, the low bits and the untied optimizer.
    from test_distributed_2026 import one_thread_main, r2026_small_args
    assert one_thread_main(r2026_small_args(tmp_path, "whole")) == 0
    assert one_thread_main(r2026_small_args(tmp_path, "resumed", "--resume", str(tmp_path / "checkpoints/whole.pt"))) == 0
    whole, resumed = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert whole["blocks.0.attn.proj_w"].dtype == torch.bfloat16
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_lambdas_enter_the_layers_in_the_compute_dtype_as_the_scripts_casts():
    # the script's resid and post lambdas rounded to bf16 for the forward (the parameters stay fp32); the per-token
    # x0 gates come out of the MUDD gate in the compute dtype
    cfg = tiny_cfg()
    model = tg.build_model(cfg, torch.device("cpu"), 1, None)
    model.compute_dtype = torch.bfloat16  # as on the GPU
    seen = []

    def recording(call):
        def block(x, x0, attn_input, value_embed, mask, bigram, resid, post, x0_lambda, *rest):
            seen.append((resid, post, x0_lambda, bigram))
            return call(x, x0, attn_input, value_embed, mask, bigram, resid, post, x0_lambda, *rest)
        return block

    model.block_calls = [recording(call) for call in model.block_calls]
    ids = torch.randint(0, 50000, (257,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:-1], ids[1:], tg.schedule_at(0, cfg))
    assert model.resid_lambdas.dtype == torch.float32
    for i, (resid, post, x0_lambda, bigram) in enumerate(seen):
        assert torch.equal(resid, model.resid_lambdas[i].bfloat16()) and resid.dtype == torch.bfloat16
        assert post.dtype == torch.bfloat16 and torch.equal(post, model.post_lambdas[i].bfloat16())
        assert x0_lambda is None or x0_lambda.dtype == torch.bfloat16
        assert bigram is None or bigram.dtype == torch.bfloat16


def test_every_attention_layer_reads_one_rope_table():
    # The record's layers once held a table each at the validation length (1.75 GiB of identical fp32 per GPU);
    # now the model holds one, long enough for the paired layers' doubled sequences, passed to every block.
    cfg = tg.parse_config([])
    with torch.device("meta"):
        model = tg.GPT(cfg, tg.max_seq_len(cfg))
    tables = [name for name, _ in model.named_buffers() if name.endswith(("cos", "sin"))]
    assert tables == ["rotary.cos", "rotary.sin"] and tuple(model.rotary.cos.shape) == (2 * 262_144, 64)
    assert not any(hasattr(block.attn, "rotary") for block in model.blocks if block.attn is not None)
    seen = []
    small = tg.GPT(tiny_cfg(), 512)
    for i, block in enumerate(small.blocks):
        small.block_calls[i] = lambda *args, block=block: seen.append(args[-4:-2]) or block(*args)  # before dense, fp8
    ids = torch.randint(0, 50000, (257,), generator=torch.Generator().manual_seed(0))
    ids[0] = tg.EOT_TOKEN
    small(ids[:-1], ids[1:], tg.schedule_at(0, small.cfg))
    assert len(seen) == 4 and all(cos is small.rotary.cos and sin is small.rotary.sin for cos, sin in seen)
