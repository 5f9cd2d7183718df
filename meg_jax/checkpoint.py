"""Checkpoints: orbax training checkpoints for both trainers, and the compact shipped backbone.

Two forms, for two readers:

* **Training checkpoints** (``make_manager``, ``restore_or_init``, ``check_config``): an orbax
  ``CheckpointManager`` per job directory that keeps the last N steps, saves asynchronously
  and stores the job's resolved config as ``config.json`` beside the steps. Rerunning a job
  with the same config resumes from the latest step; a different config is refused with the
  differing fields named (``meg_jax.config.diff``), so a checkpoint is never silently
  continued under other settings.
* **Shipped backbone** (``export_component``, ``load_backbone``): what ``meg-jax demo``, the
  calibration and the notebooks load without the training harness. One folder per component
  (``classifier``, ``vae``, ``teacher``, ``student``, and optionally ``ue_decoder``, the
  merging-aware decoder of the user's device) with ``config.json`` and ``*.safetensors``
  files of float32 parameters (flattened with ``/``-joined keys), plus a ``backbone.json``
  at the top with the backbone and sampling settings::

      from meg_jax.checkpoint import load_backbone
      bb = load_backbone("checkpoints/tiny")   # Backbone: configs + params of every part
      images = meg_jax.distill.generate(bb, tokens, noise, num_steps=4)   # [B, 32, 32, 3]
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from meg_jax import config as config_lib

__all__ = [
    "CONFIG_FILE",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "read_json",
    "make_manager",
    "check_config",
    "restore_or_init",
    "save",
    "all_finite",
    "Backbone",
    "flatten_params",
    "unflatten_params",
    "save_params",
    "load_params",
    "export_component",
    "load_backbone",
    "COMPONENTS",
    "OPTIONAL_COMPONENTS",
    "UE_DECODER_FILE",
]

CONFIG_FILE = "config.json"
COMPONENTS = ("classifier", "vae", "teacher", "student")
# Loaded when present: the merging-aware UE decoder (the VAE's decoder groups, fine-tuned on
# merged + channel-noised latents; ``meg_jax.distill.config.UEDecoderStageConfig``).
OPTIONAL_COMPONENTS = ("ue_decoder",)
UE_DECODER_FILE = "decoder.safetensors"  # in ue_decoder/: {"decoder": ..., "post_quant_conv": ...}


class ConfigMismatchError(ValueError):
    """A checkpoint directory was written with a config other than the requested one."""


class CorruptCheckpointError(ValueError):
    """A checkpoint or config file cannot be read (truncated, corrupt, wrong contents); the message names it."""


def read_json(path: str | os.PathLike, what: str, required: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``path``; raises :class:`CorruptCheckpointError` naming the file if it is unreadable.

    Args:
      path: a ``config.json`` / ``backbone.json``.
      what: what the file is, for the message (e.g. "the backbone's settings").
      required: top-level keys that must be present.
    """
    path = os.fspath(path)
    data = config_lib.read_json_object(path, what, error=CorruptCheckpointError)
    missing = [k for k in required if k not in data]
    if missing:
        raise CorruptCheckpointError(f"{path} ({what}) lacks the key(s) {missing}; it has {sorted(data)}")
    return data


# --------------------------------------------------------------------------- training


