"""The quiet start (ipu_diffusion/quiet.py): TensorFlow's C++ start-up lines are filtered
out of the command's stderr, ours are not; ``--verbose`` / ``IPU_DIFFUSION_VERBOSE=1``
shows everything."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ipu_diffusion.quiet import keep, wants_verbose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = os.path.join(ROOT, "ipu_diffusion", "quiet.py")
# What `python -c "import tensorflow as tf; tf.config.list_physical_devices()"` wrote to
# stderr with tensorflow 2.21.0 on this (GPU-less) machine, TF_CPP_MIN_LOG_LEVEL unset,
# lines shortened; then our own lines, which must pass.
TF_START = b"""\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796175092.841443    1813 port.cc:153] oneDNN custom operations are on. You may see
I0000 00:00:1796175092.842050    1813 cudart_stub.cc:31] Could not find cuda drivers on your machine
I0000 00:00:1796175093.196346    1813 cpu_feature_guard.cc:227] This TensorFlow binary is optimized
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations,
E0000 00:00:1796175115.273795    1813 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA err
"""
OURS = b"""\
warning: pipeline_configs/x.yaml: data.shuffle_buffer: removed, has no effect
To enable the following instructions: (not after a dropped line: kept)
Traceback (most recent call last):
"""
MARKERS = ("oneDNN", "cuda", "absl::InitializeLog")
# TensorFlow turns oneDNN on, and says so, only on CPUs with AVX-512 VNNI/BF16 or AMX; on an
# AVX2-only CPU that line is never written, so --verbose cannot be asked to show it.
ALWAYS_WRITTEN = ("cuda", "absl::InitializeLog")


def _filter(data: bytes, level: int) -> bytes:
    return subprocess.run([sys.executable, "-I", QUIET, str(level)], input=data,
                          capture_output=True, timeout=60, check=True).stdout


def test_filter_drops_tensorflow_start_up_lines_and_keeps_ours():
    assert _filter(TF_START + OURS, 3) == OURS
    # level 2 is TensorFlow's "errors only": the cuInit error stays
    assert _filter(TF_START, 2) == TF_START.splitlines(keepends=True)[-1]
    assert _filter(TF_START, 0) == TF_START  # level 0 hides nothing
    assert _filter(b"F0000 00:00:1.5 7 x.cc:1] fatal\nprompt> ", 3) == \
        b"F0000 00:00:1.5 7 x.cc:1] fatal\nprompt> "  # fatal lines and partial lines pass


@pytest.mark.parametrize("line,level,shown", [
    (b"I1202 01:02:03.123456 1 y.cc:2] after absl init", 1, False),
    (b"W1202 01:02:03.123456 1 y.cc:2] a warning", 1, True),
    (b"W1202 01:02:03.123456 1 y.cc:2] a warning", 2, False),
    (b"I0000 in a sentence] is not a log line", 3, True),
    (b"", 3, True),
])
def test_keep(line, level, shown):
    assert keep(line, level, after_dropped=False) is shown


@pytest.mark.parametrize("value,verbose", [("", False), ("0", False), ("no", False),
                                           ("1", True), ("yes", True)])
def test_verbose_from_the_environment(monkeypatch, value, verbose):
    monkeypatch.setenv("IPU_DIFFUSION_VERBOSE", value)
    assert wants_verbose(False) is verbose
    assert wants_verbose(True)


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "IPU_DIFFUSION_VERBOSE")}
    env.update(extra)
    return env


def test_quiet_start_around_a_real_tensorflow_import():
    """One process: C++ lines written to file descriptor 2 during ``import tensorflow`` and
    device set-up are gone; a ConfigWarning and a print to sys.stderr arrive, in order."""
    code = ("import sys, warnings\n"
            "from ipu_diffusion.quiet import QuietStart\n"
            "from ipu_diffusion.config import ConfigWarning\n"
            "with QuietStart():\n"
            "    print('before', file=sys.stderr)\n"
            "    import tensorflow as tf\n"
            "    tf.config.list_physical_devices()\n"
            "    warnings.warn('ours', ConfigWarning)\n"
            "print('after', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for marker in MARKERS:
        assert marker not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "before" and lines[-1] == "after", done.stderr
    assert any("ConfigWarning: ours" in line for line in lines), done.stderr


# the digits config with a net that builds in seconds: the tests here are about what the
# command prints, not what it trains
SMALL_NET = ("model.ch=8", "model.ch_mult=[1]", "model.attn_resolutions=[]", "model.num_groups=4")


def _sample_without_a_run(workdir, *flags):
    """``sample`` on a directory that holds no run: TensorFlow loads (the model code is
    imported), then the command stops with its one error line (exit 2)."""
    cmd = [sys.executable, "-m", "ipu_diffusion", "sample", "--workdir", str(workdir)] + list(flags)
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].startswith(f"error: {workdir}: no config.yaml")
    return done.stdout + done.stderr


def test_verbose_on_request(tmp_path):
    """``--verbose`` shows TensorFlow's start-up lines on a command that loads TensorFlow
    (that the default hides them is checked on a whole ``train`` from the installed
    package in ``tests/test_packaging.py``)."""
    verbose = _sample_without_a_run(tmp_path, "--verbose")
    for marker in ALWAYS_WRITTEN:
        assert marker in verbose, verbose
