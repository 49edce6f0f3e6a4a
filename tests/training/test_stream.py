"""The stateless training stream: every epoch is a permutation, resume is exact."""
import numpy as np

from ipu_diffusion.training.stream import training_stream


def _take(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _data(n=10):
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
    return images, np.arange(n) % 3


def test_each_epoch_is_a_permutation_and_epochs_differ():
    images, labels = _data(10)
    batches = _take(training_stream(images, labels, batch_size=5, seed=1), 4)
    seen = np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(20))
    for b in batches:
        np.testing.assert_array_equal(b["label"], b["image"][:, 0, 0, 0].astype(int) % 3)


def test_batches_spanning_epochs_and_resume_is_exact():
    images, labels = _data(7)
    full = _take(training_stream(images, labels, batch_size=3, seed=5), 6)
    resumed = _take(training_stream(images, labels, batch_size=3, seed=5, start_step=4), 2)
    for a, b in zip(full[4:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    seen = np.concatenate([b["image"][:, 0, 0, 0] for b in full]).astype(int)
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))


def test_seed_changes_order_and_flip_is_per_example_deterministic():
    images = np.random.RandomState(0).uniform(-1, 1, (8, 3, 3, 1)).astype(np.float32)
    a = _take(training_stream(images, None, 8, seed=0, random_flip=True), 1)[0]
    b = _take(training_stream(images, None, 8, seed=0, random_flip=True), 1)[0]
    c = _take(training_stream(images, None, 8, seed=1), 1)[0]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["index"] * 0 + a["image"].sum((1, 2, 3)), c["image"].sum((1, 2, 3)))
    flipped = [any(np.array_equal(x, im[:, ::-1]) and not np.array_equal(x, im) for im in images)
               for x in a["image"]]
    assert 0 < sum(flipped) < 8
