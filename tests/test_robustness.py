"""Issue 11: nothing a user does ends in a traceback, a silent surprise or lost work; long runs can resume.

Each test is one row of the reviewer's table (or the checkpoint feature) and asserts the exact line the user
now sees. Most runs use a micro model (the record's structure, 2 layers of width 64) on a small synthetic corpus of
100-token documents to stay cheap on a shared CPU; errors found before training call main() in-process.
"""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import train_gpt as tg  # noqa: E402
from records.runlog import parse_log_file  # noqa: E402
from test_train_gpt import SAMPLE_VAL, run_trainer, tiny_args, write_shard  # noqa: E402

MICRO_MODEL = ["--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32", "--no-attn-layers", "",
               "--long-window-layers", "1", "--paired-head-layers", "0", "--value-embed-layers", "1", "--skip-connection", "",
               "--attn-source-layer", "-1", "--no-mudd", "--xsa-layers", "", "--attn-gate-layers", "", "--dc-layer", "-1", "--bigram-rows", "1031", "--bigram-dim", "16", "--bigram-sign-rows", "64",
               "--stage-seq-len", "128,128,128,128", "--stage-batch-tokens", "256,256,256,256",
               "--stage-max-doc-len", "128,128,128,128", "--stage-short-window-blocks", "1,1,1,1",
               "--stage-long-window-blocks", "1,1,1,1", "--final-long-window-blocks", "1", "--val-seq-len", "128",
               "--val-tokens", "256"]


def micro_steps(steps: int) -> list:
    """The schedule squeezed into `steps` steps: stages at 0, 1/3 and 2/3, a 1-step extension."""
    third = (steps - 1) // 3
    return ["--train-steps", str(steps), "--stage-steps", f"0,{third},{2 * third},{steps - 1}", "--extension-steps", "1",
            "--muon-momentum-warmup-steps", "1", "--muon-momentum-cooldown-steps", "1"]


