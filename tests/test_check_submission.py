"""Tests of records/check_submission.py (the rules of a record), the rules in leaderboard.py, and the CI files.

Record folders come from tests/submission_fixtures.py: one that passes every rule, and for each rule
a copy with exactly that rule broken, which must fail with that rule's own line.
"""

import filecmp
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from records import check_submission, leaderboard  # noqa: E402
from submission_fixtures import (A100, MEDIUM_LOSSES, MEDIUM_TIMES_MS, SCRIPT, STEPS_CONFIG, STEPS_LOSSES,  # noqa: E402
                                 TIMES_MS, make_log, make_medium_log, make_medium_submission, make_refused_log,
                                 make_steps_log, make_steps_submission, make_submission, write)

PASSING = REPO / "tests" / "fixtures" / "submissions" / "track_1_short" / "2026-11-24_Example"
README_TEMPLATE = f"# Records\n\n{leaderboard.START_MARKER}\nold table\n{leaderboard.END_MARKER}\n"


def run_check(capsys, folder):
    """check_submission.main on folder: (exit code, {rule: (status, figure)}, stdout lines)."""
    code = check_submission.main([str(folder)])
    lines = capsys.readouterr().out.splitlines()
    results = {}
    for line in lines:
        status, _, rest = line.partition("  ")
        if status in ("PASS", "FAIL"):
            rule, _, figure = rest.partition(": ")
            results[rule] = (status, figure)
    return code, results, lines


def failed(results):
    return {rule for rule, (status, _) in results.items() if status == "FAIL"}


# ----------------------------------------------------------------------------- the passing fixture

def test_passing_fixture_passes_every_rule_with_its_figures(capsys):
    code, results, lines = run_check(capsys, PASSING)
    assert code == 0, "\n".join(lines)
    assert list(results) == [name for name, _ in check_submission.RULES]
    assert failed(results) == set()
    assert lines[-1] == f"OK: all {len(check_submission.RULES)} rules pass"
    # Hand-computed figures: losses 3.2768, 3.2772, 3.2770 -> mean 3.2770, std 0.0002,
    # t = -0.003 / (0.0002 / sqrt 3) with df = 2, p = 1/2 + t / (2 sqrt(t^2 + 2)).
    t = -0.003 / (0.0002 / math.sqrt(3))
    p = 0.5 + t / (2 * math.sqrt(t * t + 2))
    assert results["statistics"][1].startswith(f"mean val loss 3.2770 over n=3, p={p:.4f}")
    assert results["hardware"][1] == "8 x NVIDIA H100 80GB HBM3 (track_1_short needs 8 x H100 80GB)"
    assert "claimed 150.25 s = mean official time 150.250 s of 3 logs" in results["claimed time"][1]
    assert "-10.050 s (-6.27%)" in results["speed"][1]  # 150.25 - 160.30 s
    assert "40 sequences of 262,144" in results["val sequences"][1]
    assert results["source runs"][1].startswith("`train_gpt.py --help` exits 0 (usage: train_gpt.py")


def test_committed_fixture_matches_the_generator(tmp_path):
    made = make_submission(tmp_path)
    compared = filecmp.dircmp(made, PASSING)
    assert not compared.left_only and not compared.right_only and not compared.diff_files
    base = filecmp.dircmp(made / "baseline", PASSING / "baseline")
    assert not base.left_only and not base.right_only and not base.diff_files


# ----------------------------------------------------------------------------- one broken rule at a time

