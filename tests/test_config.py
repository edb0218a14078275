import pytest

from train.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("catalog: cat.jsonl\nsteps: 10\nretention: {inner_steps: 2}\n")
    cfg = load_config(f, ["retention.inner_lr=3e-4", "trigger.identifiers=[sks, ohwx]", "lr=1"])
    assert cfg.steps == 10 and cfg.retention.inner_steps == 2 and cfg.retention.inner_lr == 3e-4
    assert cfg.trigger.identifiers == ["sks", "ohwx"] and cfg.lr == 1.0


@pytest.mark.parametrize("text, needle", [
    ("catalog: c\nstepz: 3\n", "unknown key 'stepz'"),
    ("catalog: c\nretention: {ordr: first}\n", "unknown key 'retention.ordr'"),
    ("catalog: c\nsteps: many\n", "steps must be int"),
    ("catalog: c\nretention: {order: third}\n", "retention.order"),
    ("steps: 3\n", "catalog: required"),
    ("catalog: c\ntrigger: {templates: ['a photo of {cls}']}\n", "must contain {identifier}"),
    ("catalog: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["catalog"])
