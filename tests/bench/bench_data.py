"""User prompt datasets (``data.train_files``): load time, memory and hand-out rate.

    .venv/bin/python tests/bench/bench_data.py [--quick]

A JSONL prompt file of 10k and 1M rows (``--quick``: 10k and 100k) is generated
in a temp dir (``{"prompt": ~60-char question, "answer": number, "data_source":
one of 4}``), plus a Parquet copy of the large one. Measured, in one run:

1. load: ``load_prompt_data`` cold (empty ``FLEETRL_CACHE``: JSON->Arrow and
   rendering + token counting with ``Dataset.map``) and warm (the same file
   again: the cached Arrow files), with the built-in character tokenizer and,
   for the 10k file, a ChatML tokenizer (``apply_chat_template`` per row).
2. memory: a fresh subprocess loads the large file (warm) and hands out 100k
   prompts through a ``Coordinator``; RSS (anonymous = Python heap, file =
   mapped Arrow pages) and gc-tracked objects before load, after load and after
   the hand-out, vs. the Arrow files on disk, and ``len(pickle.dumps(data.train))``
   (what goes to the coordinator actor). The point: the rows stay in the
   memory-mapped Arrow files, a 1M-row file does not become 1M Python objects.
3. hand-out rate: prompts/s a ``Coordinator`` (plain object, asyncio, gate held
   open, ``prompts_per_request=8``) hands out from the large ``DatasetPrompts``
   stream, vs. the prompts/s the rollout workers consume in the default job
   (a 20 s ``fleetrl train`` run: ``samples_per_s / rollout.group_size`` of its
   summary.json). The ratio must be >= 20x: the data source is never the bottleneck.

Prints one line per measurement, a JSON summary and a Markdown table for the README.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ENV0 = dict(os.environ)  # for the training run: the real FLEETRL_CACHE (the built-in policy is cached there)

QUICK = "--quick" in sys.argv
SMALL, LARGE = 10_000, (100_000 if QUICK else 1_000_000)
HANDOUT_N, MEMORY_N = 50_000, 100_000
MAX_TOKENS = 1024  # nothing is dropped: every row stays
SOURCES = ("gsm8k", "math", "aime", "synthetic")
TEMPLATES = (("What is {a} plus {b}? Reply with only the resulting number.", lambda a, b: a + b),
             ("Compute {a} times {b} and give the product as a number.", lambda a, b: a * b),
             ("A shop sells {a} apples and {b} pears. How many fruits in all?", lambda a, b: a + b),
             ("Subtract {b} from {a}. What number do you get at the end?", lambda a, b: a - b),
             ("If x = {a} and y = {b}, what is the value of x + y exactly?", lambda a, b: a + b),
             ("Tom has {a} coins and finds {b} more. How many coins now?", lambda a, b: a + b))
RESULTS: dict[str, dict] = {}


def report(name: str, **values):
    RESULTS[name] = values
    print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
          flush=True)


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            (text, op), a, b = rng.choice(TEMPLATES), rng.randrange(10, 10_000), rng.randrange(10, 10_000)
            f.write(json.dumps({"prompt": text.format(a=a, b=b), "answer": str(op(a, b)),
                                "data_source": SOURCES[rng.randrange(4)]}) + "\n")
    return path


def to_parquet(path: Path) -> Path:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    out = path.with_suffix(".parquet")
    pq.write_table(pj.read_json(path), out)
    return out


def du_mib(folder: Path, pattern: str = "*.arrow") -> float:
    return sum(f.stat().st_size for f in folder.rglob(pattern)) / 2**20


def rss_mib() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            fields[k] = round(int(v.split()[0]) / 1024, 1)
    return fields


def load(path: Path, tok, cache: Path):
    os.environ["FLEETRL_CACHE"] = str(cache)  # read by actors.data.files.cache_dir at every load
    from actors.data.config import DataConfig
    from actors.data.source import load_prompt_data

    t = time.perf_counter()
    data = load_prompt_data(DataConfig(train_files=[str(path)], answer_key="answer"), tok,
                            max_prompt_tokens=MAX_TOKENS, say=lambda *a: None)
    return data, time.perf_counter() - t


async def hand_out(stream, n: int) -> tuple[int, float]:
    """Prompts/s of ``Coordinator.acquire`` over ``n`` prompts; each batch is settled at once
    (as a real run's ``put`` does), so ``in_flight`` does not grow."""
    from actors.runtime.coordinator import Coordinator

    c = Coordinator(stream, groups_per_step=64, prompts_per_request=8, max_staleness=10**9)
    got, t = 0, time.perf_counter()
    while got < n:
        batch = (await c.acquire("w")).prompts
        c.in_flight.clear()
        got += len(batch)
    return got, time.perf_counter() - t


def bench_load(tmp: Path, files: dict, chat_tok):
    from actors.models.tiny import build_char_tokenizer

    char = build_char_tokenizer()
    load(write_rows(tmp / "warmup.jsonl", 100), char, tmp / "cache-warmup")  # first-call costs: not in a case
    cases = [("small_jsonl_char", files["small"], char, SMALL), ("small_jsonl_chat", files["small"], chat_tok, SMALL),
             ("large_jsonl_char", files["large"], char, LARGE), ("large_parquet_char", files["parquet"], char, LARGE)]
    for name, path, tok, n in cases:
        cache = tmp / f"cache-{name}"
        data, cold = load(path, tok, cache)
        assert data.info["train_rows"] == n, data.info
        del data
        gc.collect()
        data, warm = load(path, tok, cache)
        report(f"load/{name}", rows=n, cold_s=round(cold, 2), cold_rows_per_s=round(n / cold),
               warm_s=round(warm, 3), warm_rows_per_s=round(n / warm), arrow_mib=round(du_mib(cache), 1),
               chat_template=data.info["chat_template"])
        del data
        gc.collect()


def child_memory(path: str, cache: str) -> None:
    """In a fresh process: RSS and gc objects around a warm load and a 100k-prompt hand-out."""
    import datasets  # noqa: F401 - imported before the baseline, like the coordinator actor has it

    from actors.models.tiny import build_char_tokenizer
    from actors.runtime.coordinator import Coordinator  # noqa: F401

    tok = build_char_tokenizer()
    gc.collect()
    out = {"before_load": {**rss_mib(), "gc_objects": len(gc.get_objects())}}
    data, secs = load(Path(path), tok, Path(cache))
    gc.collect()
    out["after_load"] = {**rss_mib(), "gc_objects": len(gc.get_objects())}
    out["load_s"] = round(secs, 3)
    out["pickle_bytes"] = len(pickle.dumps(data.train))
    n, secs = asyncio.run(hand_out(data.train.prompt_stream(0), MEMORY_N))
    gc.collect()
    out["after_handout"] = {**rss_mib(), "gc_objects": len(gc.get_objects()), "prompts": n}
    out["rows"] = data.train.size
    print("CHILD " + json.dumps(out), flush=True)


def bench_memory(tmp: Path, files: dict):
    cache = tmp / "cache-large_jsonl_char"  # warm from bench_load
    proc = subprocess.run([sys.executable, __file__, "--child-memory", str(files["large"]), str(cache)],
                          capture_output=True, text=True, env={**os.environ, "FLEETRL_CACHE": str(cache)})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD ")), None)
    if line is None:
        raise RuntimeError(f"memory child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    m = json.loads(line[6:])
    b, a, h = m["before_load"], m["after_load"], m["after_handout"]
    report("memory", rows=m["rows"], arrow_on_disk_mib=round(du_mib(cache), 1),
           jsonl_mib=round(files["large"].stat().st_size / 2**20, 1), fresh_process_warm_load_s=m["load_s"],
           rss_before_mib=b["VmRSS"], rss_after_load_mib=a["VmRSS"], rss_after_handout_mib=h["VmRSS"],
           anon_growth_load_mib=round(a["RssAnon"] - b["RssAnon"], 1),
           anon_growth_handout_mib=round(h["RssAnon"] - a["RssAnon"], 1),
           file_rss_after_handout_mib=h["RssFile"], gc_objects_growth_load=a["gc_objects"] - b["gc_objects"],
           gc_objects_growth_handout=h["gc_objects"] - a["gc_objects"], pickle_bytes=m["pickle_bytes"])


def bench_handout(tmp: Path, files: dict):
    from actors.models.tiny import build_char_tokenizer

    data, _ = load(files["large"], build_char_tokenizer(), tmp / "cache-large_jsonl_char")
    n, secs = asyncio.run(hand_out(data.train.prompt_stream(0), HANDOUT_N))
    stream, t = data.train.prompt_stream(0), time.perf_counter()  # the bare stream: row reads + Prompt objects
    for _ in range(HANDOUT_N):
        next(stream)
    bare = time.perf_counter() - t
    report("handout", prompts=n, coordinator_prompts_per_s=round(n / secs), bare_stream_prompts_per_s=round(
        HANDOUT_N / bare), us_per_prompt=round(secs / n * 1e6, 1))


def bench_consumption(tmp: Path):
    from actors.rollout.worker import RolloutConfig

    out = tmp / "train-run"
    cmd = [str(Path(sys.executable).with_name("fleetrl")), "train", "--output-dir", str(out), "--no-progress",
           "--train.max_wall_s", "20", "--train.eval_every", "0", "--task.eval_size", "8", "--watch.plot", "false"]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=ENV0, capture_output=True, text=True)
    found = sorted(out.rglob("summary.json"))
    if proc.returncode or not found:
        raise RuntimeError(f"training run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads(found[-1].read_text())
    g = RolloutConfig().group_size
    report("consumption", steps=s["steps"], rl_s=s["rl_s"], samples_per_s=s["samples_per_s"], group_size=g,
           prompts_per_s=round(s["samples_per_s"] / g, 1),
           produced_prompts_per_s=round(s["produced"] / s["rl_s"] / g, 1) if s.get("rl_s") else 0.0)


def table() -> str:
    M, H, C = (RESULTS[k] for k in ("memory", "handout", "consumption"))
    ratio = H["coordinator_prompts_per_s"] / C["prompts_per_s"]
    RESULTS["ratio"] = {"handout_over_consumption": round(ratio, 1), "required": 20}
    big = f"{LARGE // 1000}k" if LARGE < 10**6 else "1M"
    rows = [(f"load, {what}", "cold {cold_s:.2f} s ({cold_rows_per_s:,} rows/s), warm {warm_s:.2f} s "
             "({warm_rows_per_s:,} rows/s)".format(**RESULTS[f"load/{key}"]), "–")
            for what, key in (("10k rows JSONL, char tokenizer", "small_jsonl_char"),
                              ("10k rows JSONL, ChatML template", "small_jsonl_chat"),
                              (f"{big} rows JSONL, char tokenizer", "large_jsonl_char"),
                              (f"{big} rows Parquet, char tokenizer", "large_parquet_char"))]
    rows += [(f"memory of a process holding the {big}-row dataset (fresh process, warm load)",
               f"RSS {M['rss_before_mib']:.0f} → {M['rss_after_load_mib']:.0f} MiB after load → "
               f"{M['rss_after_handout_mib']:.0f} MiB after handing out {MEMORY_N:,} prompts; heap (RssAnon) "
               f"+{M['anon_growth_load_mib']:.0f} / +{M['anon_growth_handout_mib']:.0f} MiB, gc objects "
               f"+{M['gc_objects_growth_load']:,} / +{M['gc_objects_growth_handout']:,}; Arrow on disk "
               f"{M['arrow_on_disk_mib']:.0f} MiB (JSONL {M['jsonl_mib']:.0f} MiB); pickle to the coordinator "
               f"{M['pickle_bytes']:,} bytes", "–"),
              (f"prompt hand-out (`Coordinator.acquire`, 8 per request, {big}-row stream) vs. prompts the default "
               f"job's rollout workers consume (samples/s ÷ group size {C['group_size']})",
               f"{H['coordinator_prompts_per_s']:,} vs {C['prompts_per_s']:,} prompts/s",
               f"**{ratio:.0f}×** (≥ 20×)")]
    lines = ["| measurement (`.venv/bin/python tests/bench/bench_data.py" + (" --quick" if QUICK else "") +
             "`) | result | ratio |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    if "--child-memory" in sys.argv:
        i = sys.argv.index("--child-memory")
        return child_memory(sys.argv[i + 1], sys.argv[i + 2])
    from transformers import AutoTokenizer

    from tests.test_pretrained import build_chat_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-bench-data-"))
    t = time.perf_counter()
    files = {"small": write_rows(tmp / "small.jsonl", SMALL, seed=1), "large": write_rows(tmp / "large.jsonl", LARGE)}
    files["parquet"] = to_parquet(files["large"])
    print(f"wrote {SMALL:,} + {LARGE:,} rows (+ Parquet) in {time.perf_counter() - t:.1f} s under {tmp}", flush=True)
    chat_tok = AutoTokenizer.from_pretrained(build_chat_tokenizer(tmp / "chat-tok"))
    try:
        bench_load(tmp, files, chat_tok)
        bench_memory(tmp, files)
        bench_handout(tmp, files)
        bench_consumption(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = table()
    print("\n" + json.dumps(RESULTS))
    print("\n" + md)


if __name__ == "__main__":
    main()