BROKEN = {
    "folder name": (dict(name="MyRecord", meta={"date": "2026-11-24"}), {"folder"}, "'MyRecord' is not YYYY-MM-DD_ShortName"),
    "date differs": (dict(meta={"date": "2026-11-25"}), {"record.json"}, "folder date differs from record.json date 2026-11-25"),
    "no contributors": (dict(meta={"contributors": None}), {"record.json"}, "'contributors' must be a non-empty list"),
    "cut-off log": (dict(extra_logs={"run3.txt": make_log(crash_at=12)}), {"logs"},
                    "run3.txt: incomplete (last step 12/20) without a stopping: line"),
    "two sources": (dict(extra_logs={"run3.txt": make_log(SCRIPT + "# tweaked\n", 3.2770, 150_250)}), {"one source"},
                    "2 different sources"),
    "script differs": (dict(script=SCRIPT + "# edited after the runs\n"), {"one source"},
                       "differs from the folder's train_gpt.py"),
    "no script": (dict(with_script=False), {"one source"}, "the folder has no train_gpt.py"),
    "source fails": (dict(source="import module_that_does_not_exist_xyz\n" + SCRIPT), {"source runs"},
                     "exits 1: ModuleNotFoundError"),
    "edu shards": (dict(config={"train_files": "data/finewebedu10B/finewebedu_train_*.bin"}), {"data shards"},
                   "train_files 'data/finewebedu10B/finewebedu_train_*.bin'"),
    "fewer val tokens": (dict(config={"val_tokens": 5_242_880}), {"val tokens"}, "run0.txt: 5242880"),
    "short val sequences": (dict(config={"val_seq_len": 32_768}), {"val sequences"}, "run0.txt: val_seq_len 32768"),
    "PCIe GPUs": (dict(gpu="NVIDIA H100 PCIe"), {"hardware"}, "8 x NVIDIA H100 PCIe (track_1_short needs 8 x H100 80GB)"),
    "4 GPUs": (dict(world_size=4), {"hardware"}, "4 x NVIDIA H100 80GB HBM3 (track_1_short needs"),
    "baseline on A100": (dict(baseline_gpu="NVIDIA A100-SXM4-80GB"), {"baseline hardware"},
                         "3 baseline logs on 8 x NVIDIA A100-SXM4-80GB; record logs on 8 x NVIDIA H100 80GB HBM3"),
    "no baseline": (dict(baseline_times_ms=()), {"baseline hardware", "speed"}, "no complete baseline logs in baseline/"),
    "p too large": (dict(losses=(3.2790, 3.2770, 3.2800)), {"statistics"}, "mean val loss 3.2787 over n=3, p="),
    "one run": (dict(losses=(3.2700,), times_ms=(150_250,)), {"statistics"}, "1 complete run(s): the t-test needs at least 2"),
    "time claimed too low": (dict(claimed="150.10"), {"claimed time"}, "claimed 150.10 s != mean official time 150.250 s"),
    "time without decimals": (dict(claimed="150"), {"claimed time"}, "time_s 150: write 1 to 3 decimals"),
    "compile mode": (dict(source=SCRIPT.replace("dynamic=False", 'mode="max-autotune"')), {"compiler options"},
                     "torch.compile(... mode)"),
    "inductor config": (dict(source=SCRIPT.replace("    return torch.compile(",
                                                   "    torch._inductor.config.coordinate_descent_tuning = True\n"
                                                   "    return torch.compile(")),
                        {"compiler options"}, "sets torch._inductor.config.coordinate_descent_tuning"),
    "copied log": (dict(extra_logs={"run3.txt": make_log(SCRIPT, 3.2772, TIMES_MS[1])}), {"distinct runs"},  # = run1.txt
                   "run3.txt repeats run1.txt (same content): a run counts once: remove the copies"),
    "record log copied into baseline/": (dict(extra_logs={"baseline/base3.txt": make_log(SCRIPT, 3.2772, TIMES_MS[1])}),
                                         {"distinct runs"}, "baseline/base3.txt repeats run1.txt (same content)"),
    "a run id twice": (dict(extra_logs={"crashed/run4.txt": make_log(crash_at=3, config={"run_id": "r1"}),
                                        "run5.txt": make_log(SCRIPT, 3.2771, 150_250, config={"run_id": "r1"})}),
                       {"distinct runs"}, "crashed/run4.txt repeats run5.txt (same run id r1)"),
    "a track-3 log": (dict(extra_logs={"crashed/run3.txt": make_steps_log(stopping=500)}), {"track"},
                      "crashed/run3.txt: track_3_optimization: logs of another track's trainer (track_1_short needs its own"),
    "slower than baseline": (dict(baseline_times_ms=(140_000, 140_500, 141_000)), {"speed"},
                             "mean 150.250 s vs baseline 140.500 s: +9.750 s (+6.94%)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_rule_fails_with_its_own_line(tmp_path, capsys, case):
    kwargs, rules, figure = BROKEN[case]
    folder = make_submission(tmp_path, **kwargs)
    code, results, lines = run_check(capsys, folder)
    assert code == 1
    assert failed(results) == rules, "\n".join(lines)
    first = sorted(rules, key=[name for name, _ in check_submission.RULES].index)[0]
    assert figure in results[first][1], results[first][1]
    assert lines[-1].startswith(f"FAILED: {len(rules)} of {len(check_submission.RULES)} rules")


def test_stopped_run_is_listed_not_counted_and_crashed_folder_is_reported(tmp_path, capsys):
    folder = make_submission(tmp_path, extra_logs={"run3.txt": make_log(stopping=7),
                                                   "crashed/run4.txt": make_log(crash_at=3)})
    code, results, lines = run_check(capsys, folder)
    assert code == 0, "\n".join(lines)
    assert results["logs"][1] == "4 logs parsed, 3 complete, 1 stopped (listed, not counted), 1 in crashed/ (not counted)"
    assert "over n=3" in results["statistics"][1]


def test_log_without_a_step_line_is_skipped_with_one_note(tmp_path, capsys):
    """A run refused before its first step (with another config) is no run: named once, counted nowhere."""
    folder = make_submission(tmp_path, extra_logs={"refused.txt": make_refused_log(config={"val_tokens": 8192}),
                                                   "baseline/refused.txt": make_refused_log()})
    code, results, lines = run_check(capsys, folder)
    assert code == 0, "\n".join(lines)
    assert lines[1] == (f"note: {folder}: skipped 2 log(s) without a step line (refused.txt, baseline/refused.txt): "
                        "a run that stops before its first step (a config or data error: see its stopping: line) "
                        "has nothing to count")
    assert results["logs"][1] == "3 logs parsed, 3 complete"


def test_a_log_cut_inside_its_source_is_noted_by_the_check_and_the_leaderboard(tmp_path, capsys):
    """Issue 28: such a file was left out silently; every file left out is named."""
    text = make_log(final_loss=3.2900)
    cut = text[:text.index("def main")]
    folder = make_submission(tmp_path, extra_logs={"run3.txt": cut, "crashed/run4.txt": cut})
    code, results, lines = run_check(capsys, folder)
    assert code == 0, "\n".join(lines)
    assert lines[1] == (f"note: {folder}: skipped 2 .txt/.log file(s) that are not logs (run3.txt, crashed/run4.txt): no "
                        "line of 100 '=' and no step line: a log cut inside its embedded source (use the whole log, or "
                        "move a crashed run's log to crashed/), or a file that is no log")
    write(tmp_path / "README.md", README_TEMPLATE)
    assert leaderboard.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "note: " + lines[1][len("note: "):]


def test_log_without_header_lines_is_not_parsed(tmp_path, capsys):
    text = "".join(line for line in make_log().splitlines(keepends=True) if not line.startswith(("config:", "gpu:")))
    folder = make_submission(tmp_path, extra_logs={"run3.txt": text})
    code, results, _ = run_check(capsys, folder)
    assert code == 1
    assert results["logs"] == ("FAIL", "run3.txt: not parsed (no config)")  # the GPU comes from nvidia-smi
    assert "run3.txt: train_files None" in results["data shards"][1]


def test_unknown_track_fails_the_folder_and_the_track_rules(tmp_path, capsys):
    folder = make_submission(tmp_path, track="track_9_laptop")
    code, results, _ = run_check(capsys, folder)
    assert code == 1
    assert results["folder"] == ("FAIL", "parent 'track_9_laptop' is not a track (track_1_short, track_2_medium, "
                                 "track_3_optimization)")
    assert results["hardware"] == ("FAIL", "unknown track 'track_9_laptop' (known: track_1_short, track_2_medium, "
                                   "track_3_optimization)")


@pytest.mark.parametrize("text, mean, ok", [
    ("150.25", 150.25, True), ("150.25", 150.2549, True), ("150.25", 150.2551, False),
    ("150.3", 150.26, True), ("150.3", 150.24, False), ("150.250", 150.2504, True), ("150.250", 150.2506, False),
    ("150.26", 150.25, False), ("150", 150.0, False), ("150.2500", 150.25, False),
])
def test_claimed_time_is_the_mean_rounded_to_the_written_decimals(text, mean, ok):
    assert check_submission.claimed_time_matches(text, mean)[0] is ok


# ----------------------------------------------------------------------------- rule 5: compiler options

@pytest.mark.parametrize("source, expected", [
    ("import torch\nm = torch.compile(f, mode='max-autotune')\n", "line 2: torch.compile(... mode)"),
    ("import torch\nm = torch.compile(f, options={'triton.cudagraphs': True})\n", "line 2: torch.compile(... options)"),
    ("import torch\nm = torch.compile(f, backend='cudagraphs', dynamic=False)\n", "line 2: torch.compile(... backend)"),
    ("import torch\nm = torch.compile(f, False, False)\n", "line 2: torch.compile(... positional options)"),
    ("import torch\nkw = {}\nm = torch.compile(f, **kw)\n", "line 3: torch.compile(... **)"),
    ("import torch\n@torch.compile(mode='reduce-overhead')\ndef f(x):\n    return x\n", "line 2: torch.compile(... mode)"),
    ("import torch\ntorch._inductor.config.max_autotune = True\n", "line 2: sets torch._inductor.config.max_autotune"),
    ("import torch\ntorch._dynamo.config.automatic_dynamic_shapes = False\n", "line 2: sets torch._dynamo.config.automatic_dynamic_shapes"),
    ("import torch\nc = torch._inductor.config\nc.max_autotune = True\n", "line 3: sets torch._inductor.config.max_autotune"),
    ("import torch._inductor.config as ic\nic.coordinate_descent_tuning = True\n",
     "line 2: sets torch._inductor.config.coordinate_descent_tuning"),
    ("from torch._inductor import config\nconfig.triton.unique_kernel_names = True\n",
     "line 2: sets torch._inductor.config.triton.unique_kernel_names"),
    ("import torch\nsetattr(torch._inductor.config, 'max_autotune', True)\n",
     "line 2: sets torch._inductor.config.max_autotune (setattr)"),
    ("import torch\nwith torch._inductor.config.patch(max_autotune=True):\n    pass\n",
     "line 2: sets torch._inductor.config.max_autotune (patch)"),
    # issue 28: every other way a script passes a compiler option or mode
    ("import torch\nmodel.compile(mode='max-autotune')\n", "line 2: model.compile(... mode)"),
    ("import torch\nself.model.compile(options={'max_autotune': True})\n", "line 2: self.model.compile(... options)"),
    ("import torch\ntorch.nn.Module.compile(model, options={'max_autotune': True})\n",
     "line 2: torch.nn.Module.compile(... options)"),
    ("from torch import nn\nnn.Module.compile(model, backend='eager')\n", "line 2: nn.Module.compile(... backend)"),
    ("import torch as t\nm = t.compile(f, mode='max-autotune')\n", "line 2: t.compile(... mode)"),
    ("from torch import compile as tc\nm = tc(f, mode='max-autotune')\n", "line 2: tc(... mode)"),
    ("import torch\nbuild = torch.compile\nm = build(f, mode='max-autotune')\n", "line 3: build(... mode)"),
    ("import torch\nm = torch.compiler.compile(f, mode='max-autotune')\n", "line 2: torch.compiler.compile(... mode)"),
    ("import functools, torch\nc = functools.partial(torch.compile, mode='max-autotune')\n",
     "line 2: partial(torch.compile, ... mode)"),
    ("import torch\ntorch._inductor.config.patch('max_autotune', True)\n", "line 2: sets torch._inductor.config.max_autotune (patch)"),
    ("import torch\ntorch._inductor.config.patch({'max_autotune': True})\n",
     "line 2: sets torch._inductor.config.max_autotune (patch)"),
    ("import torch\ntorch._inductor.config.load_config(saved)\n", "line 2: calls torch._inductor.config.load_config(...)"),
    ("import torch\ntorch.compiler.config.dynamic_sources = 'x'\n", "line 2: sets torch.compiler.config.dynamic_sources"),
    ("import importlib\nc = importlib.import_module('torch._inductor.config')\nc.max_autotune = True\n",
     "line 3: sets torch._inductor.config.max_autotune"),
    ("import torch\ntorch.compiler.set_stance('eager_on_recompile')\n", "line 2: calls torch.compiler.set_stance(...)"),
    ("import torch\nf = torch._dynamo.optimize('inductor')(f)\n", "line 2: calls torch._dynamo.optimize(...)"),
    ("import os\nos.environ.update(TORCHINDUCTOR_MAX_AUTOTUNE='1')\n",
     "line 2: names the compiler variable 'TORCHINDUCTOR_MAX_AUTOTUNE'"),
    ("import os\nos.environ[f'TORCHINDUCTOR_{name}'] = '1'\n", "line 2: names the compiler variable 'TORCHINDUCTOR_'"),
    ("import os\nos.environ['TORCHINDUCTOR_MAX_AUTOTUNE'] = '1'\n", "line 2: names the compiler variable 'TORCHINDUCTOR_MAX_AUTOTUNE'"),
    ("def f(:\n", "line 1: the source does not parse"),
])
def test_compiler_options_are_found(source, expected):
    found = check_submission.compiler_option_violations(source)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_allowed_compile_calls_and_unrelated_config_pass():
    source = ("import torch\nimport json\nconfig = {}\nconfig['mode'] = 'fast'\n"
              "a = torch.compile(f)\nb = torch.compile(f, dynamic=False, fullgraph=True)\n"
              "torch.backends.cuda.matmul.allow_tf32 = True\nprint('TORCHINDUCTOR is not a prefix here')\n"
              "import re\npattern = re.compile(r'step:(\\d+)', flags=re.I)\n"  # not a torch compile
              "code = compile('1 + 1', '<x>', mode='eval')\n"  # the builtin
              "model.compile(dynamic=False)\nsaved = torch._inductor.config.get_config_copy()\n")
    assert check_submission.compiler_option_violations(source) == []
    assert check_submission.scan_compiler_use(source)[1] == 3  # a, b and model.compile


def test_raising_the_recompile_limit_is_the_one_allowed_setting():
    source = ("import torch\ntorch._dynamo.config.recompile_limit = 64\nd = torch._dynamo.config\n"
              "d.cache_size_limit = max(d.cache_size_limit, 64)\nm = torch.compile(f, recompile_limit=64)\n")
    assert check_submission.compiler_option_violations(source) == []


@pytest.mark.parametrize("track", ["track_1_short", "track_3_optimization"])
def test_module_compile_with_a_mode_fails_the_compiler_rule_on_every_track(tmp_path, capsys, track):
    """Issue 28: model.compile(mode=...) and Module.compile(options=...) in a logged script passed on both tracks."""
    source = SCRIPT.replace("return torch.compile(model, dynamic=False)",
                            "model.compile(mode='max-autotune')\n    torch.nn.Module.compile(model, options={'a': 1})\n"
                            "    return model")
    assert source != SCRIPT
    make = make_submission if track == "track_1_short" else make_steps_submission
    folder = make(tmp_path, source=source)
    code, results, _ = run_check(capsys, folder)
    line = next(n for n, text in enumerate(source.splitlines(), 1) if "model.compile(" in text)
    assert code == 1 and results["compiler options"] == (
        "FAIL", f"line {line}: model.compile(... mode); line {line + 1}: torch.nn.Module.compile(... options)")


def test_repository_trainer_breaks_no_compiler_rule():
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    assert check_submission.compiler_option_violations(source) == []


def test_real_trainer_source_imports_and_its_help_works(tmp_path):
    """The real train_gpt.py, embedded as the logger writes it: --help runs in a temporary folder."""
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    folder = make_submission(tmp_path, source=source)
    sub = check_submission.load_submission(str(folder))
    ok, figure = check_submission.rule_source_runs(sub)
    assert ok, figure
    assert "usage: train_gpt.py" in figure
    assert check_submission.rule_one_source(sub)[0]


# ----------------------------------------------------------------------------- command line

def test_command_line_exit_codes_and_no_traceback(tmp_path):
    script = [sys.executable, "records/check_submission.py"]
    done = subprocess.run(script + [str(PASSING)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("OK: all")
    missing = subprocess.run(script + [str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == f"check_submission.py: error: {tmp_path / 'nope'}: no such folder\n"
    no_args = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert no_args.returncode == 2 and no_args.stderr.count("\n") == 1 and "required: folder" in no_args.stderr
    a_file = subprocess.run(script + ["README.md"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert a_file.returncode == 2 and a_file.stderr == "check_submission.py: error: README.md: not a folder\n"
    broken = make_submission(tmp_path, claimed="999.00")
    (broken / "record.json").write_text("{not json")
    done = subprocess.run(script + [str(broken)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert "FAIL  record.json: record.json is not valid JSON" in done.stdout


# ----------------------------------------------------------------------------- leaderboard.py applies the rules

def test_leaderboard_refuses_records_that_break_the_rules(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    make_submission(tmp_path, "2026-11-24_Good")
    # The record issue 11 reported: a CPU run with p = 0.9999.
    make_submission(tmp_path, "2026-11-25_CpuTest", gpu="cpu", world_size=1, losses=(3.3005, 3.3010, 3.3015),
                    baseline_times_ms=())
    make_submission(tmp_path, "2026-11-26_EduData", config={"train_files": "data/finewebedu10B/finewebedu_train_*.bin"})
    assert leaderboard.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    refused = [line for line in err if line.startswith("refused: ")]
    assert len(refused) == 2
    cpu = next(line for line in refused if "2026-11-25_CpuTest" in line)
    assert "hardware: 1 x cpu (track_1_short needs 8 x H100 80GB)" in cpu
    # t = 0.021 / (0.0005 / sqrt 3) with df = 2: p = 1/2 + t / (2 sqrt(t^2 + 2)) = 0.99991.
    t = 0.021 / (0.0005 / math.sqrt(3))
    assert f"statistics: mean val loss 3.3010 over n=3, p={0.5 + t / (2 * math.sqrt(t * t + 2)):.4f}" in cpu
    assert "p=0.9999" in cpu
    edu = next(line for line in refused if "2026-11-26_EduData" in line)
    assert "data shards:" in edu and "hardware" not in edu and "statistics" not in edu
    assert readme.read_text() == README_TEMPLATE  # nothing published
    assert leaderboard.main(["--root", str(tmp_path), "--check"]) == 1


def test_leaderboard_publishes_a_record_that_keeps_the_rules(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    make_submission(tmp_path, "2026-11-24_Good")
    assert leaderboard.main(["--root", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "| 1 | 2026-11-24 | 150.25 s | 3.2770 (n=3, p=" in readme.read_text()


def test_leaderboard_refuses_a_record_with_a_copied_log_and_notes_a_refused_one(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    folder = make_submission(tmp_path, "2026-11-24_Copied", extra_logs={"run3.txt": make_log(SCRIPT, 3.2772, TIMES_MS[1]),
                                                                       "refused.txt": make_refused_log()})
    assert leaderboard.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"note: {folder}: skipped 1 log(s) without a step line (refused.txt): a run that stops before "
                      "its first step (a config or data error: see its stopping: line) has nothing to count")
    assert err[1] == (f"refused: {folder}: distinct runs: run3.txt repeats run1.txt (same content): a run counts once: "
                      "remove the copies")
    assert readme.read_text() == README_TEMPLATE


def test_leaderboard_and_check_share_the_rule_functions():
    assert set(check_submission.LEADERBOARD_RULES) <= set(check_submission.RULE_FUNCTIONS)
    assert {"hardware", "statistics", "data shards", "val tokens", "val sequences"} <= set(check_submission.LEADERBOARD_RULES)
    assert leaderboard.check_submission is check_submission


# ----------------------------------------------------------------------------- the steps track (track_3_optimization)

STEPS_RULES = [name for name, _ in check_submission.STEPS_TRACK_RULES]
# a main-trainer log with the benchmark's model and batch: only its missing track: line gives it away
STEPS_CONFIG_FOR_MAIN = {key: value for key, value in STEPS_CONFIG.items() if key != "train_steps"}


def test_steps_track_submission_passes_its_rules_with_their_figures(tmp_path, capsys):
    code, results, lines = run_check(capsys, make_steps_submission(tmp_path))
    assert code == 0, "\n".join(lines)
    assert list(results) == STEPS_RULES
    assert {"baseline hardware", "claimed time", "speed"}.isdisjoint(results)  # no clock in a steps track
    assert STEPS_RULES.index("fixed model") < STEPS_RULES.index("stopping step") < STEPS_RULES.index("statistics")
    # 3.2770, 3.2778, 3.2772, 3.2776: mean 3.2774, z = (3.28 - 3.2774) * sqrt(4) = 0.0052
    assert results["statistics"][1].startswith("mean val loss 3.27740 at step 3250 over n=4: z = 0.00520")
    assert results["stopping step"][1] == "every run trained 3250 steps and is scored at step 3250"
    assert results["record.json"][1].startswith("date 2026-12-02 (= folder name), steps 3250,")
    assert "1, 2, 4 or 8 x one GPU model, an A100 or an H100" in results["hardware"][1]


def test_steps_track_may_score_every_run_at_one_earlier_step(tmp_path, capsys):
    """The public rule: validate every 25 steps near the end and take a step, the same for all runs."""
    folder = make_steps_submission(tmp_path, losses=(3.2700, 3.2710, 3.2705, 3.2705), claimed=3150)
    code, results, lines = run_check(capsys, folder)
    assert code == 0, "\n".join(lines)
    # each run is 0.0045 higher 100 steps earlier: mean 3.2705 + 0.0045 = 3.2750, z = 0.005 * 2 = 0.01
    assert results["statistics"][1].startswith("mean val loss 3.27500 at step 3150 over n=4: z = 0.01000")
    assert results["stopping step"][1].endswith("scored at step 3150 (an earlier step, the same for every run)")


BROKEN_STEPS = {
    "runs stopped at different steps": (dict(extra_logs={"run4.txt": make_steps_log(final_loss=3.2770, steps=3200)}),
                                        {"stopping step"}, "runs stopped at different steps (3250 steps: run0.txt"),
    "a run stopped on its val loss": (dict(extra_logs={"run4.txt": make_steps_log(stopping=3200)}), {"stopping step"},
                                      "run4.txt ended at step 3200/3250 (val loss below 3.28 at step 3200): a run may not stop"),
    "claimed step not validated": (dict(claimed=3240), {"stopping step", "statistics"},
                                   "claimed step 3240: no val loss there in run0.txt, run1.txt, run2.txt and 1 more"),
    "z-rule fails": (dict(losses=(3.2790, 3.2785, 3.2780, 3.2785)), {"statistics"},
                     "mean val loss 3.27850 at step 3250 over n=4: z = 0.00300"),
    "two GPU models": (dict(extra_logs={"run4.txt": make_steps_log(gpu=A100, world_size=4)}), {"hardware"},
                       "8 x NVIDIA H100 80GB HBM3, 4 x NVIDIA A100-SXM4-80GB"),
    "3 GPUs": (dict(world_size=3), {"hardware"}, "3 x NVIDIA H100 80GB HBM3"),
    # issue 28: a copied log counted n = 4 in the z-rule on this track, while track 1 caught it
    "a copied log": (dict(losses=STEPS_LOSSES[:3], extra_logs={"run3.txt": make_steps_log(
        final_loss=STEPS_LOSSES[0], config={"seed": 0, "run_id": "run0"})}), {"distinct runs"},
                     "run3.txt repeats run0.txt (same content): a run counts once: remove the copies"),
    "a main-trainer log": (dict(extra_logs={"run4.txt": make_log(config=STEPS_CONFIG_FOR_MAIN)}), {"track", "stopping step"},
                           "run4.txt: track_1_short: logs of another track's trainer (track_3_optimization needs"),
    "a wider model": (dict(config={"model_dim": 1024}), {"fixed model"}, "run0.txt: model_dim 1024"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STEPS))
def test_each_broken_steps_rule_fails_with_its_own_line(tmp_path, capsys, case):
    kwargs, rules, figure = BROKEN_STEPS[case]
    code, results, lines = run_check(capsys, make_steps_submission(tmp_path, **kwargs))
    assert code == 1
    assert failed(results) == rules, "\n".join(lines)
    first = sorted(rules, key=STEPS_RULES.index)[0]
    assert figure in results[first][1], results[first][1]


def test_a_copy_counts_once_in_the_steps_statistics(tmp_path, capsys):
    """The z-rule scores the three runs, not the copy: mean of 3.2770, 3.2778, 3.2772 = 3.2773, z = 0.0027 * sqrt 3."""
    copy = make_steps_log(final_loss=STEPS_LOSSES[0], config={"seed": 0, "run_id": "run0"})
    code, results, _ = run_check(capsys, make_steps_submission(tmp_path, losses=STEPS_LOSSES[:3], extra_logs={"run3.txt": copy}))
    assert code == 1 and failed(results) == {"distinct runs"}
    assert results["statistics"][1].startswith(f"mean val loss 3.27733 at step 3250 over n=3: z = {0.0026667 * 3 ** 0.5:.5f}")


def test_the_copy_rule_is_one_rule_of_every_track_and_of_the_leaderboard():
    for track in check_submission.TRACKS.values():
        assert "distinct runs" in [name for name, _ in check_submission.rules_of(track)], track.name
    assert {"distinct runs", "track"} <= set(check_submission.LEADERBOARD_RULES)


def test_steps_record_json_claims_steps_not_time(tmp_path, capsys):
    folder = make_steps_submission(tmp_path)
    (folder / "record.json").write_text(json.dumps({"date": "2026-12-02", "time_s": 150.25, "description": "x",
                                                    "contributors": ["A"]}))
    code, results, _ = run_check(capsys, folder)
    assert code == 1 and failed(results) == {"record.json", "stopping step", "statistics"}
    assert results["record.json"][1] == "record.json: 'steps' must be a positive whole number of steps"


def test_track3_trainer_source_runs_and_sets_no_compiler_option():
    """The real records/track_3_optimization/train_gpt.py, as its logs embed it: --help in a temporary folder."""
    source = (REPO / "records" / "track_3_optimization" / "train_gpt.py").read_text(encoding="utf-8")
    assert check_submission.compiler_option_violations(source) == []
    ok, figure = check_submission.source_help(source)
    assert ok and figure.startswith("`train_gpt.py --help` exits 0 (usage: train_gpt.py"), figure

def test_leaderboard_publishes_a_steps_record_and_refuses_a_self_stopped_one(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    make_steps_submission(tmp_path, "2026-12-02_Good")
    assert leaderboard.main(["--root", str(tmp_path)]) == 0, capsys.readouterr().err
    text = readme.read_text()
    assert "### track_3_optimization" in text and "| 1 | 2026-12-02 | 3250 | 3.2774 (n=4, z=0.0052) |" in text
    make_steps_submission(tmp_path, "2026-12-03_Stopped", extra_logs={"run4.txt": make_steps_log(stopping=3200)})
    assert leaderboard.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "refused: " in err and "2026-12-03_Stopped: stopping step: run4.txt ended at step 3200/3250" in err


# ----------------------------------------------------------------------------- track 2 (track_2_medium)

COORDINATE_DESCENT = "    torch._inductor.config.coordinate_descent_tuning = True\n    return torch.compile("
MAX_AUTOTUNE = "    torch._inductor.config.max_autotune = True\n    return torch.compile("


def with_line(before):
    """SCRIPT with lines set in compile_model before its torch.compile call."""
    source = SCRIPT.replace("    return torch.compile(", before)
    assert source != SCRIPT
    return source


def line_of(source, text):
    return next(number for number, line in enumerate(source.splitlines(), 1) if text in line)


def test_medium_record_passes_the_rules_of_track_1_against_2_92(tmp_path, capsys):
    """Public record #18's figures: 2.9165 and 2.9166 over n = 2 give p = 0.0046 against 2.92 (the public README's
    scipy.stats.ttest_1samp(losses, 2.92, alternative="less")), 1041.071 and 1041.483 s, 1379.574 s before it."""
    code, results, lines = run_check(capsys, make_medium_submission(tmp_path))
    assert code == 0, "\n".join(lines)
    assert list(results) == [name for name, _ in check_submission.RULES]
    # t = (2.91655 - 2.92) / (0.0001 / sqrt 2 / sqrt 2) = -69 with df = 1 (Cauchy): p = 1/2 + atan(t) / pi
    mean, std = (2.9165 + 2.9166) / 2, 0.0001 / math.sqrt(2)
    p = 0.5 + math.atan((mean - 2.92) / (std / math.sqrt(2))) / math.pi
    assert f"{p:.4f}" == "0.0046"
    assert results["statistics"][1] == f"mean val loss {mean:.4f} over n=2, p={p:.4f} (needs mean <= 2.92 and p < 0.01)"
    assert results["track"][1] == "5 logs of track_2_medium's trainer"
    assert results["hardware"][1] == "8 x NVIDIA H100 80GB HBM3 (track_2_medium needs 8 x H100 80GB)"
    assert results["claimed time"][1] == "claimed 1041.28 s = mean official time 1041.277 s of 2 logs, rounded to 2 decimal(s)"
    assert results["speed"][1].startswith("mean 1041.277 s vs baseline 1379.574 s: -338.297 s (-24.52%)")


def test_medium_p_value_is_scipys():
    scipy_stats = pytest.importorskip("scipy.stats")
    from records import stats
    want = scipy_stats.ttest_1samp(MEDIUM_LOSSES, 2.92, alternative="less").pvalue
    assert stats.one_sided_p_below(MEDIUM_LOSSES, check_submission.TRACKS["track_2_medium"].target) == pytest.approx(want, rel=1e-12)


BROKEN_MEDIUM = {
    "mean above 2.92": (dict(losses=(2.9230, 2.9240)), {"statistics"},
                        "mean val loss 2.9235 over n=2, p=0.9548 (needs mean <= 2.92 and p < 0.01)"),  # 1/2 + atan(7) / pi
    "a track-1 result (3.28)": (dict(losses=(3.2768, 3.2772, 3.2770), times_ms=(1_041_000,) * 3), {"statistics"},
                                "mean val loss 3.2770 over n=3, p=1.0000 (needs mean <= 2.92"),
    "p too large": (dict(losses=(2.9150, 2.9195)), {"statistics"}, "mean val loss 2.9173 over n=2, p=0.2183"),  # t = -1.2222, df = 1
    "one run": (dict(losses=(2.9165,), times_ms=(1_041_071,)), {"statistics"},
                "1 complete run(s): the t-test needs at least 2 (needs mean <= 2.92 and p < 0.01)"),
    "max_autotune": (dict(source=with_line(MAX_AUTOTUNE)), {"compiler options"},
                     "sets torch._inductor.config.max_autotune"),
    "compile mode": (dict(source=SCRIPT.replace("dynamic=False", 'mode="max-autotune-no-cudagraphs"')),
                     {"compiler options"}, "torch.compile(... mode)"),
    "patch beyond the allowed key": (dict(source=with_line(
        "    torch._inductor.config.patch(coordinate_descent_tuning=True, epilogue_fusion=False)\n    return torch.compile(")),
        {"compiler options"}, "sets torch._inductor.config.epilogue_fusion (patch)"),
    "a copied log": (dict(extra_logs={"run2.txt": make_medium_log(SCRIPT, MEDIUM_LOSSES[1], MEDIUM_TIMES_MS[1],
                                                                  config={"seed": 1, "run_id": "run1"})}),
                     {"distinct runs"}, "run2.txt repeats run1.txt (same content): a run counts once: remove the copies"),
    "a main-trainer log": (dict(extra_logs={"crashed/run2.txt": make_medium_log(track=None)}), {"track"},
                           "crashed/run2.txt: track_1_short: logs of another track's trainer (track_2_medium needs"),
    "4 GPUs": (dict(world_size=4), {"hardware", "baseline hardware"}, "4 x NVIDIA H100 80GB HBM3 (track_2_medium needs 8 x H100 80GB)"),
    "short val sequences": (dict(config={"val_seq_len": 65_536}), {"val sequences"}, "run0.txt: val_seq_len 65536"),
    "slower than the baseline": (dict(baseline_times_ms=(1_000_000, 1_000_500)), {"speed"},
                                 "mean 1041.277 s vs baseline 1000.250 s"),
    "time claimed as the record's minutes": (dict(claimed="1041.3"), {"claimed time"}, None),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MEDIUM))
def test_each_broken_medium_rule_fails_with_its_own_line(tmp_path, capsys, case):
    kwargs, rules, figure = BROKEN_MEDIUM[case]
    code, results, lines = run_check(capsys, make_medium_submission(tmp_path, **kwargs))
    if figure is None:  # 1041.3 is the mean 1041.277 rounded to 1 decimal: a correct claim, the control case
        assert code == 0, "\n".join(lines)
        return
    assert code == 1
    assert failed(results) == rules, "\n".join(lines)
    first = sorted(rules, key=[name for name, _ in check_submission.RULES].index)[0]
    assert figure in results[first][1], results[first][1]


@pytest.mark.parametrize("way", [
    COORDINATE_DESCENT,
    "    import torch._inductor.config as inductor_config\n    inductor_config.coordinate_descent_tuning = True\n"
    "    return torch.compile(",
    "    torch._inductor.config.patch(coordinate_descent_tuning=True)\n    return torch.compile(",
    "    setattr(torch._inductor.config, 'coordinate_descent_tuning', True)\n    return torch.compile(",
    "    import os\n    os.environ['TORCHINDUCTOR_COORDINATE_DESCENT_TUNING'] = '1'\n    return torch.compile(",
])
def test_coordinate_descent_tuning_is_allowed_on_track_2_and_refused_on_the_others(tmp_path, capsys, way):
    """The public README: coordinate_descent_tuning is allowed for the GPT-2 medium track; rule 5 elsewhere."""
    source = with_line(way)
    code, results, lines = run_check(capsys, make_medium_submission(tmp_path / "t2", source=source))
    assert code == 0, "\n".join(lines)
    line = line_of(source, "coordinate_descent_tuning" if "COORDINATE" not in way else "COORDINATE")
    (use,) = check_submission.scan_compiler_use(source)[0]
    assert use.setting == "torch._inductor.config.coordinate_descent_tuning" and use.line == line
    assert results["compiler options"][1].endswith(f"; allowed: line {line} {use.text}")
    for make, track in ((make_submission, "track_1_short"), (make_steps_submission, "track_3_optimization")):
        code, results, _ = run_check(capsys, make(tmp_path / track, source=source))
        assert code == 1 and failed(results) == {"compiler options"}, track
        assert results["compiler options"][1] == f"line {line}: {use.text} (allowed on track_2_medium only)"


def test_track_2_trainer_source_runs_and_sets_no_other_compiler_option():
    """The real records/track_2_medium/train_gpt.py (written for issue 27), as its logs embed it."""
    path = REPO / "records" / "track_2_medium" / "train_gpt.py"
    if not path.is_file():
        pytest.skip("records/track_2_medium/train_gpt.py is not in this checkout")
    source = path.read_text(encoding="utf-8")
    assert 'TRACK = "track_2_medium"' in source  # the track: line its logs carry
    allowed = check_submission.TRACKS["track_2_medium"].allowed_compiler_settings
    assert check_submission.compiler_option_violations(source, allowed) == []
    ok, figure = check_submission.source_help(source)
    assert ok and figure.startswith("`train_gpt.py --help` exits 0 (usage: train_gpt.py"), figure


def test_leaderboard_has_a_medium_section_with_its_own_p_and_refuses_a_3_28_result(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    make_medium_submission(tmp_path, "2026-12-10_Good")
    assert leaderboard.main(["--root", str(tmp_path)]) == 0, capsys.readouterr().err
    text = readme.read_text()
    section = text[text.index("### track_2_medium"):text.index("### track_3_optimization")]
    assert "| 1 | 2026-12-10 | 1041.28 s | 2.9165 (n=2, p=0.0046) | 1041.28 s | Fixture: a faster medium run |" in section
    assert "(track_2_medium/2026-12-10_Good/)" in section
    make_medium_submission(tmp_path, "2026-12-11_Small", losses=(3.2768, 3.2772, 3.2770), times_ms=(1_000_000,) * 3)
    assert leaderboard.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "2026-12-11_Small: statistics: mean val loss 3.2770 over n=3, p=1.0000 (needs mean <= 2.92 and p < 0.01)" in err


# ----------------------------------------------------------------------------- CI files

WORKFLOWS = REPO / ".github" / "workflows"


def workflow_steps():
    """{workflow file: (triggers, [step dicts])} for every workflow."""
    found = {}
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        triggers = data.get("on", data.get(True))  # PyYAML reads a bare `on:` key as True
        steps = [step for job in data["jobs"].values() for step in job["steps"]]
        found[path.name] = (triggers, steps)
    return found


def test_workflows_parse_and_call_the_real_scripts():
    found = workflow_steps()
    assert found, "no workflow in .github/workflows"
    runs = [step.get("run", "") for _, steps in found.values() for step in steps]
    uses = [step.get("uses", "") for _, steps in found.values() for step in steps]
    assert any("bash .ci/run" in run for run in runs)
    assert any("python records/check_submission.py" in run for run in runs)
    assert any(u.startswith("actions/checkout@") for u in uses) and any(u.startswith("actions/setup-python@") for u in uses)
    for triggers, _ in found.values():
        assert "push" in triggers and "pull_request" in triggers
    for script in (".ci/run", "records/check_submission.py"):
        assert (REPO / script).is_file(), script


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_every_ci_job_installs_the_cpu_build_of_torch():
    """Issue 28: the tests job set no TORCH_INDEX_URL, so .ci/run pulled the multi-GB CUDA build from PyPI."""
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for job_name, job in data["jobs"].items():
            for step in job["steps"]:
                env = {**data.get("env", {}), **job.get("env", {}), **step.get("env", {})}
                run = step.get("run", "")
                if ".ci/run" in run:
                    assert env.get("TORCH_INDEX_URL") == CPU_INDEX, f"{path.name} {job_name}: .ci/run without the CPU index"
                for line in run.splitlines():
                    if "pip install" in line and " torch" in line:
                        index = line.split("--index-url", 1)[1].split()[0].strip('"') if "--index-url" in line else None
                        index = env.get("TORCH_INDEX_URL") if index == "$TORCH_INDEX_URL" else index
                        assert index == CPU_INDEX, f"{path.name} {job_name}: {line.strip()}"
    ci_run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert '--index-url "$TORCH_INDEX_URL"' in ci_run


def test_pull_request_template_has_the_record_checklist():
    template = (REPO / ".github" / "PULL_REQUEST_TEMPLATE" / "record.md").read_text(encoding="utf-8")
    boxes = [line for line in template.splitlines() if line.lstrip().startswith("- [ ]")]
    assert len(boxes) >= 6
    assert "python records/check_submission.py" in template and "baseline/" in template
    assert (REPO / "requirements-dev.txt").read_text().count("pyyaml") == 1
