"""Job entry points: thin wrappers that build a config, call the library, log and checkpoint.

Layout (both ways of running the jobs use the same files):

* from a source checkout, ``train/`` and ``eval/`` are top-level packages of the repository
  root: ``python -m train.cvpo``, ``python -m eval.evaluate``;
* in the wheel they are installed under the private parent package ``meg_jax_jobs``
  (``meg_jax_jobs.train``, ``meg_jax_jobs.eval``; see ``[tool.setuptools]`` in
  ``pyproject.toml``), so installing meg-jax puts no top-level ``train`` or ``eval`` module
  on anyone's path; the ``meg-jax`` console script is ``meg_jax_jobs.train.cli:main``.

Imports inside one folder are relative (``from . import cvpo``). The few imports from one
folder into the other go through :func:`job_module`, which resolves the sibling folder under
whichever parent this package was imported from.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["job_module"]


def job_module(name: str) -> ModuleType:
    """Imports ``name`` (e.g. ``"eval.orchestrate"``) beside this package: ``eval.orchestrate`` at
    the repository root, ``meg_jax_jobs.eval.orchestrate`` when installed from the wheel."""
    parent = __name__.rpartition(".")[0]
    return importlib.import_module(f"{parent}.{name}" if parent else name)
