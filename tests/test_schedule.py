"""The schedule (schedule_at and --print-schedule): #28's record recipe exactly, the 2026 recipe's stages, and the
numbers the public scripts' own schedule code gives at key steps (copied from a run of that code)."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

REQUIRED_KEYS = {"step", "stage", "batch_tokens", "seq_len", "max_doc_len", "window_short_tokens", "window_long_tokens",
                 "lr_mult", "muon_momentum", "mtp_weights", "adam_step", "embed_tied", "attn_scale"}


def r28_cfg():
    return tg.parse_config(["--preset", "r28"])


def r2026_cfg():
    return tg.parse_config(["--preset", "r2026"])


def run_train_gpt(*args):
    return subprocess.run([sys.executable, "train_gpt.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# #28 (--preset r28): the window, LR and momentum of the public script at every step


def r28_long_window_tokens(step: int) -> int:
    """#28's published definition: the next multiple of 128 of 1728 x progress (at least 128)."""
    wanted = 1728 * (step / 1695)
    return max(128, 128 * math.ceil(wanted / 128))


def old_long_window_tokens(step: int) -> int:
    """What this repository used before: ceil(1792 x progress / 128) blocks."""
    return 128 * max(1, math.ceil(1792 * step / 1695 / 128))


def test_r28_long_window_is_28s_at_every_step_and_not_the_old_formula():
    cfg = r28_cfg()
    ours = [tg.schedule_at(step, cfg).window_long_tokens for step in range(cfg.train_steps + 1)]
    assert ours == [r28_long_window_tokens(step) for step in range(1696)]
    differing = [step for step in range(1696) if ours[step] != old_long_window_tokens(step)]
    assert len(differing) == 409 and differing[0] > 0


