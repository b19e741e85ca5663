"""Tests of the records tools: log parsing, statistics, compare.py and leaderboard.py.

Expected figures are worked out by hand (or from closed forms written out
here), never taken from the code under test.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` without `python -m` does not put the repo root on the path
    sys.path.insert(0, str(REPO))

from records import compare, leaderboard, runlog, stats  # noqa: E402
from submission_fixtures import make_medium_log, make_medium_submission, make_steps_log  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "records"
SEP = "=" * 100

# The source text of a generated log. It contains lines that would parse as
# step lines (even a final validation line) if the parser read the source.
SOURCE = (
    "import os\n"
    "print0(f'step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{ms:.0f}ms')\n"
    "step:100/100 val_loss:1.0000 train_time:1ms step_avg:0.01ms\n"
    "world_size: 1\n"
    "stopping: never, this is source code\n"
)


# ----------------------------------------------------------------------------- helpers

def make_log(final_loss=3.2790, total_ms=100_000.0, steps=100, val_every=50, source=SOURCE,
             world_size=8, gpu="NVIDIA H100 80GB HBM3", torch_version="2.11.0+cu130",
             crash_at=None, stopping=None, config=None):
    """Text of a log in our format: train time grows linearly to total_ms at the last step.

    crash_at=k ends the log after step k; stopping=k writes a `stopping:` line there.
    """
    config = config if config is not None else {"num_iterations": steps, "lr": 0.05}
    lines = [source + SEP,
             "Running Python 3.11.7 (main, Dec  8 2023, 18:56:58) [GCC 11.4.0]",
             f"Running PyTorch {torch_version} compiled for CUDA 13.0",
             "Running Triton version 3.6.0",
             "(nvidia-smi output)", SEP,
             f"world_size: {world_size}", "grad_accum_steps: 1", f"gpu: {gpu}",
             "config: " + json.dumps(config), "launch_to_first_step: 48.2s"]
    end = steps if crash_at is None and stopping is None else (crash_at or stopping)
    for step in range(0, end + 1):
        ms = total_ms * step / steps
        avg = f"{ms / step:.2f}ms" if step else "nanms"
        if step % val_every == 0 or step == steps:
            loss = final_loss if step == steps else 3.5 + 7.0 * (1 - step / steps)
            lines.append(f"step:{step}/{steps} val_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg}")
        elif step:
            lines.append(f"step:{step}/{steps} train_time:{ms:.0f}ms step_avg:{avg}")
    if stopping is not None:
        lines.append(f"stopping: non-finite loss nan at step {stopping}")
    if crash_at is None:
        lines += ["peak memory allocated: 34000 MiB reserved: 49700 MiB", "mfu: 41.2% (330 TFLOP/s per GPU of 800 peak)"]
    return "\n".join(lines) + "\n"


def write(path, text):
    """Write text to path, creating folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_group(folder, losses, times_s, **kw):
    """One log per (loss, time) pair in folder; returns the folder."""
    for index, (loss, seconds) in enumerate(zip(losses, times_s)):
        write(Path(folder) / f"run{index}.txt", make_log(final_loss=loss, total_ms=seconds * 1000.0, **kw))
    return Path(folder)


def run_compare(capsys, *argv):
    """Run compare.main in-process; returns (exit code, stdout, stderr)."""
    code = compare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cdf_integer_df(t, df):
    """Reference Student-t CDF for integer df from the closed forms (Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        series, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):  # c + (2/3) c^3 + (2*4)/(3*5) c^5 + ...
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        central = 2.0 / math.pi * (theta + (s * series if df > 1 else 0.0))
    else:
        series, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ...
            series += term
            term *= c * c * (2 * k - 1) / (2 * k)
        central = s * series
    return 0.5 + math.copysign(central / 2.0, t)


def cdf_numeric(t, df, points=200_001):
    """Reference Student-t CDF for any df: 0.5 + Simpson's rule of the density on [0, t]."""
    x = np.linspace(0.0, abs(t), points)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    integral = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 0.5 + math.copysign(integral, t)


# ----------------------------------------------------------------------------- stats

@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.2, 100.0])
def test_t_cdf_df1_is_cauchy(t):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)


@pytest.mark.parametrize("t", [-12.0, -3.1, -0.5, 0.25, 1.5, 2.92, 9.0])
def test_t_cdf_df2_closed_form(t):
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-9)


@pytest.mark.parametrize("df", [3, 4, 5, 6, 9, 10, 15, 30])
@pytest.mark.parametrize("t", [-4.0, -1.7320508, -0.2, 0.9, 2.5, 6.0])
def test_t_cdf_matches_integer_df_closed_forms(df, t):
    assert stats.t_cdf(t, df) == pytest.approx(cdf_integer_df(t, df), abs=1e-9)


def test_reference_closed_form_reduces_to_known_cases():
    # Guards the reference itself: df=1 Cauchy, df=2 and df=3 closed forms.
    for t in (-2.0, 0.4, 3.0):
        assert cdf_integer_df(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert cdf_integer_df(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
        df3 = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
        assert cdf_integer_df(t, 3) == pytest.approx(df3, abs=1e-12)


@pytest.mark.parametrize("df", [0.5, 2.5, 100 / 17, 17.3, 250.0])
@pytest.mark.parametrize("t", [-3.3, -1.1, 0.8, 2.2])
def test_t_cdf_fractional_df_matches_numeric_integration(df, t):
    assert stats.t_cdf(t, df) == pytest.approx(cdf_numeric(t, df), abs=1e-8)


@pytest.mark.parametrize("t, df, upper_tail", [
    (2.821, 9, 0.01), (1.812, 10, 0.05), (2.015, 5, 0.05), (3.365, 5, 0.01),
    (12.706, 1, 0.025), (2.228, 10, 0.025), (2.086, 20, 0.025), (2.457, 30, 0.01),
])
def test_t_tail_matches_three_decimal_tables(t, df, upper_tail):
    # Table entries are rounded to 3 decimals, so only ~1e-4 agreement is possible.
    assert stats.t_sf(t, df) == pytest.approx(upper_tail, abs=1e-4)


@pytest.mark.parametrize("t, df, upper_tail", [
    (2.821437925, 9, 0.01), (1.812461123, 10, 0.05), (2.015048373, 5, 0.05),
    (3.364929997, 5, 0.01), (12.70620474, 1, 0.025), (2.042272456, 30, 0.025),
    (2.845339707, 20, 0.005),
])
def test_t_tail_matches_precise_critical_values(t, df, upper_tail):
    assert stats.t_sf(t, df) == pytest.approx(upper_tail, abs=1e-6)
    assert stats.t_ppf(1 - upper_tail, df) == pytest.approx(t, abs=1e-6)


def test_two_sided_critical_value_df1():
    assert 2 * stats.t_sf(12.706, 1) == pytest.approx(0.05, abs=1e-4)
    assert stats.t_ppf(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-9)


def test_t_cdf_symmetry_and_limits():
    for df in (1, 3.5, 40):
        assert stats.t_cdf(0.0, df) == pytest.approx(0.5, abs=1e-15)
        assert stats.t_cdf(1.3, df) + stats.t_cdf(-1.3, df) == pytest.approx(1.0, abs=1e-14)
        assert stats.t_cdf(math.inf, df) == 1.0 and stats.t_cdf(-math.inf, df) == 0.0
    # Large df approaches the normal distribution: Phi(1.96) = 0.9750021048517795.
    assert stats.t_cdf(1.96, 1e7) == pytest.approx(0.9750021048517795, abs=1e-6)
    with pytest.raises(ValueError):
        stats.t_cdf(1.0, 0)


@pytest.mark.parametrize("x", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
def test_incomplete_beta_closed_forms(x):
    assert stats.regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-12)
    assert stats.regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-12)
    assert stats.regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-12)


