"""records/track_2_medium/train_gpt.py: train GPT-2 medium (16 layers x 1024) to 3.28's big brother, 2.92 FineWeb
val loss, as fast as 8 H100s allow: track 2 of the speedrun, with the public record #18's recipe (2025-12-31,
"Bulk transfer short track features", 4740 steps, 17.35 min).

One self-contained file, read top to bottom: config, model, optimizer, data, training, logging.
Importing it starts nothing; running it trains.

    torchrun --standalone --nproc_per_node=8 records/track_2_medium/train_gpt.py   # the record, 8 GPUs
    torchrun --standalone --nproc_per_node=1 records/track_2_medium/train_gpt.py   # same math, 8 accumulation steps
    python records/track_2_medium/train_gpt.py --preset tiny --device cpu          # the same model at CPU size
    python records/track_2_medium/train_gpt.py --print-recipe                      # every parameter's treatment
    python records/track_2_medium/train_gpt.py --print-schedule                    # every step's settings (JSON)

Every step is 8 sequences (one per GPU of the record): 16K, 32K, 48K and then 64K tokens each. On fewer processes
each takes its share of the 8 in accumulation steps; the gradient is the same sum, so the math does not change.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import functools
import glob
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TRACK = "track_2_medium"

# -----------------------------------------------------------------------------
# Config: one dataclass whose defaults are the 8xH100 record (#18); flags override any field.

# The record's 12 phases of 4700/12 steps (int(12 step / 4700)), merged where nothing changes: the batch and the
# windows grow over the first 9 phases and stay from phase 8 on. A stage starts at ceil(k x 4700 / 12).
RECORD_STAGES = (0, 392, 784, 1175, 1567, 1959, 2350, 2742, 3134)


@dataclass
class Config:
    # data
    train_files: str = field(default="data/fineweb10B/fineweb_train_*.bin", metadata={"help": "glob of training shards, read in sorted order"})
    val_files: str = field(default="data/fineweb10B/fineweb_val_*.bin", metadata={"help": "glob of validation shards"})
    val_tokens: int = field(default=10_485_760, metadata={"help": "validate on exactly the first N tokens of the val files"})
    val_seq_len: int = field(default=262_144, metadata={"help": "tokens per validation sequence, dealt round-robin to the processes"})
    val_every: int = field(default=250, metadata={"help": "validate every N steps (0: only at the start and the end)"})
    # schedule: stages of their own batch, sequence length and windows; the LR and multi-token weights by fractions
    train_steps: int = field(default=4740, metadata={"help": "optimizer steps, the extension included"})
    extension_steps: int = field(default=40, metadata={"help": "steps after the scheduled ones, at the final LR and windows"})
    stage_steps: tuple = field(default=RECORD_STAGES, metadata={"help": "first step of each stage, from 0; the last stage runs to --train-steps"})
    stage_batch_tokens: tuple = field(default=(131_072, 262_144, 393_216) + (524_288,) * 6, metadata={"help": "per stage: tokens per optimizer step, over all processes"})
    stage_seq_len: tuple = field(default=(16_384, 32_768, 49_152) + (65_536,) * 6, metadata={"help": "per stage: tokens per training sequence (per process per accumulation step)"})
    stage_max_doc_len: tuple = field(default=(4096,) * 9, metadata={"help": "per stage: longest document in a training sequence; longer ones are cut"})
    stage_short_window_blocks: tuple = field(default=(1, 3, 5, 6, 7, 8, 9, 10, 11), metadata={"help": "per stage: short attention window in 128-token blocks (the record: min(11, long // 2))"})
    stage_long_window_blocks: tuple = field(default=(3, 7, 11, 13, 15, 17, 19, 21, 23), metadata={"help": "per stage: long attention window in 128-token blocks"})
    final_long_window_blocks: int = field(default=27, metadata={"help": "long window of the final validation, in 128-token blocks (0: the last stage's)"})
    lr_step_fracs: tuple = field(default=(1 / 12, 2 / 12, 3 / 12), metadata={"help": "the LR multiplier takes the next --lr-step-mults value on the first step past each of these fractions of the scheduled steps", "parse": "floats"})
    lr_step_mults: tuple = field(default=(1.52, 1.73, 2.0), metadata={"help": "LR multipliers (1 before the first fraction), grown with the batch", "parse": "floats"})
    cooldown_frac: float = field(default=0.7, metadata={"help": "last fraction of the scheduled steps over which the LR decays linearly to --final-lr-frac"})
    final_lr_frac: float = field(default=0.1, metadata={"help": "LR multiplier at the end of the cooldown and through the extension"})
    mtp_frac: float = field(default=0.25, metadata={"help": "multi-token prediction over this first fraction of the scheduled steps: its first third weighs the next 3 tokens 1, 0.5, 0.25->0, its second the next 2 tokens 1, 0.5->0 (0: next token only)"})
    muon_momentum_cooldown_steps: int = field(default=50, metadata={"help": "last steps over which Muon momentum returns from final to start"})
    adam_odd_steps_only: bool = field(default=True, metadata={"help": "Adam steps on odd steps only; even steps' gradients accumulate into them (off: Adam every step)"})
    embed_split_stage: int = field(default=2, metadata={"help": "embedding tied to the head until the first odd step of this stage (the record: step 785 = ceil(4700/6) | 1), untied after it (0: never tied)"})
    attn_scale_log_growth: float = field(default=0.2, metadata={"help": "YaRN: at each long-window change attn scale *= 1 + c*ln(new/old) (0: fixed)"})
    yarn_max_window_blocks: int = field(default=13, metadata={"help": "YaRN follows the long window only while it is at most this many blocks (the record: 3->7->11->13, then fixed)"})
    # model
    vocab_size: int = field(default=50304, metadata={"help": "GPT-2's 50257 tokens padded to a multiple of 128"})
    num_layers: int = field(default=16, metadata={"help": "transformer blocks, each with attention and MLP"})
    model_dim: int = field(default=1024, metadata={"help": "residual stream width"})
    num_heads: int = field(default=8, metadata={"help": "attention heads (num_heads * head_dim = model_dim)"})
    head_dim: int = field(default=128, metadata={"help": "width of one attention head"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width / model_dim"})
    long_window_layers: tuple = field(default=(0, 4, 11, 15), metadata={"help": "layers with the long window (and the key offset); the rest have the short one"})
    attn_scale: float = field(default=0.1, metadata={"help": "softmax scale of attention (QK-normed) in the first stage; YaRN grows it"})
    gate_dim: int = field(default=16, metadata={"help": "residual channels read by the per-head output and value gates and the smear and skip gates"})
    logit_cap: float = field(default=23.0, metadata={"help": "logits squashed to (0, cap) by cap*sigmoid((z + shift)/div)"})
    logit_shift: float = field(default=5.0, metadata={"help": "head logits cap*sigmoid((z + shift)/div): the shift"})
    logit_div: float = field(default=7.5, metadata={"help": "head logits cap*sigmoid((z + shift)/div): the divisor"})
    value_embed_tables: tuple = field(default=(0, 1, 2, 3, 4) + (-1,) * 6 + (0, 1, 2, 3, 4), metadata={"help": "per layer: the value-embedding table mixed into its V (-1: none); layers i and i+11 share table i"})
    skip_from_layers: tuple = field(default=(6, 4, 2), metadata={"help": "U-net skips: the output of layer skip_from[k] is added before layer skip_to[k], gated by sigmoid(lambda_k)*2*sigmoid(W_k x0[:16])"})
    skip_to_layers: tuple = field(default=(9, 10, 11), metadata={"help": "U-net skips: where each skip lands ('' for none)"})
    backout_layer: int = field(default=11, metadata={"help": "lambda times this layer's output is subtracted before the head (-1: none)"})
    key_offset: bool = field(default=True, metadata={"help": "on the long-window layers each key's position-free (zero-frequency RoPE) dims are taken from the previous token"})
    resid_lambda_init: float = field(default=1.05, metadata={"help": "every layer's stream scale starts here"})
    head_init_std: float = field(default=0.005, metadata={"help": "head initialized N(0, std); the input embedding reads it until the split"})
    # optimizer: the per-parameter table is recipe(); these are its base values
    muon_lr: float = field(default=0.015, metadata={"help": "NorMuon base learning rate (block matrices and gates; the table adds shape factors)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon Nesterov momentum after warm-up"})
    muon_momentum_start: float = field(default=0.85, metadata={"help": "Muon momentum at step 0"})
    muon_momentum_warmup_steps: int = field(default=300, metadata={"help": "steps to move Muon momentum from start to final"})
    normuon_beta2: float = field(default=0.95, metadata={"help": "NorMuon: EMA of the squared update of each matrix row, evened out (0: plain Muon)"})
    adam_lr: float = field(default=0.004, metadata={"help": "base LR of the first Adam (tables, head, small gates, x0 lambdas)"})
    scalar_lr: float = field(default=0.008, metadata={"help": "base LR of the second Adam (the scalar lambdas)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    muon_weight_decay: float = field(default=1.2, metadata={"help": "cautious weight decay of Muon matrices, times base LR x effective LR"})
    adam_weight_decay: float = field(default=0.005, metadata={"help": "cautious weight decay of Adam tensors (times the table's multiplier), times effective LR squared"})
    # run
    seed: int = field(default=0, metadata={"help": "seed of the weight initialization (the public script has none)"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    compile: bool = field(default=True, metadata={"help": "torch.compile each block and the head once (regional compilation); compiling always warms up >= 1 untimed step"})
    warmup_steps: int = field(default=3, metadata={"help": "untimed steps that compile every shape, then everything is reset (0: none)"})
    run_id: str = field(default="", metadata={"help": "log name under --log-dir (default: a random uuid)"})
    log_dir: str = field(default="logs", metadata={"help": "folder of the run logs"})
    save_model: str = field(default="", metadata={"help": "write the final weights to this path (rank 0)"})
    gpu_peak_tflops: float = field(default=800.0, metadata={"help": "dense bf16 peak per GPU, for the MFU figure (H100 measured: ~800)"})
    save_every: int = field(default=0, metadata={"help": "every N steps write a checkpoint to --checkpoint-dir/<run_id>.pt, off the clock (0: never)"})
    checkpoint_dir: str = field(default="checkpoints", metadata={"help": "folder of the --save-every checkpoints (one file per run, replaced atomically)"})
    resume: str = field(default="", metadata={"help": "continue from this checkpoint: weights, optimizer, data position and clock (same settings)"})


# The defaults above are record #18: 4700 scheduled steps in 12 phases of ~392 (the batch grows 128K -> 256K ->
# 384K -> 512K tokens over the first four, the windows over the first nine), then 40 extension steps at the final LR.
# The LR multiplier steps up past 1/12, 2/12 and 3/12 of 4700 (1.52 from step 392, 1.73 from 784, 2.0 from 1176: one
# step after the 512K batch starts at 1175) and from step 1410 (x >= 0.3) falls linearly to 0.1 at step 4700.
# Multi-token prediction covers the first 1175 steps (4700/4), the embedding splits from the head after step 785.
# 2,176,974,848 training tokens.
#
# `--preset tiny` is the same structure and schedule shape at CPU size, on data/sample/: 16 layers of width 64 with
# every component of the record (value-embedding sharing, the three skips, backout at 11, the key offset on 0, 4, 11,
# 15), 28 + 2 steps in 9 stages at ceil(k x 28 / 12) as the record's: 3 then 2 multi-token weights in stages 0 and 1,
# the LR steps past 1/12, 2/12, 3/12 (the last one step after its stage), the split after step 5, YaRN while the long
# window is at most 3 blocks and then fixed; two sequences per step.
TINY = dict(
    train_files="data/sample/sample_train_*.bin", val_files="data/sample/sample_val_*.bin",
    val_tokens=4096, val_seq_len=1024, val_every=10,
    train_steps=30, extension_steps=2, stage_steps=(0, 3, 5, 7, 10, 12, 14, 17, 19),
    stage_batch_tokens=(256, 512, 768) + (1024,) * 6, stage_seq_len=(128, 256, 384) + (512,) * 6, stage_max_doc_len=(256,) * 9,
    stage_short_window_blocks=(1, 1, 1, 1, 1, 2, 2, 2, 2), stage_long_window_blocks=(1, 2, 2, 3, 3, 3, 4, 4, 4),
    final_long_window_blocks=6, yarn_max_window_blocks=3, muon_momentum_warmup_steps=6, muon_momentum_cooldown_steps=4,
    model_dim=64, num_heads=2, head_dim=32,
    compile=False, warmup_steps=0,
)

PRESETS = {"record": {}, "tiny": TINY}

BLOCK_SIZE = 128  # FlexAttention block: sequence lengths and windows are counted in these
VAL_HEAD_CHUNK = 32_768  # validation tokens per head call: fp32 logits of 6.6 GB at vocab 50304
EOT_TOKEN = 50256  # <|endoftext|>, which starts every document


class ConfigError(Exception):
    """A setting that cannot work; the message is one line and says which rule it breaks."""


def parse_int_tuple(text: str) -> tuple:
    text = text.strip()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip()) if text else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_float_tuple(text: str) -> tuple:
    text = text.strip()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip()) if text else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


TUPLE_PARSERS = {"ints": parse_int_tuple, "floats": parse_float_tuple}
TUPLE_METAVARS = {"ints": "I,J,...", "floats": "X,Y,..."}


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def format_default(value) -> str:
    """A default as the flag takes it: 1,2,3 for a tuple, '' for an empty one."""
    if isinstance(value, tuple):
        return ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value) or "''"
    return repr(value) if isinstance(value, str) else str(value)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="train_gpt.py", description="Train GPT-2 medium to 2.92 (track 2). No flags = the 8xH100 record configuration.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="record",
                        help="starting values: 'record' (8xH100 FineWeb: public record #18's recipe), 'tiny' (the same "
                             "structure at CPU size, on data/sample/); flags override (default: record)")
    parser.add_argument("--print-recipe", action="store_true", default=argparse.SUPPRESS,
                        help="print the init, storage, optimizer, LR, betas and weight decay of every parameter under these settings, then exit")
    parser.add_argument("--print-schedule", action="store_true", default=argparse.SUPPRESS,
                        help="print the schedule as one JSON line per step 0..train_steps, then exit (no data, no GPU)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata["help"] + f" (default: {format_default(default)})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, tuple):
            kind = f.metadata.get("parse", "ints")
            parser.add_argument(flag, type=TUPLE_PARSERS[kind], default=argparse.SUPPRESS, metavar=TUPLE_METAVARS[kind], help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=type(default).__name__.upper(), help=help_text)
    return parser


def parse_command(argv=None) -> tuple:
    """(config, report): preset values first, then every flag given; report names what to print instead of
    training ('recipe' or 'schedule'), or is None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_arg_parser().parse_args(argv))
    preset = args.pop("preset")
    report = next((name for name in ("recipe", "schedule") if args.pop(f"print_{name}", False)), None)
    return dataclasses.replace(Config(), **{**PRESETS[preset], **args}), report


def parse_config(argv=None) -> Config:
    return parse_command(argv)[0]


