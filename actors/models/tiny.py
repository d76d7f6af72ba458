"""The built-in policy: a tiny Llama with a character tokenizer, built offline.

``prepare_builtin_policy`` builds it, warm-starts it by a short supervised pass
on a *small fixed labelled set* (so RL has some reward signal to climb from),
and saves it as an ordinary Hugging Face folder that every component then loads
with ``from_pretrained(path)`` -- exactly as it would load a hub model. The
folder is cached by a hash of everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from actors.tasks.evaluate import greedy_accuracy
from actors.tasks.base import Example
from actors.tasks.registry import make_task

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARS = "0123456789=+-* "
WARM_START_FORMAT = 1  # bump when the recipe below changes, to invalidate caches


def build_char_tokenizer():
    """Character-level fast tokenizer: one token per character, left padding."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_tiny_llama(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                     max_positions: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sft_batch(tokenizer, examples: list[Example]):
    """Right-padded prompt+answer+EOS batch with loss only on answer tokens."""
    ids, labels = [], []
    for e in examples:
        p = tokenizer(e.prompt)["input_ids"]
        a = tokenizer(e.answer)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    lab = torch.tensor([x + [-100] * (n - len(x)) for x in labels])
    return input_ids, mask, lab


def supervised_steps(model, tokenizer, examples: list[Example], optimizer, *, steps: int, batch_size: int,
                     rng: random.Random) -> float:
    """Run ``steps`` supervised steps on random batches of ``examples``; returns last loss."""
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        input_ids, mask, labels = sft_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _cache_root() -> Path:
    return Path(os.environ.get("FLEETRL_CACHE", Path.home() / ".cache" / "fleetrl"))


def prepare_builtin_policy(*, task_name: str = "reverse", num_digits: int = 4, seed: int = 0,
                           labelled_examples: int = 384, target_accuracy: float = 0.3,
                           max_steps: int = 600, hidden_size: int = 128, num_layers: int = 2,
                           cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """Build + warm-start the built-in policy, or return the cached folder.

    Returns ``(policy_dir, info)`` where ``info`` has the warm-start accuracy on
    a validation split, the steps taken and whether it came from the cache.
    """
    spec = dict(format=WARM_START_FORMAT, task=task_name, num_digits=num_digits, seed=seed,
                labelled=labelled_examples, target=target_accuracy, max_steps=max_steps,
                hidden=hidden_size, layers=num_layers, chars=CHARS)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else _cache_root()
    out = root / f"builtin-{task_name}-{key}"
    if (out / "warm_start.json").exists():
        info = json.loads((out / "warm_start.json").read_text())
        info["cached"] = True
        return out, info

    t0 = time.perf_counter()
    task = make_task(task_name, num_digits=num_digits, seed=seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    labelled = task.labelled_set(labelled_examples)
    val = task.validation_set(128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    steps, acc = 0, 0.0
    max_new = num_digits + 1
    while steps < max_steps:
        # check often: a warm start that overshoots into memorising the labelled
        # set leaves a peaked policy that RL then cannot move (measured)
        supervised_steps(model, tokenizer, labelled, opt, steps=5, batch_size=128, rng=rng)
        steps += 5
        acc = greedy_accuracy(model, tokenizer, val, max_new_tokens=max_new)
        if acc >= target_accuracy:
            break
    info = dict(spec, key=key, val_accuracy=acc, steps=steps, seconds=round(time.perf_counter() - t0, 2),
                cached=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warm_start.json").write_text(json.dumps(info, indent=2))  # written last: the marker
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; theirs is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("warm-started built-in policy in %.1fs (%d steps, val acc %.2f) -> %s", info["seconds"], steps, acc, out)
    return out, info
