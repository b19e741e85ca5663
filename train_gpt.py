"""train_gpt.py: train a GPT-2-small-class model to 3.28 FineWeb val loss, as fast as the hardware allows.

One self-contained file, read top to bottom: config, model, optimizer, data, training, logging.
Importing it starts nothing; `python train_gpt.py` (or torchrun) trains.

    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the record configuration, 8 GPUs
    torchrun --standalone --nproc_per_node=1 train_gpt.py        # same math on 1 GPU (8 accumulation steps)
    python train_gpt.py --preset tiny --device cpu               # a small model on data/sample/, on CPU
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train_gpt.py --stage-seq-len 8192,16384,24576,24576  # 16 GPUs: half-length sequences

The global batch (tokens per optimizer step) of each stage is fixed by the config; the number of processes only
changes how it is split: accumulation steps = stage batch tokens / (world_size * stage sequence length).
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
import shlex
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

# -----------------------------------------------------------------------------
# Config: one dataclass whose defaults are the 8xH100 record; flags override any field.


@dataclass
class Config:
    # data
    train_files: str = field(default="data/fineweb10B/fineweb_train_*.bin", metadata={"help": "glob of training shards, read in sorted order"})
    val_files: str = field(default="data/fineweb10B/fineweb_val_*.bin", metadata={"help": "glob of validation shards"})
    val_tokens: int = field(default=10_485_760, metadata={"help": "validate on exactly the first N tokens of the val files"})
    val_seq_len: int = field(default=262_144, metadata={"help": "tokens per validation sequence, dealt round-robin to the processes"})
    val_every: int = field(default=250, metadata={"help": "validate every N steps (0: only at the start and the end)"})
    # schedule: stages of their own batch, sequence length, windows, LR and multi-token weights, then an extension
    train_steps: int = field(default=1285, metadata={"help": "optimizer steps, the extension included"})
    stage_steps: tuple = field(default=(0, 423, 847, 1270), metadata={"help": "first step of each stage, from 0; the last stage runs to --train-steps"})
    extension_steps: int = field(default=15, metadata={"help": "steps after the scheduled ones, at the final LR: the LR cooldown ends at --train-steps minus this"})
    cooldown_frac: float = field(default=0.6, metadata={"help": "fraction of the scheduled steps over which the LR decays linearly to --final-lr-frac"})
    final_lr_frac: float = field(default=0.15, metadata={"help": "LR multiplier at the end of the cooldown"})
    stage_batch_tokens: tuple = field(default=(131_072, 262_144, 393_216, 393_216), metadata={"help": "per stage: tokens per optimizer step, over all processes"})
    stage_seq_len: tuple = field(default=(16_384, 32_768, 49_152, 49_152), metadata={"help": "per stage: tokens per training sequence (per process per accumulation step)"})
    stage_max_doc_len: tuple = field(default=(896, 2048, 2048, 2048), metadata={"help": "per stage: longest document in a training sequence; longer ones are cut"})
    stage_short_window_blocks: tuple = field(default=(1, 3, 5, 6), metadata={"help": "per stage: short attention window in 128-token blocks"})
    stage_long_window_blocks: tuple = field(default=(3, 7, 11, 13), metadata={"help": "per stage: long attention window in 128-token blocks"})
    final_long_window_blocks: int = field(default=20, metadata={"help": "long window of the final validation, in 128-token blocks (0: the last stage's)"})
    stage_lr_mult: tuple = field(default=(1.0, 1.52, 1.73, 1.73), metadata={"help": "per stage: LR multiplier until the cooldown takes it to --final-lr-frac", "parse": "floats"})
    stage_mtp_weights_start: tuple = field(default=((1.0, 0.5, 0.25), (1.0, 0.5), (1.0,), (1.0,)), metadata={"help": "per stage: multi-token prediction weights (next token first) at the stage's start, stages separated by '/'", "parse": "float_lists"})
    stage_mtp_weights_end: tuple = field(default=((1.0, 0.5, 0.0), (1.0, 0.0), (1.0,), (1.0,)), metadata={"help": "per stage: the same weights at the stage's end (linear in between), stages separated by '/'", "parse": "float_lists"})
    stage_prefix_weight_start: tuple = field(default=(0.25, 0.25, 0.0, 0.0), metadata={"help": "per stage: weight of the prefix-token term (the longest proper byte-prefix of the next token that is a GPT-2 token) at the stage's start", "parse": "floats"})
    stage_prefix_weight_end: tuple = field(default=(0.25, 0.0, 0.0, 0.0), metadata={"help": "per stage: the prefix-token weight at the stage's end (linear in between)", "parse": "floats"})
    muon_momentum_cooldown_steps: int = field(default=50, metadata={"help": "last steps over which Muon momentum returns from final to start"})
    adam_odd_steps_only: bool = field(default=True, metadata={"help": "Adam steps on odd steps only; even steps' gradients accumulate into them (off: Adam every step)"})
    embed_split_stage: int = field(default=2, metadata={"help": "embedding tied to the head until the first odd step of this stage, untied after it (0: never tied)"})
    attn_scale_log_growth: float = field(default=0.2, metadata={"help": "YaRN: at each long-window change attn scale *= 1 + c*ln(new/old) (0: fixed)"})
    # model
    vocab_size: int = field(default=50304, metadata={"help": "GPT-2's 50257 tokens padded to a multiple of 128"})
    num_layers: int = field(default=11, metadata={"help": "transformer blocks"})
    model_dim: int = field(default=768, metadata={"help": "residual stream width"})
    num_heads: int = field(default=6, metadata={"help": "attention heads (num_heads * head_dim = model_dim)"})
    head_dim: int = field(default=128, metadata={"help": "width of one attention head"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width / model_dim"})
    no_attn_layers: tuple = field(default=(6,), metadata={"help": "layers without attention (comma-separated, '' for none)"})
    long_window_layers: tuple = field(default=(3, 10), metadata={"help": "layers with the long window; the rest have the short one"})
    attn_scale: float = field(default=0.1, metadata={"help": "softmax scale of attention (QK-normed) in the first stage; YaRN grows it"})
    attn_gate_dim: int = field(default=12, metadata={"help": "channels read by the smear gate, and half of them from the attention input and half from the value embedding by the value gates"})
    logit_cap: float = field(default=23.0, metadata={"help": "logits squashed to (0, cap) by cap*sigmoid((z + shift)/div)"})
    logit_shift: float = field(default=5.0, metadata={"help": "head logits cap*sigmoid((z + shift)/div): the shift"})
    logit_div: float = field(default=7.5, metadata={"help": "head logits cap*sigmoid((z + shift)/div): the divisor"})
    bigram_rows: int = field(default=377_280, metadata={"help": "rows of the bigram hash embedding (0: none, an ablation; 377,280 = 15 x 50304 / 2)"})
    bigram_dim: int = field(default=768, metadata={"help": "width of the bigram hash embedding: added to the first N residual channels"})
    bigram_sign_rows: int = field(default=8192, metadata={"help": "rows of the fixed random +-1 sign table of the bigram embedding"})
    value_embed_layers: tuple = field(default=(1, 2, 8, 9, 10), metadata={"help": "layers with their own value-embedding table, mixed into V by per-head gates 2*sigmoid(W [x[:6], ve[:6]]) (on the MUDD layer by MUDD's lanes) ('': none, an ablation)"})
    smear_gate: bool = field(default=True, metadata={"help": "each token's embedding adds the previous token's, times lambda*sigmoid(W x[:12]) (both start at 0); off: an ablation"})
    skip_connection: tuple = field(default=(3, 6), metadata={"help": "FROM,TO: layer FROM's output added before layer TO (which has no attention), times sigmoid(lambda) x the post gate's skip lane ('': none, an ablation)"})
    attn_source_layer: int = field(default=7, metadata={"help": "this layer's output, normed, is the attention input of every later layer, and a MUDD source (-1: none, an ablation)"})
    mudd: bool = field(default=True, metadata={"help": "MUDD dense connections: per-token coefficients mix earlier layers' outputs into the last layer (its V, stream and sublayer scales) and into the stream after it; off: an ablation (the last layer is a plain block)"})
    mudd_hidden: int = field(default=64, metadata={"help": "hidden width of the MUDD and MUDD-gate coefficient MLPs (W2 gelu(W1 x) + b2)"})
    post_gate_layer: int = field(default=4, metadata={"help": "the post gate (per-token gates of this and later layers) reads the stream at the start of this layer; the pre gate, those of earlier layers, reads x0 (past the last layer: the pre gate serves all)"})
    xsa_layers: tuple = field(default=(1, 3, 4, 7), metadata={"help": "layers whose attention output loses tanh(alpha) of its component along each head's value (XSA; alpha per token and head from the gates) ('': none)"})
    attn_gate_layers: tuple = field(default=(3, 10), metadata={"help": "layers whose attention heads are scaled by a per-token gate ('': none)"})
    dc_layer: int = field(default=10, metadata={"help": "layer with post-only DC (dynamically composable attention): heads' window probabilities mixed across heads, times V, added (-1: none)"})
    dc_window: int = field(default=112, metadata={"help": "DC's own window: the query and this many minus one previous tokens of its document"})
    key_offset: bool = field(default=True, metadata={"help": "on the long-window layers each key's position-free (zero-frequency RoPE) dims are taken from the previous token; off: an ablation"})
    paired_head_layers: tuple = field(default=(0, 2, 5, 9), metadata={"help": "layers whose heads attend in pairs over a sequence twice as long ('': none, an ablation)"})
    yarn: bool = field(default=True, metadata={"help": "YaRN: at each long-window change between stages the RoPE frequencies are rescaled (ramp alpha 1, beta 32) and attention takes the schedule's scale; off: an ablation"})
    head_init_std: float = field(default=0.005, metadata={"help": "head initialized N(0, std), the embedding a copy of it (tied at first)"})
    fp8_head: bool = field(default=True, metadata={"help": "FP8 lm_head matmul where supported (Hopper); bf16 elsewhere"})
    fp8_mlp: bool = field(default=True, metadata={"help": "FP8 MLP up and down projections in training, with delayed per-layer scales, where supported (Hopper); bf16 elsewhere"})
    fp8_x_max: float = field(default=100.0, metadata={"help": "FP8 head: largest |input| kept, its scale is this/448"})
    fp8_w_max: float = field(default=1.6, metadata={"help": "FP8 head: largest |weight| kept, larger ones saturate; its scale is this/448"})
    fp8_grad_max: float = field(default=0.75, metadata={"help": "FP8 head backward: the output gradient's scale is this/448/accumulation steps"})
    fp32_masters: bool = field(default=False, metadata={"help": "store every parameter in fp32 and Muon's weights as plain fp32 (the storage before issue 19, for a GPU A/B); default: the script's storage, bf16 tables, head, gates and Muon matrices (plus 16 low bits each in Muon's state), fp32 lambdas"})
    # optimizer: the per-parameter table is recipe(); these are its base values
    muon_lr: float = field(default=0.023, metadata={"help": "Muon base learning rate (hidden matrices; the table adds shape factors)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon Nesterov momentum after warm-up"})
    muon_momentum_start: float = field(default=0.85, metadata={"help": "Muon momentum at step 0"})
    muon_momentum_warmup_steps: int = field(default=300, metadata={"help": "steps to move Muon momentum from start to final"})
    orthogonalizer: str = field(default="polar_express_2026", metadata={"help": "Muon's orthogonalization: polar_express_2026 (the 2026 script's five Polar Express steps) or polar_express (each step but the last shrunk by 1.02, an ablation)"})
    normuon_beta2: float = field(default=0.9, metadata={"help": "NorMuon: EMA of the squared update along each matrix's smaller dimension, evened out (0: plain Muon)"})
    adam_lr: float = field(default=0.008, metadata={"help": "Adam base learning rate (the table multiplies it per parameter)"})
    adam_eps: float = field(default=1e-10, metadata={"help": "Adam epsilon"})
    muon_weight_decay: float = field(default=1.2, metadata={"help": "cautious weight decay of Muon matrices, times base LR x effective LR"})
    adam_weight_decay: float = field(default=0.005, metadata={"help": "cautious weight decay of Adam tensors (times the table's multiplier), times effective LR squared"})
    # run
    seed: int = field(default=0, metadata={"help": "seed of the weight initialization"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    compile: bool = field(default=True, metadata={"help": "torch.compile each block and the head once (regional compilation); compiling always warms up >= 1 untimed step"})
    compile_glue: bool = field(default=False, metadata={"help": "with --compile, compile the code between the compiled blocks too: the attention masks (BlockMask building), the embeddings (smear, bigram, value embeddings, norm) and MUDD-1 and the final norm; the same math in fewer kernels; not yet A/B-timed on GPUs"})
    triton_kernels: str = field(default="", metadata={"help": "Triton kernels instead of their PyTorch code, comma-separated: ce (fused softcapped cross-entropy with the multi-token weights, forward and backward), symmetric (Muon's XX^T and bA+cA^2 on the tiles above the diagonal, mirrored), mlp (ReLU^2 in the epilogues of the MLP's first matmul and its backward); needs triton, on --device cpu TRITON_INTERPRET=1; not yet A/B-timed on GPUs ('': none)"})
    warmup_steps: int = field(default=3, metadata={"help": "untimed steps that compile every shape, then everything is reset (0: none)"})
    run_id: str = field(default="", metadata={"help": "log name under --log-dir (default: a random uuid)"})
    log_dir: str = field(default="logs", metadata={"help": "folder of the run logs"})
    save_model: str = field(default="", metadata={"help": "write the final weights to this path (rank 0)"})
    gpu_peak_tflops: float = field(default=800.0, metadata={"help": "dense bf16 peak per GPU, for the MFU figure (H100 measured: ~800)"})
    save_every: int = field(default=0, metadata={"help": "every N steps write a checkpoint to --checkpoint-dir/<run_id>.pt, off the clock (0: never); one at an odd step also holds every process's gradients of the even step before it (an even N never does)"})
    checkpoint_dir: str = field(default="checkpoints", metadata={"help": "folder of the --save-every checkpoints (one file per run, replaced atomically)"})
    resume: str = field(default="", metadata={"help": "continue from this checkpoint, bit for bit after any step: weights, optimizer, data position, clock and each process's RNG and carried gradients (same settings)"})


# The defaults above, the record, are the public speedrun's script of 2026-08-01 (modded-nanogpt f411b3d3, its
# record #89: 1285 steps, about 339M tokens to 3.28). Three stages of 423/424/423 steps (round(1270/3),
# round(2 x 1270/3)), then 15 extension steps at the final LR and windows; 8 sequences per step in every stage. The
# LR grows with the batch ((16/8)^0.6, (24/8)^0.5) and from step 508 (int(0.4 x 1270)) cools down linearly from the
# stage's multiplier to 0.15 at step 1270, so the extension's 1.73 is never used. The split step is 847: odd, so
# Adam steps on it. Muon's momentum cools down over the last 50 of the 1285 steps (from 1235). The prefix-token
# term weighs 0.25 in stage 0 and falls to 0 over stage 1.
#
# `--preset tiny` is the same structure at CPU size, on data/sample/: 4 layers of 6 heads in the record's pattern
# (paired heads first, the skip into the layer without attention, whose output every later attention reads, key
# offset and value embeddings on the long-window layers, XSA, the gated attention and DC on the last layer, which
# is the MUDD layer), the pre gate on layers 0-1 and the post gate from layer 2, every loss term (multi-token,
# prefix) and the split; two sequences per step in every stage, 50 steps.
TINY = dict(
    train_files="data/sample/sample_train_*.bin", val_files="data/sample/sample_val_*.bin",
    val_tokens=8192, val_seq_len=512, val_every=25,
    train_steps=50, extension_steps=4, stage_steps=(0, 15, 30, 46),
    stage_batch_tokens=(512, 768, 1024, 1024), stage_seq_len=(256, 384, 512, 512), stage_max_doc_len=(128, 256, 256, 256),
    stage_short_window_blocks=(1, 1, 2, 2), stage_long_window_blocks=(2, 3, 4, 5), final_long_window_blocks=6,
    muon_momentum_warmup_steps=10, muon_momentum_cooldown_steps=5,
    num_layers=4, model_dim=96, num_heads=6, head_dim=16, no_attn_layers=(2,), long_window_layers=(1, 3),
    paired_head_layers=(0,), value_embed_layers=(1, 3), skip_connection=(1, 2), attn_source_layer=2,
    post_gate_layer=2, xsa_layers=(1,), attn_gate_layers=(1, 3), dc_layer=3,
    bigram_rows=4099, bigram_dim=96, bigram_sign_rows=256,
    compile=False, warmup_steps=0, fp8_head=False,
)

PRESETS = {"record": {}, "r2026": {}, "tiny": TINY}  # r2026: the record's recipe, by its name

BLOCK_SIZE = 128  # FlexAttention block: sequence lengths and windows are counted in these
VAL_HEAD_CHUNK = 32_768  # validation tokens per head call: bf16 logits of 3.3 GB, fp32 of 6.6 GB at vocab 50304
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


def parse_float_lists(text: str) -> tuple:
    """'1,0.5,0.25/1,0.5/1' -> ((1.0, 0.5, 0.25), (1.0, 0.5), (1.0,)): one list of numbers per stage."""
    return tuple(parse_float_tuple(part) for part in text.split("/")) if text.strip() else ()


TUPLE_PARSERS = {"ints": parse_int_tuple, "floats": parse_float_tuple, "float_lists": parse_float_lists}
TUPLE_METAVARS = {"ints": "I,J,...", "floats": "X,Y,...", "float_lists": "X,Y/Z/..."}


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def format_default(value) -> str:
    """A default as the flag takes it: 1,2,3 for a tuple, 1,0.5/1 for per-stage lists, '' for an empty one."""
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return "/".join(",".join(map(str, part)) for part in value)
        return ",".join(map(str, value)) or "''"
    return repr(value) if isinstance(value, str) else str(value)


# Values that the recipe table sets per parameter row, so that no single flag can: a flag of that name is refused
# with the rows it would have to change (this file's earlier flags of these names did nothing under the table).
TABLE_VALUES = {
    "--adam-beta1": "Adam's betas", "--adam-beta2": "Adam's betas",
    "--embed-lr-mult": "the embeddings' LR multipliers", "--scalar-lr-mult": "the scalars' LR multipliers",
    "--mlp-in-lr-mult": "the MLP matrices' LR multipliers", "--gates-on-adam": "which optimizer trains the gates",
}


def refuse_table_values(argv: list):
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in TABLE_VALUES or flag.startswith("--no-") and "--" + flag[5:] in TABLE_VALUES:
            what = TABLE_VALUES.get(flag, TABLE_VALUES.get("--" + flag[5:]))
            raise ConfigError(f"{flag}: the recipe table sets {what} per parameter row, so no flag changes them all; "
                              f"python train_gpt.py --print-recipe shows each row's value, edit its row in recipe() to change it")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="train_gpt.py", description="Train the speedrun GPT. No flags = the 8xH100 record configuration.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="record",
                        help="starting values: 'record' (8xH100 FineWeb: the 2026-05-20 public record's recipe; 'r2026' is the same), 'tiny' (the same model and schedule at CPU size, on data/sample/); flags override (default: record)")
    parser.add_argument("--print-recipe", action="store_true", default=argparse.SUPPRESS,
                        help="print which optimizer, LR, betas, weight decay and init every parameter gets under these settings, then exit")
    parser.add_argument("--print-schedule", action="store_true", default=argparse.SUPPRESS,
                        help="print the schedule as one JSON line per step 0..train_steps, then exit (no data, no GPU)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a help that says its own default in words keeps only that
            help_text += f" (default: {format_default(default)})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, tuple):
            kind = f.metadata.get("parse", "ints")
            parser.add_argument(flag, type=TUPLE_PARSERS[kind], default=argparse.SUPPRESS, metavar=TUPLE_METAVARS[kind], help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=type(default).__name__.upper(), help=help_text)
    return parser


REPORTS = ("recipe", "schedule")  # --print-recipe, --print-schedule: printed in this order, then exit


def parse_command(argv=None) -> tuple:
    """(config, reports): preset values first, then every flag given; reports names what to print instead of
    training (a tuple of REPORTS, empty to train). A --train-steps without --stage-steps scales the preset's
    schedule to it (scaled_schedule)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    refuse_table_values(argv)
    args = vars(build_arg_parser().parse_args(argv))
    preset = args.pop("preset")
    reports = tuple(name for name in REPORTS if args.pop(f"print_{name}", False))
    values = {**PRESETS[preset], **args}
    if "train_steps" in args and "stage_steps" not in args:
        scaled = scaled_schedule(dataclasses.replace(Config(), **PRESETS[preset]), args["train_steps"],
                                 args.get("extension_steps"), argv)
        values = {**PRESETS[preset], **scaled, **args}  # a step count given as a flag is kept as given
    return dataclasses.replace(Config(), **values), reports


def parse_config(argv=None) -> Config:
    return parse_command(argv)[0]


# A preset's schedule at another length, as the public script defines its stages as fractions of the run: every
# step count of it scaled by --train-steps / the preset's train_steps to the nearest step (the same compression as
# records/benchmark.py's): the stage starts, the extension (at least one step if the preset has one, and the last
# stage starts with it where the preset's does), Muon's momentum warm-up and cool-down. The LR cooldown (a
# fraction) and the split (a stage) follow by themselves.
SCALED_STEP_COUNTS = ("stage_steps", "extension_steps", "muon_momentum_warmup_steps", "muon_momentum_cooldown_steps")