def test_mean_std_interval_by_hand():
    assert stats.mean([]) is None and stats.sample_std([5.0]) is None
    assert stats.mean([1.0, 2.0, 6.0]) == pytest.approx(3.0)
    assert stats.sample_std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    # df=2: t_{0.975} = 0.95 / sqrt(2 * 0.975 * 0.025) from the inverse of the df=2 closed form.
    low, high = stats.t_interval([100.0, 102.0, 104.0])
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * 2 / math.sqrt(3)
    assert (low, high) == pytest.approx((102 - half, 102 + half), abs=1e-9)
    assert stats.t_interval([1.0]) is None


def test_one_sided_p_degenerate_cases():
    assert stats.one_sided_p_below([3.27], 3.28) is None
    assert stats.one_sided_p_below([3.27, 3.27], 3.28) == 0.0
    assert stats.one_sided_p_below([3.29, 3.29], 3.28) == 1.0
    assert stats.one_sided_p_below([3.28, 3.28], 3.28) is None


def test_welch_degenerate_cases():
    assert stats.welch_test([1.0], [2.0, 3.0])["p_two_sided"] is None
    assert stats.welch_test([1.0], [2.0, 3.0])["diff"] == pytest.approx(1.5)
    assert stats.welch_test([1.0, 1.0], [2.0, 2.0])["p_two_sided"] == 0.0
    assert stats.welch_test([1.0, 1.0], [1.0, 1.0])["p_two_sided"] is None


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("line, expected", [
    ("step:125/1695 val_loss:4.3121 train_time:12345ms step_avg:98.76ms",
     {"step": 125, "total": 1695, "val_loss": 4.3121, "train_time": 12345.0, "step_avg": 98.76}),
    ("step:126/1695 train_time:12445ms step_avg:98.77ms",
     {"step": 126, "total": 1695, "train_time": 12445.0, "step_avg": 98.77}),
    ("step:125/1695 val_loss:4.3121 train_time:12345ms",
     {"step": 125, "total": 1695, "val_loss": 4.3121, "train_time": 12345.0}),
    ("step:10/3000 train_loss:5.1234 train_time:1234ms step_avg:123.40ms",
     {"step": 10, "total": 3000, "train_loss": 5.1234, "train_time": 1234.0, "step_avg": 123.4}),
    ("step:7/50 train_time:700ms val_loss:6.5", {"step": 7, "total": 50, "train_time": 700.0, "val_loss": 6.5}),
    ("step:0/50 val_loss:10.8258 train_time:0ms step_avg:nanms",
     {"step": 0, "total": 50, "val_loss": 10.8258, "train_time": 0.0, "step_avg": None}),
])
def test_parse_step_line_variants(line, expected):
    assert runlog.parse_step_line(line) == expected


@pytest.mark.parametrize("line", ["stepper:1/2", "step:1 of 2", "# step:1/2 val_loss:3.0", "s:0 tel:10.98"])
def test_non_step_lines_are_ignored(line):
    assert runlog.parse_step_line(line) is None


def test_parse_our_format_every_field():
    run = runlog.parse_log_text(make_log(final_loss=3.2791, total_ms=168_750.0, steps=1695, val_every=125,
                                         config={"num_iterations": 1695, "lr": 0.05}), "x.txt")
    assert run.complete
    assert run.final_val_loss == 3.2791
    assert run.train_time_s == pytest.approx(168.75)
    assert run.steps_total == 1695 and run.last_step == 1695
    assert run.step_avg_ms == pytest.approx(round(168_750 / 1695, 2))
    assert (run.world_size, run.grad_accum_steps, run.gpu) == (8, 1, "NVIDIA H100 80GB HBM3")
    assert (run.python, run.torch, run.triton) == ("3.11.7", "2.11.0+cu130", "3.6.0")
    assert run.config == {"num_iterations": 1695, "lr": 0.05}
    assert run.launch_to_first_step_s == pytest.approx(48.2)
    assert (run.peak_memory_mib, run.reserved_memory_mib, run.mfu_percent) == (34000.0, 49700.0, 41.2)
    assert run.source_hash == hashlib.sha256((SOURCE).encode()).hexdigest()[:12]
    assert run.stopping is None
    assert [p.step for p in run.val_points] == list(range(0, 1695, 125)) + [1695]


def test_source_above_separator_is_not_parsed():
    # The source holds a fake "step:100/100 val_loss:1.0000" line, a world_size and a stopping line.
    run = runlog.parse_log_text(make_log(steps=100, crash_at=80, world_size=4))
    assert not run.complete
    assert run.last_step == 80 and run.steps_total == 100
    assert run.world_size == 4 and run.stopping is None
    assert all(p.val_loss != 1.0 for p in run.val_points)


def test_log_without_separator_has_no_hash_but_parses():
    run = runlog.parse_log_text("step:5/5 val_loss:3.9 train_time:50ms step_avg:10.00ms\n")
    assert run.complete and run.source_hash is None and run.final_val_loss == 3.9


def test_public_style_log_from_fixture():
    run = runlog.parse_log_file(FIXTURES / "public_style.txt")
    assert run.complete
    assert run.world_size == 8  # eight GPU rows in the nvidia-smi table; the source's world_size is ignored
    assert run.gpu == "NVIDIA H100 80GB HBM3"
    assert run.torch == "2.7.0.dev20250110+cu126" and run.python == "3.12.7"
    assert run.final_val_loss == 3.2777 and run.train_time_s == pytest.approx(4.0)
    assert run.step_avg_ms == pytest.approx(200.0) and run.steps_total == 20
    assert run.peak_memory_mib == 34000.0 and run.mfu_percent is None
    text = (FIXTURES / "public_style.txt").read_text()
    assert run.source_hash == hashlib.sha256(text[:text.index(SEP + "\n")].encode()).hexdigest()[:12]


