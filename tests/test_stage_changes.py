"""What a stage change of the 2026 schedule costs on the GPU: no recompiles beyond new shapes, no host syncs.

A new stage changes the YaRN attention scale, the windows, the multi-token weights and (sometimes) the batch's
accumulation steps. Each is data the compiled code reads, not a constant it was compiled for, so the extension
stage (same shapes as the stage before it) and validation at a later stage reuse every compiled graph.
"""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import train_gpt as tg

SMALL_2026 = ["--preset", "r2026", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32",
              "--num-layers", "4", "--no-attn-layers", "2", "--long-window-layers", "0,3", "--value-embed-layers", "1,3",
              "--skip-connection", "1,2", "--attn-source-layer", "2", "--post-gate-layer", "2", "--xsa-layers", "1", "--attn-gate-layers", "1,3", "--dc-layer", "3", "--paired-head-layers", "0",
              "--bigram-rows", "1031", "--bigram-dim", "16", "--bigram-sign-rows", "64", "--device", "cpu",
              "--stage-seq-len", "256,512,768,768", "--stage-batch-tokens", "256,512,768,768",
              "--stage-max-doc-len", "128,256,256,256", "--stage-steps", "0,4,8,12", "--train-steps", "16",
              "--extension-steps", "2", "--stage-short-window-blocks", "1,1,1,2", "--stage-long-window-blocks", "1,2,3,4",
              "--final-long-window-blocks", "5", "--val-seq-len", "512", "--val-tokens", "512",
              "--muon-momentum-warmup-steps", "2", "--muon-momentum-cooldown-steps", "2"]


def small_2026(*extra):
    return tg.parse_config([*SMALL_2026, *extra])


def token_ids(n):
    ids = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(0))
    ids[::100] = tg.EOT_TOKEN
    return ids


def graph_counting(model, cfg, ids):
    """(train, validate): train(step) runs a forward and backward at that step's schedule, validate(step) a
    validation; each returns the number of graphs dynamo has compiled so far."""
    from torch._dynamo.utils import counters

    def train(step):
        schedule = tg.schedule_at(step, cfg)
        model(ids[: schedule.seq_len], ids[1 : schedule.seq_len + 1], schedule).backward()
        return counters["stats"]["unique_graphs"]

    def validate(step):
        tg.evaluate(model, ids.numpy().astype("uint16"), cfg, step, tg.Comm(), torch.device("cpu"))
        return counters["stats"]["unique_graphs"]
    return train, validate


def test_yarn_scale_is_one_buffer_updated_in_place_per_stage():
    cfg = small_2026()
    model = tg.GPT(cfg, 768)
    attentions = [block.attn for block in model.blocks if block.attn is not None]
    buffers = [attn.scale for attn in attentions]
    for step in (0, 5, 9, 13):
        schedule = tg.schedule_at(step, cfg)
        model.apply_yarn(schedule)
        for attn, buffer in zip(attentions, buffers):
            assert attn.scale is buffer  # the tensor compiled code reads, never a new one
            assert attn.scale.item() == pytest.approx(schedule.attn_scale, rel=1e-7)
    # the windows grow 128 -> 256 -> 384 -> 512 tokens: scale 0.1 x prod(1 + 0.2 ln(new/old))
    expected = 0.1 * (1 + 0.2 * math.log(2)) * (1 + 0.2 * math.log(1.5)) * (1 + 0.2 * math.log(4 / 3))
    assert buffers[0].item() == pytest.approx(expected, rel=1e-7)


def test_without_yarn_the_scale_is_a_constant_float():
    model = tg.GPT(tg.parse_config(["--preset", "tiny", "--no-yarn", "--attn-scale-log-growth", "0"]), 512)
    assert all(isinstance(block.attn.scale, float) for block in model.blocks if block.attn is not None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_a_tensor_scale_is_exactly_the_float_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 32) for _ in range(3))
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, device="cpu")
    scale = 0.1138629436
    as_float = tg.attend(q, k, v, mask, scale)
    as_tensor = tg.attend(q, k, v, mask, torch.tensor(scale))
    assert torch.equal(as_float, as_tensor)  # q.k x 1 x s is the same fp32 product as q.k x s
    dense = torch.ones(256, 256, dtype=torch.bool).tril()
    torch.testing.assert_close(tg.attend(q, k, v, dense, torch.tensor(scale)), tg.attend(q, k, v, dense, scale),
                               rtol=1e-6, atol=1e-6)


def test_extension_stage_and_later_validation_reuse_every_compiled_graph(monkeypatch):
    # Stages 2 and 3 have the same shapes but a different attention scale and windows; validation runs at
    # stage 2 and again at stage 3. Only the first of each may compile graphs.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = small_2026()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 768)
    real_compile = torch.compile  # the same graphs and guards as inductor's, in seconds
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    model.compile_regions()
    train, validate = graph_counting(model, cfg, token_ids(1000))

    stage_2 = train(9)
    assert tg.schedule_at(13, cfg).attn_scale != tg.schedule_at(9, cfg).attn_scale
    assert train(13) == stage_2  # stage 3: new scale and windows, no new graph
    after_validation = validate(9)
    assert after_validation > stage_2
    assert validate(16) == after_validation  # the final validation: stage 3's scale, wider window
    torch._dynamo.reset()


