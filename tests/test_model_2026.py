"""The record's model components, each against an oracle written from its definition; each can be switched off
for an ablation, so a test turns on only what it checks."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg  # noqa: E402


def tiny_cfg(*extra):
    """A CPU-sized model: 4 layers of width 64, 2 heads of 32, no attention in layer 2, long windows on 0 and 3;
    every component that an ablation flag switches off is off, so each test turns on what it checks."""
    return tg.parse_config(["--preset", "tiny", "--num-layers", "4", "--model-dim", "64", "--num-heads", "2",
                            "--head-dim", "32", "--no-attn-layers", "2", "--long-window-layers", "0,3",
                            "--paired-head-layers", "", "--value-embed-layers", "", "--skip-connection", "",
                            "--attn-source-layer", "-1", "--no-mudd", "--xsa-layers", "", "--attn-gate-layers", "",
                            "--dc-layer", "-1", "--bigram-rows", "0", "--no-smear-gate", "--no-key-offset",
                            "--val-seq-len", "256", *extra])


def at(cfg, long_tokens=256, short_tokens=128, mtp_weights=(1.0,), tied=True, step=0):
    """Step `step`'s schedule with these windows (tokens), multi-token weights and tying."""
    return tg.dataclasses.replace(tg.schedule_at(step, cfg), window_long_tokens=long_tokens,
                                  window_short_tokens=short_tokens, mtp_weights=mtp_weights, embed_tied=tied)


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
    # zero-init table
    assert torch.count_nonzero(a.bigram_embed.weight) == 0


def test_bigram_rows_zero_removes_the_table():
    names = dict(tg.GPT(tiny_cfg(), 256).named_parameters())
    assert not any("bigram" in name for name in names)
    assert any("bigram" in name for name in dict(tg.GPT(tg.parse_config(["--preset", "tiny"]), 256).named_parameters()))


def test_bigram_terms_reach_the_stream_before_layer_0_and_later_attention_layers_after_attention():
    cfg = tiny_cfg("--bigram-rows", "101", "--bigram-dim", "16", "--bigram-sign-rows", "64")
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.bigram_embed.weight.normal_()
        model.mudd_gate_w2.normal_(0, 0.3)  # per-token gates that differ from token to token
        for block in model.blocks:
            block.mlp.proj_w.normal_(0, 0.1)
            if block.attn is not None:
                block.attn.proj_w.normal_(0, 0.1)
    ids = token_ids(256, bos_at=[0, 100])
    inputs = []

    def recording(block):
        def call(x, x0, attn_input, value_embed, mask, bigram, resid, post, x0_gate, bigram_gate, *rest):
            inputs.append((x, x0, bigram, x0_gate, bigram_gate))
            return block(x, x0, attn_input, value_embed, mask, bigram, resid, post, x0_gate, bigram_gate, *rest)
        return call

    model.block_calls = [recording(block) for block in model.blocks]
    model(ids[:-1].contiguous(), ids[1:].long(), at(cfg))
    ids = ids[:-1]
    # oracle: table row of the hash times the sign row of the XOR, on the first 16 of 64 channels
    rows, signs = tg.bigram_hash(ids, 101), tg.bigram_sign_index(ids, 64)
    feature = torch.stack([model.bigram_embed.weight[r] * model.bigram_signs[s] for r, s in zip(rows, signs)])[None]
    embedded = tg.rms_norm(model.embed(ids)[None])
    pre = model.gate_lanes(embedded, 0)  # the pre gate reads x0, which has no bigram term (2026-08)
    x, x0, bigram, x0_gate, bigram_gate = inputs[0]
    torch.testing.assert_close(x0, embedded)
    torch.testing.assert_close(x, embedded + F.pad(feature * pre[("bigram", 0)], (0, 48)))  # into the stream
    torch.testing.assert_close(bigram, feature)
    assert bigram_gate is None and x0_gate.shape == (1, 255, 1)  # layer 0 adds x0 x its gate after attention
    assert inputs[2][3] is None and inputs[2][4] is None  # no attention: neither term
    torch.testing.assert_close(inputs[1][4], pre[("bigram", 1)])

    # inside a block: added right after the attention output, before the MLP; not at all without attention
    block = model.blocks[1]
    x = torch.randn(1, 255, 64)
    mask = tg.token_window_mask(ids, 128)
    term = 0.3 * torch.randn(1, 255, 16)
    x0_gate, bigram_gate = torch.randn(1, 255, 1), torch.randn(1, 255, 1)
    resid, post = torch.tensor([0.9, 1.1]), torch.tensor([1.2, 0.8])
    rope = model.rotary.cos, model.rotary.sin
    none = tg.LayerGates()
    h = resid[0] * x + post[0] * block.attn(tg.rms_norm(x), None, mask, *rope, none) + x0_gate * embedded
    h = h + F.pad(term * bigram_gate, (0, 48))
    expected = resid[1] * h + post[1] * block.mlp(tg.rms_norm(h))
    got = block(x, embedded, x, None, mask, term, resid, post, x0_gate, bigram_gate, none, *rope)
    torch.testing.assert_close(got, expected)
    no_attn = model.blocks[2]
    torch.testing.assert_close(no_attn(x, embedded, x, None, mask, term, resid, post, x0_gate, bigram_gate, none, *rope),
                               no_attn(x, embedded, x, None, mask, None, resid, post, None, None, none, *rope))


