"""Typed config: YAML + overrides map onto dataclasses; bad keys/values name the key."""

import pytest

from learner.config import Config, ConfigError, load_config, parse_overrides, reference_markdown


def test_defaults_and_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 1e-4\n  betas: [0.9, 0.95]\nrollout:\n  resources: {rollout: 1}\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["--train.steps", "9", "--rollout.temperature=0.7", "--learner.norm_adv_by_std", "false"])
    assert isinstance(cfg, Config)
    assert cfg.learner.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: coerced
    assert cfg.learner.betas == [0.9, 0.95]
    assert cfg.rollout.resources == {"rollout": 1.0}
    assert cfg.train.steps == 9  # the override wins over the file
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert cfg.learner.norm_adv_by_std is False
    assert cfg.reward.functions == ["exact_match"]  # untouched default


@pytest.mark.parametrize("overrides, key", [
    (["--learner.lrr", "1"], "learner.lrr"),
    (["--nosection.x", "1"], "nosection"),
    (["--train.steps", "many"], "train.steps"),
    (["--train.steps", "0"], "train.steps"),
    (["--learner.lr", "-1"], "learner.lr"),
    (["--rollout.top_p", "1.5"], "rollout.top_p"),
    (["--learner.loss_agg", "sum"], "learner.loss_agg"),
    (["--learner.norm_adv_by_std", "maybe"], "learner.norm_adv_by_std"),
    (["--rollout.resources", "[1, 2]"], "rollout.resources"),
    (["--reward.weights", "[1, 2]"], "reward.weights"),
    (["--learner.lr", ".inf"], "learner.lr"),
    (["--train.sample_timeout_s", "nan"], "train.sample_timeout_s"),
    (["--train.max_wall_s", "-1"], "train.max_wall_s"),
    (["--learner.betas", "[0.9"], "learner.betas"),
    (["--model.hidden_size", "30"], "model.hidden_size"),
    (["--learner.eps", "0"], "learner.eps"),
    (["--learner.off_policy", "tis"], "learner.off_policy"),  # tis needs policy_loss=vanilla
    (["--learner.policy_loss", "vanilla", "--learner.off_policy", "decoupled"], "learner.off_policy"),
    (["--learner.policy_loss", "vanilla", "--learner.dual_clip", "3"], "learner.dual_clip"),
    (["--learner.is_level", "batch"], "learner.is_level"),
])
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(key), str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"^train\.stepz: unknown key"):
        load_config(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--train.steps"])
    with pytest.raises(ConfigError, match="section and a key"):
        parse_overrides(["--steps", "3"])
    assert parse_overrides(["--a.b.c=1", "--a.d", "[1,2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}


def test_reference_documents_every_field():
    import dataclasses

    ref = reference_markdown()
    rows = {line.split("|")[1].strip().strip("`"): line for line in ref.splitlines() if line.startswith("| `")}

    def check(prefix: str, obj) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):  # a nested section (rollout.vllm, env.sandbox): its own rows
                check(f"{prefix}.{f.name}", value)
                continue
            line = rows.get(f"{prefix}.{f.name}")
            assert line is not None, f"{prefix}.{f.name} is missing from the reference"
            assert line.rstrip(" |").split("|")[-1].strip(), f"{prefix}.{f.name} has no docstring"

    for section in dataclasses.fields(Config):
        check(section.name, getattr(Config(), section.name))


def test_deploy_default_yaml_is_the_default_job():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "deploy" / "default.yaml"
    assert load_config(path) == Config()
