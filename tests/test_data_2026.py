"""The staged (2026) data path on CPU: per-stage batches, world-size invariance, document cuts at max_doc_len
against a naive oracle of the 2026 script's rule, BOS alignment, shard changes, and a staged run that trains."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

SAMPLE_TRAIN = REPO / "data/sample/sample_train_000001.bin"
SAMPLE_VAL = REPO / "data/sample/sample_val_000000.bin"
CPU = torch.device("cpu")

# Three stages of 3 steps: 8, 8 and 4 sequences per step of 256, 512 and 1024 tokens; documents cut at 96 / 300.
STAGED = ["--stage-steps", "0,3,6", "--train-steps", "9", "--stage-batch-tokens", "2048,4096,4096",
          "--stage-seq-len", "256,512,1024", "--stage-max-doc-len", "96,300,300",
          "--stage-short-window-blocks", "1,1,2", "--stage-long-window-blocks", "2,3,4",
          "--stage-lr-mult", "1,1,1", "--stage-mtp-weights-start", "1/1/1", "--stage-mtp-weights-end", "1/1/1",
          "--stage-prefix-weight-start", "0.25,0.25,0", "--stage-prefix-weight-end", "0.25,0,0"]


def write_shard(path: Path, tokens) -> str:
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return str(path)


def random_documents(num_tokens: int, seed: int, longest: int = 700) -> np.ndarray:
    """A token stream of documents of 1..longest tokens, each starting with <|endoftext|>, the first at 0.
    Token values never equal the BOS id inside a document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, num_tokens)
    position = 0
    while position < num_tokens:
        tokens[position] = tg.EOT_TOKEN
        position += int(rng.integers(1, longest + 1))
    return tokens


def staged_cfg(*extra):
    return tg.parse_config(["--preset", "tiny", *STAGED, *extra])


def step_sequences(loaders: list, schedule) -> list:
    """The step's sequences in order k = 0, 1, ...: rank k % W, accumulation step k // W."""
    per_rank = [loader.batch_for(schedule) for loader in loaders]
    return [per_rank[k % len(loaders)][k // len(loaders)] for k in range(sum(map(len, per_rank)))]


# -----------------------------------------------------------------------------
# Stage batches and world sizes


def test_stage_batches_are_the_same_sequences_for_world_sizes_1_2_4(tmp_path):
    shard = write_shard(tmp_path / "t_train_000001.bin", random_documents(120_000, seed=0))
    cfg = staged_cfg()
    worlds = {w: [tg.make_train_loader(cfg, [shard], r, w, CPU) for r in range(w)] for w in (1, 2, 4)}
    for step in range(cfg.train_steps):
        schedule = tg.schedule_at(step, cfg)
        steps = {w: step_sequences(loaders, schedule) for w, loaders in worlds.items()}
        for w in (2, 4):
            assert len(steps[w]) == len(steps[1]) == schedule.batch_tokens // schedule.seq_len
            for (x1, y1), (xw, yw) in zip(steps[1], steps[w]):
                assert torch.equal(x1, xw) and torch.equal(y1, yw)
        # the sequences of a step are different stretches of the stream, not one repeated
        assert len({tuple(x[:50].tolist()) for x, _ in steps[1]}) == len(steps[1])
    for loaders in worlds.values():
        for loader in loaders:
            loader.close()


def test_each_stage_has_its_own_accumulation_and_sequence_length(tmp_path):
    shard = write_shard(tmp_path / "t_train_000001.bin", random_documents(120_000, seed=1))
    cfg = staged_cfg()
    expected = {1: [8, 8, 4], 2: [4, 4, 2], 4: [2, 2, 1]}  # batch / (world x seq_len) per stage
    for world, accumulation in expected.items():
        loader = tg.make_train_loader(cfg, [shard], world - 1, world, CPU)  # the last rank
        seen = []
        for step in range(cfg.train_steps):
            schedule = tg.schedule_at(step, cfg)
            batch = loader.batch_for(schedule)
            assert all(x.numel() == y.numel() == schedule.seq_len for x, y in batch)
            seen.append(len(batch))
        loader.close()
        assert seen == [a for a in accumulation for _ in range(3)]
        assert tg.check_config(cfg, world) == accumulation[0]


def test_a_loader_restored_from_its_state_goes_on_with_the_same_sequences(tmp_path):
    """A checkpoint's loader state holds the position inside the shard (the next document to pack): a restored
    loader packs exactly the sequences the original packs next, across shard changes (the data cycles)."""
    shards = [write_shard(tmp_path / f"t_train_00000{i}.bin", random_documents(12_000, seed=i)) for i in (1, 2)]
    cfg = staged_cfg()
    original = tg.make_train_loader(cfg, shards, 0, 1, CPU)
    for step in range(4):
        original.batch_for(tg.schedule_at(step, cfg))
    state = original.state()
    restored = tg.make_train_loader(cfg, shards, 0, 1, CPU)
    restored.load_state(state)
    for step in range(4, 9):  # stage 1, then stage 2's longer sequences, which reach the second shard
        schedule = tg.schedule_at(step, cfg)
        expected, got = original.batch_for(schedule), restored.batch_for(schedule)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, got)), step
    assert (original.shard_index, original.passes) == (restored.shard_index, restored.passes)
    assert original.passes > state["passes"] and original.tokens_read() == restored.tokens_read()  # shards changed
    assert restored.usage_line() == original.usage_line()
    for loader in (original, restored):
        loader.close()


