"""Strict config loading: every bad value names its key path, overrides, round trip."""
import glob
import os
import re

import pytest

from ipu_diffusion.config import ConfigError, config_from_dict, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("data, fragment", [
    ({"model": {"chh": 1}}, "model.chh: unknown key"),
    ({"modle": {}}, "modle: unknown key"),
    ({"diffusion": {"schedule": "cosin"}}, "diffusion.schedule: 'cosin' is not allowed"),
    ({"training": {"steps": "ten"}}, "training.steps: expected an integer"),
    ({"training": {"lr": True}}, "training.lr: expected a number"),
    ({"training": {"jit_compile": "yes"}}, "training.jit_compile: expected true or false"),
    ({"model": {"ch_mult": [1, "a"]}}, "model.ch_mult[1]: expected an integer"),
    ({"model": {"ch": -4}}, "model.ch: -4 must be > 0"),
    ({"model": {"dropout": 1.5}}, "model.dropout: 1.5 must be in [0, 1)"),
    ({"model": {"learn_sigma": True}}, "model.learn_sigma"),
    ({"pipeline": {"stages": 2, "cuts": ["a", "b"]}}, "pipeline.cuts: 2 cut(s) make 3 stages"),
    ({"pipeline": {"stages": 2, "blocks_per_stage": [3, 0]}}, "has an empty stage"),
    ({"pipeline": {"stages": 2, "device_mapping": [0]}}, "pipeline.device_mapping"),
    ({"pipeline": {"microbatches": 3}, "training": {"batch_size": 8}}, "not divisible"),
    ({"training": 5}, "training: expected a mapping"),
])
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert fragment in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = config_from_dict({}, ["training.lr=1e-3", "model.ch_mult=[1,2]", "run.name=x",
                                "training.jit_compile=true"])
    assert cfg.training.lr == 1e-3 and cfg.model.ch_mult == (1, 2)
    assert cfg.run.name == "x" and cfg.training.jit_compile is True
    with pytest.raises(ConfigError, match="training.nope: unknown key"):
        config_from_dict({}, ["training.nope=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config_from_dict({}, ["training.lr"])


def test_save_and_load_round_trip(tmp_path):
    cfg = config_from_dict({"model": {"ch": 64, "attn_resolutions": [8]}}, ["run.seed=3"])
    path = str(tmp_path / "c.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "pipeline_configs", "*.yaml"))))
def test_shipped_configs_load(path):
    load_config(path)


def test_base_inheritance_merges_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {ch: 64, dropout: 0.2}\ntraining: {steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel: {ch: 32}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.model.ch, cfg.model.dropout, cfg.training.steps) == (32, 0.2, 7)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "orphan.yaml"))


@pytest.mark.parametrize("name", ["../x", "../../etc", "/tmp/x", "a/b", "a\\b", "..", ".", "",
                                  " ", "a\nb"])
def test_run_name_cannot_leave_the_runs_directory(name):
    with pytest.raises(ConfigError, match=r"^run\.name: .* must be a plain directory name"):
        config_from_dict({"run": {"name": name}})


@pytest.mark.parametrize("name", ["digits", "my run", "..x", "x..", "ünïcode"])
def test_default_workdir_stays_under_runs(name):
    workdir = config_from_dict({"run": {"name": name}}).workdir
    runs = os.path.abspath("runs")
    assert os.path.dirname(os.path.abspath(workdir)) == runs


def test_config_derived_cache_names_stay_in_the_cache_directory():
    """The other config strings that reach a written file name (data.path's basename,
    data.tfds_name) name reference-statistics caches; cache_stem flattens them."""
    from ipu_diffusion.evaluation.reference import cache_stem

    for name in ["../../etc/passwd", "/abs/x", "..", "a\\..\\b", "x/../../y"]:
        stem = cache_stem("/w/eval_cache", name, "net")
        assert os.path.dirname(stem) == "/w/eval_cache" and "/" not in os.path.basename(stem)


# Patterns that could load or run untrusted code; the package must use none of them.
UNSAFE = {
    r"\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b|\bshelve\b|\bmarshal\b": "pickle-like loaders",
    r"yaml\.(load|load_all|full_load|unsafe_load|unsafe_load_all)\(|yaml\.(Unsafe|Full)?Loader\b":
        "YAML outside safe_load",
    r"allow_pickle\s*=\s*True": "np.load with allow_pickle=True",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
    r"safe_mode\s*=\s*False": "Keras unsafe deserialisation",
}


def test_package_source_has_no_unsafe_loading():
    found, np_loads = [], 0
    for path in sorted(glob.glob(os.path.join(ROOT, "ipu_diffusion", "**", "*.py"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, ROOT)
        for pattern, what in UNSAFE.items():
            found += [f"{rel}: {what}: {m.group(0)}" for m in re.finditer(pattern, text)]
        # every np.load says allow_pickle=False explicitly
        for m in re.finditer(r"np\.load\((?:[^()]|\([^()]*\))*\)", text):
            np_loads += 1
            if "allow_pickle=False" not in m.group(0):
                found.append(f"{rel}: np.load without allow_pickle=False: {m.group(0)}")
    assert not found, "\n".join(found)
    assert np_loads >= 4  # the check sees the real calls (data, caches, classifier)


# ----------------------------------------------------------------- files that hold no config


def _one_line_cli_error(argv, capsys):
    from ipu_diffusion import cli

    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(256)) * 4, "not a UTF-8 text file"),           # binary
    ("run: {name: caf\u00e9}\n".encode("latin-1"), "not a UTF-8 text file"),
    (b"", "holds no settings"),                                  # empty
    (b"# only a comment\n\n   # and another\n", "holds no settings"),
    (b"{}\n", "holds no settings"),
])
def test_unreadable_or_empty_config_file_is_one_error_naming_it(tmp_path, capsys, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)
    err = _one_line_cli_error(["train", "--config", str(path), "--workdir", str(tmp_path / "w")],
                              capsys)
    assert str(path) in err and fragment in err
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_empty_base_file_is_the_same_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n", encoding="utf-8")
    (tmp_path / "child.yaml").write_text("base: empty.yaml\ntraining: {steps: 5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file holds no settings"):
        load_config(str(tmp_path / "child.yaml"))


def test_utf8_config_with_non_ascii_text_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("run: {name: caf\u00e9}  # \u00e9t\u00e9\n".encode("utf-8"))
    assert load_config(str(path)).run.name == "caf\u00e9"