def test_bigram_gradient_reaches_exactly_the_hashed_rows():
    cfg = tiny_cfg("--bigram-rows", "4099", "--bigram-dim", "16", "--bigram-sign-rows", "64")
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.02)
    ids = token_ids(257, bos_at=[0])
    model(ids[:-1].contiguous(), ids[1:].long(), at(cfg)).backward()
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


def test_head_squash():
    torch.manual_seed(0)
    x, w = torch.randn(16, 32), torch.randn(40, 32) * 0.3
    targets = torch.randint(0, 40, (16,))
    u = (x.double() @ w.double().T)
    squashed_2026 = 23 * torch.sigmoid((u + 5) / 7.5)
    got = tg.head_loss(x, w, targets, 23.0, None, logit_shift=5.0, logit_div=7.5)
    assert got.item() == pytest.approx(F.cross_entropy(squashed_2026, targets, reduction="sum").item(), rel=1e-5)
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
    schedule = at(cfg, mtp_weights=(1.0, 0.5, 0.25))
    calls = []

    def spy(*args, **options):
        calls.append(options)
        return tg.head_loss(*args, **options)

    model.head_loss = spy
    mtp_loss = model(inputs, targets, schedule)
    assert calls[0]["mtp_weights"].tolist() == [1.0, 0.5, 0.25]
    assert (calls[0]["logit_shift"], calls[0]["logit_div"]) == (5.0, 7.5)
    next_token_loss = model(inputs, targets, at(cfg))  # the next token only
    assert "mtp_weights" not in calls[1] and mtp_loss > next_token_loss
    model.eval()
    with torch.no_grad():
        assert model(inputs, targets, schedule).item() == pytest.approx(next_token_loss.item(), rel=1e-6)
    assert "mtp_weights" not in calls[-1]  # validation scores the next token only, as the 2026 script


# -----------------------------------------------------------------------------
# Residual structure (2026-08): lambdas, gated x0 and bigram injection, smear gate, gated value embeddings, skip,
# the attention source, the MUDD gates, XSA, DC, MUDD-0 and MUDD-1, tied embedding


def structure_cfg(*extra):
    """7 layers, no attention in 3; the skip 1 -> 3, attention source layer 4 (layer 5 is the first whose attention
    input it changes), value embeddings on 1, 5, 6 (6 the MUDD layer); the post gate from layer 2; XSA on 1 (pre
    gate) and 4 (post), head gates on 2 and 6, DC on 6 with a 5-token window."""
    return tiny_cfg("--num-layers", "7", "--no-attn-layers", "3", "--long-window-layers", "2,6",
                    "--value-embed-layers", "1,5,6", "--smear-gate", "--skip-connection", "1,3",
                    "--attn-source-layer", "4", "--mudd", "--post-gate-layer", "2", "--xsa-layers", "1,4",
                    "--attn-gate-layers", "2,6", "--dc-layer", "6", "--dc-window", "5",
                    "--head-init-std", "0.02", "--bigram-rows", "97", "--bigram-dim", "16",
                    "--bigram-sign-rows", "64", "--logit-cap", "23", "--logit-shift", "5", "--logit-div", "7.5", *extra)


# structure_cfg's gate lanes, counted by hand from the script's order (XSA, head gates, x0/bigram per layer, skip, DC)
STRUCTURE_PRE = {"xsa1": (0, 2), "x0_0": (2, 1), "bigram0": (3, 1), "x0_1": (4, 1), "bigram1": (5, 1)}
STRUCTURE_POST = {"xsa4": (0, 2), "attn2": (2, 2), "attn6": (4, 2), "x0_2": (6, 1), "bigram2": (7, 1), "x0_4": (8, 1),
                  "bigram4": (9, 1), "x0_5": (10, 1), "bigram5": (11, 1), "skip": (12, 1), "dc_w1": (13, 2), "dc_w2": (15, 2)}


def randomized_model(cfg, seed=0):
    """Every parameter random, so no term hides behind a zero or a one init."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambdas", "lambda", "proj_w", "gate_w", "gate.weight", "bigram_embed.weight")):
                p.copy_(torch.randn_like(p) * (0.5 if "lambda" in name else 0.1) + (0.8 if "lambdas" in name else 0.0))
            elif name.startswith("mudd") and name.endswith(("w2", "b2")):
                p.add_(torch.randn_like(p) * (0.5 if name.endswith("w2") else 2.0))
        model.mudd_gate_scale.fill_(0.13)  # not the fixed 0.1 of MUDD itself
        model.lm_head_w.normal_(0, 0.3)  # logits that matter: the loss sees every change of the stream
    return model


def naive_rotate(vec, position, rotary):
    """RoPE of one (D,) vector at one position, from its definition: the halves rotated by the table's angles."""
    half = vec.size(-1) // 2
    cos, sin = rotary.cos[position], rotary.sin[position]
    x1, x2 = vec[:half], vec[half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin])


def naive_dc(q, k, v, w1, w2, docs, scale, window):
    """Post-only DC from its definition, token by token: P_h[t, s] the softmax of head h over the keys s of t's
    document with t - window < s <= t; head h adds sum_s w2_h[t] (sum_h' w1n_h'[t] P_h'[t, s]) v_h[s], w1n = w1
    rms-normed over the heads."""
    T, H, _ = q.shape
    w1n = w1 / torch.sqrt(w1.square().mean(-1, keepdim=True) + 1e-6)
    out = torch.zeros_like(v)
    for t in range(T):
        keys = [s for s in range(max(0, t - window + 1), t + 1) if docs[s] == docs[t]]
        probs = torch.stack([torch.stack([q[t, h] @ k[s, h] for s in keys]) * scale for h in range(H)]).softmax(-1)
        mixed = (w1n[t][:, None] * probs).sum(0)  # (keys,)
        for h in range(H):
            out[t, h] = sum(w2[t, h] * mixed[j] * v[s, h] for j, s in enumerate(keys))
    return out


