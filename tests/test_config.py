"""Config schema, YAML presets, dotted overrides and their one-line errors."""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Literal

import pytest

from montessori_jax.config import (
    Config,
    MeshConfig,
    ModelConfig,
    diff,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)
from montessori_jax.errors import ConfigError, UserError


# Test-only schema for the field types Config does not use yet.
@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str  # required
    sizes: tuple[int, ...] = (1, 2)
    tags: list[str] = ()
    extra: dict[str, int] = dataclasses.field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- Loading -----------------------------------------------------------------------------------


def test_yaml_and_overrides_build_the_expected_frozen_config(tmp_path):
    path = write(tmp_path, "seed: 7\nteacher:\n  path: /m/teacher\n  dtype: bfloat16\nmesh:\n  fsdp: 4\n")
    cfg = load_config(Config, path, ["student.remat=true", "mesh.tensor=2", "seed=8", "seed=9"])
    assert cfg == Config(
        seed=9,
        teacher=ModelConfig(path="/m/teacher", dtype="bfloat16"),
        student=ModelConfig(remat=True),
        mesh=MeshConfig(fsdp=4, tensor=2),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    assert hash(cfg) == hash(dataclasses.replace(cfg))


def test_no_file_gives_the_defaults_plus_overrides():
    assert load_config(Config) == Config()
    assert load_config(Config, None, ["teacher.path=model.gguf"]).teacher.path == "model.gguf"


def test_override_creates_a_section_the_yaml_lacks(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    cfg = load_config(Config, path, ["mesh.data=2"])
    assert cfg.mesh == MeshConfig(data=2)
    assert cfg.seed == 1


def test_dotted_override_sets_dict_entries(tmp_path):
    path = write(tmp_path, "mesh:\n  rules: null\n")
    cfg = load_config(Config, path, ["mesh.rules.embed=fsdp", "mesh.rules.vocab=null"])
    assert cfg.mesh.rules == {"embed": "fsdp", "vocab": None}
    sample = load_config(Sample, None, ["name=s", "extra.foo=1", "extra.bar=2"])
    assert sample.extra == {"foo": 1, "bar": 2}


def test_override_values_are_parsed_as_yaml():
    sample = load_config(Sample, None, ["name=s", "sizes=[3, 4]", "inner.lr=1e-6", "inner.name=null"])
    assert sample.sizes == (3, 4)
    assert sample.inner.lr == 1e-6
    assert sample.inner.name is None


def test_yaml_float_with_exponent_is_a_float(tmp_path):
    path = write(tmp_path, "name: s\ninner:\n  lr: 1e-6\n")
    assert load_config(Sample, path).inner.lr == 1e-6


def test_yaml_1_1_booleans_stay_strings(tmp_path):
    path = write(tmp_path, "name: off\ntags: [yes, no, on]\n")
    sample = load_config(Sample, path)
    assert sample.name == "off"
    assert sample.tags == ("yes", "no", "on")


# --- Errors from YAML and overrides ------------------------------------------------------------


def test_unknown_key_in_yaml_names_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "seed: 1\nteacher:\n  path: x\n  pth: y\n")
    assert error_of(load_config, Config, path) == (
        f"{path}, line 4: unknown key 'teacher.pth'; "
        "valid keys under 'teacher': chat_template, dtype, param_dtype, path, remat"
    )


def test_unknown_top_level_key_from_override():
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(Config)))
    assert "seed" in valid and "teacher" in valid
    assert error_of(load_config, Config, None, ["sede=1"]) == (
        f"override 'sede=1': unknown key 'sede'; valid keys at the top level: {valid}"
    )


def test_wrong_type_in_yaml_names_line_dotted_key_and_type(tmp_path):
    path = write(tmp_path, "seed: 1\n\nstudent:\n  remat: yes\n")
    message = error_of(load_config, Config, path)
    assert message == f"{path}, line 4: student.remat: expected bool, got 'yes' (str)"


def test_wrong_type_from_override_names_the_override():
    assert error_of(load_config, Config, None, ["teacher.remat=yes"]) == (
        "override 'teacher.remat=yes': teacher.remat: expected bool, got 'yes' (str)"
    )


def test_override_blames_itself_not_the_yaml_line_it_replaced(tmp_path):
    path = write(tmp_path, "seed: 1\nmesh:\n  data: 2\n")
    message = error_of(load_config, Config, path, ["mesh.data=two"])
    assert message.startswith("override 'mesh.data=two': mesh.data: expected int")
    assert error_of(load_config, Config, path, ["seed.x=1"]) == (
        "override 'seed.x=1': seed: expected int, got {'x': 1} (dict)"
    )


