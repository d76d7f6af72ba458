"""Watching a run (``learner/watch``): TensorBoard event files, eval.jsonl, samples.jsonl,
report.png and ``fleetrl report``, all on real files in a temporary run directory.

The event files are read back with TensorBoard's own ``EventAccumulator`` (what
``tensorboard --logdir`` shows); the PNG's size and text chunks (the title, the counts
of rows drawn) are read with Pillow; ``fleetrl report`` runs as the installed entry point.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from actors.validation import ConfigError
from learner.driver.report import RunReport
from learner.watch.config import WatchConfig
from learner.watch.plot import draw_report
from learner.watch.samples import MAX_CHARS, SampleLog
from learner.watch.writers import MetricWriters

FLEETRL = Path(sys.executable).parent / "fleetrl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def text(acc, tag: str) -> dict[int, str]:
    from tensorboard.util import tensor_util

    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
            for e in acc.Tensors(f"{tag}/text_summary")}


def step_metrics(step: int) -> dict:
    """What the learner returns for one step (``train_step`` + ``batch_metrics``)."""
    reward = 0.2 + 0.6 * (1 - math.exp(-step / 3))
    return {"loss": 0.01 * step, "grad_norm": 1.0 + step / 10, "skipped_step": 0, "active_samples": 16,
            "clip_frac": None if step == 1 else 0.02 * step, "ratio_mean": 1.0, "ratio_max": 1.2, "approx_kl": 0.001,
            "kl": 0.003, "entropy": 1.4, "reward_mean": reward, "reward_std": 0.3, "adv_abs_mean": 0.5,
            "zero_adv_group_frac": 0.25, "samples": 16, "filtered_groups": 0, "tokens": 160, "sequence_tokens": 320,
            "response_len_mean": 10.0 + step,
            "staleness_mean": 0.5, "staleness_max": 1, "behaviour_versions": [step - 1, step],
            "reward_by_name": {"exact": reward, "format": 1.0}, "lr": 1e-5, "update_s": 0.2}


COUNTERS = {"produced": 100, "trained": 64, "dropped": 2, "buffered_groups": 1}


def eval_metrics(acc: float) -> dict:
    m = {"greedy_accuracy": acc, "pass@1": acc - 0.05, "pass@4": acc + 0.1, "mean@4": acc - 0.02}
    return {**m, "by_source": {"gsm8k": {k: v - 0.1 for k, v in m.items()}, "math": dict(m)}}


def png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert path.stat().st_size > 50_000, f"{path}: {path.stat().st_size} bytes, too small for a 10-panel report"
    im = Image.open(path)
    assert im.size == (1350, 1800)
    return im


def write_rows(path: Path, rows: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


# -- config ---------------------------------------------------------------------------------------
def test_watch_config_defaults_and_errors_name_the_key():
    cfg = WatchConfig()
    assert (cfg.report_to, cfg.samples_every, cfg.samples_per_write, cfg.plot) == (["jsonl", "tensorboard"], 10, 4,
                                                                                   True)
    assert WatchConfig(report_to=[]).report_to == []  # metrics.jsonl only
    cases = [({"report_to": ["tensorboard", "mlflow"]}, "watch.report_to: unknown value 'mlflow'"),
             ({"report_to": "tensorboard"}, "watch.report_to: expected a list"),
             ({"report_to": ["jsonl", "jsonl"]}, "watch.report_to: ['jsonl', 'jsonl'] names a value twice"),
             ({"samples_every": -1}, "watch.samples_every: must be an integer >= 0"),
             ({"samples_per_write": 0}, "watch.samples_per_write: must be an integer >= 1"),
             ({"plot": "yes"}, "watch.plot: expected true/false")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            WatchConfig(**kwargs)
        assert str(e.value).startswith(message), (kwargs, str(e.value))


def test_wandb_without_the_package_is_a_config_error():
    assert importlib.util.find_spec("wandb") is None, "this test needs an environment without wandb"
    with pytest.raises(ConfigError, match=r"^watch\.report_to: 'wandb' needs the wandb package, which is not "
                                          r"installed \(pip install wandb\)"):
        WatchConfig(report_to=["jsonl", "wandb"])


WANDB_STAND_IN = '''
calls = []
ids = iter(["first-id", "second-id"])
class util:
    generate_id = staticmethod(lambda: next(ids))
class Run:
    def log(self, data, step=None):
        calls.append(("log", data, step))
    def finish(self):
        calls.append(("finish",))
def init(**kwargs):
    calls.append(("init", kwargs))
    return Run()
'''


def test_wandb_gets_the_scalars_offline_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what MetricWriters asks of it."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "wandb.py").write_text(WANDB_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    try:
        cfg = WatchConfig(report_to=["wandb"])
        import wandb

        w = MetricWriters(run_dir, cfg, {"learner": {"lr": 1e-5}})
        w.scalars(3, {"step": 3, "reward_mean": 0.5, "reward_by_name": {"exact": 0.25}, "clip_frac": None,
                      "behaviour_versions": [2, 3]})
        w.close()
        w.close()
        monkeypatch.setenv("WANDB_MODE", "online")
        MetricWriters(run_dir, cfg, None, resume_step=3).close()
        init, log, finish, init2, finish2 = wandb.calls
        assert init[1]["mode"] == "offline" and init[1]["id"] == "first-id" and init[1]["resume"] == "allow"
        assert init[1]["config"] == {"learner": {"lr": 1e-5}} and init[1]["dir"] == str(run_dir)
        assert log == ("log", {"reward/mean": 0.5, "reward/by_name/exact": 0.25}, 3)
        assert finish == finish2 == ("finish",)
        assert "mode" not in init2[1] and init2[1]["id"] == "first-id"  # $WANDB_MODE decides; same W&B run
    finally:
        sys.modules.pop("wandb", None)


# -- TensorBoard ----------------------------------------------------------------------------------
def test_tensorboard_scalars_nested_tags_eval_sources_and_config_text(tmp_path):
    w = MetricWriters(tmp_path, WatchConfig(), {"learner": {"lr": 1e-5}})
    w.eval(0, {"step": 0, "time_s": 0.0, "policy_version": 0, **eval_metrics(0.25)}, wall_time=1_700_000_000.0)
    for step in (1, 2, 3):
        w.scalars(step, {"step": step, "t": 1_700_000_000.0 + step, "policy_version": step, "time_s": 2.0 * step,
                         "sample_s": 1.0, "update_sync_s": 0.5, "samples_per_s": 8.0, "note": "text",
                         **step_metrics(step), **COUNTERS}, wall_time=1_700_000_000.0 + step)
    w.close()
    w.close()  # idempotent
    acc = accumulator(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert scalars(acc, "reward/mean") == pytest.approx({s: step_metrics(s)["reward_mean"] for s in (1, 2, 3)})
    assert scalars(acc, "reward/by_name/exact") == pytest.approx({s: step_metrics(s)["reward_mean"] for s in (1, 2, 3)})
    assert scalars(acc, "reward/by_name/format") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert scalars(acc, "policy/clip_frac") == pytest.approx({2: 0.04, 3: 0.06})  # None at step 1: left out
    assert scalars(acc, "staleness/max") == {1: 1, 2: 1, 3: 1}
    assert scalars(acc, "throughput/samples_per_s") == {1: 8.0, 2: 8.0, 3: 8.0}
    assert scalars(acc, "time/sample_s") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert scalars(acc, "loss/total") == pytest.approx({1: 0.01, 2: 0.02, 3: 0.03})
    assert {"policy/kl", "policy/entropy", "policy/ratio_max", "optim/grad_norm", "optim/lr", "staleness/mean",
            "batch/response_len_mean", "counters/produced", "time/update_s", "time/update_sync_s"} - tags == set()
    assert not [t for t in tags if "behaviour_versions" in t or "note" in t or t.endswith(("/step", "/t"))]
    assert [e.wall_time for e in acc.Scalars("reward/mean")] == [1_700_000_001.0, 1_700_000_002.0, 1_700_000_003.0]
    assert scalars(acc, "eval/greedy_accuracy") == {0: 0.25}
    assert scalars(acc, "eval/pass@4") == pytest.approx({0: 0.35})
    assert scalars(acc, "eval/gsm8k/greedy_accuracy") == pytest.approx({0: 0.15})
    assert scalars(acc, "eval/math/mean@4") == pytest.approx({0: 0.23})
    assert not [t for t in tags if t.startswith("eval/") and t.split("/")[1] in ("step", "time_s", "policy_version")]
    assert '"lr": 1e-05' in text(acc, "config")[0]


def test_a_resumed_run_purges_what_the_earlier_run_logged_after_its_checkpoint(tmp_path):
    first = MetricWriters(tmp_path, WatchConfig(), None)
    first.eval(2, {"greedy_accuracy": 0.3})
    for step in range(1, 11):
        first.scalars(step, {"reward_mean": float(step)})
    first.eval(8, {"greedy_accuracy": 0.8})  # after the checkpoint at step 5: done again after the resume
    first.close()
    resumed = MetricWriters(tmp_path, WatchConfig(), None, resume_step=5)
    for step in (6, 7):
        resumed.scalars(step, {"reward_mean": 100.0 + step})
    resumed.close()
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [6]  # the purge marker: the step after the checkpoint
    acc = accumulator(tmp_path)
    assert scalars(acc, "reward/mean") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 106.0, 7: 107.0}
    assert scalars(acc, "eval/greedy_accuracy") == pytest.approx({2: 0.3})  # step 8 of the earlier run: hidden
    fresh = MetricWriters(tmp_path, WatchConfig(), None)  # a new run in the same directory hides all of it
    fresh.scalars(1, {"reward_mean": -1.0})
    fresh.close()
    acc = accumulator(tmp_path)
    assert scalars(acc, "reward/mean") == {1: -1.0}
    assert scalars(acc, "eval/greedy_accuracy") == {}  # the tag is known, its events are hidden


def test_report_to_without_tensorboard_writes_no_event_files(tmp_path):
    w = MetricWriters(tmp_path, WatchConfig(report_to=["jsonl"]), {"a": 1})
    w.scalars(1, {"reward_mean": 0.5})
    w.text(1, "samples", "| a |")
    w.close()
    assert not (tmp_path / "tensorboard").exists()


# -- samples --------------------------------------------------------------------------------------
def sample_rows(step: int) -> list[dict]:
    rows = [{"prompt": f"reverse {i}{i}7", "completion": f"7{i}{i}", "reward": i / 4, "rewards": {"exact": i / 4},
             "policy_version": step - 1} for i in range(5)]
    rows[2]["completion"] = "a|b\nc" + "x" * 5000
    return rows


def test_samples_every_n_steps_to_samples_jsonl_and_tensorboard_text(tmp_path):
    writers = MetricWriters(tmp_path, WatchConfig(), None)
    log = SampleLog(tmp_path, every=2, per_write=3)
    assert [log.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert log.write(1, sample_rows(1), writers) == []
    written = log.write(2, sample_rows(2), writers)
    log.write(4, sample_rows(4), writers)
    log.close()
    writers.close()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]
    assert rows[:3] == written
    assert [r["reward"] for r in rows[:3]] == [1.0, 0.5, 0.0]  # spread: highest, middle, lowest
    assert set(rows[0]) == {"step", "policy_version", "prompt", "completion", "reward", "rewards"}
    assert rows[0] == {"step": 2, "policy_version": 1, "prompt": "reverse 447", "completion": "744", "reward": 1.0,
                       "rewards": {"exact": 1.0}}
    long = rows[1]["completion"]
    assert long.startswith("a|b\ncxxx") and long.endswith("… [+3005 chars]") and len(long) < MAX_CHARS + 20
    table = text(accumulator(tmp_path), "samples")
    assert set(table) == {2, 4}
    assert "| reward | rewards | policy | prompt | completion |" in table[2]
    assert "| 1 | exact 1 | 1 | reverse 447 | 744 |" in table[2]
    assert "a\\|b ⏎ cxxx" in table[2]  # the pipe escaped, the line break shown, the table intact
    resumed = SampleLog(tmp_path, every=2, per_write=3, resume_step=3)
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 2, 2]
    never = SampleLog(tmp_path / "never", every=0, per_write=3)
    assert not never.due(10) and never.write(10, sample_rows(10)) == []
    assert not (tmp_path / "never" / "samples.jsonl").exists()


# -- RunReport ------------------------------------------------------------------------------------
def run_report(run_dir: Path, out, plot: bool = True, **kwargs) -> RunReport:
    return RunReport(run_dir, total_steps=4, progress=False, out=out, log_every=0,
                     watch=WatchConfig(samples_every=2, samples_per_write=2, plot=plot),
                     run_config={"train": {"steps": 4}}, **kwargs)


def test_run_report_writes_eval_samples_tensorboard_and_the_plot_and_resumes(tmp_path):
    out = io.StringIO()
    report = run_report(tmp_path, out)
    report.eval(0, eval_metrics(0.25), time_s=0.0, policy_version=0)
    for step in range(1, 5):
        report.step(step, step, step_metrics(step) | {"eval_accuracy": 0.5}, COUNTERS, elapsed_s=2.0 * step,
                    sample_s=1.0, update_sync_s=0.5)
        if report.samples_due(step):
            report.samples(step, sample_rows(step))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "finished", "reason": "", "steps": 4,
                                                       "eval_before": 0.25, "eval_after": 0.7, "wall_s": 30.0}))
    report.close()
    report.close()  # idempotent
    assert png(tmp_path / "report.png").text["Description"] == "fleetrl report: metrics rows 4, eval rows 1"
    report.eval(4, eval_metrics(0.7), time_s=8.5, policy_version=4)  # the final evaluation comes after close()
    assert out.getvalue() == ""
    report.draw()  # the trainer draws again once summary.json is written
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["time_s"], e["policy_version"], e["greedy_accuracy"]) for e in evals] == [
        (0, 0.0, 0, 0.25), (4, 8.5, 4, 0.7)]
    assert evals[1]["by_source"]["gsm8k"]["pass@4"] == pytest.approx(0.7)
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 2, 4, 4]
    acc = accumulator(tmp_path)
    assert scalars(acc, "reward/mean") == pytest.approx({s: step_metrics(s)["reward_mean"] for s in range(1, 5)})
    assert scalars(acc, "eval/greedy_accuracy") == pytest.approx({0: 0.25, 4: 0.7})
    assert scalars(acc, "eval/math/pass@1") == pytest.approx({0: 0.2, 4: 0.65})
    assert set(text(acc, "samples")) == {2, 4}
    meta = png(tmp_path / "report.png").text
    assert meta["Title"] == (f"{tmp_path.name}: finished | 4 steps | train reward 0.370 -> 0.642 | "
                             f"eval 0.250 -> 0.700 | 8.0 samples/s | wall 0.5 min")
    assert meta["Description"] == "fleetrl report: metrics rows 4, eval rows 2"

    # resume after step 2: the files are cut back, TensorBoard hides steps 3..4 of the first run
    report = run_report(tmp_path, out, plot=False, resume_step=2)
    assert [r["step"] for r in report.history] == [1, 2] and [e["step"] for e in report.evals] == [0]
    assert report.rolled_back == 32
    report.step(3, 3, step_metrics(3) | {"reward_mean": 0.99}, COUNTERS, elapsed_s=1.0, sample_s=0.5, update_sync_s=0.4)
    report.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0]
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 2]
    acc = accumulator(tmp_path)
    assert scalars(acc, "reward/mean") == pytest.approx({1: step_metrics(1)["reward_mean"],
                                                         2: step_metrics(2)["reward_mean"], 3: 0.99})
    assert scalars(acc, "eval/greedy_accuracy") == pytest.approx({0: 0.25})


def test_run_report_without_plot_draws_nothing_and_a_plot_error_is_one_line(tmp_path):
    report = RunReport(tmp_path, total_steps=1, progress=False, out=io.StringIO(), log_every=0,
                       watch=WatchConfig(report_to=["jsonl"], plot=False))
    report.step(1, 1, step_metrics(1), COUNTERS, elapsed_s=1.0, sample_s=0.5, update_sync_s=0.4)
    report.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "metrics.jsonl", "samples.jsonl"]
    out = io.StringIO()  # a run that ends before its first step: nothing to draw, the run's ending goes on
    (tmp_path / "early").mkdir()
    RunReport(tmp_path / "early", total_steps=1, progress=False, out=out, log_every=0,
              watch=WatchConfig(report_to=["jsonl"])).close()
    assert out.getvalue() == (f"report.png not drawn: ValueError: {tmp_path / 'early' / 'metrics.jsonl'}: "
                              f"no metrics rows yet\n")


# -- report.png -----------------------------------------------------------------------------------
def metrics_rows(steps: int) -> list[dict]:
    return [{"step": s, "policy_version": s, "time_s": 2.0 * s, "t": 1_700_000_000.0 + 2.0 * s, "sample_s": 1.0,
             "update_sync_s": 0.6, "samples_per_s": 8.0, **step_metrics(s), **COUNTERS} for s in range(1, steps + 1)]


def test_report_png_of_one_row_with_few_keys_and_of_none(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5, "staleness_mean": 0.5}\n')
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "reason": "the learner died\ntraceback",
                                                       "max_staleness": 2, "eval_before": {"greedy_accuracy": 0.3}}))
    meta = png(draw_report(tmp_path, tmp_path / "elsewhere" / "one.png")).text
    assert meta["Title"] == (f"{tmp_path.name}: failed (the learner died) | 1 step | train reward 0.500 | "
                             f"eval before 0.300")
    assert meta["Description"] == "fleetrl report: metrics rows 1, eval rows 1"  # summary.json's eval_before
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "rew')  # only a torn line
    with pytest.raises(ValueError) as e:
        draw_report(tmp_path)
    assert str(e.value) == f"{tmp_path / 'metrics.jsonl'}: no metrics rows yet"
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        draw_report(tmp_path / "missing")


def test_the_title_of_a_resumed_run_does_not_take_the_earlier_segments_summary(tmp_path):
    from learner.watch.plot import _title

    rows = metrics_rows(6)
    stale = {"status": "stopped", "reason": "stop requested", "steps": 3, "eval_before": 0.1, "eval_after": 0.2}
    evals = [{"step": 0, "greedy_accuracy": 0.1}, {"step": 6, "greedy_accuracy": 0.4}]
    assert _title(tmp_path, rows, evals, stale).splitlines() == [
        f"{tmp_path.name}: in progress (resumed; summary.json: stopped at step 3)",
        "6 steps | train reward 0.370 -> 0.719 | eval 0.100 -> 0.400 | 8.0 samples/s"]
    assert _title(tmp_path, rows, evals, {**stale, "steps": 6}).splitlines() == [
        f"{tmp_path.name}: stopped (stop requested)", "6 steps | train reward 0.370 -> 0.719 | eval 0.100 -> 0.200 | "
        "8.0 samples/s"]


def test_fleetrl_report_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # in progress: a torn last line, no eval.jsonl, no summary.json
    write_rows(run / "metrics.jsonl", metrics_rows(6), torn='{"step": 7, "reward_me')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    commands = {"ok": [str(run), "--out", str(tmp_path / "out.png")], "missing": [str(tmp_path / "nope")],
                "empty": [str(tmp_path / "empty")]}
    procs = {k: subprocess.Popen([str(FLEETRL), "report", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, args in commands.items()}
    done = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    (out, err), rc = done["ok"]
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "out.png")
    meta = png(tmp_path / "out.png").text
    assert meta["Title"].startswith("run: in progress (no summary.json yet) | 6 steps | train reward ")
    assert "no eval yet" in meta["Title"]
    assert meta["Description"] == "fleetrl report: metrics rows 6, eval rows 0"  # the torn line is skipped
    assert not (run / "report.png").exists()
    expected = {"missing": f"fleetrl report: error: {tmp_path / 'nope'}: no such run directory",
                "empty": f"fleetrl report: error: {tmp_path / 'empty' / 'metrics.jsonl'}: no metrics rows yet"}
    for k, message in expected.items():
        (out, err), rc = done[k]
        assert (rc, out, err) == (2, "", message + "\n"), k
    from learner.cli import main  # the same command in-process: no RUN_DIR is a usage error

    with pytest.raises(SystemExit) as e:
        main(["report"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fleetrl report: error: the following arguments are required: run_dir")
