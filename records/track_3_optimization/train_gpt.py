"""records/track_3_optimization/train_gpt.py: the optimizer benchmark. A fixed GPT-2-small model, data and batch;
the score is the number of optimizer steps to a FineWeb val loss of 3.28.

One self-contained file, read top to bottom: config, model, the optimizer section (the one part a contestant
edits: init, optimizers, which parameters each gets, the LR schedule), data, training, logging. Importing it starts
nothing; running it trains. The baseline is the public benchmark's tuned Muon + AdamW (its result #36, 3250 steps).

    torchrun --standalone --nproc_per_node=8 records/track_3_optimization/train_gpt.py --trials 10
    torchrun --standalone --nproc_per_node=1 records/track_3_optimization/train_gpt.py   # same math, 8 micro-batches
    python records/track_3_optimization/train_gpt.py --preset tiny --device cpu          # a small model on data/sample/

Every step is 8 x 64 sequences of 1,024 tokens (524,288 tokens) on any of 1, 2, 4 or 8 processes: each process
takes its share of the sequences in micro-batches of 64, and the gradients are summed over all of them.
--trials N trains N runs (seeds seed, seed+1, ...) in one launch, compiling once; each run writes its own log.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
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
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TRACK = "track_3_optimization"

# -----------------------------------------------------------------------------
# Config: one dataclass whose defaults are the benchmark and its baseline recipe; flags override any field.


@dataclass
class Config:
    # the benchmark (fixed: a run that changes these is not a result of this track)
    train_files: str = field(default="data/fineweb10B/fineweb_train_*.bin", metadata={"help": "glob of training shards, read in sorted order"})
    val_files: str = field(default="data/fineweb10B/fineweb_val_*.bin", metadata={"help": "glob of validation shards"})
    val_tokens: int = field(default=20 * 524_288, metadata={"help": "validate on the first N tokens of the val files"})
    val_seq_len: int = field(default=1024, metadata={"help": "tokens per validation sequence"})
    train_seq_len: int = field(default=1024, metadata={"help": "tokens per training sequence"})
    batch_seqs: int = field(default=8 * 64, metadata={"help": "sequences per optimizer step, over all processes"})
    micro_batch_seqs: int = field(default=64, metadata={"help": "sequences per forward-backward pass of one process"})
    vocab_size: int = field(default=50304, metadata={"help": "GPT-2's 50257 tokens padded to a multiple of 128"})
    num_layers: int = field(default=12, metadata={"help": "transformer blocks"})
    model_dim: int = field(default=768, metadata={"help": "residual stream width"})
    head_dim: int = field(default=128, metadata={"help": "width of one attention head (heads = model_dim / head_dim)"})
    # the recipe (free: optimizer hyperparameters and schedule; the baseline's values)
    train_steps: int = field(default=3250, metadata={"help": "optimizer steps: the number this track minimizes"})
    cooldown_frac: float = field(default=0.7, metadata={"help": "last fraction of the steps over which every LR decays linearly to 0"})
    muon_lr: float = field(default=0.025, metadata={"help": "Muon learning rate (hidden matrices of the blocks)"})
    muon_weight_decay: float = field(default=0.05, metadata={"help": "Muon decoupled weight decay (times the LR)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon Nesterov momentum"})
    ns_steps: int = field(default=12, metadata={"help": "Newton-Schulz iterations of Muon's orthogonalization"})
    embed_lr: float = field(default=0.7, metadata={"help": "AdamW learning rate of the token embedding"})
    head_lr: float = field(default=0.004, metadata={"help": "AdamW learning rate of the output head's weight"})
    scalar_lr: float = field(default=0.015, metadata={"help": "AdamW learning rate of the biases and norm gains"})
    adam_beta1: float = field(default=0.8, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-10, metadata={"help": "AdamW epsilon"})
    adam_weight_decay: float = field(default=0.001, metadata={"help": "AdamW decoupled weight decay (times the LR)"})
    # validation (off the clock)
    val_every: int = field(default=125, metadata={"help": "validate every N steps, and at step 0 and the end"})
    late_val_every: int = field(default=25, metadata={"help": "validate every N steps in the last --late-val-frac of the run (to pick a common earlier step)"})
    late_val_frac: float = field(default=0.1, metadata={"help": "the last fraction of the run validated every --late-val-every steps"})
    # the launch
    seed: int = field(default=0, metadata={"help": "seed of the first run's weight initialization"})
    trials: int = field(default=1, metadata={"help": "runs in this launch, with seeds seed, seed+1, ...; one log each, compiled once"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    dtype: str = field(default="bfloat16", metadata={"help": "storage of the embedding and so of every activation (bfloat16 as the baseline, or float32)"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the model once, warmed up off the clock"})
    run_id: str = field(default="", metadata={"help": "log name logs/RUN_ID.txt, with -seedN per run when --trials > 1 (default: a random uuid)"})
    log_dir: str = field(default="logs", metadata={"help": "folder of the logs"})
    save_model: bool = field(default=False, metadata={"help": "also write each run's final weights to LOG_DIR/RUN_ID.pt"})


PRESETS = {
    "baseline": {},
    # The same structure at a CPU size, on the committed sample: fp32, no compile, 2 micro-batches of 2 sequences
    # per process on 2 processes (4 on 1).
    "tiny": dict(train_files="data/sample/sample_train_*.bin", val_files="data/sample/sample_val_*.bin",
                 val_tokens=1024, val_seq_len=64, train_seq_len=64, batch_seqs=8, micro_batch_seqs=2,
                 num_layers=2, model_dim=64, head_dim=32, train_steps=20, val_every=5, late_val_every=2,
                 device="cpu", dtype="float32", compile=False),
}

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
LOGIT_CAP = 15.0  # logits 15 z / sqrt(z^2 + 15^2): fixed by the benchmark
ATTN_SCALE = 0.12  # softmax scale of the QK-normed attention: fixed by the benchmark


class ConfigError(Exception):
    """A setting that cannot work; the message is one line and says what to change."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="train_gpt.py", description="Train the optimizer benchmark's fixed GPT-2-small "
                                   "(no flags: the baseline recipe, 3250 steps, on every GPU torchrun starts).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="baseline",
                        help="starting values: 'baseline' (the benchmark on GPUs) or 'tiny' (CPU size, data/sample/); flags override")
    for f in fields(Config):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS,
                                metavar=type(f.default).__name__.upper(), help=help_text)
    return parser


