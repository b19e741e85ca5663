"""The recipes: which optimizer and effective LR every parameter gets, validation's head, compiled blocks.

The record is the 2026 recipe (its table: tests/test_optimizer_2026.py); `--preset r28` keeps record #28's, and
the table below is written from public record #28's published script (2025-08-23, "SparseAttnGate"):
Muon lr 0.05 on every hidden matrix (attention Q/K/V/O, MLP in/out, the attention gates) scaled by
sqrt(max(1, rows/cols)) of the stored matrix; Adam lr 0.008 with multipliers x75 (token and value
embeddings), x1 (head), x5 (scalars); betas (0.8, 0.95), eps 1e-10; no weight decay. A change to the recipe
must change this table on purpose.
"""

import re

import pytest
import torch

import train_gpt as tg

RECORD_28 = {  # name pattern: (optimizer, effective LR)
    "embed.weight": ("adam", 0.6),
    "value_embeds.*": ("adam", 0.6),
    "lm_head_w": ("adam", 0.008),
    "skip_weights": ("adam", 0.04),
    "blocks.*.x0_mix": ("adam", 0.04),
    "blocks.*.attn.value_mix": ("adam", 0.04),
    "blocks.*.attn.qkv_w": ("muon", 0.05),
    "blocks.*.attn.proj_w": ("muon", 0.05),
    "blocks.*.attn.gate_w": ("muon", 0.05),
    "blocks.*.mlp.fc_w": ("muon", 0.05),
    "blocks.*.mlp.proj_w": ("muon", 0.05),
}


def applied_recipe(argv):
    cfg = tg.parse_config(argv)
    with torch.device("meta"):
        model = tg.GPT(cfg, cfg.train_seq_len)
    return cfg, tg.assign_params(model, cfg)


def expected_row(name):
    import fnmatch
    matches = [row for pattern, row in RECORD_28.items() if fnmatch.fnmatchcase(name, pattern)]
    assert len(matches) == 1, f"{name}: {len(matches)} rows of the #28 table match"
    return matches[0]