def test_mtp_weight_table_holds_every_steps_weights_in_aligned_rows():
    cfg = small_2026()
    table = tg.mtp_weight_table(cfg, torch.device("cpu"))
    assert table.shape == (16, 4) and table.stride(0) % 4 == 0  # 16-byte rows: every row starts aligned
    for step in range(16):
        weights = tg.schedule_at(step, cfg).mtp_weights
        expected = torch.zeros(4)
        expected[: len(weights)] = torch.tensor(weights, dtype=torch.float32)
        assert torch.equal(table[step], expected)


def test_model_reads_the_steps_weights_from_the_table_without_a_new_tensor():
    cfg = small_2026()
    model = tg.GPT(cfg, 768)
    model.mtp_weight_table = tg.mtp_weight_table(cfg, torch.device("cpu"))
    schedule = tg.schedule_at(2, cfg)  # stage 0: three weights, the third ramping down
    weights = model.step_mtp_weights(schedule)
    assert weights.data_ptr() == model.mtp_weight_table[2].data_ptr()  # a view of the table, no copy
    assert weights.tolist() == pytest.approx(list(schedule.mtp_weights), rel=1e-7)
    model.mtp_weight_table = None  # without the table (tests, scratch use): a new tensor of the same values
    assert model.step_mtp_weights(schedule).tolist() == weights.tolist()


def test_fp8_head_scales_of_the_record():
    record = tg.parse_config([])
    assert tg.fp8_head_scales(record, 2) == pytest.approx((100 / 448, 1.6 / 448, 0.75 / 448 / 2), rel=1e-15)


def test_train_step_sets_the_fp8_gradient_scale_of_its_own_accumulation(monkeypatch):
    cfg = tg.parse_config(["--preset", "tiny", "--fp8-grad-max", "0.75"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    seen = []

    def spy(x, head_w, targets, logit_cap, fp8_scales, **options):
        seen.append(fp8_scales)
        return tg.head_loss(x, head_w, targets, logit_cap, None, **options)  # the bf16 path: no FP8 on a CPU

    model.head_loss = spy
    model.fp8_scales = tg.fp8_head_scales(cfg, 8)  # built for 8 accumulation steps; this step has 2
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    ids = token_ids(513)
    batch = [(ids[:256], ids[1:257]), (ids[256:512], ids[257:513])]
    tg.train_step(model, batch, opt, 0, cfg)
    assert [scales[2] for scales in seen] == [0.75 / 448 / 2] * 2


@pytest.mark.parametrize("flag, value", [("--fp8-w-max", "0"), ("--fp8-grad-max", "-1"), ("--fp8-x-max", "0")])
def test_fp8_ranges_are_checked(flag, value):
    with pytest.raises(tg.ConfigError, match=flag):
        tg.check_hyperparameter_ranges(tg.parse_config([flag, value]))


def test_fp8_head_keeps_weights_within_its_range_and_saturates_beyond():
    # The untied 2026 head grows weights past #28's FP8 range (0.875); its own scales keep up to 1.6.
    op = tg.fp8_linear_op()
    torch.manual_seed(0)
    x = tg.rms_norm(torch.randn(64, 768)).bfloat16()
    big = 384 * 1.6 / 448  # 1.37: an e4m3 value (384) under the 2026 weight scale, past #28's 0.875
    w = torch.randn(256, 768).sign() * big
    try:
        exact = (x.float() @ w.T).float()
        outputs = {name: op(x, w, *tg.fp8_head_scales(tg.parse_config(flags), 1))[0].float()
                   for name, flags in [("28", ["--fp8-w-max", "0.875"]), ("2026", [])]}
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm does not run on this build's CPU: {error}")
    def relative_error(out):
        return ((out - exact).norm() / exact.norm()).item()
    assert relative_error(outputs["2026"]) < 0.04  # FP8 rounding of x only: the weights are exact
    assert relative_error(outputs["28"]) == pytest.approx(1 - 0.875 / big, abs=0.03)  # every weight cut to 0.875


def test_a_steps_gradient_is_the_mean_over_its_sequences_whatever_the_accumulation(monkeypatch):
    # Stages differ in sequences per process (here 2, then 4): the step's gradient must stay the mean over its
    # sequences. NorMuon and Adam hide a wrong overall scale, and 1 vs 2 processes err alike, so check it here.
    cfg = small_2026()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 768)
    with torch.no_grad():  # zero-init projections would leave most gradients zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    seen = []

    def capture_gradients(opt, model, schedule):
        seen.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)

    monkeypatch.setattr(tg, "step_optimizers", capture_gradients)
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    ids = token_ids(4 * 768 + 1)
    for step, sequences in [(1, 2), (9, 4)]:  # stage 0 (256 tokens, MTP) and stage 2 (768 tokens)
        schedule = tg.schedule_at(step, cfg)
        length = schedule.seq_len
        batch = [(ids[i * length : (i + 1) * length], ids[i * length + 1 : (i + 1) * length + 1]) for i in range(sequences)]
        tg.train_step(model, batch, opt, step, cfg)
        for inputs, targets in batch:  # each sequence alone, summed
            model(inputs, targets, schedule).backward()
        summed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert summed.keys() == seen[-1].keys() and len(summed) > 20
        for name, grad in seen[-1].items():
            torch.testing.assert_close(grad, summed[name] / sequences, rtol=1e-4, atol=1e-9, msg=f"step {step}: {name}")
        model.zero_grad(set_to_none=True)
