"""No wasted work in the training step, with the math unchanged: each faster path against the path it replaces
on the same inputs (packed vs unpacked Adam reductions, Adam's gathers overlapping Muon, the compiled FP8
backward), and the step's hygiene: no recompiles after the warm-up, no host syncs inside train_step."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_layer_cfg(*extra):
    """The tiny preset cut to 2 layers (both with attention, value embeddings on layer 0), the rest as in it."""
    return tg.parse_config(["--preset", "tiny", "--num-layers", "2", "--no-attn-layers", "", "--long-window-layers", "0",
                            "--paired-head-layers", "", "--value-embed-layers", "0", "--skip-connection", "",
                            "--attn-source-layer", "-1", "--no-mudd", "--xsa-layers", "", "--attn-gate-layers", "", "--dc-layer", "-1", *extra])


def token_ids(n, bos_at):
    ids = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(0))
    ids[list(bos_at)] = tg.EOT_TOKEN
    return ids


# -----------------------------------------------------------------------------
# Adam: one all-reduce for the small tensors; its all-gathers left running while Muon steps


def _adam_params():
    torch.manual_seed(0)
    shapes = [(), (6,), (2, 3), (1024, 70), (5, 3), (4,), (16385, 4)]  # scalars, a sharded table, a large odd one
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params += [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)), torch.nn.Parameter(torch.randn((), dtype=torch.float64))]
    return params


def _set_grads(params, rank, world_size, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        mean_grad, offset = torch.randn(p.shape, generator=g, dtype=p.dtype), torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad = mean_grad + offset * (1 if rank == 0 else -1)


def _packing_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    comm = tg.Comm(rank, world_size)
    results = {}
    for pack in (False, True):
        params = _adam_params()
        adam = tg.DistributedAdam([(p, 0.01 * (i + 1), (0.8, 0.95), 0.0) for i, p in enumerate(params)], 1e-10, comm,
                                  pack_small=pack)
        calls = []
        all_reduce = comm.all_reduce_mean
        comm.all_reduce_mean = lambda t: calls.append(t.numel()) or all_reduce(t)
        for step in range(3):
            _set_grads(params, rank, world_size, step)
            for p in reversed(params[:4]):  # some gradients final during backward (hooks), the rest at the end
                adam.grad_ready(p)
            adam.reduce_gradients()
            adam.step(1.0 - 0.1 * step)
        comm.all_reduce_mean = all_reduce
        results[pack] = dict(params=[p.detach().clone() for p in params], calls=calls,
                             packs=[[tuple(params[i].shape) for i in pack_["members"]] for pack_ in adam.packs])
    # Adam's gathers overlap Muon: step_optimizers queues Muon's step before it waits for Adam's all-gathers,
    # and ends with the same weights as the old order (Adam's step with its wait, then Muon's); Adam every step
    cfg = two_layer_cfg("--no-adam-odd-steps-only", "--embed-split-stage", "0")
    ids = token_ids(1025, [0, 300, 700])[rank * 512: rank * 512 + 513]
    weights, order = {}, []
    for overlapped in (False, True):
        torch.manual_seed(0)
        model = tg.GPT(cfg, 512)
        opt = tg.build_optimizers(model, cfg, comm)
        for step in range(3):
            schedule = tg.schedule_at(step, cfg)
            model(ids[:-1], ids[1:], schedule).backward()
            if overlapped:
                finish, muon_step = opt.adam.finish_step, opt.muon.step
                opt.adam.finish_step = lambda: order.append("adam gathers waited") or finish()
                opt.muon.step = lambda *a: order.append("muon step") or muon_step(*a)
                tg.step_optimizers(opt, model, schedule)
                opt.adam.finish_step, opt.muon.step = finish, muon_step
            else:  # the order before: reduce, Adam's step waiting for its gathers, Muon's step
                opt.adam.reduce_gradients()
                opt.muon.reduce_gradients()
                opt.adam.step(schedule.lr_mult)
                opt.muon.step(schedule.lr_mult, schedule.muon_momentum)
                model.zero_grad(set_to_none=True)
        weights[overlapped] = [p.detach().clone() for p in model.parameters()]
        opt.close()
    torch.save(dict(results=results, weights=weights, order=order), os.path.join(out_dir, f"pack_r{rank}.pt"))
    dist.destroy_process_group()


def test_packed_adam_all_reduce_and_overlapped_gathers_are_bit_identical(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_packing_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"pack_r{rank}.pt")
        unpacked, packed = out["results"][False], out["results"][True]
        for a, b in zip(unpacked["params"], packed["params"]):
            assert torch.equal(a, b)  # bit-identical, not merely close
        assert torch.equal(unpacked["params"][0], _adam_params()[0]) is False  # the tensors did move
        # the small fp32 tensors share one call per step, the fp64 ones another; the large odd one stays apart
        assert packed["packs"] == [[(), (6,), (2, 3), (5, 3), (4,)], [(3,), ()]]
        assert sorted(unpacked["calls"]) == sorted([1, 6, 6, 15, 4, 65540, 3, 1] * 3)
        assert sorted(packed["calls"]) == sorted([1 + 6 + 6 + 15 + 4, 65540, 3 + 1] * 3)
        for a, b in zip(out["weights"][False], out["weights"][True]):
            assert torch.equal(a, b)
        assert out["order"] == ["muon step", "adam gathers waited"] * 3


def test_packing_needs_several_ranks_and_leaves_the_tied_pair_alone():
    params = _adam_params()
    adam = tg.DistributedAdam([(p, 0.01, (0.8, 0.95), 0.0) for p in params], 1e-10, tg.Comm())
    assert adam.packs == []  # one rank: nothing to reduce, nothing to pack
    adam = tg.DistributedAdam([(p, 0.01, (0.8, 0.95), 0.0) for p in params], 1e-10, tg.Comm(0, 2))
    assert len(adam.packs) == 2
    head, embed = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3, 2))
    adam = tg.DistributedAdam([(head, 0.01, (0.8, 0.95), 0.0), (embed, 0.01, (0.8, 0.95), 0.0)], 1e-10, tg.Comm(0, 2))
    with pytest.raises(ValueError, match="packed"):
        adam.tie(head, embed)  # a pair small enough to be packed cannot be tied


# -----------------------------------------------------------------------------
# The FP8 head: casts rounded once from fp32 (as #28's compiled casts), the backward compiled on the GPU


def fp8_backward_inputs(tokens=256, vocab=512, dim=64):
    torch.manual_seed(0)
    x_scale, w_scale, grad_scale = tg.fp8_head_scales(tg.parse_config(["--fp8-x-max", str(dim ** 0.5), "--fp8-w-max", "0.875",
                                                                       "--fp8-grad-max", "1"]), 1)  # #28's
    x_f8 = (tg.rms_norm(torch.randn(tokens, dim)) / x_scale).to(torch.float8_e4m3fn)
    w_f8 = (torch.randn(vocab, dim) * 0.02 / w_scale).to(torch.float8_e4m3fn)
    grad = (torch.randn(tokens, vocab) * 1e-3).bfloat16()  # logit gradients: scaled by 448 into e5m2 range
    return grad, x_f8, w_f8, x_scale, w_scale, grad_scale


@pytest.mark.parametrize("dtype, scale", [(torch.float8_e4m3fn, 768 ** 0.5 / 448), (torch.float8_e5m2, 1 / 448)])
def test_fp8_cast_rounds_once_from_fp32(dtype, scale):
    torch.manual_seed(0)
    x = (torch.randn(4096, 64) * (scale * 50)).bfloat16()
    once = tg.fp8_cast(x, scale, dtype)
    assert torch.equal(once.view(torch.uint8), (x.double() / scale).float().to(dtype).view(torch.uint8))
    twice = x.div(scale).to(dtype)  # the eager bf16 division: rounded to bf16 first
    assert (once.float() != twice.float()).any()  # the two really differ, so the check above can fail


def test_fp8_backward_is_the_reference_formula_in_28s_orientation():
    grad, x_f8, w_f8, x_scale, w_scale, grad_scale = fp8_backward_inputs()
    grad_x, grad_w = tg.fp8_backward_matmuls(grad, x_f8, w_f8, x_scale, w_scale, grad_scale)
    grad_f8 = (grad.double() / grad_scale).float().to(torch.float8_e5m2)
    g, x, w = grad_f8.double() * grad_scale, x_f8.double() * x_scale, w_f8.double() * w_scale
    torch.testing.assert_close(grad_x.double(), g @ w, rtol=1e-2, atol=0)  # bf16 output
    expected_w = g.T @ x
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-5, atol=1e-5 * expected_w.abs().max().item())
    assert grad_w.shape == w_f8.shape and grad_w.stride() == (1, w_f8.size(0))  # (x^T grad)^T, as #28
    one = torch.ones((), dtype=torch.float32)
    other_way = torch._scaled_mm(grad_f8.T.contiguous(), x_f8.T.contiguous().T, out_dtype=torch.float32,
                                 scale_a=one * grad_scale, scale_b=one * x_scale, use_fast_accum=False)
    torch.testing.assert_close(grad_w, other_way, rtol=1e-6, atol=1e-9)  # the orientation before: same product


def test_fp8_backward_op_fake_matches_the_real_strides():
    tg.fp8_linear_op()
    args = fp8_backward_inputs(64, 128, 32)
    torch.library.opcheck(torch.ops.speedrun_gpt.fp8_linear_backward.default, args, test_utils=("test_faketensor",))


def test_compiled_fp8_forward_and_backward_equal_eager():
    # What the GPU runs (fp8_forward_compiled, fp8_backward_compiled) against the eager formulas, bit for bit,
    # on CPU with inductor
    torch._dynamo.reset()
    args = fp8_backward_inputs()
    eager = tg.fp8_backward_matmuls(*args)
    compiled = torch.compile(tg.fp8_backward_matmuls, dynamic=False)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    x = tg.rms_norm(torch.randn(256, 64)).bfloat16()
    w = torch.randn(512, 64) * 0.02
    eager = tg.fp8_forward_matmul(x, w, *args[3:5])
    compiled = torch.compile(tg.fp8_forward_matmul, dynamic=False)(x, w, *args[3:5])
    for a, b in zip(eager, compiled):
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if b.element_size() == 1 else b)
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# After the warm-up: no recompiles, and no host syncs inside train_step

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostSync(AssertionError):
    pass


def forbid_host_syncs(monkeypatch):
    """Every Tensor method that copies a value to the host raises: on a GPU each one stalls the CPU until the
    device catches up. Undone by monkeypatch.undo() or at the end of the test."""
    for name in SYNCING:
        def raiser(self, *args, _name=name, **kwargs):
            raise HostSync(f"Tensor.{_name} inside train_step: a host sync on the GPU")
        monkeypatch.setattr(torch.Tensor, name, raiser)


@pytest.mark.parametrize("glue", [[], ["--compile-glue"]], ids=["blocks", "glue"])
def test_no_recompiles_and_no_host_syncs_after_warmup(monkeypatch, glue):
    # The tiny preset (the record's structure) compiled (dynamo's eager backend: the same graphs, guards and
    # recompiles as inductor, in seconds), with the FP8 head's custom op as on Hopper, its schedule compressed to
    # 8 steps: 4 stages, the split at step 5, the extension. Warm up as run_training does (its warm-up steps around
    # every stage start and one validation, then a reset), then train through every stage and the final
    # validation with every recompile an error and every host-syncing Tensor method raising inside train_step.
    # With --compile-glue the masks, the stem and the final norm are compiled too: new windows must not recompile.
    from torch._dynamo.utils import counters
    cfg = tg.parse_config(["--preset", "tiny", "--compile", "--warmup-steps", "1", "--train-steps", "8",
                           "--stage-steps", "0,2,4,6", "--extension-steps", "2", "--muon-momentum-warmup-steps", "2",
                           "--muon-momentum-cooldown-steps", "1", "--val-every", "4", "--val-tokens", "512", *glue])
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cpu")
    model = tg.build_model(cfg, device, 2, None)
    model.fp8_scales = tg.fp8_head_scales(cfg, 2)  # the custom op inside the compiled head, as on Hopper
    tg.fp8_linear_op()
    val_tokens = tg.load_val_tokens(tg.resolve_files(cfg.val_files, "--val-files"), cfg.val_tokens, cfg.vocab_size)
    train_files = tg.resolve_files(cfg.train_files, "--train-files")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    loader = tg.make_train_loader(cfg, train_files, 0, 1, device)
    for step in tg.warmup_steps(cfg):
        tg.train_step(model, loader.batch_for(tg.schedule_at(step, cfg)), opt, step, cfg)
    tg.evaluate(model, val_tokens, cfg, 0, tg.Comm(), device, max_sequences=1)
    loader.close()
    opt.close()
    with torch.no_grad():
        model.load_state_dict(initial)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks and the head are compiled

    opt = tg.build_optimizers(model, cfg, tg.Comm())
    loader = tg.make_train_loader(cfg, train_files, 0, 1, device)
    windows = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(cfg.train_steps):
            if tg.is_val_step(step, cfg):
                tg.evaluate(model, val_tokens, cfg, step, tg.Comm(), device)
            batch = loader.batch_for(tg.schedule_at(step, cfg))
            windows.add(tg.schedule_at(step, cfg).window_long_tokens)
            forbid_host_syncs(monkeypatch)
            loss = tg.train_step(model, batch, opt, step, cfg)
            monkeypatch.undo()
            monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
            assert torch.isfinite(loss)
    loader.close()
    opt.close()
    assert len(windows) == 4  # every stage's window ran: a new window must not recompile
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_the_host_sync_check_catches_an_item_in_the_step(monkeypatch):
    # The check above can fail: a train_step that reads its loss on the host is caught.
    cfg = tg.parse_config(["--preset", "tiny"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    opt = tg.build_optimizers(model, cfg, tg.Comm())
    ids = token_ids(513, [0, 100, 300])
    real_step = tg.step_optimizers
    monkeypatch.setattr(tg, "step_optimizers", lambda o, m, s: (m.lm_head_w.norm().item(), real_step(o, m, s)))
    forbid_host_syncs(monkeypatch)
    with pytest.raises(HostSync, match="Tensor.item"):
        tg.train_step(model, [(ids[:-1], ids[1:])], opt, 0, cfg)


def test_the_recompile_check_catches_a_recompile(monkeypatch):
    # The check above can fail: a compiled block whose constant changes after the warm-up recompiles, an error.
    cfg = two_layer_cfg()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tg.GPT(cfg, 512)
    model.compile_regions()
    ids = token_ids(257, [0, 100])
    schedule = tg.schedule_at(0, cfg)
    model(ids[:-1], ids[1:], schedule)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model(ids[:-1], ids[1:], schedule)  # the same variants: fine
        model.blocks[1].attn.key_offset = True  # a new constant compiled into the block
        with pytest.raises(Exception, match="[Rr]ecompil"):
            model(ids[:-1], ids[1:], schedule)
    torch._dynamo.reset()
