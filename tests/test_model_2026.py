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