def test_r28_preset_is_record_28s_recipe_per_parameter():
    cfg, settings = applied_recipe(["--preset", "r28"])
    assert len(settings) == 6 + 12 + 11 * 4 + 12 * 2  # globals, x0 mixes, 11 attention layers (4 each), 12 MLPs
    for s in settings:
        optimizer, lr = expected_row(s.name)
        assert (s.name, s.optimizer) == (s.name, optimizer)
        assert s.effective_lr == pytest.approx(lr, rel=1e-12), s.name
    assert (cfg.orthogonalizer, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == ("ns5", 0.8, 0.95, 1e-10)
    assert (cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps) == (0.85, 0.95, 300)
    assert tg.NS5_COEFFS == [(3.4445, -4.7750, 2.0315)] * 5
    assert cfg.val_seq_len == 262_144


def test_mlp_input_matrix_is_stored_so_its_shape_factor_is_one():
    _, settings = applied_recipe(["--preset", "r28"])
    fc = next(s for s in settings if s.name == "blocks.0.mlp.fc_w")
    assert tuple(fc.param.shape) == (768, 3072) and fc.shape_factor == 1.0
    # the same shape as the MLP output matrix: one Muon group of 24 matrices, a multiple of 8 ranks
    muon = tg.DistributedMuon([(s.param, s.effective_lr) for s in settings if s.optimizer == "muon"], "ns5", tg.Comm())
    sizes = {group.shape: len(group.views) for group in muon.groups}
    assert sizes == {(768, 768): 11 * 4, (768, 3072): 24, (6, 12): 11}


def test_each_deviation_from_record_28_is_a_flag():
    _, settings = applied_recipe(["--preset", "r28", "--mlp-in-lr-mult", "2", "--gates-on-adam"])
    by_name = {s.name: s for s in settings}
    assert by_name["blocks.3.mlp.fc_w"].effective_lr == pytest.approx(0.1)
    assert by_name["blocks.3.mlp.proj_w"].effective_lr == pytest.approx(0.05)
    assert (by_name["blocks.3.attn.gate_w"].optimizer, by_name["blocks.3.attn.gate_w"].effective_lr) == ("adam", pytest.approx(0.04))
    assert tg.parse_config(["--preset", "r28", "--orthogonalizer", "polar_express"]).orthogonalizer == "polar_express"


def test_print_recipe_shows_the_table(capsys):
    assert tg.main(["--preset", "r28", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "blocks.*.mlp.fc_w" in out and "0-11" in out
    fc_line = next(line for line in out.splitlines() if line.startswith("blocks.*.mlp.fc_w"))
    assert fc_line.split()[3:] == ["muon", "0.05", "1", "0.05"]
    assert "muon: ns5" in out


def test_the_record_prints_the_2026_table(capsys):
    assert tg.main(["--print-recipe"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["blocks.*.attn.qk_w"][2:8] == ["2x768x768", "muon", "0.023", "1", "0.023", "-"]
    assert rows["bigram_embed.weight"][2:6] == ["754560x192", "adam", "0.6", "1"]
    assert rows["muon:"][1] == "polar_express_2026,"


def test_a_parameter_outside_the_recipe_is_refused():
    cfg = tg.parse_config(["--preset", "tiny"])
    model = tg.GPT(cfg, 512)
    model.blocks[0].mlp.extra = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no recipe row matches parameter blocks.0.mlp.extra"):
        tg.assign_params(model, cfg)


def tiny_record_shaped(extra=()):
    """The record's layer structure (12 layers, no attention in 7, 3 value-embedding tables, long windows on
    0, 4, 7, 11) at a width that runs on a CPU."""
    return tg.parse_config(["--preset", "tiny", "--num-layers", "12", "--no-attn-layers", "7", "--num-value-embeds", "3",
                            "--long-window-layers", "0,4,7,11", "--model-dim", "64", "--num-heads", "1",
                            "--train-seq-len", "256", "--val-seq-len", "512", *extra])


def token_ids(n, bos_at):
    ids = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(0))
    ids[list(bos_at)] = tg.EOT_TOKEN
    return ids


def test_validation_uses_the_bf16_head_in_chunks_even_when_training_uses_fp8(monkeypatch):
    cfg = tiny_record_shaped()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    with torch.no_grad():
        model.lm_head_w.normal_(0, 0.02)
    calls = []

    def spy(x, head_w, targets, logit_cap, fp8_scales):
        calls.append((x.size(0), fp8_scales))
        return tg.head_loss(x, head_w, targets, logit_cap, None)  # the bf16 path whatever was asked

    model.head_loss = spy
    model.fp8_scales = tg.fp8_head_scales(cfg, 1)  # as on Hopper
    ids = token_ids(513, [0, 100, 300])
    model(ids[:256], ids[1:257], 2)
    assert calls == [(256, model.fp8_scales)]  # training: the FP8 head
    calls.clear()
    whole = tg.evaluate(model, ids.numpy().astype("uint16"), tg.dataclasses.replace(cfg, val_tokens=512), 10,
                        tg.Comm(), torch.device("cpu"))
    assert calls == [(512, None)] and model.training  # validation: bf16, and back to training mode after
    calls.clear()
    monkeypatch.setattr(tg, "VAL_HEAD_CHUNK", 128)
    chunked = tg.evaluate(model, ids.numpy().astype("uint16"), tg.dataclasses.replace(cfg, val_tokens=512), 10,
                          tg.Comm(), torch.device("cpu"))
    assert calls == [(128, None)] * 4
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_compiled_blocks_never_fall_back_to_eager(monkeypatch):
    # Dynamo runs a function eagerly, silently, once it has compiled `recompile_limit` variants of it. Make
    # that an error, keep the default limit of 8, and run every variant the record's structure has: block
    # kinds x (train, validation), then a training step again. compile_regions must allow them all.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    cfg = tiny_record_shaped()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    ids = token_ids(513, [0, 100, 300])
    real_compile = torch.compile  # dynamo's graphs and guards are the same with the eager backend, in seconds
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    with config.patch({limit_name: 8, "fail_on_recompile_limit_hit": True}):
        model.compile_regions()
        assert getattr(config, limit_name) >= 16
        for window in (1, 2, 3):
            model(ids[:256], ids[1:257], window).backward()
        tg.evaluate(model, ids.numpy().astype("uint16"), tg.dataclasses.replace(cfg, val_tokens=512), 10, tg.Comm(),
                    torch.device("cpu"))
        model(ids[:256], ids[1:257], 2).backward()
        # layer 0 (input aliases x0), attention with and without value embeddings, MLP only: 4 kinds, each for
        # training and validation, plus the head twice; more graphs would mean per-layer or per-window recompiles
        assert counters["stats"]["unique_graphs"] == 4 * 2 + 2
    torch._dynamo.reset()


@pytest.mark.parametrize("length, most, expected", [(262_144, 32_768, 32_768), (49_152, 32_768, 24_576),
                                                     (512, 32_768, 512), (40_960, 32_768, 20_480), (131, 64, 1)])
def test_validation_head_chunks_are_equal_and_within_the_limit(length, most, expected):
    chunk = tg.equal_chunk(length, most)
    assert chunk == expected and length % chunk == 0 and chunk <= most


def test_the_2026_recipe_covers_the_2026_model():
    # Every parameter of the ported 2026 model has a row of the 2026 table: Muon for the attention and MLP
    # matrices (Q/K cut into head pairs of 256 rows), Adam for the rest, with the table's betas.
    _, settings = applied_recipe(["--preset", "r2026"])
    muon = {re.sub(r"^blocks\.\d+\.", "blocks.*.", s.name): s.matrix_shape for s in settings if s.optimizer == "muon"}
    assert muon == {"blocks.*.attn.qk_w": (256, 768), "blocks.*.attn.v_w": (768, 768), "blocks.*.attn.proj_w": (768, 768),
                    "blocks.*.mlp.fc_w": (768, 3072), "blocks.*.mlp.proj_w": (768, 3072)}
    by_name = {s.name: s for s in settings}
    assert by_name["bigram_embed.weight"].betas == (0.75, 0.95) and by_name["lm_head_w"].betas == (0.5, 0.95)
    assert by_name["blocks.1.attn.value_gate_w"].optimizer == "adam"
    assert by_name["blocks.0.mlp.proj_w"].effective_lr == pytest.approx(2 * by_name["blocks.0.mlp.fc_w"].effective_lr)
