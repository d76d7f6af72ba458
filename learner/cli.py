"""``fleetrl`` command line.

    fleetrl train [CONFIG.yaml] [--address ADDR] [--output-dir DIR] [--no-progress] [--section.key VALUE ...]
    fleetrl config [CONFIG.yaml] [--section.key VALUE ...]   # print the resolved config
    fleetrl config --reference                               # the configuration reference (Markdown)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

USAGE = __doc__


class UsageError(ValueError):
    pass


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


def init_ray(address: str | None):
    """Connect to ``address`` (or $RAY_ADDRESS); else start a local Ray bound to loopback."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.2", include_dashboard=False,
             object_store_memory=int(os.environ.get("FLEETRL_OBJECT_STORE_BYTES", 1_000_000_000)),
             log_to_driver=True)
    return True


def cmd_train(argv: list[str]) -> int:
    from learner.config import load_config

    path, opts, overrides = split_args(argv, {"--address", "--output-dir"}, {"--no-progress"})
    cfg = load_config(path, overrides)
    run_dir = Path(opts.get("--output-dir") or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    import ray

    from learner.trainer import Trainer

    started = init_ray(opts.get("--address"))
    trainer = Trainer(cfg, run_dir, progress=not opts.get("--no-progress"))
    try:
        summary = trainer.train()
    finally:
        if not started:  # a shared cluster keeps running: remove this run's actors
            trainer.shutdown()
        ray.shutdown()
    print(json.dumps(summary, indent=2))
    print(f"summary written to {run_dir / 'summary.json'}")
    return 0


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


COMMANDS = {"train": cmd_train, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    import logging

    from learner.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"fleetrl: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
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