def check_config(cfg: Config, world_size: int) -> int:
    """Refuse impossible settings with a one-line reason; returns the first stage's gradient accumulation steps."""
    positive = ["val_tokens", "val_seq_len", "train_steps", "vocab_size", "num_layers", "model_dim", "num_heads",
                "head_dim", "mlp_ratio"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_name(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.val_seq_len % BLOCK_SIZE:
        raise ConfigError(f"--val-seq-len {cfg.val_seq_len} must be a multiple of {BLOCK_SIZE} (attention block size)")
    check_stage_batches(cfg, world_size)
    # Validation sequences are dealt to ranks round-robin (a rank may get one fewer), so any world size
    # scores the same sequences; only whole sequences are scored.
    if cfg.val_tokens % cfg.val_seq_len:
        raise ConfigError(f"--val-tokens {cfg.val_tokens} is not a whole number of --val-seq-len {cfg.val_seq_len} "
                          f"sequences (record: 10,485,760 = 40 x 262,144)")
    if cfg.num_heads * cfg.head_dim != cfg.model_dim:
        raise ConfigError(f"--num-heads {cfg.num_heads} x --head-dim {cfg.head_dim} must equal --model-dim {cfg.model_dim}")
    if cfg.head_dim % 4:
        raise ConfigError(f"--head-dim {cfg.head_dim} must be a multiple of 4 (rotary halves and quarters)")
    check_layer_lists(cfg)
    if not 0 < cfg.gate_dim <= cfg.model_dim:
        raise ConfigError(f"--gate-dim {cfg.gate_dim} must be in 1..{cfg.model_dim}")
    if cfg.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device {cfg.device!r}: choose cuda or cpu")
    if not 0 <= cfg.normuon_beta2 < 1:
        raise ConfigError(f"--normuon-beta2 {cfg.normuon_beta2} must be in [0, 1)")
    if cfg.val_every < 0 or cfg.warmup_steps < 0 or cfg.muon_momentum_warmup_steps < 0:
        raise ConfigError("--val-every, --warmup-steps and --muon-momentum-warmup-steps must be >= 0")
    check_hyperparameter_ranges(cfg)
    check_run_names(cfg)
    return accumulation_steps(cfg.stage_batch_tokens[0], cfg.stage_seq_len[0], world_size)


def check_layer_lists(cfg: Config):
    """Every layer list names existing layers, and the skips and value-embedding tables make sense."""
    for name in ["long_window_layers", "skip_from_layers", "skip_to_layers"]:
        bad = [i for i in getattr(cfg, name) if not 0 <= i < cfg.num_layers]
        if bad:
            raise ConfigError(f"{flag_name(name)} {','.join(map(str, bad))}: layers are numbered 0..{cfg.num_layers - 1}")
    if not -1 <= cfg.backout_layer < cfg.num_layers:
        raise ConfigError(f"--backout-layer {cfg.backout_layer}: layers are numbered 0..{cfg.num_layers - 1} (-1: none)")
    if len(cfg.value_embed_tables) != cfg.num_layers or min(cfg.value_embed_tables, default=-1) < -1:
        raise ConfigError(f"--value-embed-tables: one table index (or -1) per layer, {cfg.num_layers} of them, "
                          f"got {','.join(map(str, cfg.value_embed_tables))}")
    tables = sorted({t for t in cfg.value_embed_tables if t >= 0})
    if tables != list(range(len(tables))):
        raise ConfigError(f"--value-embed-tables: tables are numbered 0..N-1 with each used, got {tables}")
    pairs = list(zip(cfg.skip_from_layers, cfg.skip_to_layers))
    if len(cfg.skip_from_layers) != len(cfg.skip_to_layers) or any(a >= b for a, b in pairs):
        raise ConfigError(f"--skip-from-layers {','.join(map(str, cfg.skip_from_layers))} and --skip-to-layers "
                          f"{','.join(map(str, cfg.skip_to_layers))}: one FROM < TO pair per skip")
    if len(set(cfg.skip_to_layers)) != len(cfg.skip_to_layers):
        raise ConfigError(f"--skip-to-layers {','.join(map(str, cfg.skip_to_layers))}: at most one skip lands before a layer")


def check_stage_batches(cfg: Config, world_size: int):
    """Every stage's global batch must be whole sequences on every process, so that any world size trains
    on the same sequences (the accumulation steps may differ between stages)."""
    for stage, (batch, seq_len) in enumerate(zip(cfg.stage_batch_tokens, cfg.stage_seq_len)):
        per_step = world_size * seq_len
        if seq_len <= 0 or batch % per_step:
            sequences = batch // seq_len if seq_len > 0 else batch
            raise ConfigError(
                f"stage {stage}: world size {world_size} x --stage-seq-len {seq_len} = {per_step} tokens does not divide "
                f"its --stage-batch-tokens {batch}: each step must be whole sequences on every process "
                f"(use a world size that divides its {sequences} sequences, or shorter --stage-seq-len)")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_hyperparameter_ranges(cfg: Config):
    """Values outside these ranges train nothing useful (or diverge) without any error of their own."""
    for name in ["muon_lr", "adam_lr", "scalar_lr", "adam_eps", "attn_scale", "logit_cap", "logit_div", "gpu_peak_tflops"]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag_name(name)} must be a positive number, got {value}")
    for name in ["muon_momentum", "muon_momentum_start"]:
        value = getattr(cfg, name)
        if not 0 <= value < 1:  # a beta of 1 never forgets, above 1 the moving average grows without bound
            raise ConfigError(f"{flag_name(name)} {value} must be in [0, 1)")
    for name in ["final_lr_frac", "cooldown_frac", "mtp_frac"]:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{flag_name(name)} {getattr(cfg, name)} must be in [0, 1]")
    if cfg.save_every < 0:
        raise ConfigError(f"--save-every {cfg.save_every} must be >= 0 (0: no checkpoints)")


def check_run_names(cfg: Config):
    """--run-id names a file inside --log-dir and --checkpoint-dir: a path in it would write elsewhere."""
    run_id = cfg.run_id
    if any(sep in run_id for sep in ("/", "\\", os.sep, "\0")) or ".." in run_id or run_id.startswith("."):
        raise ConfigError(f"--run-id {run_id!r} must be a plain file name (no '/', no '..', not starting with '.'); "
                          f"choose the folder with --log-dir")


# -----------------------------------------------------------------------------
# Model: record #18's GPT-2 medium. Every layer has QK-normed, half-truncated rotary attention (key offset on the
# long-window layers, per-head output and value gates) and a ReLU^2 MLP; two input embeddings (the first is the
# head's matrix until the split), smear, 5 value-embedding tables shared by layers 0-4 and 11-15, three gated U-net
# skips, a layer-11 backout, and a bf16 head squashed by 23 sigmoid((z + 5) / 7.5).


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_frequencies(head_dim: int) -> Tensor:
    """Half-truncated RoPE: a quarter of the frequencies are zero, so half of each head is position-free."""
    quarter = head_dim // 4
    freqs = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
    return torch.cat([freqs, freqs.new_zeros(quarter)])


def yarn_frequencies(freqs: Tensor, windows: list, alpha: float = 1.0, beta: float = 32.0) -> Tensor:
    """YaRN at each change of the long window, old -> new (in tokens): a frequency that turns fewer than alpha
    times over the old window is slowed by old/new (positions in the new window look like positions in the old
    one), one that turns more than beta times is kept (local detail), and a ramp blends the two in between.
    Successive changes compound, each measured with the frequencies it finds (the record's Yarn.apply)."""
    for old, new in zip(windows, windows[1:]):
        if new != old:
            rotations = old * freqs / (2 * math.pi)
            ramp = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
            scaling = old / new
            freqs = freqs * (scaling + ramp * (1 - scaling))
    return freqs


class Rotary(nn.Module):
    """One cos/sin table for every layer, positions 0..max_positions-1, stored in bf16 as the record's (its
    rotation then runs in the activations' dtype: bf16 on GPUs)."""

    def __init__(self, head_dim: int, max_positions: int):
        super().__init__()
        theta = torch.outer(torch.arange(max_positions, dtype=torch.float32), rotary_frequencies(head_dim))
        self.register_buffer("cos", theta.cos().bfloat16(), persistent=False)
        self.register_buffer("sin", theta.sin().bfloat16(), persistent=False)

    def set_frequencies(self, freqs: Tensor):
        """Rebuild the tables in place (YaRN): compiled code reads the same buffers, nothing recompiles."""
        positions = torch.arange(self.cos.size(0), dtype=torch.float32, device=self.cos.device)
        theta = torch.outer(positions, freqs.to(self.cos.device))
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split RoPE of (B, T, H, D) x by tables broadcastable to (B, T, H, D/2), in x's dtype (bf16 tables)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


# Each parameter carries the init it was created with as a string (`init`), which --print-recipe shows.
def tagged(param: nn.Parameter, init: str) -> nn.Parameter:
    param.init = init
    return param


def uniform_(param: Tensor, std: float) -> Tensor:
    """Uniform with the given std (bound sqrt(3) std): the record's init of the matrices Muon trains."""
    return param.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)


def zeros_param(*shape: int) -> nn.Parameter:
    return tagged(nn.Parameter(torch.zeros(shape)), "zeros")


def constant_param(value: float, *shape: int) -> nn.Parameter:
    return tagged(nn.Parameter(torch.full(shape, value)), f"{value:.4g}")


