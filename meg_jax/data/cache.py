"""An optional cache of encoder outputs (VAE latents, text embeddings), computed once.

Encoding every image with a frozen VAE and every caption with a frozen text encoder on each
step repeats the same work every epoch. :func:`write_latent_cache` runs a given (jitted)
encode function once over a source, in the source's order, and writes sharded
``.safetensors`` files plus an index; :class:`LatentCacheSource` reads them back as a record
source for :class:`~meg_jax.data.loader.ImageCaptionLoader`, so the train step receives
batches of cached arrays through the same loader (shuffled, sharded, resumable)::

    write_latent_cache(ImageFolderSource("data/pets"), encode, "cache/pets", resolution=512, batch_size=32)
    loader = ImageCaptionLoader(LatentCacheSource("cache/pets"), LoaderConfig(batch_size=64))
    # batches: {"latents": [B, 64, 64, 4], "text_embeddings": [B, 77, 768], "caption": [B] str,
    #           "source_index": [B] int64, "index": [B] int64}  (whatever encode returns)

Layout of a cache folder (written by one or several processes, each over its own shard of
the source; process p of n writes ``part-p-*`` files and ``index-p-of-n.json`` last, so a
folder without every index is an unfinished cache and is refused)::

    part-000-00000.safetensors   # each field [N, ...] + "source_index" [N] int64; captions in the metadata
    index-000-of-001.json        # {"files": [{"file", "records"}], "fields": {name: {"shape", "dtype"}}, ...}
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["CACHE_FORMAT", "write_latent_cache", "LatentCacheSource"]

CACHE_FORMAT = "meg-jax latent cache v1"
_INDEX_RE = re.compile(r"index-(\d+)-of-(\d+)\.json$")

EncodeFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]]


def _write_part(path: str, fields: dict[str, list[np.ndarray]], captions: list[str]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in fields.items()}
    tmp = path + ".tmp"
    save_file(arrays, tmp, metadata={"captions": json.dumps(captions), "format": CACHE_FORMAT})
    os.replace(tmp, path)


class _Strided:
    """Records ``start, start + step, ...`` of a source (one process's part of the cache)."""

    def __init__(self, source: Any, start: int, step: int):
        self.source, self.start, self.step = source, start, step

    def __len__(self) -> int:
        return max(0, (len(self.source) - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.start + int(index) * self.step]

    def __repr__(self) -> str:
        return f"{self.source!r}[{self.start}::{self.step}]"


def write_latent_cache(source: Any, encode_fn: EncodeFn, directory: str | os.PathLike, *, resolution: int,
                       batch_size: int, records_per_file: int = 1024, tokenizer: Any = None,
                       on_error: str = "skip", shard_index: int | None = None,
                       shard_count: int | None = None) -> dict[str, Any]:
    """Encodes every record of ``source`` once and writes the outputs as a sharded cache.

    Reads the source in index order (one epoch, no shuffle) through
    :class:`~meg_jax.data.loader.ImageCaptionLoader`, so the images are decoded, resized and
    tokenized exactly as for training. The last batch is padded to ``batch_size`` (by
    repeating its last record; the padding's outputs are dropped), so a jitted ``encode_fn``
    compiles once.

    Args:
      source: a record source (:mod:`meg_jax.data.sources`).
      encode_fn: ``encode_fn(batch) -> {name: [B, ...] array}``; ``batch`` has ``"image"``
        ``[B, R, R, 3]`` float32 in [-1, 1], ``"caption"`` ``[B]`` str and, with a tokenizer,
        ``"tokens"`` ``[B, L]`` int32.
      directory: the cache folder (created).
      resolution: image side R, pixels.
      batch_size: records per ``encode_fn`` call (in this process).
      records_per_file: records per ``.safetensors`` file.
      tokenizer: optional caption -> ``[L]`` ids (see the loader).
      on_error: "skip" or "raise" for bad records (see the loader); skipped records are not
        in the cache.
      shard_index, shard_count: this process's part of the source (default: JAX's process
        index and count).

    Returns:
      The index this process wrote (also ``index-p-of-n.json`` in ``directory``).

    Raises:
      ValueError: ``encode_fn`` returns a field without the batch's leading axis, or named
        ``caption``/``source_index``/``index``.
    """
    from meg_jax.data.loader import ImageCaptionLoader, LoaderConfig

    if records_per_file < 1:
        raise ValueError(f"write_latent_cache: records_per_file must be >= 1, got {records_per_file}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"write_latent_cache: shard_index={shard_index} outside [0, {shard_count})")
    config = LoaderConfig(resolution=resolution, batch_size=batch_size, shuffle=False, num_epochs=1,
                          drop_remainder=False, on_error=on_error)  # type: ignore[arg-type]
    # Records p, p + n, p + 2n, ... for process p of n: every record once over all processes
    # (grain's own sharding drops the last len % n records of a single epoch).
    part = _Strided(source, shard_index, shard_count)
    loader = (ImageCaptionLoader(part, config, tokenizer=tokenizer, shard_index=0, shard_count=1)
              if len(part) else None)
    files: list[dict[str, Any]] = []
    specs: dict[str, dict[str, Any]] = {}
    pending: dict[str, list[np.ndarray]] = {}
    captions: list[str] = []

    def flush() -> None:
        n = len(captions)
        if n == 0:
            return
        name = f"part-{shard_index:03d}-{len(files):05d}.safetensors"
        _write_part(os.path.join(directory, name), pending, captions)
        files.append({"file": name, "records": n})
        pending.clear()
        captions.clear()

    for batch in loader if loader is not None else ():
        n = len(batch["index"])
        if n < batch_size:  # pad the last batch: one compiled shape for encode_fn
            batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in batch.items()}
        encoded = {}
        for key, value in encode_fn(batch).items():
            value = np.asarray(value)
            if key in ("caption", "source_index", "index"):
                raise ValueError(f"write_latent_cache: encode_fn returned the reserved field {key!r}")
            if value.ndim == 0 or value.shape[0] != batch_size:
                raise ValueError(f"write_latent_cache: encode_fn's field {key!r} has shape {value.shape}; "
                                 f"expected a leading batch axis of {batch_size}")
            encoded[key] = value[:n]
            specs.setdefault(key, {"shape": list(value.shape[1:]), "dtype": str(value.dtype)})
        # The loader reads this process's strided view: its index i is source record p + i * n.
        encoded["source_index"] = (shard_index + batch["index"][:n] * shard_count).astype(np.int64)
        # Split the batch where a file fills up.
        start = 0
        while start < n:
            take = min(n - start, records_per_file - len(captions))
            for key, value in encoded.items():
                pending.setdefault(key, []).append(value[start:start + take])
            captions.extend(str(c) for c in batch["caption"][start:start + take])
            start += take
            if len(captions) == records_per_file:
                flush()
    flush()
    index = {
        "format": CACHE_FORMAT,
        "process": shard_index,
        "process_count": shard_count,
        "source": repr(source),
        "resolution": resolution,
        "records": sum(f["records"] for f in files),
        "skipped": loader.num_skipped if loader is not None else 0,
        "fields": specs,
        "files": files,
    }
    path = os.path.join(directory, f"index-{shard_index:03d}-of-{shard_count:03d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(path + ".tmp", path)
    return index


class LatentCacheSource:
    """Reads a cache written by :func:`write_latent_cache`: record i is one encoded record.

    Records come in the order process 0's files, process 1's, ...; each holds every field
    ``encode_fn`` returned (``[...]`` arrays), ``"caption"`` and ``"source_index"`` (its index
    in the original source).

    Args:
      directory: the cache folder.

    Raises:
      FileNotFoundError: no index in ``directory`` (not a cache, or unfinished).
      ValueError: indexes of different process counts, a missing process's index, or a
        different format.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        indexes = sorted(glob.glob(os.path.join(glob.escape(self.directory), "index-*-of-*.json")))
        if not indexes:
            raise FileNotFoundError(f"LatentCacheSource: no index-*-of-*.json in {self.directory!r} "
                                    "(not a latent cache, or one still being written)")
        counts = {int(_INDEX_RE.search(p).group(2)) for p in indexes}  # type: ignore[union-attr]
        if len(counts) != 1:
            raise ValueError(f"LatentCacheSource: {self.directory!r} mixes caches of process counts {sorted(counts)}")
        (count,) = counts
        found = sorted(int(_INDEX_RE.search(p).group(1)) for p in indexes)  # type: ignore[union-attr]
        if found != list(range(count)):
            missing = sorted(set(range(count)) - set(found))
            raise ValueError(f"LatentCacheSource: {self.directory!r} lacks the index of process(es) {missing} "
                             f"of {count} (unfinished cache)")
        self._files: list[str] = []
        self._rows: list[tuple[int, int]] = []  # (file number, row)
        self.fields: dict[str, dict[str, Any]] = {}
        for path in indexes:
            with open(path) as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT:
                raise ValueError(f"LatentCacheSource: {path} has format {index.get('format')!r}, "
                                 f"expected {CACHE_FORMAT!r}")
            if self.fields and index["fields"] and index["fields"] != self.fields:
                raise ValueError(f"LatentCacheSource: {path} holds fields {index['fields']}, the others "
                                 f"{self.fields}")
            self.fields = self.fields or index["fields"]
            for entry in index["files"]:
                file_number = len(self._files)
                self._files.append(entry["file"])
                self._rows.extend((file_number, row) for row in range(entry["records"]))
        if not self._rows:
            raise ValueError(f"LatentCacheSource: the cache in {self.directory!r} holds no records")
        self._handles: dict[int, tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()

    def _open(self, file_number: int) -> tuple[Any, list[str]]:
        with self._lock:
            if file_number not in self._handles:
                from safetensors import safe_open

                handle = safe_open(os.path.join(self.directory, self._files[file_number]), framework="numpy")
                captions = json.loads(handle.metadata()["captions"])
                self._handles[file_number] = (handle, captions)
            return self._handles[file_number]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file_number, row = self._rows[int(index)]
        handle, captions = self._open(file_number)
        record: dict[str, Any] = {k: handle.get_slice(k)[row] for k in (*self.fields, "source_index")}
        record["caption"] = captions[row]
        record["name"] = f"{self._files[file_number]}[{row}]"
        return record

    def __getstate__(self) -> dict[str, Any]:  # for grain worker processes: reopen there
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LatentCacheSource(records={len(self)}, files={len(self._files)}, fields={sorted(self.fields)})"
