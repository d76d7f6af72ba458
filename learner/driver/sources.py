"""Where a run's prompts come from: a built-in task or the user's datasets (``data`` section).

``build_prompts`` returns everything the trainer needs of its prompt source:
the picklable source the coordinator streams from (``TaskPrompts`` or
``DatasetPrompts``), the held-out prompts, the verifier evaluation scores
with, the completion length cap and the number of learner steps the run
takes (``train.steps``, or fewer when ``data.epochs`` runs out first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.tasks.chat import load_tokenizer
from actors.tasks.registry import TaskPrompts, make_task
from actors.types import Prompt
from learner.config import Config, ConfigError

DATASET_MAX_NEW_TOKENS = 256
"""``rollout.max_new_tokens: 0`` with a dataset: TRL's default completion length (at most half the
policy's context)."""


@dataclass
class Prompts:
    source: object
    """What the coordinator streams from (``prompt_stream(start)``)."""
    eval: list[Prompt]
    verifier: tuple[str, dict]
    """The reward function evaluation scores with, and its arguments."""
    max_new_tokens: int
    steps: int
    """Learner steps of the run."""
    notes: list[str] = field(default_factory=list)
    """Lines to print at setup."""
    info: dict = field(default_factory=dict)
    env: str = ""
    """The environment a built-in task's episodes need (``Task.env``), used when ``env`` names none."""


def _verifier(cfg: Config, default: str) -> tuple[str, dict]:
    name = cfg.eval.reward or default
    return name, dict(cfg.reward.function_args.get(name, {}))


def task_prompts(cfg: Config, policy_path: str) -> Prompts:
    kwargs = cfg.task.task_kwargs(policy_path)
    task = make_task(cfg.task.name, **kwargs)
    kwargs["chat_template"] = task.chat is not None  # decided once, not again in the coordinator
    notes = []
    if task.reward not in cfg.reward.functions:
        notes.append(f"warning: task {task.name!r} is verified by reward function {task.reward!r}, which "
                     f"reward.functions ({cfg.reward.functions}) does not include")
    if task.chat is not None:
        notes.append(f"prompts rendered with the chat template of {policy_path}")
    held = [Prompt(uid=i, text=e.prompt, metadata={"answer": e.answer})
            for i, e in enumerate(task.eval_set(cfg.task.eval_size))]
    return Prompts(TaskPrompts(cfg.task.name, kwargs), held, _verifier(cfg, task.reward),
                   cfg.rollout.max_new_tokens or task.max_new_tokens, cfg.train.steps, notes, env=task.env)


def dataset_prompts(cfg: Config, policy_path: str, say=print) -> Prompts:
    from transformers import AutoConfig

    from actors.data.source import load_prompt_data

    d = cfg.data
    context = getattr(AutoConfig.from_pretrained(policy_path), "max_position_embeddings", None) or 1 << 30
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.max_model_len:
        context = min(context, cfg.rollout.vllm.max_model_len)  # the engine's context, for training and evaluation
    max_new = cfg.rollout.max_new_tokens or min(DATASET_MAX_NEW_TOKENS, context // 2)
    limit = d.max_prompt_tokens or context - max_new
    if limit < 1:
        raise ConfigError(f"rollout.max_new_tokens: {max_new} leaves no room for a prompt in the policy's context "
                          f"of {context} tokens")
    data = load_prompt_data(d, load_tokenizer(policy_path), max_prompt_tokens=min(limit, context - max_new), say=say)
    steps = cfg.train.steps
    notes = [f"data: {data.info['train_rows']} train prompts from {len(d.train_files)} files"
             f"{', chat template' if data.info['chat_template'] else ''}; {len(data.eval)} held-out prompts"]
    if d.epochs:
        per_run = d.epochs * data.train.size // cfg.train.prompts_per_step
        if per_run < 1:
            raise ConfigError(f"data.epochs: {d.epochs} epochs of {data.train.size} prompts do not fill one step of "
                              f"train.prompts_per_step={cfg.train.prompts_per_step}")
        if per_run < steps:
            left = d.epochs * data.train.size - per_run * cfg.train.prompts_per_step
            notes.append(f"data: {d.epochs} epochs of {data.train.size} prompts end the run after {per_run} steps "
                         f"(train.steps {steps})" + (f"; the last {left} prompts of the last epoch fill no whole step "
                                                     f"and are not trained" if left else ""))
            steps = per_run
    if not data.eval and (cfg.train.eval_every or cfg.eval.num_samples):
        notes.append("warning: no held-out prompts (data.eval_files / data.eval_fraction): no evaluation")
    return Prompts(data.train, data.eval, _verifier(cfg, cfg.reward.functions[0]), max_new, steps, notes, data.info)


def build_prompts(cfg: Config, policy_path: str, say=print) -> Prompts:
    """The run's prompt source: ``data.train_files`` when set, else the built-in task."""
    return dataset_prompts(cfg, policy_path, say) if cfg.data.enabled else task_prompts(cfg, policy_path)
