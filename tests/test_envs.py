"""Multi-turn episodes: tools, the episode loop on a real engine, token-exact observations,
the learner's loss mask, and a training run whose samples are episodes.

The policies are tiny random Llamas built here with a character-level ChatML tokenizer
(one token per character, special tokens included: any decoded text tokenises back to
the same ids, which is what lets a test compare an episode with the chat template's
rendering of the whole conversation).
"""

from __future__ import annotations

import io
import itertools
import json
import string
import threading
import time

import pytest
import torch

from actors.envs.calculator import ToolError, calculate
from actors.envs.config import EnvConfig, make_env
from actors.envs.tools import ToolEnvironment
from actors.rollout.episodes import ObservationIds
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.types import Exclusion, Group, Prompt, Sample
from learner.batch import TrainBatch, pad_micro_batch
from learner.core_algos import entropy_from_logits, kl_estimate
from learner.config import ConfigError, load_config
from learner.learner import Learner, LearnerConfig

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_chat_char_policy(path, *, seed: int = 0, max_positions: int = 256) -> str:
    """A character-level tokenizer with ChatML special tokens and a tiny random Llama on it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_end|>", "<|im_start|>", "<unk>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"], padding_side="left", chat_template=CHATML)
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=None, tie_word_embeddings=True))
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper: turns end at EOS often enough
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory) -> str:
    return build_chat_char_policy(tmp_path_factory.mktemp("chat-char-policy"))


def chat_prompt(tok, text: str) -> Prompt:
    return Prompt(uid=0, text=tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True), metadata={"answer": "42"})


# -- the calculator ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, value", [("123 * 456", "56088"), ("(2+3)*4", "20"), ("7/2", "3.5"), ("2**10", "1024"),
                                         ("-3 + 10 % 4", "-1"), ("1,000 * 3", "3000"), ("6 × 7", "42"), ("9 // 2", "4")])
def test_calculator_computes(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('true')", "not Call"), ("x + 1", "not Name"), ("'a' * 3", "not Constant"),
    ("(1).__class__", "not Attribute"), ("2 ** 1000", "exponent"), ("1 / 0", "division by zero"),
    ("9 ** 64 * 9 ** 64", "more than 60 digits"), ("1 +", "cannot parse"), ("", "empty"), ("1" * 300, "longer than")])
def test_calculator_refuses_what_is_not_arithmetic(expr, message):
    with pytest.raises(ToolError, match=message):
        calculate(expr)


# -- the tool environment ----------------------------------------------------------------------------------
def test_tool_environment_calls_answers_and_ends():
    env = make_env("calculator")
    assert env.stop == ("</calculator>",)
    state = env.reset("What is 12 * 12?", {"answer": "144"})
    r = env.step(state, "Let me compute. <calculator>12 * 12</calculator>")
    assert not r.done and r.observation == [{"role": "tool", "content": "<result>144</result>"}]
    r = env.step(state, "<calculator>12 / 0</calculator>")
    assert r.observation[0]["content"] == "<error>division by zero</error>" and r.info["tool_errors"] == 1
    r = env.step(state, "Answer: 144")
    assert r.done and not r.observation
    assert env.finish(state) == {"tool_calls": 2, "tool_errors": 1, "malformed_calls": 0}
    state = env.reset("", {})
    assert env.step(state, "<calculator>12 * 12 and then I stop").done  # an opened, never closed call
    assert env.finish(state)["malformed_calls"] == 1


def test_env_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="env.args.tools: unknown tools"):
        EnvConfig(name="tools", args={"tools": ["calculator", "shell"]})
    with pytest.raises(ConfigError, match="env.name: 'nope' is neither"):
        EnvConfig(name="nope")
    with pytest.raises(ConfigError, match="env.name: cannot load 'tests.envs:Missing'"):
        EnvConfig(name="tests.envs:Missing")
    with pytest.raises(ConfigError, match="env.max_turns"):
        load_config(None, ["--env.max_turns", "0"])
    assert isinstance(make_env("tools", {"tools": ["calculator", "python"]}), ToolEnvironment)


# -- episodes on a real engine -----------------------------------------------------------------------------
def test_observation_ids_are_the_templates_delta(chat_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_policy)
    obs = ObservationIds(tok)
    msgs = [{"role": "tool", "content": "<result>7</result>"}]
    assert obs.text(msgs, after_eos=True) == "\n<|im_start|>tool\n<result>7</result><|im_end|>\n<|im_start|>assistant\n"
    assert obs.text(msgs, after_eos=False) == "<|im_end|>" + obs.text(msgs, after_eos=True)
    plain = ObservationIds(type("NoTemplate", (), {"chat_template": None, "eos_token_id": None,
                                                   "decode": lambda self, ids: ""})())
    assert plain.text(msgs, after_eos=True) == "\n<result>7</result>\n"


def test_episode_ids_are_the_whole_conversation_rendered_by_the_template(chat_policy):
    """Policy turns (sampled by the HF engine) and observations concatenated give exactly the ids the
    chat template renders for the whole conversation, never re-tokenising a turn; the loss mask marks
    the policy's tokens, which alone carry log-probs."""
    w = RolloutWorker(chat_policy, RolloutConfig(group_size=3, max_new_tokens=12, temperature=1.0),
                      env=EnvConfig(name="tests.envs:Echo", args={"turns": 3}, max_turns=5))
    tok = w.tokenizer
    prompt = chat_prompt(tok, "Hi")
    (group,) = w.generate([prompt])
    assert [s.turns for s in group.samples] == [3, 3, 3]
    for s in group.samples:
        assert s.loss_mask is not None and len(s.loss_mask) == len(s.completion_ids) == len(s.logprobs)
        assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.loss_mask) if not m)
        assert all(lp < 0 for lp, m in zip(s.logprobs, s.loss_mask) if m)
        # rebuild the conversation from the turns' text and the environment's replies
        runs = [list(g) for _, g in itertools.groupby(zip(s.completion_ids, s.loss_mask), key=lambda x: x[1])]
        policy_turns = [[t for t, _ in run] for run in runs if run[0][1]]
        assert len(policy_turns) == 3 and len(runs) == 5
        messages = [{"role": "user", "content": "Hi"}]
        for k, ids in enumerate(policy_turns):
            text = ids[:-1] if ids[-1] == tok.eos_token_id else ids  # the template writes the EOS itself
            # special tokens the policy sampled mid-turn stay in the text (they tokenise back to themselves)
            messages.append({"role": "assistant", "content": tok.decode(text)})
            if k < 2:  # what Echo answered: it saw the turn without special tokens
                messages.append({"role": "tool", "content": f"seen {len(tok.decode(ids, skip_special_tokens=True))} chars"})
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        mine = group.prompt_ids + s.completion_ids
        closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ended_with_eos = s.completion_ids[-1] == tok.eos_token_id
        tail = closing[1:] if ended_with_eos else closing  # the template closes the last turn (EOS, unless written)
        assert rendered == mine + tail
        assert s.metadata["echo_turns"] == 3 and s.metadata["observation_tokens"] == len(mine) - len(group.prompt_ids) \
            - s.policy_tokens