def test_stage_batches_the_world_size_cannot_split_are_refused_naming_the_stage():
    cfg = tg.parse_config(["--preset", "r2026"])
    assert [tg.check_config(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(tg.ConfigError) as error:
        tg.check_config(cfg, 16)
    message = str(error.value)
    assert message.startswith("stage 0: world size 16 x --stage-seq-len 16384") and "--stage-batch-tokens 131072" in message
    assert "\n" not in message
    # 16 GPUs work with half the sequence length in every stage
    shorter = tg.parse_config(["--preset", "r2026", "--stage-seq-len", "8192,16384,24576,24576"])
    assert tg.check_config(shorter, 16) == 1
    with pytest.raises(tg.ConfigError, match=r"^stage 2: world size 3 "):
        tg.check_config(tg.parse_config(["--preset", "r2026", "--stage-batch-tokens", "147456,294912,393216,393216",
                                         "--stage-seq-len", "16384,32768,49152,49152"]), 3)


# -----------------------------------------------------------------------------
# Document cuts at max_doc_len: the 2026 script's rule, written naively


def naive_pack(tokens: np.ndarray, position: int, seq_len: int, max_doc_len: int):
    """Token by token, as the 2026 script's Shard.next_batch reads: from the next BOS at or after position, copy
    a document until its next BOS, its max_doc_len-th token or the sequence's seq_len + 1 tokens; then go on at
    the next BOS after the document's start (the rest of a long document is skipped). Returns (tokens, the
    position after the last document's BOS) or None if the stream ends first."""
    out = []
    while len(out) < seq_len + 1:
        while position < len(tokens) and tokens[position] != tg.EOT_TOKEN:
            position += 1
        if position == len(tokens):
            return None
        doc_tokens = 0
        while (position + doc_tokens < len(tokens) and doc_tokens < max_doc_len and len(out) < seq_len + 1
               and (doc_tokens == 0 or tokens[position + doc_tokens] != tg.EOT_TOKEN)):
            out.append(tokens[position + doc_tokens])
            doc_tokens += 1
        position += 1
    return np.array(out), position


@pytest.mark.parametrize("seed,seq_len,max_doc_len,longest", [(0, 256, 96, 700), (1, 512, 300, 700), (2, 1024, 2048, 3000),
                                                               (3, 20, 1, 40), (4, 300, 7, 40)])
def test_max_doc_len_cuts_match_a_naive_oracle_of_the_2026_rule(seed, seq_len, max_doc_len, longest):
    tokens = random_documents(20_000, seed=seed, longest=longest)
    tokens[np.random.default_rng(seed).integers(0, 20_000, 30)] = tg.EOT_TOKEN  # some one-token documents, BOS BOS
    doc_starts = np.flatnonzero(tokens == tg.EOT_TOKEN)
    doc, position, sequences = 0, 0, 0
    while True:
        packed = tg.pack_sequence(doc_starts, len(tokens), doc, seq_len, max_doc_len)
        expected = naive_pack(tokens, position, seq_len, max_doc_len)
        if expected is None:
            assert packed is None
            break
        spans, doc = packed
        assert np.array_equal(np.concatenate([tokens[a:b] for a, b in spans]), expected[0])
        position = expected[1]
        assert doc == np.searchsorted(doc_starts, position)  # both go on at the same document
        sequences += 1
    assert sequences >= 3


def test_a_long_document_gives_its_first_max_doc_len_tokens_then_the_next_document():
    # documents of 10, 500 (cut to 100) and 50 tokens, then 400 (cut to 100, then the sequence ends)
    lengths = [10, 500, 50, 400, 30]
    tokens = np.concatenate([np.r_[tg.EOT_TOKEN, np.arange(1, n) + 1000 * i] for i, n in enumerate(lengths)])
    doc_starts = np.flatnonzero(tokens == tg.EOT_TOKEN)
    spans, next_doc = tg.pack_sequence(doc_starts, len(tokens), 0, 239, 100)
    assert [(int(a), int(b)) for a, b in spans] == [(0, 10), (10, 110), (510, 560), (560, 640)]
    assert next_doc == 4  # the cut last document's rest is skipped: the next sequence starts at the 30-token one
    assert tg.pack_sequence(doc_starts, len(tokens), 4, 239, 100) is None  # 30 tokens left: the shard ends first


def test_pieces_start_with_bos_so_boundaries_are_the_2026_cu_seqlens(tmp_path):
    shard = write_shard(tmp_path / "t_train_000001.bin", random_documents(60_000, seed=5, longest=400))
    cfg = staged_cfg()
    loader = tg.make_train_loader(cfg, [shard], 0, 1, CPU)
    for step in (0, 3, 6):
        schedule = tg.schedule_at(step, cfg)
        start_doc = loader.next_doc
        batch = loader.batch_for(schedule)
        packed = tg.pack_step(loader.doc_starts, len(loader.tokens), start_doc, len(batch), schedule.seq_len, schedule.max_doc_len)
        for (inputs, targets), spans in zip(batch, packed[0]):
            assert inputs[0].item() == tg.EOT_TOKEN  # BOS-aligned
            assert torch.equal(inputs[1:], targets[:-1].int()) and targets.dtype == torch.int64
            lengths = spans[:, 1] - spans[:, 0]
            assert lengths.max() <= schedule.max_doc_len
            # the 2026 script's cum_lengths: piece lengths, the last one less the target's extra token
            lengths[-1] -= 1
            script = np.r_[0, np.cumsum(lengths)]
            assert np.array_equal(tg.document_boundaries(inputs).numpy(), script)
            padded = tg.document_boundaries(inputs, max_docs=len(script) + 3).numpy()
            assert np.array_equal(padded, np.r_[script, [schedule.seq_len] * 3]) and padded.dtype == np.int32
            # the model's BOS-based document ids split the sequence at exactly these boundaries
            doc_ids = tg.document_ids(inputs).numpy()
            assert np.array_equal(np.flatnonzero(np.diff(doc_ids)) + 1, script[1:-1])
    with pytest.raises(ValueError, match="more than max_docs"):
        tg.document_boundaries(batch[0][0], max_docs=2)
    loader.close()


# -----------------------------------------------------------------------------
# Shards and the loader's stream


def test_a_step_that_does_not_fit_comes_whole_from_the_next_shard(tmp_path):
    # stage 0 uses 8 x 257 tokens a step, and skips less than 8 x 90 at the sequences' ends (documents of at most
    # 90 tokens are never cut at 96): the first shard holds 2 steps (<= 5536 tokens), not 3 (>= 6168)
    first = random_documents(5_800, seed=6, longest=90)
    second = random_documents(40_000, seed=7, longest=200)
    files = [write_shard(tmp_path / "t_train_000001.bin", first), write_shard(tmp_path / "t_train_000002.bin", second)]
    cfg = staged_cfg()
    one = tg.make_train_loader(cfg, files, 0, 1, CPU)
    two = [tg.make_train_loader(cfg, files, r, 2, CPU) for r in range(2)]
    shards = []
    for step in range(4):
        schedule = tg.schedule_at(step, cfg)
        sequences = step_sequences([one], schedule)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(sequences, step_sequences(two, schedule)))
        shards.append(one.shard_index)
        if step == 2:  # the first step from shard 2 starts at its first document
            assert np.array_equal(sequences[0][0][:20].numpy(), second[:20])
    assert shards == [0, 0, 1, 1]
    for loader in [one, *two]:
        loader.close()


def test_a_shard_too_small_for_any_step_is_a_data_error(tmp_path):
    shard = write_shard(tmp_path / "t_train_000001.bin", random_documents(3_000, seed=8))
    loader = tg.make_train_loader(staged_cfg(), [shard], 0, 1, CPU)  # holds 1025 tokens: the longest sequence fits
    with pytest.raises(tg.DataError, match="no shard of .* holds a step of 8 sequences of 257 tokens"):
        loader.batch_for(tg.schedule_at(0, staged_cfg()))
    loader.close()


# -----------------------------------------------------------------------------
# The loop: warm-up steps, refusal, token counts, and a staged run on 1 and 2 processes


def test_warmup_samples_the_steps_around_every_stage_start_as_the_2026_script():
    r2026 = tg.parse_config(["--preset", "r2026"])
    assert tg.warmup_steps(r2026) == [0, 1, 421, 422, 423, 424, 845, 846, 847, 848, 1268, 1269, 1270, 1271]
    assert tg.warmup_steps(staged_cfg("--warmup-steps", "0")) == []
    assert tg.warmup_steps(staged_cfg("--warmup-steps", "1")) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_the_model_follows_every_schedule_setting():
    tg.check_schedule(tg.parse_config(["--preset", "r2026"]), training=True)  # no error: the model follows it all
    tg.check_schedule(staged_cfg("--stage-short-window-blocks", "1,1,1"), training=True)  # any short window


class Lines:
    def __init__(self):
        self.lines = []

    def log(self, line, console=True):
        self.lines.append(line)


def test_summary_counts_the_tokens_of_each_steps_own_batch():
    cfg = tg.parse_config(["--preset", "r2026"])
    # stages 0..423, 423..847, 847..1270 and the 15-step extension: the 2026-08-01 script's 338.8M tokens
    assert tg.trained_tokens(1285, cfg) == 423 * 131_072 + 424 * 262_144 + 423 * 393_216 + 15 * 393_216 == 338_821_120
    logger = Lines()
    result = dict(train_ms=1000.0 * 100, val_losses=[(1285, 3.3, 1e5)], launch_to_first_step=None, model=None)
    tg.log_summary(logger, result, cfg, CPU, None)
    assert f"tokens_per_second: {tg.trained_tokens(1285, cfg) / 100:.0f}" in logger.lines


def test_the_loop_gives_every_step_the_batch_of_its_own_schedule(monkeypatch):
    """run_training's wiring: the warm-up's sampled steps and every timed step get their stage's accumulation and
    sequence length (train_step and evaluate replaced by recorders: no model compute)."""
    cfg = staged_cfg("--train-files", str(SAMPLE_TRAIN), "--val-files", str(SAMPLE_VAL), "--warmup-steps", "1", "--val-every", "0")
    calls = []

    def record(model, batch, opt, step, cfg):
        calls.append((step, len(batch), {inputs.numel() for inputs, _ in batch}))
        return torch.zeros(())

    monkeypatch.setattr(tg, "train_step", record)
    monkeypatch.setattr(tg, "evaluate", lambda *args, **kwargs: 5.0)
    result = tg.run_training(cfg, Lines(), tg.Comm(0, 1), CPU, 8, 0.0)
    per_stage = [(8, {256}), (8, {512}), (4, {1024})]  # 1 process: stage batch / seq_len sequences
    warmup = [(step, *per_stage[step // 3]) for step in range(8)]  # steps 0..7 sampled around the starts 3 and 6
    timed = [(step, *per_stage[step // 3]) for step in range(9)]
    assert calls == warmup + timed
    assert [step for step, _, _ in result["val_losses"]] == [0, 9]
