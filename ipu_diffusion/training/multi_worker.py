"""Data-parallel training across hosts: ``training.strategy: multi_worker``.

Every host runs the same ``python -m ipu_diffusion train`` command with its own
``TF_CONFIG``; ``tf.distribute.MultiWorkerMirroredStrategy`` joins them, worker 0 is the
chief. What this module adds to the one-process trainer:

- :func:`cluster_from_env` reads ``TF_CONFIG`` strictly (one-line errors);
- :func:`make_strategy` joins the cluster within ``training.worker_timeout_s`` (TensorFlow
  itself waits forever for a missing worker) and names the workers that did not answer
  (:func:`rendezvous`);
- :func:`distributed_stream` gives each worker only its share of every global batch,
  sliced by global example position, so the union per step is exactly the one-process
  batch and every per-example key (``ipu_diffusion.rng``) is unchanged;
- :func:`broadcast_from_chief` copies the state the chief restored to every worker, so
  only the chief reads the workdir;
- :class:`SignalAgreement` makes every worker stop at the same step on a signal that
  reached any of them;
- :class:`ScratchCheckpoints`: TensorFlow's rule for multi-worker checkpoints is that every
  worker calls ``save`` (a save may contain collectives) and non-chief workers save into
  temporary directories that they delete; only the chief's checkpoint is kept.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from ipu_diffusion.config import ConfigError

TF_CONFIG = "TF_CONFIG"
_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\'')


class ClusterError(ValueError):
    """TF_CONFIG is missing or malformed, or the workers cannot form the cluster."""


@dataclass(frozen=True)
class Cluster:
    """The workers' ``host:port`` addresses, in TF_CONFIG order, and this worker's index."""

    workers: Tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def address(self) -> str:
        return self.workers[self.index]


def parse_tf_config(text: Optional[str]) -> Cluster:
    """The :class:`Cluster` a ``TF_CONFIG`` value describes; ClusterError says what is wrong.

    Only the ``worker`` job is accepted (worker 0 is the chief, as
    ``MultiWorkerMirroredStrategy`` treats it when there is no ``chief`` job)."""
    if text is None or not text.strip():
        raise ClusterError(f"{TF_CONFIG} is not set; training.strategy multi_worker needs it on "
                           f"every worker, e.g. {_EXAMPLE} (index 1 on the second host)")
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise ClusterError(f"{TF_CONFIG} is not valid JSON ({e}); expected e.g. {_EXAMPLE}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ClusterError(f"{TF_CONFIG} needs a \"cluster\" mapping; expected e.g. {_EXAMPLE}")
    jobs = spec["cluster"]
    other = sorted(str(j) for j in jobs if j != "worker")
    if other:
        raise ClusterError(f"{TF_CONFIG}: cluster job(s) {', '.join(other)} are not supported; "
                           "list every host under \"worker\" (worker 0 is the chief)")
    workers = jobs.get("worker")
    if not isinstance(workers, list) or not workers:
        raise ClusterError(f"{TF_CONFIG}: cluster.worker must be a non-empty list of "
                           "\"host:port\" addresses")
    for address in workers:
        _check_address(address)
    if len(set(workers)) != len(workers):
        raise ClusterError(f"{TF_CONFIG}: cluster.worker lists an address twice: {workers}")
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") != "worker":
        raise ClusterError(f"{TF_CONFIG}: task must be {{\"type\": \"worker\", \"index\": i}}, "
                           f"got {task!r}")
    index = task.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(workers):
        raise ClusterError(f"{TF_CONFIG}: task.index must be an integer in 0..{len(workers) - 1} "
                           f"(this worker's position in cluster.worker), got {index!r}")
    return Cluster(tuple(workers), index)


def _check_address(address) -> None:
    host, _, port = str(address).rpartition(":")
    if not isinstance(address, str) or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ClusterError(f"{TF_CONFIG}: cluster.worker entry {address!r} is not "
                           "\"host:port\" with a port in 1..65535")


def cluster_from_env(environ: Optional[Mapping[str, str]] = None) -> Cluster:
    return parse_tf_config((os.environ if environ is None else environ).get(TF_CONFIG))


# --------------------------------------------------------------------------- joining


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _listen(address: str) -> socket.socket:
    """A listening socket on ``address``'s port: on that host when it is a loopback
    address, else on every interface (a host name may resolve differently here than on
    the peers), IPv6 and IPv4 where possible."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return socket.create_server((host, int(port)))
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", int(port)), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", int(port)))