def test_weights_never_change_inside_an_episode(chat_policy, ray_session):
    """A payload sent while a worker runs episodes lands between generate calls of the worker,
    never between the turns of an episode: the weights every turn's engine call saw (their digest,
    recorded at each call) are one version for all turns of the episodes, and the payload's for
    the call after. The payload is sent once the first turn is under way."""
    from actors.runtime import object_store
    from actors.weights.flat import FlatParams, weights_digest
    from actors.weights.object_store import WeightPublisher
    from transformers import AutoModelForCausalLM

    w = RolloutWorker(chat_policy, RolloutConfig(group_size=4, max_new_tokens=10), fetch_weights=object_store.fetch,
                      env=EnvConfig(name="tests.envs:Echo", args={"turns": 4}, max_turns=4))
    seen, first_turn = [], threading.Event()
    generate = w.engine.generate

    def recording(*args, **kwargs):  # the real engine; what it holds is recorded at each call
        seen.append(weights_digest(w.flat))
        first_turn.set()
        time.sleep(0.2)  # the loader below is waiting for the lock meanwhile
        return generate(*args, **kwargs)

    w.engine.generate = recording
    prompt = chat_prompt(w.tokenizer, "Hello there")
    model = AutoModelForCausalLM.from_pretrained(chat_policy)
    publisher = WeightPublisher(FlatParams(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    publisher.bump()
    payload = publisher.publish(object_store.put)
    old = weights_digest(w.flat)
    result = {}
    t = threading.Thread(target=lambda: result.update(groups=w.generate([prompt] * 3)))
    t.start()
    assert first_turn.wait(60)
    loader = threading.Thread(target=lambda: result.update(applied=w.load_weights(payload)))
    loader.start()
    t.join(120)
    loader.join(120)
    assert result["applied"] and w.policy_version == 1
    turns = max(s.turns for g in result["groups"] for s in g.samples)
    assert turns == 4 and len(seen) >= turns and set(seen) == {old}, "weights changed between turns of an episode"
    assert {s.policy_version for g in result["groups"] for s in g.samples} == {0}
    seen.clear()
    (after,) = w.generate([prompt])
    assert {s.policy_version for s in after.samples} == {1} and set(seen) == {weights_digest(w.flat)} != {old}


def test_environment_failures_exclude_episodes_with_their_reason(chat_policy):
    cfg = RolloutConfig(group_size=2, max_new_tokens=6)
    prompts = [Prompt(uid=i, text=chat_prompt_text(chat_policy, f"q{i}"), metadata={"answer": a})
               for i, a in enumerate(["12", "23", "56", "67"])]
    for name, kind in [("tests.envs:Crashes", Exclusion.ENV_ERROR), ("tests.envs:Garbage", Exclusion.ENV_ERROR)]:
        w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name=name, max_turns=3))
        groups = w.generate(prompts)
        bad = [g for g in groups if any(s.excluded for s in g.samples)]
        assert bad and all(s.excluded.kind == kind for g in bad for s in g.samples), name
        if name.endswith("Crashes"):  # exactly the prompts whose answer starts with an odd digit
            assert [g.prompt.metadata["answer"] for g in bad] == ["12", "56"]
    w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name="tests.envs:Hangs", max_turns=3, step_timeout_s=1.0))
    t0 = time.monotonic()
    groups = w.generate(prompts[:1] + prompts[2:3])  # answers "12" and "56": odd first digits, both hang
    assert time.monotonic() - t0 < 10
    assert all(s.excluded and s.excluded.kind == Exclusion.ENV_TIMEOUT for g in groups for s in g.samples)
    w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name="tests.envs:Echo", key="env", max_turns=3))
    rows = [Prompt(uid=0, text="a", metadata={"env": "tests.envs:NoSuchEnv"}), Prompt(uid=1, text="b", metadata={})]
    unknown, echo = w.generate(rows)
    assert unknown.excluded is not None and unknown.excluded.kind == Exclusion.ENV_UNKNOWN
    assert all(s.excluded.kind == Exclusion.ENV_UNKNOWN for s in unknown.samples)
    assert echo.excluded is None and all(s.turns == 3 for s in echo.samples)