def parse_config(argv=None) -> Config:
    args = vars(build_arg_parser().parse_args(argv))
    return dataclasses.replace(Config(), **{**PRESETS[args.pop("preset")], **args})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def fits_world_size(cfg: Config, world_size: int) -> bool:
    """Whether every process gets the same whole number of micro-batches of training and of validation sequences."""
    per_round = world_size * cfg.micro_batch_seqs
    return cfg.batch_seqs % per_round == 0 and (cfg.val_tokens // cfg.val_seq_len) % per_round == 0


def usable_world_sizes(cfg: Config) -> list:
    return [n for n in range(1, cfg.batch_seqs // cfg.micro_batch_seqs + 1) if fits_world_size(cfg, n)]


def one_of(items: list) -> str:
    """[1, 2, 4, 8] -> '1, 2, 4 or 8'."""
    return " or ".join([", ".join(map(str, items[:-1])), str(items[-1])]) if len(items) > 1 else str(items[0])


def check_world_size(cfg: Config, world_size: int) -> int:
    """Micro-batches per process per step; refuses a world size that cannot split the batch evenly."""
    if not fits_world_size(cfg, world_size):
        usable = usable_world_sizes(cfg)
        advice = (f"run on {one_of(usable)} processes" if usable else
                  "make --batch-seqs and the val sequences (--val-tokens / --val-seq-len) multiples of --micro-batch-seqs")
        raise ConfigError(f"world size {world_size} x --micro-batch-seqs {cfg.micro_batch_seqs} = "
                          f"{world_size * cfg.micro_batch_seqs} sequences must divide both --batch-seqs {cfg.batch_seqs} "
                          f"and the {cfg.val_tokens // cfg.val_seq_len} val sequences: {advice}")
    return cfg.batch_seqs // (world_size * cfg.micro_batch_seqs)


POSITIVE_INTEGERS = ["val_tokens", "val_seq_len", "train_seq_len", "batch_seqs", "micro_batch_seqs", "vocab_size",
                     "num_layers", "model_dim", "head_dim", "train_steps", "ns_steps", "trials", "val_every", "late_val_every"]


def check_hyperparameter_ranges(cfg: Config):
    """Every numeric flag in its range: outside it a run trains nothing useful, diverges or fails late, with no error
    of its own (a negative LR trains uphill, a beta of 1 never forgets, a zero batch divides by zero)."""
    for name in POSITIVE_INTEGERS:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_name(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}")
    for name in ["muon_lr", "embed_lr", "head_lr", "scalar_lr", "adam_eps"]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag_name(name)} must be a positive number, got {value}")
    for name in ["muon_weight_decay", "adam_weight_decay"]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag_name(name)} must be a number >= 0, got {value}")
    for name in ["muon_momentum", "adam_beta1", "adam_beta2"]:
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{flag_name(name)} {value} must be in [0, 1)")
    for name in ["cooldown_frac", "late_val_frac"]:
        value = getattr(cfg, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag_name(name)} {value} must be in [0, 1]")


def check_config(cfg: Config, world_size: int) -> int:
    """Refuse impossible settings with a one-line reason; returns the accumulation steps. Needs only the world size
    (from the environment), so every process refuses a bad launch before any process group is formed."""
    check_hyperparameter_ranges(cfg)
    if cfg.model_dim % cfg.head_dim or cfg.head_dim % 4:
        raise ConfigError(f"--head-dim {cfg.head_dim} must divide --model-dim {cfg.model_dim} and be a multiple of 4 (rotary quarters)")
    if cfg.val_tokens % cfg.val_seq_len:
        raise ConfigError(f"--val-tokens {cfg.val_tokens} must be whole --val-seq-len {cfg.val_seq_len} sequences")
    if cfg.device not in ("cuda", "cpu"):
        raise ConfigError(f"--device {cfg.device!r}: choose cuda or cpu")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if any(c in cfg.run_id for c in "/\\\0") or cfg.run_id.startswith("."):
        raise ConfigError(f"--run-id {cfg.run_id!r} must be a plain file name; choose the folder with --log-dir")
    return check_world_size(cfg, world_size)


# -----------------------------------------------------------------------------
# Model (fixed): pre-norm blocks of QK-normed rotary attention and a ReLU^2 MLP, linear layers with biases,
# RMSNorm with gains, an untied head, soft-capped logits. Activations take the embedding's dtype.


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gains = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), weight=self.gains.type_as(x))