def test_r28_short_window_is_half_the_long_one_rounded_down_and_at_least_one_block():
    cfg = r28_cfg()
    for step in range(cfg.train_steps + 1):
        schedule = tg.schedule_at(step, cfg)
        long_blocks = schedule.window_long_tokens // 128
        assert schedule.window_short_tokens == 128 * max(1, long_blocks // 2)
    assert tg.schedule_at(1694, cfg).window_short_tokens == 896  # 14 blocks -> 7
    assert tg.schedule_at(300, cfg).window_short_tokens == 128  # 3 blocks -> 1 (floor, not 2)


def test_r28_lr_and_momentum_are_28s_formulas_exactly():
    cfg = r28_cfg()
    for step in range(1695):
        progress = step / 1695
        if progress < 1 - 0.45:
            lr = 1.0
        else:
            still = (1 - progress) / 0.45
            lr = still * 1.0 + (1 - still) * 0.1
        frac = min(step / 300, 1)
        schedule = tg.schedule_at(step, cfg)
        assert schedule.lr_mult == lr, step
        assert schedule.muon_momentum == (1 - frac) * 0.85 + frac * 0.95, step


def test_r28_has_one_stage_next_token_loss_adam_every_step_untied_fixed_scale():
    cfg = r28_cfg()
    schedules = [tg.schedule_at(step, cfg) for step in range(cfg.train_steps + 1)]
    assert {s.stage for s in schedules} == {0}
    assert {(s.batch_tokens, s.seq_len, s.max_doc_len) for s in schedules} == {(393_216, 49_152, 49_152)}
    assert {s.mtp_weights for s in schedules} == {(1.0,)}
    assert all(s.adam_step and s.trains for s in schedules[:-1]) and not schedules[-1].adam_step and not schedules[-1].trains
    assert not any(s.embed_tied for s in schedules) and {s.attn_scale for s in schedules} == {0.12}


# Values of r28.py's get_lr, its momentum lines and get_window_size_blocks, run in scratch (long window in tokens).
R28_PUBLIC = [  # step, lr_mult, muon_momentum, window_long_tokens
    (0, 1.0, 0.85, 128),
    (125, 1.0, 0.8916666666666666, 128),
    (126, 1.0, 0.892, 256),
    (150, 1.0, 0.8999999999999999, 256),
    (299, 1.0, 0.9496666666666667, 384),
    (932, 1.0, 0.95, 1024),
    (933, 0.9991150442477875, 0.95, 1024),
    (1000, 0.9200589970501475, 0.95, 1024),
    (1314, 0.5495575221238939, 0.95, 1408),
    (1694, 0.10117994100294984, 0.95, 1792),
]


@pytest.mark.parametrize("step,lr_mult,momentum,window_long", R28_PUBLIC)
def test_r28_matches_r28_public_numbers(step, lr_mult, momentum, window_long):
    schedule = tg.schedule_at(step, r28_cfg())
    assert (schedule.lr_mult, schedule.muon_momentum, schedule.window_long_tokens) == (lr_mult, momentum, window_long)


def test_r28_final_validation_uses_the_window_of_step_1695():
    cfg = r28_cfg()
    assert tg.schedule_at(1695, cfg).window_long_tokens == 1792 and tg.window_blocks(1695, cfg) == 14


def test_tiny_preset_ramps_its_window_the_same_way():
    cfg = tg.parse_config(["--preset", "tiny"])
    windows = [tg.schedule_at(step, cfg).window_long_tokens for step in range(cfg.train_steps + 1)]
    assert windows[0] == 128 and windows[-1] == cfg.max_window_tokens == 512
    assert windows == sorted(windows) and set(windows) == {128, 256, 384, 512}
    # (512 - 64) x progress, rounded up to blocks: 3 blocks from step 29 (259.8 tokens), 4 from step 43 (385.3)
    assert (windows[28], windows[29], windows[42], windows[43]) == (256, 384, 384, 512)


# -----------------------------------------------------------------------------
# The 2026 recipe (--preset r2026)


@pytest.mark.parametrize("step,stage", [(0, 0), (479, 0), (480, 1), (481, 1), (959, 1), (960, 2), (961, 2),
                                        (1439, 2), (1440, 3), (1441, 3), (1479, 3), (1480, 3)])
def test_r2026_stage_lookup_at_the_boundaries(step, stage):
    schedule = tg.schedule_at(step, r2026_cfg())
    assert schedule.stage == stage
    assert schedule.batch_tokens == (131_072, 262_144, 393_216, 393_216)[stage]
    assert schedule.seq_len == schedule.batch_tokens // 8
    assert schedule.max_doc_len == (896, 2048, 2048, 2048)[stage]


def test_r2026_steps_and_stage_tokens():
    cfg = r2026_cfg()
    assert cfg.train_steps == 1480
    assert tg.stage_tokens(cfg) == [480 * 131_072, 480 * 262_144, 480 * 393_216, 40 * 393_216]
    assert tg.schedule_summary(cfg) == ("schedule: 1480 steps, stage tokens [62,914,560, 125,829,120, 188,743,680, "
                                        "15,728,640], total 393,216,000 tokens")
    assert tg.schedule_summary(r28_cfg()) == "schedule: 1695 steps, stage tokens [666,501,120], total 666,501,120 tokens"


# Values of r2026.py's own TrainingSchedule, get_muon_momentum, TrainingManager.advance_schedule (+ the final
# window extension) and Yarn.attn_scale, run in scratch. Windows in tokens; MTP weights as Python floats (the
# script then stores them as float32 tensors).
R2026_PUBLIC = [  # step, lr_mult, muon_momentum, (short, long window), mtp_weights, attn_scale
    (0, 1.0, 0.85, (128, 384), (1.0, 0.5, 0.25), 0.1),
    (1, 1.0, 0.8503333333333333, (128, 384), (1.0, 0.5, 0.24947916666666667), 0.1),
    (299, 1.0, 0.9496666666666667, (128, 384), (1.0, 0.5, 0.09427083333333333), 0.1),
    (300, 1.0, 0.95, (128, 384), (1.0, 0.5, 0.09375), 0.1),
    (479, 1.0, 0.95, (128, 384), (1.0, 0.5, 0.0005208333333333315), 0.1),
    (480, 1.52, 0.95, (384, 896), (1.0, 0.5), 0.11694595720774409),
    (481, 1.52, 0.95, (384, 896), (1.0, 0.49895833333333334), 0.11694595720774409),
    (576, 1.52, 0.95, (384, 896), (1.0, 0.4), 0.11694595720774409),
    (577, 1.5184143518518518, 0.95, (384, 896), (1.0, 0.3989583333333333), 0.11694595720774409),
    (959, 0.9126967592592593, 0.95, (384, 896), (1.0, 0.001041666666666663), 0.11694595720774409),
    (960, 1.027777777777778, 0.95, (640, 1408), (1.0,), 0.12751752379570258),
    (961, 1.025949074074074, 0.95, (640, 1408), (1.0,), 0.12751752379570258),
    (1008, 0.94, 0.95, (640, 1408), (1.0,), 0.12751752379570258),
    (1430, 0.16828703703703704, 0.95, (640, 1408), (1.0,), 0.12751752379570258),
    (1431, 0.16645833333333326, 0.948, (640, 1408), (1.0,), 0.12751752379570258),
    (1439, 0.15182870370370374, 0.9319999999999999, (640, 1408), (1.0,), 0.12751752379570258),
    (1440, 0.15, 0.9299999999999999, (768, 1664), (1.0,), 0.1317779884389435),
    (1441, 0.15, 0.9279999999999999, (768, 1664), (1.0,), 0.1317779884389435),
    (1479, 0.15, 0.852, (768, 1664), (1.0,), 0.1317779884389435),
    (1480, 0.15, 0.85, (768, 2560), (1.0,), 0.1317779884389435),
]


@pytest.mark.parametrize("step,lr_mult,momentum,windows,mtp,attn_scale", R2026_PUBLIC)
def test_r2026_matches_the_public_script_numbers(step, lr_mult, momentum, windows, mtp, attn_scale):
    schedule = tg.schedule_at(step, r2026_cfg())
    assert schedule.lr_mult == lr_mult
    assert schedule.muon_momentum == pytest.approx(momentum, rel=1e-15, abs=0)  # the script's lerp rounds differently
    assert (schedule.window_short_tokens, schedule.window_long_tokens) == windows
    assert schedule.mtp_weights == mtp
    assert schedule.attn_scale == attn_scale


def test_r2026_adam_on_odd_steps_only_and_embedding_tied_through_the_split_step():
    cfg = r2026_cfg()
    schedules = [tg.schedule_at(step, cfg) for step in range(cfg.train_steps + 1)]
    assert [s.step for s in schedules if s.adam_step] == list(range(1, 1480, 2))
    assert tg.embed_split_step(cfg) == 961
    assert [s.step for s in schedules if s.embed_tied] == list(range(962))


def test_schedule_is_a_frozen_record_of_a_pure_function():
    cfg = r2026_cfg()
    assert tg.schedule_at(700, cfg) == tg.schedule_at(700, cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tg.schedule_at(700, cfg).lr_mult = 2.0


# -----------------------------------------------------------------------------
# Flags, --print-schedule, refusals


def test_stage_flags_parse_ints_floats_and_per_stage_lists():
    cfg = tg.parse_config(["--preset", "r2026", "--stage-lr-mult", "1,1.5,2,2", "--stage-mtp-weights-start", "1,0.5/1/1/1",
                           "--stage-mtp-weights-end", "1,0/1/1/1", "--stage-steps", "0,100,200,300"])
    assert cfg.stage_lr_mult == (1.0, 1.5, 2.0, 2.0) and cfg.stage_steps == (0, 100, 200, 300)
    assert cfg.stage_mtp_weights_start == ((1.0, 0.5), (1.0,), (1.0,), (1.0,))
    assert tg.schedule_at(50, cfg).mtp_weights == (1.0, 0.25)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "r28", "--stage-long-window-blocks", "3,7"], "--stage-long-window-blocks: only with a staged schedule"),
    (["--preset", "r28", "--adam-odd-steps-only"], "--adam-odd-steps-only: only with a staged schedule"),
    (["--preset", "r2026", "--stage-seq-len", "16384,32768,49152"], "--stage-seq-len: one value per stage (4 stages), got 3"),
    (["--preset", "r2026", "--stage-steps", "0,480,960,1480"], "must start at 0 and increase, below --train-steps 1480"),
    (["--preset", "r2026", "--stage-mtp-weights-end", "1,0/1/1/1"], "need the same number"),
])
def test_impossible_schedules_are_refused_in_one_line(argv, message):
    with pytest.raises(tg.ConfigError) as error:
        tg.check_schedule(tg.parse_config(argv), training=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_print_schedule_prints_one_json_line_per_step():
    assert sorted(tg.PRESETS) == ["r2026", "r28", "record", "tiny"]  # a new preset joins the list below
    for preset, steps in [("record", 1480), ("r2026", 1480), ("r28", 1695), ("tiny", 50)]:
        result = run_train_gpt("--preset", preset, "--print-schedule")
        assert result.returncode == 0 and result.stderr == ""
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == steps + 1 and [line["step"] for line in lines] == list(range(steps + 1))
        assert all(REQUIRED_KEYS <= line.keys() for line in lines)
        cfg = tg.parse_config(["--preset", preset])
        assert lines == [json.loads(json.dumps(dataclasses.asdict(tg.schedule_at(s, cfg)))) for s in range(steps + 1)]


def test_a_staged_schedule_the_model_cannot_follow_is_refused_in_one_line():
    # The 2026 schedule's growing attention scale needs the 2026 model's YaRN: without it, one line.
    result = run_train_gpt("--preset", "r2026", "--device", "cpu", "--no-yarn")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "cannot train with this model" in result.stderr and "--attn-scale-log-growth (needs --yarn)" in result.stderr


def test_train_step_reads_lr_momentum_and_window_from_the_schedule(monkeypatch):
    """train_step must take all three from schedule_at: a schedule with odd values shows up unchanged."""
    odd = dataclasses.replace(tg.schedule_at(5, r28_cfg()), lr_mult=0.37, muon_momentum=0.61, window_long_tokens=5 * 128)
    monkeypatch.setattr(tg, "schedule_at", lambda step, cfg: odd)
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.fp8_scales = None  # the bf16 head, as GPT on a CPU

        def forward(self, inputs, targets, window, schedule=None):
            seen["window"] = window
            return self.w * 2

    class Adam:
        def reduce_gradients(self):
            pass

        def step(self, lr_mult, wait_gathers=True):
            seen["adam"] = lr_mult

        def finish_step(self):
            pass

    class Muon(Adam):
        def step(self, lr_mult, momentum):
            seen["muon"] = (lr_mult, momentum)

    opt = tg.Optimizers(Adam(), Muon(), None)
    tg.train_step(Model(), [(torch.zeros(4), torch.zeros(4))], opt, 5, r28_cfg())
    assert seen == {"window": 5, "adam": 0.37, "muon": (0.37, 0.61)}


def test_a_run_prints_its_steps_stage_tokens_and_total_at_start_up(tmp_path):
    """Before any data is read (here there is none, so the run stops right after), the 2026 preset's run prints
    its schedule: 480 steps x 131,072 = 62,914,560 tokens, 480 x 262,144 = 125,829,120, 480 x 393,216 =
    188,743,680, the 40 extension steps x 393,216 = 15,728,640; total 393,216,000 tokens."""
    result = run_train_gpt("--preset", "r2026", "--device", "cpu", "--val-files", str(tmp_path / "none_*.bin"),
                           "--log-dir", str(tmp_path), "--run-id", "startup")
    assert result.returncode == 2 and "--val-files" in result.stderr  # stopped at the data (the first it reads)
    summary = [line for line in result.stdout.splitlines() if line.startswith("schedule:")]
    assert summary == ["schedule: 1480 steps, stage tokens [62,914,560, 125,829,120, 188,743,680, 15,728,640], "
                       "total 393,216,000 tokens"]
    # printed before the data is looked at: nothing after it comes from the data or training
    after = result.stdout.split(summary[0], 1)[1]
    assert "train_files:" not in after and "step:" not in after
