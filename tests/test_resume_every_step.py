"""Issue 28: a checkpoint written after ANY step resumes bit for bit.

Adam steps on odd steps only and carries the gradients of each even step into the next one: a checkpoint written
after an even step must hold them (each process its own), or the resumed run is silently another run. A short
micro run (the record's structure at a tiny width, as tests/test_robustness.py's) of 6 steps crosses four stages,
the embedding split (step 3) and a 1-step extension, and writes a checkpoint after every step. On 1 process each
one is resumed and must give the unbroken run's train losses, val losses and final weights bit for bit, in the
record's bf16 storage and with --fp32-masters; on 2 gloo processes (both storages) every stop too.

The trainer's own functions run in this process (run_training, as main() calls it: no new interpreter per resume);
the 2-process case spawns its 2 processes once, and each runs the unbroken runs and every resume inside one
process group.
"""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import train_gpt as tg  # noqa: E402
from test_robustness import micro_args, micro_steps  # noqa: E402

TRAIN_STEPS = 6  # stages at steps 0, 1, 2, 5; the split at step 3; step 5 is the extension
NARROW = ["--model-dim", "32", "--head-dim", "16"]  # the micro model at half width: the 50304-row tables dominate


def run_args(tmp_path: Path, run_id: str, storage: str, *extra) -> list:
    return micro_args(tmp_path, run_id, *NARROW, *micro_steps(TRAIN_STEPS), "--val-every", "0", storage, *extra)


def keep_every_checkpoint(write):
    """write_atomically that also keeps a copy of each checkpoint as <run_id>.step<k>.pt: the trainer replaces its
    one checkpoint file at every --save-every step."""
    def writing(obj, path, what):
        write(obj, path, what)
        if isinstance(obj, dict) and "optimizer" in obj:
            shutil.copyfile(path, f"{path[:-3]}.step{obj['step']}.pt")
    return writing


def train(args: list, comm: tg.Comm, device: torch.device) -> dict:
    """The trainer's run on this process: every train loss of this rank, the val losses and the final weights."""
    cfg = tg.parse_config(args)
    tg.check_schedule(cfg, training=True)
    accumulation = tg.check_config(cfg, comm.world_size)
    cfg = tg.agree_on_outputs(cfg, comm)  # creates --checkpoint-dir, as main() does
    losses, train_step = [], tg.train_step

    def recording_train_step(model, batch, opt, step, cfg):
        loss = train_step(model, batch, opt, step, cfg)
        losses.append((step, loss.item()))
        return loss

    tg.train_step = recording_train_step
    try:
        result = tg.run_training(cfg, tg.Logger(None), comm, device, accumulation, time.time())
    finally:
        tg.train_step = train_step
    assert result["stopped"] is None
    return dict(train=losses, val=[(step, loss) for step, loss, _ in result["val_losses"]],
                weights={k: v.detach().clone() for k, v in result["model"].state_dict().items()})


def unbroken_and_resumed(whole_args: list, resumed_args, comm: tg.Comm, device: torch.device,
                         stops: tuple = tuple(range(1, TRAIN_STEPS))) -> tuple:
    """The unbroken run (a checkpoint after every step) and a run resumed from each checkpoint in stops (the step
    it was written at: the steps done)."""
    write = tg.write_atomically
    tg.write_atomically = keep_every_checkpoint(write)
    try:
        whole = train(whole_args, comm, device)
    finally:
        tg.write_atomically = write
    return whole, {step: train(resumed_args(step), comm, device) for step in stops}


def assert_resumed_runs_equal_the_unbroken_one(whole: dict, resumed: dict):
    assert [step for step, _ in whole["train"]] == list(range(TRAIN_STEPS))
    assert whole["train"][-1][1] < 0.8 * whole["train"][0][1]  # it trained: equality is not two untouched models
    for step, run in resumed.items():
        # the resumed run trains steps step.. and validates after each; the val loss at `step` is the checkpoint's
        assert run["train"] == whole["train"][step:], f"train losses after a resume at step {step}"
        assert run["val"] == whole["val"], f"val losses after a resume at step {step}"
        different = [k for k in whole["weights"] if not torch.equal(whole["weights"][k], run["weights"][k])]
        assert not different, f"final weights after a resume at step {step}: {different}"


def test_the_run_crosses_stages_the_split_and_the_extension(tmp_path):
    cfg = tg.parse_config(run_args(tmp_path, "x", "--fp32-masters"))
    schedules = [tg.schedule_at(step, cfg) for step in range(TRAIN_STEPS)]
    assert [s.stage for s in schedules] == [0, 1, 2, 2, 2, 3]
    assert [s.embed_tied for s in schedules] == [True] * 4 + [False] * 2  # step 3 is the split step
    assert [s.adam_step for s in schedules] == [False, True] * 3  # checkpoints at odd steps carry gradients
    assert tg.scheduled_steps(cfg) == TRAIN_STEPS - 1  # step 7: the extension


