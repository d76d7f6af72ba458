"""Held-out evaluation from the driver: shard the prompts over the live rollout workers.

Each live rollout worker evaluates a shard with its own engine and the
coordinator's newest weights (``RolloutActor.evaluate``), between its
streaming loop's generate calls. A shard whose worker dies is evaluated again
by another live worker; ``MAX_ATTEMPTS`` lost shards fail the evaluation with
one line. The result is ``actors.rollout.evaluate.eval_metrics`` plus the
``policy_version`` evaluated (the oldest of the shards').
"""

from __future__ import annotations

import ray

from actors.rollout.evaluate import EvalConfig, PromptResult, eval_metrics, is_headline
from actors.types import Prompt
from learner.driver.errors import RunFailed, StopRequested

MAX_ATTEMPTS = 3
"""Shards that may be lost (their worker died) in one evaluation before it fails."""


class Evaluation:
    def __init__(self, prompts: list[Prompt], cfg: EvalConfig, *, verifier: tuple[str, dict], source_key: str):
        if not prompts:
            raise ValueError("evaluation needs at least one held-out prompt")
        self.prompts, self.cfg, self.verifier, self.source_key = prompts, cfg, verifier, source_key

    def run(self, actors: dict[str, object], coordinator, stop_requested=None) -> dict:
        """Evaluate on ``actors`` (name -> live rollout actor); returns the metrics."""
        if not actors:
            raise RunFailed("evaluation: no live rollout worker", component="rollout")
        names = list(actors)
        shards = [self.prompts[i::len(names)] for i in range(len(names))]
        pending = {self._submit(actors[n], s, coordinator): (n, s) for n, s in zip(names, shards) if s}
        results: list[PromptResult] = []
        versions, lost = [], 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                if stop_requested is not None and stop_requested.is_set():
                    raise StopRequested()
                continue
            name, shard = pending.pop(ready[0])
            try:
                part, version = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                lost += 1
                others = [n for n in names if n != name]
                if lost >= MAX_ATTEMPTS or not others:
                    raise RunFailed(f"evaluation: {lost} shards lost to dead rollout workers "
                                    f"(last: {name}: {type(e).__name__})", component="rollout") from None
                names = others
                target = others[lost % len(others)]
                pending[self._submit(actors[target], shard, coordinator)] = (target, shard)
                continue
            results += part
            versions.append(version)
        metrics = eval_metrics(sorted(results, key=lambda r: r.uid), self.cfg.ks())
        metrics["policy_version"] = min(versions)
        return metrics

    def _submit(self, actor, shard: list[Prompt], coordinator):
        return actor.evaluate.remote(shard, self.cfg, self.verifier, self.source_key, coordinator)



def eval_line(title: str, m: dict) -> str:
    """One line of an evaluation's headline numbers."""
    parts = [f"{k} {v:.3f}" for k, v in m.items() if is_headline(k)]
    return (f"{title} ({m['prompts']} prompts, policy_version {m['policy_version']}, {m.get('eval_s', 0):.0f}s): "
            + (", ".join(parts) or "nothing scored"))
