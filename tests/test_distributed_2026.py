"""The 2026 recipe (--preset r2026) on 1 process equals it on 2 gloo processes: across stage boundaries whose
accumulation steps differ, and across the split step where the embedding parts from the head.

The trainer's main() runs in this process and in 2 spawned gloo processes with torchrun's environment, as
a user runs the command line with python and torchrun: the same code from main() on."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402
from records.runlog import parse_log_file  # noqa: E402

# Three stages and an extension stage. The global batch of each stage splits into world size x accumulation
# steps differently: 1 process accumulates 2, 2, 4, 4 sequences; 2 processes 1, 1, 2, 2 each. Stages start at
# odd steps, so each Adam step (odd steps only) sums an even step of one stage with an odd step of the next.
STAGE_STEPS = (0, 3, 5, 7)
STAGE_SEQUENCES = (2, 2, 4, 4)
STAGE_SEQ_LEN = (128, 256, 128, 128)
TRAIN_STEPS = 8
CHECKPOINT_STEP = 6  # the split step is 5


def r2026_small_args(log_dir: Path, run_id: str, *extra: str) -> list:
    """The 2026 preset at CPU size with its structure kept: paired heads (layer 0), a layer without attention
    (2) that the skip connection (1 -> 2) feeds, the attention source (2), value embeddings (0, 3), key offset on the
    long-window layers (1, 3), XSA (1), head gates (1, 3), the pre gate (0-1) and the post gate (2-3), DC and MUDD on
    the last layer, the bigram hash, MTP and prefix weights per stage, YaRN, the tied head split at step 5."""
    batch_tokens = [n * seq for n, seq in zip(STAGE_SEQUENCES, STAGE_SEQ_LEN)]
    return ["--preset", "r2026", "--device", "cpu", "--no-compile", "--no-fp8-head", "--warmup-steps", "0",
            "--train-files", str(REPO / "data/sample/sample_train_000001.bin"),
            "--val-files", str(REPO / "data/sample/sample_val_000000.bin"),
            "--val-tokens", "256", "--val-seq-len", "128", "--val-every", "1",  # a val loss after every step
            "--train-steps", str(TRAIN_STEPS), "--extension-steps", "1",
            "--stage-steps", ",".join(map(str, STAGE_STEPS)),
            "--stage-batch-tokens", ",".join(map(str, batch_tokens)),
            "--stage-seq-len", ",".join(map(str, STAGE_SEQ_LEN)), "--stage-max-doc-len", "64,128,128,128",
            "--num-layers", "4", "--model-dim", "32", "--num-heads", "2", "--head-dim", "16",
            "--paired-head-layers", "0", "--no-attn-layers", "2", "--long-window-layers", "1,3",
            "--value-embed-layers", "0,3", "--skip-connection", "1,2", "--attn-source-layer", "2", "--post-gate-layer", "2", "--xsa-layers", "1", "--attn-gate-layers", "1,3", "--dc-layer", "3",
            "--bigram-rows", "1000", "--bigram-dim", "16",
            "--log-dir", str(log_dir), "--run-id", run_id, "--save-model", str(log_dir / f"{run_id}.pt"),
            # a checkpoint (weights and whole optimizer state) at step 6, right after the split step
            "--save-every", str(CHECKPOINT_STEP), "--checkpoint-dir", str(log_dir / "checkpoints"), *extra]


def one_thread_main(args: list) -> int:
    """train_gpt.main on one thread: on a shared 2-core machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tg.main(args)
    finally:
        torch.set_num_threads(threads)


