"""A run directory's layout and its checkpoints, for both readers: inference restores the
EMA weights alone (``pipeline.Pipeline``), training's resume everything
(``training.run.restore_latest``).

A checkpoint is recorded in ``checkpoints/checkpoint`` only after its files are written,
so a save cut short is never a candidate. A recorded one whose files are damaged anyway
(a truncated or corrupted file, a lost write after a power failure) is skipped with a
warning for the one before it; a complete one that does not fit the model is an error.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import tensorflow as tf

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# what a restore raises on a checkpoint it cannot use (IndexError: a truncated data file)
RESTORE_ERRORS = (AssertionError, ValueError, IndexError, tf.errors.OpError)


class WorkdirError(ValueError):
    """A run directory that cannot be used as asked; the message names the path."""


def no_checkpoint_error(directory: str) -> WorkdirError:
    return WorkdirError(f"no checkpoint in {directory}; train first: python -m ipu_diffusion "
                        "train --config FILE --workdir DIR")


def newest_first(latest: Optional[str], recorded: Sequence[str]) -> List[str]:
    """The recorded checkpoints, ``latest`` first, then the others newest first."""
    candidates = [latest] if latest else []
    return candidates + [p for p in reversed(list(recorded)) if p not in candidates]


def recorded_checkpoints(workdir: str) -> List[str]:
    """The checkpoints ``<workdir>/checkpoints/checkpoint`` records, newest first."""
    state = tf.train.get_checkpoint_state(os.path.join(workdir, CHECKPOINT_DIR))
    if state is None:
        return []
    return newest_first(state.model_checkpoint_path, state.all_model_checkpoint_paths)


def checkpoint_step(prefix: str) -> int:
    """The step of ``.../ckpt-<step>`` (checkpoints are numbered by their step)."""
    return int(prefix.rsplit("-", 1)[1])


def checkpoint_damage(prefix: str) -> Optional[str]:
    """None when every tensor of the checkpoint at ``prefix`` reads back (the reader
    checks each tensor's CRC); otherwise what is wrong, in one line."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except (tf.errors.OpError, IndexError, ValueError) as e:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return None


def restore_newest(candidates: Sequence[str], restore: Callable[[str], None], directory: str,
                   log: Callable[[str], None]) -> str:
    """``restore(prefix)`` the first of ``candidates`` (newest first) whose files read
    back, logging a warning for each damaged one skipped; returns its prefix.

    Raises:
        WorkdirError: a complete checkpoint that ``restore`` refuses (another model), or
            every candidate damaged.
    """
    damaged = []
    for i, prefix in enumerate(candidates):
        try:
            restore(prefix)
            return prefix
        except RESTORE_ERRORS as e:
            damage = checkpoint_damage(prefix)
            if damage is None:  # the files are fine: they hold another model
                raise WorkdirError(f"checkpoint {prefix} does not fit this config (different "
                                   f"model?): {str(e).splitlines()[0]}") from None
        damaged.append(os.path.basename(prefix))
        following = candidates[i + 1] if i + 1 < len(candidates) else None
        log(f"warning: checkpoint {prefix} is damaged ({damage}); "
            + (f"falling back to {following}" if following else "no older checkpoint is recorded"))
    raise WorkdirError(f"every recorded checkpoint in {directory} is damaged "
                       f"({', '.join(damaged)}); restore it from a backup or start a new run "
                       "in another --workdir")
