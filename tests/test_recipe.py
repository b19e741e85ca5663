"""The recipe table as applied to the record's model, the flags the table owns, validation's head, and the
compiled blocks' graph count (the table's own values against the 2026 script: tests/test_optimizer_2026.py)."""

import re

import pytest
import torch

import train_gpt as tg


def applied_recipe(argv):
    cfg = tg.parse_config(argv)
    with torch.device("meta"):
        model = tg.GPT(cfg, tg.max_seq_len(cfg))
    return cfg, tg.assign_params(model, cfg)


def test_the_record_prints_the_2026_table(capsys):
    assert tg.main(["--print-recipe"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    # shape, init, storage dtype, optimizer state, then the optimizer's settings
    assert rows["blocks.*.attn.qk_w"][2:11] == ["2x768x768", "U(+-0.03125)", "bf16", "mom:fp32+low:int16", "muon",
                                                "0.023", "1", "0.023", "-"]
    assert rows["bigram_embed.weight"][2:9] == ["377280x768", "zeros", "bf16", "m,v:fp32", "adam", "0.6", "1"]
    # the MUDD rows: shape, init, dtype, state, optimizer, lr, shape factor, effective lr, betas, wd
    assert rows["mudd_b2"][2:13] == ["2x14", "lambda", "inits/0.1", "bf16", "m,v:fp32", "adam", "0.002", "1", "0.002",
                                     "0.9,0.99", "0"]
    assert rows["mudd_gate_scale"][2:12] == ["scalar", "0.1", "fp32", "m,v:fp32", "adam", "0.0008", "1", "0.0008",
                                             "0.9,0.99", "0"]
    assert rows["muon:"][1] == "polar_express_2026,"


def test_the_record_model_has_every_parameter_in_the_table_once():
    _, settings = applied_recipe([])
    # 11 layers: 10 with attention (qk, v, proj, sa lambdas), 4 with a value gate (layer 10's comes from MUDD-0),
    # 11 MLPs (2 each); globals: embed, head, 5 value tables, bigram table, resid/post lambdas, smear gate+lambda,
    # skip lambda, the MUDD gates (w1, w2, b2, scale) and MUDD (w1, w2, b2)
    assert len(settings) == 10 * 4 + 4 + 11 * 2 + 8 + 2 + 3 + 4 + 3
    assert len({s.name for s in settings}) == len(settings)


@pytest.mark.parametrize("flag", ["--adam-beta1", "--adam-beta2", "--embed-lr-mult", "--scalar-lr-mult", "--mlp-in-lr-mult"])
def test_a_flag_for_a_value_the_table_sets_per_row_is_refused_in_one_line(flag, capsys):
    # These flags were accepted and changed nothing under the record's table (issue 21, row 1).
    assert tg.main([flag, "0.9", "--print-recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train_gpt.py: error: {flag}: the recipe table sets") and "\n" not in err
    assert "--print-recipe" in err and "recipe()" in err


def test_gates_on_adam_is_refused_too(capsys):
    assert tg.main(["--gates-on-adam"]) == 2 and "which optimizer trains the gates" in capsys.readouterr().err
    assert tg.main(["--no-gates-on-adam"]) == 2


def test_the_base_lr_flags_act_on_every_row_they_scale(capsys):
    _, base = applied_recipe([])
    _, doubled = applied_recipe(["--adam-lr", "0.016", "--muon-lr", "0.046"])
    for before, after in zip(base, doubled):
        assert after.effective_lr == pytest.approx(2 * before.effective_lr), before.name


def test_a_parameter_outside_the_recipe_is_refused():
    cfg = tg.parse_config(["--preset", "tiny"])
    model = tg.GPT(cfg, 512)
    model.blocks[0].mlp.extra = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no recipe row matches parameter blocks.0.mlp.extra"):
        tg.assign_params(model, cfg)


def small_cfg(*extra):
    """The tiny preset's structure (every record component) at width 64."""
    return tg.parse_config(["--preset", "tiny", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32",
                            "--val-seq-len", "512", *extra])


def token_ids(n, bos_at):
    ids = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(0))
    ids[list(bos_at)] = tg.EOT_TOKEN
    return ids


def test_validation_uses_the_bf16_head_in_chunks_even_when_training_uses_fp8(monkeypatch):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    calls = []

    def spy(x, head_w, targets, logit_cap, fp8_scales, **options):
        calls.append((x.size(0), fp8_scales))
        return tg.head_loss(x, head_w, targets, logit_cap, None, **options)  # the bf16 path whatever was asked

    model.head_loss = spy
    model.fp8_scales = tg.fp8_head_scales(cfg, 1)  # as on Hopper
    ids = token_ids(513, [0, 100, 300])
    model(ids[:256], ids[1:257], tg.schedule_at(0, cfg))
    assert calls == [(256, model.fp8_scales)]  # training: the FP8 head
    calls.clear()
    val_cfg = tg.dataclasses.replace(cfg, val_tokens=512)
    whole = tg.evaluate(model, ids.numpy().astype("uint16"), val_cfg, 10, tg.Comm(), torch.device("cpu"))
    assert calls == [(512, None)] and model.training  # validation: bf16, and back to training mode after
    calls.clear()
    monkeypatch.setattr(tg, "VAL_HEAD_CHUNK", 128)
    chunked = tg.evaluate(model, ids.numpy().astype("uint16"), val_cfg, 10, tg.Comm(), torch.device("cpu"))
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
    cfg = small_cfg()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    ids = token_ids(513, [0, 100, 300])
    real_compile = torch.compile  # dynamo's graphs and guards are the same with the eager backend, in seconds
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    with config.patch({limit_name: 8, "fail_on_recompile_limit_hit": True}):
        model.compile_regions()
        assert getattr(config, limit_name) >= 16
        for step in (0, 1, 2):  # stage 0: new windows' values are data, not recompiles
            model(ids[:256], ids[1:257], tg.schedule_at(step, cfg)).backward()
        tg.evaluate(model, ids.numpy().astype("uint16"), tg.dataclasses.replace(cfg, val_tokens=512), 10, tg.Comm(),
                    torch.device("cpu"))
        model(ids[:256], ids[1:257], tg.schedule_at(3, cfg)).backward()
        # 4 layers of 4 kinds: 0 paired heads, 1 value-gated with key offset, XSA and a head gate, 2 MLP only, 3 the
        # MUDD layer (DC, MUDD-0's value gate); each for training and validation, plus the head twice. More graphs
        # would mean per-layer or per-window recompiles.
        assert counters["stats"]["unique_graphs"] == 4 * 2 + 2
    torch._dynamo.reset()


@pytest.mark.parametrize("length, most, expected", [(262_144, 32_768, 32_768), (49_152, 32_768, 24_576),
                                                     (512, 32_768, 512), (40_960, 32_768, 20_480), (131, 64, 1)])
def test_validation_head_chunks_are_equal_and_within_the_limit(length, most, expected):
    chunk = tg.equal_chunk(length, most)
    assert chunk == expected and length % chunk == 0 and chunk <= most


def test_the_2026_recipe_covers_the_2026_model():
    # Every parameter of the model has a row of the table: Muon for the attention and MLP matrices (Q/K cut into
    # head pairs of 256 rows), Adam for the rest, with the table's betas.
    _, settings = applied_recipe([])
    muon = {re.sub(r"^blocks\.\d+\.", "blocks.*.", s.name): s.matrix_shape for s in settings if s.optimizer == "muon"}
    assert muon == {"blocks.*.attn.qk_w": (256, 768), "blocks.*.attn.v_w": (768, 768), "blocks.*.attn.proj_w": (768, 768),
                    "blocks.*.mlp.fc_w": (768, 3072), "blocks.*.mlp.proj_w": (768, 3072)}
    by_name = {s.name: s for s in settings}
    assert by_name["bigram_embed.weight"].betas == (0.75, 0.95) and by_name["lm_head_w"].betas == (0.5, 0.95)
    assert by_name["blocks.1.attn.value_gate_w"].optimizer == "adam"
    assert by_name["blocks.0.mlp.proj_w"].effective_lr == pytest.approx(2 * by_name["blocks.0.mlp.fc_w"].effective_lr)
