"""The 2026-05-20 record's model components (--preset r2026), each against an oracle written from its definition,
and each off by default (record #28's model unchanged)."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg  # noqa: E402


def tiny_cfg(*extra):
    """A CPU-sized model: 4 layers of width 64, 2 heads of 32, no attention in layer 2."""
    return tg.parse_config(["--preset", "tiny", "--num-layers", "4", "--model-dim", "64", "--num-heads", "2",
                            "--head-dim", "32", "--no-attn-layers", "2", "--long-window-layers", "0,3",
                            "--num-value-embeds", "1", "--train-seq-len", "256", "--val-seq-len", "256", *extra])


def token_ids(n, seed=0, high=50304, bos_at=()):
    ids = torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    ids[list(bos_at)] = tg.EOT_TOKEN
    return ids


# -----------------------------------------------------------------------------
# Bigram hash embedding


def int32(value):
    return (value + 2**31) % 2**32 - 2**31


def test_bigram_hash_matches_the_formula():
    ids = token_ids(300, high=50304)
    ids[5], ids[6] = 50303, 50303  # the largest token: products near 2^31
    for rows in (754_560, 97):
        got = tg.bigram_hash(ids, rows).tolist()
        x = ids.tolist()
        previous = [None, rows - 1] + x[1:-1]  # the 2026 script's quirk: position 1 hashes with the reserved row
        expected = [rows - 1] + [(int32(36313 * x[i]) ^ int32(27191 * previous[i])) % (rows - 1) for i in range(1, len(x))]
        assert got == expected
        assert got[1] != (36313 * x[1] ^ 27191 * x[0]) % (rows - 1)  # not the plain formula there
        assert max(got) == rows - 1 and got.count(rows - 1) >= 1  # the reserved row is position 0's


def test_bigram_sign_index_matches_the_formula():
    ids = token_ids(300)
    x = ids.tolist()
    assert tg.bigram_sign_index(ids, 8192).tolist() == [0] + [(x[i - 1] ^ x[i]) % 8192 for i in range(1, len(x))]


def test_bigram_sign_table_is_a_fixed_buffer_of_plus_minus_one_from_the_seed():
    cfg = tiny_cfg("--bigram-rows", "101", "--bigram-dim", "16", "--bigram-sign-rows", "64")
    torch.manual_seed(1)
    a = tg.GPT(cfg, 256)
    torch.manual_seed(2)  # another global stream: the same table
    b = tg.GPT(cfg, 256)
    assert torch.equal(a.bigram_signs, b.bigram_signs) and a.bigram_signs.shape == (64, 16)
    assert set(a.bigram_signs.unique().tolist()) == {-1.0, 1.0}
    assert "bigram_signs" in a.state_dict() and "bigram_signs" not in dict(a.named_parameters())
    other_seed = tg.GPT(tg.dataclasses.replace(cfg, seed=1), 256)
    assert not torch.equal(a.bigram_signs, other_seed.bigram_signs)
    # zero-init table, lambdas 0.05 per layer
    assert torch.count_nonzero(a.bigram_embed.weight) == 0 and a.bigram_lambdas.tolist() == pytest.approx([0.05] * 4)


def test_bigram_off_by_default():
    names = dict(tg.GPT(tiny_cfg(), 256).named_parameters())
    assert not any("bigram" in name for name in names)


def test_bigram_terms_reach_layer_0_through_x0_and_later_attention_layers_after_attention():
    cfg = tiny_cfg("--bigram-rows", "101", "--bigram-dim", "16", "--bigram-sign-rows", "64")
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.bigram_embed.weight.normal_()
        model.bigram_lambdas.copy_(torch.tensor([0.5, -1.0, 2.0, 3.0]))
        for block in model.blocks:
            block.mlp.proj_w.normal_(0, 0.1)
            if block.attn is not None:
                block.attn.proj_w.normal_(0, 0.1)
    ids = token_ids(256, bos_at=[0, 100])
    inputs = []

    def recording(block):
        def call(x, x0, value_embed, mask, bigram):
            inputs.append((x, x0, bigram))
            return block(x, x0, value_embed, mask, bigram)
        return call

    model.block_calls = [recording(block) for block in model.blocks]
    model(ids[:-1].contiguous(), ids[1:].long(), 2)
    ids = ids[:-1]
    # oracle: table row of the hash times the sign row of the XOR, on the first 16 of 64 channels
    rows, signs = tg.bigram_hash(ids, 101), tg.bigram_sign_index(ids, 64)
    feature = torch.stack([model.bigram_embed.weight[r] * model.bigram_signs[s] for r, s in zip(rows, signs)])
    feature = F.pad(feature, (0, 64 - 16))[None]
    embedded = tg.rms_norm(model.embed(ids)[None])
    x, x0, bigram = inputs[0]
    torch.testing.assert_close(x0, embedded + 0.5 * feature)  # layer 0: into the embedding, so x0 carries it
    torch.testing.assert_close(x, x0)
    assert bigram is None
    for layer, lam in [(1, -1.0), (2, 2.0), (3, 3.0)]:
        torch.testing.assert_close(F.pad(inputs[layer][2], (0, 64 - 16)), lam * feature)

    # inside a block: added right after the attention output, before the MLP; not at all without attention
    block = model.blocks[1]
    x = torch.randn(1, 255, 64)
    mask = tg.dense_attention_mask(ids, 2)
    term = 0.3 * torch.randn(1, 255, 16)
    h = block.x0_mix[0] * x + block.x0_mix[1] * embedded
    h = h + block.attn(tg.rms_norm(h), None, mask)
    h = h + F.pad(term, (0, 48))
    expected = h + block.mlp(tg.rms_norm(h))
    torch.testing.assert_close(block(x, embedded, None, mask, term), expected)
    no_attn = model.blocks[2]
    torch.testing.assert_close(no_attn(x, embedded, None, mask, term), no_attn(x, embedded, None, mask, None))


def test_bigram_gradient_reaches_exactly_the_hashed_rows():
    cfg = tiny_cfg("--bigram-rows", "4099", "--bigram-dim", "16", "--bigram-sign-rows", "64")
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.02)
    ids = token_ids(257, bos_at=[0])
    model(ids[:-1].contiguous(), ids[1:].long(), 2).backward()
    touched = set(torch.nonzero(model.bigram_embed.weight.grad.abs().sum(-1)).flatten().tolist())
    assert touched == set(tg.bigram_hash(ids[:-1], 4099).tolist())


# -----------------------------------------------------------------------------
# Multi-token prediction loss and the 2026 head squash


def naive_multi_token_loss(logits, targets, weights):
    """Row by row: position r's logits against target r + k (the token k+1 ahead) with weight w_k, while in range."""
    logits, total = logits.double(), torch.zeros((), dtype=torch.float64)
    for r in range(logits.size(0)):
        log_probs = torch.log_softmax(logits[r], dim=-1)
        for k, weight in enumerate(weights):
            if r + k < targets.numel():
                total -= weight * log_probs[targets[r + k]]
    return total


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.25), (0.7, 0.0, 0.3)])
def test_multi_token_loss_is_the_weighted_sum_of_shifted_cross_entropies(weights):
    torch.manual_seed(0)
    logits = torch.randn(37, 50) * 3
    targets = torch.randint(0, 50, (37,))
    got = tg.multi_token_cross_entropy(logits, targets, torch.tensor(weights))
    assert got.item() == pytest.approx(naive_multi_token_loss(logits, targets, weights).item(), rel=1e-5)