def chat_prompt_text(policy: str, text: str) -> str:
    from transformers import AutoTokenizer

    return chat_prompt(AutoTokenizer.from_pretrained(policy), text).text


# -- the learner trains on policy tokens only ---------------------------------------------------------------
def hand_made_episode(policy: str) -> tuple[list[Group], Learner]:
    """Two groups of two hand-made episodes: policy tokens, an observation, policy tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = ids("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    groups = []
    for g, texts in enumerate([("ab<|im_end|>", "cde"), ("fg<|im_end|>", "h")]):
        samples = []
        for k, text in enumerate(texts):
            first, obs, second = ids(text), ids(f"\n<|im_start|>tool\nx{k}<|im_end|>\n<|im_start|>assistant\n"), ids("ok")
            samples.append(Sample(completion_ids=first + obs + second, completion_text="", policy_version=0,
                                  logprobs=[-1.0] * len(first) + [0.0] * len(obs) + [-1.0] * len(second),
                                  loss_mask=[1] * len(first) + [0] * len(obs) + [1] * len(second), turns=2,
                                  reward=float(k)))
        groups.append(Group(prompt=Prompt(uid=g, text=""), prompt_ids=prompt_ids, samples=samples))
    return groups, Learner(policy, LearnerConfig(num_threads=1, loss_agg="token-mean",
                                                 kl_coef=0.1, entropy_coef=0.01), total_steps=1)


def test_loss_kl_and_entropy_see_only_policy_tokens(chat_policy):
    groups, learner = hand_made_episode(chat_policy)
    batch = TrainBatch.from_groups(groups)
    assert [batch.policy_tokens(i) for i in range(4)] == [5, 5, 5, 3]  # "ab"+EOS+"ok", "cde"+"ok", ...
    # behaviour log-probs = the learner's own on policy tokens: ratio 1, so the clipped loss is -A per token
    proximal = learner.proximal_logprobs(batch)
    adv = learner.advantages(batch)

    def grad(observation_logprob: float) -> torch.Tensor:
        for i, (row, m) in enumerate(zip(proximal, batch.loss_masks)):
            batch.behaviour_logprobs[i] = [lp if keep else observation_logprob for lp, keep in zip(row, m)]
        learner.optimizer.zero_grad(set_to_none=True)
        loss, active, metrics = learner.accumulate_gradients(batch, adv)
        return loss, metrics, torch.cat([p.grad.reshape(-1) for p in learner.model.parameters() if p.grad is not None])

    loss, metrics, g0 = grad(0.0)
    _, _, g1 = grad(-50.0)  # garbage where the observation tokens are: nothing may change
    assert torch.equal(g0, g1)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5) and metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    n = [batch.policy_tokens(i) for i in range(4)]
    pg = -sum(float(a) * k for a, k in zip(adv, n)) / sum(n)  # token-mean over policy tokens only
    assert loss == pytest.approx(pg - 0.01 * metrics["entropy"], abs=1e-5)
    # a behaviour log-prob on a policy token does change the update
    batch.behaviour_logprobs[0][0] -= 1.0
    learner.optimizer.zero_grad(set_to_none=True)
    learner.accumulate_gradients(batch, adv)
    assert not torch.equal(g0, torch.cat([p.grad.reshape(-1) for p in learner.model.parameters() if p.grad is not None]))
    # after an update the policy is off its reference: the KL term and the entropy bonus are the
    # token means over policy tokens only (the pure functions of core_algos, masked here by hand)
    learner.train_step(groups)
    _, _, metrics = learner.accumulate_gradients(batch, learner.advantages(batch))
    ids, attn, pos, targets, _, cmask, keep = pad_micro_batch(batch, list(range(4)), learner.pad_id, learner.device)
    with torch.no_grad():
        pred, logp = learner._completion_logprobs(learner.model, ids, attn, pos, keep, targets)
        _, ref = learner._completion_logprobs(learner.ref_model, ids, attn, pos, keep, targets)
    kl, ent = kl_estimate(logp, ref, learner.cfg.kl_estimator), entropy_from_logits(pred / learner.temperature)
    policy, every = cmask, (targets != learner.pad_id).float()  # every completion position, observations included
    assert float((kl * policy).sum() / policy.sum()) > 1e-6
    assert metrics["kl"] == pytest.approx(float((kl * policy).sum() / policy.sum()), rel=1e-4)
    assert metrics["kl"] != pytest.approx(float((kl * every).sum() / every.sum()), rel=1e-3)
    assert metrics["entropy"] == pytest.approx(float((ent * policy).sum() / policy.sum()), rel=1e-4)
    assert metrics["entropy"] != pytest.approx(float((ent * every).sum() / every.sum()), rel=1e-3)


# -- a training run of episodes -----------------------------------------------------------------------------
def test_training_on_episodes_counts_turns_tools_and_failures(ray_session, chat_policy, tmp_path):
    """Episodes end to end (HF engine): 3-turn episodes of the Echo environment, half of whose
    prompts crash; the crashed ones are excluded as env_error, the rest trained, accounting exact,
    and the step metrics count episodes, turns, tool calls and observation tokens."""
    from learner.driver.trainer import Trainer
    from tests.test_pipeline import read_metrics

    cfg = load_config(None, [
        "--model.path", chat_policy, "--task.name", "arithmetic", "--task.chat_template", "true",
        "--task.eval_size", "4", "--reward.functions", "['tests.rewards:brevity']",
        "--env.name", "tests.envs:Crashes", "--env.args", "{turns: 3}", "--env.max_turns", "3",
        "--train.steps", "3", "--train.prompts_per_step", "4", "--rollout.group_size", "2",
        "--rollout.prompts_per_request", "2", "--rollout.max_new_tokens", "8", "--rollout.num_workers", "1",
        "--learner.num_threads", "1", "--watch.plot", "false", "--watch.report_to", "[jsonl]",
        "--control.enabled", "false", "--train.sample_timeout_s", "60", "--watch.samples_every", "1"])
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        summary = t.train()
    finally:
        t.shutdown()
    assert summary["steps"] == 3 and summary["produced"] == summary["trained"] + summary["dropped"]
    assert summary["dropped_by_reason"].get("env_error", 0) > 0 and summary["trained"] > 0
    rows = read_metrics(tmp_path)
    assert all(r["episodes"] >= r["samples"] for r in rows)
    trained_rows = [r for r in rows if r["samples"]]
    assert trained_rows and all(r["turns_mean"] > 1 and r["observation_tokens"] > 0 and r["tool_calls"] > 0
                                for r in trained_rows)
    assert all(r["tokens"] <= r["policy_tokens"] for r in trained_rows)  # trained ones, of all episodes
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("seen" in s["completion"] for s in samples)  # the episodes, observations included


# -- the multiply task ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, score", [
    ("Answer: 56088", 1.0), ("56088", 1.0), ("Answer: 56,088.", 1.0), ("The answer is 56088", 1.0),
    ("<calculator>123 * 456</calculator>", 0.0), ("Answer: 56089", 0.0), ("56088 and then 7", 0.0), ("", 0.0)])
def test_multiply_verifier(reply, score):
    from actors.reward.functions import multiply_reward

    assert multiply_reward(["q"], [reply], answer=["56088"]) == [score]


def test_multiply_prompts_show_the_tool_and_the_task_brings_its_environment(chat_policy):
    from actors.tasks.multiply import SHOTS, SYSTEM
    from actors.tasks.registry import make_task
    from learner.driver.sources import build_prompts

    task = make_task("multiply", operand_digits=[3, 3], chat_template=True, tokenizer_path=chat_policy)
    (ex,) = task.eval_set(1)
    a, b = (int(x) for x in ex.prompt.rsplit("What is ", 1)[1].split("?")[0].split(" * "))
    assert 100 <= a <= 999 and 100 <= b <= 999 and ex.answer == str(a * b)
    assert ex.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert all(m["content"] in ex.prompt for m in SHOTS) and ex.prompt.endswith("<|im_start|>assistant\n")
    cfg = load_config(None, ["--model.path", chat_policy, "--task.name", "multiply", "--task.operand_digits", "[3, 3]",
                             "--reward.functions", "[multiply]"])
    assert build_prompts(cfg, chat_policy).env == "calculator"  # the run's episodes use the calculator
