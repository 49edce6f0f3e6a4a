"""``train --resume`` refuses a config that changes what is trained (the objective, the
data, the model) and accepts one that changes only how long, how observably or how the
same update is executed; the checkpoint then restores and training goes on."""
import os
import subprocess
import sys

import pytest
import yaml

from ipu_diffusion.config import ConfigWarning, load_config, to_dict
from ipu_diffusion.training.run import RunError, prepare_workdir, train
from tests.training.test_train_e2e import _cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resume_with_another_objective_is_refused_naming_each_key(tmp_path):
    workdir = str(tmp_path / "run")
    prepare_workdir(_cfg(), workdir, resume=False)
    saved = open(os.path.join(workdir, "config.yaml"), encoding="utf-8").read()
    changed = _cfg("diffusion.schedule=cosine", "diffusion.timesteps=100",
                   "model.image_size=16", "training.batch_size=16", "training.steps=60")
    with pytest.raises(RunError) as err:
        prepare_workdir(changed, workdir, resume=True)
    message = str(err.value)
    for part in ["model.image_size 8 -> 16", "diffusion.schedule 'linear' -> 'cosine'",
                 "diffusion.timesteps 50 -> 100", "training.batch_size 8 -> 16",
                 "omit --config", "another --workdir"]:
        assert part in message, part
    assert "training.steps" not in message  # may change
    assert "\n" not in message
    # the refused config is not written over the run's own
    assert open(os.path.join(workdir, "config.yaml"), encoding="utf-8").read() == saved


def test_resume_of_an_old_workdir_whose_config_has_a_removed_key(tmp_path):
    workdir = tmp_path / "run"
    prepare_workdir(_cfg(), str(workdir), resume=False)
    old = yaml.safe_load((workdir / "config.yaml").read_text(encoding="utf-8"))
    old["data"]["shuffle_buffer"] = 10000  # as written before the key was removed
    (workdir / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    with pytest.warns(ConfigWarning, match="data.shuffle_buffer"):
        prepare_workdir(_cfg(), str(workdir), resume=True)
    assert "shuffle_buffer" not in (workdir / "config.yaml").read_text(encoding="utf-8")


def test_cli_resume_with_another_schedule_exits_2_with_one_error_line(tmp_path):
    """The real command line: the removed key's warning and the refusal, one line each."""
    workdir = tmp_path / "run"
    prepare_workdir(_cfg(), str(workdir), resume=False)
    tree = to_dict(_cfg())
    tree["diffusion"]["schedule"] = "cosine"
    tree["data"]["shuffle_buffer"] = 100
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "ipu_diffusion", "train", "--resume", "--config",
                           str(path), "--workdir", str(workdir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    assert lines == [
        f"warning: {path}: data.shuffle_buffer: removed and ignored, it has no effect (the "
        "data order is a pure function of run.seed and the step); delete it from the config",
        f"error: workdir {workdir} holds a run trained with other settings that cannot change "
        "on resume: diffusion.schedule 'linear' -> 'cosine'. Resume it with its saved config "
        "(omit --config and those --set) or start a new run in another --workdir"]
    assert load_config(str(workdir / "config.yaml")) == _cfg()


@pytest.mark.slow
def test_resume_with_safe_changes_restores_and_trains_on(tmp_path):
    """Two unsplit steps, then resumed pipelined over 2 stages with 2 microbatches, a
    lower learning rate, more steps and other logging: the checkpoint restores (every
    variable matched) and training continues from step 2."""
    workdir = str(tmp_path / "run")
    train(_cfg("training.steps=2", "training.num_sample_images=0"), workdir, verbose=0)
    resumed = train(_cfg("training.steps=3", "training.num_sample_images=0",
                         "pipeline.stages=2", "pipeline.microbatches=2", "training.lr=5e-4",
                         "training.log_every=1", "training.checkpoint_every=1",
                         "eval.steps=3"), workdir, resume=True, verbose=0)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 3
    assert load_config(os.path.join(workdir, "config.yaml")).pipeline.stages == 2
