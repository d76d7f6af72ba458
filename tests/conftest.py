"""Shared fixtures: one real local Ray instance per session, tiny local models.

Nothing here is mocked: models are real ``transformers`` Llamas built from a
config with a character tokenizer made offline, saved to disk and loaded with
``from_pretrained``; Ray is a real local instance bound to loopback.
"""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers inherit the environment of the local instance: let them import
# reward functions defined in this test package ("tests.test_reward:...").
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until truthy or fail after ``timeout_s`` (no sleep-and-hope)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def start_session_ray():
    """The tests' local Ray instance (started unless it runs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.2", include_dashboard=False,
                 object_store_memory=300_000_000, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def _shutdown_ray_at_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_shutdown_ray_at_the_end):
    """The local Ray instance, for every module that asks: started at the first, and
    again for a module after one that shut it down (``without_session_ray``)."""
    return start_session_ray()


@pytest.fixture
def without_session_ray():
    """No session Ray instance during this test (e.g. while it runs a cluster of its own);
    the next module that asks for ``ray_session`` starts it again. Only for a module whose
    other tests do not use ``ray_session``."""
    import ray

    ray.shutdown()
    yield
    assert not ray.is_initialized(), "a test that asked for no session Ray started one"


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A randomly initialised tiny Llama + char tokenizer saved as an HF folder."""
    import torch

    from actors.models.tiny import build_char_tokenizer, build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-policy")
    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, max_positions=16, seed=0)
    with torch.no_grad():  # a sharper random policy so sampled completions vary in length
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def fleetrl_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("fleetrl-cache")
    os.environ["FLEETRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def warm_policy(fleetrl_cache) -> str:
    """The built-in warm-started policy (default recipe), built once per session."""
    from actors.models.tiny import prepare_builtin_policy

    path, _ = prepare_builtin_policy(cache_dir=fleetrl_cache)
    return str(path)
