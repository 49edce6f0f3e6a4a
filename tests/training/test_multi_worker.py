"""``training.strategy: multi_worker``: two ``python -m ipu_diffusion train`` processes on
127.0.0.1 (free ports, one TF_CONFIG each) train like one process with the same global
batch; a SIGKILLed worker is recovered by restarting both with --resume; a worker alone
fails with the timeout message; TF_CONFIG and batch mistakes are one-line errors.

The expected values come from a one-process run of the same config (in this process)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from ipu_diffusion import cli
from ipu_diffusion.config import config_from_dict
from ipu_diffusion.data import make_dataset
from ipu_diffusion.training import callbacks as cb
from ipu_diffusion.training import multi_worker as mw
from ipu_diffusion.training.run import train
from tests.training.test_reliability import _committed, _ckpt_step, _final_tensors
from tests.training.test_train_e2e import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, LOG_EVERY = 16, 8  # a resume before step 8 ends with the same logging chunk 8..16
# TINY without residual blocks outside the middle: every worker process traces it once,
# and that is most of a launch's time.
CONFIG = dict(TINY, model=dict(TINY["model"], num_res_blocks=0),
              training=dict(TINY["training"], steps=STEPS, log_every=LOG_EVERY, checkpoint_every=2,
                            keep_checkpoints=STEPS, num_sample_images=0, worker_timeout_s=120.0),
              eval=dict(TINY["eval"], at_end=False))
WAIT_S = 240  # bound on any launch; a healthy one takes well under a minute
RESUMED = re.compile(r"^resumed from (\S+) \(step (\d+)\)$", re.M)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


class Cluster:
    """Two workers on 127.0.0.1. Worker 1 gets its own --workdir and TMPDIR, so the test
    can check that it writes nothing there (on separate hosts that is all it could touch)."""

    def __init__(self, tmp_path, name, overrides=()):
        self.tmp, self.name = tmp_path, name
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(dict(CONFIG, training=dict(
            CONFIG["training"], strategy="multi_worker"))))
        self.workdir = str(tmp_path / name)  # the chief's: the run's files
        self.worker1_dir, self.worker1_tmp = tmp_path / f"{name}_w1", tmp_path / f"{name}_w1_tmp"
        self.worker1_tmp.mkdir()
        self.overrides = list(overrides)
        self.launches = 0

    def start(self, resume=False, extra=()):
        ports, self.launches = _free_ports(2), self.launches + 1
        self.procs, self.logs = [], []
        for i in range(2):
            log = str(self.tmp / f"{self.name}_launch{self.launches}_w{i}")
            env = dict(os.environ, TF_CONFIG=_tf_config(ports, i), TF_CPP_MIN_LOG_LEVEL="2",
                       TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
            if i == 1:
                env["TMPDIR"] = str(self.worker1_tmp)
            cmd = [sys.executable, "-m", "ipu_diffusion", "train", "--config", str(self.config),
                   "--workdir", self.workdir if i == 0 else str(self.worker1_dir)]
            cmd += (["--resume"] if resume else []) + [f"--set={o}" for o in self.overrides]
            cmd += list(extra)
            with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
            self.logs.append(log)
        return self

    def err(self, i):
        return open(self.logs[i] + ".err").read()

    def wait(self, i, timeout=WAIT_S):
        try:
            return self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker {i} still running after {timeout} s:\n{self.err(i)[-3000:]}")

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def assert_worker1_wrote_nothing(self):
        assert not self.worker1_dir.exists(), sorted(os.listdir(self.worker1_dir))
        assert not os.listdir(self.worker1_tmp), "scratch checkpoints left behind"


def _one_process_config():
    return config_from_dict(CONFIG)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The expected run: one process, one device, the same global batch (workdir, metrics)."""
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    return workdir, train(_one_process_config(), workdir, verbose=0)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Two launches of two workers (a third, uninterrupted one would add ~30 CPU seconds):

    1. a new run; the chief is SIGKILLed right after it recorded its first checkpoint, so
       the other worker loses contact and must stop on its own;
    2. both restarted with --resume; the chief also writes a sample grid at the end.

    Returns the Cluster with ``killed_at`` (the newest recorded checkpoint then, its
    tensors in ``at_kill``) and ``first`` (worker 1's exit status and stderr in launch 1).
    """
    cluster = Cluster(tmp_path_factory.mktemp("mw"), "run").start()
    ckpt_dir = os.path.join(cluster.workdir, "checkpoints")
    deadline = time.time() + WAIT_S
    while time.time() < deadline and cluster.procs[0].poll() is None and not _committed(ckpt_dir):
        time.sleep(0.01)
    alive = cluster.procs[0].poll() is None
    cluster.procs[0].send_signal(signal.SIGKILL)
    cluster.wait(0)
    assert alive, "the chief ended before its first checkpoint:\n" + cluster.err(0)[-3000:]
    cluster.killed_at = _ckpt_step(_committed(ckpt_dir))
    cluster.at_kill = _final_tensors(cluster.workdir)[1]
    cluster.first = (cluster.wait(1, timeout=120), cluster.err(1))
    cluster.overrides.append("training.num_sample_images=4")
    cluster.start(resume=True)
    cluster.codes = [cluster.wait(0), cluster.wait(1)]
    return cluster


def _groups(tensors):
    """Checkpoint tensors by role (Keras 3 names: the weights are stored once, under the
    optimizer's trainable variables; its other variables are Adam's two moments)."""
    roles = {"weights": "optimizer/_trainable_variables/", "EMA": "ema/shadow/",
             "Adam moments": "optimizer/_variables/"}
    return {role: [k for k in sorted(tensors) if k.startswith(prefix)]
            for role, prefix in roles.items()}


def _assert_like_one_process(actual, expected, step, label):
    """Same tensors, the same step, and per role ||a - e|| / ||e|| <= 1e-5 over all its
    tensors (printed with the worst single tensor's)."""
    assert sorted(actual) == sorted(expected)
    counters = [k for k in expected if "_iterations" in k]
    assert counters and all(int(actual[k]) == int(expected[k]) == step for k in counters)
    report = []
    for role, keys in _groups(expected).items():
        assert keys, role
        a = np.concatenate([np.ravel(actual[k]).astype(np.float64) for k in keys])
        e = np.concatenate([np.ravel(expected[k]).astype(np.float64) for k in keys])
        total = float(np.linalg.norm(a - e) / np.linalg.norm(e))
        worst = max(float(np.linalg.norm(actual[k] - expected[k]))
                    / max(float(np.linalg.norm(expected[k])), 1e-30) for k in keys)
        report.append(f"{role} {total:.1e} (worst tensor {worst:.1e})")
        # Each worker sums its half of the batch and the halves are added: the float
        # summation order differs from one process's.
        assert total <= 1e-5, (label, role, total)
    print(f"\n{label} vs one process at step {step}, relative difference: " + ", ".join(report))


@pytest.mark.slow
def test_two_workers_equal_one_process(killed_and_resumed, one_process):
    """Launch 1 trained from scratch to its checkpoint like one process; launch 2 (both
    exit 0) ends where one process ends: weights, EMA, Adam moments, step, and the
    scale-sensitive loss and gradient norm of the last logging chunk."""
    cluster, (one_dir, one) = killed_and_resumed, one_process
    k = cluster.killed_at
    reader = tf.train.load_checkpoint(os.path.join(one_dir, "checkpoints", f"ckpt-{k}"))
    expected = {key: reader.get_tensor(key) for key in cluster.at_kill}
    _assert_like_one_process(cluster.at_kill, expected, k, "two workers, new run")
    assert cluster.codes == [0, 0], cluster.err(0)[-3000:] + cluster.err(1)[-3000:]
    outs = [open(cluster.logs[i] + ".out").read() for i in range(2)]
    assert all(f"done: {STEPS} steps" in out for out in outs)
    # worker 1's summary names no file of its own: it wrote none
    assert "written by the chief (worker 0)" in outs[1] and str(cluster.worker1_dir) not in outs[1]
    _assert_like_one_process(_final_tensors(cluster.workdir)[1], _final_tensors(one_dir)[1],
                             STEPS, "two workers, resumed")
    metrics = json.load(open(os.path.join(cluster.workdir, "metrics.json")))
    assert (metrics["steps"], metrics["resumed_from"]) == (STEPS, k)
    # Adam's update hardly depends on the gradient's scale; these do: a gradient summed
    # instead of averaged over the workers, or a worker reading the wrong slice, shows.
    np.testing.assert_allclose(metrics["final_loss"], one["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["final_grad_norm"], one["final_grad_norm"], rtol=1e-5)


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_newest_checkpoint(killed_and_resumed):
    """The survivor of the SIGKILL stops with a one-line error; the restarted chief
    resumes from the newest recorded checkpoint; only the chief wrote the run's files."""
    cluster = killed_and_resumed
    assert 0 < cluster.killed_at < LOG_EVERY, f"killed at step {cluster.killed_at}: not mid-run"
    code, err = cluster.first
    assert code == 2 and "error: lost contact with another worker" in err, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    resumed = RESUMED.findall(cluster.err(0))
    assert resumed and resumed[0][0].endswith(f"ckpt-{cluster.killed_at}"), cluster.err(0)[-3000:]
    assert int(resumed[0][1]) == cluster.killed_at
    assert "Traceback" not in cluster.err(0) + cluster.err(1)
    for name in ("config.yaml", "metrics.json", "samples.png", "tensorboard"):
        assert os.path.exists(os.path.join(cluster.workdir, name)), name
    cluster.assert_worker1_wrote_nothing()


def test_worker_alone_fails_with_the_timeout_message(tmp_path, monkeypatch, capsys):
    """Worker 1 started without worker 0 (in this process: it fails before TensorFlow's
    join, which could not be interrupted)."""
    ports = _free_ports(2)
    monkeypatch.setenv("TF_CONFIG", _tf_config(ports, 1))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    began = time.time()
    code = cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "w1"),
                     "--set", "training.strategy=multi_worker", "--set", "training.worker_timeout_s=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: worker 1 (127.0.0.1:{ports[1]}) could not reach worker 0 at "
                          f"127.0.0.1:{ports[0]} within 2 s (training.worker_timeout_s)"), err
    assert 2 <= time.time() - began < 30 and not (tmp_path / "w1").exists()


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG is not set; training.strategy multi_worker needs it on every worker"),
    ("{'cluster'", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG needs a "cluster" mapping'),
    ('{"cluster": {"worker": ["127.0.0.1:1"], "chief": ["127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 0}}', "cluster job(s) chief are not supported"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "cluster.worker entry 'localhost' is not \"host:port\""),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "task.index must be an integer in 0..1"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "ps", "index": 0}}',
     'task must be {"type": "worker", "index": i}'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}',
     "training.batch_size: 7 is not divisible by the 2 replicas of 2 workers (1 per worker); "
     "use a multiple of 2"),
])
def test_cluster_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    code = cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "w"),
                     "--set", "training.strategy=multi_worker", "--set", "training.batch_size=7"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err


