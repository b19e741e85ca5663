"""The schedule (schedule_at and --print-schedule): the 2026 recipe's stages and the numbers the public script's
own schedule code gives at key steps (copied from a run of that code), and the tiny preset's shape."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

REQUIRED_KEYS = {"step", "stage", "batch_tokens", "seq_len", "max_doc_len", "window_short_tokens", "window_long_tokens",
                 "lr_mult", "muon_momentum", "mtp_weights", "prefix_weight", "adam_step", "embed_tied", "attn_scale"}


def r2026_cfg():
    return tg.parse_config(["--preset", "r2026"])


def run_train_gpt(*args):
    return subprocess.run([sys.executable, "train_gpt.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# The tiny preset: the record's schedule shape at CPU size


def test_tiny_preset_has_the_records_stages_split_and_extension():
    cfg = tg.parse_config(["--preset", "tiny"])
    schedules = [tg.schedule_at(step, cfg) for step in range(cfg.train_steps + 1)]
    assert [s.stage for s in schedules].count(3) == 5  # the 4 extension steps and the final validation
    assert {s.stage: s.batch_tokens // s.seq_len for s in schedules} == {0: 2, 1: 2, 2: 2, 3: 2}  # 2 sequences a step
    assert tg.embed_split_step(cfg) == 31 and [s.step for s in schedules if s.embed_tied] == list(range(32))
    assert [s.mtp_weights for s in schedules[:1]] == [(1.0, 0.5, 0.25)] and schedules[-1].mtp_weights == (1.0,)
    assert schedules[-1].window_long_tokens == 6 * 128  # the final validation's wider window
    scales = sorted({s.attn_scale for s in schedules})
    assert len(scales) == 4 and scales[0] == 0.1  # YaRN grows it at each of the 3 window changes


# -----------------------------------------------------------------------------
# The 2026 recipe (--preset r2026)


@pytest.mark.parametrize("step,stage", [(0, 0), (422, 0), (423, 1), (424, 1), (846, 1), (847, 2), (848, 2),
                                        (1269, 2), (1270, 3), (1271, 3), (1284, 3), (1285, 3)])
def test_r2026_stage_lookup_at_the_boundaries(step, stage):
    schedule = tg.schedule_at(step, r2026_cfg())
    assert schedule.stage == stage
    assert schedule.batch_tokens == (131_072, 262_144, 393_216, 393_216)[stage]
    assert schedule.seq_len == schedule.batch_tokens // 8
    assert schedule.max_doc_len == (896, 2048, 2048, 2048)[stage]


def test_r2026_steps_and_stage_tokens():
    cfg = r2026_cfg()
    assert cfg.train_steps == 1285
    assert tg.stage_tokens(cfg) == [423 * 131_072, 424 * 262_144, 423 * 393_216, 15 * 393_216]
    assert tg.schedule_summary(cfg) == ("schedule: 1285 steps, stage tokens [55,443,456, 111,149,056, 166,330,368, "
                                        "5,898,240], total 338,821,120 tokens")


# Values of the 2026-08-01 script's (modded-nanogpt f411b3d3) own TrainingSchedule (get_lr, mtp_weights,
# prefix_weights), get_muon_momentum, TrainingManager.advance_schedule (+ the final window extension) and
# Yarn.attn_scale, run in scratch. Windows in tokens; MTP and prefix weights as Python floats (the script then
# stores them as float32 tensors). The scratch comparison checks all 1286 steps.
R2026_PUBLIC = [  # step, lr_mult, muon_momentum, (short, long window), mtp_weights, prefix_weight, attn_scale
    (0, 1.0, 0.85, (128, 384), (1.0, 0.5, 0.25), 0.25, 0.1),
    (1, 1.0, 0.8503333333333333, (128, 384), (1.0, 0.5, 0.24940898345153664), 0.25, 0.1),
    (299, 1.0, 0.9496666666666667, (128, 384), (1.0, 0.5, 0.07328605200945626), 0.25, 0.1),
    (300, 1.0, 0.95, (128, 384), (1.0, 0.5, 0.0726950354609929), 0.25, 0.1),
    (422, 1.0, 0.95, (128, 384), (1.0, 0.5, 0.0005910165484633578), 0.25, 0.1),
    (423, 1.52, 0.95, (384, 896), (1.0, 0.5), 0.25, 0.11694595720774409),
    (424, 1.52, 0.95, (384, 896), (1.0, 0.4988207547169811), 0.24941037735849056, 0.11694595720774409),
    (508, 1.52, 0.95, (384, 896), (1.0, 0.39976415094339623), 0.19988207547169812, 0.11694595720774409),
    (509, 1.518202099737533, 0.95, (384, 896), (1.0, 0.39858490566037735), 0.19929245283018868, 0.11694595720774409),
    (846, 0.9123097112860894, 0.95, (384, 896), (1.0, 0.0011792452830188815), 0.0005896226415094408, 0.11694595720774409),
    (847, 1.0270866141732282, 0.95, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (848, 1.02501312335958, 0.95, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (900, 0.9171916010498687, 0.95, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (1235, 0.22257217847769029, 0.95, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (1236, 0.22049868766404193, 0.948, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (1269, 0.15207349081364835, 0.882, (640, 1408), (1.0,), 0.0, 0.12751752379570258),
    (1270, 0.15, 0.88, (768, 1664), (1.0,), 0.0, 0.1317779884389435),
    (1271, 0.15, 0.878, (768, 1664), (1.0,), 0.0, 0.1317779884389435),
    (1284, 0.15, 0.852, (768, 1664), (1.0,), 0.0, 0.1317779884389435),
    (1285, 0.15, 0.85, (768, 2560), (1.0,), 0.0, 0.1317779884389435),
]


@pytest.mark.parametrize("step,lr_mult,momentum,windows,mtp,prefix,attn_scale", R2026_PUBLIC)
def test_r2026_matches_the_public_script_numbers(step, lr_mult, momentum, windows, mtp, prefix, attn_scale):
    schedule = tg.schedule_at(step, r2026_cfg())
    assert schedule.lr_mult == lr_mult
    assert schedule.muon_momentum == pytest.approx(momentum, rel=1e-15, abs=0)  # the script's lerp rounds differently
    assert (schedule.window_short_tokens, schedule.window_long_tokens) == windows
    assert schedule.mtp_weights == mtp
    assert schedule.prefix_weight == prefix
    assert schedule.attn_scale == attn_scale


def test_r2026_adam_on_odd_steps_only_and_embedding_tied_through_the_split_step():
    cfg = r2026_cfg()
    schedules = [tg.schedule_at(step, cfg) for step in range(cfg.train_steps + 1)]
    assert [s.step for s in schedules if s.adam_step] == list(range(1, 1285, 2))
    assert tg.embed_split_step(cfg) == 847
    assert [s.step for s in schedules if s.embed_tied] == list(range(848))
    assert tg.warmup_steps(cfg) == [0, 1, 421, 422, 423, 424, 845, 846, 847, 848, 1268, 1269, 1270, 1271]


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
    (["--stage-steps", ""], "--stage-steps : must start at 0 and increase"),
    (["--preset", "r2026", "--stage-seq-len", "16384,32768,49152"], "--stage-seq-len: one value per stage (4 stages), got 3"),
    (["--preset", "r2026", "--stage-steps", "0,423,847,1285"], "must start at 0 and increase, below --train-steps 1285"),
    (["--preset", "r2026", "--stage-mtp-weights-end", "1,0/1/1/1"], "need the same number"),
])
def test_impossible_schedules_are_refused_in_one_line(argv, message):
    with pytest.raises(tg.ConfigError) as error:
        tg.check_schedule(tg.parse_config(argv), training=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_print_schedule_prints_one_json_line_per_step():
    assert sorted(tg.PRESETS) == ["r2026", "record", "tiny"]  # a new preset joins the list below
    for preset, steps in [("record", 1285), ("r2026", 1285), ("tiny", 50)]:
        result = run_train_gpt("--preset", preset, "--print-schedule")
        assert result.returncode == 0 and result.stderr == ""
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == steps + 1 and [line["step"] for line in lines] == list(range(steps + 1))
        assert all(REQUIRED_KEYS <= line.keys() for line in lines)
        cfg = tg.parse_config(["--preset", preset])
        assert lines == [json.loads(json.dumps(dataclasses.asdict(tg.schedule_at(s, cfg)))) for s in range(steps + 1)]


def test_a_schedule_the_model_cannot_follow_is_refused_in_one_line():
    # The schedule's growing attention scale needs the model's YaRN: without it, one line.
    result = run_train_gpt("--device", "cpu", "--no-yarn")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "--attn-scale-log-growth grows the attention scale" in result.stderr and "needs --yarn" in result.stderr


def test_train_step_reads_lr_momentum_and_window_from_the_schedule(monkeypatch):
    """train_step must take all three from schedule_at: a schedule with odd values shows up unchanged."""
    odd = dataclasses.replace(tg.schedule_at(5, r2026_cfg()), lr_mult=0.37, muon_momentum=0.61, window_long_tokens=5 * 128)
    monkeypatch.setattr(tg, "schedule_at", lambda step, cfg: odd)
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.fp8_scales = None  # the bf16 head, as GPT on a CPU

        def forward(self, inputs, targets, schedule):
            seen["window"] = schedule.window_long_tokens // 128
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
    tg.train_step(Model(), [(torch.zeros(4), torch.zeros(4))], opt, 5, r2026_cfg())
    assert seen == {"window": 5, "adam": 0.37, "muon": (0.37, 0.61)}


def test_a_run_prints_its_steps_stage_tokens_and_total_at_start_up(tmp_path):
    """Before any data is read (here there is none, so the run stops right after), the 2026 preset's run prints
    its schedule: 423 steps x 131,072 = 55,443,456 tokens, 424 x 262,144 = 111,149,056, 423 x 393,216 =
    166,330,368, the 15 extension steps x 393,216 = 5,898,240; total 338,821,120 tokens."""
    result = run_train_gpt("--preset", "r2026", "--device", "cpu", "--val-files", str(tmp_path / "none_*.bin"),
                           "--log-dir", str(tmp_path), "--run-id", "startup")
    assert result.returncode == 2 and "--val-files" in result.stderr  # stopped at the data (the first it reads)
    summary = [line for line in result.stdout.splitlines() if line.startswith("schedule:")]
    assert summary == ["schedule: 1285 steps, stage tokens [55,443,456, 111,149,056, 166,330,368, 5,898,240], "
                       "total 338,821,120 tokens"]
    # printed before the data is looked at: nothing after it comes from the data or training
    after = result.stdout.split(summary[0], 1)[1]
    assert "train_files:" not in after and "step:" not in after


def test_explicit_stage_steps_beyond_train_steps_are_refused_with_scaled_stages_to_copy():
    result = run_train_gpt("--preset", "tiny", "--device", "cpu", "--train-steps", "20", "--stage-steps", "0,15,30,46")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "train_gpt.py: error: --stage-steps 0,15,30,46: must start at 0 and increase, below --train-steps 20 "
        "(for 20 steps, e.g. --stage-steps 0,6,12,18 --extension-steps 2)"]
    cfg = tg.parse_config(["--preset", "tiny", "--train-steps", "20", "--stage-steps", "0,6,12,18", "--extension-steps", "2"])
    tg.check_schedule(cfg, training=True)  # the proposal is a schedule the trainer takes
    assert tg.embed_split_step(cfg) == 13 and tg.schedule_at(19, cfg).stage == 3


# Issue 28: --train-steps alone scales the preset's schedule, as the public script's stages are fractions of the run


def test_train_steps_alone_scales_the_presets_schedule_and_the_run_prints_its_stages(tmp_path, capsys):
    """Tiny at 20 of its 50 steps: scale 0.4, stages 15 -> 6, 30 -> 12, the scheduled end 46 -> 18.4 -> 18, so the
    extension is 2 steps from 18; momentum warm-up 10 -> 4, cool-down 5 -> 2; the split at 12 | 1 = 13."""
    cfg = tg.parse_config(["--preset", "tiny", "--train-steps", "20"])
    assert (cfg.stage_steps, cfg.extension_steps, cfg.muon_momentum_warmup_steps, cfg.muon_momentum_cooldown_steps) == (
        (0, 6, 12, 18), 2, 4, 2)
    assert tg.embed_split_step(cfg) == 13 and cfg.stage_batch_tokens == tg.TINY["stage_batch_tokens"]  # the rest kept
    # the record at 120 of its 1285 steps: 423 x 120/1285 = 39.50 -> 40, 847 -> 79.10 -> 79, the scheduled end
    # 1270 -> 118.6 -> 119 (1 extension step, the last stage starts with it); momentum warm-up 300 -> 28.02 -> 28
    cfg = tg.parse_config(["--train-steps", "120"])
    assert (cfg.stage_steps, cfg.extension_steps, cfg.muon_momentum_warmup_steps) == ((0, 40, 79, 119), 1, 28)
    # a step count given as a flag is kept, and the last stage starts with the extension given
    cfg = tg.parse_config(["--preset", "tiny", "--train-steps", "20", "--extension-steps", "5", "--muon-momentum-warmup-steps", "7"])
    assert (cfg.stage_steps, cfg.extension_steps, cfg.muon_momentum_warmup_steps) == ((0, 6, 12, 15), 5, 7)
    # a run prints the stages it uses before it reads anything (here no val files: refused right after)
    status = tg.main(["--preset", "tiny", "--device", "cpu", "--train-steps", "20", "--val-files", str(tmp_path / "none_*.bin"),
                      "--log-dir", str(tmp_path / "logs"), "--run-id", "scaled"])
    out = capsys.readouterr().out.splitlines()
    assert status == 2 and out[1] == (
        "stages: steps 0-5, 6-11, 12-17, 18-19 (--stage-steps 0,6,12,18); extension: the last 2 steps; the embedding "
        "unties after step 13; Muon momentum warm-up 4 and cool-down 2 steps")
    assert out[0].startswith("schedule: 20 steps, stage tokens [")


def test_the_trainers_scaled_schedule_is_the_benchmarks_compressed_one():
    # records/benchmark.py compresses a preset's schedule into explicit flags: the trainer scales it alike
    sys.path.insert(0, str(REPO / "records"))
    import benchmark
    for preset in ("record", "tiny"):
        for steps in [5, 8, 20, 21, 50, 77, 120, 240, 1000, 1285, 1480, 2000]:  # 5: the fewest the record fits
            scaled = tg.parse_config(["--preset", preset, "--train-steps", str(steps)])
            compressed = tg.parse_config(["--preset", preset, *benchmark.compressed_schedule_flags(preset, steps)])
            assert [getattr(scaled, k) for k in tg.SCALED_STEP_COUNTS] == [getattr(compressed, k) for k in tg.SCALED_STEP_COUNTS]
    assert tg.parse_config(["--train-steps", "1285"]) == tg.parse_config([])  # at its own length: the preset


@pytest.mark.parametrize("steps", ["1", "2", "3"])
def test_too_few_train_steps_for_the_presets_stages_are_refused_with_a_command_that_fits(steps, capsys):
    assert tg.main(["--preset", "tiny", "--device", "cpu", "--train-steps", steps]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"train_gpt.py: error: --train-steps {steps} is too few for the preset's 4 stages: "
                                   f"scaled from its 50 steps they would start at steps ")
    assert captured.err.endswith("; 4 steps is the fewest that fits: python train_gpt.py --preset tiny --device cpu "
                                 "--train-steps 4 (or give --stage-steps)\n")
    cfg = tg.parse_config(["--preset", "tiny", "--device", "cpu", "--train-steps", "4"])  # the proposal is taken
    tg.check_schedule(cfg, training=True)
    assert cfg.stage_steps == (0, 1, 2, 3) and [tg.schedule_at(s, cfg).stage for s in range(4)] == [0, 1, 2, 3]
