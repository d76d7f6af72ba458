"""User prompt datasets (``actors.data``): formats, columns, chat templates, epochs, splits, bad input.

Real files in every format ``datasets`` reads, real tokenizers (a character tokenizer and a
byte-level BPE one with a ChatML template), no Ray: the coordinator is driven as a plain object.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from actors.data.config import DataConfig
from actors.data.source import load_prompt_data
from actors.models.tiny import build_char_tokenizer
from actors.rollout.evaluate import pass_at_k
from actors.runtime.coordinator import Coordinator, PromptsExhausted
from actors.types import Group, Prompt, Sample
from learner.config import ConfigError, load_config
from tests.test_pretrained import build_chat_tokenizer

ROWS = [{"prompt": f"{i:04d}=", "answer": f"{i:04d}"[::-1], "data_source": "even" if i % 2 == 0 else "odd",
         "difficulty": i % 3} for i in range(40)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETRL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_chat_tokenizer(tmp_path_factory.mktemp("chat-tok")))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tok, limit=64, say=print, **kw):
    return load_prompt_data(DataConfig(**kw), tok, max_prompt_tokens=limit, say=say)


# -- formats ------------------------------------------------------------------------------------------
def test_every_format_gives_the_same_prompts(tmp_path, char_tok):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS), "parquet": str(tmp_path / "d.parquet"),
             "csv": str(tmp_path / "d.csv"), "disk": str(tmp_path / "saved")}
    ds.to_parquet(paths["parquet"])
    ds.to_csv(paths["csv"], index=False)
    ds.save_to_disk(paths["disk"])
    arrow = next(Path(paths["disk"]).glob("*.arrow"))
    paths["arrow"] = str(arrow.rename(tmp_path / "d.arrow"))
    ds.save_to_disk(paths["disk"])  # again: the rename took its file
    seen = {}
    for kind, path in paths.items():
        data = load(char_tok, train_files=[path], answer_key="answer", shuffle=False)
        seen[kind] = [(p.text, p.metadata["answer"], p.metadata["data_source"])
                      for p in itertools.islice(data.train.prompt_stream(), data.train.size)]
        assert len(seen[kind]) == len(ROWS), kind
    assert {k: v == seen["jsonl"] for k, v in seen.items()} == {k: True for k in seen}
    assert seen["jsonl"][3] == ("0003=", "3000", "odd")


def test_other_columns_reach_the_reward_functions_as_metadata(tmp_path, char_tok):
    data = load(char_tok, train_files=[write_jsonl(tmp_path / "d.jsonl", ROWS)], answer_key="answer", shuffle=False)
    p = data.train.prompt(7)
    assert p.metadata == {"answer": "7000", "data_source": "odd", "difficulty": 1}
    assert p.text == "0007="


def test_verl_layout_message_prompts_and_a_nested_answer(tmp_path, chat_tok):
    rows = [{"data_source": "gsm", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}} for i in range(6)]
    data = load(chat_tok, limit=512, train_files=[write_jsonl(tmp_path / "v.jsonl", rows)],
                answer_key="reward_model.ground_truth", system_prompt="Be brief.", shuffle=False)
    p = data.train.prompt(2)
    expected = chat_tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "What is 2 + 2?"}],
                                            add_generation_prompt=True, tokenize=False)
    assert p.text == expected
    assert p.metadata["answer"] == "4" and p.metadata["data_source"] == "gsm"


def test_string_prompts_use_the_chat_template_when_the_tokenizer_has_one(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    chat = load(chat_tok, limit=512, train_files=[path], shuffle=False)
    bare = load(chat_tok, limit=512, train_files=[path], shuffle=False, chat_template=False,
                system_prompt="Reverse it.")
    assert chat.train.prompt(1).text.startswith("<|im_start|>user\n0001=")
    assert bare.train.prompt(1).text == "Reverse it.\n\n0001="


# -- epochs and resume ----------------------------------------------------------------------------------
def test_each_epoch_hands_out_every_row_once_in_its_own_seeded_order(tmp_path, char_tok):
    data = load(char_tok, train_files=[write_jsonl(tmp_path / "d.jsonl", ROWS)], epochs=3, seed=5)
    stream = [p.text for p in data.train.prompt_stream()]
    n = len(ROWS)
    assert len(stream) == 3 * n  # the stream ends after the last epoch
    epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(r["prompt"] for r in ROWS) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = load(char_tok, train_files=[write_jsonl(tmp_path / "d.jsonl", ROWS)], epochs=3, seed=5)
    assert [p.text for p in again.train.prompt_stream()] == stream  # deterministic by seed
    # resuming at any uid continues the same sequence: (epoch, position) comes from the uid
    assert [p.text for p in data.train.prompt_stream(start=57)] == stream[57:]
    assert data.train.progress(57) == {"epoch": 1, "position": 17, "size": n, "epochs": 3}


def test_eval_fraction_is_a_deterministic_disjoint_split(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = load(char_tok, train_files=[path], eval_fraction=0.25, seed=1)
    b = load(char_tok, train_files=[path], eval_fraction=0.25, seed=1)
    c = load(char_tok, train_files=[path], eval_fraction=0.25, seed=2)
    held = {p.text for p in a.eval}
    train = {p.text for p in itertools.islice(a.train.prompt_stream(), a.train.size)}
    assert len(held) == 10 and len(train) == 30 and not held & train
    assert held == {p.text for p in b.eval}
    assert held != {p.text for p in c.eval}


def test_duplicate_train_and_eval_rows_are_a_warning_with_the_count(tmp_path, char_tok):
    said = []
    load(char_tok, train_files=[write_jsonl(tmp_path / "t.jsonl", ROWS)],
         eval_files=[write_jsonl(tmp_path / "e.jsonl", ROWS[:3] + [{"prompt": "9999=", "answer": "9999"}])],
         say=said.append)
    assert any("3 train rows have the same prompt as a held-out row" in s for s in said), said


def test_too_long_prompts_are_dropped_counted_and_reported(tmp_path, char_tok):
    rows = ROWS[:10] + [{"prompt": "1" * 30 + "=", "answer": "x"}] * 3
    said = []
    data = load(char_tok, limit=8, train_files=[write_jsonl(tmp_path / "d.jsonl", rows)], say=said.append)
    assert data.train.size == 10 and data.info["too_long"] == {"train": 3}
    assert any("3 train prompts longer than 8 tokens were dropped" in s for s in said)
    with pytest.raises(ConfigError, match=r"data.train_files: all 13 prompts are longer than 3 tokens"):
        load(char_tok, limit=3, train_files=[write_jsonl(tmp_path / "d.jsonl", rows)])


# -- bad input: one line naming the file, row or key -------------------------------------------------
@pytest.mark.parametrize("case, match", [
    ("missing", r"data.train_files: .*nope.jsonl: no such file"),
    ("format", r"data.train_files: .*d.txt: unknown format '.txt'"),
    ("empty", r"data.train_files: .*empty.jsonl: .*(no rows|cannot be read)"),
    ("parquet", r"data.train_files: .*bad.parquet: cannot be read"),
    ("prompt_key", r"data.prompt_key: 'question' is not a column of .*d.jsonl \(columns: prompt, answer"),
    ("answer_key", r"data.answer_key: 'solution' is not a column of .*d.jsonl \(columns: prompt, answer"),
    ("not_text", r"data.prompt_key: .*odd.jsonl row 1: the prompt is int"),
    ("role", r"data.prompt_key: .*odd.jsonl row 0: message 0 has unknown role 'wizard'"),
    ("blank", r"data.prompt_key: .*odd.jsonl row 1: the prompt is empty"),
    ("null_answer", r"data.answer_key: .*odd.jsonl row 1: 'answer' is null"),
    ("null_struct", r"data.answer_key: .*odd.jsonl row 0: 'reward_model.ground_truth' is null"),
])
def test_bad_input_is_one_line_naming_the_file_row_or_key(tmp_path, chat_tok, case, match):
    good = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    kw = {"train_files": [good]}
    if case == "missing":
        kw["train_files"] = [str(tmp_path / "nope.jsonl")]
    elif case == "format":
        (tmp_path / "d.txt").write_text("hello")
        kw["train_files"] = [str(tmp_path / "d.txt")]
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        kw["train_files"] = [str(tmp_path / "empty.jsonl")]
    elif case == "parquet":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all" * 10)
        kw["train_files"] = [str(tmp_path / "bad.parquet")]
    elif case == "prompt_key":
        kw["prompt_key"] = "question"
    elif case == "answer_key":
        kw["answer_key"] = "solution"
    elif case == "not_text":
        kw["train_files"] = [write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a"}, {"prompt": 7}])]
    elif case == "role":
        kw["train_files"] = [write_jsonl(tmp_path / "odd.jsonl", [{"prompt": [{"role": "wizard", "content": "hi"}]}])]
    elif case == "blank":
        kw["train_files"] = [write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a"}, {"prompt": "  "}])]
    elif case == "null_answer":
        kw["train_files"] = [write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "answer": "1"},
                                                                    {"prompt": "b", "answer": None}])]
        kw["answer_key"] = "answer"
    elif case == "null_struct":
        kw["train_files"] = [write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "reward_model": None},
                                                                    {"prompt": "b", "reward_model": {"ground_truth": "2"}}])]
        kw["answer_key"] = "reward_model.ground_truth"
    with pytest.raises(ConfigError, match=match) as e:
        load(chat_tok, limit=512, **kw)
    assert "\n" not in str(e.value)


def test_a_csv_with_a_byte_order_mark_reads(tmp_path, char_tok):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,answer\n0012=,2100\n0100=,0010\n".encode("utf-8"))
    data = load(char_tok, train_files=[str(path)], answer_key="answer", shuffle=False)
    assert [(p.text, p.metadata["answer"]) for p in itertools.islice(data.train.prompt_stream(), 2)] == [
        ("0012=", "2100"), ("0100=", "0010")]


def test_a_message_list_without_a_chat_template_is_an_error(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "12="}]}])
    with pytest.raises(ConfigError, match=r"m.jsonl row 0: a message-list prompt needs a chat template"):
        load(char_tok, train_files=[path])


def test_a_yaml_data_section_with_an_unknown_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train_files: [a.jsonl]\n  prompt_column: q\n")
    with pytest.raises(ConfigError, match=r"data.prompt_column: unknown key \(known keys of data: .*prompt_key"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"data.eval_fraction: set either data.eval_files or data.eval_fraction"):
        load_config(None, ["--data.train_files", "[a]", "--data.eval_files", "[b]", "--data.eval_fraction", "0.1"])


# -- the coordinator at the end of the data ----------------------------------------------------------
def _group(p: Prompt, worker: str) -> Group:
    return Group(prompt=p, prompt_ids=[1], worker=worker, samples=[
        Sample(completion_ids=[2], completion_text="x", logprobs=[0.0], policy_version=0, reward=float(i))
        for i in range(2)])


def test_the_coordinator_ends_a_finite_stream_with_prompts_exhausted():
    async def run():
        prompts = (Prompt(uid=i, text=str(i)) for i in range(5))
        c = Coordinator(prompts, groups_per_step=2, prompts_per_request=8, max_staleness=10)
        handed = (await c.acquire("w")).prompts
        assert [p.uid for p in handed] == [0, 1, 2, 3, 4]
        assert c.exhausted
        await c.put([_group(p, "w") for p in handed])
        assert len(await c.get_batch(0, timeout_s=5)) == 2
        assert len(await c.get_batch(0, timeout_s=5)) == 2
        with pytest.raises(PromptsExhausted, match="1/2 groups"):
            await c.get_batch(0, timeout_s=5)  # raised at once, not after the timeout
        assert (await c.acquire("w", timeout_s=0.1))[0] == []  # nothing more to hand out

    asyncio.run(asyncio.wait_for(run(), 4))


def test_dataset_progress_is_in_the_coordinator_stats(tmp_path, char_tok):
    data = load(char_tok, train_files=[write_jsonl(tmp_path / "d.jsonl", ROWS)])
    c = Coordinator(data.train.prompt_stream(45), groups_per_step=2, prompts_per_request=2, max_staleness=0,
                    start_uid=45, progress=data.train.progress)
    assert c.stats()["data"] == {"epoch": 1, "position": 5, "size": 40, "epochs": 0}


def test_dataset_prompts_pickle_without_their_rows(tmp_path, char_tok):
    import pickle

    rows = [{"prompt": f"{i:06d}=" * (4 if i % 10 else 9), "answer": str(i)} for i in range(20_000)]
    data = load(char_tok, limit=40, train_files=[write_jsonl(tmp_path / "big.jsonl", rows)], eval_fraction=0.1)
    assert data.info["too_long"]["train"] == 2000 and data.train.size == 16_200
    data.train.order(0)
    blob = pickle.dumps(data.train)
    # the rows (~600 kB of text), the kept/split row indices and the epoch order stay out of it
    assert len(blob) < 20_000, len(blob)
    assert pickle.loads(blob).prompt(123).text == data.train.prompt(123).text


# -- pass@k -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (4, 2, 3), (5, 3, 5), (6, 1, 4)])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_resuming_on_a_dataset_of_another_size_is_an_error(tmp_path, char_tok):
    import io

    from learner.config import Config
    from learner.driver.sources import Prompts
    from learner.driver.trainer import Trainer

    def trainer_on(rows):
        data = load(char_tok, train_files=[write_jsonl(tmp_path / f"d{len(rows)}.jsonl", rows)])
        t = Trainer(Config(), tmp_path / "run", out=io.StringIO(), progress=False)
        t.prompts = Prompts(data.train, data.eval, ("exact_match", {}), 5, 10)
        return t

    point = {"step": 4, "cursor": 32, "skip": [], **trainer_on(ROWS).data_identity()}
    assert point["data_rows"] == 40
    trainer_on(ROWS).check_same_data(point)  # the same rows: fine
    with pytest.raises(ConfigError, match=r"train.resume: the checkpoint's prompt cursor counts in 40 dataset rows, "
                                          r"this run has 39"):
        trainer_on(ROWS[:39]).check_same_data(point)
    reseeded = trainer_on(ROWS)
    reseeded.prompts.source.seed = 7
    with pytest.raises(ConfigError, match=r"train.resume: .*data.shuffle/data.seed \[True, 0\], this run has \[True, 7\]"):
        reseeded.check_same_data(point)
    changed = trainer_on([dict(r, prompt=r["prompt"] + "0") for r in ROWS])
    changed.check_same_data(point)
    assert "the dataset changed since the checkpoint" in changed.out.getvalue()


def test_fully_excluded_and_stale_prompts_move_the_resume_point_past_them():
    async def run():
        c = Coordinator((Prompt(uid=i, text=str(i)) for i in range(10)), groups_per_step=2, prompts_per_request=3,
                        max_staleness=1)
        handed = (await c.acquire("w")).prompts
        bad = _group(handed[0], "w")
        for s in bad.samples:
            s.reward = None  # unscored: the whole group is excluded
        await c.put([bad, _group(handed[1], "w"), _group(handed[2], "w")])
        await c.get_batch(0, timeout_s=5)
        from actors.weights.payload import Payload

        await c.publish(Payload(version=1, fingerprint="f"), commit_groups=2)
        return c.resume_point(), c.stats()["dropped_by_reason"]

    point, dropped = asyncio.run(asyncio.wait_for(run(), 4))
    assert point == {"cursor": 3, "skip": []}  # uid 0 was excluded, 1 and 2 trained
    assert dropped == {"unscored": 2}
