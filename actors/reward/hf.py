"""A Hugging Face sequence-classification reward model, loaded safely.

``HFRewardModel(path)`` scores ``prompt + completion`` with an
``AutoModelForSequenceClassification`` that has exactly one output (the
reward). Loading is refused up front, before any file is deserialised, for
folders that would need pickle or remote code: :func:`check_checkpoint` says
why. Only ``*.safetensors`` weights are read and ``trust_remote_code`` is off.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight-file suffixes that are (or may be) pickles: loading one can run code."""
_CONFIG_FILES = ("config.json", "tokenizer_config.json")
_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_JSON_BYTES = 16 * 1024 * 1024
"""Largest config / index file read (a bigger one is refused, not read)."""
MAX_ENTRIES = 10_000
"""Most entries at the top of a checkpoint folder that are looked at."""


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` (a regular file of at most MAX_JSON_BYTES); ValueError if it is not one."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path}: not a regular file of at most {MAX_JSON_BYTES} bytes")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _has_pickles(root: Path) -> bool:
    """Whether the top level of ``root`` holds a file (or a symlink, followed) with a pickle suffix."""
    with os.scandir(root) as entries:
        for i, entry in enumerate(entries):
            if i >= MAX_ENTRIES:
                raise ValueError(f"reward model {root}: more than {MAX_ENTRIES} entries; not a checkpoint folder")
            if entry.name.lower().endswith(PICKLE_SUFFIXES):
                return True
    return False


def _shards(root: Path) -> list[str]:
    """The shard file names ``model.safetensors.index.json`` points at, each a plain
    ``*.safetensors`` name in ``root`` that exists (ValueError otherwise)."""
    weight_map = _read_json(root / _INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"reward model {root}: {_INDEX} has no weight_map")
    names = sorted({str(v) for v in weight_map.values()})
    for name in names:
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".safetensors"):
            raise ValueError(f"reward model {root}: {_INDEX} names a shard that is not a *.safetensors file "
                             "in the folder")
        if not (root / name).is_file():
            raise ValueError(f"reward model {root}: a shard named in {_INDEX} is missing")
    return names


def check_checkpoint(path) -> None:
    """Refuse (ValueError, with the reason) a folder that is unsafe or unusable to load.

    Checks only what ``from_pretrained(use_safetensors=True)`` reads, at the top of
    the folder (symlinks followed, no recursive walk, nothing deserialised):
    ``config.json``; ``model.safetensors``, or ``model.safetensors.index.json`` and
    every shard it names (plain file names in the folder); no pickle weights
    (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``) next to them;
    and neither config asks for remote code (``auto_map``). Errors never list the
    folder's contents. Subfolders are not looked at: transformers does not load them.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"reward model {root}: no such directory")
    try:
        pickles = _has_pickles(root)
    except OSError as e:
        raise ValueError(f"reward model {root}: cannot read the folder ({e.strerror or type(e).__name__})") from None
    if pickles:
        raise ValueError(f"reward model {root}: refusing a folder with pickle weight files "
                         f"({', '.join(PICKLE_SUFFIXES)}); they can run arbitrary code when loaded -- keep only "
                         "*.safetensors weights")
    if not (root / _WEIGHTS).is_file():
        if not (root / _INDEX).is_file():
            raise ValueError(f"reward model {root}: no *.safetensors weights ({_WEIGHTS} or {_INDEX}; "
                             "only safetensors checkpoints are loaded)")
        _shards(root)
    if not (root / "config.json").is_file():
        raise ValueError(f"reward model {root}: no config.json")
    for name in _CONFIG_FILES:
        if (root / name).is_file() and "auto_map" in _read_json(root / name):
            raise ValueError(f"reward model {root}: {name} has 'auto_map', which needs remote code "
                             "(trust_remote_code is never enabled)")


def checkpoint_version(path) -> str:
    """A short fingerprint of a checkpoint: config.json plus weight file names and sizes.

    Cheap (no weight bytes are hashed); changes when the config or the set or
    size of weight files changes.
    """
    root = Path(path)
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


class HFRewardModel:
    """Scores ``prompt + completion`` with a one-output sequence-classification model.

    ``score`` is serialised by a lock: fast tokenizers are not safe to call
    from several threads at once, and a single model gains nothing from it.
    ``num_threads`` (if given) sets torch's process-wide intra-op thread count.
    """

    kind = "hf-sequence-classification"

    def __init__(self, path, *, device: str = "cpu", batch_size: int = 32, max_length: int = 512,
                 num_threads: int | None = None):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        check_checkpoint(path)
        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.version = checkpoint_version(path)
        if num_threads:
            torch.set_num_threads(num_threads)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        if config.num_labels != 1:
            raise ValueError(f"reward model {path}: has {config.num_labels} labels; a reward model needs exactly 1")
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"reward model {path}: tokenizer has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"  # with a causal model, right padding keeps scores independent of the batch
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True,
            output_loading_info=True)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(f"reward model {path}: weights missing for {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} (not a trained sequence-classification "
                             "checkpoint? those weights would be random)")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        self.tokenizer = tok
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()

    def score(self, prompts: list[str], completions: list[str], **metadata) -> list[float]:
        """One float per sample: the model's single logit for ``prompt + completion``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                out.extend(logits[:, 0].float().cpu().tolist())
        return out


def build_tiny_reward_model(path, *, seed: int = 0) -> Path:
    """Save a tiny random ``LlamaForSequenceClassification`` (1 label) + char tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from actors.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
