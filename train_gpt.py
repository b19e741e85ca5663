"""train_gpt.py: train a GPT-2-small-class model to 3.28 FineWeb val loss, as fast as the hardware allows.

One self-contained file, read top to bottom: config, model, optimizer, data, training, logging.
Importing it starts nothing; `python train_gpt.py` (or torchrun) trains.

    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the record configuration, 8 GPUs
    torchrun --standalone --nproc_per_node=1 train_gpt.py        # same math on 1 GPU (8 accumulation steps)
    python train_gpt.py --preset tiny --device cpu               # a small model on data/sample/, on CPU
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train_gpt.py --train-seq-len 24576                       # 16 GPUs: one 24K-token sequence each

The global batch (tokens per optimizer step) is fixed by the config; the number of processes only
changes how it is split: accumulation steps = train_batch_tokens / (world_size * train_seq_len).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import glob
import io
import json
import math
import os
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
    val_seq_len: int = field(default=65_536, metadata={"help": "tokens per validation sequence (one per process per val step)"})
    val_every: int = field(default=125, metadata={"help": "validate every N steps (0: only at the start and the end)"})
    # batch and schedule
    train_batch_tokens: int = field(default=393_216, metadata={"help": "tokens per optimizer step, over all processes and accumulation steps"})
    train_seq_len: int = field(default=49_152, metadata={"help": "tokens per training sequence = per process per accumulation step"})
    train_steps: int = field(default=1695, metadata={"help": "optimizer steps; the LR and attention-window schedules scale with it"})
    cooldown_frac: float = field(default=0.45, metadata={"help": "fraction of steps over which the LR decays linearly"})
    final_lr_frac: float = field(default=0.1, metadata={"help": "LR multiplier at the last step"})
    # model
    vocab_size: int = field(default=50304, metadata={"help": "GPT-2's 50257 tokens padded to a multiple of 128"})
    num_layers: int = field(default=12, metadata={"help": "transformer blocks"})
    model_dim: int = field(default=768, metadata={"help": "residual stream width"})
    num_heads: int = field(default=6, metadata={"help": "attention heads (num_heads * head_dim = model_dim)"})
    head_dim: int = field(default=128, metadata={"help": "width of one attention head"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width / model_dim"})
    num_value_embeds: int = field(default=3, metadata={"help": "value-embedding tables, used by the first and the last N layers"})
    no_attn_layers: tuple = field(default=(7,), metadata={"help": "layers without attention (comma-separated, '' for none)"})
    long_window_layers: tuple = field(default=(0, 4, 7, 11), metadata={"help": "layers with the long window; the rest use half of it"})
    max_window_tokens: int = field(default=1792, metadata={"help": "final long attention window; it grows linearly from 128 over the run"})
    attn_scale: float = field(default=0.12, metadata={"help": "fixed softmax scale of attention (QK-normed)"})
    attn_gate_dim: int = field(default=12, metadata={"help": "residual channels read by the per-head output gate"})
    logit_cap: float = field(default=30.0, metadata={"help": "logits squashed to (0, cap) by cap*sigmoid(z/(cap/4))"})
    fp8_head: bool = field(default=True, metadata={"help": "FP8 lm_head matmul where supported (Hopper); bf16 elsewhere"})
    # optimizer
    muon_lr: float = field(default=0.05, metadata={"help": "Muon learning rate (hidden matrices)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon Nesterov momentum after warm-up"})
    muon_momentum_start: float = field(default=0.85, metadata={"help": "Muon momentum at step 0"})
    muon_momentum_warmup_steps: int = field(default=300, metadata={"help": "steps to move Muon momentum from start to final"})
    orthogonalizer: str = field(default="polar_express", metadata={"help": "Muon's orthogonalization: polar_express or ns5"})
    normuon_beta2: float = field(default=0.0, metadata={"help": "NorMuon: EMA of each output row's squared update, rows evened out (0: plain Muon; paper: 0.95)"})
    adam_lr: float = field(default=0.008, metadata={"help": "Adam base learning rate (lm_head)"})
    adam_beta1: float = field(default=0.8, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    adam_eps: float = field(default=1e-10, metadata={"help": "Adam epsilon"})
    embed_lr_mult: float = field(default=75.0, metadata={"help": "Adam LR multiplier of the token and value embeddings"})
    scalar_lr_mult: float = field(default=5.0, metadata={"help": "Adam LR multiplier of scalars and gates"})
    # run
    seed: int = field(default=0, metadata={"help": "seed of the weight initialization"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    compile: bool = field(default=True, metadata={"help": "torch.compile each block and the head once (regional compilation); compiling always warms up >= 1 untimed step"})
    warmup_steps: int = field(default=3, metadata={"help": "untimed steps that compile every shape, then everything is reset"})
    run_id: str = field(default="", metadata={"help": "log name under --log-dir (default: a random uuid)"})
    log_dir: str = field(default="logs", metadata={"help": "folder of the run logs"})
    save_model: str = field(default="", metadata={"help": "write the final weights to this path (rank 0)"})
    gpu_peak_tflops: float = field(default=800.0, metadata={"help": "dense bf16 peak per GPU, for the MFU figure (H100 measured: ~800)"})
    save_every: int = field(default=0, metadata={"help": "every N steps write a checkpoint to --checkpoint-dir/<run_id>.pt, off the clock (0: never)"})
    checkpoint_dir: str = field(default="checkpoints", metadata={"help": "folder of the --save-every checkpoints (one file per run, replaced atomically)"})
    resume: str = field(default="", metadata={"help": "continue from this checkpoint: weights, optimizer, data position and clock (same settings)"})
    align_to_bos: bool = field(default=True, metadata={"help": "start each training window at a document start (FineWeb); --no-align-to-bos: consecutive slices of the stream"})


# `--preset tiny`: a small model and batch that trains on a CPU in about a minute on data/sample/.
PRESETS = {
    "record": {},
    "tiny": dict(
        train_files="data/sample/sample_train_*.bin", val_files="data/sample/sample_val_*.bin",
        val_tokens=8192, val_seq_len=512, val_every=25, train_batch_tokens=1024, train_seq_len=512,
        train_steps=50, num_layers=4, model_dim=128, num_heads=2, head_dim=64, num_value_embeds=2,
        no_attn_layers=(), long_window_layers=(0, 3), max_window_tokens=512, muon_momentum_warmup_steps=10,
        compile=False, warmup_steps=0, fp8_head=False,
    ),
}

BLOCK_SIZE = 128  # FlexAttention block: sequence lengths and windows are counted in these
EOT_TOKEN = 50256  # <|endoftext|>, which starts every document


class ConfigError(Exception):
    """A setting that cannot work; the message is one line and says which rule it breaks."""


def parse_int_tuple(text: str) -> tuple:
    text = text.strip()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip()) if text else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="train_gpt.py", description="Train the speedrun GPT. No flags = the 8xH100 record configuration.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="record",
                        help="starting values: 'record' (8xH100 FineWeb) or 'tiny' (CPU in a minute); flags override (default: record)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, tuple):
            shown = ",".join(map(str, default)) or "''"
        else:
            shown = repr(default) if isinstance(default, str) else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=parse_int_tuple, default=argparse.SUPPRESS, metavar="I,J,...", help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=type(default).__name__.upper(), help=help_text)
    return parser


def parse_config(argv=None) -> Config:
    """Preset values first, then every flag given on the command line."""
    args = vars(build_arg_parser().parse_args(argv))
    preset = args.pop("preset")
    return dataclasses.replace(Config(), **{**PRESETS[preset], **args})


def check_config(cfg: Config, world_size: int) -> int:
    """Refuse impossible settings with a one-line reason; returns the gradient accumulation steps."""
    positive = ["val_tokens", "val_seq_len", "train_batch_tokens", "train_seq_len", "train_steps", "vocab_size",
                "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio", "max_window_tokens"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["train_seq_len", "val_seq_len"]:
        if getattr(cfg, name) % BLOCK_SIZE:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be a multiple of {BLOCK_SIZE} (attention block size)")
    per_step = world_size * cfg.train_seq_len
    if cfg.train_batch_tokens % per_step:
        raise ConfigError(
            f"world size {world_size} x --train-seq-len {cfg.train_seq_len} = {per_step} tokens does not divide "
            f"--train-batch-tokens {cfg.train_batch_tokens}: each step must be whole sequences on every process "
            f"(use a world size that divides {cfg.train_batch_tokens // cfg.train_seq_len}, or a shorter --train-seq-len)")
    val_batch = world_size * cfg.val_seq_len
    if cfg.val_tokens % val_batch:
        raise ConfigError(
            f"--val-tokens {cfg.val_tokens} is not divisible by the val batch: world size {world_size} x "
            f"--val-seq-len {cfg.val_seq_len} = {val_batch}")
    if cfg.num_heads * cfg.head_dim != cfg.model_dim:
        raise ConfigError(f"--num-heads {cfg.num_heads} x --head-dim {cfg.head_dim} must equal --model-dim {cfg.model_dim}")
    if cfg.head_dim % 4:
        raise ConfigError(f"--head-dim {cfg.head_dim} must be a multiple of 4 (rotary halves and quarters)")
    if not 0 <= 2 * cfg.num_value_embeds <= cfg.num_layers:
        raise ConfigError(f"--num-value-embeds {cfg.num_value_embeds}: the first and last N layers use them, so 2N <= --num-layers {cfg.num_layers}")
    for name in ["no_attn_layers", "long_window_layers"]:
        bad = [i for i in getattr(cfg, name) if not 0 <= i < cfg.num_layers]
        if bad:
            raise ConfigError(f"--{name.replace('_', '-')} {bad}: layers are numbered 0..{cfg.num_layers - 1}")
    if not 0 < cfg.attn_gate_dim <= cfg.model_dim:
        raise ConfigError(f"--attn-gate-dim {cfg.attn_gate_dim} must be in 1..{cfg.model_dim}")
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
    return cfg.train_batch_tokens // per_step


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_hyperparameter_ranges(cfg: Config):
    """Values outside these ranges train nothing useful (or diverge) without any error of their own."""
    for name in ["muon_lr", "adam_lr", "adam_eps", "embed_lr_mult", "scalar_lr_mult", "attn_scale", "logit_cap", "gpu_peak_tflops"]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag_name(name)} must be a positive number, got {value}")
    for name in ["adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start"]:
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
# Model: GPT with rotary QK-normed attention, ReLU^2 MLP, value embeddings, U-net skips and a softcapped head.


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Half-truncated RoPE: a quarter of the frequencies are zero, so half of each head is position-free."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        quarter = head_dim // 4
        freqs = (1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float32)
        freqs = torch.cat([freqs, freqs.new_zeros(quarter)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, H, D)
        seq_len = x.size(-3)
        cos, sin = self.cos[None, :seq_len, None, :], self.sin[None, :seq_len, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


def uniform_init_(weight: Tensor, fan_in: int) -> Tensor:
    """Uniform with std 0.5/sqrt(fan_in): the speedrun's init for matrices Muon will train."""
    bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """(B, T, H, D) in and out. A BlockMask runs FlexAttention; a dense bool mask runs SDPA (the CPU path)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        y = flex(q, k, v, block_mask=mask, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    # FlexAttention is only fast compiled; without torch.compile it materializes the full score matrix.
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config, max_seq_len: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.attn_scale
        hidden = cfg.num_heads * cfg.head_dim
        # Q, K, V stacked in one tensor, each a (hidden, dim) matrix that Muon orthogonalizes on its own.
        self.qkv_w = nn.Parameter(uniform_init_(torch.empty(3, hidden, cfg.model_dim), cfg.model_dim))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, hidden))  # zero-init: each block starts as identity
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5]))  # v <- a*v + b*value_embedding
        self.gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.attn_gate_dim))  # sigmoid gate per head, starts at 0.5
        self.rotary = Rotary(cfg.head_dim, max_seq_len)

    def forward(self, x: Tensor, value_embed: Tensor | None, mask) -> Tensor:
        B, T = x.shape[:2]
        q, k, v = F.linear(x, self.qkv_w.flatten(0, 1).type_as(x)).view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        v = self.value_mix[0] * v
        if value_embed is not None:
            v = v + self.value_mix[1] * value_embed.view_as(v)
        y = attend(q, k, v, mask, self.scale)
        gate = torch.sigmoid(F.linear(x[..., : self.gate_w.size(1)], self.gate_w.type_as(x)))  # (B, T, H)
        y = (y * gate.unsqueeze(-1)).reshape(B, T, -1)
        return F.linear(y, self.proj_w.type_as(y))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.model_dim
        self.fc_w = nn.Parameter(uniform_init_(torch.empty(hidden, cfg.model_dim), cfg.model_dim))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.fc_w.type_as(x))).square(), self.proj_w.type_as(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, has_attention: bool, max_seq_len: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, max_seq_len) if has_attention else None
        self.mlp = MLP(cfg)
        self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0]))  # x <- a*x + b*x0 (x0: the normed embedding)

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None, mask) -> Tensor:
        x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), value_embed, mask)
        return x + self.mlp(rms_norm(x))


def document_ids(input_ids: Tensor) -> Tensor:
    return (input_ids == EOT_TOKEN).cumsum(0)


def dense_attention_mask(input_ids: Tensor, window_blocks: int) -> Tensor:
    """(T, T) bool: causal, same document, key block within window_blocks of the query block."""
    docs = document_ids(input_ids)
    pos = torch.arange(input_ids.numel(), device=input_ids.device)
    causal = pos[:, None] >= pos[None, :]
    in_window = (pos[:, None] // BLOCK_SIZE - pos[None, :] // BLOCK_SIZE) < window_blocks
    return causal & in_window & (docs[:, None] == docs[None, :])


def flex_block_mask(input_ids: Tensor, window_blocks: int) -> BlockMask:
    """The same mask as dense_attention_mask, as a FlexAttention BlockMask built from block-level facts:
    blocks inside one document are computed without a mask, blocks that straddle documents with one."""
    docs = document_ids(input_ids)
    num_blocks = input_ids.numel() // BLOCK_SIZE
    first_doc, last_doc = docs[0::BLOCK_SIZE], docs[BLOCK_SIZE - 1 :: BLOCK_SIZE]
    q_block = torch.arange(num_blocks, device=input_ids.device)[:, None]
    kv_block = q_block.T
    visible = (q_block >= kv_block) & (q_block - kv_block < window_blocks) & (last_doc[None, :] >= first_doc[:, None])
    single_doc = first_doc == last_doc
    full = visible & (q_block > kv_block) & single_doc[:, None] & single_doc[None, :] & (first_doc[:, None] == first_doc[None, :])
    partial = visible & ~full

    # A device tensor, so new window sizes never recompile; filled on the device: no host-to-device sync.
    window = torch.full((), window_blocks, dtype=torch.int64, device=input_ids.device)

    def causal_same_document(b, h, q_idx, kv_idx):  # applied inside partial blocks only
        in_window = q_idx // BLOCK_SIZE - kv_idx // BLOCK_SIZE < window
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & in_window

    def ordered(blocks: Tensor):  # dense (nb, nb) bool -> (count per row, indices with the visible ones first)
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None].contiguous(), indices[None, None].contiguous()

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=causal_same_document)


def head_loss(x: Tensor, head_w: Tensor, targets: Tensor, logit_cap: float, fp8_grad_scale: float | None) -> Tensor:
    """Summed cross-entropy of softcapped logits. fp8_grad_scale set: the FP8 matmul (Hopper)."""
    if fp8_grad_scale is not None:
        logits = torch.ops.speedrun_gpt.fp8_linear(x, head_w, fp8_x_scale(x.size(-1)), FP8_W_SCALE, fp8_grad_scale)[0]
    else:
        logits = F.linear(x, head_w.type_as(x))
    # cap*sigmoid(z/(cap/4)) = cap/2*(1+tanh(z/(cap/2))): slope 1 at 0, bounded in (0, cap)
    logits = logit_cap * torch.sigmoid(logits.float() / (logit_cap / 4))
    return F.cross_entropy(logits, targets, reduction="sum")


class GPT(nn.Module):
    def __init__(self, cfg: Config, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.model_dim) for _ in range(cfg.num_value_embeds))
        self.blocks = nn.ModuleList(Block(cfg, i not in cfg.no_attn_layers, max_seq_len) for i in range(cfg.num_layers))
        self.skip_weights = nn.Parameter(torch.ones(cfg.num_layers // 2))  # U-net: layer L-1-i adds w_i * output of layer i
        self.lm_head_w = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.model_dim))  # untied, zero-init
        self.compute_dtype = torch.float32
        self.use_flex = False
        self.fp8_grad_scale = None  # set by the trainer on Hopper
        self.head_loss = head_loss
        self.block_calls = [block.__call__ for block in self.blocks]

    def compile_regions(self):
        """Compile one block's code (reused by every layer with the same structure) and the head, not the
        whole model: far less compile time for the same kernels."""
        self.block_calls = [torch.compile(block, dynamic=False) for block in self.blocks]
        self.head_loss = torch.compile(head_loss, dynamic=False)

    def value_embeds_per_layer(self, input_ids: Tensor) -> list:
        tables = [ve(input_ids).to(self.compute_dtype)[None] for ve in self.value_embeds]
        n_middle = self.cfg.num_layers - 2 * len(tables)
        return tables + [None] * n_middle + tables

    def attention_masks(self, input_ids: Tensor, window_blocks: int) -> list:
        build = flex_block_mask if self.use_flex else dense_attention_mask
        long_mask, short_mask = build(input_ids, window_blocks), build(input_ids, max(1, window_blocks // 2))
        return [long_mask if i in self.cfg.long_window_layers else short_mask for i in range(self.cfg.num_layers)]

    def forward(self, input_ids: Tensor, targets: Tensor, window_blocks: int) -> Tensor:
        """input_ids, targets: (T,) one packed sequence. Returns the summed cross-entropy over its tokens."""
        masks = self.attention_masks(input_ids, window_blocks)
        value_embeds = self.value_embeds_per_layer(input_ids)
        x = x0 = rms_norm(self.embed(input_ids).to(self.compute_dtype)[None])
        n_skip, skips = len(self.skip_weights), []
        for i, block_call in enumerate(self.block_calls):
            if i >= self.cfg.num_layers - n_skip:
                x = x + self.skip_weights[self.cfg.num_layers - 1 - i] * skips.pop()
            x = block_call(x, x0, value_embeds[i], masks[i])
            if i < n_skip:
                skips.append(x)
        return self.head_loss(rms_norm(x[0]), self.lm_head_w, targets, self.cfg.logit_cap, self.fp8_grad_scale)

    def param_groups(self) -> dict:
        """Route by name: Muon for hidden matrices; Adam for embeddings, the head, and scalars/gates."""
        groups = {"muon": [], "embed": [], "head": [], "scalar": []}
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and name.endswith(("qkv_w", "proj_w", "fc_w")):
                groups["muon"].append(p)
            elif name.startswith(("embed.", "value_embeds.")):
                groups["embed"].append(p)
            elif name == "lm_head_w":
                groups["head"].append(p)
            else:
                groups["scalar"].append(p)
        return groups

    def matmul_flops_per_token(self, window_tokens: int, seq_len: int) -> float:
        """Forward+backward matmul FLOPs per token: 6 per weight of a matmul, plus attention scores and
        values over the mean visible context (half the window, causal)."""
        cfg = self.cfg
        weights = sum(p.numel() for p in self.param_groups()["muon"]) + self.lm_head_w.numel()
        attn_layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attn_layers]
        context = sum(min(window_tokens if i in cfg.long_window_layers else window_tokens // 2, seq_len) / 2 for i in attn_layers)
        return 6 * weights + 12 * cfg.num_heads * cfg.head_dim * context


# FP8 head (Hopper): inputs, weights and gradients are scaled into FP8 range, multiplied with _scaled_mm.
FP8_W_SCALE = 2.0 ** -9  # weights stay well under 448 * 2^-9 ~ 0.88 in magnitude


def fp8_x_scale(dim: int) -> float:
    return dim ** 0.5 / 448  # rms-normed rows have norm sqrt(dim): no entry exceeds 448 after scaling


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


@functools.lru_cache(maxsize=None)
def fp8_linear_op():
    """Register (once, on first use) the custom op y = x @ w.T in FP8 with its FP8 backward."""
    namespace = "speedrun_gpt"
    if hasattr(torch.ops.speedrun_gpt, "fp8_linear"):  # registered by an earlier import of this file
        return torch.ops.speedrun_gpt.fp8_linear

    def scale_tensor(value: float, like: Tensor) -> Tensor:
        return torch.full((), value, dtype=torch.float32, device=like.device)  # a fill: no host sync

    @torch.library.custom_op(f"{namespace}::fp8_linear", mutates_args=())
    def fp8_linear(x: Tensor, w: Tensor, x_scale: float, w_scale: float, grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        x_f8 = x.div(x_scale).to(torch.float8_e4m3fn)
        w_f8 = w.div(w_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=scale_tensor(x_scale, x),
                               scale_b=scale_tensor(w_scale, x), use_fast_accum=True)
        return out, x_f8, w_f8

    @fp8_linear.register_fake
    def _(x, w, x_scale, w_scale, grad_scale):
        return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
                x.new_empty(x.shape, dtype=torch.float8_e4m3fn), w.new_empty(w.shape, dtype=torch.float8_e4m3fn))

    @torch.library.custom_op(f"{namespace}::fp8_linear_backward", mutates_args=())
    def fp8_linear_backward(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                            grad_scale: float) -> tuple[Tensor, Tensor]:
        grad_f8 = grad.div(grad_scale).to(torch.float8_e5m2)
        grad_x = torch._scaled_mm(grad_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                                  scale_a=scale_tensor(grad_scale, grad), scale_b=scale_tensor(w_scale, grad), use_fast_accum=False)
        grad_w = torch._scaled_mm(grad_f8.T.contiguous(), x_f8.T.contiguous().T, out_dtype=torch.float32,
                                  scale_a=scale_tensor(grad_scale, grad), scale_b=scale_tensor(x_scale, grad), use_fast_accum=False)
        return grad_x, grad_w

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
# Optimizer: Muon for hidden matrices, Adam for the rest, both sharded across processes without DDP.

NS5_COEFFS = [(3.4445, -4.7750, 2.0315)] * 5  # tuned for slope at 0: maps [1e-3, 1] into ~[0.47, 1.20]


def polar_express_coeffs(safety: float = 1.02) -> list:
    """Polar Express (Amsel et al. 2025; l=1e-3, 5 steps, cushion 0.02); each step but the last is divided by
    (s, s^3, s^5) so bf16 rounding cannot push a singular value past the next step's stable range."""
    raw = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
           (4.042929935166739, -2.808917465908714, 0.5000178451051316),
           (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
           (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
           (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
    return [(a / safety, b / safety ** 3, c / safety ** 5) for a, b, c in raw[:-1]] + [raw[-1]]


ORTHOGONALIZERS = {"polar_express": (polar_express_coeffs(), 1.02, 1e-6), "ns5": (NS5_COEFFS, 1.0, 1e-7)}


def orthogonalize(grads: Tensor, method: str = "polar_express") -> Tensor:
    """Approximate U V^T of each (..., rows, cols) matrix in bf16: X <- aX + (bA + cA^2)X with A = XX^T."""
    coeffs, norm_safety, eps = ORTHOGONALIZERS[method]
    x = grads.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the short side: A is (min, min)
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * norm_safety + eps)
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


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
    """Same-shape matrices from several parameters, padded to a multiple of the world size; each rank
    owns a contiguous share and keeps momentum only for it."""

    def __init__(self, params: list, shape: tuple, comm: Comm):
        self.params, self.shape = params, shape
        self.views = [m for p in params for m in p.data.view(-1, *shape)]
        per_rank = math.ceil(len(self.views) / comm.world_size)
        self.padded = per_rank * comm.world_size
        self.own = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        self.per_rank = per_rank
        rows, cols = shape  # (fan_out, fan_in): wide-output matrices get a larger step
        self.lr_scale = max(1.0, rows / cols) ** 0.5
        p0 = params[0]
        self.momentum = torch.zeros(per_rank, *shape, dtype=torch.float32, device=p0.device)
        self.row_mean_square = torch.zeros(per_rank, rows, 1, dtype=torch.float32, device=p0.device)  # NorMuon
        self.grad_shard = torch.empty_like(self.momentum)
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
        stacked = torch.stack(owned) if owned else self.momentum.new_zeros(0, *self.shape)
        return torch.cat([stacked, stacked.new_zeros(pad, *self.shape)]) if pad else stacked


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
    """Muon: Nesterov momentum, then the update is orthogonalized, scaled by sqrt(max(1, fan_out/fan_in)).
    Gradients are reduce-scattered so each rank averages only the matrices it owns, updates them, and
    all-gathers the new weights: the bytes of one all-reduce, and 1/world_size of the optimizer work."""

    def __init__(self, params: list, lr: float, orthogonalizer: str, comm: Comm, normuon_beta2: float = 0.0):
        by_shape = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape[-2:]), []).append(p)
        self.groups = [MatrixGroup(ps, shape, comm) for shape, ps in by_shape.items()]
        self.lr, self.orthogonalizer, self.comm, self.normuon_beta2 = lr, orthogonalizer, comm, normuon_beta2
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
            group.momentum.lerp_(group.grad_shard, 1 - momentum)
            nesterov = group.grad_shard.lerp(group.momentum, momentum)
            update = orthogonalize(nesterov, self.orthogonalizer)
            if self.normuon_beta2:
                update = self._even_out_rows(group, update.float())
            new_own = group.own_params().add_(update.to(group.gathered.dtype), alpha=-self.lr * lr_mult * group.lr_scale)
            gathers.append(self.comm.all_gather(group.gathered, new_own))
        for group, handle in zip(self.groups, gathers):
            wait(handle)
            torch._foreach_copy_(group.views, list(group.gathered[: len(group.views)].unbind(0)))
        self._reset_reduction()

    def _even_out_rows(self, group: MatrixGroup, update: Tensor) -> Tensor:
        """NorMuon (arXiv 2510.05491): divide each output row by the root of an EMA of its mean squared
        update, then restore the matrix's Frobenius norm, so no neuron's step size runs away."""
        norm = update.norm(dim=(-2, -1), keepdim=True)
        group.row_mean_square.lerp_(update.square().mean(-1, keepdim=True), 1 - self.normuon_beta2)
        update = update / group.row_mean_square.clamp_min(1e-10).sqrt()
        return update * (norm / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class DistributedAdam(GradientReduction):
    """Adam with bias correction. Large tensors whose first dimension divides by the world size are sharded
    along it (reduce-scatter, update own rows, all-gather); small ones are all-reduced and updated everywhere."""

    SHARD_MIN_NUMEL = 1 << 16

    def __init__(self, param_lrs: list, betas: tuple, eps: float, comm: Comm):
        self.betas, self.eps, self.comm, self.step_count = betas, eps, comm, 0
        self.entries = []
        for p, lr in param_lrs:
            sharded = comm.world_size > 1 and p.size(0) % comm.world_size == 0 and p.numel() >= self.SHARD_MIN_NUMEL
            rows = p.size(0) // comm.world_size if sharded else p.size(0)
            param_view = p.data[comm.rank * rows : (comm.rank + 1) * rows] if sharded else p.data
            self.entries.append(dict(
                param=p, lr=lr, sharded=sharded, param_view=param_view,
                grad=torch.empty_like(param_view) if sharded else None,
                exp_avg=torch.zeros_like(param_view), exp_avg_sq=torch.zeros_like(param_view)))
        self._init_reduction([[e["param"]] for e in self.entries])

    @torch.no_grad()
    def _start_reduction(self, unit: int):
        e = self.entries[unit]
        if e["sharded"]:
            return self.comm.reduce_scatter_mean(e["grad"], e["param"].grad)
        e["grad"] = e["param"].grad
        return self.comm.all_reduce_mean(e["grad"])

    @torch.no_grad()
    def step(self, lr_mult: float):
        """Small replicated tensors are updated together with foreach kernels (dozens of scalars and gates
        would otherwise cost a handful of kernel launches each); sharded ones one by one, each all-gather
        overlapping the next update."""
        self.step_count += 1
        for handle, e in zip(self.pending, self.entries):
            if not e["sharded"]:
                wait(handle)
        self._update([e for e in self.entries if not e["sharded"]], lr_mult)
        gathers = []
        for handle, e in zip(self.pending, self.entries):
            if e["sharded"]:
                wait(handle)
                self._update([e], lr_mult)
                gathers.append(self.comm.all_gather(e["param"].data, e["param_view"].clone()))
        for handle in gathers:
            wait(handle)
        self._reset_reduction()

    def _update(self, entries: list, lr_mult: float):
        if not entries:
            return
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        params, grads = [e["param_view"] for e in entries], [e["grad"] for e in entries]
        exp_avgs, exp_avg_sqs = [e["exp_avg"] for e in entries], [e["exp_avg_sq"] for e in entries]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(exp_avg_sqs, bias2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, self.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-e["lr"] * lr_mult / bias1 for e in entries])


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

    def close(self):
        if self.hooks is not None:
            self.hooks.remove()