class Linear(nn.Linear):
    """A linear layer with a bias whose fp32 weights are cast to the activations' dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x), self.bias.type_as(x))


class Rotary(nn.Module):
    """Rotary position embedding on half of each head's dims (a quarter of the frequencies, from 1 down to 1/1024);
    the other half carries no position."""

    def __init__(self, head_dim: int):
        super().__init__()
        quarter = head_dim // 4
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
        self.register_buffer("angular_freq", torch.cat([freqs, torch.zeros(quarter)]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, time, heads, head_dim)
        positions = torch.arange(x.size(1), dtype=torch.float32, device=x.device)
        angles = torch.outer(positions, self.angular_freq)[None, :, None, :]
        cos, sin = angles.cos(), angles.sin()
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat((first * cos + second * sin, second * cos - first * sin), dim=-1)
        return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.q, self.k, self.v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.proj = Linear(dim, dim)
        self.rotary = Rotary(head_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q, k = self.rotary(F.rms_norm(q, (self.head_dim,))), self.rotary(F.rms_norm(k, (self.head_dim,)))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=ATTN_SCALE, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc, self.proj = Linear(dim, 4 * dim), Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(dim, head_dim), MLP(dim)
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim).to(DTYPES[cfg.dtype])
        self.blocks = nn.ModuleList([Block(cfg.model_dim, cfg.head_dim) for _ in range(cfg.num_layers)])
        self.proj = Linear(cfg.model_dim, cfg.vocab_size)
        self.norm1, self.norm2 = RMSNorm(cfg.model_dim), RMSNorm(cfg.model_dim)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The summed (not averaged) cross-entropy of the batch: gradients add up over micro-batches and processes."""
        x = self.norm1(self.embed(inputs))
        for block in self.blocks:
            x = block(x)
        logits = self.proj(self.norm2(x)).float()
        logits = LOGIT_CAP * logits * torch.rsqrt(logits.square() + LOGIT_CAP ** 2)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


# =============================================================================
# OPTIMIZER SECTION: the part of this file a contestant changes.
#
# A new optimizer is a torch.optim.Optimizer subclass plus a line in build_optimizers() saying which parameters it
# gets. The trainer sums every gradient over all processes before step() (so an optimizer sees the gradient of the
# whole 524,288-token batch, the sum over tokens) and sets each group's "lr" from lr_multiplier() before each step.
# The initialization and the schedule live here too. Every line that runs is in the log: no optimizer library.
# =============================================================================


@torch.no_grad()
def init_weights(model: GPT):
    """The baseline's init: output projections (the blocks' and the head) zero, the embedding N(0, 1), the other
    matrices N(0, 0.33 / fan_in), biases zero, gains one. Call after seeding the RNG."""
    for name, p in model.named_parameters():
        if name.endswith("gains"):
            p.fill_(1.0)
        elif name.endswith("bias") or "proj" in name:
            p.zero_()
        elif name.startswith("embed"):
            p.normal_()
        elif name.endswith("weight"):
            p.normal_(std=(0.33 / p.size(-1)) ** 0.5)
        else:
            raise ConfigError(f"init_weights: no init rule for parameter {name}")