@pytest.mark.parametrize("name, loss, seconds, steps, step_avg", [
    ("old_no_step_avg.txt", 3.3012, 24.690, 250, 24690 / 250),  # no step_avg: train_time / steps
    ("old_train_loss.txt", 4.0500, 3.702, 30, 123.40),          # train_loss on the final step is not val loss
    ("old_reordered.txt", 4.2000, 10.000, 40, 250.00),           # val_loss after train_time
])
def test_older_formats_from_fixtures(name, loss, seconds, steps, step_avg):
    run = runlog.parse_log_file(FIXTURES / name)
    assert run.complete
    assert run.final_val_loss == loss
    assert run.train_time_s == pytest.approx(seconds)
    assert run.steps_total == steps
    assert run.step_avg_ms == pytest.approx(step_avg)
    assert run.world_size is None and run.gpu is None


def test_stopped_run_is_incomplete_with_reason():
    run = runlog.parse_log_text(make_log(steps=100, stopping=63))
    assert not run.complete and run.last_step == 63
    assert run.stopping == "non-finite loss nan at step 63"
    assert run.final_val_loss is None and run.train_time_s is None


# ----------------------------------------------------------------------------- compare: figures

def test_group_statistics_by_hand(tmp_path):
    folder = write_group(tmp_path / "base", [3.270, 3.275, 3.280], [100.0, 102.0, 104.0])
    write(folder / "run9_crashed.txt", make_log(crash_at=70))
    write(folder / "notes.txt", "not a log, no steps here\n")
    result = compare.analyse(compare.load_groups([str(folder)]))
    (group,) = result["groups"]
    assert group["n"] == 3 and group["n_incomplete"] == 1
    assert group["mean_val_loss"] == pytest.approx(3.275, abs=1e-12)
    assert group["std_val_loss"] == pytest.approx(0.005, abs=1e-12)
    # t = (3.275 - 3.28) / (0.005 / sqrt 3) = -sqrt 3 with df = 2: p = 1/2 - sqrt3 / (2 sqrt5).
    assert group["p_value"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)), abs=1e-9)
    assert group["mean_train_time_s"] == pytest.approx(102.0)
    assert group["std_train_time_s"] == pytest.approx(2.0)
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * 2 / math.sqrt(3)
    assert group["train_time_ci_low_s"] == pytest.approx(102 - half, abs=1e-9)
    assert group["train_time_ci_high_s"] == pytest.approx(102 + half, abs=1e-9)
    assert group["single_source"] is True
    assert len(result["runs"]) == 4
    assert [r["complete"] for r in result["runs"]] == [True, True, True, False]


