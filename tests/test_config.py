import pytest

from common.config import ConfidenceStrategy, ConfigError, load_config, parse_override


def test_default_loads():
    cfg = load_config()
    assert cfg.draft.max_k == 12 and cfg.confidence.strategy is ConfidenceStrategy.MAX_PROB
    assert cfg.switches.kv_cache and cfg.switches.draft_verify and not cfg.switches.cloud_only


def test_unknown_key_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cloud:\n  bakend: torch\n")
    with pytest.raises(ConfigError, match=r"cloud\.bakend"):
        load_config(p)


@pytest.mark.parametrize("key, value, match", [
    ("draft.max_k", 0, r"draft\.max_k"),
    ("draft.min_k", 13, r"min_k \(13\) > max_k"),
    ("confidence.strategy", "vibes", r"confidence\.strategy"),
    ("confidence.threshold", 1.5, r"confidence\.threshold"),
    ("cloud.backend", "tpu", r"cloud\.backend"),
    ("sampling.temperature", -1, r"sampling\.temperature"),
    ("switches.kv_cache", "maybe", r"switches\.kv_cache"),
])
def test_bad_values_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides={key: value})


def test_overrides_parse_yaml():
    assert parse_override("draft.max_k=6") == ("draft.max_k", 6)
    assert parse_override("switches.kv_cache=false") == ("switches.kv_cache", False)
    cfg = load_config(overrides=dict([parse_override("confidence.strategy=entropy")]))
    assert cfg.confidence.strategy is ConfidenceStrategy.ENTROPY
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("nonsense")


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cloud: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