def rendezvous(cluster: Cluster, timeout_s: float, poll_s: float = 0.1) -> None:
    """Return once every other worker answers on its TF_CONFIG address, answering on our
    own meanwhile; ClusterError naming the silent workers after ``timeout_s``.

    TensorFlow's own join blocks in C++ while holding the GIL, with no timeout: a missing
    worker would hang it forever and no Python thread or signal handler could intervene.
    So the workers first find each other with plain sockets. A worker that has finished
    this closes its socket and starts TensorFlow's server on the same port, which then
    answers the others' probes instead."""
    port = int(cluster.address.rpartition(":")[2])
    try:
        server = _listen(cluster.address)
    except OSError as e:
        raise ClusterError(f"worker {cluster.index} cannot listen on port {port} of its TF_CONFIG "
                           f"address {cluster.address} ({e.strerror or e}); another process holds "
                           "it: stop that process or give this worker a free port") from None
    server.settimeout(poll_s)
    done = threading.Event()

    def answer():
        while not done.is_set():
            try:
                server.accept()[0].close()
            except OSError:  # timeout: look at `done` again
                pass

    thread = threading.Thread(target=answer, name="rendezvous", daemon=True)
    thread.start()
    deadline = time.monotonic() + float(timeout_s)
    pending = [(i, a) for i, a in enumerate(cluster.workers) if i != cluster.index]
    try:
        while pending and time.monotonic() < deadline:
            pending = [(i, a) for i, a in pending if not answers(a, min(1.0, timeout_s))]
            if pending:
                time.sleep(poll_s)
    finally:
        done.set()
        thread.join()
        server.close()
    if pending:
        silent = ", ".join(f"worker {i} at {a}" for i, a in pending)
        raise ClusterError(
            f"worker {cluster.index} ({cluster.address}) could not reach {silent} within "
            f"{timeout_s:g} s (training.worker_timeout_s); start every worker listed in "
            "TF_CONFIG (the same cluster.worker list on each, its own task.index) and check "
            "that this host can reach that address")


