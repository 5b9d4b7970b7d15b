import pytest

from safegene.config import dump_yaml, load_config
from safegene.training import DegradeConfig, FinetuneConfig, LoraTrainConfig
from safegene.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: some/folder\nn_examples: 32\ntrain:\n  rank: 4\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(DegradeConfig, y, {"train.max_steps": "7", "train.learning_rate": "1e-3", "output": None})
    assert cfg.model == "some/folder" and cfg.n_examples == 32
    assert cfg.train.rank == 4 and cfg.train.max_steps == 7 and cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.output == "runs/degraded"  # a None override leaves the default


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(FinetuneConfig, None, {"poison_ratio": 0.1, "train.rank": 2})
    y = tmp_path / "eff.yaml"
    y.write_text(dump_yaml(cfg))
    assert load_config(FinetuneConfig, y) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.rank": 0}, "rank must be >= 1"),
        ({"poison_ratio": 1.0}, "poison_ratio must be in [0, 1)"),
        ({"save": "pickle"}, "save: 'pickle' is not one of adapter, merged, both"),
        ({"train.max_steps": "ten"}, "expected int"),
        ({"train.rnak": 3}, "unknown key(s) rnak"),
    ],
)
def test_invalid_values_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(FinetuneConfig, None, override)


def test_bad_yaml_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(DegradeConfig, y)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DegradeConfig, tmp_path / "missing.yaml")


def test_examples_needed():
    assert LoraTrainConfig(max_steps=10, batch_size=4, grad_accum=2).examples_needed == 80


def test_bench_yaml_lists_every_key_at_its_default():
    """configs/bench.yaml documents BenchConfig: every key, each at its default (regenerate it with dump_yaml)."""
    from pathlib import Path

    import yaml

    from safegene.bench import BenchConfig
    from safegene.config import to_dict

    written = yaml.safe_load((Path(__file__).parent.parent / "configs" / "bench.yaml").read_text())
    assert written == to_dict(BenchConfig())