def newton_schulz(G: Tensor, steps: int, coefficients: tuple, eps: float) -> Tensor:
    """Approximately orthogonalize G (U S V^T -> about U V^T) by iterating X <- a X + (b A + c A^2) X, A = X X^T,
    in bf16, on the wide orientation of G (the smaller Gram matrix). (2, -1.5, 0.5) converges to the polar factor;
    dividing by the Frobenius norm first puts every singular value in (0, 1]. Written as torch.optim.Muon does."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon on 2D matrices: a momentum buffer, the Nesterov direction orthogonalized by Newton-Schulz, and a step of
    lr * sqrt(max(1, rows / cols)) after decoupled weight decay p <- p (1 - lr wd). Same update as
    torch.optim.Muon(nesterov=True, ns_coefficients=coefficients, ns_steps=ns_steps, adjust_lr_fn="original")."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 12,
                 ns_coefficients: tuple = (2.0, -1.5, 0.5), eps: float = 1e-7):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      ns_coefficients=ns_coefficients, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - mu)
                direction = p.grad.lerp(buffer, mu)  # Nesterov: look one momentum step ahead
                update = newton_schulz(direction, group["ns_steps"], group["ns_coefficients"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


class AdamW(torch.optim.Optimizer):
    """Adam with bias correction and decoupled weight decay p <- p (1 - lr wd), as the public script's
    torch.optim.AdamW(fused=True): the moments are kept in the parameter's dtype (bf16 for the bf16 embedding), each
    step computes moments and weights in fp32 from the stored values, takes the step with the fp32 moments and rounds
    each result once into its stored dtype. Bit for bit the fused kernel on CPU (tests/test_track3.py)."""

    def __init__(self, params, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                grad, t = p.grad.float(), state["step"]
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)  # the stored tensor itself when fp32
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # The root through fp64 is the correctly rounded fp32 root, as the fused kernel takes it; torch.sqrt on
                # a CPU's fp32 is off by an ulp in about 20% of the entries.
                root = exp_avg_sq.double().sqrt().float()
                denom = (root / math.sqrt(1 - beta2 ** t)).add_(eps)
                weights = p.float().mul_(1 - lr * group["weight_decay"])  # p itself when p is fp32
                weights.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.copy_(weights)


def build_optimizers(model: GPT, cfg: Config) -> list:
    """Which parameters each optimizer gets: Muon the blocks' matrices; AdamW the embedding, the head's weight and
    every vector (biases, gains), each at its own LR. The trainer checks that each parameter is in exactly one."""
    hidden_matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    adam = AdamW([dict(params=[model.embed.weight], lr=cfg.embed_lr), dict(params=[model.proj.weight], lr=cfg.head_lr),
                  dict(params=vectors, lr=cfg.scalar_lr)],
                 lr=cfg.scalar_lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.adam_weight_decay)
    muon = Muon(hidden_matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                ns_steps=cfg.ns_steps)
    return [adam, muon]


def lr_multiplier(step: int, cfg: Config) -> float:
    """Stable then linear decay: 1 until the last cooldown_frac of the run, then linearly to 0 at train_steps
    (the LR of step s, counted from 0, is that of progress s / train_steps)."""
    progress = step / cfg.train_steps
    if progress < 1 - cfg.cooldown_frac:
        return 1.0
    return (1 - progress) / cfg.cooldown_frac


# =============================================================================
# End of the optimizer section.
# =============================================================================


def check_optimizer_coverage(model: GPT, optimizers: list):
    """Every parameter trained by exactly one optimizer: a forgotten one would silently stay at its init."""
    counts = {id(p): 0 for p in model.parameters()}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): name for name, p in model.named_parameters()}
    wrong = [f"{names.get(i, '(not a model parameter)')} x{n}" for i, n in counts.items() if n != 1]
    if wrong:
        raise ConfigError(f"build_optimizers: each parameter must be in exactly one optimizer: {', '.join(wrong[:4])}")


def set_learning_rates(optimizers: list, step: int, cfg: Config):
    multiplier = lr_multiplier(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * multiplier


# -----------------------------------------------------------------------------
# Data: .bin shards (256 x int32 header: magic, version, token count; then uint16 tokens). Each step reads the
# next batch_seqs * seq_len + 1 tokens of the stream; a shard's remainder too short for a step is skipped. The order
# is the public script's, so both train on the same tokens in every step.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
FETCH_HINT = "fetch FineWeb with: python data/cached_fineweb10B.py 20"


class DataError(Exception):
    """Bad or missing data; the message names the file and how to get good data."""


def resolve_files(pattern: str, flag: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"{flag} {pattern}: no file matches (cwd: {os.getcwd()}); {FETCH_HINT}")
    return files


def shard_token_count(path: str) -> int:
    """The token count of one shard, after checking its header against its size (reads only the header)."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= HEADER_INTS * 4 else None
    if header is None or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: not a version-{SHARD_VERSION} token shard (bad or short header); {FETCH_HINT}")
    num_tokens = int(header[2])
    if size != HEADER_INTS * 4 + 2 * num_tokens:
        raise DataError(f"{path}: header says {num_tokens} tokens but the file has {size} bytes (truncated?); {FETCH_HINT}")
    return num_tokens


def read_shard(path: str) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=HEADER_INTS * 4)