_WATCHDOG = """
import os, select, signal, sys
ready = select.select([sys.stdin], [], [], float(sys.argv[2]))[0]
if not ready:  # the parent did not close our stdin in time
    sys.stderr.write(sys.argv[3] + "\\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


class JoinWatchdog:
    """Last resort around TensorFlow's join, which no Python code in this process can
    interrupt: a tiny separate process prints ``error: <message>`` and SIGKILLs this one
    unless the ``with`` body ends within ``timeout_s`` (after a successful
    :func:`rendezvous` this needs a worker dying or mismatched TF_CONFIGs)."""

    def __init__(self, timeout_s: float, message: str, pid: Optional[int] = None):
        pid = os.getpid() if pid is None else pid  # the process to end (tests: another)
        self.args = [sys.executable, "-c", _WATCHDOG, str(pid), str(float(timeout_s)),
                     f"error: {message}"]
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "JoinWatchdog":
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()  # EOF: the watchdog exits quietly
        self.proc.wait()


def make_strategy(cluster: Cluster, timeout_s: float) -> tf.distribute.Strategy:
    """``MultiWorkerMirroredStrategy`` over ``cluster`` once every worker has joined and
    passed a first all-reduce, each step bounded by ``timeout_s`` (see :func:`rendezvous`
    and :class:`JoinWatchdog`)."""
    rendezvous(cluster, timeout_s)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(cluster.workers)}), task_type="worker",
        task_id=cluster.index, rpc_layer="grpc")
    message = (f"worker {cluster.index} ({cluster.address}): the workers answered but did not "
               f"form a cluster within {timeout_s:g} s (training.worker_timeout_s); a worker "
               "stopped meanwhile, or the TF_CONFIG cluster.worker lists differ: restart every "
               "worker with the same list")
    with JoinWatchdog(timeout_s, message):
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        SignalAgreement(strategy)(0)  # a barrier: every worker is up and collectives work
    # The streams are infinite, so no worker ever runs out of data before the others:
    # skip the per-step all-reduce of "has a batch" and the cond around every batch.
    strategy.extended.experimental_enable_get_next_as_optional = False
    return strategy


def local_replicas() -> int:
    """Replicas this worker will run: its GPUs, else one CPU (as the strategy picks them)."""
    return len(tf.config.list_physical_devices("GPU")) or 1


def check_batch(cfg, replicas: int, workers: int) -> None:
    """ConfigError unless ``training.batch_size`` splits evenly over ``replicas``."""
    batch = cfg.training.batch_size
    if batch % replicas:
        raise ConfigError(f"training.batch_size: {batch} is not divisible by the {replicas} "
                          f"replicas of {workers} workers ({replicas // workers} per worker); "
                          f"use a multiple of {replicas}")


def cluster_for(cfg) -> Cluster:
    """This worker's cluster from ``TF_CONFIG`` (ClusterError when missing or malformed),
    after checking that the global batch splits over the replicas it promises (ConfigError;
    :func:`strategy_for` checks again with the replicas that joined)."""
    cluster = cluster_from_env()
    check_batch(cfg, len(cluster.workers) * local_replicas(), len(cluster.workers))
    return cluster


def strategy_for(cfg) -> tf.distribute.Strategy:
    """The joined ``MultiWorkerMirroredStrategy`` of a run config (:func:`make_strategy`)."""
    cluster = cluster_for(cfg)
    strategy = make_strategy(cluster, cfg.training.worker_timeout_s)
    check_batch(cfg, strategy.num_replicas_in_sync, len(cluster.workers))
    return strategy


# --------------------------------------------------------------------------- collectives

# What a collective raises once a peer is gone: the coordination service notices the
# missing heartbeats, or the connection is reset, and aborts every pending collective.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError)


def lost_worker(error: tf.errors.OpError, checkpoints: Optional[str]) -> str:
    """The one-line error for a collective aborted because another worker is gone;
    ``checkpoints`` is the chief's checkpoint directory (None on the other workers)."""
    lines = [re.sub(r"\{\{[^}]*\}\}", "", ln).strip() for ln in str(error.message).splitlines()]
    hints = ("abort", "unhealthy", "reset", "closed", "unavailable", "connect")
    cause = next((ln for ln in lines if any(h in ln.lower() for h in hints)),
                 next((ln for ln in lines if ln), ""))
    cause = cause.split("aborted by: ", 1)[-1]
    where = f" in {checkpoints}" if checkpoints else ""
    return (f"lost contact with another worker ({type(error).__name__}: {cause[:160]}); restart "
            f"every worker with --resume: training continues from the chief's newest complete "
            f"checkpoint{where}")


def worker_sum(strategy) -> Callable[[Sequence[float]], List[float]]:
    """``total(values)`` -> the element-wise sum of every worker's ``values`` (a short list
    of floats, each counted once per local replica), the same on every worker; all must
    call it at the same points. One compiled all-reduce per strategy: ~3 ms between two
    processes on one host (8 ms eagerly)."""
    cached = getattr(strategy, "_ipu_diffusion_worker_sum", None)
    if cached is not None:
        return cached

    def replica_sum(values):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(values))

    reduce = tf.function(lambda values: strategy.experimental_local_results(
        strategy.run(replica_sum, args=(values,)))[0])

    def total(values: Sequence[float]) -> List[float]:
        return [float(v) for v in reduce(tf.constant(list(values), tf.float32)).numpy()]

    strategy._ipu_diffusion_worker_sum = total  # noqa: SLF001 (one trace per strategy)
    return total


