"""`fleetrl train` under `ray job submit` on a real 2-node Ray cluster on this machine.

It starts its own cluster (head + a second node offering the custom resource
"rollout") with `ray start --block` subprocesses and stops exactly what it
started. The session's Ray instance is shut down for it (``without_session_ray``:
two Ray instances on 2 cores would compete) and started again by the next module
that needs it, so this file runs in any order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import wait_for

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def cluster(without_session_ray, tmp_path):
    # the nodes' environment, as a cluster image has it: fleetrl installed and on PATH
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    node_tmp = tempfile.mkdtemp(prefix="ray-n2-")  # short: Ray's socket paths under it must fit 107 bytes
    common = ["--node-ip-address=127.0.0.2", "--object-store-memory=200000000", "--memory=4000000000",
              "--disable-usage-stats", "--block"]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                             *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    procs = [head]
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_for(lambda: ray_cli("job", "list", "--address", address, env=env, timeout=30).returncode == 0,
                 120, interval_s=1, what="the head node's job server")
        # the second node keeps its own temp dir, as a second machine would: sharing the head's,
        # its agent re-unpacks the job's working_dir package into the same path when the
        # driver connects, and the running driver's cwd is deleted under it (measured here)
        worker = subprocess.Popen([str(BIN / "ray"), "start", f"--address=127.0.0.2:{gcs}", "--num-cpus=1",
                                   '--resources={"rollout": 2}', f"--temp-dir={node_tmp}", *common], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(worker)

        def nodes():
            code = ("import json, ray; ray.init(address='127.0.0.2:%d', log_to_driver=False); "
                    "print(json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() if n['Alive']]))" % gcs)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
            return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []

        wait_for(lambda: len(nodes()) == 2, 120, interval_s=1, what="the second node to join")
        yield address, env, nodes()
    finally:
        # kill -9 the nodes' process groups (each `ray start` leads its own session): a graceful
        # `ray start --block` shutdown takes ~30 s here, and nothing of this cluster is kept
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(60)
        shutil.rmtree(node_tmp, ignore_errors=True)
        # `ray start` records the cluster as the machine's "current" one; leave no stale pointer behind
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.2:{gcs}":
            current.unlink()


def test_ray_job_submit_places_rollout_workers_on_the_resource_node(cluster, tiny_policy, tmp_path):
    address, env, nodes = cluster
    rollout_node = next(node_id for node_id, res in nodes if res.get("rollout"))
    out = tmp_path / "run"
    r = ray_cli("job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                "fleetrl", "train", "--output-dir", str(out), "--no-progress", "--model.path", tiny_policy,
                "--reward.functions", "['tests.rewards:digit_reward']", "--train.steps", "8",
                "--train.prompts_per_step", "4", "--rollout.group_size", "4", "--rollout.max_new_tokens", "4",
                "--task.eval_size", "8", "--rollout.resources", "{rollout: 1}", "--learner.num_threads", "1",
                env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    placement = json.loads((out / "placement.json").read_text())
    assert {w["node_id"] for w in placement["rollout"]} == {rollout_node}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["produced"] == summary["trained"] + summary["dropped"]
    assert "rollout-0 on node" in r.stdout