def steps_in_shard(num_tokens: int, step_tokens: int) -> int:
    """Steps the stream takes from one shard: one at each pos = k * step_tokens with pos + step_tokens + 1 < num_tokens."""
    return max(0, (num_tokens - 2) // step_tokens)


def micro_batches(tokens: np.ndarray, seq_len: int, micro_seqs: int, device: torch.device) -> list:
    """[(inputs, targets)] of micro_seqs sequences each from len(tokens) - 1 consecutive input tokens."""
    inputs = torch.from_numpy(tokens[:-1].astype(np.int64)).view(-1, seq_len)
    targets = torch.from_numpy(tokens[1:].astype(np.int64)).view(-1, seq_len)
    return [(inputs[i:i + micro_seqs].to(device), targets[i:i + micro_seqs].to(device))
            for i in range(0, len(inputs), micro_seqs)]


class TrainBatches:
    """The training stream, step by step: this process's sequences (a contiguous share of the step's tokens) in
    micro-batches. Every world size trains on the same sequences in each step."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        self.files = resolve_files(cfg.train_files, "--train-files")
        self.step_tokens = cfg.batch_seqs * cfg.train_seq_len
        # Every shard's header and size now, before step 0: a bad shard is refused before the run, not when reached.
        self.steps_available = sum(steps_in_shard(shard_token_count(f), self.step_tokens) for f in self.files)
        self.share = self.step_tokens // world_size
        self.cfg, self.rank, self.device = cfg, rank, device
        self.file_index, self.tokens, self.pos = -1, np.zeros(0, dtype=np.uint16), 0

    def next_step(self, step: int) -> list:
        # '>=' as the public script: a shard's last step that would end exactly on its last token is skipped too
        while self.pos + self.step_tokens + 1 >= len(self.tokens):
            self.file_index += 1
            if self.file_index == len(self.files):
                raise DataError(f"the training data ran out at step {step} ({len(self.files)} shards of --train-files "
                                f"{self.cfg.train_files}); {FETCH_HINT} or more")
            self.tokens, self.pos = read_shard(self.files[self.file_index]), 0
        start = self.pos + self.rank * self.share
        self.pos += self.step_tokens
        return micro_batches(self.tokens[start:start + self.share + 1], self.cfg.train_seq_len, self.cfg.micro_batch_seqs, self.device)


def check_training_data(cfg: Config, device: torch.device):
    """Refuse, before the first log is opened, training data that is damaged or too short for --train-steps."""
    train = TrainBatches(cfg, 0, 1, device)
    if train.steps_available < cfg.train_steps:
        raise DataError(f"--train-files {cfg.train_files}: its {len(train.files)} shards hold {train.steps_available} steps of "
                        f"{train.step_tokens} tokens; --train-steps {cfg.train_steps} needs more; {FETCH_HINT} or more")


def validation_batches(cfg: Config, rank: int, world_size: int, device: torch.device) -> list:
    """This process's share of the first val_tokens tokens of the val files, in micro-batches."""
    parts, have = [], 0
    for path in resolve_files(cfg.val_files, "--val-files"):
        if have > cfg.val_tokens:
            break
        parts.append(read_shard(path)[:cfg.val_tokens + 1 - have])
        have += len(parts[-1])
    if have < cfg.val_tokens + 1:
        raise DataError(f"the val files hold {have} tokens; --val-tokens {cfg.val_tokens} needs {cfg.val_tokens + 1}; {FETCH_HINT}")
    tokens, share = np.concatenate(parts), cfg.val_tokens // world_size
    return micro_batches(tokens[rank * share:(rank + 1) * share + 1], cfg.val_seq_len, cfg.micro_batch_seqs, device)


# -----------------------------------------------------------------------------
# Training: all-reduced gradient sums, one optimizer step per batch, validation and compilation off the clock.


def setup_distributed(cfg: Config) -> tuple:
    """(rank, world_size, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPUs, gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine; to try the trainer on CPU run: "
                              "python records/track_3_optimization/train_gpt.py --preset tiny --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_reduce_gradients(model: GPT, world_size: int):
    """Sum every gradient over the processes: the optimizers then see the whole batch's gradient."""
    if world_size == 1:
        return
    handles = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in model.parameters()]
    for handle in handles:
        handle.wait()