def make_manager(directory: str | os.PathLike, *, max_to_keep: int = 3,
                 async_save: bool = True) -> Any:
    """An orbax ``CheckpointManager`` over ``directory`` (created).

    Args:
      directory: where the numbered step folders go.
      max_to_keep: keep only the latest N steps (older ones are deleted after a save).
      async_save: write in a background thread; call ``manager.wait_until_finished()``
        (done by ``manager.close()``) before the process ends.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    if max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(directory, options=options)


def _without(cfg: dict, names: tuple[str, ...]) -> dict:
    """``cfg`` without the top-level fields ``names``."""
    return {k: v for k, v in cfg.items() if k not in names}


def _with_defaults(stored: dict, config: Any) -> dict:
    """``stored`` with the fields it lacks filled in from ``config``'s dataclass defaults.

    A config written before a field existed was made with that field's default (a field is
    added with the default that keeps the old behaviour), so a run from an older version
    still resumes and re-scores. A stored config the dataclass cannot read (a field since
    removed, a value of another type) is compared as stored, so the mismatch is named.
    """
    if isinstance(config, dict):
        return stored
    try:
        full = config_lib.from_dict(type(config), stored)
    except (TypeError, ValueError):
        return stored
    return json.loads(json.dumps(config_lib.to_dict(full)))


def check_config(directory: str | os.PathLike, config: Any, ignore: tuple[str, ...] = ()) -> None:
    """Writes ``config`` as ``<directory>/config.json``, or refuses a different stored one.

    Args:
      directory: the job's checkpoint directory.
      config: a config dataclass, or a JSON-ready dict of the settings that determine the
        checkpoint's contents.
      ignore: top-level fields that do not change the checkpoint's contents (e.g. how a
        finished run is scored): they may differ; the stored file is then updated to the
        requested values, so it always describes the last run.
        A field the stored config lacks (written before the field existed) counts as its
        default.

    Raises:
      ConfigMismatchError: the directory holds a config that differs; the message names
        every differing field with both values.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    requested = config if isinstance(config, dict) else config_lib.to_dict(config)
    requested = json.loads(json.dumps(requested))  # tuples -> lists, as stored
    if os.path.exists(path):
        stored = read_json(path, "the config this directory's checkpoints were made with")
        blocking = config_lib.diff(_without(_with_defaults(stored, config), ignore), _without(requested, ignore))
        if blocking:
            raise ConfigMismatchError(
                f"checkpoint directory {directory} was made with another config; differing "
                f"fields (stored != requested): {'; '.join(blocking)}. Use a new --workdir, "
                "or rerun with the stored settings."
            )
        if stored == requested:
            return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(requested, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def restore_or_init(manager: Any, init_state: Any) -> tuple[Any, int]:
    """Restores the latest step of ``manager`` into the structure of ``init_state``.

    Args:
      manager: from :func:`make_manager`.
      init_state: a freshly initialised state pytree; its shapes, dtypes and shardings
        say how to restore.

    Returns:
      ``(state, step)``: the restored state and its step, or ``(init_state, 0)`` when the
      directory holds no checkpoint.

    Raises:
      CorruptCheckpointError: the latest step cannot be restored (a file truncated or
        corrupt, e.g. by a full disk or a copy cut short); the message names the step folder
        and what orbax found wrong.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return init_state, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init_state)
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data; name the folder
        folder = os.path.join(os.fspath(manager.directory), str(step))
        cause = str(e).split(" See full TensorStore details")[0]  # the rest is a page of tensorstore spec
        cause = cause if len(cause) <= 500 else cause[:500] + " ..."
        raise CorruptCheckpointError(
            f"cannot restore the orbax checkpoint {folder} (step {step}): {type(e).__name__}: {cause}. "
            "If it is truncated or corrupt, delete that step folder to resume from an earlier step, "
            "or start afresh in a new work directory."
        ) from e
    return state, int(step)


def save(manager: Any, step: int, state: Any) -> None:
    """Saves ``state`` at ``step`` (asynchronously if the manager is async)."""
    import orbax.checkpoint as ocp

    manager.save(int(step), args=ocp.args.StandardSave(state), force=True)


def all_finite(tree: Any) -> bool:
    """True when every floating leaf of ``tree`` is finite (checked before a save)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    if not leaves:
        return True
    # One jitted program, not an eager reduction per leaf: on sharded (FSDP) leaves each eager
    # reduction is its own program with a cross-device all-reduce, and on 8 fake CPU devices a
    # run of them deadlocked in XLA's collective rendezvous (one device thread never arrived).
    return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# --------------------------------------------------------------------------- shipped form


@struct.dataclass
class Backbone:
    """Everything needed to generate and score images, loaded by :func:`load_backbone`.

    Attributes:
      classifier: attribute-classifier params (``meg_jax.data.classifier``).
      vae: ``AutoencoderKL`` params.
      text_encoder: ``TextEncoder`` params (trained with the teacher, shared by the student).
      teacher: teacher ``UNet`` params (sampled with classifier-free guidance).
      student: step-conditioned student ``UNet`` params (same architecture; the step count
        enters through ``timestep_cond``).
      config: ``meg_jax.backbone.config.BackboneConfig`` (static).
      classifier_config: ``meg_jax.data.classifier.ClassifierConfig`` (static).
      sampling: ``meg_jax.distill.config.SamplingConfig``: prediction type, guidance scale,
        latent scale, step conditioning (static).
      ue_decoder: the merging-aware UE decoder's params (the VAE's ``decoder`` and
        ``post_quant_conv`` groups, used over ``vae``'s encoder groups), or ``None``: the UE
        decodes with ``vae`` (``meg_jax.meg.pipeline.ue_decode_latents``).
    """

    classifier: Any
    vae: Any
    text_encoder: Any
    teacher: Any
    student: Any
    config: Any = struct.field(pytree_node=False)
    classifier_config: Any = struct.field(pytree_node=False)
    sampling: Any = struct.field(pytree_node=False)
    ue_decoder: Any = None


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested param dict -> ``{"a/b/kernel": np.ndarray}`` (``flax.traverse_util.flatten_dict``)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        bad = [str(k) for k in path if "/" in str(k)]
        if bad:
            raise ValueError(f"param name {bad[0]!r} contains '/', which is the key separator")
        out["/".join(str(k) for k in path)] = np.ascontiguousarray(np.asarray(leaf))
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params` (leaves become ``jax.Array``)."""
    return traverse_util.unflatten_dict({key: jnp.asarray(value) for key, value in flat.items()}, sep="/")


def save_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a nested param dict as one safetensors file."""
    from safetensors.numpy import save_file

    save_file(flatten_params(params), os.fspath(path))


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a safetensors file written by :func:`save_params`."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no parameter file at {path}; export the checkpoints first")
    return unflatten_params(load_file(path))


def export_component(directory: str | os.PathLike, name: str, config: Any,
                     params: Mapping[str, Mapping[str, Any]], **metadata: Any) -> None:
    """Writes one shipped component: ``<directory>/<name>/{config.json, <part>.safetensors}``.

    Args:
      directory: the backbone folder (e.g. ``checkpoints/tiny``).
      name: one of ``COMPONENTS`` or ``OPTIONAL_COMPONENTS``.
      config: the component's config dataclass (stored under ``"config"``).
      params: part name -> nested param dict (e.g. ``{"unet": ..., "text_encoder": ...}``).
      **metadata: JSON-ready extras stored beside the config (steps, seeds, ...).
    """
    if name not in COMPONENTS + OPTIONAL_COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS + OPTIONAL_COMPONENTS}, got {name!r}")
    folder = os.path.join(os.fspath(directory), name)
    os.makedirs(folder, exist_ok=True)
    for part, p in params.items():
        save_params(p, os.path.join(folder, f"{part}.safetensors"))
    record = {"config": config_lib.to_dict(config) if config is not None else None,
              "parts": sorted(params), **metadata}
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")


def load_backbone(path: str | os.PathLike = "checkpoints/tiny", *, ue_decoder: bool = True) -> Backbone:
    """Loads the shipped backbone (classifier, VAE, text encoder, teacher, student) in one call.

    Needs nothing of the training harness: configs come from the JSON files, parameters
    from safetensors.

    Args:
      path: the backbone folder written by ``python -m train.distill --export PATH``.
      ue_decoder: load the merging-aware UE decoder when the folder has one
        (``ue_decoder/``, written by ``python -m train.ue_decoder``); ``False`` leaves
        ``Backbone.ue_decoder`` ``None`` (the UE decodes with the plain VAE decoder).

    Returns:
      ``Backbone`` with params as ``jax.Array`` pytrees and the configs as dataclasses.

    Raises:
      FileNotFoundError: ``path`` holds no ``backbone.json``.
      CorruptCheckpointError: ``backbone.json`` or a component's ``config.json`` is truncated,
        corrupt or not a valid config (the message names the file).
    """
    from meg_jax.backbone.config import BackboneConfig
    from meg_jax.data.classifier import ClassifierConfig
    from meg_jax.distill.config import SamplingConfig

    path = os.fspath(path)
    top = os.path.join(path, "backbone.json")
    if not os.path.exists(top):
        raise FileNotFoundError(
            f"{top} not found: {path!r} is not a backbone folder (expected backbone.json and "
            f"the folders {COMPONENTS}); make one with `python -m train.distill --export {path}`"
        )
    meta = read_json(top, "the backbone's settings", required=("backbone", "sampling"))
    classifier_path = os.path.join(path, "classifier", CONFIG_FILE)
    classifier_meta = read_json(classifier_path, "the classifier's settings", required=("config",))
    configs = {}
    for name, cls, file, data in (("backbone", BackboneConfig, top, meta["backbone"]),
                                  ("classifier", ClassifierConfig, classifier_path, classifier_meta["config"]),
                                  ("sampling", SamplingConfig, top, meta["sampling"])):
        try:
            configs[name] = config_lib.from_dict(cls, data)
        except (TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{file}: not a valid {cls.__name__}: {e}") from e
    ue_params = None
    ue_folder = os.path.join(path, "ue_decoder")
    if ue_decoder and os.path.isdir(ue_folder):
        read_json(os.path.join(ue_folder, CONFIG_FILE), "the UE decoder's settings", required=("config",))
        ue_file = os.path.join(ue_folder, UE_DECODER_FILE)
        ue_params = load_params(ue_file)
        vae_params = load_params(os.path.join(path, "vae", "vae.safetensors"))
        if "decoder" not in ue_params or not set(ue_params) <= set(vae_params.get("params", {})):
            raise CorruptCheckpointError(f"{ue_file} holds the groups {sorted(ue_params)}; a UE decoder is the "
                                         "VAE's decoder groups ('decoder', 'post_quant_conv')")
    else:
        vae_params = load_params(os.path.join(path, "vae", "vae.safetensors"))
    return Backbone(
        classifier=load_params(os.path.join(path, "classifier", "classifier.safetensors")),
        vae=vae_params,
        text_encoder=load_params(os.path.join(path, "teacher", "text_encoder.safetensors")),
        teacher=load_params(os.path.join(path, "teacher", "unet.safetensors")),
        student=load_params(os.path.join(path, "student", "unet.safetensors")),
        config=configs["backbone"],
        classifier_config=configs["classifier"],
        sampling=configs["sampling"],
        ue_decoder=ue_params,
    )
