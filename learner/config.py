"""The run configuration: one ``kw_only`` dataclass per component.

YAML files and command-line overrides map onto these dataclasses; unknown keys
and values of the wrong type are errors that name the offending key. The field
docstrings are the configuration reference (``fleetrl config`` prints them).

Override convention: ``--section.key VALUE`` (or ``--section.key=VALUE``);
``VALUE`` is parsed as YAML, so ``--learner.betas '[0.9, 0.95]'`` and
``--rollout.resources '{rollout: 1}'`` work.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from actors.data.config import DataConfig
from actors.envs.config import EnvConfig
from actors.device import device_kind
from actors.reward.worker import RewardConfig
from actors.rollout.evaluate import EvalConfig
from actors.rollout.worker import RolloutConfig
from actors.tasks.arithmetic import Arithmetic
from actors.tasks.reverse import ReverseDigits
from actors.weights.lora import LoraSpec
from actors.validation import ConfigError, check_resources, require  # noqa: F401 - ConfigError is part of this module's API
from learner.learner import LearnerConfig
from learner.watch.config import WatchConfig
from learner.schema import from_dict, merge, parse_overrides  # noqa: F401 - parse_overrides is part of this module's API


@dataclass(kw_only=True)
class ModelConfig:
    path: Optional[str] = None
    """Policy to train: a Hugging Face model folder or hub name, loaded with
    ``from_pretrained``. Empty = build the built-in tiny Llama for the task and
    warm-start it on a small labelled set (cached under ``~/.cache/fleetrl``)."""
    warm_start_examples: int = 384
    """Built-in policy only: size of the fixed labelled set for the warm start."""
    warm_start_target: float = 0.3
    """Built-in policy only: stop the warm start once validation accuracy reaches this."""
    warm_start_max_steps: int = 600
    """Built-in policy only: upper bound on supervised warm-start steps."""
    hidden_size: int = 128
    """Built-in policy only: hidden width of the tiny Llama."""
    num_layers: int = 2
    """Built-in policy only: number of transformer layers."""
    allow_pickle: bool = False
    """Load a policy whose weights are pickle files (``pytorch_model.bin``, ``*.pt``...): unpickling runs
    code from the file, so by default only safetensors weights load."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """Train LoRA adapters (PEFT) instead of every weight: the learner's optimizer holds the
    adapters only, the KL reference is the base (adapters off), and weight syncs carry only the
    adapters (rollout workers merge them into their own copy of the base)."""

    def __post_init__(self):
        require(self.warm_start_examples >= 1, "model.warm_start_examples", "must be >= 1")
        require(self.warm_start_max_steps >= 1, "model.warm_start_max_steps", "must be >= 1")
        require(self.hidden_size >= 4 and self.hidden_size % 4 == 0, "model.hidden_size",
                "must be a positive multiple of 4 (4 attention heads)")
        require(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        require(0 <= self.warm_start_target <= 1, "model.warm_start_target", "must be in [0, 1]")


@dataclass(kw_only=True)
class TaskConfig:
    name: Literal["reverse", "arithmetic", "multiply"] = "reverse"
    """Built-in verifiable task that supplies prompts and held-out examples: reverse (a digit string),
    arithmetic (``a op b``, strict answer format; pair it with ``reward.functions: [arithmetic]``) or
    multiply (``a * b`` with a calculator tool: multi-turn episodes in the ``calculator`` environment;
    pair it with ``reward.functions: [multiply]``)."""
    num_digits: int = 4
    """reverse: length of the digit strings."""
    operand_digits: list[int] = field(default_factory=lambda: [2, 2])
    """arithmetic, multiply: digits of the first and the second operand."""
    operations: list[str] = field(default_factory=lambda: ["+"])
    """arithmetic: operations to draw from (+, -, *); for - the larger operand comes first."""
    chat_template: Optional[bool] = None
    """Render each prompt as a user message with the policy tokenizer's chat template (true),
    as a bare completion prompt (false), or whichever the tokenizer allows (null)."""
    seed: int = 0
    """Seed of the task's prompt stream, labelled set and held-out set."""
    eval_size: int = 200
    """Held-out prompts scored with greedy decoding before and after training."""

    def __post_init__(self):
        ReverseDigits.check(self.num_digits)
        require(self.eval_size >= 1, "task.eval_size", "must be >= 1")
        Arithmetic.check(self.operand_digits, self.operations)

    def task_kwargs(self, tokenizer_path: str | None = None) -> dict:
        """Keyword arguments of ``actors.tasks.registry.make_task`` for this task (the name excluded)."""
        own = (dict(num_digits=self.num_digits) if self.name == "reverse" else
               dict(operand_digits=list(self.operand_digits)) if self.name == "multiply" else
               dict(operand_digits=list(self.operand_digits), operations=list(self.operations)))
        return dict(own, seed=self.seed, chat_template=self.chat_template, tokenizer_path=tokenizer_path)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 2000
    """Learner steps (optimizer updates) to run."""
    max_wall_s: float = 140.0
    """Stop early after this many seconds of RL (0 = no limit); keeps the default job within 3 minutes."""
    prompts_per_step: int = 16
    """Groups (prompts) per learner step; samples per step = this x rollout.group_size."""
    max_staleness: int = 1
    """How many policy versions a trained sample may lag the learner (0 = on-policy, synchronous)."""
    sample_timeout_s: float = 120.0
    """Fail the run if no scored group arrives for this long."""
    seed: int = 0
    """Seed for the learner and the rollout workers' samplers."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end of the run)."""
    resume: str = ""
    """Continue from the newest complete checkpoint in this run directory or checkpoint folder
    ("auto" = the run's own output directory); --resume DIR on the command line."""
    eval_every: int = 0
    """Held-out evaluation (``eval`` section) every N steps, greedy accuracy logged as eval_accuracy
    (0 = only before and after)."""
    placement: Literal["none", "pack", "strict_pack", "spread"] = "none"
    """Put the learner, rollout and reward workers in one Ray placement group: pack (together
    where possible), strict_pack (all on one node), spread (across nodes); none = each by its resources."""
    log_every: int = 10
    """With ``--no-progress``: print a progress line every N steps instead of the progress bar."""
    weight_sync: Literal["object_store", "collective"] = "object_store"
    """How new weights reach the rollout workers: object_store (one ray.put per version, every worker copies
    it) or collective (a torch.distributed broadcast from the learner, rank 0, to every worker; workers
    outside the current group get the version through the object store)."""
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """collective only: auto = nccl when the learner and every rollout worker run on CUDA, each on its own
    GPU, else gloo."""
    max_restarts: int = 0
    """When the learner or the coordinator dies: restart the run this many times from its newest
    checkpoint (new actors, same run directory); 0 = end the run (after saving what can be saved)."""
    keep_checkpoints: int = 3
    """Keep only the newest N checkpoints of the run (0 = keep all)."""
    stop_timeout_s: float = 60.0
    """On Ctrl-C, SIGTERM or a failure: how long the final checkpoint and summary may take; a second
    Ctrl-C exits at once."""
    weight_sync_timeout_s: float = 60.0
    """collective only: timeout of a group's rendezvous and of each broadcast; a dead or stuck worker fails
    the broadcast within it, and that version goes out through the object store instead."""

    def __post_init__(self):
        require(self.weight_sync_timeout_s > 0, "train.weight_sync_timeout_s", "must be > 0")
        require(self.steps >= 1, "train.steps", "must be >= 1")
        require(self.max_wall_s >= 0, "train.max_wall_s", "must be >= 0 (0 = no limit)")
        require(self.log_every >= 0, "train.log_every", "must be >= 0")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        require(self.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        require(self.max_staleness >= 0, "train.max_staleness", "must be >= 0")
        require(self.sample_timeout_s > 0, "train.sample_timeout_s", "must be > 0")
        require(self.max_restarts >= 0, "train.max_restarts", "must be >= 0")
        require(self.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = keep all)")
        require(self.stop_timeout_s > 0, "train.stop_timeout_s", "must be > 0")


@dataclass(kw_only=True)
class ControlConfig:
    enabled: bool = True
    """Serve the fleetrl.control.v1 Control service while training (reward add/remove/list, status)."""
    host: str = "127.0.0.1"
    """Address the Control server binds; non-loopback addresses need a token (FLEETRL_TOKEN or token_file)."""
    port: int = 0
    """Port of the Control server; 0 picks a free one (printed at start, written to control.json)."""
    token_file: Optional[str] = None
    """File with the bearer token clients must send; default: the FLEETRL_TOKEN environment variable."""
    tls_cert: Optional[str] = None
    """PEM certificate chain: serve TLS instead of plaintext (with tls_key)."""
    tls_key: Optional[str] = None
    """PEM private key for tls_cert."""
    allowed_reward_endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1", "localhost"])
    """Hosts (``host``) or endpoints (``host:port``) of reward servers the run's reward token
    ($FLEETRL_REWARD_TOKEN) may be sent to; registering any other endpoint needs a per-model token."""
    reward_checkpoint_roots: list[str] = field(default_factory=list)
    """Folders under which ``reward add --checkpoint DIR`` may load a local reward model; empty = none
    (local reward checkpoints cannot be registered over Control)."""
    max_reward_models: int = 8
    """Most reward models registered at once (each is a Ray actor)."""
    probe_timeout_s: float = 30.0
    """Deadline for a registration's probe of a new reward model (GetMetadata or loading the checkpoint)."""

    def __post_init__(self):
        require(0 <= self.port < 65536, "control.port", "must be in [0, 65535]")
        require(self.max_reward_models >= 0, "control.max_reward_models", "must be >= 0")
        require(self.probe_timeout_s > 0, "control.probe_timeout_s", "must be > 0")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The built-in task (the prompt source unless data.train_files is set)."""
    data: DataConfig = field(default_factory=DataConfig)
    """User prompt datasets."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout workers and sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward workers and functions."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner optimisation and placement."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    control: ControlConfig = field(default_factory=ControlConfig)
    """The Control gRPC service of the running trainer."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (on the rollout workers)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn episodes: the environment (tools) the policy acts in, and the episode budgets."""
    watch: WatchConfig = field(default_factory=WatchConfig)
    """Watching a run: TensorBoard/wandb, sample logging, report.png."""

    def __post_init__(self):
        if not self.reward.model_disable_after_s:
            self.reward.model_disable_after_s = self.train.sample_timeout_s / 4
        require(self.reward.model_disable_after_s < self.train.sample_timeout_s, "reward.model_disable_after_s",
                f"must be < train.sample_timeout_s ({self.train.sample_timeout_s:g}): a paused run must disable "
                f"an unhealthy reward model before it gives up waiting for samples")
        require(not (self.model.lora.enabled and self.learner.num_workers > 1), "model.lora",
                "LoRA with learner.num_workers > 1 is not supported yet: use one learner rank")
        for section in ("learner", "rollout", "reward"):
            check_resources(f"{section}.resources", getattr(self, section).resources)
        if self.train.weight_sync == "collective" and self.train.weight_sync_backend == "nccl":
            for section in ("learner", "rollout"):
                c = getattr(self, section)
                require(device_kind(c.device, c.num_gpus) == "cuda", "train.weight_sync_backend",
                        f"nccl needs the {section} on CUDA ({section}.device {c.device!r}, {section}.num_gpus "
                        f"{c.num_gpus}); use auto or gloo")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides, validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"{p}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return from_dict(Config, data)


def field_docs(cls) -> dict[str, str]:
    """Field name -> docstring (the string literal right after each field)."""
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown() -> str:
    """The configuration reference as Markdown tables (used by the README)."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else typing.get_type_hints(Config)[section.name]
        lines.append(f"**`{section.name}`** ({field_docs(Config).get(section.name, '')})\n")
        lines.append("| key | default | meaning |\n|---|---|---|")
        lines += _reference_rows(cls, section.name)
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls, prefix: str) -> list[str]:
    """One table row per field of ``cls``; a nested dataclass field expands into its own rows."""
    docs, inst, rows = field_docs(cls), cls(), []
    for f in dataclasses.fields(cls):
        default = getattr(inst, f.name)
        if dataclasses.is_dataclass(default):
            rows += _reference_rows(type(default), f"{prefix}.{f.name}")
        else:
            rows.append(f"| `{prefix}.{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
    return rows
