"""Data sources: the embedded digits, image folders, .npz arrays and prepared TFDS sets.

    images, labels = load_arrays(run_config, "train")    # float32 [N, H, W, C] in [-1, 1]
    ds = make_dataset(run_config, batch_size=64, seed=0)  # {"image", "label", "index"}
"""
from __future__ import annotations

from ipu_diffusion.data.common import DataError, dataset_identity
from ipu_diffusion.data.dataset import held_out_split, load_arrays, load_raw, make_dataset

__all__ = ["DataError", "dataset_identity", "held_out_split", "load_arrays", "load_raw",
           "make_dataset"]