def test_head_squash_2026_and_28():
    torch.manual_seed(0)
    x, w = torch.randn(16, 32), torch.randn(40, 32) * 0.3
    targets = torch.randint(0, 40, (16,))
    u = (x.double() @ w.double().T)
    squashed_2026 = 23 * torch.sigmoid((u + 5) / 7.5)
    got = tg.head_loss(x, w, targets, 23.0, None, logit_shift=5.0, logit_div=7.5)
    assert got.item() == pytest.approx(F.cross_entropy(squashed_2026, targets, reduction="sum").item(), rel=1e-5)
    squashed_28 = 30 * torch.sigmoid(u / 7.5)  # the defaults: #28's 30*sigmoid(z/7.5)
    assert tg.head_loss(x, w, targets, 30.0, None).item() == pytest.approx(
        F.cross_entropy(squashed_28, targets, reduction="sum").item(), rel=1e-5)
    weights = (1.0, 0.5, 0.25)
    got = tg.head_loss(x, w, targets, 23.0, None, torch.tensor(weights), 5.0, 7.5)
    assert got.item() == pytest.approx(naive_multi_token_loss(squashed_2026, targets, weights).item(), rel=1e-5)


def test_model_uses_the_schedules_mtp_weights_in_training_only():
    cfg = tiny_cfg("--logit-cap", "23", "--logit-shift", "5", "--logit-div", "7.5")
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.05)
    ids = token_ids(257, bos_at=[0, 50])
    inputs, targets = ids[:-1].contiguous(), ids[1:].long()
    schedule = tg.dataclasses.replace(tg.schedule_at(0, cfg), mtp_weights=(1.0, 0.5, 0.25))
    calls = []

    def spy(*args, **options):
        calls.append(options)
        return tg.head_loss(*args, **options)

    model.head_loss = spy
    mtp_loss = model(inputs, targets, 2, schedule)
    assert calls[0]["mtp_weights"].tolist() == [1.0, 0.5, 0.25]
    assert (calls[0]["logit_shift"], calls[0]["logit_div"]) == (5.0, 7.5)
    next_token_loss = model(inputs, targets, 2)  # no schedule: next token only
    assert "mtp_weights" not in calls[1] and mtp_loss > next_token_loss
    next_token_too = model(inputs, targets, 2, tg.dataclasses.replace(schedule, mtp_weights=(1.0,)))
    assert next_token_too.item() == next_token_loss.item()
    model.eval()
    with torch.no_grad():
        assert model(inputs, targets, 2, schedule).item() == pytest.approx(next_token_loss.item(), rel=1e-6)
    assert "mtp_weights" not in calls[-1]  # validation scores the next token only, as the 2026 script
