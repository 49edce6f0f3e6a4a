"""The built-in run configs, shipped inside the package (``ipu_diffusion/configs/*.yaml``).

``--config digits`` names one of them; ``pipeline_configs/<name>.yaml`` in a source checkout
is a one-line ``base:`` pointing here, so older paths keep working.
"""
from __future__ import annotations

import os
from typing import List

from ipu_diffusion.config import ConfigError

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def builtin_names() -> List[str]:
    """Names of the shipped configs, sorted (``digits``, ``ddpm_cifar10``, ...)."""
    return sorted(f[:-len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def builtin_path(name: str) -> str:
    """The packaged YAML file of config ``name``; a ConfigError lists the names there are."""
    path = os.path.join(CONFIG_DIR, name + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {name!r}: not a file and not a built-in config; built-in "
                          f"configs: {', '.join(builtin_names())} (or give a YAML file path)")
    return path


def resolve_config(name_or_path: str) -> str:
    """A path to a YAML file for ``--config``: an existing file, anything with a path
    separator or a ``.yaml``/``.yml`` suffix is taken as a path (a missing one then fails in
    ``load_config`` with the path in the message); a bare name is a built-in config."""
    text = name_or_path
    is_path = (os.path.exists(text) or "/" in text or os.sep in text
               or text.endswith((".yaml", ".yml")))
    return text if is_path else builtin_path(text)
