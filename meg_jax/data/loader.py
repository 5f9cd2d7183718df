"""The grain pipeline from a record source to training batches (DESIGN.md section 9).

One loader for every source of :mod:`meg_jax.data.sources` (and the latent cache of
:mod:`meg_jax.data.cache`): the train step receives the same batch dict whichever it reads::

    source = ImageFolderSource("data/pets")            # or TarShardSource, DiskDatasetSource, ShapesSource
    loader = ImageCaptionLoader(source, LoaderConfig(resolution=512, batch_size=64, seed=0))
    it = iter(loader)                                  # a grain DataLoaderIterator
    batch = next(it)   # {"image": [B, 512, 512, 3] float32 in [-1, 1], "caption": [B] str,
                       #  "index": [B] int64 (record index), "tokens": [B, L] int32 if a tokenizer}

Per record (in grain's read threads, or its worker processes with ``worker_count > 0``, so
decoding overlaps the consumer): decode, convert to RGB, resize so the shorter side is
``resolution`` and centre-crop to ``resolution`` x ``resolution`` (one PIL bilinear resize
of the centred square — the antialiased equivalent of diffusers' ``Resize`` + ``CenterCrop``),
scale to float32 [-1, 1], tokenize the caption if a tokenizer is given. Then bad records are
dropped, records are batched.

Order: grain's ``IndexSampler`` shuffles the record indices per epoch from ``seed``; the
sequence is split over JAX processes by ``ShardOptions(jax.process_index(),
jax.process_count())`` (process p reads positions p, p + n, p + 2n, ... of it, so the
processes' records are disjoint and together cover each epoch); each process batches
``batch_size // process_count`` records.

With ``num_epochs`` set, grain gives each process ``len(source) // process_count`` records
per epoch (the last ``len % process_count`` are left out); with ``num_epochs=None`` the
sequence runs on across epochs and nothing is left out.

Worker processes (``worker_count > 0``): worker w of W reads every W-th record of the
process's sequence and batches its own records, so the batches (not the set of records)
depend on W; keep it fixed across a resume (grain refuses a state saved with another W).

Resume: ``iterator.get_state()`` / ``set_state()`` (JSON bytes), or inside an orbax checkpoint
with ``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)`` as one item
of an ``ocp.args.Composite``; a restored iterator yields exactly the batches that followed. The
state names the sampler (seed, epochs, record count) and the source's ``repr`` (dataset
fingerprint, resolution, tokenizer); a state from another pipeline is refused.

Bad input: with ``on_error="skip"`` a record that fails (missing or corrupt image, missing
caption) is dropped with a logged warning naming it and counted in
``loader.num_skipped``; with ``on_error="raise"`` the job stops with a
:class:`~meg_jax.data.sources.DataRecordError` naming the file. Skips are decided by the
record alone, so they do not disturb the determinism of the order or of resuming. The count is
of records dropped before reaching the consumer, in this process (with ``worker_count > 0``
the drops happen, and are logged, in the worker processes, and ``num_skipped`` stays 0).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import threading
from typing import Any, Literal, Mapping, Protocol, Sequence

import grain
import numpy as np
from PIL import Image

from meg_jax.data.shapes import ShapesConfig
from meg_jax.data.sources import DataRecordError

__all__ = [
    "LoaderConfig",
    "Tokenizer",
    "prepare_image",
    "PreparedRecords",
    "ImageCaptionLoader",
    "stack_records",
]

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """Maps one caption to its token ids, ``[L]`` int (a fixed L for every caption)."""

    def __call__(self, caption: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How records become batches."""

    resolution: int = 32  # output height = width, pixels
    batch_size: int = 32  # global batch: split evenly over the JAX processes
    seed: int = 0  # the order: the sampler's shuffle seed
    shuffle: bool = True  # shuffle the records each epoch (False: index order)
    num_epochs: int | None = None  # passes over the data (None: repeat forever)
    drop_remainder: bool = True  # drop an epoch's last partial batch (fixed shapes under jit)
    on_error: Literal["skip", "raise"] = "skip"  # a bad record: dropped with a warning, or stops the job
    worker_count: int = 0  # grain worker processes (0: this process, with read_threads threads)
    read_threads: int = 4  # threads reading + decoding records per process
    prefetch_records: int = 128  # records read ahead of the consumer per process

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"LoaderConfig.resolution must be >= 1 pixel, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"LoaderConfig.num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"LoaderConfig.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        for f in ("worker_count", "read_threads", "prefetch_records"):
            if getattr(self, f) < 0:
                raise ValueError(f"LoaderConfig.{f} must be >= 0, got {getattr(self, f)}")