def normal_param(std: float, *shape: int) -> nn.Parameter:
    return tagged(nn.Parameter(torch.empty(shape).normal_(0, std)), f"N(0,{std:g})")


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | Tensor) -> Tensor:
    """(B, T, H, D) in and out. A BlockMask runs FlexAttention; a dense bool mask runs SDPA (the CPU path).
    scale: a 0-d tensor (YaRN: a new value each stage is data, not a recompile)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        # the kernel scales q.k by 1 then by the tensor: the same fp32 product
        y = flex(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score * scale, block_mask=mask, scale=1.0)
    else:
        q = q * scale.to(q.dtype)  # SDPA takes a float: scale q instead (equal up to rounding)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return y.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    # FlexAttention is only fast compiled; without torch.compile it materializes the full score matrix.
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def gate(x: Tensor, gate_w: Tensor) -> Tensor:
    """sigmoid(W x[:gate_dim]): a gate per output row of W from the leading channels of x."""
    return torch.sigmoid(F.linear(x[..., : gate_w.size(-1)], gate_w.type_as(x)))


class CausalSelfAttention(nn.Module):
    """QK-normed rotary attention with a sigmoid output gate per head. Q, K, V and O are one (4 dim, dim) matrix,
    qkvo_w, rows Q, K, V, O (the record's layout; Muon orthogonalizes the four apart); the SA lambdas scale the QKV
    product and the output projection. value_gated: the layer's value embedding enters V through a per-head gate
    2*sigmoid(W x[:16]) (the record's gate reads x only). key_offset: see offset_position_free_dims."""

    def __init__(self, cfg: Config, value_gated: bool, key_offset: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.dim = cfg.num_heads, cfg.head_dim, cfg.model_dim
        self.register_buffer("scale", torch.tensor(cfg.attn_scale), persistent=False)  # YaRN changes it per stage
        self.qkvo_w = tagged(nn.Parameter(torch.zeros(4 * cfg.model_dim, cfg.model_dim)), f"QKV U(std {cfg.model_dim ** -0.5:.4g}), O zeros")
        with torch.no_grad():
            uniform_(self.qkvo_w[: 3 * cfg.model_dim], cfg.model_dim ** -0.5)
        self.gate_w = zeros_param(cfg.num_heads, cfg.gate_dim)  # output gate per head, sigmoid(0) = 0.5 at init
        self.value_gate_w = zeros_param(cfg.num_heads, cfg.gate_dim) if value_gated else None  # 2 sigmoid(0) = 1
        self.key_offset = key_offset

    def forward(self, x: Tensor, value_embed: Tensor | None, mask, cos: Tensor, sin: Tensor, sa_lambdas: Tensor) -> Tensor:
        B, T = x.shape[:2]
        qkv_w = sa_lambdas[0] * self.qkvo_w[: 3 * self.dim].type_as(x)  # cast, then scaled: the record's order
        q, k, v = F.linear(x, qkv_w).view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        rope = cos[None, :T, None, :], sin[None, :T, None, :]
        q, k = rotate(rms_norm(q), *rope), rotate(rms_norm(k), *rope)
        if self.key_offset:
            k = offset_position_free_dims(k)
        if value_embed is not None:
            v = v + 2 * gate(x, self.value_gate_w).unsqueeze(-1) * value_embed.view_as(v)
        y = attend(q, k, v, mask, self.scale)
        y = (y * gate(x, self.gate_w).unsqueeze(-1)).reshape(B, T, -1)
        return F.linear(y, sa_lambdas[1] * self.qkvo_w[3 * self.dim :].type_as(y))


def offset_position_free_dims(k: Tensor) -> Tensor:
    """(B, T, H, D) keys: the dims RoPE leaves unrotated (its zero frequencies: the second quarter of each half)
    take the previous token's values, so a query matching them finds the token AFTER a match: one-layer induction.
    Token 0 keeps its own; a document's first token takes the previous document's last (as the record)."""
    D = k.size(-1)
    free = torch.zeros(D, dtype=torch.bool, device=k.device)
    free[D // 4 : D // 2] = free[3 * D // 4 :] = True
    shifted = torch.cat([k[:, :1], k[:, :-1]], dim=1)
    return torch.where(free, shifted, k)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.model_dim
        # Both matrices stored (hidden, dim), the record's layout: c_proj is used transposed
        self.fc_w = tagged(nn.Parameter(uniform_(torch.empty(hidden, cfg.model_dim), 0.5 * cfg.model_dim ** -0.5)),
                           f"U(std {0.5 * cfg.model_dim ** -0.5:.4g})")
        self.proj_w = zeros_param(hidden, cfg.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.fc_w.type_as(x))).square(), self.proj_w.T.type_as(x))


class Block(nn.Module):
    """The stream is first rescaled and mixed with the two normed embeddings, x <- resid x + l0 x0 + l1 x02 (layer 0,
    whose stream is x0: (resid + l0) x + l1 x02), then x <- x + attn(norm(x)), x <- x + mlp(norm(x))."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.first = layer == 0
        self.attn = CausalSelfAttention(cfg, cfg.value_embed_tables[layer] >= 0,
                                        cfg.key_offset and layer in cfg.long_window_layers)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, x0: Tensor, x02: Tensor, value_embed: Tensor | None, mask, cos: Tensor, sin: Tensor,
                resid: Tensor, x0_lambdas: Tensor, sa_lambdas: Tensor) -> Tensor:
        if self.first:
            x = (resid + x0_lambdas[0]) * x + x0_lambdas[1] * x02
        else:
            x = resid * x + x0_lambdas[0] * x0 + x0_lambdas[1] * x02
        x = x + self.attn(rms_norm(x), value_embed, mask, cos, sin, sa_lambdas)
        return x + self.mlp(rms_norm(x))


def smear_previous_token(x: Tensor, gate_w: Tensor, smear_lambda: Tensor) -> Tensor:
    """(T, D) embeddings: token t adds lambda*sigmoid(W x_t[:16]) times token t-1's (across document boundaries, as
    the record); token 0 is unchanged."""
    return torch.cat([x[:1], x[1:] + smear_lambda * gate(x[1:], gate_w) * x[:-1]])


def document_ids(input_ids: Tensor) -> Tensor:
    return (input_ids == EOT_TOKEN).cumsum(0)


def window_tensor(window: int | Tensor, device: torch.device) -> Tensor:
    """A window as a 0-d device tensor, so a new window never recompiles code that reads it."""
    return window if isinstance(window, Tensor) else torch.full((), window, dtype=torch.int64, device=device)


def token_window_mask(input_ids: Tensor, window_tokens: int | Tensor) -> Tensor:
    """(T, T) bool, FlashAttention-3's causal window (W, 0) per document, the record's varlen call: query i sees key
    j of its document when i - W <= j <= i, W + 1 keys with itself."""
    docs = document_ids(input_ids)
    pos = torch.arange(input_ids.numel(), device=input_ids.device)
    behind = pos[:, None] - pos[None, :]
    return (behind >= 0) & (behind <= window_tokens) & (docs[:, None] == docs[None, :])


def flex_token_window_mask(input_ids: Tensor, window_tokens: int | Tensor) -> BlockMask:
    """token_window_mask as a FlexAttention BlockMask. A block pair is listed when some pair of its positions is
    causal and in the window and the documents could meet; it is full (no mask_mod) when every pair is, inside
    one document."""
    docs = document_ids(input_ids)
    num_blocks = input_ids.numel() // BLOCK_SIZE
    first_doc, last_doc = docs[0::BLOCK_SIZE], docs[BLOCK_SIZE - 1 :: BLOCK_SIZE]
    window = window_tensor(window_tokens, input_ids.device)
    start = torch.arange(num_blocks, device=input_ids.device) * BLOCK_SIZE
    q_start, kv_start = start[:, None], start[None, :]
    q_end, kv_end = q_start + BLOCK_SIZE - 1, kv_start + BLOCK_SIZE - 1
    visible = (kv_start <= q_end) & (kv_end >= q_start - window) & (last_doc[None, :] >= first_doc[:, None])
    single_doc = first_doc == last_doc
    full = ((kv_end <= q_start) & (kv_start >= q_end - window) & single_doc[:, None] & single_doc[None, :]
            & (first_doc[:, None] == first_doc[None, :]))
    partial = visible & ~full

    def causal_window_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window) & (docs[q_idx] == docs[kv_idx])

    def ordered(blocks: Tensor):
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None].contiguous(), indices[None, None].contiguous()

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=causal_window_same_document)


def softcap_logits(z: Tensor, cap: float, shift: float, div: float) -> Tensor:
    """cap*sigmoid((z + shift)/div), bounded in (0, cap): 23*sigmoid((z + 5)/7.5) starts every logit at
    23*sigmoid(2/3)."""
    return cap * torch.sigmoid((z + shift) / div)


def head_loss(x: Tensor, head_w: Tensor, targets: Tensor, logit_cap: float, logit_shift: float, logit_div: float,
              mtp_weights: Tensor | None = None, fp32_logits: bool = False) -> Tensor:
    """Summed cross-entropy of the softcapped head logits. Training keeps them in the activations' dtype (bf16 on
    GPUs: the record's bf16 head, squash and loss); validation (fp32_logits) squashes and scores them in fp32.
    mtp_weights set: the multi-token loss."""
    logits = F.linear(x, head_w.type_as(x))
    if fp32_logits:
        logits = logits.float()
    logits = softcap_logits(logits, logit_cap, logit_shift, logit_div)
    if mtp_weights is None:
        return F.cross_entropy(logits, targets, reduction="sum").float()
    return multi_token_cross_entropy(logits, targets, mtp_weights)


def multi_token_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Multi-token prediction: the logits of position r predict targets r, r+1, ..., r+n-1 (the tokens 1..n ahead)
    with weights w_0..w_{n-1}, summed over positions; a term whose target lies past the sequence's end is dropped
    (the record zeroes it), and terms cross document boundaries, as the record's. One log-sum-exp per row serves
    every term."""
    log_normalizer = torch.logsumexp(logits, dim=-1)
    length, total = logits.size(0), torch.zeros((), dtype=torch.float32, device=logits.device)
    for k in range(weights.numel()):  # the number of weights is a shape, fixed within a stage
        predicted = logits[: length - k].gather(1, targets[k:, None]).squeeze(1)
        total = total + (weights[k] * (log_normalizer[: length - k] - predicted)).sum()
    return total


def equal_chunk(length: int, most: int) -> int:
    """The largest chunk size <= most that splits length into equal parts."""
    parts = -(-length // most)
    while length % parts:
        parts += 1
    return length // parts


def allow_block_variants(limit: int):
    """Dynamo compiles one graph per variant of a function (per guard set) and, past its recompile limit (8 by
    default), runs further variants EAGERLY without an error. Blocks vary by kind (value embedding or not, key
    offset or not, layer 0), by grad mode and by sequence length (one per stage): more than the default limit.
    The limit only caps how many graphs dynamo keeps; it changes no generated code (this is not an inductor option)."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    else:  # PyTorch < 2.6
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, limit)


class GPT(nn.Module):
    """The record's model (recipe() names its parameters). The schedule says which windows, multi-token weights and
    YaRN stage each forward uses, and whether the head's matrix is still the input embedding."""

    def __init__(self, cfg: Config, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        num_tables = max(cfg.value_embed_tables, default=-1) + 1
        D, V, L = cfg.model_dim, cfg.vocab_size, cfg.num_layers
        self.lm_head_w = normal_param(cfg.head_init_std, V, D)
        # nn.Embedding's N(0, 1) as the record; never read before the split, which overwrites it with the head
        self.embed = nn.Embedding(V, D)
        tagged(self.embed.weight, f"N(0,1), the head's copy at the split")
        self.embed2 = nn.Embedding(V, D)  # the second input embedding, N(0, 1)
        tagged(self.embed2.weight, "N(0,1)")
        self.value_embeds = nn.ModuleList(nn.Embedding(V, D) for _ in range(num_tables))
        for table in self.value_embeds:
            tagged(nn.init.zeros_(table.weight), "zeros")
        self.smear_gate = zeros_param(1, cfg.gate_dim)
        self.skip_gates = nn.ParameterList(zeros_param(1, cfg.gate_dim) for _ in cfg.skip_to_layers)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.rotary = Rotary(cfg.head_dim, max_seq_len)
        # the record's `scalars` bank, by name; its x0 lambdas apart (another Adam row)
        self.resid_lambdas = constant_param(cfg.resid_lambda_init, L)  # the stream grows ~1.05x a layer
        self.sa_lambdas = tagged(nn.Parameter(torch.tensor([[0.5, 1.0]] * L)), "[0.5,1]")  # QKV and O scales
        self.x0_lambdas = zeros_param(L, 2)  # per layer: x0 (the first embedding) and x02 (the second)
        self.smear_lambda = zeros_param()
        self.backout_lambda = constant_param(0.5)
        self.skip_lambdas = constant_param(-1.5, len(cfg.skip_to_layers))  # sigmoid(-1.5) ~ 0.18
        self.yarn_windows = None  # the long windows YaRN has been applied for
        self.compute_dtype = torch.float32
        self.use_flex = False
        self.mtp_weight_table = None  # set by the trainer: every step's multi-token weights on the device
        self.head_loss = head_loss
        self.block_calls = [block.__call__ for block in self.blocks]

    def compile_regions(self):
        """Compile one block's code (reused by every layer with the same structure) and the head, not the
        whole model: far less compile time for the same kernels."""
        allow_block_variants(64)
        self.block_calls = [torch.compile(block, dynamic=False) for block in self.blocks]
        self.head_loss = torch.compile(head_loss, dynamic=False)

    @torch.no_grad()
    def apply_yarn(self, schedule: StepSchedule):
        """Bring RoPE and the attention scale to the schedule's stage: YaRN over the long windows of the stages so
        far, up to --yarn-max-window-blocks (the record: up to 13; the wider windows after, and the final
        validation's, change neither). A pure function of the stage, applied only when it changes."""
        windows = yarn_windows(schedule.stage, self.cfg)
        if windows == self.yarn_windows:
            return
        self.rotary.set_frequencies(yarn_frequencies(rotary_frequencies(self.cfg.head_dim), list(windows)))
        for block in self.blocks:
            block.attn.scale.fill_(schedule.attn_scale)
        self.yarn_windows = windows

    def embedding_table(self, schedule: StepSchedule) -> Tensor:
        """While the schedule ties them (up to the split step) the head's matrix is the embedding table, so both
        uses train it and embed.weight gets no gradient; the trainer copies the head into it at the split."""
        return self.lm_head_w if schedule.embed_tied else self.embed.weight

    def stem(self, input_ids: Tensor, table: Tensor) -> tuple:
        """(x0, x02, each layer's value embedding or None): x0 the smeared first embedding, normed; x02 the second
        embedding, normed."""
        x = F.embedding(input_ids, table).to(self.compute_dtype)
        x0 = rms_norm(smear_previous_token(x, self.smear_gate, self.smear_lambda)[None])
        x02 = rms_norm(self.embed2(input_ids).to(self.compute_dtype)[None])
        tables = [table(input_ids).to(self.compute_dtype)[None] for table in self.value_embeds]
        return x0, x02, [tables[t] if t >= 0 else None for t in self.cfg.value_embed_tables]

    def layers(self, x0: Tensor, x02: Tensor, value_embeds: list, masks: list) -> Tensor:
        """The blocks in order, the U-net skips (layer skip_to[k] first adds sigmoid(lambda_k) 2 sigmoid(W_k x0[:16])
        times layer skip_from[k]'s output), then the backout: lambda times layer 11's output is taken out of the
        stream, which is normed for the head."""
        cfg = self.cfg
        rope = self.rotary.cos, self.rotary.sin
        skip_into = {to: k for k, to in enumerate(cfg.skip_to_layers)}
        saved, x, backout = {}, x0, None
        for i, block_call in enumerate(self.block_calls):
            if i in skip_into:
                k = skip_into[i]
                x = x + torch.sigmoid(self.skip_lambdas[k]) * 2 * gate(x0, self.skip_gates[k]) * saved[cfg.skip_from_layers[k]]
            x = block_call(x, x0, x02, value_embeds[i], masks[i], *rope, self.resid_lambdas[i], self.x0_lambdas[i], self.sa_lambdas[i])
            if i in cfg.skip_from_layers:
                saved[i] = x
            if i == cfg.backout_layer:
                backout = x
        if backout is not None:
            x = x - self.backout_lambda * backout
        return rms_norm(x[0])

    def attention_masks(self, input_ids: Tensor, schedule: StepSchedule) -> list:
        """Each layer's mask for the schedule's long and short windows (in tokens)."""
        build = flex_token_window_mask if self.use_flex else token_window_mask
        long_mask = build(input_ids, window_tensor(schedule.window_long_tokens, input_ids.device))
        short_mask = build(input_ids, window_tensor(schedule.window_short_tokens, input_ids.device))
        return [long_mask if i in self.cfg.long_window_layers else short_mask for i in range(self.cfg.num_layers)]

    def step_mtp_weights(self, schedule: StepSchedule) -> Tensor:
        """The step's multi-token weights on the device: a row of the trainer's table, because a new tensor each
        step is a copy from pageable host memory, which waits for the GPU's queue to drain."""
        if self.mtp_weight_table is None:
            return torch.tensor(schedule.mtp_weights, dtype=torch.float32, device=self.lm_head_w.device)
        return self.mtp_weight_table[schedule.step, : len(schedule.mtp_weights)]

    def forward(self, input_ids: Tensor, targets: Tensor, schedule: StepSchedule) -> Tensor:
        """input_ids, targets: (T,) one packed sequence. Returns the summed cross-entropy over its tokens (in
        training with the schedule's multi-token weights)."""
        self.apply_yarn(schedule)
        masks = self.attention_masks(input_ids, schedule)
        x0, x02, value_embeds = self.stem(input_ids, self.embedding_table(schedule))
        x = self.layers(x0, x02, value_embeds, masks)
        cfg = self.cfg
        squash = (cfg.logit_cap, cfg.logit_shift, cfg.logit_div)
        if self.training:
            weights = self.step_mtp_weights(schedule) if len(schedule.mtp_weights) > 1 else None
            return self.head_loss(x, self.lm_head_w, targets, *squash, mtp_weights=weights)
        # Validation: fp32 logits, in equal chunks of at most VAL_HEAD_CHUNK tokens (one compiled shape) so a
        # 262,144-token sequence never holds its (tokens x vocab) logits at once.
        chunk = equal_chunk(x.size(0), VAL_HEAD_CHUNK)
        return sum(self.head_loss(x_part, self.lm_head_w, t_part, *squash, fp32_logits=True)
                   for x_part, t_part in zip(x.split(chunk), targets.split(chunk)))

    def matmul_flops_per_token(self, window_tokens: int, seq_len: int) -> float:
        """Forward+backward matmul FLOPs per token: 6 per weight of a matmul, plus attention scores and
        values over the mean visible context (half the window, causal)."""
        cfg = self.cfg
        weights = sum(p.numel() for p in self.blocks.parameters() if p.ndim >= 2) + self.lm_head_w.numel()
        context = sum(min(window_tokens if i in cfg.long_window_layers else window_tokens // 2, seq_len) / 2
                      for i in range(cfg.num_layers))
        return 6 * weights + 12 * cfg.num_heads * cfg.head_dim * context


# -----------------------------------------------------------------------------
# Optimizer: the recipe table, then NorMuon for the block matrices and gates and Adam for the rest, sharded without DDP.


@dataclass(frozen=True)
class ParamRule:
    """One row of the recipe: parameters whose name matches `pattern` (fnmatch) are stored in `dtype` and trained by
    `optimizer` at the LR of Config field `lr` times `lr_mult`, with Adam's `betas`, the optimizer's weight decay
    times `wd_mult`. Muon also scales each matrix's LR by sqrt(max(1, rows / cols)) of the STORED shape (the
    record's: 2 for every (4096, 1024) block matrix, Q, K, V and O included), and cuts the parameter into
    `matrices`: "stored" (as it is) or "quarters" (four equal row blocks, the record's Q, K, V, O). split_product:
    Polar Express rounds B X to bf16 before adding a X (the record's split_baddbmm for its MLP matrices), instead of
    one rounding of a X + B X."""
    pattern: str
    optimizer: str
    lr: str
    lr_mult: float = 1.0
    betas: tuple = ()
    wd_mult: float = 1.0
    dtype: str = "bf16"
    matrices: str = "stored"
    split_product: bool = False


# Record #18's table (its labels, lr_mul and wd_mul, and its three optimizers: NorMuon lr 0.015 wd 1.2; Adam lr 0.004
# betas (0.8, 0.95); a second Adam for the scalars, lr 0.008 betas (0.9, 0.99); Adam wd 0.005 in both), keyed by
# this model's names. The record keeps nn.Embedding and nn.Linear weights (tables, head, gates) in bf16 and the
# rest in fp32. A parameter no row matches is refused, so a renamed parameter cannot silently fall back.
HEAD, EMBED = "lm_head_w", "embed.weight"  # tied until the split step: DistributedAdam.tie


def recipe(cfg: Config) -> list:
    """Which parameter gets which storage, optimizer, LR, betas and decay: the first matching row wins."""
    muon, adam = "muon", "adam"
    return [
        ParamRule("blocks.*.attn.qkvo_w", muon, "muon_lr", dtype="fp32", matrices="quarters"),
        ParamRule("blocks.*.mlp.fc_w", muon, "muon_lr", dtype="fp32", split_product=True),
        ParamRule("blocks.*.mlp.proj_w", muon, "muon_lr", 2.0, dtype="fp32", split_product=True),
        ParamRule("blocks.*.attn.gate_w", muon, "muon_lr", 0.1),           # the record's attn_gate
        ParamRule("blocks.*.attn.value_gate_w", muon, "muon_lr", 0.1),     # its value_embed_gate
        ParamRule(HEAD, adam, "adam_lr", 1.0, (0.8, 0.95), wd_mult=150.0),
        ParamRule(EMBED, adam, "adam_lr", 1.0, (0.8, 0.95), wd_mult=150.0),
        ParamRule("embed2.weight", adam, "adam_lr", 75.0, (0.8, 0.95), wd_mult=5.0),
        ParamRule("value_embeds.*", adam, "adam_lr", 75.0, (0.8, 0.95), wd_mult=5.0),
        ParamRule("smear_gate", adam, "adam_lr", 0.01, (0.8, 0.95), wd_mult=0.0),
        ParamRule("skip_gates.*", adam, "adam_lr", 0.01, (0.8, 0.95), wd_mult=0.0),
        ParamRule("x0_lambdas", adam, "adam_lr", 5.0, (0.8, 0.95), wd_mult=0.0, dtype="fp32"),
        # the record's `scalars` bank and its own Adam
        ParamRule("*_lambda*", adam, "scalar_lr", 5.0, (0.9, 0.99), wd_mult=0.0, dtype="fp32"),
    ]


@dataclass(frozen=True)
class ParamSetting:
    name: str
    param: Tensor
    optimizer: str
    lr: float            # base LR x multiplier
    shape_factor: float  # Muon's sqrt(max(1, rows/cols)) of the stored shape; 1 for Adam
    base_lr: float = 0.0          # the Config base LR (Muon's decay scales with it)
    betas: tuple = ()             # Adam only
    weight_decay: float = 0.0     # the optimizer's decay x the row's multiplier
    matrix_shape: tuple = ()      # Muon: the (rows, cols) of the matrices it orthogonalizes
    dtype: str = "bf16"
    split_product: bool = False   # Muon: Polar Express's split rounding (ParamRule)

    @property
    def effective_lr(self) -> float:
        return self.lr * self.shape_factor


def muon_shape_factor(shape: tuple) -> float:
    rows, cols = shape[-2:]
    return max(1.0, rows / cols) ** 0.5


def muon_matrix_shape(shape: tuple, rule: ParamRule) -> tuple:
    """The (rows, cols) of the matrices Muon sees in a parameter of this shape."""
    rows, cols = shape[-2:]
    if rule.matrices == "stored":
        return (rows, cols)
    if rule.matrices == "quarters":
        return (rows // 4, cols)
    raise ValueError(f"recipe row {rule.pattern}: unknown matrices {rule.matrices!r}")


def assign_params(model: nn.Module, cfg: Config) -> list:
    """Apply the recipe to every parameter of the model; a parameter no row matches is a bug, not a default."""
    rules = recipe(cfg)
    settings = []
    for name, p in model.named_parameters():
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None:
            raise ValueError(f"no recipe row matches parameter {name}")
        if rule.optimizer == "muon" and p.ndim < 2:
            raise ValueError(f"recipe row {rule.pattern} gives Muon the {p.ndim}-D parameter {name}")
        base_lr = getattr(cfg, rule.lr)
        lr = base_lr * rule.lr_mult
        if rule.optimizer == "muon":
            matrix_shape = muon_matrix_shape(tuple(p.shape), rule)
            factor, decay = muon_shape_factor(tuple(p.shape)), cfg.muon_weight_decay * rule.wd_mult
        else:
            matrix_shape, factor, decay = (), 1.0, cfg.adam_weight_decay * rule.wd_mult
        settings.append(ParamSetting(name, p, rule.optimizer, lr, factor, base_lr, tuple(rule.betas), decay, matrix_shape,
                                     rule.dtype, rule.split_product))
    return settings


STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def store_as_record(model: nn.Module, cfg: Config) -> nn.Module:
    """Each parameter in its row's storage dtype (round to nearest from the fp32 init), in place: the Parameter
    objects (and their init tags) are kept."""
    for s in assign_params(model, cfg):
        s.param.data = s.param.data.to(STORAGE_DTYPES[s.dtype])
    return model


def layer_ranges(layers: list) -> str:
    """[0, 1, 2, 3, 5, 6] -> '0-3,5-6'"""
    runs = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def optimizer_state_dtypes(s: ParamSetting) -> str:
    """What the optimizer keeps per weight: the record's bf16 Adam moments; Muon's momentum in the gradient's dtype."""
    if s.optimizer == "adam":
        return "m,v:bf16"
    return f"mom:{dtype_name(s.param.dtype)}"


def recipe_report(cfg: Config, model: nn.Module | None = None) -> str:
    """The recipe as applied to this config's model (built on the meta device with the trainer's storage: no memory,
    no data), one line per kind of parameter, with the layers that have it: init, storage dtype, the optimizer's
    state per weight, optimizer, LR, Adam's betas, the weight decay coefficient and Muon's matrix shape. The index
    column lists the layers (blocks), tables (value_embeds) or skips (skip_gates) a line covers."""
    if model is None:
        with torch.device("meta"):
            model = store_as_record(GPT(cfg, max_seq_len(cfg)), cfg)
    try:
        settings = assign_params(model, cfg)
    except ValueError as e:
        raise ConfigError(f"{e} (the recipe table expects this model's parameter names)") from None
    kinds = {}
    for s in settings:
        layer = re.match(r"^\w+\.(\d+)(\.|$)", s.name)  # a layer's, a table's or a skip's index
        name = re.sub(r"^(\w+)\.\d+(\.|$)", r"\1.*\2", s.name)
        shape = "x".join(map(str, s.param.shape)) or "scalar"
        betas = f"{s.betas[0]},{s.betas[1]}" if s.optimizer == "adam" else "-"
        matrix = "x".join(map(str, s.matrix_shape)) if s.optimizer == "muon" else "-"
        storage = (getattr(s.param, "init", "-"), dtype_name(s.param.dtype), optimizer_state_dtypes(s))
        key = (name, shape, *storage, s.optimizer, s.lr, s.shape_factor, s.effective_lr, betas, s.weight_decay, matrix)
        kinds.setdefault(key, []).append(int(layer.group(1)) if layer else None)
    header = (f"{'parameter':26} {'index':>13} {'shape':>10} {'init':>36} {'dtype':>5} {'state':>9}"
              f" {'optimizer':>9} {'lr':>7} {'shape x':>7} {'effective lr':>12} {'betas':>10} {'wd':>7} {'matrix':>9}")
    lines = [header]
    for (name, shape, init, dtype, state, optimizer, lr, factor, effective, betas, decay, matrix), layers in kinds.items():
        where = layer_ranges(layers) if layers[0] is not None else "-"
        lines.append(f"{name:26} {where:>13} {shape:>10} {init:>36} {dtype:>5} {state:>9} {optimizer:>9} {lr:>7.4g}"
                     f" {factor:>7.4g} {effective:>12.4g} {betas:>10} {decay:>7.4g} {matrix:>9}")
    adam = (f"adam: eps {cfg.adam_eps}, bf16 moments, cautious weight decay: wd ({cfg.adam_weight_decay} x the row's multiplier) x effective LR^2"
            + (", odd steps only (even steps' gradients accumulate)" if cfg.adam_odd_steps_only else ""))
    muon = (f"muon: Polar Express (5 steps), Nesterov momentum {cfg.muon_momentum_start} -> {cfg.muon_momentum} over "
            f"{cfg.muon_momentum_warmup_steps} steps, NorMuon beta2 {cfg.normuon_beta2} per row, "
            f"cautious weight decay: wd ({cfg.muon_weight_decay} x the row's multiplier) x base LR x effective LR")
    return "\n".join(lines + [adam, muon])


# Polar Express (Amsel et al. 2025; 5 steps, safety 2e-2, cushion 2), the record's coefficients; the input is
# scaled by 1 / (1.02 |X|_F + 1e-6) so its spectral norm is at most 1.
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def orthogonalize(grads: Tensor, split_product: bool = False) -> Tensor:
    """Approximate U V^T of each (..., rows, cols) matrix in bf16: X <- aX + (bA + cA^2)X with A = XX^T."""
    x = grads.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the short side: A is (min, min)
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        x = polar_step(x, a, b, c, split_product)
    return x.mT if transposed else x


def emulate_bf16_matmul(x: Tensor) -> bool:
    """A CPU without bf16 matrix units runs a bf16 matmul 25-100x slower than fp32, so there the orthogonalizer's
    bf16 products are computed in fp32 from the bf16 operands and rounded to bf16 once: what a GPU's bf16 matmul
    computes (fp32 accumulation, one rounding)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def product(x: Tensor, y: Tensor) -> Tensor:
    return (x.float() @ y.float()).bfloat16() if emulate_bf16_matmul(x) else x @ y


def add_product(acc: Tensor, x: Tensor, y: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """beta acc + alpha x @ y, added in the accumulator and rounded once (baddbmm/addmm, cuBLAS's epilogue)."""
    add = torch.baddbmm if acc.ndim == 3 else torch.addmm
    if emulate_bf16_matmul(acc):
        return add(acc.float(), x.float(), y.float(), beta=beta, alpha=alpha).bfloat16()
    return add(acc, x, y, beta=beta, alpha=alpha)


def polar_step(x: Tensor, a: float, b: float, c: float, split_product: bool = False) -> Tensor:
    """One step rounded to bf16 once per product, as the record's kernels (A = XX^T; B = bA + cA^2; aX + BX);
    split_product: BX rounded, then aX added and rounded again (the record's MLP: no defensive copy of X)."""
    flat = x.reshape(-1, *x.shape[-2:]) if x.ndim > 3 else x
    gram = product(flat, flat.mT)
    poly = add_product(gram, gram, gram, beta=b, alpha=c)
    if split_product:
        return product(poly, flat).add_(flat, alpha=a).view(x.shape)
    return add_product(flat, poly, flat, beta=a).view(x.shape)


class Comm:
    """The few collectives the optimizers need; a world of one copies and does nothing else."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        # the *_single names where this torch has them (the *_tensor ones are deprecated there)
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
        self._all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

    def reduce_scatter_mean(self, out: Tensor, full: Tensor):
        if self.world_size == 1:
            out.copy_(full)
            return None
        return self._reduce_scatter(out, full, op=dist.ReduceOp.AVG, async_op=True)

    def all_reduce_mean(self, tensor: Tensor):
        if self.world_size == 1:
            return None
        return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, async_op=True)

    def all_gather(self, full: Tensor, shard: Tensor):
        if self.world_size == 1:
            full.copy_(shard)
            return None
        return self._all_gather(full, shard, async_op=True)


def wait(handle):
    if handle is not None:
        handle.wait()


class MatrixGroup:
    """Same-shape matrices from several parameters, padded to a multiple of the world size; each rank owns a
    contiguous share and keeps momentum only for it, in the gradients' dtype (the record's: fp32 for the block
    matrices, bf16 for the gates). `decay`: cautious weight decay per unit of effective LR (weight decay x base
    LR). `param_lrs` gives each parameter its own LR (the MLP's output matrices at 2x)."""

    def __init__(self, params: list, shape: tuple, param_lrs: list, comm: Comm, decay: float = 0.0,
                 split_product: bool = False):
        self.params, self.shape, self.decay, self.split_product = params, shape, decay, split_product
        self.views = [m for p in params for m in p.data.view(-1, *shape)]
        per_rank = math.ceil(len(self.views) / comm.world_size)
        self.padded = per_rank * comm.world_size
        self.own = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        self.per_rank = per_rank
        rows, cols = shape
        p0 = params[0]
        view_lrs = [lr for p, lr in zip(params, param_lrs) for _ in range(p.numel() // (rows * cols))]
        view_lrs += [0.0] * (self.padded - len(view_lrs))
        self.own_lrs = torch.tensor(view_lrs[self.own], dtype=torch.float32, device=p0.device).view(-1, 1, 1)
        self.momentum = torch.zeros(per_rank, *shape, dtype=p0.dtype, device=p0.device)
        # NorMuon's second moment: one per row (the mean square over the row's columns), as the record's for every
        # one of its matrices (all stored tall, and its gates by rule)
        self.second_moment = torch.zeros(per_rank, rows, 1, dtype=p0.dtype, device=p0.device)
        self.grad_shard = torch.empty(per_rank, *shape, dtype=p0.dtype, device=p0.device)
        self.gathered = torch.empty(self.padded, *shape, dtype=p0.dtype, device=p0.device)

    def stacked_grads(self) -> Tensor:
        grads = [p.grad.view(-1, *self.shape) for p in self.params]
        pad = self.padded - len(self.views)
        if pad:
            grads.append(grads[0].new_zeros(pad, *self.shape))
        return torch.cat(grads)

    def own_params(self) -> Tensor:
        owned = self.views[self.own]
        pad = self.per_rank - len(owned)
        stacked = torch.stack(owned) if owned else self.views[0].new_zeros(0, *self.shape)
        return torch.cat([stacked, stacked.new_zeros(pad, *self.shape)]) if pad else stacked


def cautious_decay_and_step(param: Tensor, update: Tensor, lr: Tensor, decay_per_lr: Tensor) -> Tensor:
    """param - lr x update, decayed by lr x decay_per_lr only where the update pushes the same way as the weight
    (sign(update) == sign(weight), zeros included), so the decay never fights the gradient. One expression in fp32,
    rounded once into the weight's dtype; a bf16 weight's factors are rounded to bf16 first, as the record's
    wd_tensor.to(p.dtype) and lr_tensor.to(p.dtype)."""
    lr, decay_per_lr = lr.to(param.dtype).float(), decay_per_lr.to(param.dtype).float()
    weight, update = param.float(), update.float()
    agrees = (update * weight) >= 0
    return (weight - weight * agrees * decay_per_lr * lr - update * lr).to(param.dtype)


class GradientReduction:
    """Each optimizer reduces its gradients in units (a group of same-shape matrices, one Adam tensor). A unit's
    reduction starts as soon as its last gradient is final, from a hook during the last backward pass, so
    communication runs under the rest of the backward; reduce_gradients() starts whatever is left. Every rank
    finalizes gradients in the same order, so the collectives line up."""

    def _init_reduction(self, unit_params: list):
        self.unit_of = {id(p): i for i, params in enumerate(unit_params) for p in params}
        self.unit_sizes = [len(params) for params in unit_params]
        self._reset_reduction()

    def _reset_reduction(self):
        n = len(self.unit_sizes)
        self.pending, self.launched, self.ready = [None] * n, [False] * n, [0] * n

    def grad_ready(self, param: Tensor):
        unit = self.unit_of.get(id(param))
        if unit is not None:
            self.ready[unit] += 1
            if self.ready[unit] == self.unit_sizes[unit]:
                self._launch(unit)

    def _launch(self, unit: int):
        if not self.launched[unit]:
            self.pending[unit] = self._start_reduction(unit)
            self.launched[unit] = True

    @torch.no_grad()
    def reduce_gradients(self):
        for unit in range(len(self.unit_sizes)):
            self._launch(unit)


class DistributedMuon(GradientReduction):
    """NorMuon: Nesterov momentum, the update orthogonalized (Polar Express), its rows' scales evened out by NorMuon,
    then applied at each matrix's effective LR with cautious weight decay. Gradients are reduce-scattered so each
    rank averages only the matrices it owns, updates them, and all-gathers the new weights: the bytes of one
    all-reduce, and 1/world_size of the optimizer work. param_lrs: (param, lr, matrix shape, decay, split_product)."""

    def __init__(self, param_lrs: list, comm: Comm, normuon_beta2: float = 0.0):
        groups = {}
        for p, lr, shape, decay, split in param_lrs:
            groups.setdefault((tuple(shape), decay, p.dtype, split), []).append((p, lr))
        self.groups = [MatrixGroup([p for p, _ in entries], shape, [lr for _, lr in entries], comm, decay, split)
                       for (shape, decay, _, split), entries in groups.items()]
        self.comm, self.normuon_beta2 = comm, normuon_beta2
        self._init_reduction([g.params for g in self.groups])

    @torch.no_grad()
    def _start_reduction(self, unit: int):
        group = self.groups[unit]
        return self.comm.reduce_scatter_mean(group.grad_shard, group.stacked_grads())

    @torch.no_grad()
    def step(self, lr_mult: float, momentum: float):
        gathers = []
        for group, handle in zip(self.groups, self.pending):
            wait(handle)
            grad = group.grad_shard
            group.momentum.lerp_(grad, 1 - momentum)
            nesterov = grad.lerp(group.momentum, momentum)
            update = orthogonalize(nesterov, group.split_product)
            if self.normuon_beta2:
                update = self._reduce_variance(group, update)
            lrs = group.own_lrs * lr_mult  # effective LR per matrix, scheduled
            new = cautious_decay_and_step(group.own_params(), update, lrs, torch.tensor(group.decay * lr_mult))
            gathers.append(self.comm.all_gather(group.gathered, new.contiguous()))
        for group, handle in zip(self.groups, gathers):
            wait(handle)
            torch._foreach_copy_(group.views, list(group.gathered[: len(group.views)].unbind(0)))
        self._reset_reduction()

    def _reduce_variance(self, group: MatrixGroup, update: Tensor) -> Tensor:
        """NorMuon as the record has it: the mean square of each row, an EMA of it evens the rows out, and the
        matrix keeps its Frobenius norm. Computed in fp32; the scale is applied in the update's dtype (bf16)."""
        mean_square = update.float().square().mean(-1, keepdim=True)
        count = update.size(-1)
        norm = (mean_square.sum((-2, -1), keepdim=True) * count).sqrt()
        group.second_moment.lerp_(mean_square.to(group.second_moment.dtype), 1 - self.normuon_beta2)
        step = group.second_moment.clamp_min(1e-10).rsqrt().float()
        new_norm = (mean_square * count * step.square()).sum((-2, -1), keepdim=True).sqrt()
        return update * (step * norm / new_norm.clamp_min(1e-10)).to(update.dtype)


def as_shape_of(tensor: Tensor, shape: tuple) -> Tensor:
    """A tied pair's tensor seen in its partner's layout: itself if the shapes agree, else its transpose."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tuple(tensor.shape[::-1]) == tuple(shape) and tensor.ndim == 2:
        return tensor.T
    raise ValueError(f"cannot tie a {tuple(tensor.shape)} tensor to a {tuple(shape)} one")


class DistributedAdam(GradientReduction):
    """Adam with bias correction and the record's bf16 moments (the update itself in fp32, rounded once into the
    weight). Large tensors whose first dimension divides by the world size are sharded along it (reduce-scatter,
    update own rows, all-gather); small ones are all-reduced and updated everywhere. param_lrs: (param, lr, betas,
    weight decay), the decay cautious. The embedding can be tied to the head (tie/untie)."""

    SHARD_MIN_NUMEL = 1 << 16

    def __init__(self, param_lrs: list, eps: float, comm: Comm):
        self.eps, self.comm, self.step_count = eps, comm, 0
        self.entries = []
        for p, lr, entry_betas, decay in param_lrs:
            sharded = comm.world_size > 1 and p.numel() >= self.SHARD_MIN_NUMEL and p.size(0) % comm.world_size == 0
            rows = p.size(0) // comm.world_size if sharded else None
            first_row = comm.rank * rows if sharded else 0
            param_view = p.data[first_row : first_row + rows] if sharded else p.data
            self.entries.append(dict(
                param=p, lr=lr, sharded=sharded, param_view=param_view, first_row=first_row,
                betas=tuple(entry_betas), decay=decay,
                grad=torch.empty_like(param_view) if sharded else None,
                exp_avg=torch.zeros_like(param_view, dtype=torch.bfloat16),
                exp_avg_sq=torch.zeros_like(param_view, dtype=torch.bfloat16)))
        self.gathers = []  # the parameter all-gathers of a step whose wait finish_step does
        self.accepting = True  # False: this step only accumulates gradients, so the hooks start no reduction
        self.tied = None  # (head entry, embed entry) while the embedding reads the head's matrix
        self._init_reduction([[e["param"]] for e in self.entries])

    def entry_of(self, param: Tensor) -> int:
        return next(i for i, e in enumerate(self.entries) if e["param"] is param)

    def grad_ready(self, param: Tensor):
        if self.accepting:
            super().grad_ready(param)

    def _launch(self, unit: int):
        if self.tied is not None and unit == self.tied[1]:
            self.launched[unit] = True  # the tied embedding has no gradient of its own
            return
        super()._launch(unit)

    @torch.no_grad()
    def _start_reduction(self, unit: int):
        e = self.entries[unit]
        if e["sharded"]:
            return self.comm.reduce_scatter_mean(e["grad"], e["param"].grad)
        e["grad"] = e["param"].grad
        return self.comm.all_reduce_mean(e["grad"])

    # -- the tied embedding: the head's matrix is the input embedding until the split step

    def tie(self, head: Tensor, embed: Tensor):
        """Only the head trains (GPT looks its tokens up in the head's own matrix while tied, so embed gets no
        gradient), and embed copies it after each step, so the split finds them equal."""
        head_unit, embed_unit = self.entry_of(head), self.entry_of(embed)
        as_shape_of(head, embed.shape)  # refuses shapes that cannot tie
        self.tied = (head_unit, embed_unit)

    def _copy_head_into_embed(self):
        head, embed = (self.entries[i]["param"] for i in self.tied)
        embed.data.copy_(as_shape_of(head.data, embed.shape))

    @torch.no_grad()
    def untie(self):
        """The split: embed trains apart from now on, starting from the head's Adam moments (the record's
        copy_lm_to_embed); the shared step count carries the head's bias correction over."""
        head, embed = (self.entries[i] for i in self.tied)
        for key in ("exp_avg", "exp_avg_sq"):
            embed[key].copy_(as_shape_of(head[key], embed[key].shape))  # the same rows on each rank
        self.tied = None

    # -- the step

    @torch.no_grad()
    def step(self, lr_mult: float, wait_gathers: bool = True):
        """Replicated tensors first, then sharded ones one by one, each all-gather overlapping the next update.
        wait_gathers False: the all-gathers are left running and finish_step() waits for them, so other work
        (Muon's step) can be queued first instead of behind them."""
        self.step_count += 1
        skipped = self.tied[1] if self.tied is not None else None
        order = sorted(range(len(self.entries)), key=lambda i: self.entries[i]["sharded"])
        for i in order:
            e = self.entries[i]
            if i == skipped:
                continue
            wait(self.pending[i])
            self._update(e, lr_mult)
            if e["sharded"]:
                self.gathers.append(self.comm.all_gather(e["param"].data, e["param_view"].clone()))
        if wait_gathers:
            self.finish_step()

    @torch.no_grad()
    def finish_step(self):
        """Wait for the step's all-gathers; then the tied embedding copies the head."""
        for handle in self.gathers:
            wait(handle)
        self.gathers = []
        if self.tied is not None:
            self._copy_head_into_embed()
        self._reset_reduction()

    def _update(self, e: dict, lr_mult: float):
        """The record's step: bf16 moments; the update m / (sqrt(v) + eps) x lr sqrt(1 - b2^t) / (1 - b1^t) in fp32,
        plus weight decay of lr^2 x decay where the update and the weight have the same sign (strictly: a zero weight
        or update is not decayed), subtracted from the weight in fp32 and rounded once into its dtype."""
        beta1, beta2 = e["betas"]
        grad = e["grad"].float()
        exp_avg = (e["exp_avg"].float() * beta1 + grad * (1 - beta1)).to(torch.bfloat16)
        exp_avg_sq = (e["exp_avg_sq"].float() * beta2 + grad.square() * (1 - beta2)).to(torch.bfloat16)
        e["exp_avg"].copy_(exp_avg)
        e["exp_avg_sq"].copy_(exp_avg_sq)
        lr = e["lr"] * lr_mult
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        update = exp_avg.float() / (exp_avg_sq.float().sqrt() + self.eps) * (lr * math.sqrt(bias2) / bias1)
        param = e["param_view"]
        weight = param.float()
        agrees = (update * weight) > 0
        update = update + weight * agrees * (lr * lr * e["decay"])
        param.copy_(weight - update)


class OverlapHooks:
    """Hands each gradient to the optimizers the moment backward finalizes it (armed on the last accumulation
    step only), so reductions start under the rest of the backward pass. Only worth it with several ranks."""

    def __init__(self, model: nn.Module, optimizers: list):
        self.optimizers, self.armed = optimizers, False
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in model.parameters()]

    def _on_grad(self, param: Tensor):
        if self.armed:
            for optimizer in self.optimizers:
                optimizer.grad_ready(param)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@dataclass
class Optimizers:
    adam: DistributedAdam
    muon: DistributedMuon
    hooks: OverlapHooks | None  # None on one rank: nothing to overlap
    adam_odd_steps_only: bool = False  # Adam steps on odd steps, even steps' gradients accumulate
    split_step: int = -1  # the last step with the embedding tied to the head (-1: never tied)

    def close(self):
        if self.hooks is not None:
            self.hooks.remove()


def build_optimizers(model: GPT, cfg: Config, comm: Comm) -> Optimizers:
    settings = assign_params(model, cfg)
    adam_lrs = [(s.param, s.effective_lr, s.betas, s.weight_decay) for s in settings if s.optimizer == "adam"]
    muon_lrs = [(s.param, s.effective_lr, s.matrix_shape, s.weight_decay * s.base_lr, s.split_product)
                for s in settings if s.optimizer == "muon"]
    adam = DistributedAdam(adam_lrs, cfg.adam_eps, comm)
    muon = DistributedMuon(muon_lrs, comm, cfg.normuon_beta2)
    hooks = OverlapHooks(model, [adam, muon]) if comm.world_size > 1 else None
    split_step = embed_split_step(cfg)
    if split_step >= 0:  # tied from the start
        params = dict(model.named_parameters())
        adam.tie(params[HEAD], params[EMBED])
    adam.accepting = is_adam_step(0, cfg)
    return Optimizers(adam, muon, hooks, cfg.adam_odd_steps_only, split_step)


@torch.no_grad()
def step_optimizers(opt: Optimizers, model: nn.Module, schedule: StepSchedule):
    """Reduce gradients and step both optimizers as the schedule says, then clear the gradients they used.
    Adam steps on odd steps only; on even ones its gradients stay and the next backward adds to them. While
    tied, the embedding copies the head after each Adam step; after the split step's Adam step the head's
    moments are copied into the embedding's and they part."""
    if schedule.adam_step:
        opt.adam.reduce_gradients()
    opt.muon.reduce_gradients()
    if schedule.adam_step:  # Adam's all-gathers run while Muon computes; its parameters are not Muon's
        opt.adam.step(schedule.lr_mult, wait_gathers=False)
    else:  # the gradients stay for the next step; a reduction a hook started anyway is linear, so harmless
        for handle in opt.adam.pending:
            wait(handle)
        opt.adam._reset_reduction()
    opt.muon.step(schedule.lr_mult, schedule.muon_momentum)
    if schedule.adam_step:
        opt.adam.finish_step()
    if schedule.step == opt.split_step and opt.adam.tied is not None:
        opt.adam.untie()
    if schedule.adam_step:
        model.zero_grad(set_to_none=True)
    else:
        for group in opt.muon.groups:
            for p in group.params:
                p.grad = None
    # the hooks start Adam's reductions during the next backward only if Adam steps after it
    opt.adam.accepting = not opt.adam_odd_steps_only or (schedule.step + 1) % 2 == 1


# -----------------------------------------------------------------------------
# Data: FineWeb .bin shards (256 x int32 header, uint16 tokens), documents packed into each stage's sequences.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
FETCH_HINT = "fetch FineWeb with: python data/cached_fineweb10B.py 30"  # the record trains on 21.8 shards' worth (README)


class DataError(Exception):
    """Bad or missing data; the message names the file and how to get good data."""


def resolve_files(pattern: str, flag: str) -> list:
    files = sorted(glob.glob(pattern))
    if files:
        return files
    folder = os.path.dirname(pattern) or "."
    if not os.path.isdir(folder):
        raise DataError(f"{flag} {pattern}: folder {folder!r} does not exist (cwd: {os.getcwd()}); {missing_data_hint(pattern, flag)}")
    raise DataError(f"{flag} {pattern}: no file matches in {folder!r}; {missing_data_hint(pattern, flag)}")


def missing_data_hint(pattern: str, flag: str) -> str:
    """A relative pattern that matches next to this script means the run started in another folder:
    say so, instead of suggesting a 2 GB download of data the user already has."""
    repo = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isabs(pattern) and glob.glob(os.path.join(repo, pattern)):
        return f"the files are in {repo}: run from the repository folder (cd {repo}) or pass {flag} {os.path.join(repo, pattern)}"
    return FETCH_HINT


def shard_token_count(path: str) -> int:
    """Check a shard's header against its size; returns its token count."""
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataError(f"{path}: {size} bytes, shorter than the 1024-byte header (truncated download?); {FETCH_HINT}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}): not a token shard; {FETCH_HINT}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    if size != HEADER_INTS * 4 + 2 * num_tokens:
        raise DataError(f"{path}: header says {num_tokens} tokens ({HEADER_INTS * 4 + 2 * num_tokens} bytes) but the file "
                        f"has {size} bytes (truncated or corrupt); delete it and {FETCH_HINT}")
    return num_tokens


def load_shard(path: str, vocab_size: int | None = None) -> np.ndarray:
    num_tokens = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_INTS * 4)
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, path)
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str):
    """An id past the embedding table is an IndexError on a CPU and a device-side assert on a GPU, far from
    its cause; one vectorised max per shard finds it as the shard loads."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[position])} at token {position} is >= --vocab-size {vocab_size}: "
                        f"raise --vocab-size above the tokenizer's largest id, or re-tokenize the data")


def load_val_tokens(files: list, num_tokens: int, vocab_size: int | None = None, seq_len: int = 1) -> np.ndarray:
    """The first num_tokens + 1 tokens of the val files (inputs and their next-token targets)."""
    available = sum(shard_token_count(f) for f in files)
    if available < num_tokens + 1:
        raise DataError(f"val files ({', '.join(files)}) hold {available} tokens; --val-tokens {num_tokens} needs "
                        f"{num_tokens + 1} (one more: the last target): {largest_val_tokens_hint(available, seq_len)}, "
                        f"rebuild the val shard with data/tokenize_corpus.py --val-tokens {num_tokens}, or {FETCH_HINT}")
    parts, have = [], 0
    for f in files:
        parts.append(load_shard(f)[: num_tokens + 1 - have])
        if vocab_size is not None:  # only the tokens used: a val shard may be longer than --val-tokens
            check_token_ids(parts[-1], vocab_size, f)
        have += parts[-1].size
        if have > num_tokens:
            break
    return np.concatenate(parts)


def largest_val_tokens_hint(available: int, seq_len: int) -> str:
    """The largest --val-tokens that `available` val tokens serve: whole --val-seq-len sequences plus one target."""
    largest = (available - 1) // seq_len * seq_len
    if largest <= 0:
        return f"they hold less than one --val-seq-len {seq_len} sequence and its target: lower --val-seq-len"
    return f"use --val-tokens {largest} (the most they serve in whole --val-seq-len {seq_len} sequences)"


class TrainLoader:
    """The training sequences: per step, batch_tokens / seq_len sequences of seq_len + 1 tokens (inputs and their
    shifted targets) packed from whole documents cut to the stage's max_doc_len (pack_sequence), all of one shard;
    sequence k of a step goes to rank k % world_size, accumulation step k // world_size, so every world size trains
    on the same sequences. A step that does not fit in the rest of a shard is taken from the start of the next one
    (as the record's script on 8 GPUs); shards load on a background thread; the data cycles when it runs out. It counts
    what it reads (tokens passed over) and what sequences use, for the log's data-use line."""

    def __init__(self, files: list, longest_seq_len: int, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None):
        self.shard_tokens = [shard_token_count(f) for f in files]
        for f, num_tokens in zip(files, self.shard_tokens):
            if num_tokens < longest_seq_len + 1:
                raise DataError(f"{f}: {num_tokens} tokens, fewer than one training sequence of {longest_seq_len + 1}")
        self.files, self.rank, self.world_size, self.device, self.vocab_size = files, rank, world_size, device, vocab_size
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.shard_index, self.passes = -1, 0
        self.tokens_used, self.tokens_before_shard = 0, 0  # sequence tokens taken; tokens of the shards left behind
        self.tokens = np.zeros(0, dtype=np.uint16)
        self.next_shard = self.pool.submit(self._read, 0)
        self._advance_shard()

    def _read(self, index: int):
        tokens = load_shard(self.files[index], self.vocab_size)
        return tokens, np.flatnonzero(tokens == EOT_TOKEN)

    def _advance_shard(self):
        self.tokens_before_shard += len(self.tokens)  # the rest of the shard is passed over
        self.shard_index += 1
        if self.shard_index == len(self.files):
            self.shard_index, self.passes = 0, self.passes + 1
        self.tokens, self.doc_starts = self.next_shard.result()
        self.next_doc = 0  # index into doc_starts of the next document to pack
        self.next_shard = self.pool.submit(self._read, (self.shard_index + 1) % len(self.files))

    def _pack_step(self, schedule: StepSchedule) -> list:
        num_sequences = schedule.batch_tokens // schedule.seq_len
        for _ in range(len(self.files) + 1):
            packed = pack_step(self.doc_starts, len(self.tokens), self.next_doc, num_sequences, schedule.seq_len, schedule.max_doc_len)
            if packed is not None:
                sequences, self.next_doc = packed
                self.tokens_used += num_sequences * schedule.seq_len
                return sequences
            self._advance_shard()
        raise DataError(f"no shard of {self.files} holds a step of {num_sequences} sequences of {schedule.seq_len + 1} "
                        f"tokens from documents starting with {EOT_TOKEN} (cut to {schedule.max_doc_len})")

    def batch_for(self, schedule: StepSchedule) -> list:
        """This rank's (inputs, targets) for each accumulation step of the step that schedule describes."""
        sequences = self._pack_step(schedule)
        mine = sequences[self.rank :: self.world_size]
        return [self._to_device(np.concatenate([self.tokens[start:end] for start, end in spans])) for spans in mine]

    def _to_device(self, window: np.ndarray):
        buf = torch.from_numpy(window.astype(np.int32))
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[:-1], buf[1:].long()

    def tokens_read(self) -> int:
        """Tokens passed over so far: the shards left behind and this one up to the next document to pack."""
        position = int(self.doc_starts[self.next_doc]) if self.next_doc < len(self.doc_starts) else len(self.tokens)
        return self.tokens_before_shard + position

    def passes_done(self) -> float:
        """Passes over the training data as a fraction: tokens read (sequences and what was skipped between them)."""
        return self.tokens_read() / sum(self.shard_tokens)

    def usage_line(self) -> str:
        if not self.tokens_used:
            return f"data: no training step ran ({sum(self.shard_tokens)} training tokens)"
        used = self.tokens_used / max(self.tokens_read(), 1)
        line = (f"data: {self.passes_done():.3f} passes over the training data ({sum(self.shard_tokens)} tokens); "
                f"sequences used {100 * used:.1f}% of the tokens read")
        if used < 0.5:  # long documents: all but each one's first max_doc_len tokens is skipped
            line += " (each stage cuts documents to its --stage-max-doc-len)"
        return line

    def state(self) -> dict:
        """Where the stream stands, for a checkpoint: the same on every rank."""
        return dict(files=[os.path.basename(f) for f in self.files], shard_tokens=list(self.shard_tokens),
                    shard_index=self.shard_index, next_doc=self.next_doc, passes=self.passes,
                    tokens_used=self.tokens_used, tokens_before_shard=self.tokens_before_shard)

    def load_state(self, state: dict):
        """Continue the stream where a checkpoint left it: the same shards, in the same order, are required."""
        if (state["files"], state["shard_tokens"]) != ([os.path.basename(f) for f in self.files], self.shard_tokens):
            raise DataError(f"the checkpoint was trained on {len(state['files'])} shards ({', '.join(state['files'][:3])}, ...) "
                            f"that differ from --train-files ({len(self.files)} shards); pass the checkpoint's --train-files")
        self.next_shard.result()
        self.shard_index = state["shard_index"] - 1
        self.next_shard = self.pool.submit(self._read, state["shard_index"])
        self._advance_shard()
        self.next_doc, self.passes, self.tokens_used = state["next_doc"], state["passes"], state["tokens_used"]
        self.tokens_before_shard = state["tokens_before_shard"]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def max_seq_len(cfg: Config) -> int:
    """The longest sequence the model sees: training's longest stage or a validation sequence (RoPE's table)."""
    return max(cfg.val_seq_len, *cfg.stage_seq_len)


def accumulation_steps(batch_tokens: int, seq_len: int, world_size: int) -> int:
    """Sequences of one step per process: the global batch is world_size x accumulation sequences of seq_len."""
    return batch_tokens // (world_size * seq_len)


def pack_sequence(doc_starts: np.ndarray, shard_len: int, first_doc: int, seq_len: int, max_doc_len: int):
    """The record's packing of one training sequence of seq_len + 1 tokens (inputs and the shifted targets):
    whole documents in stream order from document first_doc, each cut to its first max_doc_len tokens (the rest
    of a long document is skipped, not carried over), the last one cut to fill the sequence exactly.
    Returns (spans, next_doc): spans are (start, end) token ranges of the shard; next_doc is the document after
    the last one used (the remainder of the cut last document is skipped too). None if the shard ends first.
    Every span starts at a document's <|endoftext|> and holds no other, so the BOS tokens of the packed inputs
    mark exactly the record's cu_seqlens (see document_boundaries)."""
    need = seq_len + 1
    starts = doc_starts[first_doc : first_doc + need]  # a sequence never holds more than need documents
    ends = np.append(doc_starts[first_doc + 1 : first_doc + need + 1], shard_len)[: starts.size]
    lengths = np.minimum(ends - starts, max_doc_len)
    filled = np.cumsum(lengths)
    last = int(np.searchsorted(filled, need))  # first document that reaches the sequence's end
    if last == starts.size:
        return None
    lengths[last] = need - (filled[last - 1] if last else 0)
    spans = np.stack([starts[: last + 1], starts[: last + 1] + lengths[: last + 1]], axis=1)
    return spans, first_doc + last + 1


def pack_step(doc_starts: np.ndarray, shard_len: int, first_doc: int, num_sequences: int, seq_len: int, max_doc_len: int):
    """All sequences of one optimizer step, in stream order: ([spans per sequence], next_doc), or None if the
    shard cannot hold the whole step (the record then takes the step from the next shard)."""
    sequences, doc = [], first_doc
    for _ in range(num_sequences):
        packed = pack_sequence(doc_starts, shard_len, doc, seq_len, max_doc_len)
        if packed is None:
            return None
        spans, doc = packed
        sequences.append(spans)
    return sequences, doc


def document_boundaries(inputs: Tensor, max_docs: int | None = None) -> Tensor:
    """cu_seqlens of a packed training sequence (int32: 0, the start of every later document, len(inputs)),
    found from its <|endoftext|> tokens. With max_docs, padded to that fixed size with len(inputs), as the record
    pads its cum_lengths (a fixed shape for compiled varlen attention); more documents is an error.
    On a GPU tensor this waits for the device (nonzero): call it on the host copy where that matters."""
    starts = torch.nonzero(inputs == EOT_TOKEN)[:, 0]
    bounds = torch.cat([starts.new_zeros(1), starts[starts > 0], starts.new_full((1,), inputs.numel())])
    if max_docs is not None:
        if bounds.numel() > max_docs:
            raise ValueError(f"{bounds.numel() - 1} documents in a sequence of {inputs.numel()} tokens: more than max_docs {max_docs} - 1")
        bounds = torch.cat([bounds, bounds.new_full((max_docs - bounds.numel(),), inputs.numel())])
    return bounds.to(torch.int32)


def make_train_loader(cfg: Config, files: list, rank: int, world_size: int, device: torch.device) -> TrainLoader:
    return TrainLoader(files, max(cfg.stage_seq_len), rank, world_size, device, cfg.vocab_size)



# -----------------------------------------------------------------------------
# Training: schedules, one optimizer step, validation, untimed warm-up and reset, the timed loop.


# The schedule: what every step uses (batch, windows, LR, momentum, ...) as data, from one pure function of the
# step and the config: stages with a table of values each (--stage-steps) for the batch and the windows, the
# record's fractions of the scheduled steps for the LR and the multi-token weights. Training step k, and the
# validation before it, read schedule_at(k); step train_steps only validates.


@dataclass(frozen=True)
class StepSchedule:
    step: int
    stage: int  # index into the --stage-* tables
    trains: bool  # False at step train_steps: the final validation only
    batch_tokens: int  # tokens per optimizer step, over all processes and accumulation steps
    seq_len: int  # tokens per training sequence (per process per accumulation step)
    max_doc_len: int  # longest document in a training sequence; longer ones are cut
    window_short_tokens: int
    window_long_tokens: int
    lr_mult: float  # multiplies every base LR, Muon's and Adam's
    muon_momentum: float
    mtp_weights: tuple  # loss weights of the next 1, 2, 3, ... tokens
    adam_step: bool  # Adam updates at the end of this step; if not, its gradients accumulate into the next one
    embed_tied: bool  # the embedding is the head's transpose in this step (the split step is the last such one)
    attn_scale: float  # attention softmax scale


def scheduled_steps(cfg: Config) -> int:
    """Steps over which the LR is scheduled; the extension after them keeps the final values."""
    return cfg.train_steps - cfg.extension_steps


def stage_of(step: int, cfg: Config) -> int:
    """The last stage starting at or before step."""
    return sum(1 for start in cfg.stage_steps[1:] if start <= step)


def stage_progress(step: int, cfg: Config) -> float:
    """Fraction of its stage done at step: 0 at the stage's first step, 1 only at train_steps."""
    stage = stage_of(step, cfg)
    ends = [*cfg.stage_steps[1:], cfg.train_steps]
    return (step - cfg.stage_steps[stage]) / (ends[stage] - cfg.stage_steps[stage])


def lerp(start: float, end: float, frac: float) -> float:
    return (1 - frac) * start + frac * end


def lr_multiplier(step: int, cfg: Config) -> float:
    """The record's get_lr: at x = step / scheduled steps, 1 up to the first --lr-step-fracs, then each
    --lr-step-mults value on the first step past its fraction (larger batches, larger LR); from x >= 1 -
    cooldown_frac linearly from that multiplier to final_lr_frac at x = 1, then flat through the extension."""
    end = scheduled_steps(cfg)
    if step > end:
        return cfg.final_lr_frac
    x = step / end
    lr = 1.0
    for frac, mult in zip(cfg.lr_step_fracs, cfg.lr_step_mults):
        if x > frac:
            lr = mult
    if cfg.cooldown_frac and x >= 1 - cfg.cooldown_frac:
        w = (1 - x) / cfg.cooldown_frac
        return lr * w + cfg.final_lr_frac * (1 - w)
    return lr


def muon_momentum(step: int, cfg: Config) -> float:
    """Warm-up from start to final over the first warm-up steps; back to start over the last cool-down steps."""
    start, final = cfg.muon_momentum_start, cfg.muon_momentum
    warmup, cooldown = cfg.muon_momentum_warmup_steps, cfg.muon_momentum_cooldown_steps
    cooldown_start = cfg.train_steps - cooldown
    if step < warmup:
        return lerp(start, final, step / warmup)
    if cooldown and step > cooldown_start:
        return lerp(final, start, (step - cooldown_start) / cooldown)
    return final


def long_window_blocks(step: int, cfg: Config) -> int:
    if step == cfg.train_steps and cfg.final_long_window_blocks:
        return cfg.final_long_window_blocks  # the final validation may look further than training did (the record: 27)
    return cfg.stage_long_window_blocks[stage_of(step, cfg)]


def short_window_blocks(step: int, cfg: Config) -> int:
    return cfg.stage_short_window_blocks[stage_of(step, cfg)]


def mtp_weights(step: int, cfg: Config) -> tuple:
    """Loss weights of the next 1, 2, 3 tokens, the record's: at x = step / (mtp_frac x scheduled steps),
    [1, 0.5, 0.25 (1 - 3x)] for x < 1/3, [1, 0.5 (2 - 3x)] for x < 2/3, then [1]."""
    span = cfg.mtp_frac * scheduled_steps(cfg)
    x = step / span if span else 1.0
    if x < 1 / 3:
        return (1.0, 0.5, 0.25 * (1 - 3 * x))
    if x < 2 / 3:
        return (1.0, 0.5 * (2 - 3 * x))
    return (1.0,)


def is_adam_step(step: int, cfg: Config) -> bool:
    if step >= cfg.train_steps:
        return False  # the final validation step trains nothing
    return step % 2 == 1 if cfg.adam_odd_steps_only else True


def embed_split_step(cfg: Config) -> int:
    """The last step with the embedding tied to the head: the first odd step of embed_split_stage (odd so that
    Adam, odd steps only, updates the tied pair once more); after it the head's Adam state is copied into the
    embedding's and the two train apart. -1: never tied."""
    return cfg.stage_steps[cfg.embed_split_stage] | 1 if cfg.embed_split_stage else -1


def yarn_windows(stage: int, cfg: Config) -> tuple:
    """The long windows (tokens) YaRN has followed by this stage: the stages' windows up to --yarn-max-window-blocks."""
    blocks = [b for b in cfg.stage_long_window_blocks[: stage + 1] if b <= cfg.yarn_max_window_blocks]
    return tuple(b * BLOCK_SIZE for b in blocks or cfg.stage_long_window_blocks[:1])


def yarn_attn_scale(step: int, cfg: Config) -> float:
    """YaRN: at each change of the long window YaRN follows, the scale is multiplied by 1 + c * ln(new / old): the
    record's 0.1 -> 0.1170 -> 0.1275 -> 0.1318, then fixed (wider windows and the final validation keep it)."""
    scale = cfg.attn_scale
    windows = yarn_windows(stage_of(step, cfg), cfg)
    for old, new in zip(windows, windows[1:]):
        if new != old:
            scale *= cfg.attn_scale_log_growth * math.log(new / old) + 1
    return scale


def schedule_at(step: int, cfg: Config) -> StepSchedule:
    """Everything the schedule sets for step (0..train_steps): pure, no data, no device."""
    stage = stage_of(step, cfg)
    return StepSchedule(
        step=step,
        stage=stage,
        trains=step < cfg.train_steps,
        batch_tokens=cfg.stage_batch_tokens[stage],
        seq_len=cfg.stage_seq_len[stage],
        max_doc_len=cfg.stage_max_doc_len[stage],
        window_short_tokens=short_window_blocks(step, cfg) * BLOCK_SIZE,
        window_long_tokens=long_window_blocks(step, cfg) * BLOCK_SIZE,
        lr_mult=lr_multiplier(step, cfg),
        muon_momentum=muon_momentum(step, cfg),
        mtp_weights=mtp_weights(step, cfg),
        adam_step=is_adam_step(step, cfg),
        embed_tied=step <= embed_split_step(cfg),
        attn_scale=yarn_attn_scale(step, cfg),
    )


def mtp_weight_table(cfg: Config, device: torch.device) -> Tensor | None:
    """(train_steps, 4k) float32: row k holds step k's multi-token weights, zero-padded to a multiple of 4 so each
    row starts 16-byte aligned (compiled kernels guard on alignment)."""
    rows = [mtp_weights(step, cfg) for step in range(cfg.train_steps)]
    width = -(-max(map(len, rows)) // 4) * 4
    table = torch.zeros(len(rows), width, dtype=torch.float32)
    for step, weights in enumerate(rows):
        table[step, : len(weights)] = torch.tensor(weights, dtype=torch.float32)
    return table.to(device)


def schedule_report(cfg: Config) -> str:
    """One JSON object per step 0..train_steps (--print-schedule)."""
    return "\n".join(json.dumps(dataclasses.asdict(schedule_at(step, cfg))) for step in range(cfg.train_steps + 1))


def stage_tokens(cfg: Config) -> list:
    """Training tokens of each stage (step train_steps only validates)."""
    tokens = [0] * len(cfg.stage_steps)
    for step in range(cfg.train_steps):
        schedule = schedule_at(step, cfg)
        tokens[schedule.stage] += schedule.batch_tokens
    return tokens


def schedule_summary(cfg: Config) -> str:
    tokens = stage_tokens(cfg)
    return f"schedule: {cfg.train_steps} steps, stage tokens [{', '.join(f'{t:,}' for t in tokens)}], total {sum(tokens):,} tokens"


STAGE_TABLES = ["stage_batch_tokens", "stage_seq_len", "stage_max_doc_len", "stage_short_window_blocks",
                "stage_long_window_blocks"]


def check_schedule(cfg: Config, training: bool):
    """Refuse a schedule that cannot be followed, with a one-line reason (training or printing it alike)."""
    if cfg.train_steps <= 0 or not 0 <= cfg.extension_steps < cfg.train_steps:
        raise ConfigError(f"--train-steps {cfg.train_steps} must be positive and --extension-steps {cfg.extension_steps} in 0..train_steps-1")
    if cfg.final_long_window_blocks < 0 or cfg.muon_momentum_cooldown_steps < 0:
        raise ConfigError("--final-long-window-blocks and --muon-momentum-cooldown-steps must be >= 0")
    starts = cfg.stage_steps
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= cfg.train_steps:
        raise ConfigError(f"--stage-steps {','.join(map(str, starts))}: must start at 0 and increase, below --train-steps "
                          f"{cfg.train_steps}{squeezed_stages_hint(cfg)}")
    for name in STAGE_TABLES:
        if len(getattr(cfg, name)) != len(starts):
            raise ConfigError(f"{flag_name(name)}: one value per stage ({len(starts)} stages), got {len(getattr(cfg, name))}")
    if len(cfg.lr_step_fracs) != len(cfg.lr_step_mults):
        raise ConfigError(f"--lr-step-fracs and --lr-step-mults: one multiplier per fraction, got "
                          f"{len(cfg.lr_step_fracs)} and {len(cfg.lr_step_mults)}")
    for stage, (batch, seq_len) in enumerate(zip(cfg.stage_batch_tokens, cfg.stage_seq_len)):
        if seq_len <= 0 or seq_len % BLOCK_SIZE or batch % seq_len:
            raise ConfigError(f"stage {stage}: --stage-seq-len {seq_len} must be a positive multiple of {BLOCK_SIZE} dividing --stage-batch-tokens {batch}")
    if min(cfg.stage_short_window_blocks + cfg.stage_long_window_blocks + cfg.stage_max_doc_len) <= 0:
        raise ConfigError("--stage-short-window-blocks, --stage-long-window-blocks and --stage-max-doc-len must be positive")
    if not 0 <= cfg.embed_split_stage < len(starts):
        raise ConfigError(f"--embed-split-stage {cfg.embed_split_stage}: stages are numbered 0..{len(starts) - 1}")


def squeezed_stages_hint(cfg: Config) -> str:
    """For a --train-steps below the preset's: its stage starts scaled down, as a flag to copy."""
    if not cfg.stage_steps or cfg.stage_steps[-1] < cfg.train_steps or cfg.train_steps < 2 * len(cfg.stage_steps):
        return ""
    last = cfg.stage_steps[-1] + cfg.extension_steps  # the preset's own train_steps, if its extension is intact
    scaled = sorted({round(start * cfg.train_steps / last) for start in cfg.stage_steps})
    if len(scaled) < len(cfg.stage_steps) or scaled[-1] >= cfg.train_steps:
        return ""
    extension = cfg.train_steps - scaled[-1]
    return f" (for {cfg.train_steps} steps, e.g. --stage-steps {','.join(map(str, scaled))} --extension-steps {extension})"


def warmup_steps(cfg: Config) -> list:
    """Untimed steps that compile every shape: as the record, steps 0 and 1 and the two steps either side of
    every stage start, so each stage's batch shape and each change of stage is compiled (--warmup-steps 0: none,
    or step 0 alone when compiling)."""
    if not cfg.warmup_steps:
        return list(range(untimed_warmup_steps(cfg)))
    around_starts = {start + offset for start in cfg.stage_steps[1:] for offset in (-2, -1, 0, 1)}
    return sorted({0, 1} | {step for step in around_starts if 2 <= step < cfg.train_steps})


def is_val_step(step: int, cfg: Config) -> bool:
    if step == cfg.train_steps or step == 0:
        return True
    return cfg.val_every > 0 and step % cfg.val_every == 0


def train_step(model: GPT, batch: list, opt: Optimizers, step: int, cfg: Config) -> Tensor:
    """One optimizer step over this rank's accumulation steps. The gradient is the per-sequence token sum
    averaged over all sequences of the step, so any world size gives the same update.
    Returns the summed train loss of this rank (on device, no sync)."""
    schedule = schedule_at(step, cfg)
    loss_sum = torch.zeros((), device=batch[0][0].device)
    for i, (inputs, targets) in enumerate(batch):
        if opt.hooks is not None:  # gradients are final only in the last backward pass
            opt.hooks.armed = i == len(batch) - 1
        loss = model(inputs, targets, schedule)
        (loss / len(batch)).backward()
        loss_sum += loss.detach()
    if opt.hooks is not None:
        opt.hooks.armed = False
    step_optimizers(opt, model, schedule)
    return loss_sum


@torch.no_grad()
def evaluate(model: GPT, val_tokens: np.ndarray, cfg: Config, step: int, comm: Comm, device: torch.device,
             max_sequences: int | None = None) -> float:
    """Mean cross-entropy over the first val_tokens tokens: rank r takes sequences r, r + W, ..."""
    num_sequences = cfg.val_tokens // cfg.val_seq_len
    mine = range(comm.rank, num_sequences, comm.world_size)[:max_sequences]
    total = torch.zeros((), device=device, dtype=torch.float64)
    schedule = schedule_at(step, cfg)  # the same for every sequence of this validation
    model.eval()  # the bf16 head, in chunks (GPT.forward)
    for i in mine:
        window = torch.from_numpy(val_tokens[i * cfg.val_seq_len : (i + 1) * cfg.val_seq_len + 1].astype(np.int32)).to(device)
        total += model(window[:-1], window[1:].long(), schedule).double()
    model.train()
    if comm.world_size > 1:
        dist.all_reduce(total)
    return total.item() / cfg.val_tokens


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_distributed(cfg: Config):
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPUs, gloo on CPUs; one process needs no group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine; to try the trainer on CPU run: "
                              "python train_gpt.py --preset tiny --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Comm(rank, world_size), device


def build_model(cfg: Config, device: torch.device, accumulation: int, logger) -> GPT:
    torch.manual_seed(cfg.seed)  # initialized on the CPU: identical weights on every rank and device
    model = store_as_record(GPT(cfg, max_seq_len(cfg)), cfg).to(device)
    if device.type == "cuda":
        model.compute_dtype, model.use_flex = torch.bfloat16, True
    model.mtp_weight_table = mtp_weight_table(cfg, device)
    if cfg.compile:
        model.compile_regions()
    return model


class DeferredValue:
    """A device scalar copied to the host without blocking; read a step later, when the copy is long done,
    so checking the train loss never stalls the GPU."""

    def __init__(self, value: Tensor):
        self.host, self.event = value, None
        if value.device.type == "cuda":  # a pinned destination keeps the copy asynchronous
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def is_finite(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return math.isfinite(self.host.item())


def untimed_warmup_steps(cfg: Config) -> int:
    """torch.compile compiles on the first call: with --warmup-steps 0 that would land on the training clock,
    so a compiled run always warms up (and then resets) at least one step."""
    return max(cfg.warmup_steps, 1) if cfg.compile else cfg.warmup_steps


class OutputError(Exception):
    """A checkpoint or the weights could not be written; the message is one line."""


class DiskFullError(OutputError):
    """No space left while writing the log, a checkpoint or the weights; the message is one line."""


def disk_full_or_raise(error: OSError, what: str):
    if error.errno == errno.ENOSPC:
        raise DiskFullError(f"disk full writing {what}: free space on that disk, or write it elsewhere") from None
    raise error


def write_atomically(obj, path: str, what: str):
    """torch.save to a temp file in the same folder, fsync, rename: a crash or a full disk mid-write leaves
    the previous file whole. Serialized in memory first, so a full disk is a plain OSError from write()."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint or weights file is read like any other
        os.replace(tmp, path)
        tmp = None
        sync_folder(folder)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            disk_full_or_raise(e, what)
        raise OutputError(f"cannot write {what}: {e.strerror or e}") from None
    finally:
        if tmp is not None:  # a half-written temp file would only eat more disk
            try:
                os.unlink(tmp)
            except OSError:
                pass


def sync_folder(folder: str):
    """The rename itself is durable only once the folder's entry is on disk (not possible on every OS)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_path(cfg: Config) -> str:
    return os.path.join(cfg.checkpoint_dir, f"{cfg.run_id}.pt")


# Settings that do not change the math of a step: a resumed run may change these, and nothing else. Not the seed
# (the log would name a seed the weights never came from) nor the val files (another val loss); the train files only
# by their path: the loader checks that they are the same shards (names and sizes), and the log says what moved.
RESUME_MAY_CHANGE = {"train_files", "val_every", "device", "compile", "warmup_steps", "run_id", "log_dir", "save_model",
                     "gpu_peak_tflops", "save_every", "checkpoint_dir", "resume"}


def gather_shards(shard: Tensor, comm: Comm) -> Tensor:
    """Each rank's rows of an optimizer state tensor, concatenated in rank order (every rank calls this)."""
    full = shard.new_empty(comm.world_size * shard.size(0), *shard.shape[1:])
    wait(comm.all_gather(full, shard.contiguous()))
    return full


def optimizer_state(opt: Optimizers, comm: Comm) -> dict:
    """Muon momentum and Adam moments as whole tensors, whatever the world size: each rank owns a shard, so
    they are all-gathered (every rank calls this) and rank 0 writes one file any world size can resume."""
    muon = []
    for group in opt.muon.groups:
        n = len(group.views)  # the rest is padding to a multiple of the world size: always zero
        names = ("momentum", "second_moment")
        muon.append({name: gather_shards(getattr(group, name), comm)[:n].cpu().clone() for name in names})
    adam = []
    for e in opt.adam.entries:
        adam.append({name: (gather_shards(e[name], comm) if e["sharded"] else e[name]).cpu().clone()
                     for name in ("exp_avg", "exp_avg_sq")})
    return dict(muon=muon, adam=adam, adam_step_count=opt.adam.step_count, adam_tied=opt.adam.tied is not None)


def load_optimizer_state(opt: Optimizers, state: dict, comm: Comm):
    """Each rank takes its own rows of the whole tensors that optimizer_state wrote."""
    if len(state["muon"]) != len(opt.muon.groups) or len(state["adam"]) != len(opt.adam.entries):
        raise DataError("the checkpoint's optimizer state does not match this model: was it written by another version of this trainer?")
    if opt.adam.tied is not None and not state.get("adam_tied", True):
        opt.adam.untie()  # written after the split: the embedding trains apart (its moments are loaded below)
    for group, saved in zip(opt.muon.groups, state["muon"]):
        for name, whole in saved.items():
            own = getattr(group, name)
            padded = torch.cat([whole, whole.new_zeros(group.padded - whole.size(0), *whole.shape[1:])])
            own.copy_(padded[group.own])
    for e, saved in zip(opt.adam.entries, state["adam"]):
        for name, whole in saved.items():
            if e["sharded"]:
                rows = e[name].size(0)
                whole = whole[comm.rank * rows : (comm.rank + 1) * rows]
            e[name].copy_(whole)  # a replicated one whole: 0-d scalars too
    opt.adam.step_count = state["adam_step_count"]


def pending_adam_grads(model: GPT, comm: Comm) -> dict:
    """After an even step Adam has not stepped: its gradients wait in .grad for the next (odd) step to add to. A
    checkpoint keeps them, as their mean over the ranks (every rank calls this): the next step's reduction is a mean
    too, so every rank resuming from the mean gives the same sum (bit for bit on one process)."""
    pending = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.detach().clone()
            wait(comm.all_reduce_mean(grad))
            pending[name] = grad.cpu()
    return pending


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def training_state(step: int, train_ms: float, val_losses: list, model: GPT, opt: Optimizers, loader: TrainLoader,
                   cfg: Config, comm: Comm, device: torch.device) -> dict | None:
    """Everything the step loop needs to go on exactly as if it never stopped; None on ranks other than 0."""
    optimizer = optimizer_state(opt, comm)
    pending = pending_adam_grads(model, comm)
    if comm.rank != 0:
        return None
    return dict(format=1, step=step, train_ms=train_ms, val_losses=[list(v) for v in val_losses], config=config_json(cfg),
                world_size=comm.world_size, model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                optimizer=optimizer, pending_grads=pending, loader=loader.state(), rng=rng_state(device))


def save_checkpoint(step: int, train_ms: float, val_losses: list, model: GPT, opt: Optimizers, loader: TrainLoader,
                    cfg: Config, comm: Comm, device: torch.device, logger) -> str:
    state = training_state(step, train_ms, val_losses, model, opt, loader, cfg, comm, device)
    path = checkpoint_path(cfg)
    if state is not None:
        write_atomically(state, path, f"checkpoint {path}")
        logger.log(f"checkpoint: {path} at step {step}")
    return path


def read_checkpoint(path: str) -> dict:
    """The checkpoint as a dict; one short line of ours for anything else (torch's own message would advise
    weights_only=False, which would run code from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file fails in many ways inside the unpickler
        with open(path, "rb") as f:
            torch_file = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        what = "a truncated or damaged torch file" if torch_file else "not a torch checkpoint (truncated, or another kind of file)"
        raise DataError(f"--resume {path}: {what}; pass a checkpoint written by --save-every") from None
    if not isinstance(state, dict) or not {"config", "step", "model", "optimizer"} <= state.keys():
        raise DataError(f"--resume {path}: a torch file, but not a train_gpt.py checkpoint; pass one written by --save-every")
    return state


def read_resume_state(cfg: Config) -> dict | None:
    """The checkpoint of --resume, its settings checked against this run's before anything large is built."""
    if not cfg.resume:
        return None
    state = read_checkpoint(cfg.resume)
    changes = config_changes(state["config"], cfg)
    if changes:
        raise DataError(f"--resume {cfg.resume}: settings differ from the checkpoint's ({'; '.join(changes)}); "
                        f"resume with the same settings")
    return state


def config_changes(saved_json: str, cfg: Config) -> list:
    saved, now = json.loads(saved_json), json.loads(config_json(cfg))
    return [f"{flag_name(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]


def restore_checkpoint(state: dict, model: GPT, opt: Optimizers, loader: TrainLoader, cfg: Config, comm: Comm,
                       device: torch.device) -> tuple:
    """Load what training_state wrote (every rank read the file); returns (step, train_ms, val_losses)."""
    with torch.no_grad():
        model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
    load_optimizer_state(opt, state["optimizer"], comm)
    params = dict(model.named_parameters())
    for name, grad in state.get("pending_grads", {}).items():
        params[name].grad = grad.to(device)
    opt.adam.accepting = is_adam_step(state["step"], cfg)
    loader.load_state(state["loader"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"], state["train_ms"], [tuple(v) for v in state["val_losses"]]


def checkpoint_off_the_clock(step: int, train_ms: float, clock: float, val_losses: list, model: GPT, opt: Optimizers,
                             loader: TrainLoader, cfg: Config, comm: Comm, device: torch.device, logger) -> float:
    """Stop the clock (after the queued work is done), write the checkpoint; returns the train time so far,
    which the checkpoint holds, so a resumed run's clock goes on from it."""
    synchronize(device)
    train_ms += 1000 * (time.perf_counter() - clock)
    save_checkpoint(step, train_ms, val_losses, model, opt, loader, cfg, comm, device, logger)
    return train_ms


@dataclass
class RunProgress:
    """What main() reports if the run stops early: the last finished step and the newest checkpoint."""
    step: int = 0
    checkpoint: str = ""


def run_training(cfg: Config, logger, comm: Comm, device: torch.device, accumulation: int, launch_time: float,
                 progress: RunProgress | None = None) -> dict:
    """Compile and warm up (untimed), reset, then the timed run with validation off the clock."""
    logger.log(schedule_summary(cfg))
    progress = progress or RunProgress()
    resume_state = read_resume_state(cfg)
    val_files = resolve_files(cfg.val_files, "--val-files")
    train_files = resolve_files(cfg.train_files, "--train-files")
    val_tokens = load_val_tokens(val_files, cfg.val_tokens, cfg.vocab_size, cfg.val_seq_len)
    logger.log(f"train_files: {len(train_files)} ({sum(shard_token_count(f) for f in train_files)} tokens)  "
               f"val_files: {len(val_files)}  val_tokens: {cfg.val_tokens}")
    model = build_model(cfg, device, accumulation, logger)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Untimed warm-up: compile every shape (train step, validation), then restore the initial state.
    compile_start = time.perf_counter()
    warmup = warmup_steps(cfg)
    if warmup:
        logger.log(f"warmup_steps: {warmup}")
    if warmup:
        opt = build_optimizers(model, cfg, comm)
        loader = make_train_loader(cfg, train_files, comm.rank, comm.world_size, device)
        for step in warmup:
            train_step(model, loader.batch_for(schedule_at(step, cfg)), opt, step, cfg)
        evaluate(model, val_tokens, cfg, 0, comm, device, max_sequences=1)
        loader.close()
        opt.close()
        with torch.no_grad():
            model.load_state_dict(initial_state)
    synchronize(device)
    logger.log(f"compile_and_warmup: {time.perf_counter() - compile_start:.1f}s ({len(warmup)} steps, then reset)")
    del initial_state

    opt = build_optimizers(model, cfg, comm)
    loader = make_train_loader(cfg, train_files, comm.rank, comm.world_size, device)
    train_ms, val_losses, stopped = 0.0, [], None
    first_step = 0
    if resume_state is not None:
        first_step, train_ms, val_losses = restore_checkpoint(resume_state, model, opt, loader, cfg, comm, device)
        moved = json.loads(resume_state["config"])["train_files"]
        moved = f"; --train-files {moved!r} -> {cfg.train_files!r}, the same shards" if moved != cfg.train_files else ""
        logger.log(f"resumed: {cfg.resume} at step {first_step} (train_time {train_ms:.0f}ms){moved}")
        del resume_state
    passes_logged = loader.passes
    pending_loss, clock = None, time.perf_counter()
    launch_to_first_step = None
    for step in range(first_step, cfg.train_steps + 1):
        progress.step = step
        last = step == cfg.train_steps
        validated = bool(val_losses) and val_losses[-1][0] == step  # a checkpoint at a val step holds its val loss
        if is_val_step(step, cfg) and not validated:
            synchronize(device)
            if step > 0:
                train_ms += 1000 * (time.perf_counter() - clock)
            val_loss = evaluate(model, val_tokens, cfg, step, comm, device)
            val_losses.append((step, val_loss, train_ms))
            logger.log(f"step:{step}/{cfg.train_steps} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                       f"step_avg:{train_ms / max(step, 1):.2f}ms")
            if not math.isfinite(val_loss):
                stopped = f"non-finite val loss {val_loss} at step {step}"
                break
            synchronize(device)
            clock = time.perf_counter()
        if last:
            break
        if cfg.save_every and step % cfg.save_every == 0 and step > first_step:
            train_ms = checkpoint_off_the_clock(step, train_ms, clock, val_losses, model, opt, loader, cfg, comm, device, logger)
            progress.checkpoint = checkpoint_path(cfg)
            clock = time.perf_counter()
        if launch_to_first_step is None:
            launch_to_first_step = time.time() - launch_time
        batch = loader.batch_for(schedule_at(step, cfg))
        if loader.passes != passes_logged:  # a host-side counter: costs the timed loop nothing
            passes_logged = loader.passes
            logger.log(f"data: pass {passes_logged} over the training data done at step {step + 1}")
        loss = train_step(model, batch, opt, step, cfg)
        if pending_loss is not None and not pending_loss.is_finite():
            stopped = f"non-finite train loss at step {step}"
            break
        pending_loss = DeferredValue(loss)
        approx_ms = train_ms + 1000 * (time.perf_counter() - clock)
        logger.log(f"step:{step + 1}/{cfg.train_steps} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / (step + 1):.2f}ms")
    if stopped is None:
        progress.step = cfg.train_steps
    logger.log(loader.usage_line())
    loader.close()
    opt.close()
    if stopped:
        logger.log(f"stopping: {stopped}")
    return dict(model=model, train_ms=train_ms, val_losses=val_losses, stopped=stopped,
                launch_to_first_step=launch_to_first_step)


# -----------------------------------------------------------------------------
# Logging: rank 0 writes logs/<run_id>.txt line by line: source, versions, config, step lines, summary.


class Logger:
    """Writes each line straight to the file (unbuffered), so a crash keeps everything logged so far and a
    failed write leaves nothing queued to fail again at close. Only rank 0 writes. On a full disk it cuts
    the partial line back off, tries to end the log with a `stopping:` line and raises DiskFullError."""

    def __init__(self, path: str | None, echo: bool = True):
        self.path, self.echo, self.size, self.disk_full = path, echo, 0, False
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file = open(path, "xb", buffering=0)  # never mix two runs in one log

    def log(self, line: str, console: bool = True):
        if self.path is None or self.disk_full:
            return
        try:
            self._write((line + "\n").encode("utf-8"))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self._end_after_disk_full()
            disk_full_or_raise(e, f"the log {self.path}")
        if console and self.echo:
            print(line, flush=True)

    def _write(self, data: bytes):
        view = memoryview(data)
        while view:  # an unbuffered write may take only part of the bytes
            view = view[self.file.write(view) :]
        self.size += len(data)  # whole lines only: where a cut line would be cut back to

    def _end_after_disk_full(self):
        """Best effort: drop the cut line (freeing its bytes), then the stopping line may still fit."""
        self.disk_full = True
        try:
            self.file.truncate(self.size)
            self.file.seek(self.size)
            self.file.write(b"stopping: disk full\n")
        except (OSError, AttributeError, ValueError):
            pass

    def close(self):
        if self.path:
            self.file.close()


def process_start_time() -> float | None:
    """When this process was launched (Linux /proc), so start-up cost counts from the very beginning."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def environment_report() -> str:
    lines = [f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    try:
        import triton
        lines.append(f"Running Triton version {triton.__version__}")
    except ImportError:
        lines.append("Running Triton version: not installed")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi: not available"
    lines.append(smi.rstrip())
    return "\n".join(lines)


def config_json(cfg: Config) -> str:
    return json.dumps(dataclasses.asdict(cfg), separators=(",", ":"))


def log_header(logger: Logger, cfg: Config, comm: Comm, device: torch.device, accumulation: int):
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        logger.log(f.read(), console=False)
    logger.log("=" * 100, console=False)
    logger.log(environment_report(), console=False)
    logger.log("=" * 100, console=False)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    logger.log(f"track: {TRACK}")
    logger.log(f"world_size: {comm.world_size}")
    logger.log(f"grad_accum_steps: {accumulation}")
    logger.log(f"gpu: {gpu}")
    logger.log(f"config: {config_json(cfg)}")
    for line in recipe_report(cfg).splitlines():
        logger.log(f"recipe: {line}", console=False)


def log_summary(logger: Logger, result: dict, cfg: Config, device: torch.device, comm: Comm):
    train_s = result["train_ms"] / 1000
    steps = result["val_losses"][-1][0] if result["val_losses"] else 0
    tokens = trained_tokens(steps, cfg)
    if result["launch_to_first_step"] is not None:
        logger.log(f"launch_to_first_step: {result['launch_to_first_step']:.1f}s")
    if train_s > 0:
        logger.log(f"tokens_per_second: {tokens / train_s:.0f}")
        if device.type == "cuda":
            model = result["model"]
            flops = sum(schedule.batch_tokens * model.matmul_flops_per_token(schedule.window_long_tokens, schedule.seq_len)
                        for schedule in (schedule_at(s, cfg) for s in range(steps)))
            achieved = flops / train_s / comm.world_size / 1e12
            logger.log(f"mfu: {100 * achieved / cfg.gpu_peak_tflops:.1f}% ({achieved:.0f} TFLOP/s per GPU of {cfg.gpu_peak_tflops:.0f} peak)")
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) // 2 ** 20
        reserved = torch.cuda.max_memory_reserved(device) // 2 ** 20
    else:  # the process's peak resident memory stands in for both on a CPU
        import resource
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    logger.log(f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB")


def trained_tokens(steps: int, cfg: Config) -> int:
    """Training tokens of the first steps steps: the schedule's batch of each (stages differ)."""
    return sum(schedule_at(step, cfg).batch_tokens for step in range(steps))


def print_report(text: str) -> int:
    """Print a report to stdout; a reader that closes the pipe early (| head) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


class StopSignal(BaseException):
    """SIGTERM (how torchrun and batch schedulers stop a job), raised like Ctrl-C's KeyboardInterrupt so both
    stop through the same path: a `stopping:` line, the open files closed, the process group torn down."""


def stop_on_sigterm(received: list):
    """Installed by main() only, so importing this file changes no process state; returns the old handler.
    The first SIGTERM raises StopSignal; later ones are ignored while the stop is under way."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return None

    def raise_stop(signum, frame):
        if not received:
            received.append(signal.Signals(signum).name)
            raise StopSignal(received[0])

    return signal.signal(signal.SIGTERM, raise_stop)


def folder_problem(flag: str, folder: str, create: bool) -> str:
    """Why files cannot be written into folder (empty string: they can), found by trying."""
    folder = folder or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{flag} {folder} is a file, not a folder: pick a folder"
    if not os.path.isdir(folder):
        ancestor = os.path.dirname(os.path.abspath(folder))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            return f"{flag} {folder}: {ancestor} is a file, not a folder: pick another path"
        if not create:
            return f"{flag}: folder {folder!r} does not exist: create it first (mkdir -p {folder}) or pick another path"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            return f"{flag} {folder}: cannot create the folder ({e.strerror}): pick a writable folder"
    try:
        with tempfile.TemporaryFile(dir=folder):  # permissions, read-only mounts and quotas all show here
            pass
    except OSError as e:
        return f"{flag} {folder}: cannot write there ({e.strerror}): pick a writable folder"
    return ""


def output_problem(cfg: Config) -> str:
    """Checked before training, so that no output fails after the work is done: the log, the checkpoints,
    --save-model's folder, and the file to resume from. Empty string: all fine."""
    log_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
    problem = folder_problem("--log-dir", cfg.log_dir, create=True)
    if not problem and os.path.exists(log_path):
        problem = f"{log_path} exists: choose another --run-id"
    if not problem and cfg.save_every:
        problem = folder_problem("--checkpoint-dir", cfg.checkpoint_dir, create=True)
    if not problem and cfg.save_model:
        if os.path.isdir(cfg.save_model):
            problem = f"--save-model {cfg.save_model} is a folder: pass a file path such as {os.path.join(cfg.save_model, 'model.pt')}"
        else:
            problem = folder_problem("--save-model", os.path.dirname(cfg.save_model), create=False)
    if not problem and cfg.resume and not os.path.isfile(cfg.resume):
        problem = f"--resume {cfg.resume}: no such file: pass a checkpoint written by --save-every"
    return problem


def agree_on_outputs(cfg: Config, comm: Comm) -> Config:
    """Rank 0 picks the run id and checks the outputs; every rank gets both, so no rank trains on alone."""
    shared = [cfg.run_id or str(uuid.uuid4()), ""]
    if comm.rank == 0:
        shared[1] = output_problem(dataclasses.replace(cfg, run_id=shared[0]))
    if comm.world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[1]:
        raise ConfigError(shared[1])
    return dataclasses.replace(cfg, run_id=shared[0])


def resume_hint(progress: RunProgress) -> str:
    if progress.checkpoint:
        return f"; resume with --resume {progress.checkpoint}"
    return "; no checkpoint was written (--save-every N keeps one)"


def main(argv=None) -> int:
    launch_time = process_start_time() or time.time()
    try:
        cfg, report = parse_command(argv)
        check_schedule(cfg, training=report is None)
        if report is not None:
            return print_report(recipe_report(cfg) if report == "recipe" else schedule_report(cfg))
        comm, device = setup_distributed(cfg)
        accumulation = check_config(cfg, comm.world_size)
        cfg = agree_on_outputs(cfg, comm)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
            print(f"train_gpt.py: error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    logger = Logger(os.path.join(cfg.log_dir, f"{cfg.run_id}.txt") if comm.rank == 0 else None)
    progress, signals = RunProgress(checkpoint=cfg.resume), []
    previous_handler = stop_on_sigterm(signals)
    status, problem = 0, ""
    try:
        log_header(logger, cfg, comm, device, accumulation)
        result = run_training(cfg, logger, comm, device, accumulation, launch_time, progress)
        log_summary(logger, result, cfg, device, comm)
        if cfg.save_model and comm.rank == 0:
            write_atomically(result["model"].state_dict(), cfg.save_model, f"--save-model {cfg.save_model}")
        if result["stopped"]:  # the same error line as every other stop
            problem, status = f"stopped: {result['stopped']}{resume_hint(progress)}", 1
    except (DataError, ConfigError) as e:
        logger.log(f"stopping: data error: {e}", console=False)
        problem, status = str(e), 2
    except OutputError as e:
        logger.log(f"stopping: at step {progress.step}: {e}", console=False)
        problem, status = f"stopped at step {progress.step}: {e}{resume_hint(progress)}", 1
    except (KeyboardInterrupt, StopSignal) as e:
        status, problem = stopped_by_signal(e, logger, progress)
    except Exception:
        if not signals and comm.world_size > 1:  # a peer stopped on SIGTERM before ours came: a collective failed here
            wait_for_signal(signals)
        if not signals:
            raise
        # A peer process stopped on the same SIGTERM, so a collective failed here: the same stop.
        status, problem = stopped_by_signal(StopSignal(signals[0]), logger, progress)
    finally:
        logger.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    if comm.rank == 0 and problem:
        print(f"train_gpt.py: error: {problem}", file=sys.stderr)
    if comm.rank == 0 and logger.path:
        print(f"log: {logger.path}")
    return status


def wait_for_signal(received: list, seconds: float = 3.0):
    """Give this process's own SIGTERM a moment to arrive (torchrun signals every process, not all at once): it is
    then this stop's reason instead of the broken collective it caused. A real crash only waits these seconds."""
    deadline = time.monotonic() + seconds
    try:
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    except StopSignal:  # the handler noted it in `received` before raising
        pass


def stopped_by_signal(e: BaseException, logger: Logger, progress: RunProgress) -> tuple:
    """Ctrl-C (exit 130) or SIGTERM (exit 143, as if the signal had killed the process): (status, message)."""
    what = "SIGTERM" if isinstance(e, StopSignal) else "Ctrl-C"
    line = f"{what} at step {progress.step}"
    try:
        logger.log(f"stopping: {line}")
    except DiskFullError:
        pass
    return (143 if isinstance(e, StopSignal) else 130), f"stopped by {line}{resume_hint(progress)}"


if __name__ == "__main__":
    sys.exit(main())