def scaled_steps(steps: int, scale: float) -> int:
    return int(round(steps * scale))


def scaled_stage_steps(preset: Config, train_steps: int, extension_steps: int | None = None) -> tuple:
    """(stage starts, extension steps) of the preset's schedule at train_steps steps; the extension as given if it is."""
    scale = train_steps / preset.train_steps
    starts = [scaled_steps(start, scale) for start in preset.stage_steps]
    scheduled_end = preset.train_steps - preset.extension_steps
    extension = train_steps - scaled_steps(scheduled_end, scale) if extension_steps is None else extension_steps
    if preset.extension_steps and extension_steps is None:
        extension = max(1, extension)
    if preset.extension_steps and preset.stage_steps[-1] == scheduled_end:
        starts[-1] = train_steps - extension
    return tuple(starts), extension


def stage_starts_fit(starts: tuple, train_steps: int) -> bool:
    return starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:])) and starts[-1] < train_steps


def scaled_schedule(preset: Config, train_steps: int, extension_steps: int | None, argv: list) -> dict:
    """The SCALED_STEP_COUNTS of the preset at train_steps; a train_steps too few for its stages is refused with
    the command at the fewest steps that fit (argv: the flags given, to repeat in it)."""
    if train_steps <= 0 or not preset.stage_steps:
        return {}  # check_schedule refuses a non-positive --train-steps
    starts, extension = scaled_stage_steps(preset, train_steps, extension_steps)
    if not stage_starts_fit(starts, train_steps):
        fewest = next((n for n in range(train_steps + 1, preset.train_steps + 1)
                       if stage_starts_fit(scaled_stage_steps(preset, n, extension_steps)[0], n)), None)
        hint = f"; give --stage-steps with {len(starts)} increasing starts below --train-steps"
        if fewest is not None:
            hint = (f"; {fewest} steps is the fewest that fits: python train_gpt.py {command_with_train_steps(argv, fewest)}"
                    f" (or give --stage-steps)")
        raise ConfigError(f"--train-steps {train_steps} is too few for the preset's {len(starts)} stages: scaled "
                          f"from its {preset.train_steps} steps they would start at steps {','.join(map(str, starts))}{hint}")
    scale = train_steps / preset.train_steps
    return dict(stage_steps=starts, extension_steps=extension,
                muon_momentum_warmup_steps=scaled_steps(preset.muon_momentum_warmup_steps, scale),
                muon_momentum_cooldown_steps=scaled_steps(preset.muon_momentum_cooldown_steps, scale))


def command_with_train_steps(argv: list, train_steps: int) -> str:
    """The flags of argv with --train-steps set to train_steps, quoted for a shell."""
    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--train-steps" and i + 1 < len(argv):
            args += ["--train-steps", str(train_steps)]
            i += 2
            continue
        args.append(f"--train-steps={train_steps}" if argv[i].startswith("--train-steps=") else argv[i])
        i += 1
    return " ".join(shlex.quote(arg) for arg in args)


def check_config(cfg: Config, world_size: int) -> int:
    """Refuse impossible settings with a one-line reason; returns the first stage's gradient accumulation steps."""
    check_settings(cfg)
    check_stage_batches(cfg, world_size)
    check_triton_kernels(cfg)
    return accumulation_steps(cfg.stage_batch_tokens[0], cfg.stage_seq_len[0], world_size)


def check_settings(cfg: Config):
    """The checks of check_config that need neither the world size nor the machine: also run before a report
    (--print-recipe, --print-schedule) prints, so a report never shows values a run would refuse."""
    positive = ["val_tokens", "val_seq_len", "train_steps", "vocab_size", "num_layers", "model_dim", "num_heads",
                "head_dim", "mlp_ratio"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_name(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.val_seq_len % BLOCK_SIZE:
        raise ConfigError(f"--val-seq-len {cfg.val_seq_len} must be a multiple of {BLOCK_SIZE} (attention block size)")
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
    if not 0 < cfg.attn_gate_dim <= cfg.model_dim:
        raise ConfigError(f"--attn-gate-dim {cfg.attn_gate_dim} must be in 1..{cfg.model_dim}")
    if cfg.bigram_rows and not 0 < cfg.bigram_dim <= cfg.model_dim:
        raise ConfigError(f"--bigram-dim {cfg.bigram_dim} must be in 1..--model-dim {cfg.model_dim}")
    if cfg.orthogonalizer not in ORTHOGONALIZERS:
        raise ConfigError(f"--orthogonalizer {cfg.orthogonalizer!r}: choose one of {', '.join(ORTHOGONALIZERS)}")
    if cfg.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device {cfg.device!r}: choose cuda or cpu")
    if not 0 <= cfg.normuon_beta2 < 1:
        raise ConfigError(f"--normuon-beta2 {cfg.normuon_beta2} must be in [0, 1)")
    if not 0 <= cfg.cooldown_frac <= 1:
        raise ConfigError(f"--cooldown-frac {cfg.cooldown_frac} must be in [0, 1]")
    if cfg.val_every < 0 or cfg.warmup_steps < 0 or cfg.muon_momentum_warmup_steps < 0:
        raise ConfigError("--val-every, --warmup-steps and --muon-momentum-warmup-steps must be >= 0")
    check_hyperparameter_ranges(cfg)
    check_run_names(cfg)
    if cfg.compile_glue and not cfg.compile:
        raise ConfigError("--compile-glue compiles the code between the compiled blocks: it needs --compile")


def check_layer_lists(cfg: Config):
    """Every layer list names existing layers, and the structural rules of the record's layout hold."""
    for name in ["no_attn_layers", "long_window_layers", "value_embed_layers", "paired_head_layers", "skip_connection"]:
        bad = [i for i in getattr(cfg, name) if not 0 <= i < cfg.num_layers]
        if bad:
            raise ConfigError(f"{flag_name(name)} {','.join(map(str, bad))}: layers are numbered 0..{cfg.num_layers - 1}")
    for name in ["attn_source_layer", "dc_layer"]:
        if not -1 <= getattr(cfg, name) < cfg.num_layers:
            raise ConfigError(f"{flag_name(name)} {getattr(cfg, name)}: layers are numbered 0..{cfg.num_layers - 1} (-1: none)")
    attention_layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attn_layers]
    for name in ["xsa_layers", "attn_gate_layers"]:
        bad = [i for i in getattr(cfg, name) if i not in attention_layers]
        if bad:
            raise ConfigError(f"{flag_name(name)} {','.join(map(str, bad))}: not attention layers (0..{cfg.num_layers - 1} "
                              f"but --no-attn-layers {','.join(map(str, cfg.no_attn_layers))})")
    if set(cfg.xsa_layers) & set(cfg.paired_head_layers):
        raise ConfigError("--xsa-layers and --paired-head-layers overlap: XSA needs each head's own value, which paired heads mix")
    if cfg.dc_layer >= 0 and (cfg.dc_layer not in attention_layers or cfg.dc_layer in cfg.paired_head_layers):
        raise ConfigError(f"--dc-layer {cfg.dc_layer} must be an attention layer without paired heads")
    if not 0 < cfg.dc_window or cfg.mudd_hidden <= 0:
        raise ConfigError("--dc-window and --mudd-hidden must be positive")
    if cfg.post_gate_layer < 0:
        raise ConfigError(f"--post-gate-layer {cfg.post_gate_layer} must be >= 0 (past the last layer: no post gate)")
    if cfg.skip_connection and not cfg.skip_connection[0] < cfg.post_gate_layer <= cfg.skip_connection[-1]:
        raise ConfigError(f"--post-gate-layer {cfg.post_gate_layer} must be after the skip's FROM and at or before its TO "
                          f"(--skip-connection {','.join(map(str, cfg.skip_connection))}): the post gate holds the skip's lane")
    last = cfg.num_layers - 1
    if cfg.mudd and (last in cfg.no_attn_layers or last in cfg.paired_head_layers or not cfg.skip_connection
                     or not 0 <= cfg.attn_source_layer < last or not cfg.value_embed_layers):
        raise ConfigError("--mudd needs the last layer with attention and no paired heads, a --skip-connection, an "
                          "--attn-source-layer before the last and --value-embed-layers (its sources); or --no-mudd")
    if cfg.mudd and cfg.num_heads % 2:
        raise ConfigError(f"--mudd gates the last layer's value embedding in two lanes of heads: --num-heads {cfg.num_heads} must be even")
    if cfg.paired_head_layers and cfg.num_heads % 2:
        raise ConfigError(f"--paired-head-layers needs an even --num-heads, got {cfg.num_heads}")
    if cfg.skip_connection and (len(cfg.skip_connection) != 2 or cfg.skip_connection[1] not in cfg.no_attn_layers
                                or cfg.skip_connection[0] >= cfg.skip_connection[1]):
        raise ConfigError(f"--skip-connection {','.join(map(str, cfg.skip_connection))}: FROM,TO with FROM < TO and "
                          f"TO a layer without attention (--no-attn-layers {','.join(map(str, cfg.no_attn_layers))})")


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
    for name in ["muon_lr", "adam_lr", "adam_eps", "attn_scale", "logit_cap", "logit_div", "gpu_peak_tflops",
                 "fp8_x_max", "fp8_w_max", "fp8_grad_max"]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag_name(name)} must be a positive number, got {value}")
    for name in ["muon_momentum", "muon_momentum_start"]:
        value = getattr(cfg, name)
        if not 0 <= value < 1:  # a beta of 1 never forgets, above 1 the moving average grows without bound
            raise ConfigError(f"{flag_name(name)} {value} must be in [0, 1)")
    if not 0 <= cfg.final_lr_frac <= 1:
        raise ConfigError(f"--final-lr-frac {cfg.final_lr_frac} must be in [0, 1]")
    if cfg.save_every < 0:
        raise ConfigError(f"--save-every {cfg.save_every} must be >= 0 (0: no checkpoints)")


def check_run_names(cfg: Config):
    """--run-id names a file inside --log-dir and --checkpoint-dir: a path in it would write elsewhere."""
    run_id = cfg.run_id
    if any(sep in run_id for sep in ("/", "\\", os.sep, "\0")) or ".." in run_id or run_id.startswith("."):
        raise ConfigError(f"--run-id {run_id!r} must be a plain file name (no '/', no '..', not starting with '.'); "
                          f"choose the folder with --log-dir")


# -----------------------------------------------------------------------------
# Model: the 2026-08 record's GPT. Rotary QK-normed attention (paired heads on some layers, key offset on the
# long-window ones, XSA, per-token head gates, post-only DC on the last layer), ReLU^2 MLP, per-layer residual
# lambdas, value embeddings, a bigram hash embedding, smear, one gated skip, per-token gates from two MUDD gates,
# MUDD dense connections into the last layer and after it, and a softcapped head tied to the embedding until the
# split step.


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_frequencies(head_dim: int) -> Tensor:
    """Half-truncated RoPE: a quarter of the frequencies are zero, so half of each head is position-free."""
    quarter = head_dim // 4
    freqs = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
    return torch.cat([freqs, freqs.new_zeros(quarter)])


def yarn_frequencies(freqs: Tensor, windows: list, alpha: float = 1.0, beta: float = 32.0) -> Tensor:
    """YaRN as the 2026 script applies it at each change of the long window, old -> new: a frequency that turns
    fewer than alpha times over the old window is slowed by old/new (interpolated: positions in the new window
    look like positions in the old one), one that turns more than beta times is kept (local detail), and a ramp
    blends the two in between. Successive changes compound, each measured with the frequencies it finds."""
    for old, new in zip(windows, windows[1:]):
        if new != old:
            rotations = old * freqs / (2 * math.pi)
            ramp = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
            scaling = old / new
            freqs = freqs * (scaling + ramp * (1 - scaling))
    return freqs


class Rotary(nn.Module):
    """One cos/sin table for the whole model, positions 0..max_positions-1: a layer of plain heads reads the first T
    rows, a paired-head layer rows up to 2T (its doubled sequence), so one table serves both layouts and every layer
    (one copy instead of one per layer: 1.75 GiB of identical fp32 tables at the validation length)."""

    def __init__(self, head_dim: int, max_positions: int):
        super().__init__()
        theta = torch.outer(torch.arange(max_positions, dtype=torch.float32), rotary_frequencies(head_dim))
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def set_frequencies(self, freqs: Tensor):
        """Rebuild the tables in place (YaRN): compiled code reads the same buffers, nothing recompiles."""
        positions = torch.arange(self.cos.size(0), dtype=torch.float32, device=self.cos.device)
        theta = torch.outer(positions, freqs.to(self.cos.device))
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split RoPE of (B, T, H, D) x by tables broadcastable to (B, T, H, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


# Each parameter carries the init it was created with as a string (`init`), which --print-recipe shows.
def tagged(param: nn.Parameter, init: str) -> nn.Parameter:
    param.init = init
    return param


def uniform_param(*shape: int, fan_in: int) -> nn.Parameter:
    """Uniform with std 0.5/sqrt(fan_in): the speedrun's init for matrices Muon will train."""
    bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
    return tagged(nn.Parameter(torch.empty(*shape).uniform_(-bound, bound)), f"U(+-{bound:.4g})")


def zeros_param(*shape: int) -> nn.Parameter:
    return tagged(nn.Parameter(torch.zeros(shape)), "zeros")


def constant_param(value: float, *shape: int) -> nn.Parameter:
    return tagged(nn.Parameter(torch.full(shape, value)), f"{value:.4g}")


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float | Tensor) -> Tensor:
    """(B, T, H, D) in and out. A BlockMask runs FlexAttention; a dense bool mask runs SDPA (the CPU path).
    scale: a float (compiled in), or a 0-d tensor (YaRN: a new value each stage is data, not a recompile)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        if isinstance(scale, Tensor):  # the kernel scales q.k by 1 then by the tensor: the same fp32 product
            y = flex(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score * scale, block_mask=mask, scale=1.0)
        else:
            y = flex(q, k, v, block_mask=mask, scale=scale)
    else:
        if isinstance(scale, Tensor):  # SDPA takes a float: scale q instead (equal up to fp32 rounding)
            q, scale = q * scale.to(q.dtype), 1.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    # FlexAttention is only fast compiled; without torch.compile it materializes the full score matrix.
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


@dataclass
class LayerGates:
    """A layer's per-token inputs from the MUDD gates and MUDD-0, each (1, T, n) or None: the head gate, XSA's
    alpha, DC's (w1, w2) with the document ids, and on the MUDD layer the value-embedding gate and the extra V."""
    attn: Tensor | None = None
    xsa: Tensor | None = None
    dc: tuple | None = None
    ve: Tensor | None = None
    extra_v: Tensor | None = None


