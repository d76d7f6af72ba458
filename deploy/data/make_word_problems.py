"""Generate small grade-school word problems in GSM8K's format, offline.

Each row is ``{"question": ..., "answer": ..., "data_source": ...}`` where
``answer`` is a short step-by-step solution ending in ``#### <integer>``, exactly
like GSM8K (without GSM8K's ``<<a+b=c>>`` calculator annotations), so the same
loader, chat template and ``math`` verifier (``math-verify`` on the text after
``####``) work on this file and on the real GSM8K.

Families (the ``data_source`` column):

* ``add``      -- one addition ("has 7 ..., buys 5 more ..."),
* ``sub``      -- one subtraction ("had 12 ..., gave 4 away ..."),
* ``mul``      -- one multiplication ("4 bags with 3 ... each"),
* ``two_step`` -- an addition followed by a subtraction, or a product plus a
  few extra items.

Why the numbers are small: the shipped example trains SmolLM2-135M-Instruct
(a 135M-parameter model) for tens of RL steps on CPU, with a handful of prompts
and 8 samples per prompt each step. RL only learns from groups in which some
samples are right and some wrong, so the base model must already solve a fair
fraction of the problems (roughly 15-40% greedy); real GSM8K is far beyond a
135M model and would give almost no signal. Operands are therefore small
(sums of at most 12 + 9, products of at most 5 x 5) and every answer is at most
25. With these sizes the untrained model gets about 17-30% of the first 64 test
questions right greedily, depending on the system prompt; with sums up to
35 and 25% two-step problems it was about 10-17%.

The generator is deterministic for a given ``--seed`` and uses only the
standard library. Questions are deduplicated and the train and test splits are
disjoint by construction (checked with an assertion before writing).

Usage::

    python deploy/data/make_word_problems.py OUT_DIR [--train 2000] [--test 200] [--seed 0]

writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/test.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = [
    ("Tom", "he", "his"), ("Sara", "she", "her"), ("Ben", "he", "his"),
    ("Lily", "she", "her"), ("Omar", "he", "his"), ("Mia", "she", "her"),
    ("Jack", "he", "his"), ("Emma", "she", "her"), ("Leo", "he", "his"),
    ("Zoe", "she", "her"), ("Sam", "he", "his"), ("Nina", "she", "her"),
    ("Raj", "he", "his"), ("Anna", "she", "her"), ("Max", "he", "his"),
    ("Grace", "she", "her"), ("Luis", "he", "his"), ("Ava", "she", "her"),
    ("Kenji", "he", "his"), ("Ella", "she", "her"),
]

# (plural noun, container used by the multiplication templates)
OBJECTS = [
    ("apples", "bags"), ("pencils", "boxes"), ("marbles", "jars"),
    ("stickers", "sheets"), ("cookies", "plates"), ("books", "shelves"),
    ("eggs", "cartons"), ("flowers", "vases"), ("cards", "packs"),
    ("crayons", "boxes"), ("oranges", "baskets"), ("shells", "buckets"),
    ("candies", "bags"), ("toy cars", "boxes"), ("balloons", "bunches"),
    ("muffins", "trays"),
]

ADD_TEMPLATES = [
    "{N} has {a} {obj}. {P} buys {b} more {obj}. How many {obj} does {N} have now?",
    "{N} had {a} {obj}. {P_cap} friend gave {o} {b} more {obj}. How many {obj} does {N} have now?",
    "{N} picked {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did {N} pick in all?",
    "There are {a} {obj} on the table. {N} puts {b} more {obj} on the table. How many {obj} are on the table now?",
    "{N} found {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {N} find altogether?",
]

SUB_TEMPLATES = [
    "{N} had {a} {obj}. {P} gave {b} {obj} to a friend. How many {obj} does {N} have left?",
    "{N} has {a} {obj}. {P} loses {b} of them. How many {obj} does {N} have now?",
    "There were {a} {obj} in a basket. {N} took {b} {obj} out. How many {obj} are left in the basket?",
    "{N} bought {a} {obj} and used {b} of them. How many {obj} are left?",
    "A shop had {a} {obj}. It sold {b} {obj} to {N}. How many {obj} does the shop have left?",
]

MUL_TEMPLATES = [
    "{N} has {a} {box}. Each of the {box} holds {b} {obj}. How many {obj} does {N} have in total?",
    "{N} buys {a} {box} of {obj}. There are {b} {obj} in each of the {box}. How many {obj} did {N} buy?",
    "There are {a} {box} with {b} {obj} each. How many {obj} are there in all?",
    "{N} gets {b} {obj} every day for {a} days. How many {obj} does {N} get in total?",
]

ADD_SUB_TEMPLATES = [
    "{N} has {a} {obj}. {P} buys {b} more and then gives {c} to a friend. How many {obj} does {N} have now?",
    "{N} had {a} {obj}. {P} found {b} more, then lost {c}. How many {obj} does {N} have left?",
    "There are {a} {obj} in a box. {N} adds {b} {obj} and then takes out {c}. How many {obj} are in the box now?",
]

MUL_ADD_TEMPLATES = [
    "{N} has {a} {box} with {b} {obj} in each, and {c} loose {obj}. How many {obj} does {N} have in total?",
    "{N} buys {a} {box} of {obj} with {b} {obj} in each. {P} already had {c} {obj}. How many {obj} does {N} have now?",
]


def _fill(tpl: str, name, obj, **nums) -> str:
    n, p, o = name
    noun, box = obj
    return tpl.format(N=n, P=p.capitalize(), P_cap=o.capitalize(), o="him" if p == "he" else "her",
                      obj=noun, box=box, **nums)


def make_add(rng: random.Random):
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(1, 12), rng.randint(1, 9)
    q = _fill(rng.choice(ADD_TEMPLATES), name, obj, a=a, b=b)
    ans = f"{a} {obj[0]} and {b} more {obj[0]} make {a} + {b} = {a + b} {obj[0]}.\n#### {a + b}"
    return q, ans, "add"


def make_sub(rng: random.Random):
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a = rng.randint(4, 15)
    b = rng.randint(1, a - 1)
    q = _fill(rng.choice(SUB_TEMPLATES), name, obj, a=a, b=b)
    ans = f"{a} {obj[0]} with {b} of them gone leave {a} - {b} = {a - b} {obj[0]}.\n#### {a - b}"
    return q, ans, "sub"


def make_mul(rng: random.Random):
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    q = _fill(rng.choice(MUL_TEMPLATES), name, obj, a=a, b=b)
    ans = f"There are {a} groups of {b} {obj[0]}, so {a} x {b} = {a * b}.\n#### {a * b}"
    return q, ans, "mul"


def make_two_step(rng: random.Random):
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.6:
        a, b = rng.randint(2, 10), rng.randint(1, 6)
        c = rng.randint(1, a + b - 1)
        q = _fill(rng.choice(ADD_SUB_TEMPLATES), name, obj, a=a, b=b, c=c)
        ans = (f"First {a} + {b} = {a + b} {obj[0]}.\n"
               f"Then {a + b} - {c} = {a + b - c}.\n#### {a + b - c}")
    else:
        a, b, c = rng.randint(2, 4), rng.randint(2, 5), rng.randint(1, 5)
        q = _fill(rng.choice(MUL_ADD_TEMPLATES), name, obj, a=a, b=b, c=c)
        ans = (f"The {obj[1]} hold {a} x {b} = {a * b} {obj[0]}.\n"
               f"With the other {c}, that is {a * b} + {c} = {a * b + c}.\n#### {a * b + c}")
    return q, ans, "two_step"


# Family mix: mostly one-step problems, a few two-step ones.
FAMILIES = [(make_add, 0.3), (make_sub, 0.3), (make_mul, 0.25), (make_two_step, 0.15)]


def generate(n: int, seed: int) -> list[dict]:
    """Return ``n`` rows with pairwise distinct questions."""
    rng = random.Random(seed)
    makers, weights = zip(*FAMILIES)
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could only make {len(rows)} distinct questions out of {n}")
        maker = rng.choices(makers, weights=weights)[0]
        q, a, src = maker(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"question": q, "answer": a, "data_source": src})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = generate(args.train + args.test, args.seed)
    # The test split is the first M rows so that it does not change with --train.
    test, train = rows[: args.test], rows[args.test:]
    assert not {r["question"] for r in test} & {r["question"] for r in train}, "train/test overlap"

    os.makedirs(args.out_dir, exist_ok=True)
    for split, data in (("train", train), ("test", test)):
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(data)} rows to {path}")


if __name__ == "__main__":
    main()