def train_step(model: GPT, batch: list, optimizers: list, step: int, cfg: Config, world_size: int):
    """One forward-backward pass over the step's batch (in micro-batches), then one step of every optimizer."""
    for inputs, targets in batch:
        model(inputs, targets).backward()
    all_reduce_gradients(model, world_size)
    set_learning_rates(optimizers, step, cfg)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: GPT, val_batches: list, cfg: Config, world_size: int) -> float:
    """Mean cross-entropy per token over the val_tokens tokens."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=val_batches[0][0].device)
    for inputs, targets in val_batches:
        total += model(inputs, targets).double()
    model.train()
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / cfg.val_tokens


def is_val_step(step: int, cfg: Config) -> bool:
    """Step 0, every val_every steps, every late_val_every steps in the last late_val_frac, and the end."""
    every = cfg.late_val_every if step >= (1 - cfg.late_val_frac) * cfg.train_steps else cfg.val_every
    return step == cfg.train_steps or step % every == 0


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_run(model: GPT, cfg: Config, world_size: int) -> list:
    """Fresh weights for one run, from its seed (the same on every process), and fresh optimizers."""
    torch.manual_seed(cfg.seed)
    init_weights(model)
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    optimizers = build_optimizers(model, cfg)
    check_optimizer_coverage(model, optimizers)
    return optimizers


def warm_up(model: GPT, cfg: Config, val_batches: list, logger) -> None:
    """Compile the training and validation graphs on one micro-batch each, off the clock; every run reuses them
    (each run starts from new weights and new optimizers, so what the warm-up leaves behind does not matter)."""
    start = time.perf_counter()
    train_shape = (cfg.micro_batch_seqs, cfg.train_seq_len)
    dummy = torch.zeros(train_shape, dtype=torch.int64, device=val_batches[0][0].device)
    model(dummy, dummy).backward()
    with torch.no_grad():
        model.eval()
        model(*val_batches[0])
        model.train()
    model.zero_grad(set_to_none=True)
    synchronize(dummy.device)
    logger.log(f"compile_and_warmup: {time.perf_counter() - start:.1f}s (1 train and 1 val micro-batch, then reset; "
               f"reused by all {cfg.trials} runs)")


@dataclass
class Progress:
    """Where the launch is, for the line that reports a stop: the trial (counted from 1) and its finished steps."""
    trial: int = 1
    trials: int = 1
    step: int = 0
    signals: list = field(default_factory=list)  # the name of a SIGTERM received, once it came

    def where(self) -> str:
        return f"step {self.step}" + (f" of trial {self.trial} of {self.trials}" if self.trials > 1 else "")


def run_training(model: GPT, cfg: Config, rank: int, world_size: int, device: torch.device, val_batches: list,
                 logger, progress: Progress) -> dict:
    """One run: train_steps steps from fresh weights, with the clock stopped for validation."""
    optimizers = new_run(model, cfg, world_size)
    train = TrainBatches(cfg, rank, world_size, device)
    train_ms, stopped = 0.0, None
    synchronize(device)
    clock = time.perf_counter()
    for step in range(cfg.train_steps + 1):
        progress.step = step
        if is_val_step(step, cfg):
            synchronize(device)
            train_ms += 1000 * (time.perf_counter() - clock)
            val_loss = evaluate(model, val_batches, cfg, world_size)
            logger.log(f"step:{step}/{cfg.train_steps} val_loss:{val_loss:.5f} train_time:{train_ms:.0f}ms "
                       f"step_avg:{train_ms / max(step, 1):.2f}ms")
            if not math.isfinite(val_loss):
                stopped = f"stopping: non-finite val loss {val_loss} at step {step}"
                break
            synchronize(device)
            clock = time.perf_counter()
        if step == cfg.train_steps:
            break
        train_step(model, train.next_step(step), optimizers, step, cfg, world_size)
        approx_ms = train_ms + 1000 * (time.perf_counter() - clock)
        logger.log(f"step:{step + 1}/{cfg.train_steps} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / (step + 1):.2f}ms",
                   console=False)
    if stopped:
        logger.log(stopped)
    return dict(train_ms=train_ms, stopped=stopped)


# -----------------------------------------------------------------------------
# Logging: rank 0 writes one log per run, LOG_DIR/RUN_ID.txt: this file's source, a line of 100 '=', the versions
# and nvidia-smi, another line of 100 '=', the header lines, the step lines, a summary. records/compare.py reads it.
# A run that stops early ends its log with a `stopping:` line (records/check_submission.py lists it, not as a crash).

SEPARATOR = "=" * 100


class OutputError(Exception):
    """The log or the weights could not be written; the message is one line."""


class DiskFullError(OutputError):
    """No space left while writing the log or the weights; the message is one line."""


def disk_full(what: str) -> DiskFullError:
    return DiskFullError(f"disk full writing {what}: free space on that disk, or write it elsewhere")


class Logger:
    """Lines straight to the file, unbuffered (a crash keeps what was logged), and to the console; only rank 0
    writes. On a full disk it cuts the partial line back off, ends the log with `stopping: disk full` where that
    still fits, and raises DiskFullError; later lines are dropped."""

    def __init__(self, path: str | None):
        self.path, self.size, self.full = path, 0, False
        self.file = None
        if path:
            try:
                self.file = open(path, "xb", buffering=0)  # never mix two runs in one log
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise disk_full(f"the log {path}") from None
                raise OutputError(f"cannot write the log {path}: {e.strerror or e}") from None

    def log(self, line: str, console: bool = True):
        if self.file is None or self.full:
            return
        try:
            self._write((line + "\n").encode("utf-8"))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self._end_after_disk_full()
            raise disk_full(f"the log {self.path}") from None
        if console:
            print(line, flush=True)

    def _write(self, data: bytes):
        view = memoryview(data)
        while view:  # an unbuffered write may take only part of the bytes
            view = view[self.file.write(view):]
        self.size += len(data)  # whole lines only: where a cut line is cut back to

    def _end_after_disk_full(self):
        """Best effort: drop the cut line (freeing its bytes), then the stopping line may still fit."""
        self.full = True
        try:
            self.file.truncate(self.size)
            self.file.seek(self.size)
            self.file.write(b"stopping: disk full\n")
        except (OSError, ValueError):
            pass

    def close(self):
        if self.file is not None:
            self.file.close()


def write_atomically(obj, path: str, what: str):
    """torch.save to a temp file in the same folder, fsync, rename: a full disk or a crash mid-write leaves no
    partial file (and any older file whole). Serialized in memory first, so a full disk is a plain OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; weights are read like any other file
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(what) from None
        raise OutputError(f"cannot write {what}: {e.strerror or e}") from None
    finally:
        if tmp is not None:  # a half-written temp file would only take more of the disk
            try:
                os.unlink(tmp)
            except OSError:
                pass