def build_optimizers(model: GPT, cfg: Config, comm: Comm) -> Optimizers:
    groups = model.param_groups()
    adam_lrs = ([(p, cfg.adam_lr * cfg.embed_lr_mult) for p in groups["embed"]]
                + [(p, cfg.adam_lr) for p in groups["head"]]
                + [(p, cfg.adam_lr * cfg.scalar_lr_mult) for p in groups["scalar"]])
    adam = DistributedAdam(adam_lrs, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, comm)
    muon = DistributedMuon(groups["muon"], cfg.muon_lr, cfg.orthogonalizer, comm, cfg.normuon_beta2)
    hooks = OverlapHooks(model, [adam, muon]) if comm.world_size > 1 else None
    return Optimizers(adam, muon, hooks)


# -----------------------------------------------------------------------------
# Data: FineWeb .bin shards (256 x int32 header, uint16 tokens), BOS-aligned training windows.

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


def load_val_tokens(files: list, num_tokens: int, vocab_size: int | None = None) -> np.ndarray:
    """The first num_tokens + 1 tokens of the val files (inputs and their next-token targets)."""
    available = sum(shard_token_count(f) for f in files)
    if available < num_tokens + 1:
        raise DataError(f"val files ({', '.join(files)}) hold {available} tokens; --val-tokens {num_tokens} needs "
                        f"{num_tokens + 1}; lower --val-tokens or {FETCH_HINT}")
    parts, have = [], 0
    for f in files:
        parts.append(load_shard(f)[: num_tokens + 1 - have])
        if vocab_size is not None:  # only the tokens used: a val shard may be longer than --val-tokens
            check_token_ids(parts[-1], vocab_size, f)
        have += parts[-1].size
        if have > num_tokens:
            break
    return np.concatenate(parts)