def test_each_worker_reads_only_its_slices_and_together_the_global_batch():
    """Workers x local replicas: each input pipeline yields its replicas' slices of every
    global batch, in replica order; their union is the one-process batch, example for
    example (same index, so the same per-example random keys)."""
    cfg = _one_process_config()
    batch, steps = 12, 3
    whole = [b for _, b in zip(range(steps), make_dataset(cfg, batch, seed=5, start_step=4))]
    for workers, local in [(2, 1), (3, 2), (1, 4)]:
        pieces = []
        for w in range(workers):
            slices = mw.slices_of(w, workers, workers * local)
            stream = make_dataset(cfg, batch, seed=5, start_step=4, slices=slices)
            pieces.append([e for _, e in zip(range(steps * local), stream)])
        for s in range(steps):
            joined = [pieces[w][s * local + j] for w in range(workers) for j in range(local)]
            for key in ("index", "image", "label"):
                np.testing.assert_array_equal(
                    np.concatenate([e[key].numpy() for e in joined]), whole[s][key].numpy())


def test_rendezvous_finds_the_other_worker_and_refuses_a_held_port():
    """Two workers starting 0.5 s apart find each other; after its rendezvous each listens
    on its port as TensorFlow's server then does. A port another process holds is named."""
    ports = _free_ports(2)
    clusters = [mw.Cluster(tuple(f"127.0.0.1:{p}" for p in ports), i) for i in range(2)]
    outcome, servers = {}, []

    def worker(cluster, delay):
        time.sleep(delay)
        try:
            mw.rendezvous(cluster, timeout_s=20)
            servers.append(socket.create_server(("127.0.0.1", ports[cluster.index])))
            outcome[cluster.index] = "joined"
        except mw.ClusterError as e:
            outcome[cluster.index] = str(e)

    threads = [threading.Thread(target=worker, args=(c, 0.5 * c.index)) for c in clusters]
    began = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for server in servers:
        server.close()
    assert outcome == {0: "joined", 1: "joined"} and time.time() - began < 10
    with socket.create_server(("127.0.0.1", ports[0])):
        with pytest.raises(mw.ClusterError, match=rf"worker 0 cannot listen on port {ports[0]} "
                                                  r"of its TF_CONFIG address 127\.0\.0\.1"):
            mw.rendezvous(clusters[0], timeout_s=1)