def naive_attention(attn, x, value_embed, mask, rotary, ids=None, ve_gate=None, extra_v=None, xsa=None, head_gate=None,
                    dc=None):
    """From the definitions, one (T, D) sequence: SA-lambda-scaled QKV, normed and rotated Q, K; V plus the gated
    value embedding (its own 2 sigmoid(W [x[:6], ve[:6]]) or MUDD's ve_gate) and MUDD's extra V; softmax attention
    under the mask; DC's correction; XSA: minus tanh(alpha) x the output's projection on the head's value; the raw
    head gate; the scaled output matrix."""
    T, H, Dh = x.size(0), attn.num_heads, attn.head_dim
    w = attn.sa_lambdas[0] * torch.cat([attn.qk_w, attn.v_w[None]])
    q, k, v = ((x @ w[j].T).view(T, H, Dh) for j in range(3))
    q, k = (torch.stack([torch.stack([naive_rotate(tg.rms_norm(t[i, h]), i, rotary) for h in range(H)]) for i in range(T)])
            for t in (q, k))
    if value_embed is not None:
        if ve_gate is None:
            ve_gate = 2 * torch.sigmoid(torch.cat([x[:, :6], value_embed[:, :6]], -1) @ attn.value_gate_w.T)  # (T, H)
        v = v + ve_gate[..., None] * value_embed.view(T, H, Dh)
    if extra_v is not None:
        v = v + extra_v.view(T, H, Dh)
    scores = torch.einsum("thd,shd->hts", q, k) * attn.scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = torch.einsum("hts,shd->thd", probs, v)
    if dc is not None:
        y = y + naive_dc(q, k, v, dc[0], dc[1], (ids == tg.EOT_TOKEN).cumsum(0), attn.scale, dc[2])
    if xsa is not None:
        for t in range(T):
            for h in range(H):
                y[t, h] = y[t, h] - torch.tanh(xsa[t, h]) * (y[t, h] @ v[t, h]) / (v[t, h] @ v[t, h]) * v[t, h]
    if head_gate is not None:
        y = y * head_gate[..., None]
    return y.reshape(T, -1) @ (attn.sa_lambdas[1] * attn.proj_w).T


def naive_2026_loss(model, ids, targets, windows, mtp_weights, tied):
    cfg = model.cfg
    table = model.lm_head_w if tied else model.embed.weight
    e = table[ids.long()]
    rows = [e[0]] + [e[t] + model.smear_lambda * torch.sigmoid(e[t, :12] @ model.smear_gate.weight[0]) * e[t - 1]
                     for t in range(1, len(ids))]
    bigram = torch.stack([model.bigram_embed.weight[r] * model.bigram_signs[s] for r, s in
                          zip(tg.bigram_hash(ids, 97), tg.bigram_sign_index(ids, 64))])
    with_bigram = lambda x, g: torch.cat([x[:, :16] + g * bigram, x[:, 16:]], -1)  # noqa: E731

    def coefficients(x, w1, w2, b2, scale):  # (W2 gelu(W1 x) + b2) x scale, then lane by lane
        return (F.gelu(x @ w1.T) @ w2.T + b2) * scale

    def lanes(values, layout):
        return {name: values[:, a : a + n] for name, (a, n) in layout.items()}

    x0 = tg.rms_norm(torch.stack(rows))
    g = lanes(coefficients(x0, model.mudd_gate_w1[0], model.mudd_gate_w2[0, :6], model.mudd_gate_b2[0, :6],
                           model.mudd_gate_scale), STRUCTURE_PRE)
    long_mask, short_mask = (naive_token_window(ids, w) for w in windows)
    value_tables = dict(zip(cfg.value_embed_layers, model.value_embeds))
    x = with_bigram(x0, g["bigram0"])
    c0, skip, source = x, None, None
    for i, block in enumerate(model.blocks):
        resid, post = model.resid_lambdas[i], model.post_lambdas[i]
        if i == 2:
            g.update(lanes(coefficients(x, model.mudd_gate_w1[1], model.mudd_gate_w2[1, :17], model.mudd_gate_b2[1, :17],
                                        model.mudd_gate_scale), STRUCTURE_POST))
        if i == 3:
            x = x + torch.sigmoid(model.skip_lambda) * g["skip"] * skip
        if block.attn is None:
            x = resid[1] * x + post[1] * (torch.relu(tg.rms_norm(x) @ block.mlp.fc_w).square() @ block.mlp.proj_w.T)
        elif i == 6:  # MUDD-0
            mu = coefficients(x, model.mudd_w1[0], model.mudd_w2[0], model.mudd_b2[0], 0.1).unbind(-1)
            mu = [m[:, None] for m in mu]
            last_input = x
            extra_v = mu[0] * c0 + mu[1] * source + mu[2] * x
            mixed = (1 + mu[5]) * x + mu[3] * c0 + mu[4] * source
            ve_gate = torch.cat([mu[6], mu[7]], -1)  # 2 heads: one per lane
            a = naive_attention(block.attn, tg.rms_norm(source), value_tables[6].weight[ids.long()], long_mask,
                                model.rotary, ids, ve_gate=ve_gate, extra_v=extra_v, head_gate=g["attn6"],
                                dc=(g["dc_w1"], g["dc_w2"], 5))
            x = with_bigram(mu[8] * mixed + mu[9] * a + mu[10] * c0, mu[11])
            x = mu[12] * x + mu[13] * (torch.relu(tg.rms_norm(x) @ block.mlp.fc_w).square() @ block.mlp.proj_w.T)
        else:
            ve = value_tables[i].weight[ids.long()] if i in value_tables else None
            mask = long_mask if i in cfg.long_window_layers else short_mask
            a = naive_attention(block.attn, tg.rms_norm(x if source is None else source), ve, mask, model.rotary,
                                xsa=g.get(f"xsa{i}"), head_gate=g.get(f"attn{i}"))
            x = resid[0] * x + post[0] * a + g[f"x0_{i}"] * x0
            if i > 0:
                x = with_bigram(x, g[f"bigram{i}"])
            x = resid[1] * x + post[1] * (torch.relu(tg.rms_norm(x) @ block.mlp.fc_w).square() @ block.mlp.proj_w.T)
        if i == 1:
            skip = x
        if i == 4:
            source = x
    mu = coefficients(x, model.mudd_w1[1], model.mudd_w2[1, :5], model.mudd_b2[1, :5], 0.1)
    first_ve = value_tables[1].weight[ids.long()]
    x = x + sum(mu[:, j : j + 1] * src for j, src in enumerate([c0, source, last_input, first_ve, skip]))
    x = tg.rms_norm(x)
    logits = 23 * torch.sigmoid((x @ model.lm_head_w.T + 5) / 7.5)
    return x, naive_multi_token_loss(logits, targets, mtp_weights)


