"""Reads the weights of a diffusers / transformers model folder as users store them.

A model folder (``unet/``, ``vae/``, ``text_encoder/`` ... of a pipeline) holds its tensors
in one of the layouts ``save_pretrained`` writes:

* one file: ``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors``
  (transformers);
* sharded: ``<name>.safetensors.index.json`` whose ``weight_map`` names the shards
  (``<name>-00001-of-00002.safetensors`` ...);
* a ``variant`` of either: ``<name>.fp16.safetensors``, and sharded
  ``<name>.fp16-00001-of-00002.safetensors`` with ``<name>.safetensors.index.fp16.json``;
* legacy pickles ``diffusion_pytorch_model.bin`` / ``pytorch_model.bin`` (and their
  ``.bin.index.json`` shards), read only through ``torch.load(..., weights_only=True)``,
  which never runs pickled code.

Tensors stored in float16 or bfloat16 (or float64) are cast to the requested float dtype;
integer tensors (e.g. CLIP's ``position_ids`` buffer) keep theirs. safetensors files are
parsed here (8-byte header length, JSON header, raw little-endian data) so that bfloat16
needs no torch and a truncated or corrupt file is reported with its path and what is wrong.

Everything this module cannot read raises :class:`WeightsError` naming the file: a missing
folder or weight file, a truncated or corrupt file, a single-file checkpoint
(``*.ckpt``, one ``.safetensors`` holding a whole pipeline), Flax ``msgpack`` or ONNX files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "WeightsError",
    "DIFFUSERS_WEIGHTS_NAME",
    "TRANSFORMERS_WEIGHTS_NAME",
    "read_safetensors",
    "safetensors_shapes",
    "weight_files",
    "load_state_dict",
    "CONVERT_SINGLE_FILE_HINT",
]

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS_NAME = "model"
# Legacy pickles: diffusers uses its own base name, transformers ``pytorch_model``.
_BIN_NAMES = {DIFFUSERS_WEIGHTS_NAME: DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME: "pytorch_model"}

CONVERT_SINGLE_FILE_HINT = (
    "convert it to a diffusers folder first, e.g. `python -c \"from diffusers import "
    "StableDiffusionPipeline as P; P.from_single_file('CHECKPOINT').save_pretrained('FOLDER')\"` "
    "(StableDiffusionXLPipeline for SDXL), then pass FOLDER"
)

# safetensors dtype codes -> numpy dtypes (ml_dtypes supplies bfloat16 and float8).
_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Files that are not a model folder's weights in a format read here.
_UNREAD_SUFFIXES = {
    ".ckpt": "a single-file (original Stable Diffusion) checkpoint",
    ".pt": "a pickled PyTorch file",
    ".pth": "a pickled PyTorch file",
    ".msgpack": "Flax msgpack weights",
    ".onnx": "an ONNX graph",
    ".h5": "Keras/TF weights",
}


class WeightsError(ValueError):
    """A weight file is missing, corrupt or in a format meg-jax does not read (names the file)."""


def _float_dtype(dtype: Any) -> np.dtype:
    """numpy dtype for ``dtype`` (accepts jnp.bfloat16, np.float16, "float32" ...)."""
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating) and dt != np.dtype(ml_dtypes.bfloat16):
        raise ValueError(f"dtype must be a float dtype, got {dt}")
    return dt


def _read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """Parses a safetensors header: ``(entries, data_start, data_size)``; raises naming ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: corrupt or truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise WeightsError(
                    f"{path}: corrupt or truncated safetensors file (header says {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data "
                f"but the file holds only {data_size} data bytes (an interrupted download or copy?)"
            )
        if begin < 0 or end - begin != nbytes:
            raise WeightsError(
                f"{path}: corrupt safetensors header: tensor {name!r} {entry['dtype']}{shape} needs "
                f"{nbytes} bytes but its offsets span {end - begin}"
            )
    return header, 8 + n, data_size


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header only (no data read)."""
    header, _, _ = _read_header(os.fspath(path))
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}


def read_safetensors(
    path: str | os.PathLike, dtype: Any = np.float32, keys: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays, floats cast to ``dtype``.

    Args:
      path: the ``.safetensors`` file.
      dtype: float dtype of the returned float tensors (``np.float32``, ``jnp.bfloat16`` ...);
        integer and bool tensors keep their stored dtype.
      keys: read only these tensors (default: all).

    Returns:
      name -> array (native byte order, C-contiguous, owned: the file is not kept open).

    Raises:
      WeightsError: the file is missing, truncated or corrupt (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weight file")
    target = _float_dtype(dtype)
    header, start, data_size = _read_header(path)
    wanted = header.keys() if keys is None else list(keys)
    missing = [k for k in wanted if k not in header]
    if missing:
        raise WeightsError(f"{path}: has no tensors {missing}")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if data_size else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        entry = header[name]
        stored = np.dtype(_ST_DTYPES[entry["dtype"]]).newbyteorder("<")
        begin, end = entry["data_offsets"]
        arr = np.frombuffer(data[begin:end], dtype=stored).reshape(entry["shape"])
        is_float = np.issubdtype(stored, np.floating) or entry["dtype"] in ("BF16", "F8_E4M3", "F8_E5M2")
        out[name] = np.array(arr, dtype=target if is_float else arr.dtype.newbyteorder("="), order="C")
    del data
    return out


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' ``_add_variant``: ``a.safetensors`` + fp16 -> ``a.fp16.safetensors``."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _candidates(base: str, variant: str | None) -> list[tuple[str, str]]:
    """(kind, filename) in the order they are preferred: safetensors, index, bin, bin index."""
    bin_base = _BIN_NAMES.get(base, base)
    return [
        ("file", _with_variant(f"{base}.safetensors", variant)),
        ("index", _with_variant(f"{base}.safetensors.index.json", variant)),
        ("file", _with_variant(f"{bin_base}.bin", variant)),
        ("index", _with_variant(f"{bin_base}.bin.index.json", variant)),
    ]


def _variants_present(files: Iterable[str], bases: Iterable[str]) -> set[str]:
    """Variant names of weight files in a folder (``fp16`` of ``model.fp16.safetensors`` ...)."""
    found = set()
    for base in bases:
        names = {base, _BIN_NAMES.get(base, base)}
        for n in names:
            pat = re.compile(
                rf"^{re.escape(n)}\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$"
                rf"|^{re.escape(n)}\.(?:safetensors|bin)\.index\.([A-Za-z0-9_]+)\.json$"
            )
            for f in files:
                m = pat.match(f)
                if m:
                    found.add(m.group(1) or m.group(2))
    return found


def weight_files(
    folder: str | os.PathLike,
    variant: str | None = None,
    names: Iterable[str] = (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME),
) -> list[str]:
    """The weight files of a model folder, resolving shards and variants as ``from_pretrained`` does.

    Args:
      folder: a model folder (``config.json`` + weights).
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``. ``None``
        takes the plain files, or the one variant present when there are no plain files.
      names: base file names to look for.

    Returns:
      Paths of the files holding the tensors (one, or the shards of an index).

    Raises:
      WeightsError: naming the folder and what is there when nothing readable is found.
    """
    folder = os.fspath(folder)
    names = tuple(names)
    if os.path.isfile(folder):
        raise WeightsError(_single_file_message(folder))
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: no such model folder")
    present = sorted(os.listdir(folder))
    for base in names:
        for kind, fname in _candidates(base, variant):
            if fname in present:
                path = os.path.join(folder, fname)
                return [path] if kind == "file" else _shards_of(path)
    variants = sorted(_variants_present(present, names))
    if variant is None and len(variants) == 1:
        return weight_files(folder, variants[0], names)
    if variant is None and variants:
        raise WeightsError(
            f"{folder}: holds weight variants {variants} and no plain weights; choose one with variant=..."
        )
    unread = [f"{f} ({_UNREAD_SUFFIXES[os.path.splitext(f)[1]]})" for f in present
              if os.path.splitext(f)[1] in _UNREAD_SUFFIXES]
    wanted = [fname for base in names for _, fname in _candidates(base, variant)]
    msg = f"{folder}: no weights found; looked for {wanted}"
    if variant is not None and variants:
        msg += f" (variants present: {variants})"
    if unread:
        msg += f". Not read: {unread}; {CONVERT_SINGLE_FILE_HINT}"
    else:
        msg += f"; the folder holds {present}"
    raise WeightsError(msg)


def _single_file_message(path: str) -> str:
    return (
        f"{path} is a file; meg-jax reads diffusers pipeline/model folders (the layout save_pretrained "
        f"writes), not single-file checkpoints. {CONVERT_SINGLE_FILE_HINT.replace('CHECKPOINT', path)}"
    )


def _shards_of(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index_path}: corrupt shard index (needs a 'weight_map' object): {e}") from e
    folder = os.path.dirname(index_path)
    paths = [os.path.join(folder, s) for s in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise WeightsError(f"{index_path}: names shards that are missing: {missing}")
    return paths


def _read_bin(path: str, dtype: np.dtype) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise WeightsError(
            f"{path}: a pickled PyTorch file needs torch to read; convert it to safetensors "
            "(`from_pretrained(...).save_pretrained(folder)` with diffusers/transformers)"
        ) from e
    try:
        # weights_only=True: never run arbitrary pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt pickles
        raise WeightsError(f"{path}: cannot read this pickled checkpoint ({type(e).__name__}: {e})") from e
    out = {}
    for k, v in state.items():
        if v.dtype.is_floating_point:
            out[k] = v.detach().to(torch.float32).cpu().numpy().astype(dtype)
        else:
            out[k] = v.detach().cpu().numpy()
    return out


def load_state_dict(
    folder: str | os.PathLike,
    variant: str | None = None,
    dtype: Any = np.float32,
    names: Iterable[str] = (DIFFUSERS_WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME),
) -> dict[str, np.ndarray]:
    """All tensors of a model folder (torch names and layouts), floats cast to ``dtype``.

    Args:
      folder: the model folder.
      variant: weight variant (see :func:`weight_files`).
      dtype: float dtype of the returned float tensors.
      names: base file names to look for.

    Returns:
      torch state-dict key -> numpy array.

    Raises:
      WeightsError: as :func:`weight_files` and :func:`read_safetensors`; also a tensor
        stored in two shards.
    """
    target = _float_dtype(dtype)
    state: dict[str, np.ndarray] = {}
    for path in weight_files(folder, variant, names):
        part: Mapping[str, np.ndarray]
        part = _read_bin(path, target) if path.endswith(".bin") else read_safetensors(path, target)
        dup = sorted(set(part) & set(state))
        if dup:
            raise WeightsError(f"{path}: tensors {dup[:5]} also appear in another shard")
        state.update(part)
    return state