class TrainLoader:
    """Training windows of seq_len + 1 tokens that follow each other in the stream: with align_to_bos each starts
    at <|endoftext|>, the first document boundary after the previous one's end; without, right where the
    previous one ended (a corpus of long documents is then used whole, not just each document's start). Window k
    of a step goes to rank k % world_size, accumulation step k // world_size, so every world size sees
    the same windows per step. Shards load on a background thread; the data cycles when it runs out.
    It counts what it reads (tokens passed over) and what windows use, for the log's data-use lines."""

    def __init__(self, files: list, seq_len: int, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None, align_to_bos: bool = True):
        self.shard_tokens = [shard_token_count(f) for f in files]
        for f, num_tokens in zip(files, self.shard_tokens):
            if num_tokens < seq_len + 1:
                raise DataError(f"{f}: {num_tokens} tokens, fewer than one training window of {seq_len + 1}")
        self.files, self.seq_len, self.rank, self.world_size, self.device = files, seq_len, rank, world_size, device
        self.vocab_size, self.align_to_bos = vocab_size, align_to_bos
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.shard_index, self.passes = -1, 0
        self.windows, self.tokens_before_shard = 0, 0  # windows taken; tokens of the shards already left behind
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
        self.pos = 0
        self.next_shard = self.pool.submit(self._read, (self.shard_index + 1) % len(self.files))

    def _next_window_start(self) -> int:
        if not self.align_to_bos:
            return self._next_slice_start()
        for _ in range(len(self.files) + 1):
            i = np.searchsorted(self.doc_starts, self.pos)
            if i < len(self.doc_starts) and self.doc_starts[i] + self.seq_len + 1 <= len(self.tokens):
                start = int(self.doc_starts[i])
                self.pos = start + self.seq_len
                return start
            self._advance_shard()
        raise DataError(f"no document boundary (token {EOT_TOKEN}) leaves room for a {self.seq_len + 1}-token window in "
                        f"{self.files}; pass --no-align-to-bos to cut windows anywhere in the stream")

    def _next_slice_start(self) -> int:
        """The window right after the previous one (sharing its last token, as a target becomes an input);
        a shard's tail too short for a window is passed over. Every shard holds at least one window."""
        if self.pos + self.seq_len + 1 > len(self.tokens):
            self._advance_shard()
        start = self.pos
        self.pos = start + self.seq_len
        return start

    def next_batch(self, accumulation_steps: int) -> list:
        """This rank's (inputs, targets) for each accumulation step of one optimizer step."""
        batch = []
        for _ in range(accumulation_steps):
            for r in range(self.world_size):
                start = self._next_window_start()
                self.windows += 1
                if r == self.rank:
                    batch.append(self._to_device(self.tokens[start : start + self.seq_len + 1]))
        return batch

    def _to_device(self, window: np.ndarray):
        buf = torch.from_numpy(window.astype(np.int32))
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[:-1], buf[1:].long()

    def tokens_read(self) -> int:
        return self.tokens_before_shard + self.pos

    def passes_done(self) -> float:
        """Passes over the training data as a fraction: tokens read (windows and what was skipped between them)."""
        return self.tokens_read() / sum(self.shard_tokens)

    def used_fraction(self) -> float:
        """Of the tokens read, the share that windows trained on; the rest lay between a window's end and the
        next document start."""
        return self.windows * self.seq_len / max(self.tokens_read(), 1)

    def usage_line(self) -> str:
        line = (f"data: {self.passes_done():.3f} passes over the training data ({sum(self.shard_tokens)} tokens); "
                f"windows used {100 * self.used_fraction():.1f}% of the tokens read")
        if self.align_to_bos and self.used_fraction() < 0.5:  # long documents: most of each one is skipped
            line += " (windows start at document starts; --no-align-to-bos packs them back to back)"
        return line

    def state(self) -> dict:
        """Where the stream stands, for a checkpoint: the same on every rank."""
        return dict(files=[os.path.basename(f) for f in self.files], shard_tokens=list(self.shard_tokens),
                    shard_index=self.shard_index, pos=self.pos, passes=self.passes, windows=self.windows,
                    tokens_before_shard=self.tokens_before_shard, align_to_bos=self.align_to_bos)

    def load_state(self, state: dict):
        """Continue the stream where a checkpoint left it: the same shards, in the same order, are required."""
        if (state["files"], state["shard_tokens"]) != ([os.path.basename(f) for f in self.files], self.shard_tokens):
            raise DataError(f"the checkpoint was trained on {len(state['files'])} shards ({', '.join(state['files'][:3])}, ...) "
                            f"that differ from --train-files ({len(self.files)} shards); pass the checkpoint's --train-files")
        self.next_shard.result()
        self.shard_index = state["shard_index"] - 1
        self.next_shard = self.pool.submit(self._read, state["shard_index"])
        self._advance_shard()
        self.pos, self.passes, self.windows = state["pos"], state["passes"], state["windows"]
        self.tokens_before_shard = state["tokens_before_shard"]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