@pytest.mark.parametrize("tied", [True, False])
def test_2026_residual_structure_matches_a_naive_forward(tied):
    # Catches (each tried): MUDD-1 without its c0 source, the skip without its post-gate lane, XSA without the tanh
    # of its alpha, DC's window one token wider, the post gate reading x0 instead of the stream.
    cfg = structure_cfg()
    model = randomized_model(cfg)
    ids = token_ids(257, high=512, bos_at=[0, 70, 200])
    inputs, targets = ids[:-1].contiguous(), ids[1:].long()
    schedule = at(cfg, 300, 140, mtp_weights=(1.0, 0.5), tied=tied)
    final_states = []

    def spy(x, *args, **options):
        final_states.append(x)
        return tg.head_loss(x, *args, **options)

    model.head_loss = spy
    got = model(inputs, targets, schedule)
    with torch.no_grad():
        expected_x, expected_loss = naive_2026_loss(model, inputs, targets, (300, 140), (1.0, 0.5), tied)
    torch.testing.assert_close(final_states[0], expected_x, rtol=1e-4, atol=1e-5)  # the stream before the head
    assert got.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_structure_gate_layout_is_the_one_counted_by_hand():
    pre, post = tg.gate_layout(structure_cfg())
    names = {("xsa", 1): "xsa1", ("xsa", 4): "xsa4", ("attn", 2): "attn2", ("attn", 6): "attn6", ("skip", 3): "skip",
             ("dc_w1", 6): "dc_w1", ("dc_w2", 6): "dc_w2"}
    named = lambda layout: {names.get(k, f"{k[0]}_{k[1]}" if k[0] == "x0" else f"{k[0]}{k[1]}"): v  # noqa: E731
                            for k, v in layout.items()}
    assert named(pre) == STRUCTURE_PRE and named(post) == STRUCTURE_POST


def test_the_record_gate_layout_is_the_scripts():
    # The 2026-08-01 script's unpack_pre_mudd_gate / unpack_post_mudd_gate and its dc_weights slice, and its
    # bias init (in units of the 0.1 scale): heads 2.5, bigram 0.5, skip 5, DC w1 10.
    cfg = tg.parse_config([])
    pre, post = tg.gate_layout(cfg)
    assert (pre[("xsa", 1)], pre[("xsa", 3)], pre[("attn", 3)]) == ((0, 6), (6, 6), (12, 6))
    assert [pre[(kind, i)][0] for i in range(4) for kind in ("x0", "bigram")] == list(range(18, 26))
    assert (post[("xsa", 4)], post[("xsa", 7)], post[("attn", 10)]) == ((0, 6), (6, 6), (12, 6))
    assert [post[(kind, i)][0] for i in (4, 5, 7, 8, 9) for kind in ("x0", "bigram")] == list(range(18, 28))
    assert (post[("skip", 6)], post[("dc_w1", 10)], post[("dc_w2", 10)]) == ((28, 1), (29, 6), (35, 6))
    assert (tg.lane_count(pre), tg.lane_count(post)) == (26, 41)
    expected = torch.zeros(2, 41)
    expected[0, 12:18] = expected[1, 12:18] = 2.5
    expected[0, 19:26:2] = expected[1, 19:28:2] = 0.5
    expected[1, 28], expected[1, 29:35] = 5.0, 10.0
    torch.testing.assert_close(tg.gate_bias_init(cfg), expected)