def test_join_watchdog_ends_a_stuck_process_with_its_message(capfd):
    """The last resort around TensorFlow's join: quiet when the join ends in time; after
    the timeout it prints the error line and SIGKILLs the process (here a stand-in)."""
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with mw.JoinWatchdog(30, "never shown", pid=stuck.pid):
            pass
        with mw.JoinWatchdog(0.3, "worker 1 (x:1): did not form a cluster", pid=stuck.pid):
            assert stuck.wait(timeout=30) == -signal.SIGKILL
    finally:
        if stuck.poll() is None:
            stuck.kill()
    assert capfd.readouterr().err == "error: worker 1 (x:1): did not form a cluster\n"


def test_stop_guard_stops_every_worker_on_a_signal_one_received():
    """With ``agree``, a signal another worker received stops this one at the same step;
    a signal after the agreement is not acted on mid-step."""

    class Model:
        stop_training, abort_reason = False, None
        guard = type("G", (), {"consecutive": tf.Variable(0, dtype=tf.int64)})()

    votes = []
    guard = cb.StopGuard(max_nonfinite=3, agree=lambda s: votes.append(s) or (15 if len(votes) > 1
                                                                              else 0))
    guard.set_model(Model())
    guard.on_train_batch_end(0)
    assert not guard.model.stop_training and guard.stop_signal == 0 and not guard.stopped
    guard.on_train_batch_end(1)  # the other worker got SIGTERM before this batch end
    assert guard.model.stop_training and guard.stop_signal == 15 and guard.stopped
    assert votes == [0, 0] and guard.signal_received is None
