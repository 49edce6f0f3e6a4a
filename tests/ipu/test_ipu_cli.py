"""``python -m ipu_diffusion train-ipu`` without the Poplar SDK: exit status 2 and one
message naming the SDK and the CPU fallback command, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ipu_diffusion import cli
from ipu_diffusion.pipeline import ipu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "pipeline_configs/digits.yaml"


def _cli_has_train_ipu() -> bool:
    return "train-ipu" in cli._parser().format_help()  # noqa: SLF001 (test-only peek)


@pytest.mark.skipif(ipu.sdk_available(), reason="the Poplar SDK is installed: train-ipu would run")
@pytest.mark.skipif(not _cli_has_train_ipu(),
                    reason="the CLI has no train-ipu subcommand yet (the lead wires it)")
def test_ipu_cli_train_ipu_without_sdk(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "ipu_diffusion", "train-ipu", "--config", CONFIG,
         "--workdir", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Poplar SDK" in lines[0]
    assert f"make train CONFIG={CONFIG}" in lines[0]
    assert f"python -m ipu_diffusion train --config {CONFIG}" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written before the SDK check