@pytest.mark.parametrize("storage", ["--no-fp32-masters", "--fp32-masters"])
def test_a_checkpoint_after_any_step_resumes_bit_for_bit_on_one_process(tmp_path, storage):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, resumed = unbroken_and_resumed(
            run_args(tmp_path, "whole", storage, "--save-every", "1"),
            lambda step: run_args(tmp_path, f"resumed{step}", storage, "--resume", str(tmp_path / f"ck/whole.step{step}.pt")),
            tg.Comm(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert_resumed_runs_equal_the_unbroken_one(whole, resumed)


def test_a_warm_up_ending_on_an_even_step_leaves_nothing_behind(tmp_path):
    # Stages at 0, 1, 2, 4 of 5 steps: the warm-up steps (0, 1 and those around each stage start) end on the even
    # step 4, whose gradients would wait for the timed run's first Adam step. The run with them equals the run without.
    args = micro_args(tmp_path, "x", *NARROW, *micro_steps(5), "--val-every", "0")
    assert tg.parse_config(args).stage_steps == (0, 1, 2, 4)
    assert tg.warmup_steps(tg.parse_config([*args, "--warmup-steps", "3"])) == [0, 1, 2, 3, 4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, warmed = (train([*args, "--warmup-steps", n], tg.Comm(), torch.device("cpu")) for n in ("0", "3"))
    finally:
        torch.set_num_threads(threads)
    # the warm-up steps (then the reset), the timed steps; the warm-up's losses differ from the timed ones: the
    # prefix-token table is built when the clock starts (all -1 in the warm-up, no prefix term)
    assert [step for step, _ in warmed["train"][:5]] == [step for step, _ in plain["train"]] == [0, 1, 2, 3, 4]
    assert warmed["train"][5:] == plain["train"]
    assert all(torch.equal(plain["weights"][k], warmed["weights"][k]) for k in plain["weights"])


def test_each_process_takes_its_own_gradients_back_and_another_world_size_their_mean():
    model = torch.nn.Linear(3, 2, bias=False)
    grads = [torch.randn(2, 3, generator=torch.Generator().manual_seed(rank)) for rank in range(2)]
    saved = [dict(grads={"weight": g.reshape(1, -1)}, rng=tg.rng_state(torch.device("cpu"))) for g in grads]
    for rank in range(2):  # the same world size: each its own, bit for bit
        tg.restore_process_state(model, saved, tg.Comm(rank, 2), torch.device("cpu"))
        assert torch.equal(model.weight.grad, grads[rank])
    tg.restore_process_state(model, saved, tg.Comm(0, 1), torch.device("cpu"))  # one process: the mean of the two
    assert torch.allclose(model.weight.grad, (grads[0] + grads[1]) / 2)
    tg.restore_process_state(model, [dict(grads={}, rng=saved[0]["rng"])], tg.Comm(0, 1), torch.device("cpu"))
    assert model.weight.grad is None  # a checkpoint after an odd step carries nothing: no gradient is left over


# On 2 processes, every stop as on one: after an even step while tied (each process carries its own gradient of the
# tied head), after the split step 3 (nothing carried), after the even step 4 (the embedding's own gradient too).
TWO_PROCESS_STOPS = tuple(range(1, TRAIN_STEPS))


def _rank_main(rank: int, world_size: int, port: int, runs: dict, out: str):
    """One gloo process: for each storage the unbroken run and its resumes, all in one process group; the results
    to out/rank<r>.pt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    comm, device = tg.setup_distributed(tg.parse_config(next(iter(runs.values()))[0]))
    results = {}
    try:
        for name, (whole_args, resumed_args) in runs.items():
            results[name] = unbroken_and_resumed(
                whole_args, lambda step: [*resumed_args, str(Path(out) / f"ck/{name}.step{step}.pt")], comm, device,
                TWO_PROCESS_STOPS)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_a_checkpoint_after_an_odd_or_even_step_resumes_bit_for_bit_on_two_processes(tmp_path):
    # Each process carries its own gradients from an even step (the sum over its own sequences): the checkpoint
    # holds every process's, and each takes its own back. Both storages in one launch of 2 processes.
    import torch.multiprocessing as mp
    from test_distributed_2026 import free_port
    runs = {name: (run_args(tmp_path, name, storage, "--save-every", "1"), run_args(tmp_path, "resumed", storage, "--resume"))
            for name, storage in (("bf16", "--no-fp32-masters"), ("fp32", "--fp32-masters"))}
    mp.spawn(_rank_main, args=(2, free_port(), runs, str(tmp_path)), nprocs=2)
    for rank in range(2):
        for whole, resumed in torch.load(tmp_path / f"rank{rank}.pt", weights_only=False).values():
            assert sorted(resumed) == list(TWO_PROCESS_STOPS)
            assert_resumed_runs_equal_the_unbroken_one(whole, resumed)