# -----------------------------------------------------------------------------
# Training: schedules, one optimizer step, validation, untimed warm-up and reset, the timed loop.


def lr_multiplier(step: int, cfg: Config) -> float:
    """Flat, then linear to final_lr_frac over the last cooldown_frac of the steps."""
    progress = step / cfg.train_steps
    if cfg.cooldown_frac == 0 or progress < 1 - cfg.cooldown_frac:
        return 1.0
    remaining = (1 - progress) / cfg.cooldown_frac
    return remaining + (1 - remaining) * cfg.final_lr_frac


def muon_momentum(step: int, cfg: Config) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1) if cfg.muon_momentum_warmup_steps else 1
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def window_blocks(step: int, cfg: Config) -> int:
    """Long attention window in 128-token blocks: grows linearly to max_window_tokens over the run."""
    tokens = cfg.max_window_tokens * step / cfg.train_steps
    return max(1, math.ceil(tokens / BLOCK_SIZE))


def is_val_step(step: int, cfg: Config) -> bool:
    if step == cfg.train_steps or step == 0:
        return True
    return cfg.val_every > 0 and step % cfg.val_every == 0


def train_step(model: GPT, batch: list, opt: Optimizers, step: int, cfg: Config) -> Tensor:
    """One optimizer step over this rank's accumulation steps. The gradient is the per-sequence token sum
    averaged over all sequences of the step, so any world size gives the same update.
    Returns the summed train loss of this rank (on device, no sync)."""
    window = window_blocks(step, cfg)
    loss_sum = torch.zeros((), device=batch[0][0].device)
    for i, (inputs, targets) in enumerate(batch):
        if opt.hooks is not None:  # gradients are final only in the last backward pass
            opt.hooks.armed = i == len(batch) - 1
        loss = model(inputs, targets, window)
        (loss / len(batch)).backward()
        loss_sum += loss.detach()
    if opt.hooks is not None:
        opt.hooks.armed = False
    opt.adam.reduce_gradients()
    opt.muon.reduce_gradients()
    lr_mult = lr_multiplier(step, cfg)
    opt.adam.step(lr_mult)
    opt.muon.step(lr_mult, muon_momentum(step, cfg))
    model.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def evaluate(model: GPT, val_tokens: np.ndarray, cfg: Config, step: int, comm: Comm, device: torch.device,
             max_sequences: int | None = None) -> float:
    """Mean cross-entropy over the first val_tokens tokens: rank r takes sequences r, r + W, ..."""
    num_sequences = cfg.val_tokens // cfg.val_seq_len
    mine = range(comm.rank, num_sequences, comm.world_size)[:max_sequences]
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i in mine:
        window = torch.from_numpy(val_tokens[i * cfg.val_seq_len : (i + 1) * cfg.val_seq_len + 1].astype(np.int32)).to(device)
        total += model(window[:-1], window[1:].long(), window_blocks(step, cfg)).double()
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
    model = GPT(cfg, max(cfg.train_seq_len, cfg.val_seq_len)).to(device)
    if device.type == "cuda":
        model.compute_dtype, model.use_flex = torch.bfloat16, True
        if cfg.fp8_head and fp8_supported(device):
            fp8_linear_op()  # register the custom op before compiling code that calls it
            model.fp8_grad_scale = 1 / 448 / accumulation  # the loss is divided by the accumulation steps
        elif cfg.fp8_head:
            logger.log("WARNING: --fp8-head needs a GPU of compute capability 8.9+ (Hopper); using the bf16 head")
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


