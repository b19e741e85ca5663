"""Build record folders for the tests of records/check_submission.py and leaderboard.py.

The logs are synthetic but in the trainer's real layout (source, a line of 100 '=', versions and
nvidia-smi, another line of 100 '=', world_size/grad_accum_steps/gpu/config lines, step lines,
summary lines), which records/runlog.py parses. The embedded source is a small, runnable stand-in
for train_gpt.py: argparse, no torch, so `--help` takes milliseconds.

    python tests/submission_fixtures.py OUT_DIR     # writes OUT_DIR/track_1_short/2026-11-24_Example/

tests/fixtures/submissions/ holds that passing folder, committed; a test checks it is current.
"""

import json
import sys
from pathlib import Path

SEP = "=" * 100
H100 = "NVIDIA H100 80GB HBM3"

# A plausible train_gpt.py: the config flags the records check reads, argparse, compile in a function.
SCRIPT = '''"""train_gpt.py (test fixture): a stand-in for the trainer with the flags the records check reads."""

import argparse
import dataclasses
import json
import sys


@dataclasses.dataclass
class Config:
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760
    val_seq_len: int = 262_144
    train_steps: int = 20
    seed: int = 0


def build_arg_parser():
    parser = argparse.ArgumentParser(prog="train_gpt.py", description="Train the speedrun GPT (fixture).")
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=field.type if callable(field.type) else
                            type(field.default), default=field.default)
    return parser


def compile_model(model):
    import torch  # only when training: --help must not need torch
    return torch.compile(model, dynamic=False)


def main(argv=None):
    cfg = Config(**vars(build_arg_parser().parse_args(argv)))
    print("config: " + json.dumps(dataclasses.asdict(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

# The previous record's script, as its re-timed baseline logs embed it.
BASELINE_SCRIPT = SCRIPT.replace("train_steps: int = 20", "train_steps: int = 24")

CONFIG = {"train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
          "val_tokens": 10_485_760, "val_seq_len": 262_144, "train_steps": 20, "seed": 0}

LOSSES = (3.2768, 3.2772, 3.2770)
TIMES_MS = (150_100, 150_250, 150_400)          # mean 150.25 s
BASELINE_TIMES_MS = (160_100, 160_300, 160_500)  # mean 160.30 s


def smi_table(gpu, count):
    """An nvidia-smi table with `count` GPU rows named gpu (enough for runlog's fallback parser)."""
    rows = ["+-----------------------------------------------------------------------------------------+",
            "| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |"]
    for index in range(count):
        rows.append(f"|   {index}  {gpu:<28}On  |   00000000:{0x19 + index:02X}:00.0 Off |                    0 |")
    return rows


def make_log(source=SCRIPT, final_loss=3.2770, total_ms=150_000, steps=20, val_every=10, gpu=H100, world_size=8,
             config=None, crash_at=None, stopping=None):
    """The text of one log as train_gpt.py writes it; crash_at=k cuts it after step k, stopping=k stops there."""
    config = dict(CONFIG, **(config or {}))
    lines = [source + "\n" + SEP,  # the logger writes the file's text, then a newline
             "Running Python 3.12.7 (main, Oct  1 2024, 08:52:12) [GCC 11.4.0]",
             "Running PyTorch 2.9.0+cu128 compiled for CUDA 12.8",
             "Running Triton version 3.5.0",
             *smi_table(gpu, world_size), SEP,
             f"world_size: {world_size}", "grad_accum_steps: 1", f"gpu: {gpu}",
             "config: " + json.dumps(config, separators=(",", ":")),
             f"train_files: 9 (900000000 tokens)  val_files: 1  val_tokens: {config['val_tokens']}",
             "compile_and_warmup: 41.3s (3 steps, then reset)"]
    end = crash_at or stopping or steps
    for step in range(end + 1):
        ms = round(total_ms * step / steps)
        if step:  # the line the trainer prints after each optimizer step
            lines.append(f"step:{step}/{steps} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
        if (step % val_every == 0 or step == steps) and (step < end or crash_at is None and stopping is None):
            loss = final_loss if step == steps else 3.6 + 7.2 * (1 - step / steps)
            lines.append(f"step:{step}/{steps} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{ms / max(step, 1):.2f}ms")
    if stopping is not None:
        lines.append(f"stopping: non-finite train loss at step {stopping}")
    if crash_at is None:
        lines += ["launch_to_first_step: 48.2s", "tokens_per_second: 52000",
                  "mfu: 41.2% (330 TFLOP/s per GPU of 800 peak)", "peak memory allocated: 34000 MiB reserved: 49700 MiB"]
    return "\n".join(lines) + "\n"


def make_refused_log(config=None):
    """A run refused before its first step, as train_gpt.py leaves it: header lines, a stopping: line, no step."""
    header = make_log(config=config).split("\nstep:", 1)[0]
    return header + "\nstopping: data error: val files hold 8192 tokens; --val-tokens 8192 needs 8193\n"


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_submission(root, name="2026-11-24_Example", track="track_1_short", *, losses=LOSSES, times_ms=TIMES_MS,
                    source=SCRIPT, script=None, gpu=H100, world_size=8, config=None,
                    baseline_times_ms=BASELINE_TIMES_MS, baseline_gpu=None, baseline_world_size=None,
                    claimed=None, meta=None, extra_logs=None, with_script=True):
    """A record folder root/track/name whose every rule passes unless an argument breaks one.

    claimed: record.json's time_s as written (default: the mean of times_ms with 2 decimals);
    meta: record.json fields to override (None deletes one); extra_logs: {file name: log text}.
    """
    folder = Path(root) / track / name
    for index, (loss, ms) in enumerate(zip(losses, times_ms)):
        write(folder / f"run{index}.txt", make_log(source, loss, ms, gpu=gpu, world_size=world_size, config=config))
    for file_name, text in (extra_logs or {}).items():
        write(folder / file_name, text)
    for index, ms in enumerate(baseline_times_ms):
        write(folder / "baseline" / f"base{index}.txt",
              make_log(BASELINE_SCRIPT, 3.2775, ms, gpu=baseline_gpu or gpu,
                       world_size=baseline_world_size or world_size, config={"train_steps": 24}))
    if with_script:
        write(folder / "train_gpt.py", SCRIPT if script is None and source == SCRIPT else (script or source))
    if claimed is None:
        claimed = f"{sum(times_ms) / len(times_ms) / 1000:.2f}"
    record = {"date": name[:10], "time_s": "@TIME@", "description": "Fixture: a faster variant",
              "contributors": ["Test Person"], "commit": "0123abcd"}
    for key, value in (meta or {}).items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    text = json.dumps(record, indent=2).replace('"@TIME@"', claimed) + "\n"
    write(folder / "record.json", text)
    write(folder / "README.md", "# Fixture record\n\nSynthetic logs for the tests of records/check_submission.py.\n")
    return folder


# ----------------------------------------------------------------------------- the steps track (track_3_optimization)

A100 = "NVIDIA A100-SXM4-80GB"
STEPS_CONFIG = {"train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
                "val_tokens": 10_485_760, "val_seq_len": 1024, "train_seq_len": 1024, "batch_seqs": 512,
                "num_layers": 12, "model_dim": 768, "head_dim": 128, "vocab_size": 50304, "train_steps": 3250, "seed": 0}
STEPS_LOSSES = (3.2770, 3.2778, 3.2772, 3.2776)  # mean 3.2774 over n=4: z = 0.0026 * 2 = 0.0052


def steps_val_loss(step, steps, final_loss):
    """A val curve ending at final_loss that gains 0.0045 per 100 steps near the end (the README's exchange rate)."""
    return final_loss + 0.0045 * (steps - step) / 100 if step >= 0.9 * steps else 3.3 + 7.5 * (1 - step / steps)


def make_steps_log(source=SCRIPT, final_loss=3.2774, steps=3250, gpu=H100, world_size=8, config=None, stopping=None):
    """A log as records/track_3_optimization/train_gpt.py writes it (val lines only): a `track:` line, validation
    every 125 steps and every 25 in the last tenth; stopping=k ends it with a stopping: line after step k."""
    config = dict(STEPS_CONFIG, **(config or {}), train_steps=steps)
    lines = [source + "\n" + SEP, "Running Python 3.12.7", "Running PyTorch 2.11.0+cu130 compiled for CUDA 13.0",
             *smi_table(gpu, world_size), SEP, "track: track_3_optimization", f"world_size: {world_size}",
             f"grad_accum_steps: {8 // world_size}", f"gpu: {gpu}", "config: " + json.dumps(config, separators=(",", ":"))]
    for step in range(0, (stopping or steps) + 1):
        if step == steps or step % (25 if step >= 0.9 * steps else 125) == 0:
            ms = 120 * step
            lines.append(f"step:{step}/{steps} val_loss:{steps_val_loss(step, steps, final_loss):.5f} train_time:{ms}ms "
                         f"step_avg:{ms / max(step, 1):.2f}ms")
    if stopping is not None:
        lines.append(f"stopping: val loss below 3.28 at step {stopping}")
    return "\n".join(lines + ["peak memory allocated: 60000 MiB reserved: 70000 MiB"]) + "\n"


def make_steps_submission(root, name="2026-12-02_Example", *, losses=STEPS_LOSSES, steps=3250, claimed=None,
                          gpu=H100, world_size=8, config=None, extra_logs=None, source=SCRIPT):
    """A track_3_optimization folder whose every rule passes unless an argument breaks one; claimed: record.json's
    steps (default: steps, the runs' last step)."""
    folder = Path(root) / "track_3_optimization" / name
    for index, loss in enumerate(losses):
        run_config = {"seed": index, "run_id": f"run{index}", **(config or {})}  # separate runs, not copies of one
        write(folder / f"run{index}.txt", make_steps_log(source, loss, steps, gpu=gpu, world_size=world_size, config=run_config))
    for file_name, text in (extra_logs or {}).items():
        write(folder / file_name, text)
    write(folder / "train_gpt.py", source)
    record = {"date": name[:10], "steps": claimed or steps, "description": "Fixture: a better optimizer",
              "contributors": ["Test Person"]}
    write(folder / "record.json", json.dumps(record, indent=2) + "\n")
    write(folder / "README.md", "# Fixture result\n\nSynthetic logs for the tests of the steps track.\n")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/submission_fixtures.py OUT_DIR")
    print(make_submission(sys.argv[1]))


# ----------------------------------------------------------------------------- track 2 (track_2_medium)

# Public record #18 of the medium track (records/track_2_medium/2025-12-31_BulkSmallTrackTransfer): 4740 steps, two runs
# at 2.9165 and 2.9166 (p = 0.0046 against 2.92) in 1041.071 s and 1041.483 s, the prior record re-timed at 1379.574 s.
MEDIUM_STEPS = 4740
MEDIUM_CONFIG = {"train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
                 "val_tokens": 10_485_760, "val_seq_len": 262_144, "num_layers": 16, "model_dim": 1024, "num_heads": 8,
                 "head_dim": 128, "vocab_size": 50304, "train_steps": MEDIUM_STEPS, "seed": 0}
MEDIUM_LOSSES = (2.9165, 2.9166)
MEDIUM_TIMES_MS = (1_041_071, 1_041_483)                  # mean 1041.277 s
MEDIUM_BASELINE_TIMES_MS = (1_379_374, 1_379_574, 1_379_774)  # mean 1379.574 s


def medium_val_loss(step, steps, final_loss):
    """A val curve from ln(50304) = 10.83 at step 0 down to final_loss at the last step."""
    return final_loss + (10.83 - final_loss) * (1 - step / steps) ** 3


def make_medium_log(source=SCRIPT, final_loss=2.9165, total_ms=1_041_071, steps=MEDIUM_STEPS, gpu=H100, world_size=8,
                    config=None, track="track_2_medium"):
    """A log as records/track_2_medium/train_gpt.py writes it: a `track:` line, a step line after every step and a
    val line every 250 steps and at the last, `step:N/4740 val_loss:... train_time:...ms step_avg:...ms`."""
    config = dict(MEDIUM_CONFIG, **(config or {}), train_steps=steps)
    lines = [source + "\n" + SEP, "Running Python 3.12.7", "Running PyTorch 2.10.0.dev20251210+cu126 compiled for CUDA 12.6",
             "Running Triton version 3.6.0", *smi_table(gpu, world_size), SEP, *([f"track: {track}"] if track else []),
             f"world_size: {world_size}", f"grad_accum_steps: {8 // world_size}", f"gpu: {gpu}",
             "config: " + json.dumps(config, separators=(",", ":"))]
    for step in range(steps + 1):
        ms = round(total_ms * step / steps)
        if step:
            lines.append(f"step:{step}/{steps} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
        if step % 250 == 0 or step == steps:
            lines.append(f"step:{step}/{steps} val_loss:{medium_val_loss(step, steps, final_loss):.4f} train_time:{ms}ms "
                         f"step_avg:{ms / max(step, 1):.2f}ms")
    lines += ["launch_to_first_step: 95.0s", "peak memory allocated: 57397 MiB reserved: 61912 MiB"]
    return "\n".join(lines) + "\n"


def make_medium_submission(root, name="2026-12-10_Example", *, losses=MEDIUM_LOSSES, times_ms=MEDIUM_TIMES_MS,
                           source=SCRIPT, gpu=H100, world_size=8, config=None, baseline_times_ms=MEDIUM_BASELINE_TIMES_MS,
                           claimed=None, extra_logs=None):
    """A track_2_medium folder whose every rule passes unless an argument breaks one (record #18's figures);
    claimed: record.json's time_s as written (default: the mean of times_ms with 2 decimals)."""
    folder = Path(root) / "track_2_medium" / name
    for index, (loss, ms) in enumerate(zip(losses, times_ms)):
        run_config = {"seed": index, "run_id": f"run{index}", **(config or {})}
        write(folder / f"run{index}.txt", make_medium_log(source, loss, ms, gpu=gpu, world_size=world_size, config=run_config))
    for index, ms in enumerate(baseline_times_ms):
        write(folder / "baseline" / f"base{index}.txt",
              make_medium_log(BASELINE_SCRIPT, 2.9192 + index / 10_000, ms, config={"seed": index, "run_id": f"base{index}"}))
    for file_name, text in (extra_logs or {}).items():
        write(folder / file_name, text)
    write(folder / "train_gpt.py", source)
    time_s = claimed or f"{sum(times_ms) / len(times_ms) / 1000:.2f}"
    record = {"date": name[:10], "time_s": "@TIME@", "description": "Fixture: a faster medium run",
              "contributors": ["Test Person"]}
    write(folder / "record.json", json.dumps(record, indent=2).replace('"@TIME@"', time_s) + "\n")
    write(folder / "README.md", "# Fixture record\n\nSynthetic logs for the tests of the medium track.\n")
    return folder
