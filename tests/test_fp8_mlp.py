"""The FP8 MLP (2026-08): both projections in e4m3 with delayed per-layer scales, against the script's maths on
CPU (fp8_matmul's emulation: e4m3 values multiplied exactly, summed in fp32), the activation scales across the
warm-up reset, and a checkpoint that resumes them bit-exactly."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train_gpt as tg  # noqa: E402

E4M3 = torch.float8_e4m3fn


def test_fp8_mlp_forward_is_the_scripts_maths_and_its_backward_the_bf16_one():
    torch.manual_seed(0)
    dim, hidden, T = 32, 128, 64
    x = tg.rms_norm(torch.randn(1, T, dim)).bfloat16().requires_grad_()
    fc_w = (torch.randn(dim, hidden) * 0.1).bfloat16().requires_grad_()
    proj_w = (torch.randn(dim, hidden) * 0.1).bfloat16().requires_grad_()
    next_scale = torch.tensor(0.0007)
    w1_f8, w1_scale, w2_f8, used, following = tg.quantize_mlp_weights(fc_w, proj_w, next_scale, bootstrap=False)
    act_scale = torch.tensor([0.003])
    out, amax = tg.FP8ReLUSquareMLP.apply(x, fc_w, proj_w, w1_f8, w1_scale, w2_f8, used.reshape(1), act_scale)
    # the script, step by step (quantize_mlp_fp8, the forward's x cast, the Triton epilogue, _scaled_mm)
    W1, W2 = fc_w.T.detach(), proj_w.T.detach()  # its (hidden, dim) storage
    s1 = W1.abs().amax() / 448  # bf16
    assert torch.equal(w1_f8, (W1 / s1).to(E4M3)) and torch.equal(used, next_scale)
    assert torch.equal(w2_f8.T, (W2.float() / next_scale).clamp(-448, 448).to(E4M3))
    assert following.item() == pytest.approx(W2.float().abs().max().item() * 1.12 / 448, rel=1e-6)
    xs = x.detach()[0]
    a = xs.abs().max()
    x_f8 = (xs * (448.0 / a)).to(E4M3)
    pre = ((x_f8.float() @ w1_f8.float().T) * (s1.float() * a.float() / 448)).bfloat16()
    post = F.relu(pre) ** 2
    post_f8 = torch.clamp(post.float() * (1 / act_scale), max=448).to(E4M3)
    expected = ((post_f8.float() @ w2_f8.float().T) * (act_scale * next_scale)).bfloat16()
    assert torch.equal(out[0], expected)
    assert amax.item() == post.float().max().item()
    # the backward: bf16 from post, W1, W2 (not the e4m3 copies), relu(pre) rebuilt as sqrt(post)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [t.grad.clone() for t in (x, fc_w, proj_w)]
    dpre = (2 * (g[0] @ proj_w.detach()).float() * post.float().sqrt()).bfloat16()
    torch.testing.assert_close(grads[0][0], dpre @ fc_w.detach().T)
    torch.testing.assert_close(grads[1], xs.T @ dpre)
    torch.testing.assert_close(grads[2], g[0].T @ post)


def fp8_tiny(*extra):
    return tg.parse_config(["--preset", "tiny", "--val-seq-len", "256", *extra])


def test_activation_scales_are_the_previous_forwards_and_only_in_training(monkeypatch):
    monkeypatch.setattr(tg, "fp8_mlp_available", lambda device: True)
    cfg = fp8_tiny()
    model = tg.build_model(cfg, torch.device("cpu"), 1, None)
    assert model.fp8_mlp and model.mlp_act_scales.tolist() == [1.0] * 4  # 1 before the first forward
    seen = []
    real = tg.FP8ReLUSquareMLP.apply
    monkeypatch.setattr(tg.FP8ReLUSquareMLP, "apply", lambda *a: seen.append(a[-1].clone()) or real(*a))
    ids = torch.randint(0, 50000, (257,), generator=torch.Generator().manual_seed(0))
    ids[0] = tg.EOT_TOKEN
    model(ids[:-1], ids[1:], tg.schedule_at(0, cfg))
    first = model.mlp_act_scales.clone()
    assert [s.item() for s in seen] == [1.0] * 4 and (first != 1.0).all()
    model(ids[:-1], ids[1:], tg.schedule_at(0, cfg))  # the next micro-batch: the first one's scales
    assert torch.equal(torch.cat(seen[4:]), first)
    model.eval()
    with torch.no_grad():
        model(ids[:-1], ids[1:], tg.schedule_at(0, cfg))  # validation: bf16, the scales untouched
    assert len(seen) == 8


def test_the_down_weight_scale_lags_one_step_after_the_bootstrap(monkeypatch):
    monkeypatch.setattr(tg, "fp8_mlp_available", lambda device: True)
    cfg = fp8_tiny()
    model = tg.build_model(cfg, torch.device("cpu"), 1, None)
    w2 = lambda: model.blocks[0].mlp.proj_w.detach().bfloat16().abs().max()  # noqa: E731
    torch.manual_seed(1)
    with torch.no_grad():
        model.blocks[0].mlp.proj_w.normal_(0, 0.02)
    model.quantize_mlp_fp8(bootstrap=True)  # bootstrap: its own amax / 448
    assert model.mlp_down_scales[0].item() == (w2() / 448).float().item()
    previous = w2().float() * (1.12 / 448)
    with torch.no_grad():
        model.blocks[0].mlp.proj_w.mul_(3)
    model.quantize_mlp_fp8(bootstrap=False)  # after step 16: the previous weights' amax x 1.12
    assert model.mlp_down_scales[0].item() == previous.item()
    assert model.mlp_down_next_scales[0].item() == pytest.approx(w2().float().item() * 1.12 / 448, rel=1e-6)


def test_warmup_and_reset_leave_the_fp8_scales_and_the_run_as_without_them(tmp_path, monkeypatch):
    # The warm-up trains (the activation scales move), then the reset restores the weights and the scales (1 again):
    # a run with warm-up steps ends bit-identical to one without.
    monkeypatch.setattr(tg, "fp8_mlp_available", lambda device: True)
    monkeypatch.setattr(tg, "FP8_BOOTSTRAP_STEPS", 2)  # the delayed scales within the short run
    from test_distributed_2026 import one_thread_main, r2026_small_args
    common = ["--save-every", "0"]
    assert one_thread_main(r2026_small_args(tmp_path, "cold", *common)) == 0
    # The run alone cannot show the activation scales' reset: W2 starts at zero, so the first timed step's output
    # is the same at any activation scale. The scales the reset leaves are read where it re-quantizes.
    calls, quantize = [], tg.GPT.quantize_mlp_fp8

    def recording_quantize(model, bootstrap=False, advance=True):
        calls.append((bootstrap, model.mlp_act_scales.clone(), model.mlp_down_scales.clone()))
        return quantize(model, bootstrap, advance)

    monkeypatch.setattr(tg.GPT, "quantize_mlp_fp8", recording_quantize)
    assert one_thread_main(r2026_small_args(tmp_path, "warm", *common, "--warmup-steps", "3")) == 0
    # build, then one call after each of the 8 warm-up steps (bootstrap on steps 0 and 1 only), then the reset's
    bootstraps = [bootstrap for bootstrap, _, _ in calls[:10]]
    assert bootstraps == [True, True, True] + [False] * 6 + [True]
    _, warm_act, _ = calls[8]
    _, act_after_reset, down_after_reset = calls[9]
    built_down = calls[1][2]  # what the build's bootstrap left (the zero W2's amax), before any step's
    assert (warm_act != 1).all() and (act_after_reset == 1).all() and torch.equal(down_after_reset, built_down)
    cold, warm = torch.load(tmp_path / "cold.pt"), torch.load(tmp_path / "warm.pt")
    assert (cold["mlp_act_scales"] != 1).all() and (cold["mlp_down_scales"] != 1).all()
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold), \
        [k for k in cold if not torch.equal(cold[k], warm[k])]


def test_a_checkpoint_with_the_fp8_scales_resumes_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "fp8_mlp_available", lambda device: True)
    monkeypatch.setattr(tg, "FP8_BOOTSTRAP_STEPS", 2)
    from test_distributed_2026 import one_thread_main, r2026_small_args
    assert one_thread_main(r2026_small_args(tmp_path, "whole")) == 0
    assert one_thread_main(r2026_small_args(tmp_path, "resumed", "--resume", str(tmp_path / "checkpoints/whole.pt"))) == 0
    whole, resumed = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert (whole["mlp_act_scales"] != 1).all()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), \
        [k for k in whole if not torch.equal(whole[k], resumed[k])]