def test_override_of_a_section_blames_itself_for_keys_inside(tmp_path):
    path = write(tmp_path, "seed: 1\nteacher:\n  remat: true\n")
    message = error_of(load_config, Config, path, ["teacher={remat: maybe}"])
    assert message == "override 'teacher={remat: maybe}': teacher.remat: expected bool, got 'maybe' (str)"


def test_literal_error_lists_allowed_values():
    assert error_of(load_config, Config, None, ["teacher.dtype=fp16"]).endswith(
        "teacher.dtype: expected one of 'float32', 'bfloat16', got 'fp16' (str)"
    )


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    assert error_of(load_config, Config, path) == f"{path}: no such config file"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\nteacher:\n  path: x\n   remat: true\n")
    assert error_of(load_config, Config, path).startswith(f"{path}, line 4: invalid YAML: ")


def test_duplicate_yaml_key_names_its_line(tmp_path):
    path = write(tmp_path, "seed: 1\nseed: 2\n")
    assert error_of(load_config, Config, path) == f"{path}, line 2: invalid YAML: duplicate key 'seed'"


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    message = error_of(load_config, Config, path)
    assert message == f"{path}, line 1: the top level must be a mapping of keys, got list"


def test_empty_yaml_file_is_all_defaults(tmp_path):
    assert load_config(Config, write(tmp_path, "")) == Config()


@pytest.mark.parametrize("override", ["seed", "=1", "mesh..data=1", "mesh.=1"])
def test_malformed_override(override):
    message = error_of(load_config, Config, None, [override])
    assert message == f"override {override!r}: expected dotted.key=value"


def test_invalid_yaml_in_override_value():
    message = error_of(load_config, Config, None, ["mesh.rules=[a,"])
    assert message.startswith("override 'mesh.rules=[a,': invalid YAML value: ")


def test_config_error_is_a_user_error():
    with pytest.raises(UserError):
        load_config(Config, None, ["nope=1"])


# --- from_dict: types --------------------------------------------------------------------------


def test_int_is_accepted_for_float_and_converted():
    inner = from_dict(Inner, {"lr": 1})
    assert inner.lr == 1.0 and type(inner.lr) is float


def test_float_string_is_accepted_for_float():
    inner = from_dict(Inner, {"lr": "1e-6"})
    assert inner.lr == 1e-6 and type(inner.lr) is float
    assert error_of(from_dict, Inner, {"lr": "fast"}) == "lr: expected float, got 'fast' (str)"
    assert error_of(from_dict, Inner, {"lr": True}) == "lr: expected float, got True (bool)"


@pytest.mark.parametrize("value", [2.0, "2", True])
def test_int_field_rejects_floats_strings_and_bools(value):
    message = error_of(from_dict, Inner, {"steps": value})
    assert message == f"steps: expected int, got {value!r} ({type(value).__name__})"


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None])
def test_bool_field_accepts_only_real_bools(value):
    assert error_of(from_dict, ModelConfig, {"remat": value}).startswith("remat: expected bool, got ")


def test_bool_field_takes_real_bools():
    assert from_dict(ModelConfig, {"remat": True}).remat is True
    assert from_dict(ModelConfig, {"remat": False}).remat is False


def test_optional_field_names_both_types():
    assert from_dict(Inner, {"name": None}).name is None
    assert error_of(from_dict, Inner, {"name": 3}) == "name: expected str or null, got 3 (int)"


def test_section_must_be_a_mapping():
    assert error_of(from_dict, Config, {"teacher": None}) == "teacher: expected mapping, got null"


def test_missing_required_key_is_named():
    assert error_of(from_dict, Sample, {"sizes": [1]}) == "missing required key 'name'"


def test_tuple_item_error_names_index_and_line(tmp_path):
    path = write(tmp_path, "name: s\nsizes:\n  - 1\n  - x\n")
    assert error_of(load_config, Sample, path) == f"{path}, line 4: sizes[1]: expected int, got 'x' (str)"


def test_dict_value_error_names_the_entry():
    assert error_of(from_dict, Sample, {"name": "s", "extra": {"foo": "1"}}) == (
        "extra.foo: expected int, got '1' (str)"
    )


def test_post_init_value_error_becomes_config_error():
    message = error_of(from_dict, Sample, {"name": "s", "inner": {"steps": -1}})
    assert message == "inner: steps must be >= 0, got -1"


def test_prefix_and_lines_locate_the_error():
    lines = {"teacher": 2, "teacher.remat": 5}
    message = error_of(from_dict, ModelConfig, {"remat": 1}, source="f.yaml", lines=lines, prefix="teacher")
    assert message == "f.yaml, line 5: teacher.remat: expected bool, got 1 (int)"
    message = error_of(from_dict, Sample, {}, source="f.yaml", lines={"x": 2}, prefix="x")
    assert message == "f.yaml, line 2: missing required key 'x.name'"


