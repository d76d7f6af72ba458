"""Built-in verifiers (actors.reward.verifiers) on real answer strings: exact_match, regex, format,
length and math (math-verify in a child process: a hanging verification is excluded, not zeroed,
and the child is killed and replaced); reward.function_args; end to end through RewardWorker."""

import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from actors.reward.functions import BUILTIN_REWARDS, exact_match_reward, load_reward_fn
from actors.reward.scores import validate_scores
from actors.reward.verifiers import mathverify
from actors.reward.verifiers.mathverify import MathVerifier, gold_text, prediction_text
from actors.reward.worker import RewardConfig, RewardWorker
from actors.tasks.reverse import ReverseDigits
from actors.types import Excluded, Exclusion, Group, Prompt, Sample
from actors.validation import ConfigError

HANG = r"The answer is $\boxed{9^{9^{9^{9}}}}$"
"""A real input math-verify never finishes on: sympy tries to decide 9^(9^(9^9)) == 1."""
GARBAGE = "".join(random.Random(0).choice("0123456789{}\\^$#() abcxyz,.\n") for _ in range(1 << 20))
"""1 MB of random math-looking characters."""
TIMEOUT_S = 2.0


def gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie: dead, waiting to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[1:2] == ["Z"] for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return True


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def score(fn, completions, answers):
    return fn([""] * len(completions), completions, answer=answers)


# ---- exact_match -----------------------------------------------------------------------------

@pytest.mark.parametrize("completion, answer, expected", [
    ("4321", "4321", 1.0), (" 4321\n", "4321", 1.0), ("1,000", "1000", 1.0), ("1000", "1,000", 1.0),
    ("42.0", "42", 1.0), ("42.", "42", 1.0), ("0.5", ".5", 1.0), ("-3", "-3.00", 1.0), ("12,345.50", "12345.5", 1.0),
    ("The  Answer\n is Paris.", "the answer is paris", 1.0), ("PARIS", "paris.", 1.0),
    ("0123", "123", 0.0), ("123", "0123", 0.0), ("0123", "0123", 1.0), ("0,123", "123", 0.0), ("007", "7.0", 0.0),
    ("1,00", "100", 0.0), ("42.5", "42", 0.0), ("1e3", "1000", 0.0), ("forty-two", "42", 0.0),
    ("", "42", 0.0), ("42", None, 0.0), ("4 321", "4321", 0.0), ("42..", "42", 0.0),
])
def test_exact_match_normalises(completion, answer, expected):
    assert load_reward_fn("exact_match")([""], [completion], answer=[answer]) == [expected]


def test_exact_match_on_a_megabyte_of_garbage_is_quick():
    t0 = time.monotonic()
    assert exact_match_reward(["", ""], [GARBAGE, GARBAGE], answer=["42", GARBAGE]) == [0.0, 1.0]
    assert time.monotonic() - t0 < 2.0


def test_exact_match_keeps_the_reverse_tasks_verdicts_on_digit_strings():
    rng = random.Random(1)
    answers = ["0123", "0000", "1000", "9870", "0012"] + ["".join(rng.choice("0123456789") for _ in range(4))
                                                          for _ in range(200)]
    completions = {a: [a, f" {a}\n", a.lstrip("0"), a[::-1], a + "0", "0" + a, "", a[:2] + " " + a[2:],
                       f"0{a}.0", f"0,{a}"] for a in answers}
    for a, cs in completions.items():
        assert exact_match_reward([""] * len(cs), cs, answer=[a] * len(cs)) == [ReverseDigits.verify(c, a) for c in cs]
    changed = exact_match_reward([""] * 6, ["4321.", "4,321", "4321.0", "0,123", "0123.0", "0123."],
                                 answer=["4321", "4321", "4321", "0123", "0123", "0123"])
    assert changed == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0], \
        "the deliberate differences: one trailing period; numbers by value when neither has a leading zero"


# ---- regex, format, length --------------------------------------------------------------------

GSM8K_PATTERN = r"####\s*(?P<answer>-?[\d,]+(?:\.\d+)?)\s*$"