# Settings that do not change the math of a step: a resumed run may change these, and nothing else.
RESUME_MAY_CHANGE = {"train_files", "val_files", "val_every", "seed", "device", "compile", "warmup_steps", "run_id",
                     "log_dir", "save_model", "gpu_peak_tflops", "save_every", "checkpoint_dir", "resume"}


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
        muon.append({name: gather_shards(getattr(group, name), comm)[:n].cpu().clone()
                     for name in ("momentum", "row_mean_square")})
    adam = []
    for e in opt.adam.entries:
        adam.append({name: (gather_shards(e[name], comm) if e["sharded"] else e[name]).cpu().clone()
                     for name in ("exp_avg", "exp_avg_sq")})
    return dict(muon=muon, adam=adam, adam_step_count=opt.adam.step_count)


def load_optimizer_state(opt: Optimizers, state: dict, comm: Comm):
    """Each rank takes its own rows of the whole tensors that optimizer_state wrote."""
    if len(state["muon"]) != len(opt.muon.groups) or len(state["adam"]) != len(opt.adam.entries):
        raise DataError("the checkpoint's optimizer state does not match this model: was it written by another version of train_gpt.py?")
    for group, saved in zip(opt.muon.groups, state["muon"]):
        for name, whole in saved.items():
            own = getattr(group, name)
            padded = torch.cat([whole, whole.new_zeros(group.padded - whole.size(0), *whole.shape[1:])])
            own.copy_(padded[group.own])
    for e, saved in zip(opt.adam.entries, state["adam"]):
        for name, whole in saved.items():
            rows = e[name].size(0)
            e[name].copy_(whole[comm.rank * rows : (comm.rank + 1) * rows] if e["sharded"] else whole)
    opt.adam.step_count = state["adam_step_count"]


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def training_state(step: int, train_ms: float, val_losses: list, model: GPT, opt: Optimizers, loader: TrainLoader,
                   cfg: Config, comm: Comm, device: torch.device) -> dict | None:
    """Everything the step loop needs to go on exactly as if it never stopped; None on ranks other than 0."""
    optimizer = optimizer_state(opt, comm)
    if comm.rank != 0:
        return None
    return dict(format=1, step=step, train_ms=train_ms, val_losses=[list(v) for v in val_losses], config=config_json(cfg),
                world_size=comm.world_size, model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                optimizer=optimizer, loader=loader.state(), rng=rng_state(device))