def read_own_source() -> str:
    """This file as it is when the launch starts: every run's log embeds it, so a file edited during --trials
    changes no log (the process keeps running the code it started with)."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        return f.read()


def environment_report() -> str:
    lines = [f"Running Python {sys.version}", f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    try:
        import triton
        lines.append(f"Running Triton version {triton.__version__}")
    except ImportError:
        lines.append("Running Triton version: not installed")
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout.rstrip())
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not available")
    return "\n".join(lines)


def run_ids(cfg: Config) -> list:
    """(seed, run id) of each run of the launch: RUN_ID, or RUN_ID-seedN for several runs."""
    seeds = [cfg.seed + k for k in range(cfg.trials)]
    return [(seed, cfg.run_id if cfg.trials == 1 else f"{cfg.run_id}-seed{seed}") for seed in seeds]


def log_header(logger: Logger, source: str, cfg: Config, world_size: int, accumulation: int, device: torch.device,
               trial: int):
    logger.log(source, console=False)
    logger.log(SEPARATOR, console=False)
    logger.log(environment_report(), console=False)
    logger.log(SEPARATOR, console=False)
    logger.log(f"track: {TRACK}")
    logger.log(f"world_size: {world_size}")
    logger.log(f"grad_accum_steps: {accumulation}")
    logger.log(f"gpu: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    logger.log(f"config: {json.dumps(dataclasses.asdict(cfg), separators=(',', ':'))}")
    logger.log(f"trial: {trial + 1} of {cfg.trials}")


def log_summary(logger: Logger, device: torch.device):
    if device.type == "cuda":
        allocated, reserved = (torch.cuda.max_memory_allocated(device) // 2 ** 20, torch.cuda.max_memory_reserved(device) // 2 ** 20)
    else:  # the process's peak resident memory stands in for both on a CPU
        import resource
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    logger.log(f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB")


def folder_problem(flag: str, folder: str) -> str:
    """Why logs cannot be written into folder, found by trying (creating it if missing); empty string: they can."""
    folder = folder or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{flag} {folder} is a file, not a folder: pick a folder"
    if not os.path.isdir(folder):
        ancestor = os.path.dirname(os.path.abspath(folder))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            return f"{flag} {folder}: {ancestor} is a file, not a folder: pick another path"
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


def agree_on_outputs(cfg: Config, rank: int, world_size: int) -> Config:
    """Rank 0 picks the run id and checks that the logs can be written and none would be overwritten; every
    process gets the answer, so none trains on alone."""
    shared = [cfg.run_id or str(uuid.uuid4()), ""]
    if rank == 0:
        shared[1] = folder_problem("--log-dir", cfg.log_dir)
        taken = [run_id for _, run_id in run_ids(dataclasses.replace(cfg, run_id=shared[0]))
                 if os.path.exists(os.path.join(cfg.log_dir, f"{run_id}.txt"))]
        if not shared[1] and taken:
            shared[1] = f"{os.path.join(cfg.log_dir, taken[0])}.txt exists: choose another --run-id"
    if world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[1]:
        raise ConfigError(shared[1])
    return dataclasses.replace(cfg, run_id=shared[0])


# -----------------------------------------------------------------------------
# The launch: every run of --trials in turn, and how a launch ends. Ctrl-C and SIGTERM stop it with a `stopping:`
# line in the running trial's log and one line on stderr (exit 130 and 143); a full disk or another output problem
# with one line (exit 1); a refused setting or bad data with one line before anything runs (exit 2).


class StopSignal(BaseException):
    """SIGTERM (how torchrun and batch schedulers stop a job), raised like Ctrl-C's KeyboardInterrupt so both stop
    through the same path: a `stopping:` line, the open files closed, the process group torn down."""


def stop_on_sigterm(received: list):
    """Installed by main() only, so importing this file changes no process state; returns the old handler. The first
    SIGTERM raises StopSignal; later ones are ignored while the stop is under way."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return None

    def raise_stop(signum, frame):
        if not received:
            received.append(signal.Signals(signum).name)
            raise StopSignal(received[0])

    return signal.signal(signal.SIGTERM, raise_stop)