# --------------------------------------------------------------------------- per record


def _to_float(pixels: np.ndarray) -> np.ndarray:
    # uint8 [0, 255] -> float32 [-1, 1]: x / 127.5 - 1 maps 0 -> -1 and 255 -> +1 exactly
    # (255 / 127.5 = 2 is exact in float32; a multiply by a rounded 1 / 127.5 is not).
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def prepare_image(image: bytes | np.ndarray | Image.Image, resolution: int, name: str = "image") -> np.ndarray:
    """Decodes an image and resizes + centre-crops it to ``resolution``.

    The shorter side is scaled to ``resolution`` and the centred square cut, in one bilinear
    (antialiased) PIL resize of the centred square of the source. JPEGs are decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that still leaves the shorter side >= ``resolution``.

    Args:
      image: encoded bytes (any format PIL reads), a PIL image, or a decoded ``[H, W, 3]``
        array: uint8, or float32 in [-1, 1] (then it must already be
        ``resolution`` x ``resolution``).
      resolution: output side R, pixels.
      name: the record's name, for errors.

    Returns:
      [R, R, 3] float32 in [-1, 1].

    Raises:
      DataRecordError: the image cannot be decoded (corrupt, truncated, not an image) or has
        an unusable shape.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DataRecordError(name, f"image array must be [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            if image.shape[:2] != (resolution, resolution):
                raise DataRecordError(name, f"float image is {image.shape[0]}x{image.shape[1]}; a "
                                            f"pre-rendered image must be {resolution}x{resolution}")
            return np.asarray(image, np.float32)
        image = Image.fromarray(image)
    try:
        if not isinstance(image, Image.Image):
            image = Image.open(io.BytesIO(image))
            w, h = image.size
            short = min(w, h)
            if short > resolution and image.format == "JPEG":
                image.draft("RGB", (math.ceil(w * resolution / short), math.ceil(h * resolution / short)))
        image.load()  # the full decode: a truncated or corrupt file fails here, not later
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if w < 1 or h < 1:
            raise DataRecordError(name, f"empty image ({w}x{h})")
        short = min(w, h)
        left, top = (w - short) / 2.0, (h - short) / 2.0
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR,
                             box=(left, top, left + short, top + short))
        pixels = np.asarray(image, np.uint8)
    except DataRecordError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports unreadable data as OSError (UnidentifiedImageError, "truncated") or
        # ValueError/SyntaxError from a format plugin.
        raise DataRecordError(name, f"cannot decode the image ({type(e).__name__}: {e})") from None
    return _to_float(pixels)


class PreparedRecords:
    """A source whose records are decoded, resized and tokenized: what the loader batches.

    Runs in grain's read threads (or worker processes), so its work overlaps the consumer.
    A record from a source without an ``"image"`` (e.g. the latent cache) passes its arrays
    through unchanged.

    Args:
      source: a record source (``len``, ``[i]``) of :mod:`meg_jax.data.sources`.
      resolution: output side, pixels.
      tokenizer: optional caption -> ``[L]`` ids.
      on_error: "skip": a bad record becomes ``{"skipped": "<name>: <reason>"}`` (dropped by
        the loader's filter); "raise": its DataRecordError propagates.
    """

    def __init__(self, source: Any, resolution: int, *, tokenizer: Tokenizer | None = None,
                 on_error: Literal["skip", "raise"] = "skip"):
        self.source = source
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            record = self.source[index]
            name = record.get("name", f"record {index}")
            out: dict[str, Any] = {k: v for k, v in record.items() if k not in ("image", "name")}
            if "image" in record:
                out["image"] = prepare_image(record["image"], self.resolution, name)
            if self.tokenizer is not None:
                caption = record.get("caption")
                if not isinstance(caption, str):
                    raise DataRecordError(name, "missing caption (needed by the tokenizer)")
                out["tokens"] = np.asarray(self.tokenizer(caption), np.int32)
        except DataRecordError as e:
            if self.on_error == "raise":
                raise
            return {"skipped": str(e)}
        out["index"] = np.int64(index)
        return out

    def __repr__(self) -> str:
        # grain checks this against the iterator state on restore: it names the dataset and the
        # per-record processing, so a state is never restored into another pipeline.
        tok = "none" if self.tokenizer is None else type(self.tokenizer).__name__
        return f"PreparedRecords({self.source!r}, resolution={self.resolution}, tokenizer={tok})"


class _DropSkipped(grain.transforms.Filter):
    """Drops the records PreparedRecords marked as skipped, logging and counting each."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def filter(self, element: Mapping[str, Any]) -> bool:
        if "skipped" not in element:
            return True
        with self._lock:
            self.count += 1
            count = self.count
        logger.warning("data: skipped a bad record (%d so far in this process): %s", count, element["skipped"])
        return False

    def __getstate__(self) -> dict[str, Any]:
        return {"count": self.count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self._lock = threading.Lock()


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Batches records: arrays stacked on a new leading axis, strings into a ``[B]`` str array.

    Raises:
      ValueError: records with different keys or array shapes (named).
    """
    keys = list(records[0])
    out = {}
    for key in keys:
        values = [r[key] for r in records]
        if isinstance(values[0], str):
            out[key] = np.asarray(values, dtype=np.str_)
            continue
        shapes = {np.shape(v) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"stack_records: field {key!r} has different shapes in one batch: {sorted(shapes)} "
                             "(a tokenizer must pad to one length)")
        out[key] = np.stack([np.asarray(v) for v in values])
    return out


# --------------------------------------------------------------------------- the loader


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag when it starts worker processes and fails with
    ``UnparsedFlagAccessError`` in a program that does not parse absl flags (google/grain
    issue 1355, fixed by PR 1362 after 0.2.18). Parsing nothing keeps every flag's default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class ImageCaptionLoader:
    """A grain ``DataLoader`` over a record source: deterministic, sharded, resumable batches.

    ``iter(loader)`` gives a ``grain.DataLoaderIterator`` of batch dicts (see the module
    docstring); each call starts from the beginning; restore with ``set_state`` (or orbax).

    Args:
      source: a record source (:mod:`meg_jax.data.sources`, :mod:`meg_jax.data.cache`).
      config: resolution, batch, order, error handling, parallelism.
      tokenizer: optional caption -> ``[L]`` int ids, adds ``"tokens"`` ``[B, L]`` int32.
      shard_index: this process's shard (default ``jax.process_index()``).
      shard_count: number of shards (default ``jax.process_count()``).

    Raises:
      ValueError: ``config.batch_size`` not divisible by the shard count; an empty source.
    """

    def __init__(self, source: Any, config: LoaderConfig, *, tokenizer: Tokenizer | None = None,
                 shard_index: int | None = None, shard_count: int | None = None):
        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"ImageCaptionLoader: shard_index={shard_index} outside [0, {shard_count})")
        if config.batch_size % shard_count:
            raise ValueError(f"ImageCaptionLoader: batch_size={config.batch_size} does not split over "
                             f"{shard_count} processes")
        if len(source) < 1:
            raise ValueError(f"ImageCaptionLoader: the source {source!r} is empty")
        drawn = getattr(source, "config", None)
        if isinstance(drawn, ShapesConfig) and drawn.resolution != config.resolution:
            raise ValueError(f"ImageCaptionLoader: the shapes are drawn at {drawn.resolution} pixels, the loader's "
                             f"resolution is {config.resolution}; make them equal")
        self.source = source
        self.config = config
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.batch_size_per_process = config.batch_size // shard_count
        if config.worker_count > 0:
            _mark_absl_flags_parsed()
        self.records = PreparedRecords(source, config.resolution, tokenizer=tokenizer, on_error=config.on_error)
        self._drop = _DropSkipped()
        sampler = grain.samplers.IndexSampler(
            num_records=len(source),
            shuffle=config.shuffle,
            num_epochs=config.num_epochs,
            seed=config.seed,
        )
        self.data_loader = grain.DataLoader(
            data_source=self.records,
            sampler=sampler,
            operations=[
                self._drop,
                grain.transforms.Batch(self.batch_size_per_process, drop_remainder=config.drop_remainder,
                                       batch_fn=stack_records),
            ],
            worker_count=config.worker_count,
            shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
            read_options=grain.ReadOptions(num_threads=config.read_threads,
                                           prefetch_buffer_size=config.prefetch_records),
        )

    def __iter__(self) -> grain.DataLoaderIterator:
        return iter(self.data_loader)

    @property
    def num_skipped(self) -> int:
        """Bad records dropped so far in this process (see the module docstring)."""
        return self._drop.count

    def records_per_epoch(self) -> int:
        """Records this process reads per epoch (before skips)."""
        return len(self.source) // self.shard_count