def test_regex_checks_the_answer_group():
    fn = load_reward_fn("regex", {"pattern": GSM8K_PATTERN})
    completions = ["She has 3 + 4 = 7 apples.\n#### 7", "#### 1,000", "#### 8", "7", "#### 7 apples", "", GARBAGE]
    t0 = time.monotonic()
    assert score(fn, completions, ["7", "1000", "7", "7", "7", "7", "7"]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 2.0


def test_regex_without_answer_group_only_matches():
    fn = load_reward_fn("regex", {"pattern": r"^Step 1:.*Answer:"})
    assert fn(["", "", ""], ["Step 1: think\nStep 2: more\nAnswer: 4", "Answer: 4", "step 1: Answer:"]) \
        == [1.0, 0.0, 0.0], "DOTALL: '.' crosses lines; case matters"


def test_regex_with_answer_group_needs_answer_metadata():
    fn = load_reward_fn("regex", {"pattern": GSM8K_PATTERN})
    with pytest.raises(ValueError, match="no 'answer' metadata"):
        fn([""], ["#### 7"])


def test_format_default_template():
    fn = load_reward_fn("format")
    completions = ["<think>7 = 3 + 4</think><answer>7</answer>",
                   "<think>\nfirst 3, then 4\n</think>\n<answer>\n7\n</answer>\n",
                   "<think></think> <answer></answer>",
                   "<think>3 + 4</think>", "<answer>7</answer>", "<think>x</think><answer>7</answer> and more",
                   "Sure! <think>x</think><answer>7</answer>", "<think>x</think>\n<Answer>7</Answer>", "", GARBAGE]
    t0 = time.monotonic()
    assert fn([""] * len(completions), completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 2.0


def test_format_custom_template_is_literal_but_for_the_ellipsis():
    fn = load_reward_fn("format", {"template": "Reasoning: … Answer (final): …"})
    assert fn(["", "", ""], ["Reasoning: a+b\nAnswer (final): 3", "Reasoning:x Answer (final):3",
                             "Reasoning: a Answer final: 3"]) == [1.0, 1.0, 0.0]


def test_length_penalty():
    fn = load_reward_fn("length")
    lengths = [0, 1000, 1001, 1500, 2000, 2001, len(GARBAGE)]
    assert fn([""] * len(lengths), ["x" * n for n in lengths]) \
        == pytest.approx([0.0, 0.0, -0.001, -0.5, -1.0, -1.0, -1.0])
    short = load_reward_fn("length", {"max_chars": 10, "penalty_chars": 4})
    assert short(["", ""], ["x" * 11, "x" * 13]) == pytest.approx([-0.25, -0.75])


# ---- math: answers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def math_fn():
    fn = MathVerifier(timeout_s=TIMEOUT_S)
    yield fn
    fn.close()


MATH_CASES = [  # (completion, gold, expected)
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
     1.0),
    ("48 + 24 = 72, so 72 - 1 = 71 were left.\n#### 71", "... #### 72", 0.0),
    ("First 10 * 100 = 1000. The answer is 1,000", "#### 1,000", 1.0),
    ("So the total is #### 1,000.", "1000", 1.0),
    (r"Half of it: $\boxed{0.5}$", r"\boxed{\frac{1}{2}}", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"We get $\boxed{\dfrac{\sqrt 3}{2}}$.", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"The answer is $10\sqrt{2}$", r"10\sqrt{2}", 1.0),
    (r"The answer is $10$", r"10\sqrt{2}", 0.0),
    (r"so $\boxed{(x+1)^2}$", "x^2+2x+1", 1.0),
    ("The answer is 42", "42", 1.0),
    ("The answer is 41", "42", 0.0),
    (r"\boxed{", "7", 0.0),
    ("I don't know.", "3", 0.0),
    ("", "3", 0.0),
    ("3", "", 0.0),
    ("3", None, 0.0),
    (GARBAGE, "42", 0.0),
    (GARBAGE.replace("#", ""), "42", 0.0),
    ("#### 42", GARBAGE.replace("#", ""), 0.0),
]


def test_math_answers(math_fn):
    completions, golds, expected = zip(*MATH_CASES)
    t0 = time.monotonic()
    assert score(math_fn, list(completions), list(golds)) == list(expected)
    assert time.monotonic() - t0 < 20.0, "1 MB of garbage is cut to its last max_chars"


def test_gold_and_prediction_text():
    assert gold_text("Janet has 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,234") == "1234"
    assert gold_text(None) == "" and gold_text(r"\frac{1}{2}") == r"\frac{1}{2}"
    assert prediction_text("so 5 + 2 = 7\n#### 7\n\nHope this helps!") == "7"
    assert prediction_text("#### ") == "" and prediction_text("x" * 5000 + "y" * 100, 100) == "y" * 100


def test_math_runs_in_a_non_main_thread(math_fn):
    out = []
    t = threading.Thread(target=lambda: out.append(score(math_fn, ["#### 72", r"\boxed{0.5}", "#### 7"],
                                                         ["#### 72", "1/2", "8"])))
    t.start()
    t.join(60)
    assert not t.is_alive() and out == [[1.0, 1.0, 0.0]]


# ---- math: the deadline ----------------------------------------------------------------------

def test_a_hanging_sample_is_excluded_and_the_rest_of_the_batch_is_scored(math_fn):
    math_fn.close()
    t0 = time.monotonic()
    score(math_fn, ["1"], ["1"])
    start_s = time.monotonic() - t0  # what starting a child costs on this machine now
    old = math_fn.pid
    t0 = time.monotonic()
    out = score(math_fn, ["#### 72", HANG, r"\boxed{\frac{1}{2}}", "#### 5", "#### 6"], ["72", "1", "0.5", "5", "7"])
    elapsed = time.monotonic() - t0
    assert out[0] == 1.0 and out[2:] == [1.0, 1.0, 0.0]
    assert out[1] == Excluded(Exclusion.REWARD_TIMEOUT, f"math: verification exceeded {TIMEOUT_S:g}s")
    wait_until(lambda: gone(old), 5.0, f"the timed-out child {old} to be killed")
    new = math_fn.pid
    assert new is not None and new != old and not gone(new), "a new child scored the rest of the batch"
    assert elapsed < TIMEOUT_S + 2.0 + 2 * start_s, (elapsed, start_s)  # the deadline, then a new child


def test_a_hanging_last_sample_costs_about_the_timeout(math_fn):
    score(math_fn, ["1"], ["1"])
    old = math_fn.pid
    t0 = time.monotonic()
    out = score(math_fn, ["#### 3", HANG], ["3", "1"])
    elapsed = time.monotonic() - t0
    assert out[0] == 1.0 and out[1].kind is Exclusion.REWARD_TIMEOUT
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0, elapsed
    assert math_fn.pid is None, "nothing left to score: no new child until the next call"
    wait_until(lambda: gone(old), 5.0, f"the timed-out child {old} to be killed")
    assert score(math_fn, ["#### 4"], ["4"]) == [1.0] and math_fn.pid not in (None, old)


def test_a_hanging_sample_from_a_thread(math_fn):
    out = []
    t = threading.Thread(target=lambda: out.append(score(math_fn, [HANG, "#### 9"], ["1", "9"])))
    t.start()
    t.join(TIMEOUT_S + 30)
    assert not t.is_alive() and len(out) == 1
    assert out[0][0].kind is Exclusion.REWARD_TIMEOUT and out[0][1] == 1.0


def test_a_child_that_dies_excludes_its_sample_and_is_replaced(math_fn, monkeypatch):
    score(math_fn, ["1"], ["1"])
    victim = math_fn.pid
    real_wait, calls = mathverify._Child.wait, []

    def wait(child, timeout_s):
        calls.append(child.pid)
        if len(calls) == 2:  # the child dies while verifying the second sample
            child.proc.kill()
        return real_wait(child, timeout_s)

    monkeypatch.setattr(mathverify._Child, "wait", wait)
    out = score(math_fn, ["#### 1", "#### 2", "#### 3", "#### 5"], ["1", "2", "3", "4"])
    assert out[0] == 1.0 and out[2:] == [1.0, 0.0]
    assert out[1].kind is Exclusion.REWARD_ERROR and "died" in out[1].detail
    assert calls[:2] == [victim, victim] and calls[2] != victim and gone(victim)


def test_the_child_is_stopped_at_exit_and_dies_with_its_parent():
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys, threading
        from actors.reward.verifiers.mathverify import MathVerifier
        v = MathVerifier(timeout_s=60)
        assert v([""], ["2"], answer=["2"]) == [1.0]
        print(v.pid, flush=True)
        if sys.argv[1] == "exit":
            atexit._run_exitfuncs()  # what interpreter exit runs
            print(v.pid, os.path.exists(f"/proc/{{v._child.pid if v._child else 0}}"), flush=True)
        else:  # killed while the child is busy on a hanging sample (it holds the GIL there)
            threading.Thread(target=v, args=([""], [{HANG!r}]), kwargs={{"answer": ["1"]}}, daemon=True).start()
            threading.Event().wait(1.0)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    def run(mode):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pid = int(r.stdout.split()[0])
        wait_until(lambda: gone(pid), 5.0, f"the child {pid} to end ({mode})")
        return pid, r

    pid, r = run("exit")
    assert r.returncode == 0 and r.stdout.split()[1:] == [str(pid), "False"], r
    pid, r = run("killed")
    assert r.returncode == -9, r


# ---- Excluded through the scores validator and the worker ----------------------------------

def test_validate_scores_passes_an_excluded_through():
    timeout = Excluded(Exclusion.REWARD_TIMEOUT, "math: verification exceeded 5s")
    assert validate_scores("math", [1.0, timeout, "x"], 3)[:2] == [1.0, timeout]


def test_reward_worker_end_to_end():
    comps = ["<think>48 + 24 = 72</think><answer>#### 72</answer>", f"<think>?</think><answer>{HANG}</answer>",
             "#### 71"]
    length = {"max_chars": len(comps[0]) - 10, "penalty_chars": 20}  # the first is 10 over: -0.5
    cfg = RewardConfig(functions=["math", "format", "length"], weights=[1.0, 0.5, 1.0],
                       function_args={"math": {"timeout_s": TIMEOUT_S}, "length": length})
    w = RewardWorker.from_config(cfg)
    samples = [Sample(completion_ids=[1], completion_text=c, logprobs=[-0.1], policy_version=0) for c in comps]
    (g,) = w.score([Group(prompt=Prompt(uid=0, text="q", metadata={"answer": "#### 72"}), prompt_ids=[1],
                          samples=samples)])
    try:
        right, hung, wrong = g.samples
        assert right.rewards == {"math": 1.0, "format": 1.0, "length": pytest.approx(-0.5)}
        assert right.reward == pytest.approx(1.0 + 0.5 * 1.0 - 0.5) and right.trainable
        assert hung.excluded.kind is Exclusion.REWARD_TIMEOUT and hung.reward is None and not hung.trainable
        assert wrong.reward == 0.0 and wrong.trainable and w.errors == 1
    finally:
        w.functions[0][1].close()


# ---- function_args --------------------------------------------------------------------------

def scaled_reward(prompts, completions, *, scale: float = 1.0, **metadata):
    return [scale * len(c) for c in completions]


class Threshold:
    def __init__(self, *, at: int):
        self.at = at

    def __call__(self, prompts, completions, **metadata):
        return [float(len(c) >= self.at) for c in completions]


def test_function_args_bind_user_functions_and_factories():
    cfg = RewardConfig(functions=["tests.test_verifiers:scaled_reward", "tests.test_verifiers:Threshold"],
                       function_args={"tests.test_verifiers:scaled_reward": {"scale": 0.5},
                                      "tests.test_verifiers:Threshold": {"at": 3}})
    (_, f, _), (_, t, _) = RewardWorker.from_config(cfg).functions
    assert f(["", ""], ["ab", "abcd"]) == [1.0, 2.0] and t(["", ""], ["ab", "abcd"]) == [0.0, 1.0]
    assert load_reward_fn("tests.test_verifiers:scaled_reward")([""], ["abc"]) == [3.0]


@pytest.mark.parametrize("functions, args, msg", [
    (["regex"], {"regex": {"patern": "a"}}, "reward.function_args.regex.patern: unknown argument (known: pattern)"),
    (["regex"], {}, "reward.function_args.regex.pattern: required (no default)"),
    (["regex"], {"regex": {"pattern": "(?P<answer>"}}, "reward.function_args.regex.pattern: invalid regular"),
    (["regex"], {"regex": {"pattern": 3}}, "reward.function_args.regex.pattern: a non-empty regex string"),
    (["exact_match"], {"math": {"timeout_s": 1}}, "reward.function_args.math: names no function in reward.functions"),
    (["math"], {"math": {"timeout_s": 0}}, "reward.function_args.math.timeout_s: a number > 0"),
    (["math"], {"math": {"timeout": 5}}, "reward.function_args.math.timeout: unknown argument (known: timeout_s, "),
    (["length"], {"length": {"max_chars": -1}}, "reward.function_args.length.max_chars: an integer >= 0"),
    (["format"], {"format": {"template": ""}}, "reward.function_args.format.template: a non-empty string"),
    (["exact_match"], {"exact_match": {"x": 1}}, "reward.function_args.exact_match.x: unknown argument (known: none)"),
    (["math"], {"math": 5}, "reward.function_args.math: expected a mapping"),
])
def test_function_args_errors_name_the_key(functions, args, msg):
    with pytest.raises(ConfigError) as e:
        RewardConfig(functions=functions, function_args=args)
    assert str(e.value).startswith(msg), str(e.value)


def test_function_args_of_a_user_function_are_checked_when_loaded():
    cfg = RewardConfig(functions=["tests.test_verifiers:scaled_reward"],
                       function_args={"tests.test_verifiers:scaled_reward": {"scael": 2}})
    with pytest.raises(ConfigError, match=r"^reward\.function_args\.tests\.test_verifiers:scaled_reward\.scael: "
                                          r"unknown argument \(known: scale\)"):
        RewardWorker.from_config(cfg)


def test_function_args_from_the_command_line():
    from learner.config import load_config

    cfg = load_config(None, ["--reward.function_args", "{regex: {pattern: 'a'}, math: {timeout_s: 5}}",
                             "--reward.functions", "[regex, math]"])
    assert cfg.reward.function_args == {"regex": {"pattern": "a"}, "math": {"timeout_s": 5}}
    with pytest.raises(ConfigError, match=r"^reward\.function_args\.regex\.patern: unknown argument"):
        load_config(None, ["--reward.function_args", "{regex: {patern: a}}", "--reward.functions", "[regex]"])


def test_every_builtin_loads_with_its_defaults_or_needs_its_argument():
    needs = {"regex": {"pattern": "x"}}
    for name in BUILTIN_REWARDS:
        assert callable(load_reward_fn(name, needs.get(name)))