def wait_for_signal(received: list, seconds: float = 3.0):
    """Give this process's own SIGTERM a moment to arrive (torchrun signals every process, not all at once): it is
    then this stop's reason instead of the collective a stopped peer broke. A real crash only waits these seconds."""
    deadline = time.monotonic() + seconds
    try:
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    except StopSignal:  # the handler noted it in `received` before raising
        pass


def stopping_reason(error: BaseException, progress: Progress) -> str | None:
    """The text of the `stopping:` line for an error that ends the launch; None for a crash (a bug keeps its
    traceback, and check_submission calls its cut log a crash)."""
    if isinstance(error, (KeyboardInterrupt, StopSignal)):
        return f"{'SIGTERM' if isinstance(error, StopSignal) else 'Ctrl-C'} at step {progress.step}"
    if isinstance(error, OutputError):
        return f"at step {progress.step}: {error}"
    if isinstance(error, (ConfigError, DataError)):
        return f"data error: {error}"
    return None


def train_all_runs(cfg: Config, rank: int, world_size: int, device: torch.device, accumulation: int, source: str,
                   progress: Progress) -> int:
    """Build and compile the model once, then train each run of the launch into its own log; 1 if any run stopped.
    An error or a signal ends the launch: the running trial's log ends with its `stopping:` line."""
    val_batches = validation_batches(cfg, rank, world_size, device)
    check_training_data(cfg, device)
    model = GPT(cfg).to(device)
    if cfg.compile:
        model.compile(dynamic=False)
    status = 0
    for trial, (seed, run_id) in enumerate(run_ids(cfg)):
        progress.trial, progress.trials, progress.step = trial + 1, cfg.trials, 0
        run_cfg = dataclasses.replace(cfg, seed=seed, run_id=run_id)
        logger = Logger(os.path.join(cfg.log_dir, f"{run_id}.txt") if rank == 0 else None)
        try:
            log_header(logger, source, run_cfg, world_size, accumulation, device, trial)
            if trial == 0:
                warm_up(model, cfg, val_batches, logger)
            result = run_training(model, run_cfg, rank, world_size, device, val_batches, logger, progress)
            log_summary(logger, device)
            if cfg.save_model and rank == 0:
                path = os.path.join(cfg.log_dir, f"{run_id}.pt")
                write_atomically(model.state_dict(), path, f"--save-model {path}")
        except BaseException as error:
            if world_size > 1 and stopping_reason(error, progress) is None:
                wait_for_signal(progress.signals)  # a peer stopped by the same SIGTERM broke a collective here
                if progress.signals:
                    error = StopSignal(progress.signals[0])
            reason = stopping_reason(error, progress)
            if reason is None:
                raise
            try:
                logger.log(f"stopping: {reason}", console=isinstance(error, (KeyboardInterrupt, StopSignal)))
            except DiskFullError:
                pass  # the log could take no more: the stop is still reported on stderr
            raise error from None
        finally:
            logger.close()
            if rank == 0:
                print(f"log: {logger.path}", flush=True)
        status = status or (1 if result["stopped"] else 0)
    return status


def launched_by_torchrun() -> bool:
    """Whether this process's parent is torchrun's agent (which sets TORCHELASTIC_RUN_ID in its children)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().split(b"\0")
    except OSError:  # not Linux: torchrun's own report it is
        return False
    return any(os.path.basename(arg) == b"torchrun" or arg == b"torch.distributed.run" for arg in parent)


def refuse_launch(status: int) -> int:
    """The exit of a launch every process refused with the same one-line error (a setting, the world size, the
    data). torchrun answers any process that exits non-zero with a 40-line ChildFailedError report that buries that
    line, and any signal it can catch with a traceback; so under torchrun the first process of each machine stops
    its torchrun with SIGKILL (the shell sees exit 137) and the others exit 0, leaving torchrun nothing to report."""
    if not launched_by_torchrun():
        return status
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getppid(), signal.SIGKILL)
    return status


def main(argv=None) -> int:
    source = read_own_source()
    cfg = parse_config(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    progress = Progress(trials=cfg.trials)
    previous_handler = stop_on_sigterm(progress.signals)
    status, problem = 0, ""
    try:
        accumulation = check_config(cfg, world_size)
        rank, world_size, device = setup_distributed(cfg)
        cfg = agree_on_outputs(cfg, rank, world_size)
        status = train_all_runs(cfg, rank, world_size, device, accumulation, source, progress)
    except (ConfigError, DataError) as e:
        status, problem = 2, str(e)
    except OutputError as e:
        status, problem = 1, f"stopped at {progress.where()}: {e}"
    except (KeyboardInterrupt, StopSignal) as e:
        what = "SIGTERM" if isinstance(e, StopSignal) else "Ctrl-C"
        status, problem = (143 if isinstance(e, StopSignal) else 130), f"stopped by {what} at {progress.where()}"
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    if problem and rank == 0:  # one line, not one per process
        print(f"train_gpt.py: error: {problem}", file=sys.stderr, flush=True)
    return refuse_launch(status) if status == 2 else status


if __name__ == "__main__":
    sys.exit(main())
