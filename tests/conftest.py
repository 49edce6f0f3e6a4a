"""Test-session set-up: quiet TensorFlow and four logical CPU devices, so pipeline
and data-parallel tests can place work on several devices of one CPU."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_LOGICAL_CPUS = 4


def pytest_configure(config):
    """TensorFlow set-up in every process that runs tests; not in pytest-xdist's
    controller, which runs none (importing TensorFlow there would delay the workers'
    start by its import time, ~5 s)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import tensorflow as tf

    # Grappler's graph rewrites (constant folding, layout, op fusion) take about a quarter
    # of a tiny training run's time and change no value these tests check. The runs the
    # tests start as subprocesses (the CLI, multi-worker, SIGKILL, packaging) keep them
    # on, as users run.
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
    except RuntimeError:  # already initialised by an earlier import
        pass


# Seconds each of the slowest files takes in ``make test`` on 2 cores (measured with
# --junitxml; a stale figure only changes the order). ``make test`` runs with
# ``--dist loadfile --no-loadscope-reorder``: each file goes to one of the two workers in
# the order below, so starting the long files first keeps a long file from landing last
# on one worker while the other idles.
# Unlisted files count 30 s per ``slow`` test and 0.5 s per other test.
FILE_SECONDS = {  # 2026-12-04, make test-keras3: 324 s
    "tests/training/test_train_e2e.py": 77,
    "tests/training/test_multi_worker.py": 56,
    "tests/benchmarks/test_bench_smoke.py": 55,
    "tests/training/test_reliability_sigkill.py": 42,
    "tests/training/test_training_learns.py": 37,
    "tests/training/test_step_contract.py": 36,
    "tests/test_export.py": 35,
    "tests/training/test_reliability.py": 34,
    "tests/test_parallel_calls.py": 24,
    "tests/test_packaging.py": 22,
    "tests/pipeline/test_pipeline_invariant.py": 22,
    "tests/models/test_models_unet.py": 15,
    "tests/models/test_diffusers_import.py": 14,
    "tests/training/test_resume_config.py": 14,
    "tests/guidance/test_guidance_classifier.py": 14,
    "tests/evaluation/test_eval_digits.py": 12,
    "tests/guidance/test_guidance_cfg.py": 12,
    "tests/training/test_mixed_precision_step.py": 11,
    "tests/test_quiet_start.py": 11,
    "tests/test_rng_int32.py": 9,
}
KERAS2_FILE_SECONDS = {  # 2026-12-03, make test-keras2 (TF_USE_LEGACY_KERAS=1): 110 s
    "tests/ipu/test_ipu_contract.py": 84,
    "tests/ipu/test_ipu_train_keras2.py": 25,
    "tests/models/test_models_unet.py": 17,
    "tests/pipeline/test_pipeline_invariant.py": 13,
}


def _file_seconds(path, items):
    known = KERAS2_FILE_SECONDS if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else FILE_SECONDS
    if path in known:
        return known[path]
    return sum(30 if item.get_closest_marker("slow") else 0.5 for item in items)


def pytest_collection_modifyitems(session, config, items):
    """Slowest files first (tests keep their order within a file)."""
    by_file = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(by_file, key=lambda path: -_file_seconds(path, by_file[path]))
    items[:] = [item for path in order for item in by_file[path]]