# --- Output ------------------------------------------------------------------------------------


def test_sequences_are_stored_as_tuples_and_round_trip():
    data = {"name": "s", "sizes": [4, 5, 6], "tags": ["a"], "extra": {"k": 1}, "mode": "b"}
    sample = from_dict(Sample, data)
    assert sample.sizes == (4, 5, 6) and sample.tags == ("a",)
    data = to_dict(sample)
    assert data["sizes"] == [4, 5, 6] and data["tags"] == ["a"]
    assert data["inner"] == {"lr": 1e-3, "steps": 10, "name": None}
    assert from_dict(Sample, data) == sample


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = Config(
        seed=5,
        teacher=ModelConfig(path="yes", param_dtype="bfloat16", remat=True),
        student=ModelConfig(path="1e6"),
        mesh=MeshConfig(data=2, fsdp=2, rules={"embed": "fsdp", "vocab": None}),
    )
    assert from_dict(Config, to_dict(cfg)) == cfg
    assert load_config(Config, write(tmp_path, dump_yaml(cfg))) == cfg


def test_diff_lists_changed_keys_in_field_order():
    base = Config()
    changed = load_config(Config, None, ["mesh.rules.embed=fsdp", "student.remat=true", "seed=1"])
    assert diff(base, base) == []
    assert diff(base, changed) == ["seed", "student.remat", "mesh.rules"]
    more = load_config(Config, None, ["mesh.rules.embed=data", "mesh.rules.vocab=tensor"])
    assert diff(changed, more) == ["seed", "student.remat", "mesh.rules.embed", "mesh.rules.vocab"]
    assert diff(more, changed) == ["seed", "student.remat", "mesh.rules.embed", "mesh.rules.vocab"]
    reordered = load_config(Config, None, ["mesh.rules.vocab=data", "mesh.rules.embed=tensor"])
    assert diff(reordered, more) == ["mesh.rules.vocab", "mesh.rules.embed"]


def test_diff_names_nested_keys_of_plain_dicts():

    saved = {"dpo": {"max_steps": None, "optim": {"lr": 1e-6}}, "seed": 0}
    assert diff(saved, saved) == []
    assert diff(saved, {"dpo": {"max_steps": 3, "optim": {"lr": 1e-5}}, "seed": 0}) == [
        "dpo.max_steps", "dpo.optim.lr"]
    assert diff(saved, {"dpo": {"max_steps": None, "optim": {"lr": 1e-6}}, "seed": 0, "new": 1}) == ["new"]


def test_dpo_eval_fraction_must_be_below_one():
    assert load_config(Config, None, ["dpo.eval_fraction=0.25"]).dpo.eval_fraction == 0.25
    with pytest.raises(ConfigError, match=r"dpo: eval_fraction=1.0 must be in \[0, 1\)"):
        load_config(Config, None, ["dpo.eval_fraction=1.0"])


@pytest.mark.parametrize("key", ["max_lengths", "ref_max_lengths", "ref_batch_size"])
def test_influence_lengths_and_chunk_rows_must_be_positive(key):
    assert getattr(load_config(Config, None, [f"influence.{key}=2"]).influence, key) == 2
    with pytest.raises(ConfigError, match=rf"influence: {key}=0 must be >= 1"):
        load_config(Config, None, [f"influence.{key}=0"])


def test_diff_refuses_different_classes():
    with pytest.raises(TypeError):
        diff(Config(), MeshConfig())


# --- the shipped presets and the CLI ------------------------------------------------------------

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_every_preset_loads(preset):
    cfg = load_config(Config, preset)
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_cli_config_prints_overrides_and_names_unknown_key(capsys):
    from montessori_jax.cli import main

    assert PRESETS, "configs/ has presets"
    assert main(["config", "-c", PRESETS[0], "student.dtype=bfloat16"]) == 0
    assert "dtype: bfloat16" in capsys.readouterr().out
    assert main(["config", "-c", PRESETS[0], "student.dtyp=bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'student.dtyp'" in err and "dtype, param_dtype, path, remat" in err


def test_partial_section_keeps_its_default_instance_values():
    from montessori_jax.config import Config

    cfg = load_config(Config, None, ["synthesis.response_sampling.max_new_tokens=64", "warmup.optim.lr=1e-5"])
    assert cfg.synthesis.response_sampling.max_new_tokens == 64
    assert cfg.synthesis.response_sampling.temperature == 0.6  # not GenerationConfig's 1.0
    assert cfg.warmup.optim.lr == 1e-5 and cfg.warmup.export is False  # not SFTConfig's True
    assert cfg.warmup.optim.warmup_ratio == 1.0 and cfg.warmup.optim.decay_ratio == 0.0  # as the original
    assert cfg.sft.export is True and cfg.dpo.optim.lr == 1e-6
