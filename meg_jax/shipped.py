"""Where the shipped small checkpoints are: the backbone and the calibration artifacts.

Configs name shipped files by repository-relative paths (``checkpoints/tiny``,
``checkpoints/calibration/tiny.npz``). :func:`resolve` turns such a path into a file:

1. an absolute path, or one that exists relative to the working directory, as given (a
   source checkout run from its root; any file of the user's);
2. else, for a path under ``checkpoints/``, the same file under :func:`checkpoints_dir`:
   the folder named by the environment variable ``MEG_JAX_CHECKPOINTS`` if set, else the
   copy installed with the package (the wheel ships ``checkpoints/`` as package data of the
   jobs' private package ``meg_jax_jobs``; an editable install maps it to the checkout's
   folder).

Nothing is looked up relative to this file's location in a source tree.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

__all__ = ["CHECKPOINTS_ENV", "CHECKPOINTS_PREFIX", "checkpoints_dir", "resolve", "missing_hint"]

CHECKPOINTS_ENV = "MEG_JAX_CHECKPOINTS"  # folder holding tiny/ and calibration/ (overrides the installed copy)
CHECKPOINTS_PREFIX = "checkpoints"  # the repository folder that configs' default paths start with
_PACKAGED = "meg_jax_jobs.checkpoints"  # the installed copy (pyproject: [tool.setuptools] package-dir)


def checkpoints_dir() -> Optional[str]:
    """The shipped checkpoints folder: ``$MEG_JAX_CHECKPOINTS``, else the installed copy, else None.

    Raises:
      NotADirectoryError: ``MEG_JAX_CHECKPOINTS`` is set to something that is not a folder.
    """
    env = os.environ.get(CHECKPOINTS_ENV)
    if env:
        if not os.path.isdir(env):
            raise NotADirectoryError(f"{CHECKPOINTS_ENV}={env!r} is not a directory (it should hold the shipped "
                                     "checkpoints: tiny/ and calibration/)")
        return os.path.abspath(env)
    try:
        spec = importlib.util.find_spec(_PACKAGED)
    except ModuleNotFoundError:  # no meg_jax_jobs at all (the library alone on the path)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if os.path.isdir(location):
            return os.fspath(location)
    return None


def resolve(path: str | os.PathLike) -> str:
    """The file a (possibly repository-relative) shipped path names (rules in the module docstring).

    A path that exists nowhere comes back as the most specific candidate (under
    :func:`checkpoints_dir` when it starts with ``checkpoints/``, else relative to the working
    directory), so that the caller's "not found" error names it.
    """
    path = os.fspath(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == CHECKPOINTS_PREFIX and len(parts) > 1:
        root = checkpoints_dir()
        if root is not None:
            return os.path.join(root, *parts[1:])
    return os.path.abspath(path)


def missing_hint() -> str:
    """One sentence on where shipped checkpoints are looked for (for "not found" errors)."""
    return (f"shipped paths under {CHECKPOINTS_PREFIX}/ are looked up relative to the working directory, then "
            f"under ${CHECKPOINTS_ENV} (or the copy installed with meg-jax)")