def test_2026_inits_and_parameters():
    model = tg.GPT(structure_cfg(), 256)
    assert model.resid_lambdas.flatten().tolist() == pytest.approx([1.1 ** 0.5] * 14)
    assert model.post_lambdas.tolist() == [[1.0, 1.0]] * 7
    assert (model.smear_lambda.item(), model.skip_lambda.item()) == (0.0, -1.5)
    assert not any(hasattr(model, name) for name in ("x0_lambdas", "bigram_lambdas", "skip_gate", "backout_lambda"))
    assert not model.smear_gate.weight.any() and not model.mudd_w2.any() and not model.mudd_gate_w2.any()
    assert model.mudd_gate_scale.item() == pytest.approx(0.1)
    bound = 64 ** -0.5  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    for w1 in (model.mudd_w1, model.mudd_gate_w1):
        assert w1.shape == (2, 64, 64) and w1.abs().max() <= bound and w1.abs().max() > 0.9 * bound
    # MUDD-0 starts as the plain layer: VE gates 2, resid sqrt(1.1), post 1, bigram 0.05; MUDD-1 the old backout -0.5
    effective = model.mudd_b2 * 0.1
    assert effective[0].tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 2, 2, 1.1 ** 0.5, 1, 0, 0.05, 1.1 ** 0.5, 1])
    assert effective[1].tolist() == pytest.approx([0, -0.5] + [0] * 12)
    assert torch.equal(model.embed.weight, model.lm_head_w) and 0.015 < model.lm_head_w.std().item() < 0.025
    assert 0.008 < model.value_embeds[0].weight.std().item() < 0.012
    # the MUDD layer's value embedding is gated by MUDD-0, not by a gate of its own
    assert [i for i, b in enumerate(model.blocks) if b.attn is not None and b.attn.value_gate_w is not None] == [1, 5]
    assert all(b.attn.sa_lambdas.tolist() == [0.5, 1.0] for b in model.blocks if b.attn is not None)


def test_record_storage_rounds_the_mudd_biases_to_bf16():
    # The script stores the MUDD biases in bf16: sqrt(1.1)/0.1 = 10.488 becomes 10.5, so MUDD-0's resid starts at
    # 1.05 (1.046875 after the bf16 multiply by 0.1); the gates' scale stays fp32.
    cfg = tg.parse_config(["--preset", "tiny"])
    model = tg.store_as_record(tg.GPT(cfg, 512), cfg)
    assert model.mudd_b2.dtype == torch.bfloat16 and model.mudd_b2[0, 8].item() == 10.5
    assert model.mudd_gate_scale.dtype == torch.float32 and model.resid_lambdas.dtype == torch.float32
    assert (model.mudd_b2[0, 8] * 0.1).item() == 1.046875


def test_tied_embedding_trains_the_head_matrix_only():
    cfg = structure_cfg()
    model = randomized_model(cfg)
    ids = token_ids(257, high=512, bos_at=[0])
    model(ids[:-1].contiguous(), ids[1:].long(), at(cfg, tied=True)).backward()
    assert model.embed.weight.grad is None and model.lm_head_w.grad is not None


def test_smear_mixes_exactly_the_previous_token():
    torch.manual_seed(0)
    x, w, lam = torch.randn(9, 20), torch.randn(1, 12), torch.tensor(0.7)
    got = tg.smear_previous_token(x, w, lam)
    for t in range(9):
        expected = x[t] if t == 0 else x[t] + lam * torch.sigmoid(x[t, :12] @ w[0]) * x[t - 1]
        torch.testing.assert_close(got[t], expected)


# -----------------------------------------------------------------------------
# Attention windows in tokens (FlashAttention-3 semantics) and the partial key offset


def naive_token_window(ids, window):
    docs, mask = (ids == tg.EOT_TOKEN).cumsum(0).tolist(), torch.zeros(len(ids), len(ids), dtype=torch.bool)
    for i in range(len(ids)):
        for j in range(max(0, i - window), i + 1):  # W + 1 keys: i - W .. i
            mask[i, j] = docs[i] == docs[j]
    return mask


@pytest.mark.parametrize("window", [0, 1, 127, 128, 300, 640])
def test_token_window_mask_matches_the_definition(window):
    ids = token_ids(400, bos_at=[0, 5, 130, 131, 260])
    assert torch.equal(tg.token_window_mask(ids, window), naive_token_window(ids, window))


