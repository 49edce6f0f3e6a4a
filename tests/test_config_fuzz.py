"""Fuzzed broken configs: each one is a ConfigError that names a key, never a traceback."""
import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipu_diffusion.config import ConfigError, RunConfig, config_from_dict
from ipu_diffusion.models.plan import plan_unet

SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
HINTS = {name: typing.get_type_hints(getattr(RunConfig(), name).__class__) for name in SECTIONS}
KEY_PATHS = [f"{s}.{k}" for s, hints in HINTS.items() for k in hints]

wrong_values = st.one_of(st.text(max_size=5), st.integers(-10**6, -1), st.floats(allow_nan=True),
                         st.booleans(), st.lists(st.text(max_size=3), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _set(tree, path, value):
    section, key = path.split(".")
    tree.setdefault(section, {})[key] = value
    return tree


def _bad_key_or_value(path, value):
    """A config error must mention the key path (or, for cross-checks, a key in its section)."""
    try:
        config_from_dict(_set({}, path, value))
    except ConfigError as e:
        message = str(e)
        assert path.split(".")[0] in message, message
        return True
    return False  # the value happened to be valid (e.g. a bool for a bool key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KEY_PATHS), wrong_values)
def test_wrong_values_raise_config_errors(path, value):
    _bad_key_or_value(path, value)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(SECTIONS)), st.text(min_size=1, max_size=12))
def test_unknown_keys_name_the_key(section, key):
    if key in HINTS[section]:
        return
    try:
        config_from_dict({section: {key: 1}})
    except ConfigError as e:
        assert "unknown key" in str(e) and f"{section}." in str(e)
    else:
        raise AssertionError(f"{section}.{key} was accepted")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(-2, 4), min_size=0, max_size=6),
       st.lists(st.integers(0, 6), min_size=0, max_size=6))
def test_inconsistent_pipeline_maps(stages, blocks_per_stage, device_mapping):
    data = {"pipeline": {"stages": stages, "blocks_per_stage": blocks_per_stage,
                         "device_mapping": device_mapping}}
    consistent = ((not blocks_per_stage or (len(blocks_per_stage) == stages
                                            and min(blocks_per_stage) > 0))
                  and (not device_mapping or len(device_mapping) == stages))
    try:
        config_from_dict(data)
    except ConfigError as e:
        assert not consistent and "pipeline." in str(e)
    else:
        assert consistent


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([8, 12, 16, 32]), st.lists(st.integers(1, 4), min_size=1, max_size=5),
       st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]), max_size=3),
       st.sampled_from([1, 3, 4, 8, 32]), st.sampled_from([4, 8, 16, 32]))
def test_model_geometry_errors_name_the_key(size, ch_mult, attn, groups, ch):
    cfg = config_from_dict({"model": {"image_size": size, "ch_mult": ch_mult,
                                      "attn_resolutions": attn, "num_groups": groups, "ch": ch}})
    try:
        plan_unet(cfg.model)
    except ConfigError as e:
        assert "model." in str(e)