class CausalSelfAttention(nn.Module):
    """QK-normed rotary attention. Q and K are stored as qk_w (2, hidden, dim) apart from V (v_w), because the
    optimizer cuts Q and K into head pairs and takes V whole; the SA lambdas scale the QKV product and the output
    projection. value_gated: the layer's value embedding enters V through a per-head gate 2*sigmoid(W [x[:6],
    ve[:6]]) (on the MUDD layer MUDD-0 gives the gate instead). paired: heads attend in pairs over a sequence twice
    as long (paired_attention). Per token, from LayerGates: DC adds its cross-head correction, XSA removes each head's
    component along its own value, and a raw gate (no sigmoid) scales each head, in that order (2026-08)."""

    def __init__(self, cfg: Config, value_gated: bool = False, paired: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        if cfg.yarn:  # the scale changes per stage: a buffer, so compiled blocks read it instead of recompiling
            self.register_buffer("scale", torch.tensor(cfg.attn_scale), persistent=False)
        else:
            self.scale = cfg.attn_scale
        hidden = cfg.num_heads * cfg.head_dim
        self.qk_w = uniform_param(2, hidden, cfg.model_dim, fan_in=cfg.model_dim)
        self.v_w = uniform_param(hidden, cfg.model_dim, fan_in=cfg.model_dim)
        # O drawn like V and right after it, as the script's vo_bank; only the MLP's output matrix starts at zero,
        # so a block starts as identity plus its attention output
        self.proj_w = uniform_param(cfg.model_dim, hidden, fan_in=cfg.model_dim)
        self.sa_lambdas = tagged(nn.Parameter(torch.tensor([0.5, 1.0])), "[0.5,1]")  # QKV and output scales (Q, K are normed: V's)
        # the value embedding enters each head through a gate 2*sigmoid(W [x[:6], ve[:6]]), 1 at init
        self.value_gate_w = zeros_param(cfg.num_heads, cfg.attn_gate_dim) if value_gated else None
        self.paired = paired
        self.key_offset = False  # set by the model on its long-window layers (--key-offset)
        self.dc_window = cfg.dc_window

    def forward(self, x: Tensor, value_embed: Tensor | None, mask, cos: Tensor, sin: Tensor, gates: LayerGates) -> Tensor:
        B, T = x.shape[:2]
        qkv_w = self.sa_lambdas[0] * torch.cat([self.qk_w, self.v_w[None]])
        q, k, v = F.linear(x, qkv_w.flatten(0, 1).type_as(x)).view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        if self.paired:
            y = self.paired_attention(x, q, k, v, value_embed, mask, cos, sin)
        else:
            rope = cos[None, :T, None, :], sin[None, :T, None, :]
            q, k = rotate(rms_norm(q), *rope), rotate(rms_norm(k), *rope)
            if self.key_offset:
                k = offset_position_free_dims(k)
            v = with_value_inputs(v, x, value_embed, self.value_gate_w, gates)
            y = attend(q, k, v, mask, self.scale)
            if gates.dc is not None:
                y = dc_post_only(y, q, k, v, *gates.dc, self.scale, self.dc_window)
            if gates.xsa is not None:
                y = exclude_self_value(y, v, gates.xsa)
        if gates.attn is not None:
            y = y * gates.attn.type_as(y).unsqueeze(-1)
        return F.linear(y.reshape(B, T, -1), (self.sa_lambdas[1] * self.proj_w).type_as(y))

    def paired_attention(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, value_embed: Tensor | None, mask,
                         cos: Tensor, sin: Tensor) -> Tensor:
        """Paired heads: the (B, T, H, D) heads are laid out as a (B, 2T, H/2, D) sequence, so head h of token t sits
        at position 2t + h // (H/2) in slot h % (H/2), and the two heads sharing a slot attend to each other and to
        both heads of earlier tokens (mask on the doubled sequence: documents doubled, the window in positions). As
        in the 2026 script, RoPE rotates head h at position 2t + h % 2 (its view pairs heads 2p, 2p+1), which
        differs from the layout position for some heads; no key offset."""
        B, T, H, D = q.shape
        positions = 2 * torch.arange(T, device=x.device)[:, None] + torch.arange(H, device=x.device)[None, :] % 2
        rope = cos[positions][None], sin[positions][None]
        q, k = rotate(rms_norm(q), *rope), rotate(rms_norm(k), *rope)
        v = with_value_inputs(v, x, value_embed, self.value_gate_w, LayerGates())
        q, k, v = (t.reshape(B, 2 * T, H // 2, D) for t in (q, k, v))
        return attend(q, k, v, mask, self.scale).reshape(B, T, H, D)


def with_value_inputs(v: Tensor, x: Tensor, value_embed: Tensor | None, gate_w: Tensor | None, gates: LayerGates) -> Tensor:
    """V plus what the layer mixes into it, summed first as the script's aux_v: the gated value embedding (its own
    gate, or MUDD-0's raw lanes on the MUDD layer) and MUDD-0's extra V."""
    extra = None
    if value_embed is not None:
        gate = gates.ve if gates.ve is not None else value_gate(x, value_embed, gate_w)
        extra = (gate.unsqueeze(-1) * value_embed.view_as(v))
    if gates.extra_v is not None:
        extra = gates.extra_v.view_as(v) if extra is None else extra + gates.extra_v.view_as(v)
    return v if extra is None else v + extra


def exclude_self_value(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """Gated XSA (arXiv:2603.09078): each head's output (B, T, H, D) loses tanh(alpha) times its projection on the
    head's own value at that token, alpha (B, T, H) per token and head (0 at init: off)."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).type_as(y).unsqueeze(-1) * along * v


def dc_post_only(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, docs: Tensor, scale,
                 window: int) -> Tensor:
    """Post-only DC (dynamically composable attention, 2026-08) on (1, T, H, D) attention output y: each head h adds
    sum_s bf16(w2_h sum_h' w1n_h' P_h'[t, s]) v_h[s], where P_h' is head h' softmax of scale q.k over its own window,
    the query and the window - 1 tokens before it in its document (not the layer's window), and w1n is w1 rms-normed
    over the heads in fp32. The correction and y are summed in fp32 and rounded once, as the script's kernel. The
    keys come in blocks of BLOCK_SIZE queries with the window - 1 keys before them: banded, never (T, T)."""
    _, T, H, D = q.shape
    w1n = F.rms_norm(w1.float(), (H,), eps=1e-6).type_as(y)[0].float()  # (T, H), rounded as the script's dc_gate
    w2 = w2.type_as(y)[0].float()
    halo = window - 1
    blocks, width = -(-T // BLOCK_SIZE), BLOCK_SIZE + halo
    padded = blocks * BLOCK_SIZE

    def key_bands(t: Tensor) -> Tensor:  # (T, H, D) -> (blocks, width, H, D)
        t = F.pad(t, (0, 0, 0, 0, halo, padded - T))
        return t.unfold(0, width, BLOCK_SIZE).permute(0, 3, 1, 2)

    def query_blocks(t: Tensor) -> Tensor:  # (T, ...) -> (blocks, BLOCK_SIZE, ...)
        return F.pad(t, [0, 0] * (t.ndim - 1) + [0, padded - T]).view(blocks, BLOCK_SIZE, *t.shape[1:])

    qb, kb, vb = query_blocks(q[0]).float(), key_bands(k[0]).float(), key_bands(v[0])
    scores = torch.einsum("nqhd,nkhd->nhqk", qb, kb) * (scale.float() if isinstance(scale, Tensor) else scale)
    q_pos = torch.arange(padded, device=q.device).view(blocks, BLOCK_SIZE, 1)
    k_pos = (torch.arange(blocks, device=q.device) * BLOCK_SIZE).view(blocks, 1, 1) - halo + torch.arange(width, device=q.device)
    doc_pad = F.pad(docs, (halo, padded - T), value=-1)
    q_doc = query_blocks(docs)
    k_doc = doc_pad.unfold(0, width, BLOCK_SIZE)
    behind = q_pos - k_pos
    valid = (behind >= 0) & (behind < window) & (k_pos >= 0) & (q_doc[:, :, None] == k_doc[:, None, :])
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    mixed = torch.einsum("nqh,nhqk->nqk", query_blocks(w1n), probs)  # sum over heads of w1n_h' P_h'
    weight = (query_blocks(w2)[..., None] * mixed[:, :, None, :]).to(v.dtype)  # (blocks, q, H, keys), rounded
    corr = torch.einsum("nqhk,nkhd->nqhd", weight.float(), vb.float()).reshape(padded, H, D)[:T]
    return (y.float() + corr[None]).type_as(y)


def doubled_sequence(input_ids: Tensor) -> Tensor:
    """(2T,) ids whose documents are those of input_ids, each position twice (paired heads' masks): a document
    start stays one <|endoftext|>, at the even position."""
    return torch.stack([input_ids, torch.zeros_like(input_ids)], dim=-1).flatten()


def offset_position_free_dims(k: Tensor) -> Tensor:
    """(B, T, H, D) keys: the dims RoPE leaves unrotated (its zero frequencies: the second quarter of each half)
    take the previous token's values, so a query matching them finds the token AFTER a match: one-layer induction
    (2026). Token 0 keeps its own; a document's first token takes the previous document's last (as the 2026
    script). The script's interleaved RoPE keeps these dims in the upper half of the head; ours splits halves."""
    D = k.size(-1)
    free = torch.zeros(D, dtype=torch.bool, device=k.device)
    free[D // 4 : D // 2] = free[3 * D // 4 :] = True
    shifted = torch.cat([k[:, :1], k[:, :-1]], dim=1)
    return torch.where(free, shifted, k)


def value_gate(x: Tensor, value_embed: Tensor, gate_w: Tensor) -> Tensor:
    """(B, T, H) in (0, 2): per head, from the first half of the gate's channels of the attention input and the
    same number of the value embedding's (2026: 6 + 6)."""
    half = gate_w.size(1) // 2
    features = torch.cat([x[..., :half], value_embed[..., :half].type_as(x)], dim=-1)
    return 2 * torch.sigmoid(F.linear(features, gate_w.type_as(x)))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.model_dim
        # Both matrices stored (dim, hidden): one Muon shape group (the recipe's shape factor reads them as tall)
        self.fc_w = uniform_param(cfg.model_dim, hidden, fan_in=cfg.model_dim)
        self.proj_w = zeros_param(cfg.model_dim, hidden)  # zero-init as the script's c_proj
        self.fused = "mlp" in kernel_names(cfg)  # --triton-kernels mlp

    def forward(self, x: Tensor, fp8: tuple | None = None):
        """relu(x W1)^2 W2. fp8 (the trainer's FP8 state for this layer, training only): both matmuls in FP8
        (relu_square_mlp); returns (output, the amax of relu^2 for the next forward's activation scale) then."""
        if fp8 is not None:
            return FP8ReLUSquareMLP.apply(x, self.fc_w, self.proj_w, *fp8)
        if self.fused:
            return fused_mlp(x, self.fc_w.type_as(x), self.proj_w.type_as(x))
        return ReLUSquareMLP.apply(x, self.fc_w.type_as(x), self.proj_w.type_as(x))


class ReLUSquareMLP(torch.autograd.Function):
    """relu(x W1)^2 W2 keeping only post = relu(pre)^2 for the backward, which rebuilds relu(pre) as sqrt(post)
    (2026-08, the script's kernel: no (tokens x hidden) pre kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
        post = F.relu(x @ fc_w).square()
        ctx.save_for_backward(x, fc_w, proj_w, post)
        return F.linear(post, proj_w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return relu_square_backward(grad, *ctx.saved_tensors)


def relu_square_backward(grad: Tensor, x: Tensor, fc_w: Tensor, proj_w: Tensor, post: Tensor) -> tuple:
    """(dx, d fc_w, d proj_w): dpre = 2 (g W2^T) sqrt(post), rounded to the compute dtype (the script's epilogue)."""
    g = grad.flatten(0, -2)
    post_2d, x_2d = post.flatten(0, -2), x.flatten(0, -2)
    d_proj = g.T @ post_2d
    dpre = (2 * (g @ proj_w).float() * post_2d.float().sqrt()).to(g.dtype)
    return (dpre @ fc_w.T).view_as(x), x_2d.T @ dpre, d_proj


# FP8 MLP (2026-08, the script's up projection and #342's down projection): on the training forward both matmuls
# run in e4m3 with per-layer scales; the backward is bf16 (relu_square_backward on post, W1 and W2 themselves).
#   up:   x at 448/amax(x) (this forward's), W1 at amax(W1)/448 (after the last optimizer step), dequantized once;
#   down: post at the layer's activation scale, amax(post) x 1.8/448 of the previous training forward on this rank
#         (1 at first; values above 448 saturate), W2 at the previous quantization's amax(W2) x 1.12/448 (a step
#         behind; amax/448 of the current weights in the first FP8_BOOTSTRAP_STEPS steps and after a reset).
# fp8_matmul is torch._scaled_mm on CUDA and its maths on CPU (e4m3 values multiplied exactly, summed in fp32).
FP8_BOOTSTRAP_STEPS = 16
E4M3_MAX = 448.0
FP8_ACT_HEADROOM, FP8_DOWN_HEADROOM = 1.8, 1.12


def fp8_matmul(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a (M, K) @ b (K, N) of e4m3 tensors (b column-major), times the two fp32 scales, in out_dtype."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()), out_dtype=out_dtype,
                                use_fast_accum=True)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


class FP8ReLUSquareMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fc_w: Tensor, proj_w: Tensor, w1_f8: Tensor, w1_scale: Tensor, w2_f8: Tensor,
                w2_scale: Tensor, act_scale: Tensor):
        x_2d = x.detach().flatten(0, -2)
        amax = x_2d.abs().max().clamp(min=1e-12)
        x_f8 = (x_2d * (E4M3_MAX / amax)).to(torch.float8_e4m3fn)  # in x's dtype, as the script
        dequant = w1_scale.float() * amax.float() / E4M3_MAX
        pre = fp8_matmul(x_f8, w1_f8.T, dequant, torch.ones_like(dequant), torch.float32).to(x.dtype)
        post = F.relu(pre).square()
        post_f8 = (post.float() * (1.0 / act_scale)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        out = fp8_matmul(post_f8, w2_f8.T, act_scale, w2_scale, x.dtype)
        ctx.save_for_backward(x, fc_w, proj_w, post)
        return out.view(*x.shape[:-1], -1), post.float().max()

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_amax):
        x, fc_w, proj_w, post = ctx.saved_tensors
        dx, d_fc, d_proj = relu_square_backward(grad, x, fc_w.type_as(x), proj_w.type_as(x), post)
        return dx, d_fc, d_proj, None, None, None, None, None


@torch.no_grad()
def quantize_mlp_weights(fc_w: Tensor, proj_w: Tensor, down_next_scale: Tensor, bootstrap: bool) -> tuple:
    """After an optimizer step, one layer's e4m3 copies: (W1 as (hidden, dim), its scale, W2 as (dim, hidden), the scale
    it was cast at, the next cast's scale). W1's scale is bf16 amax/448 of the current weights (the division in
    bf16, as the script's); W2 is cast at down_next_scale (bootstrap: its own amax/448 first), clamped to +-448."""
    w1 = fc_w.T.to(torch.bfloat16).contiguous()
    w1_scale = w1.abs().amax().clamp(min=1e-12) / E4M3_MAX  # bf16
    w1_f8 = (w1 / w1_scale).to(torch.float8_e4m3fn)
    w2 = proj_w.to(torch.bfloat16)
    w2_amax = w2.abs().amax().clamp(min=1e-12)
    if bootstrap:
        down_next_scale = (w2_amax / E4M3_MAX).float()
    w2_f8 = (w2.float() / down_next_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return w1_f8, w1_scale.float(), w2_f8, down_next_scale.float().clone(), w2_amax.float() * (FP8_DOWN_HEADROOM / E4M3_MAX)


class Block(nn.Module):
    """Each sublayer rescales the stream and its own output by per-layer lambdas, x <- resid*x + post*f(norm(input)),
    and the attention sublayer also injects x0 and the bigram term, each times its per-token gate. The lambdas live
    in the model, one tensor over layers each (the optimizer's groups), and come in as arguments, as do the rotary
    tables (one for all layers) and the gates; the attention input may be another stream than x (attn_source_layer).
    dense: on the MUDD layer, MUDD-0's 14 coefficients with its sources (c0, the attention source): they recombine
    the stream, add to V, gate the value embedding and replace the lambdas and the x0 and bigram gates."""

    def __init__(self, cfg: Config, has_attention: bool, value_gated: bool = False, paired: bool = False):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, value_gated, paired) if has_attention else None
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, x0: Tensor, attn_input: Tensor, value_embed: Tensor | None, mask, bigram: Tensor | None,
                resid: Tensor, post: Tensor, x0_gate: Tensor | None, bigram_gate: Tensor | None, gates: LayerGates,
                cos: Tensor, sin: Tensor, dense: tuple | None = None, fp8: tuple | None = None):
        """The new stream; with fp8 (the layer's FP8 MLP state) also the amax of its relu^2 (GPT.layers)."""
        if dense is not None:
            return self.dense_forward(x, attn_input, value_embed, mask, bigram, gates, cos, sin, *dense, fp8=fp8)
        if self.attn is not None:
            x = resid[0] * x + post[0] * self.attn(rms_norm(attn_input), value_embed, mask, cos, sin, gates)
            if x0_gate is not None:
                x = x + x0 * x0_gate
            if bigram is not None and bigram_gate is not None:  # layer 0's is injected before it
                x = add_to_leading_channels(x, bigram * bigram_gate)
        return self.mlp_sublayer(x, resid[1], post[1], fp8)

    def mlp_sublayer(self, x: Tensor, resid: Tensor, post: Tensor, fp8: tuple | None):
        if fp8 is None:
            return resid * x + post * self.mlp(rms_norm(x))
        out, amax = self.mlp(rms_norm(x), fp8)
        return resid * x + post * out, amax

    def dense_forward(self, x: Tensor, attn_input: Tensor, value_embed: Tensor | None, mask, bigram: Tensor | None,
                      gates: LayerGates, cos: Tensor, sin: Tensor, mu: tuple, c0: Tensor, source: Tensor,
                      fp8: tuple | None = None):
        """The MUDD layer (the script's last layer). mu: 14 (1, T, 1) coefficients: 0-2 weigh (c0, source, x) into V,
        3-5 recombine the stream, 6-7 gate the value embedding of heads 0..H/2-1 and H/2..H-1, 8-9 the attention's
        resid and post, 10-11 c0 and the bigram, 12-13 the MLP's resid and post. The attention still reads the
        attention source (normed before the recombination), which only enters through mu8 x."""
        B, T = x.shape[:2]
        heads = self.attn.num_heads
        extra_v = mu[0] * c0 + mu[1] * source + mu[2] * x
        x = (1 + mu[5]) * x + mu[3] * c0 + mu[4] * source
        ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(heads // 2, dim=-1)
        gates = dataclasses.replace(gates, ve=ve_gate, extra_v=extra_v)
        x = mu[8] * x + mu[9] * self.attn(rms_norm(attn_input), value_embed, mask, cos, sin, gates) + mu[10] * c0
        if bigram is not None:
            x = add_to_leading_channels(x, mu[11] * bigram)
        return self.mlp_sublayer(x, mu[12], mu[13], fp8)


def smear_previous_token(x: Tensor, gate_w: Tensor, smear_lambda: Tensor) -> Tensor:
    """(T, D) embeddings: token t adds lambda*sigmoid(W x_t[:12]) times token t-1's (across document boundaries, as
    the 2026 script); token 0 is unchanged."""
    gate = smear_lambda * torch.sigmoid(F.linear(x[1:, : gate_w.size(-1)], gate_w.type_as(x)))  # (T-1, 1)
    return torch.cat([x[:1], x[1:] + gate * x[:-1]])


def add_to_leading_channels(x: Tensor, y: Tensor) -> Tensor:
    """x + y on the first y.size(-1) channels of x (out of place: x may be x0, which later layers read)."""
    return x + F.pad(y, (0, x.size(-1) - y.size(-1)))


# Bigram hash embedding (2026): a large table whose row for token i is a hash of (x[i-1], x[i]), so many bigrams
# share a row; each row is multiplied by a fixed random +-1 pattern chosen by another hash of the pair (the "sign
# trick"), so bigrams sharing a row pull it in uncorrelated directions instead of averaging it away.
BIGRAM_HASH_MULTIPLIERS = (36313, 27191)  # arbitrary large ints: products spread over the int32 range
BIGRAM_SIGN_SEED_OFFSET = 1_000_003  # the sign table's generator is seeded apart from the weight init's stream


def bigram_hash(input_ids: Tensor, rows: int) -> Tensor:
    """Row of token i: ((36313 x[i]) XOR (27191 x[i-1])) mod (rows - 1), in int32 arithmetic. Position 0 has no
    previous token and takes the reserved last row, rows - 1. Two quirks of the 2026 script, kept: it hashes in
    place after writing rows - 1 into position 0, so position 1's "previous token" is rows - 1, whose product
    overflows int32 and wraps; and a document's first token hashes with the last token of the document before
    it (masking that was slower there and no better)."""
    x = input_ids.long()
    previous = torch.cat([x.new_full((1,), rows - 1), x[1:-1]])
    a, b = BIGRAM_HASH_MULTIPLIERS
    hashed = torch.bitwise_xor(wrap_int32(a * x[1:]), wrap_int32(b * previous)) % (rows - 1)  # % is floored: >= 0
    return torch.cat([hashed.new_full((1,), rows - 1), hashed])


def wrap_int32(x: Tensor) -> Tensor:
    """int64 values as int32 arithmetic leaves them: two's-complement wrap-around, explicit rather than relying on
    overflow of int32 multiplication."""
    return (x + 2**31) % 2**32 - 2**31


def bigram_sign_index(input_ids: Tensor, sign_rows: int) -> Tensor:
    """Row of the sign table for token i: (x[i-1] XOR x[i]) mod sign_rows; row 0 at position 0."""
    x = input_ids.long()
    return torch.cat([x.new_zeros(1), torch.bitwise_xor(x[:-1], x[1:]) % sign_rows])


def random_signs(rows: int, dim: int, seed: int) -> Tensor:
    """A fixed (rows, dim) table of +-1 (signs of normal draws, as the 2026 script), from its own CPU generator: every
    rank builds the same table without a broadcast, and the weight init's stream is untouched."""
    generator = torch.Generator().manual_seed(seed + BIGRAM_SIGN_SEED_OFFSET)
    return torch.randn(rows, dim, generator=generator, device="cpu").sign()


def document_ids(input_ids: Tensor) -> Tensor:
    return (input_ids == EOT_TOKEN).cumsum(0)


def window_tensor(window: int | Tensor, device: torch.device) -> Tensor:
    """A window as a 0-d device tensor, so a new window never recompiles code that reads it; filled on the
    device: no host-to-device copy. A tensor (compiled mask building) is taken as it is."""
    return window if isinstance(window, Tensor) else torch.full((), window, dtype=torch.int64, device=device)


def token_window_mask(input_ids: Tensor, window_tokens: int | Tensor) -> Tensor:
    """(T, T) bool, FlashAttention-3's causal window (W, 0) per document: query i sees key j of its document when
    i - W <= j <= i, W + 1 keys with itself (2026)."""
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


def head_loss(x: Tensor, head_w: Tensor, targets: Tensor, logit_cap: float, fp8_scales: tuple | None,
              mtp_weights: Tensor | None = None, logit_shift: float = 0.0, logit_div: float = 0.0,
              fused_ce: bool = False, prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> Tensor:
    """Summed cross-entropy of softcapped logits. fp8_scales set: the FP8 matmul (Hopper). mtp_weights set:
    the multi-token loss (multi_token_cross_entropy). prefix_targets set: plus prefix_weight x the prefix-token
    term (prefix_cross_entropy). fused_ce: the rest in Triton (softcapped_cross_entropy; no prefix term)."""
    if fp8_scales is not None:
        logits = torch.ops.speedrun_gpt.fp8_linear(x, head_w, *fp8_scales)[0]
    else:
        logits = F.linear(x, head_w.type_as(x))
    if fused_ce:
        loss = softcapped_cross_entropy(logits, targets, mtp_weights, logit_cap, logit_shift, logit_div)
        if prefix_targets is None:
            return loss
        logits = softcap_logits(logits.float(), logit_cap, logit_shift, logit_div)  # the kernel has no prefix term yet
    else:
        logits = softcap_logits(logits.float(), logit_cap, logit_shift, logit_div)
        if mtp_weights is None:
            loss = F.cross_entropy(logits, targets, reduction="sum")
        else:
            loss = multi_token_cross_entropy(logits, targets, mtp_weights)
    if prefix_targets is not None:
        loss = loss + prefix_weight * prefix_cross_entropy(logits, prefix_targets)
    return loss


def prefix_cross_entropy(logits: Tensor, prefix_targets: Tensor) -> Tensor:
    """Prefix-token prediction (2026-08): the logits of position t also predict the prefix token of its target
    (the longest proper byte-prefix of the next token that is itself a token), summed over the positions that
    have one (prefix_targets >= 0); the others add nothing, to the loss or its gradient (as the script's kernel)."""
    has_prefix = prefix_targets >= 0
    predicted = logits.gather(1, prefix_targets.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(has_prefix, torch.logsumexp(logits, dim=-1) - predicted, 0.0).sum()


# GPT-2's byte-prefix table: prefix_table[t] is the token whose bytes are the longest proper prefix of token t's
# bytes, or -1 (single bytes, <|endoftext|> and the padding rows have none), from the BPE files the repository
# ships (data/tiktoken_cache/, as data/tokenize_corpus.py reads them). Only the vocabulary, never the corpus.
TIKTOKEN_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiktoken_cache")


def gpt2_token_bytes() -> dict:
    """{bytes: token id} of GPT-2's BPE vocabulary (tiktoken's mergeable ranks), offline."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")._mergeable_ranks
    except Exception as e:  # no tiktoken, or no BPE files where TIKTOKEN_CACHE_DIR points
        raise ConfigError(f"the prefix-token table needs tiktoken and the GPT-2 BPE files (TIKTOKEN_CACHE_DIR="
                          f"{os.environ['TIKTOKEN_CACHE_DIR']}; the repository ships them in {TIKTOKEN_CACHE}): "
                          f"{type(e).__name__}: {e}; or --stage-prefix-weight-start 0,0,0,0 --stage-prefix-weight-end 0,0,0,0") from None


def prefix_token_table(vocab_size: int, token_bytes: dict | None = None) -> Tensor:
    """(vocab_size,) int64. Sorted byte strings put every prefix before its extensions, so a stack of the current
    string's ancestors in the vocabulary gives the longest one: O(V log V)."""
    table = torch.full((vocab_size,), -1, dtype=torch.int64)
    ancestors = []  # (bytes, id) of the tokens that are prefixes of the current one, shortest first
    for text, token in sorted((token_bytes or gpt2_token_bytes()).items()):
        while ancestors and not text.startswith(ancestors[-1][0]):
            ancestors.pop()
        if ancestors:
            table[token] = ancestors[-1][1]
        ancestors.append((text, token))
    return table


def softcap_logits(z: Tensor, cap: float, shift: float, div: float) -> Tensor:
    """cap*sigmoid((z + shift)/div), bounded in (0, cap): 23*sigmoid((z + 5)/7.5) starts every logit at
    23*sigmoid(2/3)."""
    return cap * torch.sigmoid((z + shift) / div)


def multi_token_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Multi-token prediction (2026): the logits of position r predict targets r, r+1, ..., r+n-1 (the tokens 1..n
    ahead) with weights w_0..w_{n-1}, summed over positions; a term whose target lies past the sequence's end is
    dropped, and terms cross document boundaries, as in the 2026 script's fused kernel. logits: (T, V) float.
    One log-sum-exp per row serves every term: no (T, V) log-softmax per offset.
    The gradient is this loss's own. The script's kernel differs on the last n-1 rows of each sequence only: it
    drops their terms from the loss but its softmax part of the gradient still counts every weight (the sum of all
    w_k instead of the kept ones); 2 rows of a 16,384-token sequence in stage 0, 1 of 32,768 in stage 1."""
    log_normalizer = torch.logsumexp(logits, dim=-1)
    length, total = logits.size(0), logits.new_zeros(())
    for k in range(weights.numel()):  # the number of weights is a shape, fixed within a stage
        predicted = logits[: length - k].gather(1, targets[k:, None]).squeeze(1)
        total = total + weights[k] * (log_normalizer[: length - k] - predicted).sum()
    return total


def equal_chunk(length: int, most: int) -> int:
    """The largest chunk size <= most that splits length into equal parts."""
    parts = -(-length // most)
    while length % parts:
        parts += 1
    return length // parts


def allow_block_variants(limit: int):
    """Dynamo compiles one graph per variant of a function (per guard set) and, past its recompile limit (8 by
    default), runs further variants EAGERLY without an error. Blocks vary by kind (attention with or without
    value embeddings, paired heads, MLP only, layer 0 whose input aliases x0), by grad mode (train vs validation)
    and by sequence length (one per stage): more than the default limit. The limit only caps how many graphs
    dynamo keeps; it changes no generated code (this is not an inductor option)."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    else:  # PyTorch < 2.6
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, limit)


# MUDD gates (2026-08): two per-token coefficient MLPs, (W2 gelu(W1 x) + b2) x a learnable scale (0.1 at init),
# whose raw outputs (no sigmoid) are every layer's gates: the pre gate reads x0 and serves the layers before
# post_gate_layer, the post gate reads the stream at the start of that layer and serves the rest. MUDD (multiway
# dynamic dense connections, arXiv:2502.12170) uses the same MLP form with a fixed 0.1: MUDD-0 at the start of the
# last layer (14 coefficients, Block.dense_forward), MUDD-1 after it (5: GPT.final_norm).
MUDD_SCALE = 0.1  # MUDD's fixed scale, and the gate's learnable scale at init: biases are stored divided by it
MUDD_COEFS = (14, 5)
# Effective init of each kind of gate lane (bias x scale); the others start at 0.
GATE_LANE_INIT = {"attn": 0.25, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0}


def injection_layers(cfg: Config) -> list:
    """Layers that add x0 and the bigram term with their per-token gates: every attention layer but the MUDD
    layer, whose MUDD-0 coefficients do it (layer 0's bigram gate serves the injection before it)."""
    mudd_layer = cfg.num_layers - 1 if cfg.mudd else None
    return [i for i in range(cfg.num_layers) if i not in cfg.no_attn_layers and i != mudd_layer]


def gate_layout(cfg: Config) -> tuple:
    """(pre lanes, post lanes): each {(kind, layer): (start, width)} in the script's order: XSA alphas, head gates,
    (x0, bigram) per injection layer, then the skip lane and DC's w1 and w2; a lane serves a layer before
    post_gate_layer in the pre gate, at or after it in the post gate (the skip and DC lanes: by the layer they act
    on). Record: pre 26 lanes (XSA 1, 3; heads of 3; x0/bigram of 0-3), post 41 (XSA 4, 7; heads of 10; x0/bigram
    of 4, 5, 7, 8, 9; skip; DC w1, w2 of 10)."""
    heads, split = cfg.num_heads, cfg.post_gate_layer
    sections = []
    for in_section in (lambda i: i < split, lambda i: i >= split):
        lanes = [(("xsa", i), heads) for i in sorted(cfg.xsa_layers) if in_section(i)]
        lanes += [(("attn", i), heads) for i in sorted(cfg.attn_gate_layers) if in_section(i)]
        for i in injection_layers(cfg):
            if in_section(i):
                lanes += [(("x0", i), 1), (("bigram", i), 1)]
        if cfg.skip_connection and in_section(cfg.skip_connection[1]):
            lanes.append((("skip", cfg.skip_connection[1]), 1))
        if cfg.dc_layer >= 0 and in_section(cfg.dc_layer):
            lanes += [(("dc_w1", cfg.dc_layer), heads), (("dc_w2", cfg.dc_layer), heads)]
        layout, start = {}, 0
        for key, width in lanes:
            layout[key] = (start, width)
            start += width
        sections.append(layout)
    return tuple(sections)


def lane_count(layout: dict) -> int:
    return sum(width for _, width in layout.values())


def gate_bias_init(cfg: Config) -> Tensor:
    """(2, lanes) the gate biases, stored divided by the gate's init scale (so Adam's step acts on that value)."""
    layouts = gate_layout(cfg)
    bias = torch.zeros(2, max(1, *map(lane_count, layouts)))
    for row, layout in enumerate(layouts):
        for (kind, _), (start, width) in layout.items():
            bias[row, start : start + width] = GATE_LANE_INIT.get(kind, 0.0) / MUDD_SCALE
    return bias


def mudd_bias_init() -> Tensor:
    """(2, 14) MUDD's biases, divided by its scale: MUDD-0 starts as the plain last layer (value-embedding gates 2, the
    layer's resid sqrt(1.1) and post 1, bigram 0.05, no extra sources), MUDD-1 as the old backout (-0.5 x the
    attention source)."""
    bias = torch.zeros(2, max(MUDD_COEFS))
    bias[0, 6] = bias[0, 7] = 2.0
    bias[0, 8] = bias[0, 12] = 1.1 ** 0.5
    bias[0, 9] = bias[0, 13] = 1.0
    bias[0, 11] = 0.05
    bias[1, 1] = -0.5
    return bias / MUDD_SCALE


def coefficient_mlp(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, scale) -> Tensor:
    """(W2 gelu(W1 x) + b2) * scale, (1, T, len(b2)), in x's dtype: the MUDD and MUDD-gate form."""
    hidden = F.gelu(F.linear(x, w1.type_as(x)))
    return (F.linear(hidden, w2.type_as(x)) + b2.type_as(x)) * scale


def kaiming_param(*shape: int) -> nn.Parameter:
    """kaiming_uniform(a=sqrt(5)) of each (out, in) matrix: U(+-1/sqrt(in)), the script's MUDD W1 init."""
    bound = shape[-1] ** -0.5
    return tagged(nn.Parameter(torch.empty(*shape).uniform_(-bound, bound)), f"U(+-{bound:.4g})")


class GPT(nn.Module):
    """The record's model (the recipe table in recipe() names its parameters; bigram_signs is a saved buffer, the
    rotary tables a rebuilt one). Layers read x0, the normed embedding, besides the stream, and their per-token
    gates from the MUDD gates; the last layer and the stream after it mix in earlier layers' outputs (MUDD); the
    schedule says which windows, loss weights and YaRN stage each forward uses, and whether the head is still the
    embedding."""

    def __init__(self, cfg: Config, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        # N(0, 0.01), one table per listed layer (the script's one (5 x vocab)-row table: the same elementwise Adam)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.model_dim) for _ in cfg.value_embed_layers)
        for table in self.value_embeds:
            tagged(nn.init.normal_(table.weight, std=0.01), "N(0,0.01)")
        mudd_layer = cfg.num_layers - 1 if cfg.mudd else None  # its value embedding is gated by MUDD-0
        self.blocks = nn.ModuleList(Block(cfg, i not in cfg.no_attn_layers, i in cfg.value_embed_layers and i != mudd_layer,
                                          i in cfg.paired_head_layers) for i in range(cfg.num_layers))
        self.rotary = Rotary(cfg.head_dim, 2 * max_seq_len if cfg.paired_head_layers else max_seq_len)
        # per layer, [attention, MLP] sublayer scales of the stream (which grows 1.1x a layer) and of the output
        self.resid_lambdas = constant_param(1.1 ** 0.5, cfg.num_layers, 2)
        self.post_lambdas = constant_param(1.0, cfg.num_layers, 2)
        if cfg.smear_gate:
            self.smear_gate = nn.Linear(cfg.attn_gate_dim, 1, bias=False)
            tagged(nn.init.zeros_(self.smear_gate.weight), "zeros")
            self.smear_lambda = zeros_param()
        if cfg.skip_connection:  # times the post gate's skip lane (0.5 at init)
            self.skip_lambda = constant_param(-1.5)  # sigmoid(-1.5) ~ 0.18
        # the gates: [pre, post] coefficient MLPs with one learnable scale (wd 0, as the biases)
        self.gate_layout = gate_layout(cfg)
        lanes = max(1, *map(lane_count, self.gate_layout))
        self.mudd_gate_w1 = kaiming_param(2, cfg.mudd_hidden, cfg.model_dim)
        self.mudd_gate_w2 = zeros_param(2, lanes, cfg.mudd_hidden)
        self.mudd_gate_b2 = tagged(nn.Parameter(gate_bias_init(cfg)), "lane inits/0.1")
        self.mudd_gate_scale = constant_param(MUDD_SCALE)
        if cfg.mudd:  # [MUDD-0, MUDD-1]
            self.mudd_w1 = kaiming_param(2, cfg.mudd_hidden, cfg.model_dim)
            self.mudd_w2 = zeros_param(2, max(MUDD_COEFS), cfg.mudd_hidden)
            self.mudd_b2 = tagged(nn.Parameter(mudd_bias_init()), "lambda inits/0.1")
        for i in cfg.long_window_layers if cfg.key_offset else ():
            if self.blocks[i].attn is not None:
                self.blocks[i].attn.key_offset = True
        # a small random head, and the embedding starts as the same matrix (tied until the split step)
        self.lm_head_w = tagged(nn.Parameter(torch.empty(cfg.vocab_size, cfg.model_dim)), f"N(0,{cfg.head_init_std:g})")
        with torch.no_grad():
            self.lm_head_w.normal_(0, cfg.head_init_std)
            self.embed.weight.copy_(self.lm_head_w)
        tagged(self.embed.weight, f"copy of {HEAD}")
        self.bigram_embed = None
        if cfg.bigram_rows:  # zero-init table, per-token gates from 0.05, a fixed sign table (a buffer, saved)
            self.bigram_embed = nn.Embedding(cfg.bigram_rows, cfg.bigram_dim)
            tagged(nn.init.zeros_(self.bigram_embed.weight), "zeros")
            self.register_buffer("bigram_signs", random_signs(cfg.bigram_sign_rows, cfg.bigram_dim, cfg.seed))
        self.yarn_windows = None  # the long windows YaRN has been applied for (--yarn)
        self.compute_dtype = torch.float32
        self.use_flex = False
        self.fp8_scales = None  # (input, weight, gradient) scales of the FP8 head, set by the trainer on Hopper
        self.fused_ce = "ce" in kernel_names(cfg)  # --triton-kernels ce: the head's fused cross-entropy
        self.mtp_weight_table = None  # set by the trainer: every step's multi-token weights on the device
        self.prefix_weight_table = None  # set by the trainer: every step's prefix-token weight on the device
        # filled by the trainer when its clock starts (as the script: the build counts as training time); -1: no
        # prefix anywhere, so the term is absent (the warm-up runs so)
        self.register_buffer("prefix_table", torch.full((cfg.vocab_size,), -1, dtype=torch.int64), persistent=False)
        # FP8 MLP (set by the trainer on Hopper, or by a test: emulated on CPU): per-layer delayed scales, saved
        # with the weights (a checkpoint resumes them; the warm-up reset restores them), and the e4m3 copies
        self.fp8_mlp = False
        for name in ("mlp_act_scales", "mlp_down_scales", "mlp_down_next_scales"):
            self.register_buffer(name, torch.ones(cfg.num_layers))
        self.mlp_fp8_weights = None  # per layer (W1 e4m3, its scale, W2 e4m3), from quantize_mlp_fp8
        self.head_loss = head_loss
        self.block_calls = [block.__call__ for block in self.blocks]
        self.masks_call, self.stem_call, self.final_norm_call = self.window_masks, self.stem, self.final_norm

    @torch.no_grad()
    def quantize_mlp_fp8(self, bootstrap: bool = False, advance: bool = True):
        """The e4m3 copies of every MLP's weights after an optimizer step (quantize_mlp_weights); bootstrap: W2 at its
        own amax first. advance False (after loading a checkpoint): W2 again at the scale it was cast at, the next
        scale kept, so the copies are the ones the checkpointed run had."""
        if not self.fp8_mlp:
            return
        copies = []
        for i, block in enumerate(self.blocks):
            scale = self.mlp_down_next_scales[i] if advance else self.mlp_down_scales[i]
            w1_f8, w1_scale, w2_f8, used, following = quantize_mlp_weights(block.mlp.fc_w, block.mlp.proj_w, scale,
                                                                           bootstrap and advance)
            if advance:
                self.mlp_down_scales[i], self.mlp_down_next_scales[i] = used, following
            copies.append((w1_f8, w1_scale, w2_f8))
        self.mlp_fp8_weights = copies

    def mlp_fp8_state(self, i: int) -> tuple | None:
        """Layer i's FP8 MLP arguments in training (W1 e4m3, its scale, W2 e4m3, its scale, the activation scale)."""
        if not (self.fp8_mlp and self.training):
            return None
        w1_f8, w1_scale, w2_f8 = self.mlp_fp8_weights[i]
        return w1_f8, w1_scale, w2_f8, self.mlp_down_scales[i : i + 1], self.mlp_act_scales[i : i + 1]

    def compile_regions(self):
        """Compile one block's code (reused by every layer with the same structure) and the head, not the
        whole model: far less compile time for the same kernels. --compile-glue: the code between them too,
        as three small graphs of their own (masks, stem, final norm), so they add little compile time."""
        allow_block_variants(64)
        register_kernel_ops(self.cfg)  # --triton-kernels: their custom ops exist before dynamo traces calls to them
        self.block_calls = [torch.compile(block, dynamic=False) for block in self.blocks]
        self.head_loss = torch.compile(head_loss, dynamic=False)
        if self.cfg.compile_glue:
            self.masks_call = torch.compile(self.window_masks, dynamic=False)
            self.stem_call = torch.compile(self.stem, dynamic=False)
            self.final_norm_call = torch.compile(self.final_norm, dynamic=False)

    def value_embeds_per_layer(self, input_ids: Tensor) -> list:
        """Each layer's value embedding (1, T, D), or None for a layer without a table."""
        per_layer = [None] * self.cfg.num_layers
        for layer, table in zip(self.cfg.value_embed_layers, self.value_embeds):
            per_layer[layer] = table(input_ids).to(self.compute_dtype)[None]
        return per_layer

    @torch.no_grad()
    def apply_yarn(self, schedule: StepSchedule):
        """Bring RoPE and the attention scale to the schedule's stage: YaRN over the long windows of the stages so
        far (the final validation's wider window changes neither, as in the 2026 script). A pure function of the
        stage, applied only when it changes, so a reset after the warm-up steps needs nothing special."""
        windows = tuple(blocks * BLOCK_SIZE for blocks in self.cfg.stage_long_window_blocks[: schedule.stage + 1])
        if windows == self.yarn_windows:
            return
        self.rotary.set_frequencies(yarn_frequencies(rotary_frequencies(self.cfg.head_dim), list(windows)))
        for block in self.blocks:
            if block.attn is not None:
                block.attn.scale.fill_(schedule.attn_scale)
        self.yarn_windows = windows

    def embedding_table(self, schedule: StepSchedule) -> Tensor:
        """While the schedule ties them (up to the split step) the head's matrix is the embedding table, so both
        uses train it and embed.weight gets no gradient; the trainer copies the head into it at the split."""
        return self.lm_head_w if schedule.embed_tied else self.embed.weight

    def embeddings(self, input_ids: Tensor, table: Tensor) -> Tensor:
        """(T, D) token embeddings before the norm; the smear gate mixes in the previous token."""
        x = F.embedding(input_ids, table).to(self.compute_dtype)
        if self.cfg.smear_gate:
            x = smear_previous_token(x, self.smear_gate.weight, self.smear_lambda)
        return x

    def stem(self, input_ids: Tensor, table: Tensor) -> tuple:
        """What the layers read besides the masks: (x0 the normed embedding, each layer's value embedding or None,
        the bigram term (1, T, bigram_dim) or None, the document ids for DC). The table is an argument, not an
        attribute read, so tying and untying reuse one compiled graph (--compile-glue)."""
        x0 = rms_norm(self.embeddings(input_ids, table)[None])
        bigram = self.bigram_features(input_ids) if self.bigram_embed is not None else None
        return x0, self.value_embeds_per_layer(input_ids), bigram, document_ids(input_ids)

    def final_norm(self, x: Tensor, sources: tuple | None) -> Tensor:
        """(T, D) the head's input: the stream plus MUDD-1's per-token mix of (c0, the attention source, the last
        layer's input, the first value embedding, the skip source), normed."""
        if sources is not None:
            mu = self.mudd(x, 1).split(1, dim=-1)
            x = x + sum(m * source for m, source in zip(mu, sources))
        return rms_norm(x[0])

    def mudd(self, x: Tensor, row: int) -> Tensor:
        """MUDD-row's coefficients (1, T, 14 or 5), at the fixed scale 0.1 (in x's dtype)."""
        n = MUDD_COEFS[row]
        return coefficient_mlp(x, self.mudd_w1[row], self.mudd_w2[row, :n], self.mudd_b2[row, :n], MUDD_SCALE)

    def gate_lanes(self, x: Tensor, row: int) -> dict:
        """The pre (row 0) or post (row 1) gate's lanes at x: {(kind, layer): (1, T, width)}."""
        layout = self.gate_layout[row]
        n = lane_count(layout)
        gate = coefficient_mlp(x, self.mudd_gate_w1[row], self.mudd_gate_w2[row, :n], self.mudd_gate_b2[row, :n],
                               self.mudd_gate_scale.type_as(x))
        # contiguous: a slice's strides would differ between the two gates, and compiled blocks guard on strides
        return {key: gate[..., start : start + width].contiguous() for key, (start, width) in layout.items()}

    def layer_gates(self, i: int, lanes: dict, docs: Tensor) -> LayerGates:
        dc = None
        if ("dc_w1", i) in lanes:
            dc = (lanes[("dc_w1", i)], lanes[("dc_w2", i)], docs)
        return LayerGates(attn=lanes.get(("attn", i)), xsa=lanes.get(("xsa", i)), dc=dc)

    def layers(self, x0: Tensor, value_embeds: list, masks: list, bigram: Tensor | None, docs: Tensor) -> tuple:
        """The blocks in order. The stream starts as x0 plus layer 0's gated bigram term (c0); one gated skip from
        layer FROM into the attention-free layer TO; after attn_source_layer, every attention reads that layer's
        output instead of the current stream; the MUDD layer (the last) gets MUDD-0's coefficients. Returns the
        stream and MUDD-1's sources (None without --mudd)."""
        cfg = self.cfg
        skip_from, skip_to = cfg.skip_connection or (-1, -1)
        mudd_layer = cfg.num_layers - 1 if cfg.mudd else -1
        rope = self.rotary.cos, self.rotary.sin
        # the lambdas stay fp32 parameters and enter in the compute dtype, as the script's .bfloat16()
        resid, post = (p.type_as(x0) for p in (self.resid_lambdas, self.post_lambdas))
        lanes = self.gate_lanes(x0, 0)
        x = x0
        if bigram is not None and ("bigram", 0) in lanes:
            x = add_to_leading_channels(x0, bigram * lanes[("bigram", 0)])
        c0, skip, source, last_input = x, None, None, None
        post_amaxes = []  # FP8 MLP: each layer's amax of relu^2, the next forward's activation scales
        for i, block_call in enumerate(self.block_calls):
            if i == cfg.post_gate_layer:
                lanes = {**lanes, **self.gate_lanes(x, 1)}
            if i == skip_to:
                x = x + torch.sigmoid(self.skip_lambda) * lanes[("skip", i)] * skip
            attn_input = x if source is None else source
            dense = None
            if i == mudd_layer:
                last_input = x
                dense = (self.mudd(x, 0).split(1, dim=-1), c0, source)
            bigram_gate = lanes.get(("bigram", i)) if i > 0 else None
            fp8 = self.mlp_fp8_state(i)
            x = block_call(x, x0, attn_input, value_embeds[i], masks[i], bigram, resid[i], post[i], lanes.get(("x0", i)),
                           bigram_gate, self.layer_gates(i, lanes, docs), *rope, dense, fp8)
            if fp8 is not None:
                x, amax = x
                post_amaxes.append(amax)
            if i == skip_from:
                skip = x
            if i == cfg.attn_source_layer:
                source = x
        if post_amaxes:  # after the loop, as the script: per rank and per micro-batch
            with torch.no_grad():
                self.mlp_act_scales.copy_(torch.stack(post_amaxes).clamp(min=1e-12) * (FP8_ACT_HEADROOM / E4M3_MAX))
        if not cfg.mudd:
            return x, None
        first_ve = next(v for v in value_embeds if v is not None)
        return x, (c0, source, last_input, first_ve, skip)

    def bigram_features(self, input_ids: Tensor) -> Tensor:
        """(1, T, bigram_dim): the hashed bigram row of each token times its sign pattern."""
        rows = bigram_hash(input_ids, self.bigram_embed.num_embeddings)
        signs = self.bigram_signs[bigram_sign_index(input_ids, self.bigram_signs.size(0))]
        return (self.bigram_embed(rows) * signs).to(self.compute_dtype)[None]

    def attention_masks(self, input_ids: Tensor, schedule: StepSchedule) -> list:
        """Each layer's mask for the schedule's long and short windows (in tokens). They go in as device tensors,
        so a new window is new data, never a recompile of compiled mask building (--compile-glue)."""
        windows = schedule.window_long_tokens, schedule.window_short_tokens
        return self.masks_call(input_ids, *(window_tensor(w, input_ids.device) for w in windows))

    def window_masks(self, input_ids: Tensor, long_window: Tensor, short_window: Tensor) -> list:
        """Each layer's mask for these windows (0-d tensors, in tokens); paired-head layers get theirs on the doubled
        sequence, the window in positions."""
        build = flex_token_window_mask if self.use_flex else token_window_mask
        masks = {False: {True: build(input_ids, long_window), False: build(input_ids, short_window)}}
        if self.cfg.paired_head_layers:
            doubled = doubled_sequence(input_ids)
            masks[True] = {True: build(doubled, long_window), False: build(doubled, short_window)}
        return [masks[i in self.cfg.paired_head_layers][i in self.cfg.long_window_layers] for i in range(self.cfg.num_layers)]

    def head_options(self, schedule: StepSchedule) -> dict:
        """head_loss's keyword options: the logit squash and, in training, the schedule's multi-token weights (a
        device tensor: new values each step reuse the compiled head; only a new number of weights, once per stage,
        recompiles)."""
        options = dict(logit_shift=self.cfg.logit_shift, logit_div=self.cfg.logit_div)
        if self.training and tuple(schedule.mtp_weights) != (1.0,):
            options["mtp_weights"] = self.step_mtp_weights(schedule)
        if self.training and schedule.prefix_weight:
            options["prefix_weight"] = self.step_prefix_weight(schedule)
        if self.fused_ce:
            options["fused_ce"] = True
        return options

    def step_prefix_weight(self, schedule: StepSchedule) -> Tensor:
        """The step's prefix-token weight, a 0-d device tensor (a row of the trainer's table, as the MTP weights)."""
        if self.prefix_weight_table is None:
            return torch.tensor(schedule.prefix_weight, dtype=torch.float32, device=self.lm_head_w.device)
        return self.prefix_weight_table[schedule.step]

    def step_mtp_weights(self, schedule: StepSchedule) -> Tensor:
        """The step's multi-token weights on the device: a row of the trainer's table, because a new tensor each
        step is a copy from pageable host memory, which waits for the GPU's queue to drain."""
        if self.mtp_weight_table is None:
            return torch.tensor(schedule.mtp_weights, dtype=torch.float32, device=self.lm_head_w.device)
        return self.mtp_weight_table[schedule.step, : len(schedule.mtp_weights)]

    def forward(self, input_ids: Tensor, targets: Tensor, schedule: StepSchedule) -> Tensor:
        """input_ids, targets: (T,) one packed sequence. Returns the summed cross-entropy over its tokens (in
        training with the schedule's multi-token weights)."""
        if self.cfg.yarn:
            self.apply_yarn(schedule)
        masks = self.attention_masks(input_ids, schedule)
        x0, value_embeds, bigram, docs = self.stem_call(input_ids, self.embedding_table(schedule))
        x = self.final_norm_call(*self.layers(x0, value_embeds, masks, bigram, docs))
        head_options = self.head_options(schedule)
        if "prefix_weight" in head_options:
            head_options["prefix_targets"] = self.prefix_table[targets]
        if self.training:
            return self.head_loss(x, self.lm_head_w, targets, self.cfg.logit_cap, self.fp8_scales, **head_options)
        # Validation: the bf16 head (FP8 would bias the reported loss), in equal chunks of at most VAL_HEAD_CHUNK
        # tokens (one compiled shape) so a 262,144-token sequence never holds its (tokens x vocab) logits at once.
        chunk = equal_chunk(x.size(0), VAL_HEAD_CHUNK)
        return sum(self.head_loss(x_part, self.lm_head_w, t_part, self.cfg.logit_cap, None, **head_options)
                   for x_part, t_part in zip(x.split(chunk), targets.split(chunk)))

    def matmul_flops_per_token(self, window_tokens: int, seq_len: int) -> float:
        """Forward+backward matmul FLOPs per token: 6 per weight of a matmul, plus attention scores and
        values over the mean visible context (half the window, causal)."""
        cfg = self.cfg
        weights = sum(p.numel() for p in self.blocks.parameters() if p.ndim >= 2) + self.lm_head_w.numel()
        attn_layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attn_layers]
        context = sum(min(window_tokens if i in cfg.long_window_layers else window_tokens // 2, seq_len) / 2 for i in attn_layers)
        return 6 * weights + 12 * cfg.num_heads * cfg.head_dim * context


# FP8 head (Hopper): inputs, weights and gradients are scaled into FP8 range, multiplied with _scaled_mm.
def fp8_head_scales(cfg: Config, accumulation: int) -> tuple:
    """(input, weight, output gradient) scales: each maps the largest magnitude kept onto 448, e4m3's largest value.
    The gradient is at most (sum of the loss weights) / accumulation per entry (softmax minus one-hot, the loss
    divided by the accumulation steps); its e5m2 reaches 57,344, so the scale mostly keeps small values from
    underflowing."""
    x_max = cfg.fp8_x_max or cfg.model_dim ** 0.5
    return x_max / 448, cfg.fp8_w_max / 448, cfg.fp8_grad_max / 448 / accumulation


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def fp8_mlp_available(device: torch.device) -> bool:
    """The FP8 MLP runs where the FP8 head does; tests replace this to run its CPU emulation (fp8_matmul)."""
    return fp8_supported(device)


def fp8_scale_tensor(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)  # a fill: no host sync


def fp8_cast(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """x / scale in FP8, rounded once from fp32, as #28's compiled casts do (r28.py 48-52, 75-81): a bf16 x divided
    in bf16 would be rounded twice (to bf16, then to FP8), which changes about 1 value in 16 (e4m3) or 32 (e5m2)."""
    return x.float().div(scale).to(dtype)


def fp8_forward_matmul(x: Tensor, w: Tensor, x_scale: float, w_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The head's forward: (x @ w.T in bf16, x in e4m3, w in e4m3). Compiled on the GPU (fp8_forward_compiled),
    as #28 compiles it: both casts one pass each, no fp32 temporaries."""
    x_f8 = fp8_cast(x, x_scale, torch.float8_e4m3fn)
    w_f8 = fp8_cast(w, w_scale, torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=fp8_scale_tensor(x_scale, x),
                           scale_b=fp8_scale_tensor(w_scale, x), use_fast_accum=True)
    return out, x_f8, w_f8


def fp8_backward_matmuls(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                         grad_scale: float) -> tuple[Tensor, Tensor]:
    """The head's backward: the logit gradient scaled into e5m2, then grad_x = grad @ w and grad_w = grad^T @ x,
    the latter computed as (x^T @ grad)^T, #28's orientation (r28.py 90-98: faster for a (50304, 768) weight).
    Compiled on the GPU (fp8_backward_compiled): the scale-and-cast of the (tokens x vocab) gradient is one pass
    with no temporary instead of two passes and a bf16 temporary of its full size; the same math either way."""
    grad_f8 = fp8_cast(grad, grad_scale, torch.float8_e5m2)
    grad_x = torch._scaled_mm(grad_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                              scale_a=fp8_scale_tensor(grad_scale, grad), scale_b=fp8_scale_tensor(w_scale, grad),
                              use_fast_accum=False)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), grad_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=fp8_scale_tensor(x_scale, grad), scale_b=fp8_scale_tensor(grad_scale, grad),
                              use_fast_accum=False).T
    return grad_x, grad_w


@functools.lru_cache(maxsize=None)
def fp8_forward_compiled():
    return torch.compile(fp8_forward_matmul, dynamic=False)


@functools.lru_cache(maxsize=None)
def fp8_backward_compiled():
    return torch.compile(fp8_backward_matmuls, dynamic=False)


@functools.lru_cache(maxsize=None)
def fp8_linear_op():
    """Register (once, on first use) the custom op y = x @ w.T in FP8 with its FP8 backward."""
    namespace = "speedrun_gpt"
    if hasattr(torch.ops.speedrun_gpt, "fp8_linear"):  # registered by an earlier import of this file
        return torch.ops.speedrun_gpt.fp8_linear

    @torch.library.custom_op(f"{namespace}::fp8_linear", mutates_args=())
    def fp8_linear(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        matmul = fp8_forward_compiled() if x.is_cuda else fp8_forward_matmul
        return matmul(x, w, x_scale, w_scale)

    @fp8_linear.register_fake
    def _(x, w, x_scale, w_scale, grad_scale):
        return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
                x.new_empty(x.shape, dtype=torch.float8_e4m3fn), w.new_empty(w.shape, dtype=torch.float8_e4m3fn))

    @torch.library.custom_op(f"{namespace}::fp8_linear_backward", mutates_args=())
    def fp8_linear_backward(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                            grad_scale: float) -> tuple[Tensor, Tensor]:
        matmuls = fp8_backward_compiled() if grad.is_cuda else fp8_backward_matmuls
        grad_x, grad_w = matmuls(grad, x_f8, w_f8, x_scale, w_scale, grad_scale)
        return grad_x, grad_w.contiguous()  # the weight's layout (the gradient would be copied into it anyway)

    @fp8_linear_backward.register_fake
    def _(grad, x_f8, w_f8, x_scale, w_scale, grad_scale):
        return x_f8.new_empty(x_f8.shape, dtype=torch.bfloat16), w_f8.new_empty(w_f8.shape, dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        _, _, x_scale, w_scale, grad_scale = inputs
        ctx.save_for_backward(output[1], output[2])
        ctx.scales = (x_scale, w_scale, grad_scale)

    def backward(ctx, grad_out, _grad_x_f8, _grad_w_f8):
        x_f8, w_f8 = ctx.saved_tensors
        grad_x, grad_w = fp8_linear_backward(grad_out, x_f8, w_f8, *ctx.scales)
        return grad_x, grad_w, None, None, None

    fp8_linear.register_autograd(backward, setup_context=setup_context)
    return fp8_linear


# -----------------------------------------------------------------------------
# Kernels: Triton versions of the hot ops, each with its PyTorch reference. Off unless --triton-kernels names
# them. triton is imported on the first call only (the trainer runs without it), and the kernels are built
# per mode: compiled for CUDA, or run by the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, which the
# tests use. Each op is a custom op (opaque to torch.compile) with its autograd. Compared with the references in
# tests/test_kernels.py (interpreter, small shapes) and tests/test_gpu.py (CUDA, full shapes).
#   ce         softcapped_cross_entropy: head logits -> cap*sigmoid((z+shift)/div) -> log-softmax -> the
#              (multi-token) weighted loss, and its gradient, in two passes over the logits in their own dtype;
#              reference: softcap_logits + F.cross_entropy / multi_token_cross_entropy (head_loss).
#   symmetric  symmetric_matmul: A = X X^T and B = bA + cA^2 (symmetric too) computing only the tiles on and
#              above the diagonal and mirroring them; reference: polar_step_fused's bmm and baddbmm.
#   mlp        fused_mlp (matmul_relu2): relu(x W)^2 in the epilogue of the first MLP matmul (pre and post written at once),
#              and 2 relu(pre) g in the epilogue of the backward one; reference: MLP.forward.

TRITON_KERNELS = ("ce", "symmetric", "mlp")
triton = tl = None  # imported by triton_kernels() on first use


def kernel_names(cfg: Config) -> set:
    return {name.strip() for name in cfg.triton_kernels.split(",") if name.strip()}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def register_kernel_ops(cfg: Config):
    """Register the custom ops of the kernels the config names, before torch.compile traces code that calls them."""
    names = kernel_names(cfg)
    if "ce" in names:
        softcapped_ce_op()
    if "mlp" in names:
        linear_relu2_op()


def check_triton_kernels(cfg: Config):
    """--triton-kernels: known names, triton importable, and a device the kernels can run on."""
    names = kernel_names(cfg)
    unknown = sorted(names - set(TRITON_KERNELS))
    if unknown:
        raise ConfigError(f"--triton-kernels {cfg.triton_kernels!r}: unknown {', '.join(unknown)}; choose from {', '.join(TRITON_KERNELS)}")
    if not names:
        return
    if not triton_available():
        raise ConfigError(f"--triton-kernels {cfg.triton_kernels} needs triton: pip install triton "
                          f"(the CUDA build of PyTorch bundles it), or leave the flag out")
    if cfg.device == "cpu" and not triton_interpreting():
        raise ConfigError(f"--triton-kernels {cfg.triton_kernels} on --device cpu runs only under the Triton interpreter "
                          f"(TRITON_INTERPRET=1, slow: for tests); leave the flag out on CPU")
    if "ce" in names and cfg.logit_cap > 80:
        raise ConfigError(f"--triton-kernels ce sums exp(z - cap) in fp32: --logit-cap {cfg.logit_cap} must be <= 80")


@functools.lru_cache(maxsize=None)
def triton_kernels(interpret: bool) -> dict:
    """The kernels, built once per mode (the interpreter is chosen when a kernel is decorated). In interpreter
    mode UPCAST=True casts tiles to fp32 before tl.dot: the interpreter's dot mishandles bf16, and bf16 products
    are exact in fp32, so this is the GPU's bf16 MMA with fp32 accumulation. The kernels call only triton.language
    builtins, none of its @triton.jit library functions (tl.sigmoid, tl.sum, tl.zeros, tl.cdiv), which are built
    in the mode of triton's first import: under the interpreter they fail if triton was imported before
    TRITON_INTERPRET was set (by torch.compile, say). The one sum is tl.reduce with tl.sum's own combine function,
    which the interpreter recognizes and never calls."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def softcap_ce_forward(logits_ptr, targets_ptr, weights_ptr, loss_ptr, lse_ptr, n_rows, vocab, stride,
                           cap, shift, div, N_WEIGHTS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # ROWS rows r per program (1 on GPUs): lse = log sum_v exp(z_v), z = cap*sigmoid((logit + shift)/div) is in
        # (0, cap), so exp(z - cap) is in (exp(-cap), 1]: no running max. loss_r = sum_k w_k (lse - z[target[r+k]])
        # over the k with r+k < n_rows (targets past the sequence's end dropped).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        base = logits_ptr + rows * stride
        cols = tl.arange(0, BLOCK)
        sums = tl.full((ROWS, BLOCK), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            mask = row_ok[:, None] & (start + cols[None, :] < vocab)
            logit = tl.load(base[:, None] + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z = cap / (1.0 + tl.exp(-(logit + shift) / div))
            sums += tl.where(mask, tl.exp(z - cap), 0.0)
        lse = cap + tl.log(tl.where(row_ok, tl.reduce(sums, 1, tl.standard._sum_combine), 1.0))  # no log(0) past the end
        loss = tl.full((ROWS,), 0.0, tl.float32)
        for k in tl.static_range(N_WEIGHTS):
            valid = rows + k < n_rows
            target = tl.load(targets_ptr + rows + k, mask=valid, other=0)
            logit = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
            z = cap / (1.0 + tl.exp(-(logit + shift) / div))
            loss += tl.where(valid, tl.load(weights_ptr + k) * (lse - z), 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def softcap_ce_backward(logits_ptr, targets_ptr, weights_ptr, lse_ptr, grad_loss_ptr, grad_ptr, n_rows, vocab,
                            stride, grad_loss_stride, cap, shift, div, N_WEIGHTS: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK: tl.constexpr):
        # d loss_r / d logit_v = g_r (sum_k w_k (softmax(z)_v - [target[r+k] = v])) * cap/div * s (1 - s), with
        # s = sigmoid((logit + shift)/div), over the k with r+k < n_rows; g_r: the gradient of loss_r.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        base = rows * stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(grad_loss_ptr + rows * grad_loss_stride, mask=row_ok, other=0.0).to(tl.float32) * cap / div
        for start in range(0, vocab, BLOCK):
            mask = row_ok[:, None] & (start + cols[None, :] < vocab)
            offsets = base[:, None] + start + cols[None, :]
            logit = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            s = 1.0 / (1.0 + tl.exp(-(logit + shift) / div))
            p = tl.exp(cap * s - lse[:, None])
            grad_z = tl.full((ROWS, BLOCK), 0.0, tl.float32)
            for k in tl.static_range(N_WEIGHTS):
                valid = rows + k < n_rows
                target = tl.where(valid, tl.load(targets_ptr + rows + k, mask=valid, other=0), -1)
                w = tl.where(valid, tl.load(weights_ptr + k), 0.0)
                grad_z += w[:, None] * (p - tl.where(start + cols[None, :] == target[:, None], 1.0, 0.0))
            grad = scale[:, None] * grad_z * s * (1.0 - s)
            tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def symmetric_matmul(x_ptr, out_ptr, n, k, stride_xb, stride_xr, stride_xc, stride_ob, stride_or, stride_oc,
                         alpha, beta, ADD_INPUT: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        # out = alpha X X^T (+ beta X: X square) per batch entry; tile (i, j) with j >= i only, stored at (i, j)
        # and, off the diagonal, transposed at (j, i).
        pid_i, pid_j, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        if pid_j >= pid_i:
            x_ptr += batch * stride_xb
            out_ptr += batch * stride_ob
            rows_i = pid_i * BLOCK + tl.arange(0, BLOCK)
            rows_j = pid_j * BLOCK + tl.arange(0, BLOCK)
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            for start in range(0, k, BLOCK_K):
                kk = start + offs_k
                a = tl.load(x_ptr + rows_i[:, None] * stride_xr + kk[None, :] * stride_xc,
                            mask=(rows_i[:, None] < n) & (kk[None, :] < k), other=0.0)
                b = tl.load(x_ptr + rows_j[:, None] * stride_xr + kk[None, :] * stride_xc,
                            mask=(rows_j[:, None] < n) & (kk[None, :] < k), other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc)
            acc = acc * alpha
            tile_mask = (rows_i[:, None] < n) & (rows_j[None, :] < n)
            if ADD_INPUT:
                x_tile = tl.load(x_ptr + rows_i[:, None] * stride_xr + rows_j[None, :] * stride_xc, mask=tile_mask, other=0.0)
                acc += beta * x_tile.to(tl.float32)
            result = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows_i[:, None] * stride_or + rows_j[None, :] * stride_oc, result, mask=tile_mask)
            if pid_j > pid_i:
                tl.store(out_ptr + rows_j[:, None] * stride_or + rows_i[None, :] * stride_oc, tl.trans(result),
                         mask=(rows_j[:, None] < n) & (rows_i[None, :] < n))

    @triton.jit
    def matmul_relu2(a_ptr, b_ptr, out_ptr, aux_ptr, m, n, k, stride_am, stride_ak, stride_bk, stride_bn,
                     stride_om, stride_on, FORWARD: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # y = A B, then FORWARD: out = y (pre), aux = relu(y)^2 (post); backward: out = 2 y relu(aux), aux = pre.
        # out and aux share strides. Tiles ordered in groups of GROUP_M rows of tiles, so B's tiles stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = (m + BLOCK_M - 1) // BLOCK_M, (n + BLOCK_N - 1) // BLOCK_N
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for start in range(0, k, BLOCK_K):
            kk = start + offs_k
            a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(rows[:, None] < m) & (kk[None, :] < k), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=(kk[:, None] < k) & (cols[None, :] < n), other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
        dtype = out_ptr.dtype.element_ty
        if FORWARD:
            pre = acc.to(dtype)
            tl.store(out_ptr + offsets, pre, mask=mask)
            relu = tl.maximum(pre.to(tl.float32), 0.0)
            tl.store(aux_ptr + offsets, (relu * relu).to(dtype), mask=mask)
        else:
            pre = tl.load(aux_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, (2.0 * acc * tl.maximum(pre, 0.0)).to(dtype), mask=mask)

    return dict(softcap_ce_forward=softcap_ce_forward, softcap_ce_backward=softcap_ce_backward,
                symmetric_matmul=symmetric_matmul, matmul_relu2=matmul_relu2)


def kernel(name: str):
    return triton_kernels(triton_interpreting())[name]


def ce_blocks() -> tuple:
    """(rows, vocabulary columns) per program of the cross-entropy kernels: on GPUs one row per program, in
    blocks of 2048 columns; under the interpreter, whose cost is per program and per operation, 16 rows of 256."""
    return (16, 256) if triton_interpreting() else (1, 2048)


@functools.lru_cache(maxsize=None)
def softcapped_ce_op():
    """Register (once) speedrun_gpt::softcapped_ce: (T, V) logits in any float dtype, (T,) targets, (n,) fp32 weights
    -> (per-row losses, per-row log-sum-exp), both fp32, with its Triton backward."""
    if hasattr(torch.ops.speedrun_gpt, "softcapped_ce"):  # registered by an earlier import of this file
        return torch.ops.speedrun_gpt.softcapped_ce

    @torch.library.custom_op("speedrun_gpt::softcapped_ce", mutates_args=())
    def softcapped_ce(logits: Tensor, targets: Tensor, weights: Tensor, cap: float, shift: float, div: float) -> tuple[Tensor, Tensor]:
        logits = logits.contiguous()
        rows, vocab = logits.shape
        losses = logits.new_empty(rows, dtype=torch.float32)
        lse = logits.new_empty(rows, dtype=torch.float32)
        if rows:
            block_rows, block = ce_blocks()
            kernel("softcap_ce_forward")[(-(-rows // block_rows),)](
                logits, targets.contiguous(), weights.contiguous(), losses, lse, rows, vocab, logits.stride(0),
                cap, shift, div, N_WEIGHTS=weights.numel(), ROWS=block_rows, BLOCK=block, num_warps=8)
        return losses, lse

    @softcapped_ce.register_fake
    def _(logits, targets, weights, cap, shift, div):
        return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)

    @torch.library.custom_op("speedrun_gpt::softcapped_ce_backward", mutates_args=())
    def softcapped_ce_backward(grad_losses: Tensor, logits: Tensor, targets: Tensor, weights: Tensor, lse: Tensor,
                               cap: float, shift: float, div: float) -> Tensor:
        logits = logits.contiguous()
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        if rows:
            block_rows, block = ce_blocks()
            kernel("softcap_ce_backward")[(-(-rows // block_rows),)](
                logits, targets.contiguous(), weights.contiguous(), lse, grad_losses, grad, rows, vocab,
                logits.stride(0), grad_losses.stride(0), cap, shift, div, N_WEIGHTS=weights.numel(),
                ROWS=block_rows, BLOCK=block, num_warps=8)
        return grad

    @softcapped_ce_backward.register_fake
    def _(grad_losses, logits, targets, weights, lse, cap, shift, div):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, targets, weights, cap, shift, div = inputs
        ctx.save_for_backward(logits, targets, weights, output[1])
        ctx.params = (cap, shift, div)

    def backward(ctx, grad_losses, _grad_lse):
        logits, targets, weights, lse = ctx.saved_tensors
        return softcapped_ce_backward(grad_losses, logits, targets, weights, lse, *ctx.params), None, None, None, None, None

    softcapped_ce.register_autograd(backward, setup_context=setup_context)
    return softcapped_ce


def softcapped_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None, cap: float, shift: float,
                             div: float) -> Tensor:
    """The Triton path of head_loss after its matmul: the summed (weighted multi-token) cross-entropy of
    cap*sigmoid((logits + shift)/div); weights None: next-token only."""
    if weights is None:
        weights = torch.ones(1, dtype=torch.float32, device=logits.device)
    if not torch.compiler.is_compiling():
        softcapped_ce_op()  # registers the op on first use (register_kernel_ops does before compiling)
    return torch.ops.speedrun_gpt.softcapped_ce(logits, targets, weights.float(), cap, shift, div)[0].sum()


def symmetric_matmul(x: Tensor, alpha: float = 1.0, beta: float = 0.0, add_input: bool = False) -> Tensor:
    """alpha x x^T, plus beta x if add_input (x square and symmetric, so x x^T = x^2): (b, n, k) -> (b, n, n) in
    x's dtype, fp32 accumulation, rounded once. Reference: torch.bmm(x, x.mT), torch.baddbmm(x, x, x, beta, alpha)."""
    batch, n, k = x.shape
    out = x.new_empty(batch, n, n)
    if triton_interpreting():  # the interpreter's cost is per program and per operation
        block, block_k, warps = 32, 128, 4
    else:  # 128 x 128 tiles where they fill an H100's 132 SMs (8 GPUs' (3, 768, 768) grams have 63), else 64 x 64
        upper_tiles = -(-n // 128) * (-(-n // 128) + 1) // 2
        block, block_k, warps = (128, 64, 8) if batch * upper_tiles >= 132 else (64, 64, 4)
    tiles = -(-n // block)
    kernel("symmetric_matmul")[(tiles, tiles, batch)](
        x, out, n, k, *x.stride(), *out.stride(), alpha, beta, ADD_INPUT=add_input, UPCAST=triton_interpreting(),
        BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=3)
    return out


def polar_step_symmetric(x: Tensor, a: float, b: float, c: float) -> Tensor:
    """polar_step_fused with A = XX^T and bA + cA^2 by symmetric_matmul (--triton-kernels symmetric)."""
    flat = x.reshape(-1, *x.shape[-2:]).contiguous()
    gram = symmetric_matmul(flat)
    poly = symmetric_matmul(gram, alpha=c, beta=b, add_input=True)
    return plus_scaled_input(poly, flat, a).view(x.shape)


def matmul_relu2(a: Tensor, b: Tensor, aux: Tensor | None = None) -> tuple:
    """Forward (aux None): a @ b -> (pre, relu(pre)^2). Backward (aux = pre): 2 (a @ b) relu(pre)."""
    m, k = a.shape
    n = b.size(1)
    out = a.new_empty(m, n)
    forward = aux is None
    aux = a.new_empty(m, n) if forward else aux.contiguous()
    block_m, block_n, block_k = (32, 64, 64) if triton_interpreting() else (128, 128, 64)
    grid = (-(-m // block_m) * -(-n // block_n),)
    kernel("matmul_relu2")[grid](
        a, b, out, aux, m, n, k, *a.stride(), *b.stride(), *out.stride(), FORWARD=forward,
        UPCAST=triton_interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=8, num_stages=3)
    return (out, aux) if forward else out


@functools.lru_cache(maxsize=None)
def linear_relu2_op():
    """Register (once) speedrun_gpt::relu2_mlp: relu(x fc_w)^2 proj_w^T with the Triton epilogues (x (T, dim),
    fc_w and proj_w (dim, hidden) as MLP stores them) -> (out, pre, post); pre and post are kept for the backward."""
    if hasattr(torch.ops.speedrun_gpt, "relu2_mlp"):
        return torch.ops.speedrun_gpt.relu2_mlp

    @torch.library.custom_op("speedrun_gpt::relu2_mlp", mutates_args=())
    def relu2_mlp(x: Tensor, fc_w: Tensor, proj_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre, post = matmul_relu2(x, fc_w)
        return post @ proj_w.T, pre, post

    @relu2_mlp.register_fake
    def _(x, fc_w, proj_w):
        hidden = x.new_empty(x.size(0), fc_w.size(1))
        return x.new_empty(x.size(0), proj_w.size(0)), hidden, torch.empty_like(hidden)

    @torch.library.custom_op("speedrun_gpt::relu2_mlp_backward", mutates_args=())
    def relu2_mlp_backward(grad: Tensor, x: Tensor, fc_w: Tensor, proj_w: Tensor, pre: Tensor,
                           post: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        grad = grad.contiguous()
        grad_pre = matmul_relu2(grad, proj_w, aux=pre)
        return grad_pre @ fc_w.T, x.T @ grad_pre, grad.T @ post

    @relu2_mlp_backward.register_fake
    def _(grad, x, fc_w, proj_w, pre, post):
        return torch.empty_like(x), torch.empty_like(fc_w), torch.empty_like(proj_w)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1], output[2])

    def backward(ctx, grad, _grad_pre, _grad_post):
        return relu2_mlp_backward(grad, *ctx.saved_tensors)

    relu2_mlp.register_autograd(backward, setup_context=setup_context)
    return relu2_mlp


def fused_mlp(x: Tensor, fc_w: Tensor, proj_w: Tensor) -> Tensor:
    """MLP.forward with --triton-kernels mlp: x (..., dim), weights in x's dtype."""
    if not torch.compiler.is_compiling():
        linear_relu2_op()  # registers the op on first use (register_kernel_ops does before compiling)
    return torch.ops.speedrun_gpt.relu2_mlp(x.reshape(-1, x.size(-1)), fc_w, proj_w)[0].view(x.shape)


# -----------------------------------------------------------------------------
# Optimizer: the recipe table, then Muon for hidden matrices and Adam for the rest, sharded without DDP.


@dataclass(frozen=True)
class ParamRule:
    """One row of the recipe: parameters whose name matches `pattern` (fnmatch) are trained by `optimizer` at
    the LR of Config field `lr` times `lr_mult` (a number, or None for 1), with Adam's `betas`, the optimizer's
    weight decay times `wd_mult`. Muon also scales each matrix's LR by sqrt(max(1, rows / cols)) of the matrices it
    sees:
      matrices  how Muon cuts the parameter into matrices: "stored" (its trailing two dims) or "head_pairs"
                (rows in blocks of 2 x head_dim: Q/K stored (..., heads x head_dim, dim), two heads a matrix)
      shape_lr  "rows/cols": the shape factor of the matrix as seen; "long/short": as if stored tall, so a
                matrix's factor does not depend on which way round the model stores it"""
    pattern: str
    optimizer: str
    lr: str
    lr_mult: float | None = None
    betas: tuple | None = None
    wd_mult: float = 1.0
    matrices: str = "stored"
    shape_lr: str = "rows/cols"


# The 2026-08-01 record's table (its TrainingManager.param_table), keyed by this model's names. The public script
# keeps banks (qk_bank, vo_bank, mlp_bank, scalars); this model stores per-layer tensors instead, so the scalar rows
# match a name anywhere in the path ("*resid_lambda*" catches both "resid_lambdas" and "blocks.3.resid_lambda").
# A parameter no row matches is refused, so a renamed parameter cannot silently fall back.
HEAD, EMBED = "lm_head_w", "embed.weight"  # tied until the split step: DistributedAdam.tie


def recipe(cfg: Config) -> list:
    """Which parameter gets which optimizer, LR, betas and decay: the first matching row wins. NorMuon's base LR
    0.023 (muon_lr), Adam's 0.008 (adam_lr); the MLP output matrices get 2x on top of their shape factor 2."""
    muon, adam = "muon", "adam"
    return [
        ParamRule("blocks.*.attn.qk_w", muon, "muon_lr", matrices="head_pairs"),   # (256, 768) a matrix: factor 1
        ParamRule("blocks.*.attn.v_w", muon, "muon_lr"),                            # (768, 768)
        ParamRule("blocks.*.attn.proj_w", muon, "muon_lr"),                         # (768, 768)
        ParamRule("blocks.*.mlp.fc_w", muon, "muon_lr", shape_lr="long/short"),     # 3072 x 768: factor 2
        ParamRule("blocks.*.mlp.proj_w", muon, "muon_lr", 2.0, shape_lr="long/short"),  # factor 2, x 2
        ParamRule("*smear_gate*", adam, "adam_lr", 0.01, (0.9, 0.99), wd_mult=0.0),
        ParamRule("blocks.*.attn.value_gate_w", adam, "adam_lr", None, (0.9, 0.99)),  # ve_gate_bank: wd x 1
        # MUDD and the MUDD gates: the weights decay (x 1), the biases and the gate's scale do not
        ParamRule("mudd_w[12]", adam, "adam_lr", 0.25, (0.9, 0.99)),
        ParamRule("mudd_b2", adam, "adam_lr", 0.25, (0.9, 0.99), wd_mult=0.0),
        ParamRule("mudd_gate_w[12]", adam, "adam_lr", 0.1, (0.9, 0.99)),
        ParamRule("mudd_gate_b2", adam, "adam_lr", 0.1, (0.9, 0.99), wd_mult=0.0),
        ParamRule("mudd_gate_scale", adam, "adam_lr", 0.1, (0.9, 0.99), wd_mult=0.0),
        ParamRule(HEAD, adam, "adam_lr", None, (0.5, 0.95), wd_mult=150.0),
        ParamRule(EMBED, adam, "adam_lr", None, (0.5, 0.95), wd_mult=150.0),
        ParamRule("value_embeds*", adam, "adam_lr", 75.0, (0.75, 0.95), wd_mult=5.0),
        ParamRule("bigram_embed*", adam, "adam_lr", 75.0, (0.75, 0.95), wd_mult=5.0),
        ParamRule("*post_lambda*", adam, "adam_lr", 1.0, (0.9, 0.95), wd_mult=0.0),
        ParamRule("*resid_lambda*", adam, "adam_lr", 5.0, (0.9, 0.95), wd_mult=0.0),
        # the script's `scalars` bank (24 values): SA lambdas (per layer, scaling Q/K/V and O), smear, skip lambdas
        ParamRule("*sa_lambda*", adam, "adam_lr", 5.0, (0.9, 0.99), wd_mult=0.0),
        ParamRule("*smear_lambda*", adam, "adam_lr", 5.0, (0.9, 0.99), wd_mult=0.0),
        ParamRule("*skip_lambda*", adam, "adam_lr", 5.0, (0.9, 0.99), wd_mult=0.0),
    ]


@dataclass(frozen=True)
class ParamSetting:
    name: str
    param: Tensor
    optimizer: str
    lr: float            # base LR x multiplier
    shape_factor: float  # Muon's sqrt(max(1, rows/cols)); 1 for Adam
    base_lr: float = 0.0          # the Config base LR (Muon's decay scales with it)
    betas: tuple = ()             # Adam only
    weight_decay: float = 0.0     # the optimizer's decay x the row's multiplier
    matrix_shape: tuple = ()      # Muon: the (rows, cols) of the matrices it orthogonalizes

    @property
    def effective_lr(self) -> float:
        return self.lr * self.shape_factor


def muon_shape_factor(shape: tuple) -> float:
    rows, cols = shape[-2:]
    return max(1.0, rows / cols) ** 0.5


def muon_matrix_shape(shape: tuple, rule: ParamRule, cfg: Config) -> tuple:
    """The (rows, cols) of the matrices Muon sees in a parameter of this shape."""
    rows, cols = shape[-2:]
    if rule.matrices == "stored":
        return (rows, cols)
    if rule.matrices == "head_pairs":  # two heads' rows of Q (or of K) orthogonalized together, as the 2026 script
        pair_rows = 2 * cfg.head_dim
        if rows % pair_rows:
            raise ValueError(f"recipe row {rule.pattern}: {rows} rows are not whole pairs of {cfg.head_dim}-row heads")
        return (pair_rows, cols)
    raise ValueError(f"recipe row {rule.pattern}: unknown matrices {rule.matrices!r}")


def matrix_shape_factor(matrix_shape: tuple, rule: ParamRule) -> float:
    if rule.shape_lr == "long/short":
        return muon_shape_factor(tuple(sorted(matrix_shape, reverse=True)))
    return muon_shape_factor(matrix_shape)


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
        lr = base_lr * (1.0 if rule.lr_mult is None else rule.lr_mult)
        if rule.optimizer == "muon":
            matrix_shape = muon_matrix_shape(tuple(p.shape), rule, cfg)
            factor, decay = matrix_shape_factor(matrix_shape, rule), cfg.muon_weight_decay * rule.wd_mult
        else:
            matrix_shape, factor, decay = (), 1.0, cfg.adam_weight_decay * rule.wd_mult
        settings.append(ParamSetting(name, p, rule.optimizer, lr, factor, base_lr, tuple(rule.betas or ()), decay, matrix_shape))
    return settings


def layer_ranges(layers: list) -> str:
    """[0, 1, 2, 3, 5, 6] -> '0-3,5-6'"""
    runs = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int16: "int16"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def optimizer_state_dtypes(s: ParamSetting) -> str:
    """What the optimizer keeps per weight, as DistributedAdam / MatrixGroup allocate it."""
    if s.optimizer == "adam":
        return f"m,v:{dtype_name(moment_dtype(s.param))}"
    return "mom:fp32" + ("+low:int16" if s.param.dtype == torch.bfloat16 else "")


def recipe_report(cfg: Config, model: nn.Module | None = None) -> str:
    """The recipe as applied to this config's model (built on the meta device with the trainer's storage: no memory,
    no data), one line per kind of parameter, with the layers that have it: init, storage dtype, the optimizer's
    state per weight, optimizer, LR, Adam's betas, the weight decay coefficient and Muon's matrix shape."""
    if model is None:
        with torch.device("meta"):
            model = store_as_record(GPT(cfg, max_seq_len(cfg)), cfg)
    try:
        settings = assign_params(model, cfg)
    except ValueError as e:
        raise ConfigError(f"{e} (the recipe table expects this model's parameter names)") from None
    kinds = {}
    for s in settings:
        layer = re.match(r"blocks\.(\d+)\.", s.name)
        name = re.sub(r"^blocks\.\d+\.", "blocks.*.", s.name)
        shape = "x".join(map(str, s.param.shape)) or "scalar"
        betas = f"{s.betas[0]},{s.betas[1]}" if s.optimizer == "adam" else "-"
        matrix = "x".join(map(str, s.matrix_shape)) if s.optimizer == "muon" else "-"
        storage = (getattr(s.param, "init", "-"), dtype_name(s.param.dtype), optimizer_state_dtypes(s))
        key = (name, shape, *storage, s.optimizer, s.lr, s.shape_factor, s.effective_lr, betas, s.weight_decay, matrix)
        kinds.setdefault(key, []).append(int(layer.group(1)) if layer else None)
    header = (f"{'parameter':24} {'layers':>10} {'shape':>12} {'init':>17} {'dtype':>5} {'optimizer state':>19}"
              f" {'optimizer':>9} {'lr':>7} {'shape x':>7} {'effective lr':>12} {'betas':>10} {'wd':>7} {'matrix':>9}")
    lines = [header]
    for (name, shape, init, dtype, state, optimizer, lr, factor, effective, betas, decay, matrix), layers in kinds.items():
        where = layer_ranges(layers) if layers[0] is not None else "-"
        lines.append(f"{name:24} {where:>10} {shape:>12} {init:>17} {dtype:>5} {state:>19} {optimizer:>9} {lr:>7.4g}"
                     f" {factor:>7.4g} {effective:>12.4g} {betas:>10} {decay:>7.4g} {matrix:>9}")
    adam = (f"adam: eps {cfg.adam_eps}, cautious weight decay: wd ({cfg.adam_weight_decay} x the row's multiplier) x effective LR^2"
            + (", odd steps only (even steps' gradients accumulate)" if cfg.adam_odd_steps_only else ""))
    muon = (f"muon: {cfg.orthogonalizer}, Nesterov momentum {cfg.muon_momentum_start} -> {cfg.muon_momentum} over "
            f"{cfg.muon_momentum_warmup_steps} steps, NorMuon beta2 {cfg.normuon_beta2} along the smaller dimension, "
            f"cautious weight decay: wd ({cfg.muon_weight_decay} x the row's multiplier) x base LR x effective LR")
    return "\n".join(lines + [adam, muon])

def polar_express_coeffs(safety: float = 1.02) -> list:
    """Polar Express (Amsel et al. 2025; l=1e-3, 5 steps, cushion 0.02); each step but the last is divided by
    (s, s^3, s^5) so bf16 rounding cannot push a singular value past the next step's stable range."""
    raw = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
           (4.042929935166739, -2.808917465908714, 0.5000178451051316),
           (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
           (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
           (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
    return [(a / safety, b / safety ** 3, c / safety ** 5) for a, b, c in raw[:-1]] + [raw[-1]]


# The 2026 script's Polar Express: the same five steps undivided (safety 1 per step), the input still scaled by
# 1/(1.02 |X|_F + 1e-6). Ours above also shrinks each step but the last; tests pin both.
ORTHOGONALIZERS = {"polar_express_2026": (polar_express_coeffs(safety=1.0), 1.02, 1e-6),
                   "polar_express": (polar_express_coeffs(), 1.02, 1e-6)}


def orthogonalize(grads: Tensor, method: str = "polar_express_2026", symmetric: bool = False) -> Tensor:
    """Approximate U V^T of each (..., rows, cols) matrix in bf16: X <- aX + (bA + cA^2)X with A = XX^T.
    symmetric: A and bA + cA^2 by the Triton kernel (rounded once per product, as polar_step_fused)."""
    coeffs, norm_safety, eps = ORTHOGONALIZERS[method]
    x = scaled_to_unit_norm(grads, norm_safety, eps)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the short side: A is (min, min)
        x = x.mT
    step = polar_step_fused if method in FUSED_ORTHOGONALIZERS else polar_step
    step = polar_step_symmetric if symmetric else step
    for a, b, c in coeffs:
        x = step(x, a, b, c)
    return x.mT if transposed else x


FUSED_ORTHOGONALIZERS = {"polar_express_2026"}


def scaled_to_unit_norm(grads: Tensor, norm_safety: float, eps: float) -> Tensor:
    """X / (safety |X|_F + eps) in bf16, computed in fp32 from the fp32 input and rounded once: what the script's
    compiled polar_express runs (inductor folds its X.bfloat16() into the division, norm and all, leaving one
    rounding; the eager chain of 4 bf16 roundings put the weights 3x further from the script's than its own noise)."""
    x = grads.float()
    return (x / (x.norm(dim=(-2, -1), keepdim=True) * norm_safety + eps)).bfloat16()


def emulate_bf16_matmul(x: Tensor) -> bool:
    """A CPU without bf16 matrix units runs a bf16 matmul 25-100x slower than fp32 (AVX2: 102 ms against 1 ms for
    8 x (128x128 @ 128x512)), so there the orthogonalizer's bf16 products are computed in fp32 from the bf16
    operands and rounded to bf16 once: what a GPU's bf16 matmul computes (fp32 accumulation, one rounding)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def product(x: Tensor, y: Tensor) -> Tensor:
    return (x.float() @ y.float()).bfloat16() if emulate_bf16_matmul(x) else x @ y


def add_product(acc: Tensor, x: Tensor, y: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """beta acc + alpha x @ y, added in the accumulator and rounded once (baddbmm/addmm, cuBLAS's epilogue)."""
    add = torch.baddbmm if acc.ndim == 3 else torch.addmm
    if emulate_bf16_matmul(acc):
        return add(acc.float(), x.float(), y.float(), beta=beta, alpha=alpha).bfloat16()
    return add(acc, x, y, beta=beta, alpha=alpha)


def polar_step(x: Tensor, a: float, b: float, c: float) -> Tensor:
    gram = product(x, x.mT)
    return a * x + product(b * gram + product(c * gram, gram), x)


def polar_step_fused(x: Tensor, a: float, b: float, c: float) -> Tensor:
    """The same step rounded to bf16 once per product, as the 2026 script's kernels do (fp32 accumulation of
    bA + cA^2 and of aX + BX): baddbmm/addmm add in the accumulator."""
    flat = x.reshape(-1, *x.shape[-2:]) if x.ndim > 3 else x
    gram = product(flat, flat.mT)
    poly = add_product(gram, gram, gram, beta=b, alpha=c)
    return plus_scaled_input(poly, flat, a).view(x.shape)


# The script computes aX + BX in two kernels for a matrix with a side over 1024 (its split_baddbmm, for the MLP
# bank's 3072 x 768: baddbmm would copy X, read twice): BX is rounded to bf16 before aX is added. Summing in one
# rounding there instead moved the MLP weights 3x further from the script's than its own rounding noise.
SPLIT_PRODUCT_SIDE = 1024


def plus_scaled_input(poly: Tensor, x: Tensor, a: float) -> Tensor:
    """a X + B X: rounded once, or B X rounded and then aX added (rounded again) where a side is over 1024."""
    if max(x.shape[-2:]) <= SPLIT_PRODUCT_SIDE:
        return add_product(x, poly, x, beta=a)
    bx = product(poly, x)
    if emulate_bf16_matmul(x):  # a CPU's bf16 add_ rounds alpha to bf16 first; CUDA's (and the script's) keeps it fp32
        return (bx.float() + a * x.float()).bfloat16()
    return bx.add_(x, alpha=a)


class Comm:
    """The few collectives the optimizers need; a world of one copies and does nothing else."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
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
    contiguous share and keeps momentum only for it. `decay`: cautious weight decay per unit of effective LR (the
    2026 script's weight decay x base LR); 0: none. `param_lrs` gives each parameter its own LR (the 2026 MLP bank:
    input and output matrices in one group, the output at 2x)."""

    def __init__(self, params: list, shape: tuple, param_lrs: list, comm: Comm, decay: float = 0.0):
        self.params, self.shape, self.decay = params, shape, decay
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
        self.momentum = torch.zeros(per_rank, *shape, dtype=torch.float32, device=p0.device)
        # NorMuon's second moment: one per entry of the larger dimension (averaged over the smaller one)
        self.stats_dim = -1 if rows >= cols else -2
        moment_shape = (per_rank, rows, 1) if self.stats_dim == -1 else (per_rank, 1, cols)
        self.second_moment = torch.zeros(*moment_shape, dtype=torch.float32, device=p0.device)
        self.grad_shard = torch.empty(per_rank, *shape, dtype=p0.dtype, device=p0.device)  # reduce-scattered in the gradients' dtype
        self.gathered = torch.empty(self.padded, *shape, dtype=p0.dtype, device=p0.device)
        # bf16 weights (the record's storage): the low 16 bits of each owned matrix's fp32 master, zero at init (the
        # master is then the weight rounded to nearest), as the script's uint16 mantissa (r2026.py 568-570)
        self.low_bits = None
        if p0.dtype == torch.bfloat16:
            self.low_bits = torch.zeros(per_rank, *shape, dtype=torch.int16, device=p0.device)

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

    def own_masters(self) -> Tensor:
        """The fp32 masters of the owned matrices: the weights themselves, or bf16 weights joined with their low bits."""
        own = self.own_params()
        return own if self.low_bits is None else join_low_bits(own, self.low_bits)

    def keep_masters(self, masters: Tensor) -> Tensor:
        """Store updated masters; returns what the weights become (and all ranks gather): the masters, or with bf16
        weights their top 16 bits (truncation, as the script), the low 16 staying on this rank."""
        if self.low_bits is None:
            return masters.to(self.gathered.dtype)
        high, low = split_low_bits(masters)
        self.low_bits.copy_(low)
        return high.contiguous()


# An fp32 number is its bf16 truncation (the high 16 bits) and 16 low bits. Joined and split by reinterpreting the
# memory (int16 pairs <-> fp32, little-endian: low half first), with no integer shifts (uint32 shifts are missing
# from eager CPU torch): exact, and a bf16 weight with low bits 0 is its own fp32 value.
assert sys.byteorder == "little", "the bf16 + low bits storage reinterprets fp32 memory as little-endian halves"


def join_low_bits(high: Tensor, low: Tensor) -> Tensor:
    return torch.stack([low, high.view(torch.int16)], dim=-1).view(torch.float32).squeeze(-1)


def split_low_bits(master: Tensor) -> tuple:
    """(the bf16 truncation of each fp32 value, its low 16 bits as int16)."""
    halves = master.contiguous().view(torch.int16).unflatten(-1, (-1, 2))
    return halves[..., 1].view(torch.bfloat16), halves[..., 0]


def cautious_decay_and_step_(param: Tensor, update: Tensor, lr, decay) -> Tensor:
    """param -= lr x update, and decays param by the factor `decay` only where the update pushes the same way
    as the weight (sign(update) == sign(weight), zeros included), so the decay never fights the gradient."""
    update = update.float()
    agrees = (update * param) >= 0
    return param.sub_(param * agrees * decay).sub_(update * lr)


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
    """Muon: Nesterov momentum, then the update is orthogonalized and applied at each matrix's effective LR
    (the recipe's, shape factor included). Gradients are reduce-scattered so each rank averages only the
    matrices it owns, updates them, and all-gathers the new weights: the bytes of one all-reduce, and
    1/world_size of the optimizer work. param_lrs: (param, lr, matrix shape, decay)."""
    symmetric_kernels = False  # --triton-kernels symmetric

    def __init__(self, param_lrs: list, orthogonalizer: str, comm: Comm, normuon_beta2: float = 0.0):
        groups = {}
        for p, lr, shape, decay in param_lrs:
            # one group per shape whatever the LR, as the script's banks, so the 22 MLP matrices split evenly over 8 ranks
            groups.setdefault((tuple(shape), decay), []).append((p, lr))
        self.groups = [MatrixGroup([p for p, _ in entries], shape, [lr for _, lr in entries], comm, decay)
                       for (shape, decay), entries in groups.items()]
        self.orthogonalizer, self.comm, self.normuon_beta2 = orthogonalizer, comm, normuon_beta2
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
            grad = group.grad_shard.float()  # bf16 from the record's reduce-scatter; momentum in fp32
            group.momentum.lerp_(grad, one_minus_in_fp32(momentum))
            nesterov = grad.lerp(group.momentum, momentum)
            update = orthogonalize(nesterov, self.orthogonalizer, self.symmetric_kernels)
            if self.normuon_beta2:
                update = self._reduce_variance(group, update)
            lrs = group.own_lrs * lr_mult  # decay x base LR x effective LR (per matrix), both scheduled
            new_masters = cautious_decay_and_step_(group.own_masters(), update, lrs, group.decay * lr_mult * lrs)
            gathers.append(self.comm.all_gather(group.gathered, group.keep_masters(new_masters)))
        for group, handle in zip(self.groups, gathers):
            wait(handle)
            torch._foreach_copy_(group.views, list(group.gathered[: len(group.views)].unbind(0)))
        self._reset_reduction()

    def _reduce_variance(self, group: MatrixGroup, update: Tensor) -> Tensor:
        """NorMuon as the 2026 script has it: the mean square is taken over the smaller dimension (one
        statistic per row of a tall matrix, per column of a wide one), its EMA evens those out, and the
        matrix keeps its Frobenius norm. Computed in fp32 from the norms of the mean squares (one pass); the
        bf16 update times the fp32 scale is rounded once, as the script's compiled kernel does."""
        dim = group.stats_dim
        mean_square = update.float().square().mean(dim, keepdim=True)
        count = update.size(dim)
        norm = (mean_square.sum((-2, -1), keepdim=True) * count).sqrt()
        group.second_moment.lerp_(mean_square, 1 - self.normuon_beta2)
        step = group.second_moment.clamp_min(1e-10).rsqrt()
        new_norm = (mean_square * count * step.square()).sum((-2, -1), keepdim=True).sqrt()
        return (update.float() * (step * (norm / new_norm.clamp_min(1e-10)))).to(update.dtype)


def one_minus_in_fp32(value: float) -> float:
    """1 - value subtracted in fp32, as the script's 1 - momentum of a 0-d fp32 tensor. fp32(1 - value) is another
    number for most values (0.95: 0.0500000119 against 0.0500000007), which moves every momentum buffer."""
    return float(np.float32(1.0) - np.float32(value))


def as_shape_of(tensor: Tensor, shape: tuple) -> Tensor:
    """A tied pair's tensor seen in its partner's layout: itself if the shapes agree, else its transpose."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tuple(tensor.shape[::-1]) == tuple(shape) and tensor.ndim == 2:
        return tensor.T
    raise ValueError(f"cannot tie a {tuple(tensor.shape)} tensor to a {tuple(shape)} one")


def moment_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


class DistributedAdam(GradientReduction):
    """Adam with bias correction. Large tensors whose first dimension divides by the world size are sharded
    along it (reduce-scatter, update own rows, all-gather); small ones are all-reduced and updated everywhere.
    param_lrs: (param, lr, betas, weight decay), the decay cautious. The embedding can be tied to the head
    (tie/untie)."""

    SHARD_MIN_NUMEL = 1 << 16

    def __init__(self, param_lrs: list, eps: float, comm: Comm, pack_small: bool = True):
        self.eps, self.comm, self.step_count = eps, comm, 0
        self.entries = []
        for p, lr, entry_betas, decay in param_lrs:
            sharded = comm.world_size > 1 and p.numel() >= self.SHARD_MIN_NUMEL and p.size(0) % comm.world_size == 0
            rows = p.size(0) // comm.world_size if sharded else None
            first_row = comm.rank * rows if sharded else 0
            param_view = p.data[first_row : first_row + rows] if sharded else p.data  # 0-d scalars (2026) too
            self.entries.append(dict(
                param=p, lr=lr, sharded=sharded, param_view=param_view, first_row=first_row,
                betas=tuple(entry_betas), decay=decay,
                grad=torch.empty_like(param_view) if sharded else None,
                # moments at least fp32 whatever the parameter's dtype (the 2026 value embeddings are bf16)
                exp_avg=torch.zeros_like(param_view, dtype=moment_dtype(p)),
                exp_avg_sq=torch.zeros_like(param_view, dtype=moment_dtype(p)),
                pack=None))
        # Small replicated tensors (scalars, gates) share one all-reduce per dtype instead of one each: an
        # average is elementwise, so the packed call gives every element exactly the unpacked value.
        self.packs = []
        if pack_small and comm.world_size > 1:
            by_dtype = {}
            for i, e in enumerate(self.entries):
                if not e["sharded"] and e["param"].numel() < self.SHARD_MIN_NUMEL:
                    by_dtype.setdefault(e["param"].dtype, []).append(i)
            for members in by_dtype.values():
                if len(members) > 1:
                    for i in members:
                        self.entries[i]["pack"] = len(self.packs)
                    self.packs.append(dict(members=members, ready=0))
        self.gathers = []  # the parameter all-gathers of a step whose wait finish_step does
        self.accepting = True  # False: this step only accumulates gradients, so the hooks start no reduction
        self.tied = None  # (head entry, embed entry) while the embedding is the head's transpose
        self._init_reduction([[e["param"]] for e in self.entries])

    def entry_of(self, param: Tensor) -> int:
        return next(i for i, e in enumerate(self.entries) if e["param"] is param)

    def grad_ready(self, param: Tensor):
        if self.accepting:
            super().grad_ready(param)

    def _launch(self, unit: int):
        if self.tied is not None and unit == self.tied[1]:
            self.launched[unit] = True  # the tied embedding's gradient goes with the head's
            return
        super()._launch(unit)

    def _reset_reduction(self):
        super()._reset_reduction()
        for pack in getattr(self, "packs", ()):
            pack["ready"] = 0

    @torch.no_grad()
    def _start_reduction(self, unit: int):
        e = self.entries[unit]
        if self.tied is not None and unit == self.tied[0]:
            self._fold_embed_grad()
        if e["sharded"]:
            return self.comm.reduce_scatter_mean(e["grad"], e["param"].grad)
        if e["pack"] is not None:
            return self._join_pack(self.packs[e["pack"]])
        e["grad"] = e["param"].grad
        return self.comm.all_reduce_mean(e["grad"])

    def _join_pack(self, pack: dict):
        """A packed tensor's gradient is final; the last of its pack starts the pack's one all-reduce, and each
        member's gradient becomes its slice of the reduced buffer (read only after the step's wait)."""
        pack["ready"] += 1
        if pack["ready"] < len(pack["members"]):
            return None
        members = [self.entries[i] for i in pack["members"]]
        buffer = torch.cat([e["param"].grad.reshape(-1) for e in members])
        for e, flat in zip(members, buffer.split([e["param"].numel() for e in members])):
            e["grad"] = flat.view(e["param"].shape)
        return self.comm.all_reduce_mean(buffer)

    # -- the tied embedding (2026): one tensor trained as the head until the split step

    def tie(self, head: Tensor, embed: Tensor, embed_has_grad: bool = True):
        """Train embed as the head's transpose: only the head is updated, and embed copies it after each step.
        embed_has_grad: a model that uses embed itself has its gradient added to the head's before the head's
        reduction (the head's unit waits for both); GPT looks its tokens up in the head's own matrix while tied, so
        embed gets no gradient and the head's reduction starts as soon as the head's gradient is final."""
        head_unit, embed_unit = self.entry_of(head), self.entry_of(embed)
        as_shape_of(head, embed.shape)  # refuses shapes that cannot tie
        if self.entries[head_unit]["pack"] is not None or self.entries[embed_unit]["pack"] is not None:
            raise ValueError("cannot tie tensors small enough to share the packed all-reduce")
        self.tied = (head_unit, embed_unit)
        self.unit_of[id(embed)] = head_unit
        self.unit_sizes[head_unit] = 2 if embed_has_grad else 1

    def _fold_embed_grad(self):
        head, embed = (self.entries[i]["param"] for i in self.tied)
        if embed.grad is not None:
            head.grad.add_(as_shape_of(embed.grad, head.shape))
            embed.grad = None  # now part of the head's: an accumulating (even) step must not count it twice

    def _copy_head_into_embed(self):
        head, embed = (self.entries[i]["param"] for i in self.tied)
        embed.data.copy_(as_shape_of(head.data, embed.shape))

    def _full_state(self, entry: dict, key: str) -> Tensor:
        if not entry["sharded"]:
            return entry[key]
        full = entry[key].new_empty(entry["param"].shape)
        wait(self.comm.all_gather(full, entry[key]))
        return full

    @torch.no_grad()
    def untie(self):
        """The split: embed trains apart from now on, starting from the head's Adam moments (transposed, its
        own rows on each rank); the shared step count carries the head's bias correction over."""
        head_unit, embed_unit = self.tied
        head, embed = self.entries[head_unit], self.entries[embed_unit]
        for key in ("exp_avg", "exp_avg_sq"):
            full = as_shape_of(self._full_state(head, key), embed["param"].shape)
            rows = embed[key].size(0)
            embed[key].copy_(full[embed["first_row"] : embed["first_row"] + rows])
        self.unit_of[id(embed["param"])] = embed_unit
        self.unit_sizes[head_unit] = 1
        self.tied = None

    # -- the step

    @torch.no_grad()
    def step(self, lr_mult: float, wait_gathers: bool = True):
        """Small replicated tensors are updated together with foreach kernels (dozens of scalars and gates
        would otherwise cost a handful of kernel launches each); sharded ones one by one, each all-gather
        overlapping the next update. wait_gathers False: the all-gathers are left running and finish_step()
        waits for them, so other work (Muon's step) can be queued first instead of behind them."""
        self.step_count += 1
        skipped = self.tied[1] if self.tied is not None else None
        for handle, e in zip(self.pending, self.entries):
            if not e["sharded"]:
                wait(handle)
        self._update([e for i, e in enumerate(self.entries) if not e["sharded"] and i != skipped], lr_mult)
        for i, (handle, e) in enumerate(zip(self.pending, self.entries)):
            if e["sharded"] and i != skipped:
                wait(handle)
                self._update([e], lr_mult)
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

    def _update(self, entries: list, lr_mult: float):
        by_betas = {}
        for e in entries:
            by_betas.setdefault(e["betas"], []).append(e)
        for betas, same in by_betas.items():
            self._update_moments(same, betas)
            plain = [e for e in same if not e["decay"] and e["param_view"].dtype == e["exp_avg"].dtype]
            if plain:
                self._apply_plain(plain, betas, lr_mult)
            for e in same:
                if e["decay"] or e["param_view"].dtype != e["exp_avg"].dtype:
                    self._apply_cautious(e, betas, lr_mult)  # in the moments' dtype, rounded once into the parameter

    def _update_moments(self, entries: list, betas: tuple):
        beta1, beta2 = betas
        grads = [e["grad"].to(e["exp_avg"].dtype) for e in entries]  # the same tensors unless bf16
        exp_avgs, exp_avg_sqs = [e["exp_avg"] for e in entries], [e["exp_avg_sq"] for e in entries]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    def _bias_corrections(self, betas: tuple) -> tuple:
        beta1, beta2 = betas
        return 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count

    def _apply_plain(self, entries: list, betas: tuple, lr_mult: float):
        bias1, bias2 = self._bias_corrections(betas)
        params, exp_avgs = [e["param_view"] for e in entries], [e["exp_avg"] for e in entries]
        # The speedrun's form: eps joins sqrt(v) before the bias correction, i.e. eps / sqrt(bias2) in
        # torch.optim.Adam's terms; the correction is folded into the step size.
        denoms = torch._foreach_sqrt([e["exp_avg_sq"] for e in entries])
        torch._foreach_add_(denoms, self.eps)
        step_sizes = [-e["lr"] * lr_mult * math.sqrt(bias2) / bias1 for e in entries]
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)

    def _apply_cautious(self, e: dict, betas: tuple, lr_mult: float):
        """The 2026 step: the same Adam update, plus weight decay of (effective LR)^2 x decay where the update
        and the weight have the same sign (strictly: a zero weight or update is not decayed). A bf16 weight (the
        record's storage) is updated as the script's (r2026.py 853-857): the whole update in fp32, subtracted from
        the weight in fp32 and rounded once into bf16, p = bf16(f32(p) - u); no fp32 master."""
        bias1, bias2 = self._bias_corrections(betas)
        lr = e["lr"] * lr_mult
        param = e["param_view"]
        update = e["exp_avg"] / (e["exp_avg_sq"].sqrt() + self.eps) * (lr * math.sqrt(bias2) / bias1)
        weight = param.to(update.dtype)
        agrees = (update * weight) > 0
        update.addcmul_(weight, agrees, value=lr * lr * e["decay"])
        if param.dtype == update.dtype:
            param.sub_(update)
        else:
            param.copy_(weight.sub_(update))


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
    adam_odd_steps_only: bool = False  # 2026: Adam steps on odd steps, even steps' gradients accumulate
    split_step: int = -1  # 2026: the last step with the embedding tied to the head (-1: never tied)

    def close(self):
        if self.hooks is not None:
            self.hooks.remove()


def build_optimizers(model: GPT, cfg: Config, comm: Comm) -> Optimizers:
    settings = assign_params(model, cfg)
    adam_lrs = [(s.param, s.effective_lr, s.betas, s.weight_decay) for s in settings if s.optimizer == "adam"]
    muon_lrs = [(s.param, s.effective_lr, s.matrix_shape, s.weight_decay * s.base_lr)
                for s in settings if s.optimizer == "muon"]
    adam = DistributedAdam(adam_lrs, cfg.adam_eps, comm)
    muon = DistributedMuon(muon_lrs, cfg.orthogonalizer, comm, cfg.normuon_beta2)
    muon.symmetric_kernels = "symmetric" in kernel_names(cfg)
    hooks = OverlapHooks(model, [adam, muon]) if comm.world_size > 1 else None
    split_step = embed_split_step(cfg)
    if split_step >= 0:  # tied from the start
        params = dict(model.named_parameters())
        adam.tie(params[HEAD], params[EMBED], embed_has_grad=not isinstance(model, GPT))  # GPT.embedding_table
    adam.accepting = is_adam_step(0, cfg)
    return Optimizers(adam, muon, hooks, cfg.adam_odd_steps_only, split_step)


@torch.no_grad()
def step_optimizers(opt: Optimizers, model: nn.Module, schedule: StepSchedule):
    """Reduce gradients and step both optimizers as the schedule says, then clear the gradients they used.
    Adam steps on odd steps only; on even ones its gradients stay and the next backward adds to them. While
    tied, the embedding's gradient joins the head's and the embedding copies the head after each Adam step;
    after the split step's Adam step the head's moments are copied into the embedding's and they part."""
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
FETCH_HINT = "fetch FineWeb with: python data/cached_fineweb10B.py 9"


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
    (as the 2026 script on 8 GPUs); shards load on a background thread; the data cycles when it runs out. It counts
    what it reads (tokens passed over) and what sequences use, for the log's data-use line."""

    def __init__(self, files: list, longest_seq_len: int, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None):
        self.shard_tokens = train_shard_tokens(files, longest_seq_len)
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
        check_same_shards(state, self.files, self.shard_tokens)
        self.next_shard.result()
        self.shard_index = state["shard_index"] - 1
        self.next_shard = self.pool.submit(self._read, state["shard_index"])
        self._advance_shard()
        self.next_doc, self.passes, self.tokens_used = state["next_doc"], state["passes"], state["tokens_used"]
        self.tokens_before_shard = state["tokens_before_shard"]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def train_shard_tokens(files: list, longest_seq_len: int) -> list:
    """Each training shard's token count, from its checked header; each must hold one sequence of the longest stage."""
    counts = [shard_token_count(f) for f in files]
    for f, num_tokens in zip(files, counts):
        if num_tokens < longest_seq_len + 1:
            raise DataError(f"{f}: {num_tokens} tokens, fewer than one training sequence of {longest_seq_len + 1}")
    return counts


def check_same_shards(loader_state: dict, files: list, shard_tokens: list):
    """A checkpoint's stream goes on only over the shards it was trained on: the same names and sizes, in order."""
    if (loader_state["files"], loader_state["shard_tokens"]) != ([os.path.basename(f) for f in files], shard_tokens):
        names = loader_state["files"]
        raise DataError(f"the checkpoint was trained on {len(names)} shards ({', '.join(names[:3])}, ...) "
                        f"that differ from --train-files ({len(files)} shards); pass the checkpoint's --train-files")


def max_seq_len(cfg: Config) -> int:
    """The longest sequence the model sees: training's longest stage or a validation sequence (RoPE's table)."""
    return max(cfg.val_seq_len, *cfg.stage_seq_len)


def accumulation_steps(batch_tokens: int, seq_len: int, world_size: int) -> int:
    """Sequences of one step per process: the global batch is world_size x accumulation sequences of seq_len."""
    return batch_tokens // (world_size * seq_len)


def pack_sequence(doc_starts: np.ndarray, shard_len: int, first_doc: int, seq_len: int, max_doc_len: int):
    """The 2026 script's packing of one training sequence of seq_len + 1 tokens (inputs and the shifted targets):
    whole documents in stream order from document first_doc, each cut to its first max_doc_len tokens (the rest
    of a long document is skipped, not carried over), the last one cut to fill the sequence exactly.
    Returns (spans, next_doc): spans are (start, end) token ranges of the shard; next_doc is the document after
    the last one used (the remainder of the cut last document is skipped too). None if the shard ends first.
    Every span starts at a document's <|endoftext|> and holds no other, so the BOS tokens of the packed inputs
    mark exactly the 2026 script's cu_seqlens (see document_boundaries)."""
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
    shard cannot hold the whole step (the 2026 script then takes the step from the next shard)."""
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
    found from its <|endoftext|> tokens. With max_docs, padded to that fixed size with len(inputs), as the 2026
    script pads its cum_lengths (a fixed shape for compiled varlen attention); more documents is an error.
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
# step and the config: stages with a table of values each (--stage-steps). Training step k, and the validation
# before it, read schedule_at(k); step train_steps only validates.


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
    prefix_weight: float  # loss weight of the next token's byte-prefix token (prefix-token prediction)
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
    """The stage's multiplier (larger batches, larger LR); from a whole step (the 2026 script truncates it, 576 for
    1440 x 0.4) linearly from the current stage's multiplier to final_lr_frac at the end of the scheduled steps,
    then flat through the extension."""
    stage_lr = cfg.stage_lr_mult[stage_of(step, cfg)]
    end = scheduled_steps(cfg)
    cooldown_start = int(end * (1 - cfg.cooldown_frac))
    if cfg.cooldown_frac == 0 or step < cooldown_start:
        return stage_lr
    done = min(1.0, (step - cooldown_start) / (end - cooldown_start))
    return stage_lr * (1 - done) + cfg.final_lr_frac * done


def muon_momentum(step: int, cfg: Config) -> float:
    """Warm-up from start to final over the first warm-up steps; back to start over the last cool-down steps (2026)."""
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
        return cfg.final_long_window_blocks  # the final validation may look further than training did (2026: 20)
    return cfg.stage_long_window_blocks[stage_of(step, cfg)]


def short_window_blocks(step: int, cfg: Config) -> int:
    return cfg.stage_short_window_blocks[stage_of(step, cfg)]


def mtp_weights(step: int, cfg: Config) -> tuple:
    """Loss weights of the next 1, 2, 3, ... tokens: linear from the stage's start to its end weights."""
    stage, done = stage_of(step, cfg), stage_progress(step, cfg)
    start, end = cfg.stage_mtp_weights_start[stage], cfg.stage_mtp_weights_end[stage]
    return tuple(a + (b - a) * done for a, b in zip(start, end))


def prefix_weight(step: int, cfg: Config) -> float:
    """Weight of the prefix-token term: linear from the stage's start to its end value (2026-08: 0.25 through
    stage 0, down to 0 over stage 1)."""
    stage, done = stage_of(step, cfg), stage_progress(step, cfg)
    start, end = cfg.stage_prefix_weight_start[stage], cfg.stage_prefix_weight_end[stage]
    return start + (end - start) * done


def is_adam_step(step: int, cfg: Config) -> bool:
    if step >= cfg.train_steps:
        return False  # the final validation step trains nothing
    return step % 2 == 1 if cfg.adam_odd_steps_only else True


def embed_split_step(cfg: Config) -> int:
    """The last step with the embedding tied to the head: the first odd step of embed_split_stage (odd so that
    Adam, odd steps only, updates the tied pair once more); after it the head's Adam state is copied into the
    embedding's and the two train apart. -1: never tied."""
    return cfg.stage_steps[cfg.embed_split_stage] | 1 if cfg.embed_split_stage else -1


def yarn_attn_scale(step: int, cfg: Config) -> float:
    """YaRN: at each change of the training long window, between stages, the scale is multiplied by
    1 + c * ln(new / old). The final validation's wider window keeps the scale, as in the 2026 script."""
    scale = cfg.attn_scale
    if not cfg.attn_scale_log_growth:
        return scale
    windows = [blocks * BLOCK_SIZE for blocks in cfg.stage_long_window_blocks[: stage_of(step, cfg) + 1]]
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
        prefix_weight=prefix_weight(step, cfg),
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


def stages_summary(cfg: Config) -> str:
    """The steps of each stage and the other step counts of the schedule: what a --train-steps scaled to."""
    ends = [*cfg.stage_steps[1:], cfg.train_steps]
    stages = ", ".join(f"{start}-{end - 1}" if end - 1 > start else str(start) for start, end in zip(cfg.stage_steps, ends))
    split = embed_split_step(cfg)
    split = f"the embedding unties after step {split}" if split >= 0 else "the embedding is never tied"
    extension = f"the last {cfg.extension_steps} step{'s' if cfg.extension_steps != 1 else ''}" if cfg.extension_steps else "none"
    return (f"stages: steps {stages} (--stage-steps {','.join(map(str, cfg.stage_steps))}); extension: {extension}; "
            f"{split}; Muon momentum warm-up {cfg.muon_momentum_warmup_steps} and cool-down "
            f"{cfg.muon_momentum_cooldown_steps} steps")


STAGE_TABLES = ["stage_batch_tokens", "stage_seq_len", "stage_max_doc_len", "stage_short_window_blocks",
                "stage_long_window_blocks", "stage_lr_mult", "stage_mtp_weights_start", "stage_mtp_weights_end",
                "stage_prefix_weight_start", "stage_prefix_weight_end"]


def check_schedule(cfg: Config, training: bool):
    """Refuse a schedule that cannot be followed, with a one-line reason; training also refuses settings that
    the configured model cannot follow (a growing attention scale needs --yarn)."""
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
    for stage, (start, end) in enumerate(zip(cfg.stage_mtp_weights_start, cfg.stage_mtp_weights_end)):
        if not start or len(start) != len(end):
            raise ConfigError(f"stage {stage}: --stage-mtp-weights-start {start} and -end {end} need the same number (>= 1) of weights")
    for stage, (batch, seq_len) in enumerate(zip(cfg.stage_batch_tokens, cfg.stage_seq_len)):
        if seq_len <= 0 or seq_len % BLOCK_SIZE or batch % seq_len:
            raise ConfigError(f"stage {stage}: --stage-seq-len {seq_len} must be a positive multiple of {BLOCK_SIZE} dividing --stage-batch-tokens {batch}")
    if min(cfg.stage_short_window_blocks + cfg.stage_long_window_blocks + cfg.stage_max_doc_len) <= 0:
        raise ConfigError("--stage-short-window-blocks, --stage-long-window-blocks and --stage-max-doc-len must be positive")
    if not 0 <= cfg.embed_split_stage < len(starts):
        raise ConfigError(f"--embed-split-stage {cfg.embed_split_stage}: stages are numbered 0..{len(starts) - 1}")
    if training and cfg.attn_scale_log_growth and not cfg.yarn:
        raise ConfigError("--attn-scale-log-growth grows the attention scale at each window change, which needs --yarn "
                          "(or --attn-scale-log-growth 0)")


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
    """Untimed steps that compile every shape: as the 2026 script, steps 0 and 1 and the two steps either side of
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
    if model.fp8_scales is not None:  # a stage may change the accumulation steps
        model.fp8_scales = fp8_head_scales(cfg, len(batch))
    for i, (inputs, targets) in enumerate(batch):
        if opt.hooks is not None:  # gradients are final only in the last backward pass
            opt.hooks.armed = i == len(batch) - 1
        loss = model(inputs, targets, schedule)
        (loss / len(batch)).backward()
        loss_sum += loss.detach()
    if opt.hooks is not None:
        opt.hooks.armed = False
    step_optimizers(opt, model, schedule)
    if getattr(model, "fp8_mlp", False):  # the e4m3 copies of the new weights (W2's scale a step behind after 16)
        model.quantize_mlp_fp8(bootstrap=step < FP8_BOOTSTRAP_STEPS)
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


FP32_PARAMS = {"mudd_gate_scale"}  # besides the lambdas: the script's _mudd_gate_scale stays fp32


def store_as_record(model: nn.Module, cfg: Config) -> nn.Module:
    """The script's storage (r2026.py 1908-1915): every parameter bf16 (round to nearest from the fp32 init) but the
    lambdas (its `scalars` and resid/post lambdas) and the MUDD gates' scale, which stay fp32 (the MUDD biases
    are bf16: sqrt(1.1)/0.1 is stored 10.5); the bigram sign table bf16 (exact).
    Adam keeps fp32 moments and rounds each step once into the weight; Muon keeps the 16 bits a bf16 weight lacks
    of its fp32 master (MatrixGroup.low_bits). --fp32-masters: everything stays fp32. In place: the Parameter
    objects (and their init tags) are kept."""
    if cfg.fp32_masters:
        return model
    for name, p in model.named_parameters():
        if "lambda" not in name and name not in FP32_PARAMS:
            p.data = p.data.to(torch.bfloat16)
    if getattr(model, "bigram_signs", None) is not None:
        model.bigram_signs = model.bigram_signs.to(torch.bfloat16)
    return model


def build_model(cfg: Config, device: torch.device, accumulation: int, logger) -> GPT:
    torch.manual_seed(cfg.seed)  # initialized on the CPU: identical weights on every rank and device
    model = store_as_record(GPT(cfg, max_seq_len(cfg)), cfg).to(device)
    if device.type == "cuda":
        model.compute_dtype, model.use_flex = torch.bfloat16, True
        if cfg.fp8_head and fp8_supported(device):
            fp8_linear_op()  # register the custom op before compiling code that calls it
            model.fp8_scales = fp8_head_scales(cfg, accumulation)
        elif cfg.fp8_head:
            logger.log("WARNING: --fp8-head needs a GPU of compute capability 8.9+ (Hopper); using the bf16 head")
    model.fp8_mlp = cfg.fp8_mlp and fp8_mlp_available(device)
    model.quantize_mlp_fp8(bootstrap=True)
    model.mtp_weight_table = mtp_weight_table(cfg, device)
    model.prefix_weight_table = torch.tensor([prefix_weight(step, cfg) for step in range(cfg.train_steps)],
                                             dtype=torch.float32).to(device)
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
                     "gpu_peak_tflops", "save_every", "checkpoint_dir", "resume", "triton_kernels", "compile_glue"}


def gather_shards(shard: Tensor, comm: Comm) -> Tensor:
    """Each rank's rows of an optimizer state tensor, concatenated in rank order (every rank calls this). Muon's
    int16 low bits travel as bf16 of the same bits (NCCL has no 16-bit integers; a gather only copies)."""
    bits = shard.dtype == torch.int16
    shard = shard.view(torch.bfloat16) if bits else shard
    full = shard.new_empty(comm.world_size * shard.size(0), *shard.shape[1:])
    wait(comm.all_gather(full, shard.contiguous()))
    return full.view(torch.int16) if bits else full


def optimizer_state(opt: Optimizers, comm: Comm) -> dict:
    """Muon momentum and Adam moments as whole tensors, whatever the world size: each rank owns a shard, so
    they are all-gathered (every rank calls this) and rank 0 writes one file any world size can resume."""
    muon = []
    for group in opt.muon.groups:
        n = len(group.views)  # the rest is padding to a multiple of the world size: always zero
        names = ("momentum", "second_moment") + (("low_bits",) if group.low_bits is not None else ())  # bf16 weights' masters
        muon.append({name: gather_shards(getattr(group, name), comm)[:n].cpu().clone() for name in names})
    adam = []
    for e in opt.adam.entries:
        adam.append({name: (gather_shards(e[name], comm) if e["sharded"] else e[name]).cpu().clone()
                     for name in ("exp_avg", "exp_avg_sq")})
    return dict(muon=muon, adam=adam, adam_step_count=opt.adam.step_count, adam_tied=opt.adam.tied is not None)


def load_optimizer_state(opt: Optimizers, state: dict, comm: Comm):
    """Each rank takes its own rows of the whole tensors that optimizer_state wrote."""
    if len(state["muon"]) != len(opt.muon.groups) or len(state["adam"]) != len(opt.adam.entries):
        raise DataError("the checkpoint's optimizer state does not match this model: was it written by another version of train_gpt.py?")
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


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# Between two steps a process holds more than the weights and the optimizer's moments: after an even step (Adam
# steps on odd ones only) each process keeps the gradient of its own sequences, which the next step's backward adds
# to and only then reduces over the processes. A checkpoint holds each process's, so a run stopped after any step
# goes on bit for bit; after an odd step there is none.
def carried_gradients(model: nn.Module) -> dict:
    """The gradients this process carries into the next step (those Adam will add the next step's to), by name."""
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def process_states(model: nn.Module, comm: Comm, device: torch.device) -> list:
    """Each process's carried gradients and RNG, in rank order (every rank calls this; the list is rank 0's to
    write). The gradients travel as (1, numel) rows, so 0-d scalars gather like the rest."""
    grads = {name: gather_shards(g.detach().reshape(1, -1), comm).cpu() for name, g in carried_gradients(model).items()}
    rngs = [rng_state(device)]
    if comm.world_size > 1:
        rngs = [None] * comm.world_size
        dist.all_gather_object(rngs, rng_state(device))
    return [dict(grads={name: rows[rank].clone() for name, rows in grads.items()}, rng=rngs[rank])
            for rank in range(comm.world_size)]


@torch.no_grad()
def restore_process_state(model: nn.Module, saved: list, comm: Comm, device: torch.device):
    """This process's carried gradients and RNG from a checkpoint's process_states. On another number of processes
    every process carries the mean of the saved ones: the next reduction's mean is then the same sum (a world size
    change is the same math in another rounding, never bit for bit)."""
    own = saved[comm.rank] if len(saved) == comm.world_size else None
    names = {name for process in saved for name in process["grads"]}
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.grad = None
        if name not in names:
            continue
        if own is not None:
            grad = own["grads"][name]
        else:
            grad = sum(process["grads"][name].float() for process in saved) / len(saved)
        p.grad = grad.to(device=p.device, dtype=p.dtype).view(p.shape).clone()
    set_rng_state((own or saved[0])["rng"], device)


def training_state(step: int, train_ms: float, val_losses: list, model: GPT, opt: Optimizers, loader: TrainLoader,
                   cfg: Config, comm: Comm, device: torch.device) -> dict | None:
    """Everything the step loop needs to go on exactly as if it never stopped; None on ranks other than 0."""
    optimizer = optimizer_state(opt, comm)
    processes = process_states(model, comm, device)
    if comm.rank != 0:
        return None
    return dict(format=2, step=step, train_ms=train_ms, val_losses=[list(v) for v in val_losses], config=config_json(cfg),
                world_size=comm.world_size, model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                optimizer=optimizer, loader=loader.state(), processes=processes)


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
        raise ConfigError(f"--resume {cfg.resume}: settings differ from the checkpoint's ({'; '.join(changes)}); "
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
    opt.adam.accepting = is_adam_step(state["step"], cfg)
    loader.load_state(state["loader"])
    # format 1 (before issue 28) held rank 0's RNG and no gradients: exact only after an odd step
    restore_process_state(model, state.get("processes") or [dict(grads={}, rng=state["rng"])], comm, device)
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
class RunInputs:
    """What a run reads before it writes anything (read_run_inputs)."""
    resume_state: dict | None
    val_files: list
    train_files: list
    val_tokens: np.ndarray


def read_run_inputs(cfg: Config) -> RunInputs:
    """Everything that can refuse a run before its first step, read before its log is opened, so that a refusal
    leaves one error line and no log: the checkpoint to resume and its settings, the data files, every training
    shard's header and length (and that they are the checkpoint's), the val tokens. A shard that turns out bad
    when it is loaded, later, stops the run in its log."""
    resume_state = read_resume_state(cfg)
    val_files = resolve_files(cfg.val_files, "--val-files")
    train_files = resolve_files(cfg.train_files, "--train-files")
    val_tokens = load_val_tokens(val_files, cfg.val_tokens, cfg.vocab_size, cfg.val_seq_len)
    shard_tokens = train_shard_tokens(train_files, max(cfg.stage_seq_len))
    if resume_state is not None:
        check_same_shards(resume_state["loader"], train_files, shard_tokens)
    return RunInputs(resume_state, val_files, train_files, val_tokens)


@dataclass
class RunProgress:
    """What main() reports if the run stops early: the last finished step and the newest checkpoint."""
    step: int = 0
    checkpoint: str = ""


def run_training(cfg: Config, logger, comm: Comm, device: torch.device, accumulation: int, launch_time: float,
                 progress: RunProgress | None = None, inputs: RunInputs | None = None) -> dict:
    """Compile and warm up (untimed), reset, then the timed run with validation off the clock."""
    progress = progress or RunProgress()
    inputs = inputs or read_run_inputs(cfg)
    resume_state, val_files, train_files, val_tokens = (inputs.resume_state, inputs.val_files, inputs.train_files,
                                                        inputs.val_tokens)
    inputs.resume_state = None  # freed below once restored
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
            model.load_state_dict(initial_state)  # the FP8 scales too: activation scales back to 1
        model.zero_grad(set_to_none=True)  # a last warm-up step that is even leaves its gradients for Adam
        model.quantize_mlp_fp8(bootstrap=True)
    synchronize(device)
    logger.log(f"compile_and_warmup: {time.perf_counter() - compile_start:.1f}s ({len(warmup)} steps, then reset)")
    del initial_state

    opt = build_optimizers(model, cfg, comm)
    loader = make_train_loader(cfg, train_files, comm.rank, comm.world_size, device)
    train_ms, val_losses, stopped = 0.0, [], None
    first_step = 0
    if resume_state is not None:
        first_step, train_ms, val_losses = restore_checkpoint(resume_state, model, opt, loader, cfg, comm, device)
        model.quantize_mlp_fp8(advance=False)  # the checkpointed run's e4m3 copies, from its weights and scales
        moved = json.loads(resume_state["config"])["train_files"]
        moved = f"; --train-files {moved!r} -> {cfg.train_files!r}, the same shards" if moved != cfg.train_files else ""
        logger.log(f"resumed: {cfg.resume} at step {first_step} (train_time {train_ms:.0f}ms){moved}")
        del resume_state
    passes_logged = loader.passes
    pending_loss, clock = None, time.perf_counter()
    model.prefix_table.copy_(prefix_token_table(cfg.vocab_size))  # on the clock, as the script builds it
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
    logger.log(f"world_size: {comm.world_size}")
    logger.log(f"grad_accum_steps: {accumulation}")
    logger.log(f"gpu: {gpu}")
    logger.log(f"config: {config_json(cfg)}")
    for line in recipe_report(cfg).splitlines():
        logger.log(f"recipe: {line}", console=False)
    for line in schedule_lines(cfg):  # main() printed them before the run's inputs were read
        logger.log(line, console=False)


def schedule_lines(cfg: Config) -> list:
    return [schedule_summary(cfg), stages_summary(cfg)]


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
        cfg, reports = parse_command(argv)
        check_schedule(cfg, training=not reports)
        if reports:
            check_settings(cfg)
            printers = {"recipe": recipe_report, "schedule": schedule_report}
            return print_report("\n".join(printers[name](cfg) for name in reports))
        comm, device = setup_distributed(cfg)
        accumulation = check_config(cfg, comm.world_size)
        cfg = agree_on_outputs(cfg, comm)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
            print(f"train_gpt.py: error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    logger = Logger(None)  # opened once the run's inputs are read: a run refused before its first step writes no log
    progress, signals = RunProgress(checkpoint=cfg.resume), []
    previous_handler = stop_on_sigterm(signals)
    status, problem = 0, ""
    try:
        if comm.rank == 0:
            print("\n".join(schedule_lines(cfg)), flush=True)
        inputs = read_run_inputs(cfg)
        if comm.rank == 0:
            logger = Logger(os.path.join(cfg.log_dir, f"{cfg.run_id}.txt"))
        log_header(logger, cfg, comm, device, accumulation)
        result = run_training(cfg, logger, comm, device, accumulation, launch_time, progress, inputs)
        log_summary(logger, result, cfg, device, comm)
        if cfg.save_model and comm.rank == 0:
            write_atomically(result["model"].state_dict(), cfg.save_model, f"--save-model {cfg.save_model}")
        if result["stopped"]:  # the same error line as every other stop
            problem, status = f"stopped: {result['stopped']}{resume_hint(progress)}", 1
    except (DataError, ConfigError) as e:
        logger.log(f"stopping: {'settings' if isinstance(e, ConfigError) else 'data'} error: {e}", console=False)
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
    if comm.rank == 0 and logger.path:
        print(f"log: {logger.path}", flush=True)
    if comm.rank == 0 and problem:  # the last line a user sees, also with 2>&1
        print(f"train_gpt.py: error: {problem}", file=sys.stderr, flush=True)
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