def save_checkpoint(step: int, train_ms: float, val_losses: list, model: GPT, opt: Optimizers, loader: TrainLoader,
                    cfg: Config, comm: Comm, device: torch.device, logger) -> str:
    state = training_state(step, train_ms, val_losses, model, opt, loader, cfg, comm, device)
    path = checkpoint_path(cfg)
    if state is not None:
        write_atomically(state, path, f"checkpoint {path}")
        logger.log(f"checkpoint: {path} at step {step}")
    return path


def read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the unpickler
        raise DataError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"pass a file written by --save-every") from None


def config_changes(saved_json: str, cfg: Config) -> list:
    saved, now = json.loads(saved_json), json.loads(config_json(cfg))
    return [f"{flag_name(k)} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]


def restore_checkpoint(path: str, model: GPT, opt: Optimizers, loader: TrainLoader, cfg: Config, comm: Comm,
                       device: torch.device) -> tuple:
    """Load what training_state wrote (every rank reads the file); returns (step, train_ms, val_losses)."""
    state = read_checkpoint(path)
    changes = config_changes(state["config"], cfg)
    if changes:
        raise DataError(f"--resume {path}: settings differ from the checkpoint's ({'; '.join(changes)}); "
                        f"resume with the same settings")
    with torch.no_grad():
        model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
    load_optimizer_state(opt, state["optimizer"], comm)
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
    progress = progress or RunProgress()
    val_files = resolve_files(cfg.val_files, "--val-files")
    train_files = resolve_files(cfg.train_files, "--train-files")
    val_tokens = load_val_tokens(val_files, cfg.val_tokens, cfg.vocab_size)
    logger.log(f"train_files: {len(train_files)} ({sum(shard_token_count(f) for f in train_files)} tokens)  "
               f"val_files: {len(val_files)}  val_tokens: {cfg.val_tokens}")
    model = build_model(cfg, device, accumulation, logger)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Untimed warm-up: compile every shape (train step, validation), then restore the initial state.
    compile_start = time.perf_counter()
    warmup_steps = untimed_warmup_steps(cfg)
    if warmup_steps:
        opt = build_optimizers(model, cfg, comm)
        loader = TrainLoader(train_files, cfg.train_seq_len, comm.rank, comm.world_size, device, cfg.vocab_size, cfg.align_to_bos)
        for step in range(warmup_steps):
            train_step(model, loader.next_batch(accumulation), opt, step, cfg)
        evaluate(model, val_tokens, cfg, 0, comm, device, max_sequences=1)
        loader.close()
        opt.close()
        with torch.no_grad():
            model.load_state_dict(initial_state)
    synchronize(device)
    logger.log(f"compile_and_warmup: {time.perf_counter() - compile_start:.1f}s ({warmup_steps} steps, then reset)")
    del initial_state

    opt = build_optimizers(model, cfg, comm)
    loader = TrainLoader(train_files, cfg.train_seq_len, comm.rank, comm.world_size, device, cfg.vocab_size, cfg.align_to_bos)
    train_ms, val_losses, stopped = 0.0, [], None
    first_step = 0
    if cfg.resume:
        first_step, train_ms, val_losses = restore_checkpoint(cfg.resume, model, opt, loader, cfg, comm, device)
        logger.log(f"resumed: {cfg.resume} at step {first_step} (train_time {train_ms:.0f}ms)")
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
                stopped = f"stopping: non-finite val loss {val_loss} at step {step}"
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
        batch = loader.next_batch(accumulation)
        if loader.passes != passes_logged:  # a host-side counter: costs the timed loop nothing
            passes_logged = loader.passes
            logger.log(f"data: pass {passes_logged} over the training data done at step {step + 1}")
        loss = train_step(model, batch, opt, step, cfg)
        if pending_loss is not None and not pending_loss.is_finite():
            stopped = f"stopping: non-finite train loss at step {step}"
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
        logger.log(stopped)
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


def log_summary(logger: Logger, result: dict, cfg: Config, device: torch.device, comm: Comm):
    train_s = result["train_ms"] / 1000
    steps = result["val_losses"][-1][0] if result["val_losses"] else 0
    tokens = steps * cfg.train_batch_tokens
    if result["launch_to_first_step"] is not None:
        logger.log(f"launch_to_first_step: {result['launch_to_first_step']:.1f}s")
    if train_s > 0:
        logger.log(f"tokens_per_second: {tokens / train_s:.0f}")
        if device.type == "cuda":
            model = result["model"]
            flops = sum(cfg.train_batch_tokens * model.matmul_flops_per_token(window_blocks(s, cfg) * BLOCK_SIZE, cfg.train_seq_len)
                        for s in range(steps))
            achieved = flops / train_s / comm.world_size / 1e12
            logger.log(f"mfu: {100 * achieved / cfg.gpu_peak_tflops:.1f}% ({achieved:.0f} TFLOP/s per GPU of {cfg.gpu_peak_tflops:.0f} peak)")
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) // 2 ** 20
        reserved = torch.cuda.max_memory_reserved(device) // 2 ** 20
    else:  # the process's peak resident memory stands in for both on a CPU
        import resource
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    logger.log(f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB")


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
    cfg = parse_config(argv)
    try:
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
        status = 1 if result["stopped"] else 0
    except (DataError, ConfigError) as e:
        logger.log(f"stopping: data error: {e}", console=False)
        problem, status = str(e), 2
    except OutputError as e:
        logger.log(f"stopping: at step {progress.step}: {e}", console=False)
        problem, status = f"stopped at step {progress.step}: {e}{resume_hint(progress)}", 1
    except (KeyboardInterrupt, StopSignal) as e:
        status, problem = stopped_by_signal(e, logger, progress)
    except Exception as e:
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


def stopped_by_signal(e: BaseException, logger: Logger, progress: RunProgress) -> tuple:
    """Ctrl-C (exit 130) or SIGTERM (exit 143, as if the signal had killed the process): (status, message)."""
    what = "SIGTERM" if isinstance(e, StopSignal) else "interrupted (Ctrl-C)"
    line = f"{what} at step {progress.step}"
    try:
        logger.log(f"stopping: {line}")
    except DiskFullError:
        pass
    return (143 if isinstance(e, StopSignal) else 130), f"stopped by {line}{resume_hint(progress)}"


if __name__ == "__main__":
    sys.exit(main())
