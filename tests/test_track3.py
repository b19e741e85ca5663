"""Tests of the optimizer benchmark's trainer (records/track_3_optimization/train_gpt.py) and its statistics.

The trainer's optimizers against torch's own (the same update, found by setting torch's options to the baseline's),
the recipe's numbers, the schedule, 1 process against 2 gloo processes at a tiny size, the log against the records
tools, and the track's two statistical rules on the public benchmark README's own worked examples.
"""

import errno
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "records" / "track_3_optimization" / "train_gpt.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from records import compare, runlog  # noqa: E402


def load_trainer():
    spec = importlib.util.spec_from_file_location("track3_train_gpt", TRAINER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


t3 = load_trainer()


# ----------------------------------------------------------------------------- the optimizers

def matrices(seed=0, shapes=((48, 16), (16, 48), (24, 24))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def run_steps(make_optimizer, params, grads_per_step, lr_per_step=None):
    """Copies of params after one optimizer step per list of grads (lr set per step when given)."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_optimizer(params)
    for step, grads in enumerate(grads_per_step):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if lr_per_step is not None:
            for group in opt.param_groups:
                group["lr"] = lr_per_step[step]
        opt.step()
    return [p.detach() for p in params]


def test_muon_equals_torch_muon_with_the_baselines_settings():
    """torch.optim.Muon with Newton-Schulz (2, -1.5, 0.5) x 12, Nesterov and the 'original' shape factor
    sqrt(max(1, rows/cols)) is the baseline's Muon: bit for bit, over 3 steps with changing LRs, on tall, wide
    and square matrices (the factor is 2 on the tall one)."""
    params, grads = matrices(), [matrices(seed) for seed in (1, 2, 3)]
    lrs = [0.025, 0.02, 0.01]
    ours = run_steps(lambda ps: t3.Muon(ps, lr=0.025, weight_decay=0.05, momentum=0.95, ns_steps=12), params, grads, lrs)
    theirs = run_steps(lambda ps: torch.optim.Muon(ps, lr=0.025, weight_decay=0.05, momentum=0.95, nesterov=True,
                                                   ns_coefficients=(2.0, -1.5, 0.5), ns_steps=12, eps=1e-7,
                                                   adjust_lr_fn="original"), params, grads, lrs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert all((a - p).norm() > 1e-3 for a, p in zip(ours, params))  # it moved: equal is not two no-ops
    # torch's default coefficients (3.4445, -4.775, 2.0315) x 5 are another update: the comparison can fail.
    other = run_steps(lambda ps: torch.optim.Muon(ps, lr=0.025, weight_decay=0.05, adjust_lr_fn="original"), params, grads, lrs)
    assert not torch.allclose(ours[0], other[0], atol=1e-4)


def test_newton_schulz_orthogonalizes():
    """12 iterations of (2, -1.5, 0.5) bring every singular value of a well-conditioned matrix close to 1."""
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    singular = torch.linalg.svdvals(t3.newton_schulz(G, 12, (2.0, -1.5, 0.5), 1e-7).float())
    assert singular.min() > 0.8 and singular.max() < 1.05


def test_adamw_keeps_the_public_fused_adamws_moments_and_bits():
    """The public script's AdamW is torch.optim.AdamW(fused=True) on a bf16 embedding: its moments are bf16 (the
    parameter's dtype) and each step is computed in fp32 and rounded once. Ours, on the same bf16 and fp32 gradients
    over 3 steps with changing LRs: the same moment dtypes and the same bits in weights and moments. (Lengths are
    multiples of 32, as every tensor of the model: the fused kernel's scalar loop for a CPU's last numel % 16
    entries rounds its own way.)"""
    generator = torch.Generator().manual_seed(0)
    shapes = [((256, 64), torch.bfloat16), ((256, 64), torch.float32), ((96,), torch.float32)]
    params = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in shapes]
    grads = [[(torch.randn(shape, generator=generator) * 10.0 ** -k).to(dtype) for shape, dtype in shapes] for k in (1, 3, 2)]
    lrs = [0.7, 0.5, 0.1]
    kwargs = dict(lr=0.7, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.001)
    ours, our_opt = run_steps_with_optimizer(lambda ps: t3.AdamW(ps, **kwargs), params, grads, lrs)
    theirs, their_opt = run_steps_with_optimizer(lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs), params, grads, lrs)
    for a, b, (_, dtype) in zip(ours, theirs, shapes):
        mine, public = our_opt.state[a], their_opt.state[b]
        assert mine["exp_avg"].dtype == mine["exp_avg_sq"].dtype == public["exp_avg"].dtype == dtype
        assert torch.equal(a, b) and torch.equal(mine["exp_avg"], public["exp_avg"])
        assert torch.equal(mine["exp_avg_sq"], public["exp_avg_sq"])
    assert all((a.float() - p.float()).abs().max() > 1e-3 for a, p in zip(ours, params))  # it moved


def run_steps_with_optimizer(make_optimizer, params, grads_per_step, lr_per_step):
    """(the parameters, the optimizer) after one step per list of grads, each at its lr."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_optimizer(params)
    for grads, lr in zip(grads_per_step, lr_per_step):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return params, opt


def test_the_recipe_is_the_public_baselines():
    """The numbers of records/track_3_optimization/train_gpt_simple.py (result #36), read off its source."""
    cfg = t3.Config()
    assert (cfg.num_layers, cfg.model_dim, cfg.head_dim, cfg.vocab_size) == (12, 768, 128, 50304)
    assert cfg.batch_seqs * cfg.train_seq_len == 8 * 64 * 1024 and cfg.micro_batch_seqs == 64
    assert cfg.val_tokens == 20 * 524_288 and cfg.val_seq_len == 1024
    assert cfg.train_steps == 3250 and cfg.cooldown_frac == 0.7
    model = t3.GPT(t3.parse_config(["--preset", "tiny"]))
    adam, muon = t3.build_optimizers(model, cfg)
    assert [g["lr"] for g in adam.param_groups] == [0.7, 0.004, 0.015]
    assert adam.param_groups[0]["params"] == [model.embed.weight] and adam.param_groups[1]["params"] == [model.proj.weight]
    assert all(p.ndim == 1 for p in adam.param_groups[2]["params"])
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10 and adam.defaults["weight_decay"] == 0.001
    group = muon.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"], group["ns_steps"]) == (0.025, 0.05, 0.95, 12)
    assert len(group["params"]) == 6 * 2  # q, k, v, attn.proj, fc, mlp.proj of each of the 2 tiny blocks
    t3.check_optimizer_coverage(model, [adam, muon])
    without_head = t3.AdamW([p for g in adam.param_groups for p in g["params"] if p is not model.proj.weight], lr=0.1)
    with pytest.raises(t3.ConfigError, match="exactly one optimizer: proj.weight x0$"):
        t3.check_optimizer_coverage(model, [without_head, muon])
    with pytest.raises(t3.ConfigError, match="exactly one optimizer: blocks.0.attn.q.weight x2"):
        t3.check_optimizer_coverage(model, [adam, muon, muon])
    assert model.embed.weight.dtype == torch.float32 and t3.GPT(t3.Config(num_layers=1, vocab_size=128)).embed.weight.dtype == torch.bfloat16


def test_init_zeroes_the_projections_and_scales_the_rest():
    model = t3.GPT(t3.parse_config(["--preset", "tiny"]))
    torch.manual_seed(0)
    t3.init_weights(model)
    named = dict(model.named_parameters())
    assert named["proj.weight"].abs().sum() == 0 and named["blocks.0.attn.proj.weight"].abs().sum() == 0
    assert named["blocks.1.mlp.proj.weight"].abs().sum() == 0 and named["blocks.0.mlp.fc.bias"].abs().sum() == 0
    assert torch.equal(named["norm2.gains"], torch.ones(64))
    assert named["embed.weight"].std().item() == pytest.approx(1.0, abs=0.01)
    assert named["blocks.0.mlp.fc.weight"].std().item() == pytest.approx((0.33 / 64) ** 0.5, rel=0.05)


def test_lr_schedule_is_stable_then_linear_to_zero():
    cfg = t3.Config()  # 3250 steps, cooldown over the last 70%: flat until progress 0.3 = step 975
    assert t3.lr_multiplier(0, cfg) == 1.0 and t3.lr_multiplier(974, cfg) == 1.0
    assert t3.lr_multiplier(975, cfg) == pytest.approx(1.0)
    assert t3.lr_multiplier(2112, cfg) == pytest.approx((1 - 2112 / 3250) / 0.7)
    assert t3.lr_multiplier(3249, cfg) == pytest.approx(1 / 3250 / 0.7)


def test_validation_steps_thicken_in_the_last_tenth():
    cfg = t3.Config()
    steps = [s for s in range(cfg.train_steps + 1) if t3.is_val_step(s, cfg)]
    assert steps[:3] == [0, 125, 250] and 2875 in steps and 2900 not in steps
    assert [s for s in steps if s > 2900][:3] == [2925, 2950, 2975] and steps[-1] == 3250


# ----------------------------------------------------------------------------- data

def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def test_training_stream_is_the_public_order_on_any_world_size(tmp_path):
    """Steps of 4 sequences of 8 tokens (32 + 1 tokens) from two shards of 3 x 32 + 1 tokens: as in the public
    script, a shard is left when pos + 33 >= its length, so each gives 2 steps; 2 processes split each step."""
    write_shard(tmp_path / "t_000.bin", range(97))
    write_shard(tmp_path / "t_001.bin", range(1000, 1097))
    cfg = t3.Config(train_files=str(tmp_path / "t_*.bin"), train_seq_len=8, batch_seqs=4, micro_batch_seqs=1)
    device = torch.device("cpu")
    one = t3.TrainBatches(cfg, 0, 1, device)
    two = [t3.TrainBatches(cfg, rank, 2, device) for rank in (0, 1)]
    firsts = []
    for step in range(4):
        batch = one.next_step(step)
        split = two[0].next_step(step) + two[1].next_step(step)
        assert len(batch) == 4 and all(torch.equal(a, b) for pair in zip(batch, split) for a, b in zip(*pair))
        assert torch.equal(batch[0][1][0], batch[0][0][0] + 1)  # targets are the next tokens
        firsts.append(int(batch[0][0][0, 0]))
    assert firsts == [0, 32, 1000, 1032]
    with pytest.raises(t3.DataError, match="the training data ran out at step 4"):
        one.next_step(4)

# ----------------------------------------------------------------------------- command line

def test_importing_starts_nothing_and_help_works(tmp_path):
    done = subprocess.run([sys.executable, str(TRAINER), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: train_gpt.py")
    assert list(tmp_path.iterdir()) == []  # no logs/ folder: nothing ran


@pytest.mark.parametrize("flags, message", [
    (["--train-files", "/nonexistent/none_*.bin"], "--train-files /nonexistent/none_*.bin: no file matches"),
    (["--micro-batch-seqs", "3"], "world size 1 x --micro-batch-seqs 3 = 3 sequences must divide both --batch-seqs 8 and "
                                  "the 16 val sequences: make --batch-seqs and the val sequences"),
    (["--dtype", "float16"], "--dtype 'float16': choose one of bfloat16, float32"),
])
def test_bad_data_or_flags_are_one_line_errors(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(REPO)
    assert t3.main(["--preset", "tiny", "--log-dir", str(tmp_path), "--train-steps", "1"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_gpt.py: error: ") and message in err


# ----------------------------------------------------------------------------- 1 process against 2

TINY_RUN = ["--preset", "tiny", "--train-steps", "3", "--val-every", "1", "--late-val-every", "1",
            "--train-seq-len", "32", "--val-seq-len", "32", "--val-tokens", "256", "--save-model"]


def one_thread_main(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 processes on 2 cores: more threads only wait on each other
    try:
        return t3.main(args)
    finally:
        torch.set_num_threads(threads)


def _rank_main(rank, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if one_thread_main(args):
        raise SystemExit(1)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_and_trials_reuse_the_model(tmp_path, monkeypatch):
    """The same 2 runs (seeds 0 and 1) on 1 process (4 micro-batches a step) and on 2 gloo processes (2 each):
    the same val losses and final weights, up to the order of the gradient sums. That order changes the last fp32
    bit, which Muon's bf16 Newton-Schulz can round the other way. Measured over 3 steps: val losses equal to the
    logged 5 decimals; weights within 2e-4 of their norm, the zero-initialized projections (whose first updates
    orthogonalize gradients near zero) within 4e-3. Other initial weights or other sequences move the val loss
    by 3e-3 after 2 steps (150x the bound below) and the weights by several percent of their norm."""
    monkeypatch.chdir(REPO)
    args = TINY_RUN + ["--trials", "2", "--log-dir", str(tmp_path)]
    assert one_thread_main(args + ["--run-id", "one"]) == 0
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(2, free_port(), args + ["--run-id", "two"]), nprocs=2)
    for seed in (0, 1):
        one, two = (runlog.parse_log_file(tmp_path / f"{name}-seed{seed}.txt") for name in ("one", "two"))
        assert (one.world_size, one.grad_accum_steps, two.world_size, two.grad_accum_steps) == (1, 4, 2, 2)
        assert one.complete and two.complete and one.config["seed"] == two.config["seed"] == seed
        assert [p.step for p in one.val_points] == [0, 1, 2, 3]
        assert [p.val_loss for p in one.val_points] == pytest.approx([p.val_loss for p in two.val_points], abs=2e-5)
        assert one.val_points[-1].val_loss < one.val_points[0].val_loss - 0.01  # it trained
        w1, w2 = (torch.load(tmp_path / f"{name}-seed{seed}.pt") for name in ("one", "two"))
        for name in w1:
            assert (w1[name] - w2[name]).norm() <= 1e-2 * w1[name].norm() + 1e-6, name
    seed0, seed1 = (torch.load(tmp_path / f"one-seed{seed}.pt") for seed in (0, 1))
    assert not torch.equal(seed0["blocks.0.attn.q.weight"], seed1["blocks.0.attn.q.weight"])  # two seeds, two runs
    runs = [runlog.parse_log_file(tmp_path / f"one-seed{seed}.txt") for seed in (0, 1)]
    summary = compare.steps_summary("one", runs)  # what records/compare.py reports for this folder
    assert (summary["step"], summary["n"], summary["problems"]) == (3, 2, []) and not summary["z_holds"]
    text = (tmp_path / "one-seed1.txt").read_text()
    assert text.startswith(TRAINER.read_text()) and "trial: 2 of 2" in text and "track: track_3_optimization" in text


# ----------------------------------------------------------------------------- stops, refusals, outputs (issue 28)

# 3 steps of 8 sequences of 32 tokens, validated at steps 0 and 3 only: a second or two a run.
FAST = ["--preset", "tiny", "--train-steps", "3", "--val-every", "100", "--late-val-every", "100",
        "--train-seq-len", "32", "--val-seq-len", "32", "--val-tokens", "256"]


def run_main(args, capsys) -> tuple:
    """main() in this process from the repository root: (exit status, stderr lines)."""
    status = t3.main(args)
    return status, capsys.readouterr().err.strip().splitlines()


def last_line(path: Path) -> str:
    return path.read_text().rstrip("\n").splitlines()[-1]


class SigtermReachedTheDefault(Exception):
    pass


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that main() does not catch raises here instead of killing pytest; main() must put it back."""
    def guard(signum, frame):
        raise SigtermReachedTheDefault
    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("trials", [1, 2])
@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_with_a_stopping_line(tmp_path, capsys, monkeypatch, sigterm_guard, trials, signum,
                                                      status, name):
    """The signal comes to this process in step 2 of the last trial: that log ends with the record trainer's
    `stopping:` line, stderr has one line, the exit is 128 + the signal; an earlier trial's log is complete."""
    monkeypatch.chdir(REPO)
    train_step = t3.train_step

    def signalled_in_step_2_of_the_last_trial(model, batch, optimizers, step, cfg, world_size):
        if cfg.seed == trials - 1 and step == 2:
            os.kill(os.getpid(), signum)
        train_step(model, batch, optimizers, step, cfg, world_size)

    monkeypatch.setattr(t3, "train_step", signalled_in_step_2_of_the_last_trial)
    try:
        code, err = run_main(FAST + ["--trials", str(trials), "--log-dir", str(tmp_path), "--run-id", "sig"], capsys)
    except KeyboardInterrupt:  # raised on, it would stop pytest itself
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt traceback")
    where = "step 2" + (" of trial 2 of 2" if trials == 2 else "")
    assert (code, err) == (status, [f"train_gpt.py: error: stopped by {name} at {where}"])
    logs = [tmp_path / "sig.txt"] if trials == 1 else [tmp_path / f"sig-seed{seed}.txt" for seed in (0, 1)]
    assert last_line(logs[-1]) == f"stopping: {name} at step 2" and "\nstep:2/3 train_time:" in logs[-1].read_text()
    assert runlog.parse_log_file(logs[-1]).stopping == f"{name} at step 2"  # what check_submission reads
    assert all(runlog.parse_log_file(log).complete for log in logs[:-1])
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # main() put back the handler it found


def test_sigterm_from_outside_during_trials_stops_the_launch_with_a_stopping_line(tmp_path):
    """The real thing: kill -TERM to a --trials 2 launch in its first trial. The later trial never starts."""
    args = [*FAST, "--train-steps", "200", "--trials", "2", "--log-dir", str(tmp_path), "--run-id", "term"]
    log = tmp_path / "term-seed0.txt"
    proc = subprocess.Popen([sys.executable, str(TRAINER), *args], cwd=REPO, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "\nstep:1/200 train" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    stopping = last_line(log)
    assert proc.returncode == 143 and stopping.startswith("stopping: SIGTERM at step "), (proc.returncode, err[-2000:])
    step = int(stopping.rsplit(" ", 1)[1])
    assert step >= 1 and err.splitlines() == [f"train_gpt.py: error: stopped by SIGTERM at step {step} of trial 1 of 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["term-seed0.txt"]


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_unusable_log_dir_is_refused_in_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(REPO)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    log_dir = {"file": blocker, "under_file": blocker / "logs", "read_only": Path("/sys/track3_logs")}[case]
    if case == "read_only" and os.access("/sys", os.W_OK) and not t3.folder_problem("--log-dir", "/sys"):
        pytest.skip("/sys is writable here: no read-only folder to try")
    code, err = run_main(FAST + ["--log-dir", str(log_dir)], capsys)
    expected = {"file": f"train_gpt.py: error: --log-dir {blocker} is a file, not a folder: pick a folder",
                "under_file": f"train_gpt.py: error: --log-dir {log_dir}: {blocker} is a file, not a folder: pick another path",
                "read_only": f"train_gpt.py: error: --log-dir {log_dir}: cannot create the folder ("}[case]
    assert code == 2 and len(err) == 1 and err[0].startswith(expected), err


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_logging_stops_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    write = t3.Logger._write

    def fill_disk_at_step_2(self, data):
        if data.startswith(b"step:2/"):
            self.file.write(data[:-3])  # the disk fills mid-line, longer than the stopping line
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(t3.Logger, "_write", fill_disk_at_step_2)
    code, err = run_main(FAST + ["--log-dir", str(tmp_path), "--run-id", "full"], capsys)
    log = tmp_path / "full.txt"
    assert (code, err) == (1, [f"train_gpt.py: error: stopped at step 1: disk full writing the log {log}: free space "
                               "on that disk, or write it elsewhere"])
    lines = log.read_text().splitlines()  # the cut line is gone, which left room for the stopping line
    assert lines[-2].startswith("step:1/3 train_time:") and lines[-1] == "stopping: disk full"


def test_save_model_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(t3.os, "fdopen", lambda fd, mode: (os.close(fd), FullDisk())[1])
    code, err = run_main(FAST + ["--log-dir", str(tmp_path), "--run-id", "pt", "--save-model"], capsys)
    weights = tmp_path / "pt.pt"
    message = f"disk full writing --save-model {weights}: free space on that disk, or write it elsewhere"
    assert (code, err) == (1, [f"train_gpt.py: error: stopped at step 3: {message}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt.txt"]  # no pt.pt, no temp file
    assert last_line(tmp_path / "pt.txt") == f"stopping: at step 3: {message}"


def test_a_truncated_later_shard_is_refused_before_step_0(tmp_path, capsys, monkeypatch):
    """Steps of 8 x 32 + 1 tokens: the first shard holds 3, the run needs the second, whose file is cut short."""
    monkeypatch.chdir(REPO)
    write_shard(tmp_path / "train_000.bin", np.arange(1000) % 500)
    second = tmp_path / "train_001.bin"
    write_shard(second, np.arange(1000) % 500)
    second.write_bytes(second.read_bytes()[:-100])
    args = FAST + ["--train-steps", "5", "--train-files", str(tmp_path / "train_*.bin"), "--log-dir", str(tmp_path / "logs")]
    code, err = run_main(args + ["--run-id", "cut"], capsys)
    assert (code, err) == (2, [f"train_gpt.py: error: {second}: header says 1000 tokens but the file has {1024 + 1900} bytes "
                               "(truncated?); fetch FineWeb with: python data/cached_fineweb10B.py 20"])
    assert not (tmp_path / "logs" / "cut.txt").exists()  # refused before any log, let alone a step
    write_shard(second, np.arange(100))  # whole, but too short: the run would run out of data at step 3
    code, err = run_main(args + ["--run-id", "short"], capsys)
    assert (code, err) == (2, [f"train_gpt.py: error: --train-files {tmp_path / 'train_*.bin'}: its 2 shards hold 3 steps "
                               "of 256 tokens; --train-steps 5 needs more; fetch FineWeb with: python data/cached_fineweb10B.py 20 or more"])


def test_every_trials_log_embeds_the_source_the_launch_started_with(tmp_path, capsys, monkeypatch):
    """The script is edited while trial 1 runs: trial 2's log still holds the code that runs, not the edited file."""
    monkeypatch.chdir(REPO)
    script = tmp_path / "train_gpt.py"
    script.write_text(TRAINER.read_text())
    spec = importlib.util.spec_from_file_location("track3_edited_copy", script)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)
    spec.loader.exec_module(copy)
    train_step = copy.train_step

    def edit_during_trial_1(model, batch, optimizers, step, cfg, world_size):
        if cfg.seed == 0 and step == 0:
            with open(script, "a") as f:
                f.write("# edited while trial 1 ran\n")
        train_step(model, batch, optimizers, step, cfg, world_size)

    monkeypatch.setattr(copy, "train_step", edit_during_trial_1)
    assert copy.main(FAST + ["--trials", "2", "--log-dir", str(tmp_path / "logs"), "--run-id", "edit"]) == 0
    assert script.read_text().endswith("# edited while trial 1 ran\n")
    for seed in (0, 1):
        log = (tmp_path / "logs" / f"edit-seed{seed}.txt").read_text()
        assert log.startswith(TRAINER.read_text() + "\n" + "=" * 100) and "# edited while trial 1 ran" not in log


def test_torchrun_with_an_unusable_world_size_ends_with_the_trainers_line_only(tmp_path):
    """torchrun reports any process that exits non-zero in a 40-line ChildFailedError: under it the refusal stops
    torchrun itself (SIGKILL), so the trainer's line is all a user sees."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(TRAINER), *FAST, "--log-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.stderr.splitlines() == [
        "train_gpt.py: error: world size 3 x --micro-batch-seqs 2 = 6 sequences must divide both --batch-seqs 8 and the "
        "8 val sequences: run on 1, 2 or 4 processes"], done.stderr[-3000:]
    assert done.returncode == -signal.SIGKILL and list(tmp_path.iterdir()) == []


def test_a_negative_lr_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, err = run_main(FAST + ["--log-dir", str(tmp_path), "--muon-lr", "-1"], capsys)
    assert (code, err) == (2, ["train_gpt.py: error: --muon-lr must be a positive number, got -1.0"])
    assert list(tmp_path.iterdir()) == []


NUMERIC_FLAGS = [f.name for f in t3.fields(t3.Config) if type(f.default) in (int, float)]


@pytest.mark.parametrize("name", NUMERIC_FLAGS)
def test_every_numeric_flag_has_a_range(name):
    """-1 (and NaN for a float) is out of range for every numeric flag: refused, naming the flag."""
    tiny = t3.parse_config(["--preset", "tiny"])
    bad_values = [-1] + ([float("nan")] if isinstance(getattr(tiny, name), float) else [])
    for value in bad_values:
        with pytest.raises(t3.ConfigError, match=f"^--{name.replace('_', '-')} "):
            t3.check_config(t3.dataclasses.replace(tiny, **{name: value}), 1)
    t3.check_config(tiny, 1)  # the preset itself is in range


# ----------------------------------------------------------------------------- the track's statistics

def test_z_rule_on_the_public_readme_examples():
    """(3.28 - mean) sqrt(n) >= 0.004: one run needs 3.276 or below, four runs a mean of 3.278 or below."""
    assert compare.z_evidence(3.2760, 1) == pytest.approx(0.004)
    assert compare.z_rule_holds(3.2760, 1) and not compare.z_rule_holds(3.2761, 1)
    assert compare.z_rule_holds(3.2780, 4) and not compare.z_rule_holds(3.2781, 4)
    # result #36 (the baseline): 3.2787 over n=10 -> 0.0013 * sqrt(10) = 0.00411
    assert compare.z_evidence(3.2787, 10) == pytest.approx(0.0013 * 10 ** 0.5)


def test_pairwise_rule_on_the_public_readme_examples():
    """(loss_diff + step_diff / 100 * 0.0045) / sqrt(1/n1 + 1/n2), previous result first."""
    # #13 (3210 steps, 3.2785, n=10) against #11 (3225 steps, 3.2785, n=16): 15 steps = 0.000675 -> 0.00167
    value = compare.pairwise_evidence(3.2785, 3225, 16, 3.2785, 3210, 10)
    assert value == pytest.approx(0.00167, abs=5e-6) and value < 0.004
    # #12 (3325, 3.2790, n=20) against #6 (3375, 3.2788, n=20): (-0.0002 + 0.00225) / sqrt(0.1) = 0.00648
    value = compare.pairwise_evidence(3.2788, 3375, 20, 3.2790, 3325, 20)
    assert value == pytest.approx(0.00648, abs=5e-6) and value >= 0.004
