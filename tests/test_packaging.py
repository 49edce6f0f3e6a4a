"""The package as a user installs it: a wheel built from pyproject.toml, installed into a
fresh virtualenv, gives an ``ipu-diffusion`` command that runs from outside the checkout and
finds the built-in configs by name. Dependencies are not downloaded: the fresh venv sees
this interpreter's site-packages through a ``.pth`` file, and the wheel goes in with
``--no-deps``."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml

from ipu_diffusion.config import ConfigError, load_config
from ipu_diffusion.configs import CONFIG_DIR, builtin_names, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def _run(cmd, cwd, timeout=300, quiet_default=False):
    """``cmd`` without this checkout on the path; ``quiet_default``: with TensorFlow's
    log level unset, as for a user (else 3)."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "TF_CPP_MIN_LOG_LEVEL", "IPU_DIFFUSION_VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if not quiet_default:
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv, outside)``: a venv holding only the wheel, and an empty working directory."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside it
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "ipu_diffusion"), src / "ipu_diffusion",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = glob.glob(str(tmp / "dist" / "ipu_diffusion-*.whl"))

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    site = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    ours = sysconfig.get_paths()  # this interpreter's (the project's .venv) site-packages
    with open(os.path.join(site, "_project_venv.pth"), "w", encoding="utf-8") as f:
        f.write("".join(sorted({ours["purelib"] + "\n", ours["platlib"] + "\n"})))
    python = str(venv / "bin" / "python")
    put = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                "--no-index", "-q", wheel], cwd=tmp)
    assert put.returncode == 0, put.stderr
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv, outside


def test_console_script_help_runs_outside_the_checkout(installed):
    venv, outside = installed
    done = _run([str(venv / "bin" / "ipu-diffusion"), "--help"], cwd=outside)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "sample" in done.stdout
    assert done.stdout.startswith("usage: ipu-diffusion ")


def test_installed_package_resolves_builtin_configs_by_name(installed):
    venv, outside = installed
    probe = ("import ipu_diffusion, ipu_diffusion.configs as c\n"
             "from ipu_diffusion.config import load_config\n"
             "path = c.resolve_config('digits')\n"
             "cfg = load_config(c.resolve_config('digits_2stage'))\n"
             "print(ipu_diffusion.__file__); print(path); print(cfg.run.name, cfg.model.ch)\n"
             "print(','.join(c.builtin_names()))\n")
    done = _run([str(venv / "bin" / "python"), "-c", probe], cwd=outside)
    assert done.returncode == 0, done.stderr
    package, path, loaded, names = done.stdout.split("\n")[:4]
    assert package.startswith(str(venv)) and path.startswith(str(venv)), done.stdout
    assert loaded == "digits_2stage 32"  # its own run.name, digits.yaml's width through base:
    assert names.split(",") == [n[:-len(".yaml")] for n in SHIPPED]


def test_unknown_config_name_lists_the_builtin_ones(installed):
    venv, outside = installed
    done = _run([str(venv / "bin" / "ipu-diffusion"), "train", "--config", "digitz",
                 "--workdir", str(outside / "run")], cwd=outside)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --config 'digitz': not a file and not a built-in config")
    assert ", ".join(builtin_names()) in line
    assert not (outside / "run").exists()


# the banner's fields and the summary's, as a user sees them
BANNER_AND_SUMMARY = ("  config ", "  data       digits", "1,437 images", "  images     16x16x1",
                      "  model      U-Net, ", "  steps      3 of batch 64", "  precision ",
                      "  devices ", "  workdir ", "  resumed    no", "done: 3 steps in ",
                      "             FID ", "(floor ", "near copies", "metrics.json")


@pytest.mark.slow
def test_installed_train_runs_outside_the_checkout(installed):
    """One short ``ipu-diffusion train --config digits`` from the wheel, outside the
    checkout, as a user runs it (no TF_CPP_MIN_LOG_LEVEL set): it trains and evaluates,
    prints the banner before the first step and the summary with FID at the end, and
    shows none of TensorFlow's start-up lines (``tests/test_quiet_start.py`` checks that
    ``--verbose`` brings them back)."""
    from tests.test_quiet_start import MARKERS, SMALL_NET

    venv, outside = installed
    workdir = outside / "run3"
    done = _run([str(venv / "bin" / "ipu-diffusion"), "train", "--config", "digits",
                 "--set", "training.steps=3", "--set", "eval.num_samples=64",
                 "--set", "eval.steps=5", "--set", "eval.batch_size=64",
                 "--set", "training.num_sample_images=0", "--workdir", str(workdir)] +
                [f"--set={s}" for s in SMALL_NET],
                cwd=outside, timeout=900, quiet_default=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isfile(workdir / "checkpoints" / "ckpt-3.index")
    assert load_config(str(workdir / "config.yaml")).training.steps == 3
    for field in BANNER_AND_SUMMARY:
        assert field in done.stdout, field
    assert done.stdout.index("  resumed ") < done.stdout.index("done: 3 steps")
    for marker in MARKERS:
        assert marker not in done.stdout + done.stderr, marker


# ------------------------------------------------------------- configs in one place


def test_pipeline_configs_paths_are_base_lines_to_the_packaged_files():
    """``pipeline_configs/X.yaml`` (Makefile, README, older notes) holds only ``base:`` to
    ``ipu_diffusion/configs/X.yaml``, one per packaged config, and loads to the same config."""
    stubs = sorted(os.path.basename(p)
                   for p in glob.glob(os.path.join(ROOT, "pipeline_configs", "*.yaml")))
    assert stubs == SHIPPED
    for name in stubs:
        stub = os.path.join(ROOT, "pipeline_configs", name)
        with open(stub, encoding="utf-8") as f:
            assert yaml.safe_load(f) == {"base": f"../ipu_diffusion/configs/{name}"}, name
        assert load_config(stub) == load_config(os.path.join(CONFIG_DIR, name)), name


def test_resolve_config_names_and_paths(tmp_path, monkeypatch):
    assert resolve_config("digits") == os.path.join(CONFIG_DIR, "digits.yaml")
    for path in ("pipeline_configs/digits.yaml", "x/y", "other.yaml", "other.yml"):
        assert resolve_config(path) == path  # a path is left to load_config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("run: {name: mine}\n")
    assert resolve_config("mine") == "mine"  # an existing file wins over a built-in name
    with pytest.raises(ConfigError, match="built-in configs: .*digits"):
        resolve_config("nosuch")


def test_pyproject_dependencies_are_requirements_runtime_part():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    runtime, test, section = [], [], None
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                section = line[1:].split(":")[0].strip()
                continue
            spec = line.split("#")[0].strip()
            if spec:
                {"Runtime": runtime, "Tests and lint": test}.get(section, []).append(spec)
    assert project["dependencies"] == runtime
    assert sorted(project["optional-dependencies"]["test"]) == sorted(test)
    assert project["scripts"] == {"ipu-diffusion": "ipu_diffusion.cli:main"}