def micro_corpus(folder: Path, train_tokens: int = 1500) -> tuple:
    """Documents of 100 random ids: a step packs 2 sequences of 129 tokens from 4 documents (each one's rest past
    the sequence's end is skipped), so 1500 training tokens (15 documents) hold 3 steps and a pass ends in step 4."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = rng.integers(0, 50000, train_tokens), rng.integers(0, 50000, 1000)
    train_ids[::100] = val_ids[::100] = tg.EOT_TOKEN
    train = write_shard(folder / "micro_train_000001.bin", train_ids)
    val = write_shard(folder / "micro_val_000000.bin", val_ids)
    return train, val


def micro_args(tmp_path: Path, run_id: str, *extra) -> list:
    train, val = micro_corpus(tmp_path / "data")
    return ["--preset", "tiny", "--device", "cpu", *MICRO_MODEL, "--train-files", str(train), "--val-files", str(val),
            "--log-dir", str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ck"), "--run-id", run_id, *extra]


def run_main(argv, capsys) -> tuple:
    """main() in this process (errors found before training need no new interpreter): (status, stderr lines)."""
    status = tg.main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def last_line(path: Path) -> str:
    return path.read_text().rstrip("\n").splitlines()[-1]


# -----------------------------------------------------------------------------
# Token ids past the vocabulary


def test_token_id_past_vocab_stops_with_one_line_before_training(tmp_path, capsys):
    status, err = run_main(tiny_args(tmp_path, "vocab", "--vocab-size", "1000"), capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"train_gpt.py: error: {SAMPLE_VAL}: token id ")
    assert "is >= --vocab-size 1000: raise --vocab-size above the tokenizer's largest id, or re-tokenize the data" in err[0]
    assert not (tmp_path / "logs/vocab.txt").exists()  # refused before its first step: no log (issue 28)


def test_training_shard_with_an_id_past_vocab_is_named(tmp_path):
    tokens = np.arange(600) % 500
    tokens[345] = 777
    shard = write_shard(tmp_path / "bad_train_000001.bin", tokens)
    with pytest.raises(tg.DataError, match=r"bad_train_000001.bin: token id 777 at token 345 is >= --vocab-size 512"):
        tg.TrainLoader([str(shard)], 128, 0, 1, torch.device("cpu"), vocab_size=512)
    tg.TrainLoader([str(shard)], 128, 0, 1, torch.device("cpu"), vocab_size=1024).close()  # large enough: fine


# -----------------------------------------------------------------------------
# Output paths: checked before training


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_unusable_log_dir_is_refused_in_one_line(tmp_path, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    log_dir = {"file": blocker, "under_file": blocker / "logs", "read_only": Path("/sys")}[case]
    if case == "read_only" and not tg.folder_problem("--log-dir", "/sys", create=False):
        pytest.skip("/sys is writable here: no read-only folder to try")
    args = tiny_args(tmp_path, "x")
    args[args.index("--log-dir") + 1] = str(log_dir)
    status, err = run_main(args, capsys)
    expected = {"file": f"train_gpt.py: error: --log-dir {blocker} is a file, not a folder: pick a folder",
                "under_file": f"train_gpt.py: error: --log-dir {log_dir}: {blocker} is a file, not a folder: pick another path",
                "read_only": "train_gpt.py: error: --log-dir /sys: cannot write there ("}[case]
    assert status == 2 and len(err) == 1 and err[0].startswith(expected), err


def test_save_model_into_a_missing_folder_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "missing/dir/m.pt"
    status, err = run_main(tiny_args(tmp_path, "save", "--save-model", str(target)), capsys)
    assert status == 2 and err == [
        f"train_gpt.py: error: --save-model: folder '{target.parent}' does not exist: create it first "
        f"(mkdir -p {target.parent}) or pick another path"]
    assert not (tmp_path / "logs/save.txt").exists()  # refused before anything ran


def test_run_id_with_a_path_is_refused(tmp_path, capsys):
    status, err = run_main(tiny_args(tmp_path, "../x"), capsys)
    assert status == 2 and err == [
        "train_gpt.py: error: --run-id '../x' must be a plain file name (no '/', no '..', not starting with '.'); "
        "choose the folder with --log-dir"]
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--muon-lr", "-0.05", "--muon-lr must be a positive number, got -0.05"),
    ("--adam-lr", "0", "--adam-lr must be a positive number, got 0.0"),
    ("--muon-momentum-start", "1", "--muon-momentum-start 1.0 must be in [0, 1)"),
    ("--adam-eps", "-1e-8", "--adam-eps must be a positive number, got -1e-08"),
    ("--muon-momentum", "1.5", "--muon-momentum 1.5 must be in [0, 1)"),
    ("--logit-div", "nan", "--logit-div must be a positive number, got nan"),
    ("--save-every", "-1", "--save-every -1 must be >= 0 (0: no checkpoints)"),
])
def test_hyperparameters_out_of_range_are_refused(flag, value, message):
    cfg = tg.parse_config(["--preset", "tiny", "--device", "cpu", f"{flag}={value}"])
    with pytest.raises(tg.ConfigError) as refused:
        tg.check_config(cfg, 1)
    assert str(refused.value) == message


def test_negative_lr_on_the_command_line_is_one_line(tmp_path, capsys):
    status, err = run_main(tiny_args(tmp_path, "hp", "--muon-lr=-0.05"), capsys)
    assert status == 2 and err == ["train_gpt.py: error: --muon-lr must be a positive number, got -0.05"]


# Issue 28: a report prints only settings a run takes, and the two reports print together


@pytest.mark.parametrize("report", ["--print-recipe", "--print-schedule"])
@pytest.mark.parametrize("flag, value, message", [("--muon-lr", "-1", "--muon-lr must be a positive number, got -1.0"),
                                                  ("--num-heads", "3", "--num-heads 3 x --head-dim 16 must equal --model-dim 96")])
def test_a_report_refuses_the_settings_a_run_refuses_before_it_prints(report, flag, value, message, capsys):
    assert tg.main(["--preset", "tiny", report, flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"train_gpt.py: error: {message}\n"


def test_print_recipe_and_print_schedule_together_print_both(capsys):
    assert tg.main(["--preset", "tiny", "--print-schedule", "--print-recipe"]) == 0
    captured = capsys.readouterr()
    recipe = tg.recipe_report(tg.parse_config(["--preset", "tiny"])).splitlines()
    lines = captured.out.splitlines()
    assert captured.err == "" and lines[: len(recipe)] == recipe  # the recipe first, whatever the flags' order
    assert [json.loads(line)["step"] for line in lines[len(recipe):]] == list(range(51))


# -----------------------------------------------------------------------------
# Data found relative to the repository


def test_running_from_another_folder_says_cd_not_download(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run_main(["--preset", "tiny", "--device", "cpu", "--log-dir", str(tmp_path / "logs"), "--run-id", "cwd"], capsys)
    assert status == 2 and err == [
        f"train_gpt.py: error: --val-files data/sample/sample_val_*.bin: folder 'data/sample' does not exist (cwd: {tmp_path}); "
        f"the files are in {REPO}: run from the repository folder (cd {REPO}) or pass --val-files "
        f"{REPO}/data/sample/sample_val_*.bin"]


# -----------------------------------------------------------------------------
# --compile keeps compile time off the training clock


def test_compile_always_warms_up_at_least_one_untimed_step():
    tiny = tg.parse_config(["--preset", "tiny"])
    assert tiny.warmup_steps == 0 and tg.untimed_warmup_steps(tiny) == 0
    assert tg.untimed_warmup_steps(tg.dataclasses.replace(tiny, compile=True)) == 1
    assert tg.untimed_warmup_steps(tg.dataclasses.replace(tiny, compile=True, warmup_steps=3)) == 3
    help_text = " ".join(run_trainer(["--help"]).stdout.split())
    assert "compiling always warms up >= 1 untimed step" in help_text
    for flag in ["--save-every", "--checkpoint-dir", "--resume"]:
        assert flag in help_text


# -----------------------------------------------------------------------------
# Disk full


class FullDisk(io.RawIOBase):
    """A file on a full disk: takes the first `room` bytes, then every write fails with ENOSPC."""

    def __init__(self, room: int):
        self.data, self.room = bytearray(), room

    def writable(self):
        return True

    def write(self, b):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(b[: self.room])
        self.data += taken
        self.room -= len(taken)
        return len(taken)

    def truncate(self, size=None):
        freed = len(self.data) - size
        del self.data[size:]
        self.room += freed
        return size

    def seek(self, pos, whence=0):
        return pos


def test_logger_on_a_full_disk_cuts_the_partial_line_and_ends_with_stopping(tmp_path):
    logger = tg.Logger(str(tmp_path / "run.txt"), echo=False)
    logger.file.close()
    logger.file = FullDisk(room=len("step:1/9 ok\n") + 25)
    logger.log("step:1/9 ok")
    with pytest.raises(tg.DiskFullError, match=r"^disk full writing the log .*run.txt: free space on that disk"):
        logger.log("step:2/9 a longer line that does not fit on the disk")
    # The cut line is gone, which freed room for the stopping line; later lines and close() raise nothing.
    assert logger.file.data.decode() == "step:1/9 ok\nstopping: disk full\n"
    logger.log("step:3/9 ignored")
    logger.close()


def test_logger_on_dev_full_raises_one_disk_full_error(tmp_path):
    logger = tg.Logger(str(tmp_path / "run.txt"), echo=False)
    logger.file.close()
    logger.file = open("/dev/full", "wb", buffering=0)  # every write: ENOSPC
    with pytest.raises(tg.DiskFullError, match="disk full writing the log"):
        logger.log("step:1/9")
    logger.close()


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    tg.write_atomically({"step": 1}, str(path), "checkpoint")
    monkeypatch.setattr(tg.os, "fdopen", lambda fd, mode: (os.close(fd), FullDisk(room=0))[1])
    with pytest.raises(tg.DiskFullError, match=r"^disk full writing checkpoint: free space on that disk"):
        tg.write_atomically({"step": 2}, str(path), "checkpoint")
    assert torch.load(path)["step"] == 1  # the old checkpoint is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # and no temp file is left behind


def test_disk_full_mid_run_stops_with_one_line(tmp_path, capsys, monkeypatch):
    write = tg.Logger._write

    def fill_disk_at_step_2(self, data):
        if data.startswith(b"step:2/"):
            self.file.write(data[:7])  # the disk fills mid-line
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(tg.Logger, "_write", fill_disk_at_step_2)
    status, err = run_main(micro_args(tmp_path, "full", *micro_steps(4), "--val-every", "0"), capsys)
    log = tmp_path / "logs/full.txt"
    assert status == 1 and err == [
        f"train_gpt.py: error: stopped at step 1: disk full writing the log {log}: free space on that disk, or write it "
        "elsewhere; no checkpoint was written (--save-every N keeps one)"]
    lines = log.read_text().splitlines()
    assert lines[-2].startswith("step:1/4 train_time:") and lines[-1] == "stopping: disk full"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() put back the handler it found


# -----------------------------------------------------------------------------
# SIGTERM


def test_sigterm_stops_like_ctrl_c_with_a_stopping_line(tmp_path):
    args = micro_args(tmp_path, "term", *micro_steps(500), "--val-every", "0", "--save-every", "2")
    log = tmp_path / "logs/term.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "\ncheckpoint: " in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    stopping = last_line(log)
    assert stopping.startswith("stopping: SIGTERM at step ")
    step = int(stopping.rsplit(" ", 1)[1])
    assert step >= 2 and f"step:{step}/500 train_time" in log.read_text()
    assert err.strip().splitlines() == [
        f"train_gpt.py: error: stopped by SIGTERM at step {step}; resume with --resume {tmp_path / 'ck/term.pt'}"]


# -----------------------------------------------------------------------------
# Data use: passes and the share of the tokens read that the packed sequences use


def long_documents(tmp_path: Path, doc_len: int = 5000, docs: int = 6) -> str:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, doc_len * docs)
    tokens[::doc_len] = tg.EOT_TOKEN
    return str(write_shard(tmp_path / "long_train_000001.bin", tokens))


def test_long_documents_cut_to_the_stages_length_say_so_in_the_data_line(tmp_path):
    cfg = tg.parse_config(["--preset", "tiny"])  # stage 0: 2 sequences of 256 tokens, documents cut at 128
    loader = tg.make_train_loader(cfg, [long_documents(tmp_path)], 0, 1, torch.device("cpu"))
    assert loader.usage_line() == "data: no training step ran (30000 training tokens)"  # no share from zero steps
    loader.batch_for(tg.schedule_at(0, cfg))  # each sequence of 257 tokens: 3 documents' first 128, 128 and 1 tokens
    assert loader.tokens_read() == 6 * 5000 and loader.passes_done() == 1.0
    assert loader.usage_line() == ("data: 1.000 passes over the training data (30000 tokens); sequences used 1.7% of "
                                   "the tokens read (each stage cuts documents to its --stage-max-doc-len)")
    loader.close()


# -----------------------------------------------------------------------------
# Checkpoint and resume: bit-identical to a run that never stopped


@pytest.mark.parametrize("nproc", [1, 2])
def test_resumed_run_is_bit_identical_to_an_unbroken_one(tmp_path, nproc):
    # The record's structure on a schedule of 4 stages in 8 steps: the checkpoint at step 6 lies after the split
    # (step 5) and before the extension; the bf16 masters, moments and the loader's place must all come back.
    steps = [*micro_steps(8), "--val-every", "4"]
    whole = run_trainer(micro_args(tmp_path, "whole", *steps, "--save-every", "3", "--save-model", str(tmp_path / "whole.pt")),
                        nproc=nproc)
    assert whole.returncode == 0, whole.stderr[-2000:]
    checkpoint = tmp_path / "ck/whole.pt"  # written at step 6 (and 3): it replaced the one of step 3
    assert torch.load(checkpoint, weights_only=True)["step"] == 6
    resumed = run_trainer(micro_args(tmp_path, "resumed", *steps, "--resume", str(checkpoint),
                                     "--save-model", str(tmp_path / "resumed.pt")), nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole_log, resumed_log = (tmp_path / "logs/whole.txt").read_text(), (tmp_path / "logs/resumed.txt").read_text()
    assert f"resumed: {checkpoint} at step 6 (train_time " in resumed_log
    final = [line for line in whole_log.splitlines() if line.startswith("step:8/8 val_loss:")]
    assert final and final[0].split()[1] in resumed_log  # the same val loss, to the last printed digit
    # The pass over the data ended in step 4 of the unbroken run, before the checkpoint: the count carried on.
    assert "data: pass 1 over the training data done at step 4" in whole_log
    assert [line for line in resumed_log.splitlines() if line.startswith("data: ")][-1] == \
        [line for line in whole_log.splitlines() if line.startswith("data: ")][-1]
    w1, w2 = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert parse_log_file(tmp_path / "logs/resumed.txt").final_val_loss == parse_log_file(tmp_path / "logs/whole.txt").final_val_loss


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path, micro_args(tmp_path, "x"))
    status, err = run_main(micro_args(tmp_path, "other", "--muon-lr", "0.1", "--resume", str(checkpoint)), capsys)
    assert status == 2 and err == [
        f"train_gpt.py: error: --resume {checkpoint}: settings differ from the checkpoint's (--muon-lr 0.023 -> 0.1); "
        "resume with the same settings"]


# -----------------------------------------------------------------------------
# Issue 21: every stop says why in the same line, resume checks what it must before anything is built


def test_a_run_whose_val_loss_turns_nan_ends_with_the_error_line_and_no_data_advice(tmp_path, capsys):
    # An absurd attention scale makes the very first validation NaN: the run stops there, before any step.
    status, err = run_main(micro_args(tmp_path, "nan", *micro_steps(4), "--attn-scale", "1e38"), capsys)
    assert status == 1 and err == ["train_gpt.py: error: stopped: non-finite val loss nan at step 0; "
                                   "no checkpoint was written (--save-every N keeps one)"]
    lines = (tmp_path / "logs/nan.txt").read_text().splitlines()
    assert "stopping: non-finite val loss nan at step 0" in lines
    data = [line for line in lines if line.startswith("data: ")]
    assert data == ["data: no training step ran (1500 training tokens)"]  # no share of tokens from zero steps


def main_with_stderr_in_stdout(argv, monkeypatch) -> tuple:
    """main() in this process with stdout and stderr into one stream, as `2>&1` shows them: (status, lines)."""
    both = io.StringIO()
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    status = tg.main(argv)
    monkeypatch.undo()
    return status, both.getvalue().splitlines()


@pytest.mark.parametrize("case", ["resume settings", "missing train files"])
def test_a_run_refused_before_its_first_step_writes_no_log_and_ends_on_its_error(tmp_path, monkeypatch, case):
    # Issue 28: such a refusal wrote the 199 KB log (the source, the versions, the recipe), labelled "data error"
    # for a settings change, and printed the log's path after the error line.
    args = micro_args(tmp_path, "refused")
    if case == "resume settings":
        args += ["--muon-lr", "0.1", "--resume", str(fake_checkpoint(tmp_path, micro_args(tmp_path, "x")))]
        error = "settings differ from the checkpoint's (--muon-lr 0.023 -> 0.1)"
    else:
        args += ["--train-files", str(tmp_path / "none_*.bin")]
        error = f"--train-files {tmp_path / 'none_*.bin'}: no file matches"
    status, lines = main_with_stderr_in_stdout(args, monkeypatch)
    assert status == 2 and lines[-1].startswith("train_gpt.py: error: ") and error in lines[-1]
    assert [line.split(":")[0] for line in lines[:-1]] == ["schedule", "stages"]  # what it would have run, no "log:"
    assert not (tmp_path / "logs").exists() or not os.listdir(tmp_path / "logs")


def test_a_run_that_stops_after_it_started_prints_its_log_then_the_error(tmp_path, monkeypatch):
    status, lines = main_with_stderr_in_stdout(micro_args(tmp_path, "nan", *micro_steps(4), "--attn-scale", "1e38"), monkeypatch)
    assert status == 1 and lines[-2:] == [f"log: {tmp_path / 'logs/nan.txt'}",
                                          "train_gpt.py: error: stopped: non-finite val loss nan at step 0; "
                                          "no checkpoint was written (--save-every N keeps one)"]


def fake_checkpoint(tmp_path: Path, args: list) -> Path:
    path = tmp_path / "fake.pt"
    torch.save({"config": tg.config_json(tg.parse_config(args)), "step": 2, "model": {}, "optimizer": {}}, path)
    return path


@pytest.mark.parametrize("flag, value, change", [("--seed", "1", "--seed 0 -> 1"),
                                                 ("--val-files", "other_val_*.bin", "--val-files ")])
def test_resume_with_another_seed_or_val_files_is_refused(tmp_path, capsys, flag, value, change):
    checkpoint = fake_checkpoint(tmp_path, micro_args(tmp_path, "x"))
    status, err = run_main(micro_args(tmp_path, "other", flag, value, "--resume", str(checkpoint)), capsys)
    assert status == 2 and len(err) == 1 and f"settings differ from the checkpoint's ({change}" in err[0]


def test_resume_settings_are_checked_before_the_model_or_the_data_is_built(tmp_path, capsys, monkeypatch):
    # A tiny checkpoint resumed under the record preset on a CPU: refused at once, not killed for memory later.
    checkpoint = fake_checkpoint(tmp_path, micro_args(tmp_path, "x"))
    for name in ("build_model", "load_val_tokens", "make_train_loader"):
        monkeypatch.setattr(tg, name, lambda *args, name=name, **kwargs: pytest.fail(f"{name} ran before the check"))
    status, err = run_main(["--device", "cpu", "--log-dir", str(tmp_path / "logs"), "--run-id", "big",
                            "--resume", str(checkpoint)], capsys)
    assert status == 2 and len(err) == 1 and "settings differ from the checkpoint's (" in err[0]
    assert "--num-layers 2 -> 11" in err[0]


@pytest.mark.parametrize("content, what", [(b"\x00garbage" * 40, "not a torch checkpoint"),
                                           (None, "a truncated or damaged torch file")])
def test_resume_from_a_garbage_or_truncated_file_is_one_short_line_of_ours(tmp_path, capsys, content, what):
    path = tmp_path / "bad.pt"
    if content is None:  # the first half of a real torch file
        torch.save({"config": "{}", "weights": torch.zeros(1000)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    status, err = run_main(micro_args(tmp_path, "bad", "--resume", str(path)), capsys)
    assert status == 2 and len(err) == 1
    assert err[0] == f"train_gpt.py: error: --resume {path}: {what}" + (
        " (truncated, or another kind of file)" if what.startswith("not") else "") + "; pass a checkpoint written by --save-every"
    assert "weights_only" not in err[0] and len(err[0]) < 150 + len(str(path))


def test_ctrl_c_says_ctrl_c_and_run_id_help_names_its_default_once():
    assert tg.stopped_by_signal(KeyboardInterrupt(), tg.Logger(None), tg.RunProgress(step=7)) == (
        130, "stopped by Ctrl-C at step 7; no checkpoint was written (--save-every N keeps one)")
    help_text = " ".join(tg.build_arg_parser().format_help().split())
    assert "--run-id STR log name under --log-dir (default: a random uuid) --log-dir" in help_text
