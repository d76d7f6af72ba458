"""Loading the policy: a Hugging Face causal LM and its tokenizer, left-padded.

Every component (learner, rollout workers, evaluation) loads the policy
through ``load_policy``, so they all see the same weights and tokenizer.
Weights load from safetensors only (``use_safetensors=True``): unpickling a
``pytorch_model.bin`` can run code from the file. ``check_policy_files`` says,
cheaply and before anything starts, whether a ``model.path`` folder has such
weights; a LoRA adapter folder (PEFT's ``adapter_config.json``, what a run with
``model.lora`` saves as its policy) loads as its base with the adapter merged; with ``model.allow_pickle: true`` the driver converts a pickle-only
folder once to safetensors (``learner.driver.policy.resolve_policy``).
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from actors.validation import ConfigError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and ".." not in path and not path.endswith((".", "-"))


def safetensors_weights(path: str) -> list[str]:
    """The safetensors files ``from_pretrained`` would load from folder ``path`` (top level only):
    ``model.safetensors``, or the shards named by ``model.safetensors.index.json``; [] if none.
    ConfigError if the index is unreadable or names a shard that is not there."""
    names = set(os.listdir(path))
    if SAFE_WEIGHTS in names:
        return [SAFE_WEIGHTS]
    if SAFE_INDEX not in names:
        return []
    try:
        shards = sorted(set(json.loads(open(os.path.join(path, SAFE_INDEX)).read())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"model.path: {path}/{SAFE_INDEX} is unreadable ({type(e).__name__}: {e})") from None
    bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or not s.endswith(".safetensors")
           or not os.path.isfile(os.path.join(path, s))]
    if bad or not shards:
        raise ConfigError(f"model.path: {path}/{SAFE_INDEX} names missing or non-safetensors shards {bad[:3]}")
    return shards


def pickle_weights(path: str) -> list[str]:
    """Top-level files of folder ``path`` that are pickles (``pytorch_model.bin``, ``*.pt``, ...)."""
    return sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES) and os.path.isfile(os.path.join(path, f)))


def _explicit_weights(path: str) -> str | None:
    """``transformers_weights`` of ``config.json`` (a file transformers loads instead of the default names)."""
    try:
        config = json.loads(open(os.path.join(path, "config.json")).read())
    except (OSError, ValueError):
        return None  # the config loader reports it, naming the key
    name = config.get("transformers_weights") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def check_policy_files(path: str, allow_pickle: bool) -> None:
    """ConfigError (one line, naming ``model.path`` / ``model.allow_pickle``) unless the policy
    at ``path`` has safetensors weights, or pickle weights and ``allow_pickle``. Cheap: lists
    the folder's top level only. An empty ``path`` is the built-in policy (safetensors, built
    here); a path that is not on disk passes only as a hub name while the hub is online (the
    hub copy is then loaded with ``use_safetensors=True``)."""
    if not path:
        return
    if not os.path.exists(path):
        if _looks_like_hub_id(path) and os.environ.get("HF_HUB_OFFLINE") != "1":
            return
        raise ConfigError(f"model.path: {path!r} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: {path!r} is not a folder (a Hugging Face model folder is expected)")
    base = adapter_base(path)
    if base is not None:
        if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
            raise ConfigError(f"model.path: {path} is a LoRA adapter without {ADAPTER_WEIGHTS}")
        return check_policy_files(base, allow_pickle)
    explicit = _explicit_weights(path)
    if explicit is not None and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        if not allow_pickle:
            raise ConfigError(f"model.path: {path}/config.json loads weights from {explicit!r}, not safetensors; "
                              f"set model.allow_pickle: true only if you trust it (unpickling can run code)")
        return
    if safetensors_weights(path):
        return
    pickles = pickle_weights(path)
    if not pickles:
        raise ConfigError(f"model.path: {path} has no model weights ({SAFE_WEIGHTS} or {SAFE_INDEX})")
    if not allow_pickle:
        raise ConfigError(f"model.path: {path} has weights only as pickle files ({', '.join(pickles[:3])}): refused, "
                          f"unpickling can run code; convert them to safetensors, or set model.allow_pickle: true "
                          f"if you trust the files")


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter folder (``adapter_config.json``'s
    ``base_model_name_or_path``), or None when ``path`` is not one. ConfigError if it names none."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    try:
        base = json.loads(open(file).read()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"model.path: {file} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"model.path: {file} names no base model (base_model_name_or_path)")
    return base


def policy_numel(path: str) -> int:
    """Parameters stored in the policy folder ``path``, from its safetensors headers (nothing is
    loaded; tied weights are stored once); 0 when ``path`` is not a local safetensors folder."""
    if not os.path.isdir(path):
        return 0
    from safetensors import safe_open

    numel = 0
    for name in safetensors_weights(path):
        with safe_open(os.path.join(path, name), framework="pt") as f:
            numel += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return numel


def load_policy(path: str, *, device: torch.device, dtype: str | torch.dtype = "auto", allow_pickle: bool = False):
    """``from_pretrained`` a causal LM and its tokenizer (left padding); safetensors weights
    only unless ``allow_pickle`` (only the driver's one-time conversion passes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model.path: {path!r} does not exist and the hub is offline")
    dtype_arg = dtype if isinstance(dtype, torch.dtype) or dtype == "auto" else getattr(torch, dtype)
    base = adapter_base(path)
    if base is not None:  # a LoRA adapter: its base, the adapter merged in
        from peft import PeftModel

        model, tokenizer = load_policy(base, device=device, dtype=dtype, allow_pickle=allow_pickle)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.padding_side = "left"
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return PeftModel.from_pretrained(model, path).merge_and_unload(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_arg, use_safetensors=None if allow_pickle else True)
    return model.to(device), tokenizer