def _rank_main(rank: int, world_size: int, port: int, args: list):
    """One process of a torchrun-style launch: the same environment variables, then the trainer's main."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    status = one_thread_main(args)
    if status:
        raise SystemExit(status)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(args: list, nproc: int):
    """The trainer's main in this process (1) or in nproc spawned ones, as torchrun would start it: a process
    and a torch import fewer than launching the command line, the same code from main() on."""
    if nproc == 1:
        assert one_thread_main(args) == 0
        return
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(nproc, free_port(), args), nprocs=nproc)  # raises if a rank fails


def test_the_small_r2026_configuration_crosses_stages_and_the_split():
    """What the 1-vs-2 comparison below runs through, read from the schedule rather than assumed."""
    cfg = tg.parse_config(r2026_small_args(Path("unused"), "x"))
    schedules = [tg.schedule_at(step, cfg) for step in range(TRAIN_STEPS)]
    assert [s.stage for s in schedules] == [0, 0, 0, 1, 1, 2, 2, 3]
    assert [s.adam_step for s in schedules] == [False, True] * 4
    assert [s.embed_tied for s in schedules] == [True] * 6 + [False] * 2  # step 5 is the split step
    assert [len(s.mtp_weights) for s in schedules] == [3, 3, 3, 2, 2, 1, 1, 1]
    accumulation = {w: [tg.accumulation_steps(s.batch_tokens, s.seq_len, w) for s in schedules] for w in (1, 2)}
    assert accumulation == {1: [2, 2, 2, 2, 2, 4, 4, 4], 2: [1, 1, 1, 1, 1, 2, 2, 2]}
    assert {s.seq_len for s in schedules} == {128, 256}


# The record's storage (issue 19) has bf16 gradients: the two runs' sums of them (bf16 accumulation of 2 or 4
# backward passes vs 1 or 2 and a gloo mean) differ at bf16 rounding (4e-3 relative), not in the last fp32 bit.
# Measured: the val losses agree within 2.3e-3 over the 8 steps (fp32 storage: 2e-4); 1e-2 leaves room for that.
# fp32 storage on another CPU (a Xeon with AMX-BF16 and AVX-512, whose fp32 matmuls sum in another order): 2.2e-3
# at step 5 and within 4e-4 at every other step, with the same code; 5e-3 covers both machines.
@pytest.mark.parametrize("storage, loss_tolerance", [("--fp32-masters", 5e-3), ("--no-fp32-masters", 1e-2)])
def test_two_processes_equal_one_process_across_stages_and_the_split(tmp_path, storage, loss_tolerance):
    run_trainer(r2026_small_args(tmp_path, "one", storage), nproc=1)
    run_trainer(r2026_small_args(tmp_path, "two", storage), nproc=2)
    log_one, log_two = parse_log_file(tmp_path / "one.txt"), parse_log_file(tmp_path / "two.txt")
    assert (log_one.world_size, log_one.grad_accum_steps, log_two.world_size, log_two.grad_accum_steps) == (1, 2, 2, 1)
    losses_one = [p.val_loss for p in log_one.val_points]
    losses_two = [p.val_loss for p in log_two.val_points]
    assert [p.step for p in log_two.val_points] == list(range(TRAIN_STEPS + 1))
    # Tolerance: the two runs sum the same sequence gradients in another order (2 accumulated backward passes
    # and a gloo mean vs 4 accumulated passes), which differs in the last fp32 bit. The recipe then amplifies
    # it: Polar Express runs in bf16 (a last-bit change can round a bf16 entry the other way, 4e-3 relative),
    # and NorMuon and Adam (eps 1e-10) scale near-zero rows and entries up to full-size steps. Measured: the
    # val losses (logged to 4 decimals) agree within 2e-4 to 2.2e-3 over all 8 steps, by CPU (see above); the
    # tolerance is 20x smaller than what one training step moves the loss from step 3 on (0.1-0.2).
    assert losses_one == pytest.approx(losses_two, abs=loss_tolerance)
    assert losses_one[-1] < losses_one[0] - 0.2  # it trained: equality is not two untouched models
    # Weights and optimizer state right after the split step (the checkpoint: every rank's shards gathered, so
    # a wrong row of the embedding's Adam moments on one rank shows), and the final weights.
    c1 = torch.load(tmp_path / "checkpoints/one.pt", weights_only=False)
    c2 = torch.load(tmp_path / "checkpoints/two.pt", weights_only=False)
    assert c1["step"] == c2["step"] == CHECKPOINT_STEP and c1["optimizer"]["adam_step_count"] == 3
    assert_close_in_norm(c1["model"], c2["model"])
    for kind in ("adam", "muon"):
        for i, (s1, s2) in enumerate(zip(c1["optimizer"][kind], c2["optimizer"][kind])):
            assert_close_in_norm(s1, s2, f"{kind} state {i} ")
    assert_close_in_norm(torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt"))


def assert_close_in_norm(one: dict, two: dict, what: str = ""):
    """Each tensor of two within 25% of the norm of one's. The recipe amplifies the last-bit differences of the
    two summation orders (see the losses above): measured over these 8 steps (before issue 19), at most 14% in
    the then zero-initialized attention output projections (whose NorMuon statistics start at noise level), at most
    3% in every other weight and in every Adam and Muon moment. A rank training on other sequences, or a
    misplaced shard of state, differs by about 100% (checked by breaking the loader's share of each rank and
    the untie's copy of the head's moments into the embedding's rows)."""
    assert one.keys() == two.keys()
    for name in one:
        if one[name].dtype == torch.int16:  # Muon's low bits of bf16 weights: the masters' noise-like last bits,
            continue                        # no norm to compare (their save and restore: tests/test_precision.py)
        a, b = one[name].float(), two[name].float()
        # The lambdas (at most 2 values) and their Adam moments: their gradients are sums over every token that
        # nearly cancel, so Adam (eps 1e-10) turns the summation-order noise into a larger share of a few-1e-3
        # value (2026-08 in bf16 storage, measured: 26% for the smear lambda, 33% for an SA lambda's first
        # moment); 50% and an absolute 1e-3 for them. A wrong shard or rank still differs by about 100%.
        small = a.numel() <= 2
        bound = (0.5 * a.norm().item() + 1e-3) if small else (0.25 * a.norm().item() + 1e-12)
        assert (b - a).norm().item() <= bound, what + name