@pytest.mark.parametrize("window", [1, 100, 128, 200, 384, 700])
def test_flex_token_window_mask_matches_the_dense_mask(window):
    ids = token_ids(768, bos_at=[0, 5, 130, 131, 400, 640])
    q, k, v = (torch.randn(1, 2, 768, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block_mask = tg.flex_token_window_mask(ids, window)
    flex = tg.flex_attention(q, k, v, block_mask=block_mask, scale=0.1)
    dense_mask = tg.token_window_mask(ids, window)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=0.1)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # full blocks skip mask_mod: each must be visible everywhere; listed blocks must cover every visible pair
    blocks = dense_mask.view(6, 128, 6, 128)
    listed = block_mask.to_dense()[0, 0].bool()
    full = torch.zeros(6, 6, dtype=torch.bool)
    for q_block in range(6):
        count = block_mask.full_kv_num_blocks[0, 0, q_block]
        full[q_block, block_mask.full_kv_indices[0, 0, q_block, :count].long()] = True
    assert torch.equal(listed | blocks.any(dim=(1, 3)), listed) and torch.equal(full & blocks.all(dim=(1, 3)), full)


def test_model_uses_the_schedules_token_windows():
    cfg = tiny_cfg()
    model = tg.GPT(cfg, 256)
    ids = token_ids(256, bos_at=[0, 100])
    masks = model.attention_masks(ids, at(cfg, 130, 50))
    assert torch.equal(masks[0], naive_token_window(ids, 130)) and torch.equal(masks[1], naive_token_window(ids, 50))


def test_key_offset_shifts_the_position_free_dims_of_keys_only():
    k = torch.randn(1, 10, 2, 16)
    got = tg.offset_position_free_dims(k)
    rotary = tg.Rotary(16, 10)  # the model's table, one for all layers
    free = (rotary.sin == 0).all(0).repeat(2)  # dims RoPE never rotates (its tables cover each half)
    assert free.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    torch.testing.assert_close(got[:, 1:, :, free], k[:, :-1, :, free])  # one token later, not a cascade
    torch.testing.assert_close(got[:, 0], k[:, 0])
    torch.testing.assert_close(got[..., ~free], k[..., ~free])


def test_key_offset_only_on_long_window_layers():
    model = tg.GPT(tiny_cfg("--key-offset"), 256)
    assert [b.attn.key_offset for b in model.blocks if b.attn is not None] == [True, False, True]  # layers 0, 1, 3
    assert not any(b.attn.key_offset for b in tg.GPT(tiny_cfg(), 256).blocks if b.attn is not None)


# -----------------------------------------------------------------------------
# YaRN


def naive_yarn(freqs, windows):
    """The 2026 Yarn.apply, element by element: rotations over the old window, ramp between 1 and 32 turns."""
    freqs = [float(f) for f in freqs]
    for old, new in zip(windows, windows[1:]):
        if new == old:
            continue
        for i, f in enumerate(freqs):
            ramp = min(max((old * f / (2 * 3.141592653589793) - 1) / 31, 0.0), 1.0)
            freqs[i] = f * (old / new + ramp * (1 - old / new))
    return freqs


def test_yarn_frequencies_match_the_definition():
    base = tg.rotary_frequencies(128)
    windows = [384, 896, 1408, 1664]
    got = tg.yarn_frequencies(base, windows)
    assert got.tolist() == pytest.approx(naive_yarn(base, windows), rel=1e-5)
    assert got[0] == base[0] and got[31] < base[31] * 0.25 and (got[32:] == 0).all()  # fast kept, slow interpolated
    assert torch.equal(tg.yarn_frequencies(base, [384, 384]), base)


def test_model_applies_yarn_per_stage_with_the_schedules_scale():
    cfg = tg.parse_config(["--preset", "r2026", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32",
                           "--bigram-rows", "97", "--bigram-dim", "16", "--bigram-sign-rows", "64", "--val-seq-len", "256"])
    model = tg.GPT(cfg, 256)
    assert model.rotary.cos.size(0) == 512  # one table for all layers: the paired layers' doubled length
    ids = token_ids(256, bos_at=[0, 100])
    for step, windows in [(1000, [384, 896, 1408]), (0, [384]), (1284, [384, 896, 1408, 1664]), (1285, [384, 896, 1408, 1664])]:
        schedule = tg.schedule_at(step, cfg)
        with torch.no_grad():
            model(ids, ids.long(), schedule)
        freqs = torch.tensor(naive_yarn(tg.rotary_frequencies(32), windows))
        expected = torch.outer(torch.arange(512.0), freqs)
        torch.testing.assert_close(model.rotary.cos, expected.cos(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.rotary.sin, expected.sin(), atol=1e-5, rtol=1e-5)
        assert all(block.attn.scale == schedule.attn_scale for block in model.blocks if block.attn is not None)


# -----------------------------------------------------------------------------
# Paired-head attention


def naive_paired_attention(attn, x, value_embed, ids, window, rotary):
    """Head h of token t sits at position P = 2t + h // (H/2) in slot h % (H/2) and is rotated at 2t + h % 2 (the
    2026 script's quirk); a query sees the keys of its slot at positions P - window .. P of its document."""
    T, H, Dh = x.size(0), attn.num_heads, attn.head_dim
    w = attn.sa_lambdas[0] * torch.cat([attn.qk_w, attn.v_w[None]])
    q, k, v = ((x @ w[j].T).view(T, H, Dh) for j in range(3))
    rot = lambda t, h, vec: naive_rotate(vec, 2 * t + h % 2, rotary)  # noqa: E731
    q = torch.stack([torch.stack([rot(t, h, tg.rms_norm(q[t, h])) for h in range(H)]) for t in range(T)])
    k = torch.stack([torch.stack([rot(t, h, tg.rms_norm(k[t, h])) for h in range(H)]) for t in range(T)])
    if value_embed is not None:  # 2026-08: the same gate as other layers, x[:6] and ve[:6]
        gate = 2 * torch.sigmoid(torch.cat([x[:, :6], value_embed[:, :6]], -1) @ attn.value_gate_w.T)  # (T, H)
        v = v + gate[..., None] * value_embed.view(T, H, Dh)
    docs = (ids == tg.EOT_TOKEN).cumsum(0)
    place = lambda t, h: (2 * t + h // (H // 2), h % (H // 2))  # noqa: E731
    y = torch.zeros(T, H, Dh)
    for t in range(T):
        for h in range(H):
            pos, slot = place(t, h)
            keys = [(t2, h2) for t2 in range(T) for h2 in range(H)
                    if place(t2, h2)[1] == slot and pos - window <= place(t2, h2)[0] <= pos and docs[t2] == docs[t]]
            scores = torch.stack([q[t, h] @ k[t2, h2] for t2, h2 in keys]) * attn.scale
            y[t, h] = (scores.softmax(0)[:, None] * torch.stack([v[t2, h2] for t2, h2 in keys])).sum(0)
    return y.reshape(T, -1) @ (attn.sa_lambdas[1] * attn.proj_w).T


def test_paired_head_attention_matches_the_definition():
    cfg = tiny_cfg("--num-heads", "4", "--head-dim", "16", "--paired-head-layers", "0,1", "--value-embed-layers", "1")
    model = randomized_model(cfg)
    ids = token_ids(48, bos_at=[0, 20])
    x = tg.rms_norm(torch.randn(48, 64))
    ve = torch.randn(48, 64)
    for layer, value_embed in [(0, None), (1, ve)]:
        attn = model.blocks[layer].attn
        window = 7
        mask = tg.token_window_mask(tg.doubled_sequence(ids), window)
        got = attn(x[None], None if value_embed is None else value_embed[None], mask, model.rotary.cos, model.rotary.sin,
                   tg.LayerGates())[0]
        expected = naive_paired_attention(attn, x, value_embed, ids, window, model.rotary)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_model_builds_paired_masks_on_the_doubled_sequence():
    cfg = tiny_cfg("--num-heads", "4", "--head-dim", "16", "--paired-head-layers", "1")
    model = tg.GPT(cfg, 256)
    ids = token_ids(128, bos_at=[0, 33])
    masks = model.attention_masks(ids, at(cfg, 40, 9))
    assert masks[1].shape == (256, 256) and masks[0].shape == (128, 128)
    doubled = naive_token_window(tg.doubled_sequence(ids), 9)
    assert torch.equal(masks[1], doubled) and doubled[67, 66] and not doubled[66, 65]  # document 2 starts at 2*33


# -----------------------------------------------------------------------------
# The whole recipe trains: schedule, staged loader, model and optimizer wired together


def test_the_record_preset_trains_across_stages_and_the_split_step(tmp_path):
    # The 2026 preset at CPU widths: 3 stages of 2 steps and 1 extension step, 2 sequences of 128 tokens a step,
    # then 1 of 256, documents cut at 128 / 256, the embedding split at step 5 (first odd step of stage 2). Every
    # stage's MTP weights, YaRN scale and windows, Adam's odd steps and the untie run; the loss must fall.
    # Few tokens a step: on a CPU the cost is in the 50304-wide head and its losses, per token.
    import re
    import subprocess
    from pathlib import Path
    from records.runlog import parse_log_file
    repo = Path(__file__).resolve().parents[1]
    args = ["--preset", "r2026", "--device", "cpu", "--no-compile", "--no-fp8-head", "--warmup-steps", "0",
            "--train-files", str(repo / "data/sample/sample_train_000001.bin"),
            "--val-files", str(repo / "data/sample/sample_val_000000.bin"), "--val-tokens", "512", "--val-seq-len", "256",
            "--val-every", "0", "--train-steps", "7", "--extension-steps", "1", "--stage-steps", "0,2,4,6",
            "--stage-batch-tokens", "256,256,256,256", "--stage-seq-len", "128,256,256,256",
            "--stage-max-doc-len", "128,256,256,256", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32", "--bigram-rows", "1000", "--bigram-dim", "16",
            "--adam-lr", "0.05", "--muon-lr", "0.05", "--log-dir", str(tmp_path), "--run-id", "r2026"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small matrices: a second thread mostly waits (and 2 cores are shared)
    done = subprocess.run([sys.executable, str(repo / "train_gpt.py"), *args], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = parse_log_file(tmp_path / "r2026.txt")
    assert log.complete and log.steps_total == 7 and [p.step for p in log.val_points] == [0, 7]
    # the schedule it ran (all 7 steps, above) spans every stage: 2 steps x 256 tokens in stages 0-2, 1 in stage 3
    stage_tokens = re.search(r"^schedule: 7 steps, stage tokens \[([\d, ]+)\]", done.stdout, re.M).group(1)
    assert [int(t.replace(",", "")) for t in stage_tokens.split(", ")] == [512, 512, 512, 256]
    assert log.val_points[0].val_loss == pytest.approx(10.83, abs=0.05)  # near ln(50304): an untrained model
    assert log.final_val_loss < log.val_points[0].val_loss - 0.5


# -----------------------------------------------------------------------------
# XSA and DC (2026-08)


def test_xsa_at_full_strength_leaves_no_component_along_the_heads_value():
    torch.manual_seed(0)
    y, v = torch.randn(1, 9, 3, 8), torch.randn(1, 9, 3, 8)
    alpha = torch.full((1, 9, 3), 20.0)  # tanh(20) = 1 in fp32
    got = tg.exclude_self_value(y, v, alpha)
    torch.testing.assert_close((got * v).sum(-1), torch.zeros(1, 9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(tg.exclude_self_value(y, v, torch.zeros(1, 9, 3)), y)  # alpha 0: off, as at init
    half = tg.exclude_self_value(y, v, torch.full((1, 9, 3), 0.5))
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True)
    torch.testing.assert_close(half, y - torch.tanh(torch.tensor(0.5)) * along * v)


@pytest.mark.parametrize("window", [1, 7, 112])
def test_dc_post_only_matches_the_definition_across_query_blocks_and_documents(window):
    # 300 tokens: three 128-query blocks, so keys come from the block before; documents start at 0, 120 and 200.
    torch.manual_seed(0)
    T, H, D = 300, 3, 8
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    w1, w2 = torch.randn(1, T, H), torch.randn(1, T, H)
    y = torch.randn(1, T, H, D)
    docs = torch.zeros(T, dtype=torch.long)
    docs[120:], docs[200:] = 1, 2
    got = tg.dc_post_only(y, q, k, v, w1, w2, docs, 0.3, window)
    expected = y[0] + naive_dc(q[0], k[0], v[0], w1[0], w2[0], docs, 0.3, window)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_the_dc_layer_uses_its_own_window_not_the_layers():
    # The record's DC window (112) is independent of the layer's attention window: a wider attention window
    # changes the attention but not DC's correction.
    cfg = structure_cfg("--dc-window", "3")
    model = randomized_model(cfg)
    attn = model.blocks[6].attn
    assert attn.dc_window == 3 and tg.parse_config([]).dc_window == 112
    ids = token_ids(128, high=512, bos_at=[0, 50])
    x = tg.rms_norm(torch.randn(1, 128, 64))
    w1, w2 = torch.randn(1, 128, 2), torch.randn(1, 128, 2)
    docs = tg.document_ids(ids)
    outputs = {}
    for window in (10, 60):
        mask = tg.token_window_mask(ids, window)
        with_dc = attn(x, None, mask, model.rotary.cos, model.rotary.sin, tg.LayerGates(dc=(w1, w2, docs)))
        without = attn(x, None, mask, model.rotary.cos, model.rotary.sin, tg.LayerGates())
        outputs[window] = with_dc - without
    torch.testing.assert_close(outputs[10], outputs[60], atol=1e-5, rtol=1e-4)
    assert outputs[10].abs().max() > 1e-3
    attn.dc_window = 40  # and it is the layer's dc_window that sets it: a wider one reaches more keys
    mask = tg.token_window_mask(ids, 10)
    wider = (attn(x, None, mask, model.rotary.cos, model.rotary.sin, tg.LayerGates(dc=(w1, w2, docs)))
             - attn(x, None, mask, model.rotary.cos, model.rotary.sin, tg.LayerGates()))
    assert (wider - outputs[10]).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# Prefix-token prediction (2026-08)


def test_the_prefix_table_is_gpt2s_byte_prefix_table():
    import hashlib
    token_bytes = tg.gpt2_token_bytes()  # from data/tiktoken_cache/, offline
    table = tg.prefix_token_table(50304, token_bytes)
    # the script's table, byte for byte (its sha256 of the int64 table)
    assert hashlib.sha256(table.numpy().astype("<i8").tobytes()).hexdigest() == \
        "05f2e6adcf3c87e2415b6f6590239f7fc324a13a2aa82c6323bff1bd4a9df136"
    by_id = {token: text for text, token in token_bytes.items()}
    assert int((table >= 0).sum()) == 50000 and (table[50256:] == -1).all()  # <|endoftext|> and the pad rows: none
    assert all(table[token_bytes[bytes([b])]] == -1 for b in range(256))
    assert by_id[int(table[token_bytes[b" gazed"]])] == b" gaze" and by_id[int(table[token_bytes[b"hello"]])] == b"hell"
    # the longest proper prefix that is a token, by brute force on a sample
    for token in torch.randint(0, 50256, (300,), generator=torch.Generator().manual_seed(0)).tolist():
        text = by_id[token]
        longest = next((token_bytes[text[:n]] for n in range(len(text) - 1, 0, -1) if text[:n] in token_bytes), -1)
        assert table[token] == longest, text


def test_prefix_cross_entropy_counts_only_positions_with_a_prefix():
    torch.manual_seed(0)
    logits = (torch.randn(20, 30) * 2).requires_grad_()
    prefix = torch.randint(0, 30, (20,))
    prefix[[0, 7, 8]] = -1
    got = tg.prefix_cross_entropy(logits, prefix)
    expected = sum(-torch.log_softmax(logits[t], -1)[prefix[t]] for t in range(20) if prefix[t] >= 0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert not logits.grad[[0, 7, 8]].any() and logits.grad[1].abs().sum() > 0  # no gradient where there is none


def test_model_adds_the_schedules_prefix_term_in_training_only():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 256)
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.05)
    ids = token_ids(257, bos_at=[0])
    inputs, targets = ids[:-1].contiguous(), ids[1:].long()
    weighted = tg.dataclasses.replace(at(cfg), prefix_weight=0.25)
    base = model(inputs, targets, at(cfg))
    assert model(inputs, targets, weighted).item() == base.item()  # the table still all -1: no term (the warm-up)
    model.prefix_table.copy_(tg.prefix_token_table(cfg.vocab_size))
    calls = []

    def spy(x, head_w, *args, **options):
        calls.append(x)
        return tg.head_loss(x, head_w, *args, **options)

    model.head_loss = spy
    with_prefix = model(inputs, targets, weighted)
    x = calls[-1]
    logits = 23 * torch.sigmoid((x @ model.lm_head_w.T.float() + 5) / 7.5)
    expected = base + 0.25 * tg.prefix_cross_entropy(logits, model.prefix_table[targets])
    assert with_prefix.item() == pytest.approx(expected.item(), rel=1e-5) and with_prefix > base
    model.eval()
    with torch.no_grad():
        assert model(inputs, targets, weighted).item() == pytest.approx(base.item(), rel=1e-6)  # validation: none
