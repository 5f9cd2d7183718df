"""What every job (``train/*.py``, ``eval/*.py``) sets up before its work: logging and the XLA cache.

Logging: messages of the jobs and the library (loggers ``train``, ``eval``, ``meg_jax``) go
to stderr at INFO, one timestamped line each; results a job is asked for (tables, JSON
summaries) go to stdout.

Compilation cache: XLA compiles every jitted function afresh in each process, and on CPU
that is most of a short job (the demo's image section alone compiles for ~45 s). With the
persistent cache on, a compiled program is written to disk and the next run of the same
program (same shapes, flags, jax version and machine) loads it instead. The cache lives in

1. ``$JAX_COMPILATION_CACHE_DIR`` when the user set it (then jax's own settings, including
   ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, are left as they are); else
2. ``$MEG_JAX_CACHE_DIR/xla``, else the user cache dir (``$XDG_CACHE_HOME/meg-jax/xla``,
   ``~/.cache/meg-jax/xla`` on Linux).

Every job has ``--no_compile_cache`` to switch it off. Stale entries are never wrong (the key
covers the program, the compiler and its flags); the directory is capped at
:data:`MAX_CACHE_BYTES` (least recently used entries go first) and can be deleted at any time.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

__all__ = ["configure_logging", "default_cache_dir", "enable_compile_cache", "init_distributed", "MAX_CACHE_BYTES"]

MAX_CACHE_BYTES = 4 * 1024**3  # LRU cap of the cache directory we choose (not of a user-set one)
# Programs that compile faster than this are not written: on CPU the small helpers of a job
# (a reduction, a PRNG split) compile in milliseconds, and reading them back costs about as much.
MIN_COMPILE_TIME_S = 0.05

_LOGGERS = ("train", "eval", "meg_jax")


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record.

    (A plain ``StreamHandler(sys.stderr)`` keeps the stream it was made with; a job called in
    process after its caller swapped stderr, e.g. under pytest's capture, would write to a
    closed file.)
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Sends the ``train``, ``eval`` and ``meg_jax`` loggers to stderr at ``level`` (idempotent).

    The records stop there (no propagation): a library imported later may call
    ``logging.basicConfig`` (one of the simulator's imports does), and every line would then be
    printed twice. The root logger itself is left alone, so chatty libraries (absl, orbax) keep
    their own levels.
    """
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
            handler = _CurrentStderr()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
            logger.addHandler(handler)


def default_cache_dir() -> str:
    """Where the jobs' compilation cache lives when the user did not set ``JAX_COMPILATION_CACHE_DIR``."""
    root = os.environ.get("MEG_JAX_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("meg-jax", appauthor=False)
    return os.path.join(root, "xla")


def enable_compile_cache(enabled: bool = True) -> Optional[str]:
    """Turns on jax's persistent compilation cache for this process; returns its directory.

    Call before the first jit compilation (jax opens the cache once, at the first compile).

    Args:
      enabled: False turns the cache off (``--no_compile_cache``), even one the user set up
        with ``JAX_COMPILATION_CACHE_DIR``.

    Returns:
      The cache directory in use, or None when it is off.
    """
    import jax

    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    user_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if user_dir:  # jax read it (and its companions) at import
        return user_dir
    path = default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a job
        logging.getLogger(__name__).warning("compilation cache off: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` for a multi-host job (call before anything touches a device).

    Args:
      coordinator: ``host:port`` of process 0's coordinator service; None: from the cluster's
        environment (TPU pods, SLURM, Open MPI, Kubernetes are detected by jax).
      num_processes: number of processes (None: from the environment).
      process_id: this process's index (None: from the environment).
    """
    import jax

    # CPU collectives across processes need gloo; the setting only concerns the CPU backend, and
    # asking which backend is in use would initialise it (initialize() must come first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
