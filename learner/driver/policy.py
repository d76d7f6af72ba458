"""Which policy folder every component loads: the user's ``model.path``, or the built-in one.

Every component loads safetensors only. A ``model.path`` whose weights are
pickle files is refused unless ``model.allow_pickle: true``; then it is
converted here, once, into a safetensors copy (``RUN_DIR/policy-safetensors``)
and that copy is what the learner and the rollout workers load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from actors.models.tiny import _cache_root, prepare_builtin_policy
from actors.rollout.policy import adapter_base, check_policy_files, policy_numel, safetensors_weights
from learner.config import Config, ConfigError

CONVERTED = "policy-safetensors"
MERGED = "policy-from-adapter"  # a LoRA adapter model.path, merged into its base once
_SOURCE = "fleetrl-converted-from.json"  # written last: a folder with it is a whole conversion


def _fingerprint(src: Path) -> dict:
    """What identifies the source folder's content cheaply: its path and its top-level files' sizes and mtimes."""
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(src.iterdir()) if f.is_file()}
    return {"source": str(src), "files": files}


def convert_to_safetensors(src: str, dst: Path) -> Path:
    """Load the pickle-weight policy at ``src`` (trusted: ``model.allow_pickle``) and save it with its
    tokenizer as safetensors in ``dst``; reuses ``dst`` if it already holds this source's conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_path = Path(src).resolve()
    source = _fingerprint(src_path)
    marker = dst / _SOURCE
    if marker.exists() and json.loads(marker.read_text()) == source and safetensors_weights(str(dst)):
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(src_path, dtype="auto", use_safetensors=False)
        model.save_pretrained(tmp)  # safetensors: the default format (and in transformers 5 the only one)
        AutoTokenizer.from_pretrained(src_path).save_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - any loader error, with the key name
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"model.path: cannot convert {src!r} to safetensors: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]}") from None
    (tmp / _SOURCE).write_text(json.dumps(source))
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def merge_adapter_folder(path: str, run_dir, allow_pickle: bool) -> str:
    """A LoRA adapter folder (a LoRA run's policy) as a plain model folder: its base with the
    adapter merged, written once into ``run_dir/policy-from-adapter`` (without ``run_dir``: the
    cache), so every component, vLLM included, loads an ordinary folder, and a LoRA run started
    from it records that folder as its base (the first adapter included)."""
    import torch

    from actors.rollout.policy import load_policy

    src = str(Path(path).resolve())
    dst = (Path(run_dir) / MERGED) if run_dir is not None else \
        _cache_root() / MERGED / hashlib.sha256(src.encode()).hexdigest()[:16]
    if (dst / _SOURCE).is_file() and json.loads((dst / _SOURCE).read_text()).get("src") == src:
        return str(dst.resolve())
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = load_policy(src, device=torch.device("cpu"), dtype="auto", allow_pickle=allow_pickle)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - any loader error, with the key name
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"model.path: cannot merge the LoRA adapter {path!r} into its base: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]}") from None
    (tmp / _SOURCE).write_text(json.dumps({"src": src, "adapter": True}))
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dst)
    return str(dst.resolve())


def resolve_policy(cfg: Config, run_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """The policy folder to load everywhere, building the built-in one if needed. A pickle-only
    ``model.path`` is refused (ConfigError) unless ``model.allow_pickle``; then it is converted
    once into ``run_dir/policy-safetensors`` (without ``run_dir``: the fleetrl cache) and that
    folder is returned, so every component loads safetensors only."""
    if cfg.model.path:
        from transformers import AutoConfig

        check_policy_files(cfg.model.path, cfg.model.allow_pickle)
        if adapter_base(cfg.model.path) is not None:
            return merge_adapter_folder(cfg.model.path, run_dir, cfg.model.allow_pickle), {}
        try:
            AutoConfig.from_pretrained(cfg.model.path)
        except Exception as e:  # noqa: BLE001 - surface any loader error with the key name
            raise ConfigError(f"model.path: cannot load {cfg.model.path!r}: {type(e).__name__}: {e}") from None
        if os.path.isdir(cfg.model.path):  # actors need not share the driver's working directory
            if cfg.model.allow_pickle and not safetensors_weights(cfg.model.path):
                src = str(Path(cfg.model.path).resolve())
                if run_dir is not None:
                    dst = Path(run_dir) / CONVERTED
                else:
                    dst = _cache_root() / CONVERTED / hashlib.sha256(src.encode()).hexdigest()[:16]
                dst.parent.mkdir(parents=True, exist_ok=True)
                return str(convert_to_safetensors(src, dst.resolve())), {}
            return str(Path(cfg.model.path).resolve()), {}
        return cfg.model.path, {}
    if cfg.task.name != "reverse":
        raise ConfigError(f"task.name: {cfg.task.name!r} needs a pretrained policy in model.path (the built-in tiny "
                          f"policy is warm-started for reverse only), e.g. `fleetrl model prepare smollm2 DIR`")
    path, info = prepare_builtin_policy(
        task_name=cfg.task.name, num_digits=cfg.task.num_digits, seed=cfg.task.seed,
        labelled_examples=cfg.model.warm_start_examples, target_accuracy=cfg.model.warm_start_target,
        max_steps=cfg.model.warm_start_max_steps, hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers)
    return str(path), info


def payload_bytes(cfg: Config) -> int:
    """Bytes of one full weight payload (every parameter in the rollout workers' dtype), read from
    the safetensors headers of a local ``model.path`` (an adapter folder: its base); 0 when it
    is not known before loading (the built-in policy, a hub id) or small (``model.lora``:
    adapters only)."""
    path = cfg.model.path
    if not path or cfg.model.lora.enabled or not os.path.isdir(path):
        return 0
    numel = policy_numel(adapter_base(path) or path)
    return numel * (2 if resolve_rollout_dtype(cfg, numel) == "bfloat16" else 4)


def resolve_rollout_dtype(cfg: Config, num_params: int) -> str:
    """``rollout.dtype`` resolved (``auto``: by this node's CPU and the policy's size)."""
    from actors.device import auto_dtype, device_kind

    return auto_dtype(cfg.rollout.dtype, device_kind(cfg.rollout.device, cfg.rollout.num_gpus), num_params)