def test_target_option_changes_p(tmp_path):
    folder = write_group(tmp_path / "g", [3.270, 3.275, 3.280], [100.0, 102.0, 104.0])
    group = compare.analyse(compare.load_groups([str(folder)]), target=3.285)["groups"][0]
    # t = -0.01 / (0.005 / sqrt 3) = -2 sqrt 3, df = 2.
    t = -2 * math.sqrt(3)
    assert group["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-9)


def test_two_groups_welch_equal_sizes_by_hand(tmp_path):
    a = write_group(tmp_path / "a", [3.270, 3.275, 3.280], [100.0, 102.0, 104.0])
    b = write_group(tmp_path / "b", [3.272, 3.276, 3.280], [97.0, 99.0, 101.0])
    c = compare.analyse(compare.load_groups([str(a), str(b)]))["comparison"]
    assert c["time_diff_s"] == pytest.approx(-3.0)
    assert c["time_diff_percent"] == pytest.approx(-300.0 / 102.0)
    # Equal variances (4) and sizes (3): Welch df = (8/3)^2 / (2 * (4/3)^2 / 2) = 4.
    assert c["time_welch_df"] == pytest.approx(4.0)
    t = -3.0 / math.sqrt(8 / 3)
    theta = math.atan(abs(t) / 2)
    p_two = 1 - math.sin(theta) * (1 + 0.5 * math.cos(theta) ** 2)  # df = 4 closed form
    assert c["time_p_value"] == pytest.approx(p_two, abs=1e-9)
    assert c["loss_diff"] == pytest.approx(3.276 - 3.275, abs=1e-12)
    assert c["first_single_source"] and c["second_single_source"] and c["same_source"]


def test_two_groups_welch_unequal_sizes_by_hand(tmp_path):
    a = write_group(tmp_path / "a", [3.27] * 3, [100.0, 102.0, 104.0])
    b = write_group(tmp_path / "b", [3.27] * 5, [96.0, 98.0, 100.0, 102.0, 104.0],
                    source=SOURCE + "# variant b\n")
    c = compare.analyse(compare.load_groups([str(a), str(b)]))["comparison"]
    # se^2 = 4/3 + 10/5 = 10/3; df = (10/3)^2 / ((4/3)^2 / 2 + 2^2 / 4) = 100/17.
    assert c["time_welch_df"] == pytest.approx(100 / 17, abs=1e-9)
    t = -2.0 / math.sqrt(10 / 3)
    assert c["time_p_value"] == pytest.approx(2 * cdf_numeric(t, 100 / 17), abs=1e-7)
    assert c["loss_diff"] == pytest.approx(0.0, abs=1e-12) and c["loss_p_value"] is None  # both std 0
    assert not c["same_source"]


def test_mixed_sources_in_one_group(tmp_path):
    folder = write_group(tmp_path / "mixed", [3.27, 3.28], [100.0, 101.0])
    write(folder / "run_other.txt", make_log(source=SOURCE + "# edited\n"))
    group = compare.analyse(compare.load_groups([str(folder)]))["groups"][0]
    assert group["single_source"] is False and len(group["source_hashes"]) == 2


def test_single_run_group_has_undefined_spread(tmp_path, capsys):
    log = write(tmp_path / "one.txt", make_log(final_loss=3.2712, total_ms=150_000.0))
    group = compare.analyse(compare.load_groups([str(log)]))["groups"][0]
    assert group["n"] == 1 and group["mean_val_loss"] == 3.2712
    assert group["std_val_loss"] is None and group["p_value"] is None
    assert group["train_time_ci_low_s"] is None
    code, out, _ = run_compare(capsys, log)
    assert code == 0
    row = [line for line in out.splitlines() if line.startswith(str(log)) and "3.2712" in line
           and "150.000 s" in line]
    assert len(row) == 2 and row[1].count("n/a") >= 3  # run row and group row; std, p and CI are n/a


def test_zero_std_group(tmp_path):
    folder = tmp_path / "same"
    for seed in range(3):  # three runs (seeds) with the same figures; three copies of one log would be one run
        write(folder / f"run{seed}.txt", make_log(final_loss=3.2700, total_ms=90_000.0,
                                                  config={"num_iterations": 100, "seed": seed}))
    group = compare.analyse(compare.load_groups([str(folder)]))["groups"][0]
    assert group["std_val_loss"] == 0.0 and group["p_value"] == 0.0
    assert group["train_time_ci_low_s"] == pytest.approx(90.0)
    assert group["train_time_ci_high_s"] == pytest.approx(90.0)


def test_copies_of_one_run_are_counted_once_with_a_warning(tmp_path, capsys):
    """Three copies of one log (n = 3, std 0 before) and a log that reuses a run id are one run each."""
    folder = tmp_path / "copies"
    first = make_log(final_loss=3.2700, config={"num_iterations": 100, "run_id": "r1"})
    for name in ("a.txt", "b.txt", "c.txt"):
        write(folder / name, first)
    write(folder / "d.txt", make_log(final_loss=3.2750, config={"num_iterations": 100, "run_id": "r1"}))
    write(folder / "e.txt", make_log(final_loss=3.2760, config={"num_iterations": 100, "run_id": "r2"}))
    code, out, err = run_compare(capsys, folder, "--json")
    assert code == 0
    assert err.splitlines() == [f"warning: {folder}: b.txt repeats a.txt (same content); c.txt repeats a.txt (same "
                                f"content); d.txt repeats a.txt (same run id r1): each run is counted once"]
    data = json.loads(out)
    assert [os.path.basename(r["path"]) for r in data["runs"]] == ["a.txt", "e.txt"]
    assert data["groups"][0]["n"] == 2 and data["groups"][0]["mean_val_loss"] == pytest.approx(3.2730, abs=1e-12)


def test_logs_without_a_step_line_are_skipped_with_one_line(tmp_path, capsys):
    """A run refused before its first step leaves a log with another config: it must not make the group 'mixed'."""
    folder = write_group(tmp_path / "logs", [3.27, 3.28], [100.0, 101.0])
    refused = make_log(config={"num_iterations": 7, "lr": 0.5}).split("\nstep:0/", 1)[0] + "\nstopping: data error: x\n"
    write(folder / "refused.txt", refused)
    code, out, err = run_compare(capsys, folder)
    assert code == 0 and "refused.txt" not in out
    assert err.splitlines() == [f"warning: {folder}: skipped 1 log(s) without a step line (refused.txt): a run that "
                                f"stops before its first step (a config or data error: see its stopping: line) has "
                                f"nothing to count"]
    assert compare.analyse(compare.load_groups([str(folder)]))["groups"][0]["n"] == 2
    code, _, err = run_compare(capsys, folder / "refused.txt")
    assert code == 2 and err.splitlines() == [f"error: {folder / 'refused.txt'}: no step line: a run that stops before "
                                              f"its first step (a config or data error: see its stopping: line) has "
                                              f"nothing to count"]


def test_all_runs_incomplete_gives_empty_statistics(tmp_path, capsys):
    write(tmp_path / "bad" / "a.txt", make_log(crash_at=10))
    write(tmp_path / "bad" / "b.txt", make_log(stopping=20))
    code, out, _ = run_compare(capsys, tmp_path / "bad", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["groups"][0]["n"] == 0 and data["groups"][0]["n_incomplete"] == 2
    assert data["groups"][0]["mean_val_loss"] is None
    assert [r["last_step"] for r in data["runs"]] == [10, 20]


# ----------------------------------------------------------------------------- compare: command line

def _assert_no_strings_for_figures(value, key=""):
    """Every figure in the JSON is a number or null, never a numeric-looking string."""
    if isinstance(value, dict):
        for k, v in value.items():
            _assert_no_strings_for_figures(v, k)
    elif isinstance(value, list):
        for v in value:
            _assert_no_strings_for_figures(v, key)
    elif isinstance(value, str):
        try:
            float(value.rstrip("ms%"))
        except ValueError:
            return
        raise AssertionError(f"{key}: figure {value!r} is a string")


def test_json_output_structure(tmp_path, capsys):
    a = write_group(tmp_path / "a", [3.270, 3.275, 3.280], [100.0, 102.0, 104.0])
    write(a / "crash.txt", make_log(crash_at=30))
    b = write_group(tmp_path / "b", [3.272, 3.276], [97.0, 99.0])
    code, out, err = run_compare(capsys, a, b, "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) == {"runs", "groups", "comparison"}
    assert len(data["runs"]) == 6 and len(data["groups"]) == 2
    crashed = [r for r in data["runs"] if not r["complete"]]
    assert len(crashed) == 1 and crashed[0]["complete"] is False and crashed[0]["last_step"] == 30
    assert crashed[0]["final_val_loss"] is None
    run = next(r for r in data["runs"] if r["complete"])
    for key in ("final_val_loss", "train_time_s", "step_avg_ms", "peak_memory_mib", "mfu_percent"):
        assert isinstance(run[key], float), key
    for key in ("steps", "world_size", "last_step"):
        assert isinstance(run[key], int) and not isinstance(run[key], bool), key
    group = data["groups"][0]
    for key in ("mean_val_loss", "std_val_loss", "p_value", "mean_train_time_s",
                "train_time_ci_low_s", "train_time_ci_high_s"):
        assert isinstance(group[key], float), key
    assert isinstance(group["n"], int) and group["n"] == 3
    for key in ("time_diff_s", "time_diff_percent", "time_welch_df", "time_p_value", "loss_diff"):
        assert isinstance(data["comparison"][key], float), key
    _assert_no_strings_for_figures(data)


@pytest.mark.parametrize("n_groups", [1, 3])
def test_json_has_comparison_only_for_two_groups(tmp_path, capsys, n_groups):
    paths = [write(tmp_path / f"g{i}.txt", make_log(final_loss=3.27 + i / 1000)) for i in range(n_groups)]
    code, out, _ = run_compare(capsys, *paths, "--json")
    data = json.loads(out)
    assert code == 0 and "comparison" not in data
    assert [g["name"] for g in data["groups"]] == [str(p) for p in paths]
    assert data["groups"][0]["std_val_loss"] is None and data["groups"][0]["p_value"] is None


def test_text_output_has_units_and_comparison(tmp_path, capsys):
    a = write_group(tmp_path / "a", [3.270, 3.275, 3.280], [100.0, 102.0, 104.0])
    b = write_group(tmp_path / "b", [3.272, 3.276, 3.280], [97.0, 99.0, 101.0])
    write(b / "z_crash.txt", make_log(crash_at=55))
    write(b / "z_stop.txt", make_log(stopping=42))
    code, out, _ = run_compare(capsys, a, b)
    assert code == 0
    assert "102.000 s" in out and "99.000 s" in out and "1000.00 ms" in out
    assert "INCOMPLETE (last step 55/100)" in out and "INCOMPLETE (last step 42/100)" in out
    assert f"{b / 'z_stop.txt'}: stopping: non-finite loss nan at step 42" in out
    assert "z_crash.txt: stopping" not in out
    assert "-3.000 s (-2.94%)" in out
    assert f"minus {a}" in out


def test_trailing_slash_names_group_by_path(tmp_path):
    folder = write_group(tmp_path / "grp", [3.27], [10.0])
    name, runs = compare.load_group(str(folder) + "/")
    assert name == str(folder) and len(runs) == 1


def test_missing_path_is_one_line_error(tmp_path, capsys):
    code, out, err = run_compare(capsys, tmp_path / "nothing_here")
    assert code != 0 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("error: ") and "nothing_here" in err and "no such file" in err


def test_folder_without_logs_is_one_line_error(tmp_path, capsys):
    write(tmp_path / "empty" / "notes.txt", "just notes\n")
    write(tmp_path / "empty" / "README.md", "step:1/1 val_loss:3 train_time:1ms\n")
    code, out, err = run_compare(capsys, tmp_path / "empty")
    assert code != 0 and out == ""
    assert err.strip().count("\n") == 0 and "has no logs" in err and "empty" in err


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_group(tmp_path / "a", [3.270, 3.275], [100.0, 102.0])
    b = write_group(tmp_path / "b", [3.272], [97.0])
    write(b / "crash.txt", make_log(crash_at=60))
    png = tmp_path / "curves.png"
    code, out, err = run_compare(capsys, a, b, "--plot", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    assert str(png) in out


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    log = write(tmp_path / "a.txt", make_log())
    png = tmp_path / "curves.png"
    code, out, err = run_compare(capsys, log, "--plot", png)
    assert code != 0 and not png.exists()
    assert err.strip().count("\n") == 0 and "pip install matplotlib" in err


def poisoned_env(tmp_path):
    """Environment whose PYTHONPATH shadows torch and scipy with modules that fail on import."""
    poison = tmp_path / "poison"
    for name in ("torch", "scipy"):
        write(poison / f"{name}.py", f"raise ImportError('records tools must not import {name}')\n")
    return dict(os.environ, PYTHONPATH=str(poison))


def test_compare_script_runs_from_repo_root_without_torch_or_scipy(tmp_path):
    log = write(tmp_path / "run.txt", make_log(final_loss=3.2701))
    env = poisoned_env(tmp_path)
    done = subprocess.run([sys.executable, "records/compare.py", str(log), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["final_val_loss"] == 3.2701
    helped = subprocess.run([sys.executable, "records/compare.py", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--target" in helped.stdout and "--plot" in helped.stdout


def test_leaderboard_script_runs_from_repo_root_without_torch_or_scipy(tmp_path):
    write(tmp_path / "README.md", README_TEMPLATE)
    done = subprocess.run([sys.executable, "records/leaderboard.py", "--root", str(tmp_path)], cwd=REPO,
                          env=poisoned_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert leaderboard.no_records("track_1_short") in (tmp_path / "README.md").read_text()


def test_importing_tools_has_no_side_effects():
    done = subprocess.run([sys.executable, "-c",
                           "import sys; import records.compare, records.leaderboard; "
                           "print('torch' in sys.modules, 'scipy' in sys.modules, 'matplotlib' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["False", "False", "False"]


# ----------------------------------------------------------------------------- leaderboard

README_TEMPLATE = f"# Records\n\nintro\n\n{leaderboard.START_MARKER}\nold table\n{leaderboard.END_MARKER}\n\nfooter\n"


# The data settings the rules of a record require (leaderboard.py refuses records that break them).
RECORD_CONFIG = {"train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
                 "val_tokens": 10_485_760, "val_seq_len": 262_144, "num_iterations": 100}
RECORD_SOURCE = "import torch\n\nmodel = torch.compile(torch.nn.Linear(2, 2), dynamic=False)\n"  # valid Python, no compiler options


def make_record(root, folder, date, time_s, losses, times, description="Change", contributors=("A",), **meta):
    """A record folder with record.json and one log per run (8 x H100, FineWeb config); returns its path."""
    path = Path(root) / "track_1_short" / folder
    write_group(path, losses, times, config=RECORD_CONFIG, source=RECORD_SOURCE)
    record = {"date": date, "time_s": time_s, "description": description, "contributors": list(contributors)}
    record.update(meta)
    write(path / "record.json", json.dumps(record))
    return path


def table_rows(text):
    """The data rows of the generated Markdown table(s)."""
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]


def test_leaderboard_without_records_says_so(tmp_path, capsys):
    """Every track has its section, its race in one line, and a line saying it has no record yet."""
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    assert leaderboard.main(["--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert "old table" not in text
    assert [line for line in text.splitlines() if line.startswith("### ")] == [
        "### track_1_short", "### track_2_medium", "### track_3_optimization"]
    assert ("### track_2_medium\n\nGPT-2 medium (`records/track_2_medium/train_gpt.py`) to a val loss of 2.92 on "
            "8 x H100 80GB; the record is the fastest mean time (with a one-sided t-test p < 0.01).\n\n"
            "No records yet: the first folder under `records/track_2_medium/` will appear here.") in text
    assert text.startswith("# Records\n\nintro\n\n") and text.endswith("\n\nfooter\n")
    assert leaderboard.main(["--root", str(tmp_path), "--check"]) == 0


def test_leaderboard_regenerates_sorted_and_check_detects_staleness(tmp_path, capsys):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    make_record(tmp_path, "2026-12-01_Later", "2026-12-01", 150.0, [3.2700, 3.2702], [149.0, 151.0],
                description="later | faster", contributors=["B", "C"])
    make_record(tmp_path, "2026-11-24_Slow", "2026-11-24", 170.0, [3.2700, 3.2710, 3.2720], [169.0, 170.0, 171.0])
    make_record(tmp_path, "2026-11-24_Fast", "2026-11-24", 160.5, [3.2750, 3.2752], [160.0, 161.0], commit="abc123")
    assert leaderboard.main(["--root", str(tmp_path), "--check"]) == 1  # "old table" is stale
    assert leaderboard.main(["--root", str(tmp_path)]) == 0
    text = readme.read_text()
    rows = table_rows(text)
    assert [row.split(" | ")[1] for row in rows] == ["2026-11-24", "2026-11-24", "2026-12-01"]
    assert "2026-11-24_Fast" in rows[0] and "2026-11-24_Slow" in rows[1]
    assert rows[0].startswith("| 1 | ") and rows[2].startswith("| 3 | ")
    # Loss and time recomputed from the logs: (3.2700 + 3.2710 + 3.2720) / 3 = 3.2710, time 170.00 s.
    assert "3.2710 (n=3, p=" in rows[1] and "| 170.00 s |" in rows[1]
    assert "3.2701 (n=2" in rows[2] and "| 150.00 s |" in rows[2] and "later \\| faster" in rows[2]
    assert "B, C" in rows[2] and "(track_1_short/2026-12-01_Later/)" in rows[2]
    assert "### track_1_short" in text and text.endswith("\n\nfooter\n")
    assert leaderboard.main(["--root", str(tmp_path), "--check"]) == 0
    make_record(tmp_path, "2026-11-30_New", "2026-11-30", 155.0, [3.2700, 3.2702], [155.0, 155.0])
    before = readme.read_text()
    assert leaderboard.main(["--root", str(tmp_path), "--check"]) == 1
    assert readme.read_text() == before  # --check never writes
    assert "out of date" in capsys.readouterr().err
    assert leaderboard.main(["--root", str(tmp_path)]) == 0
    assert [r.split(" | ")[1] for r in table_rows(readme.read_text())][2] == "2026-11-30"


def _break_missing_metadata(path):
    (path / "record.json").unlink()


def _break_invalid_json(path):
    (path / "record.json").write_text("{not json")


def _break_missing_field(path):
    meta = json.loads((path / "record.json").read_text())
    del meta["contributors"]
    (path / "record.json").write_text(json.dumps(meta))


def _break_time_as_string(path):
    meta = json.loads((path / "record.json").read_text())
    meta["time_s"] = "168.75"
    (path / "record.json").write_text(json.dumps(meta))


def _break_date_mismatch(path):
    meta = json.loads((path / "record.json").read_text())
    meta["date"] = "2026-11-25"
    (path / "record.json").write_text(json.dumps(meta))


def _break_no_logs(path):
    for log in path.glob("*.txt"):
        log.unlink()


def _break_only_crashed_logs(path):
    for log in path.glob("*.txt"):
        log.write_text(make_log(crash_at=5))


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_metadata, "missing record.json"),
    (_break_invalid_json, "not valid JSON"),
    (_break_missing_field, "'contributors'"),
    (_break_time_as_string, "'time_s'"),
    (_break_date_mismatch, "folder date differs"),
    (_break_no_logs, "no run logs"),
    (_break_only_crashed_logs, "no complete run"),
])
def test_leaderboard_bad_record_is_one_line_error_naming_folder(tmp_path, capsys, breaker, message):
    readme = write(tmp_path / "README.md", README_TEMPLATE)
    path = make_record(tmp_path, "2026-11-24_Broken", "2026-11-24", 160.0, [3.27], [160.0])
    breaker(path)
    assert leaderboard.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "2026-11-24_Broken" in err and message in err
    assert readme.read_text() == README_TEMPLATE


def test_leaderboard_bad_folder_name(tmp_path, capsys):
    write(tmp_path / "README.md", README_TEMPLATE)
    make_record(tmp_path, "my_record", "2026-11-24", 160.0, [3.27], [160.0])
    assert leaderboard.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "my_record" in err and "YYYY-MM-DD_ShortName" in err


def test_leaderboard_needs_markers(tmp_path, capsys):
    write(tmp_path / "README.md", "# no markers here\n")
    assert leaderboard.main(["--root", str(tmp_path)]) == 2
    assert "leaderboard:start" in capsys.readouterr().err


def test_repository_leaderboard_is_up_to_date(capsys):
    assert leaderboard.main(["--check"]) == 0, capsys.readouterr().err


def test_committed_leaderboard_is_up_to_date():
    """The table in records/README.md is what leaderboard.py generates from the record folders in the repo."""
    assert leaderboard.main(["--check"]) == 0


# ----------------------------------------------------------------------------- strict parsing, mixed groups, plot

def cut_inside_final_train_time(text, keep_digits=4):
    """The log text cut after the first keep_digits digits of the final line's train_time."""
    final = text.rindex("val_loss:")
    start = text.index("train_time:", final) + len("train_time:")
    return text[:start + keep_digits]


def test_log_cut_inside_final_train_time_is_incomplete(tmp_path, capsys):
    text = make_log(total_ms=370_958.0)
    cut = cut_inside_final_train_time(text)
    assert cut.endswith("step:100/100 val_loss:3.2790 train_time:3709")
    run = runlog.parse_log_text(cut)
    assert not run.complete and run.train_time_ms is None and run.final_val_loss is None
    assert run.incomplete_reason == "final validation line has no train_time in ms: log cut short?"
    folder = write(tmp_path / "g" / "cut.txt", cut).parent
    write(folder / "whole.txt", text)
    group = compare.analyse(compare.load_groups([str(folder)]))["groups"][0]
    assert group["n"] == 1 and group["n_incomplete"] == 1
    assert group["mean_train_time_s"] == pytest.approx(370.958)
    code, out, err = run_compare(capsys, folder)
    assert code == 0 and "INCOMPLETE (final validation line has no train_time in ms: log cut short?)" in out
    assert err.splitlines() == [f"warning: {folder / 'cut.txt'}: final validation line has no train_time in ms: "
                                f"log cut short?; left out of the statistics: use the whole, unedited log"]
    assert "3.709 s" not in out


def test_step_line_time_without_unit_is_not_a_time():
    assert runlog.parse_step_line("step:10/10 val_loss:3.2700 train_time:3709") == {
        "step": 10, "total": 10, "val_loss": 3.27, "train_time": None}
    assert runlog.parse_time_ms("370958ms") == 370958.0 and runlog.parse_time_ms("3709") is None


def test_group_of_different_configs_warns_naming_the_fields(tmp_path, capsys):
    folder = tmp_path / "logs"
    write(folder / "a.txt", make_log(total_ms=100_000.0, config={"train_steps": 100, "lr": 0.05, "seed": 1,
                                                                 "run_id": "a", "log_dir": "logs"}))
    write(folder / "b.txt", make_log(total_ms=500_000.0, world_size=1,
                                     config={"train_steps": 100, "lr": 0.02, "seed": 2, "run_id": "b",
                                             "log_dir": "logs/x"}))
    code, out, err = run_compare(capsys, folder)
    assert code == 0
    assert err.strip().splitlines() == [
        f"warning: {folder}: its runs have different configurations (lr: 0.02, 0.05; world_size: 1, 8); "
        f"the statistics pool them: put each configuration in its own folder"]
    group = compare.analyse(compare.load_groups([str(folder)]))["groups"][0]
    assert group["config_differences"] == {"lr": ["0.02", "0.05"], "world_size": ["1", "8"]}
    code, out, err = run_compare(capsys, folder, "--json")  # the warning also comes with --json
    assert code == 0 and json.loads(out)["groups"][0]["warnings"] and err.startswith("warning: ")


def test_repeats_differing_only_in_run_fields_do_not_warn(tmp_path, capsys):
    folder = tmp_path / "logs"
    for seed in (1, 2, 3):
        write(folder / f"s{seed}.txt", make_log(config={"lr": 0.05, "seed": seed, "run_id": f"s{seed}",
                                                        "log_dir": f"logs/{seed}", "save_model": f"m{seed}.pt"}))
    code, out, err = run_compare(capsys, folder)
    assert code == 0 and err == ""


def test_group_of_different_sources_warns(tmp_path, capsys):
    folder = write_group(tmp_path / "mixed", [3.27, 3.28], [100.0, 101.0])
    write(folder / "run_other.txt", make_log(source=SOURCE + "# edited\n"))
    code, out, err = run_compare(capsys, folder)
    (line,) = err.strip().splitlines()
    hashes = sorted({runlog.source_hash(SOURCE), runlog.source_hash(SOURCE + "# edited\n")})
    assert line == (f"warning: {folder}: its runs come from 2 different sources (hashes {', '.join(hashes)}); "
                    f"the statistics pool them: put each version of the code in its own folder")


def plotted(tmp_path, target=3.28, losses=(3.270, 3.275, 3.272)):
    """draw_curves on two groups (2 runs and 1 run + 1 crashed run); returns (figure, axes, pyplot)."""
    plt = compare.require_matplotlib()
    a = write_group(tmp_path / "a", losses[:2], [100.0, 102.0])
    b = write_group(tmp_path / "b", losses[2:], [97.0])
    write(b / "crash.txt", make_log(crash_at=60))
    result = compare.analyse(compare.load_groups([str(a), str(b)]), target=target)
    fig = compare.draw_curves(result, plt)
    return fig, fig.axes[0], plt


def curve_lines(ax):
    """The plotted runs: lines with data, not the target line or the empty legend keys."""
    return [line for line in ax.get_lines()
            if len(np.asarray(line.get_xdata())) and not line.get_label().startswith("target")]


def target_drawn(ax, target=3.28):
    return any(line.get_label() == f"target {target}" and list(line.get_ydata()) == [target, target]
               for line in ax.get_lines())


def test_plot_one_colour_and_legend_entry_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    fig, ax, plt = plotted(tmp_path)
    runs = curve_lines(ax)
    assert len(runs) == 4
    assert len({line.get_color() for line in runs}) == 4  # one colour per run
    assert [line.get_linestyle() for line in runs] == ["-", "-", "--", "--"]  # line style = group
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run0", "run1", "crash (incomplete)", "run0"]
    group_legend = [a for a in ax.artists if a is not ax.get_legend()][0]
    assert [t.get_text() for t in group_legend.get_texts()] == [
        f"{tmp_path / 'a'} (n=2)", f"{tmp_path / 'b'} (n=1)", "target 3.28"]
    plt.close(fig)


def test_plot_y_range_fits_the_data_and_keeps_a_target_inside_it(tmp_path):
    pytest.importorskip("matplotlib")
    fig, ax, plt = plotted(tmp_path)
    ys = np.concatenate([line.get_ydata() for line in curve_lines(ax)])
    low, high = ax.get_ylim()
    assert low < ys.min() and high > ys.max()  # every point inside, none on the edge
    assert (high - low) < 1.2 * (ys.max() - ys.min())  # a small margin, not a fixed range
    assert target_drawn(ax)
    plt.close(fig)


def test_plot_of_cpu_losses_is_not_clipped_by_the_target(tmp_path):
    pytest.importorskip("matplotlib")
    fig, ax, plt = plotted(tmp_path, losses=(7.05, 7.1, 7.2))  # tiny CPU runs end far above 3.28
    ys = np.concatenate([line.get_ydata() for line in curve_lines(ax)])
    low, high = ax.get_ylim()
    assert low < ys.min() and high > ys.max() and low > 3.28
    assert not target_drawn(ax)
    assert "outside" in ax.get_title()
    plt.close(fig)


# ----------------------------------------------------------------------------- the steps track (track_3_optimization)

def write_steps_group(folder, losses, steps):
    for index, loss in enumerate(losses):
        config = {"seed": index, "run_id": f"{Path(folder).name}-{index}"}  # separate runs, not copies of one
        write(Path(folder) / f"run{index}.txt", make_steps_log(final_loss=loss, steps=steps, config=config))
    return Path(folder)


def test_steps_track_folders_get_the_z_rule_and_the_pairwise_rule(tmp_path, capsys):
    """The public README's #13 (3210 steps, 3.2785, n=10) against #11 (3225 steps, 3.2785, n=16): 0.00167."""
    old = write_steps_group(tmp_path / "r11", [3.2785] * 16, 3225)
    new = write_steps_group(tmp_path / "r13", [3.2780, 3.2790] * 5, 3210)
    code, out, err = run_compare(capsys, old, new, "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    first, second = result["steps"]
    assert (first["step"], first["n"], second["step"], second["n"]) == (3225, 16, 3210, 10)
    assert first["z"] == pytest.approx(0.0015 * 4) and first["z_holds"]
    assert second["z"] == pytest.approx(0.0015 * 10 ** 0.5) and second["z_holds"]  # 0.00474
    pair = result["steps_comparison"]
    assert pair["step_diff"] == 15 and pair["value"] == pytest.approx(0.000675 / (1 / 16 + 1 / 10) ** 0.5) and not pair["holds"]
    code, out, _ = run_compare(capsys, old, new)
    assert f"{tmp_path / 'r11'}: step 3225, n = 16, mean val loss 3.27850, z = 0.00600 (holds)" in out
    assert "step diff +15 / 100 * 0.0045) / sqrt(1/n1 + 1/n2) = 0.00167 (does not hold: needs >= 0.004)" in out


def test_steps_track_scores_one_earlier_step_and_warns_on_mixed_lengths(tmp_path, capsys):
    folder = write_steps_group(tmp_path / "g", [3.2760, 3.2770], 3250)
    code, out, _ = run_compare(capsys, folder, "--at-step", "3150")
    # 100 steps before the end each run is 0.0045 higher: mean 3.2810, z = -0.001 * sqrt 2
    assert code == 0 and "step 3150, n = 2, mean val loss 3.28100, z = -0.00141 (does not hold)" in out
    write(folder / "run9.txt", make_steps_log(steps=3200))
    code, out, err = run_compare(capsys, folder)
    assert "its runs trained for different numbers of steps (3200, 3250): score them at one step with --at-step" in err
    assert "Steps track" in out and "step n/a, n = 0" in out
    plain = write_group(tmp_path / "main", [3.2790, 3.2785], [150.0, 151.0])
    assert "Steps track" not in run_compare(capsys, plain)[1]  # main-track logs have no track: line


# ----------------------------------------------------------------------------- issue 28: what compare.py let through

def test_a_folder_mixing_two_tracks_is_refused_naming_each_log(tmp_path, capsys):
    """A track-1 and a track-3 log were pooled into one p-value; each track has its own target and rules."""
    folder = write_group(tmp_path / "mixed", [3.2770], [150.0])
    write(folder / "t3.txt", make_steps_log(final_loss=3.2760))
    code, out, err = run_compare(capsys, folder)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {folder}: mixes the logs of 2 tracks (track_1_short: run0.txt; "
                                "track_3_optimization: t3.txt): each track has its own target and rules, so their runs "
                                "make no one group: put each track's logs in its own folder"]


def test_groups_of_two_tracks_are_compared_with_a_warning_and_each_its_own_track(tmp_path, capsys):
    main = write_group(tmp_path / "main", [3.2770, 3.2780], [150.0, 151.0])
    steps = write_steps_group(tmp_path / "steps", [3.2760, 3.2770], 3250)
    code, out, err = run_compare(capsys, main, steps, "--json")
    assert code == 0
    assert [(g["track"], g["target"]) for g in json.loads(out)["groups"]] == [("track_1_short", 3.28),
                                                                             ("track_3_optimization", 3.28)]
    assert err.splitlines() == [f"warning: the groups come from different tracks ({main}: track_1_short; {steps}: "
                                "track_3_optimization): the comparison sets different races side by side"]


def test_a_run_two_groups_share_is_named(tmp_path, capsys):
    a = write_group(tmp_path / "a", [3.2770, 3.2780], [150.0, 151.0])
    b = write_group(tmp_path / "b", [3.2790], [152.0])
    write(b / "copy.txt", (a / "run1.txt").read_text())
    code, _, err = run_compare(capsys, a, b)
    assert code == 0 and err.splitlines() == ["warning: copy.txt repeats run1.txt (same content) across groups: the groups "
                                              "share these runs"]


def test_a_log_cut_inside_its_source_is_skipped_with_one_line(tmp_path, capsys):
    """It has no separator and no step line: it was skipped silently, as if it were no file at all."""
    folder = write_group(tmp_path / "logs", [3.27, 3.28], [100.0, 101.0])
    text = make_log(final_loss=3.2600)
    write(folder / "cut.txt", text[:text.index("step:100/100")])  # inside SOURCE, above the separator
    code, out, err = run_compare(capsys, folder)
    assert code == 0 and "cut.txt" not in out
    assert err.splitlines() == [f"warning: {folder}: skipped 1 .txt/.log file(s) that are not logs (cut.txt): no line of "
                                "100 '=' and no step line: a log cut inside its embedded source (use the whole log, or "
                                "move a crashed run's log to crashed/), or a file that is no log"]
    code, _, err = run_compare(capsys, folder / "cut.txt")
    assert code == 2 and err.startswith(f"error: {folder / 'cut.txt'}: not a training log (no line of 100 '=' and no step line")


@pytest.mark.parametrize("argv, message", [
    (["--at-step", "-5"], "argument --at-step: must be a step number of 1 or more, got -5"),
    (["--at-step", "0"], "argument --at-step: must be a step number of 1 or more, got 0"),
    (["--at-step", "3.5"], "argument --at-step: must be a whole number of steps, got '3.5'"),
    (["--target", "nan"], "argument --target: must be a finite val loss above 0, got nan"),
    (["--target", "-1"], "argument --target: must be a finite val loss above 0, got -1"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    folder = write_steps_group(tmp_path / "g", [3.2760, 3.2770], 3250)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(folder), *argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err == f"compare.py: error: {message} (see --help)\n"


def test_at_step_on_logs_of_another_track_is_said_to_be_ignored(tmp_path, capsys):
    folder = write_group(tmp_path / "main", [3.2790, 3.2785], [150.0, 151.0])
    code, out, err = run_compare(capsys, folder, "--at-step", "50")
    assert code == 0 and "Steps track" not in out
    assert err.splitlines() == [f"warning: --at-step 50 ignored: it scores track_3_optimization logs, and not every group "
                                f"is of that track ({folder}: track_1_short)"]


# ----------------------------------------------------------------------------- track 2 (track_2_medium)

def test_compare_tests_a_medium_folder_against_2_92(tmp_path, capsys):
    """Record #18's two runs: p = 0.0046 against the track's 2.92 (against 3.28 they would be far below it)."""
    folder = make_medium_submission(tmp_path)
    code, out, err = run_compare(capsys, folder / "baseline", folder, "--json")
    assert code == 0 and err == ""
    baseline, record = json.loads(out)["groups"]
    assert (record["track"], record["target"], record["n"]) == ("track_2_medium", 2.92, 2)
    t = (2.91655 - 2.92) / (0.0001 / math.sqrt(2) / math.sqrt(2))  # -69, df = 1
    assert record["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-9)
    assert record["mean_train_time_s"] == pytest.approx(1041.277) and baseline["mean_train_time_s"] == pytest.approx(1379.574)
    code, out, _ = run_compare(capsys, folder)
    row = next(line for line in out.splitlines() if line.startswith(f"{folder}  track_2_medium"))  # the group's row
    assert row.split()[1:8] == ["track_2_medium", "2.92", "2", "0", "2.9165", "0.0001", "0.0046"]
    code, out, _ = run_compare(capsys, folder, "--target", "3.28", "--json")
    assert json.loads(out)["groups"][0]["target"] == 3.28 and json.loads(out)["groups"][0]["p_value"] < 1e-3


def test_a_medium_and_a_short_log_make_no_group(tmp_path, capsys):
    folder = write_group(tmp_path / "mixed", [3.2770], [150.0])
    write(folder / "medium.txt", make_medium_log())
    code, _, err = run_compare(capsys, folder)
    assert code == 2 and "mixes the logs of 2 tracks (track_1_short: run0.txt; track_2_medium: medium.txt)" in err