class SignalAgreement:
    """``agree(signum)`` -> the signal any worker received (0: none), the same on every
    worker (:func:`worker_sum`). Every worker must call it at the same points (each batch
    end)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, strategy):
        self.total = worker_sum(strategy)

    def __call__(self, signum: int) -> int:
        counts = self.total([1.0 if s == signum else 0.0 for s in self.SIGNALS])
        return max((int(s) for s, n in zip(self.SIGNALS, counts) if n > 0), default=0)


def chief_says(strategy, flag: bool, is_chief: bool) -> bool:
    """The chief's ``flag`` on every worker (the others' are ignored)."""
    return worker_sum(strategy)([1.0 if flag and is_chief else 0.0])[0] > 0


def broadcast_from_chief(strategy, variables: Sequence) -> None:
    """Set every worker's ``variables`` to the chief's values (global replica 0's).

    One all-reduce per dtype of the chief's values and everyone else's zeros: ``x + 0 = x``
    exactly, so the copy is bit for bit. All workers must call this with the same variables."""
    by_dtype: Dict[tf.DType, List] = {}
    for v in variables:
        by_dtype.setdefault(tf.as_dtype(v.dtype), []).append(v)
    groups = list(by_dtype.values())

    def keep_chief():
        ctx = tf.distribute.get_replica_context()
        chief = tf.equal(ctx.replica_id_in_sync_group, 0)
        reduced = []
        for group in groups:
            values = [tf.convert_to_tensor(v) for v in group]
            values = [tf.where(chief, x, tf.zeros_like(x)) for x in values]
            reduced.append(ctx.all_reduce(tf.distribute.ReduceOp.SUM, values))
        return reduced

    results = tf.function(lambda: strategy.run(keep_chief))()
    for group, values in zip(groups, results):
        for v, value in zip(group, values):
            value = strategy.experimental_local_results(value)[0]
            distributed = v if isinstance(v, tf.Variable) else v.value  # a Keras 3 variable
            for local in strategy.experimental_local_results(distributed):
                local.assign(value)  # each local copy directly: plain eager assigns


def state_variables(run) -> List:
    """Every variable a checkpoint of ``run`` holds (``DiffusionTrainer.checkpoint_objects``)."""
    seen: Dict[int, object] = {}
    for obj in run.trainer.checkpoint_objects().values():
        for v in obj.variables:
            seen.setdefault(id(v), v)
    return list(seen.values())


# --------------------------------------------------------------------------- data


def slices_of(pipeline: int, pipelines: int, replicas: int) -> Tuple[int, int, int]:
    """``(first, count, total)``: the slices of each global batch input pipeline
    ``pipeline`` (one per worker) feeds: its local replicas' ``count`` consecutive slices
    of ``total`` = all replicas, in global replica order (worker w's replicas are
    ``w * count .. w * count + count - 1``)."""
    if replicas % pipelines:
        raise ClusterError(f"{replicas} replicas do not divide evenly over {pipelines} workers")
    count = replicas // pipelines
    return pipeline * count, count, replicas


def distributed_stream(strategy, make_stream: Callable[[Tuple[int, int, int]], tf.data.Dataset]):
    """``make_stream(slices)`` on each worker, distributed to its replicas: a worker
    builds only its own slices of every global batch, each local replica gets one per step."""

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return make_stream(slices_of(ctx.input_pipeline_id, ctx.num_input_pipelines,
                                     ctx.num_replicas_in_sync))

    return strategy.distribute_datasets_from_function(dataset_fn)


# --------------------------------------------------------------------------- checkpoints


class ScratchCheckpoints:
    """Stands in for a non-chief worker's ``CheckpointManager``: each ``save`` writes the
    checkpoint into a new temporary directory (outside the workdir) and deletes it at once.
    Restoring happens on the chief only (:func:`broadcast_from_chief`)."""

    def __init__(self, checkpoint: tf.train.Checkpoint):
        self.checkpoint = checkpoint
        self.latest_checkpoint = None
        self.checkpoints: List[str] = []

    def save(self, checkpoint_number: Optional[int] = None) -> None:
        scratch = tempfile.mkdtemp(prefix="ipu_diffusion_worker_ckpt_")
        try:
            tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                checkpoint_number=checkpoint_number)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None
