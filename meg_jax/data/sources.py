"""Sources of (image, caption) records on disk, as grain random-access data sources.

DESIGN.md section 9, "Data sources behind one iterator": every source here is a
``grain.sources.RandomAccessDataSource`` (``len(source)`` and ``source[i]``) whose records
have the same form, so the loader (:mod:`meg_jax.data.loader`) and the train step never ask
which one they read:

* :class:`ImageFolderSource` — a folder of images with captions either in a
  ``metadata.jsonl`` (diffusers' image-folder convention: one JSON object per line,
  ``{"file_name": "a.png", "text": "..."}``, file names relative to the metadata file's
  folder) or in a ``.txt`` file beside each image (``a.png`` + ``a.txt``).
* :class:`TarShardSource` — webdataset-style uncompressed tar shards: members grouped by key
  (``dir/0001.jpg`` + ``dir/0001.txt`` form one record). The shards are indexed once, at
  construction (member headers only); a read is one seek and one read per member.
* :class:`DiskDatasetSource` — a Hugging Face ``datasets`` dataset written with
  ``save_to_disk`` (an image column and a text column); needs the ``datasets`` package.
* :class:`ShapesSource` — the procedural shapes of :mod:`meg_jax.data.shapes`, record ``i``
  rendered from ``fold_in(PRNGKey(seed), i)`` (deterministic; the tiny preset's default data).

Record form (a dict): ``"image"`` — the encoded file's bytes (PNG, JPEG, ...) or an already
decoded ``[H, W, 3]`` array (uint8, or float32 in [-1, 1]); ``"caption"`` — str; ``"name"``
— where the record came from (a path, ``shard.tar:key``, ``dataset[i]``), for messages. A
record that cannot be read (file missing, caption missing) raises :class:`DataRecordError`
naming it; the loader skips or re-raises it by its ``on_error`` option.

Each source's ``repr`` is deterministic (class, record count and a fingerprint of the record
names, never a memory address or an absolute path): grain stores it in the iterator state
and refuses to restore a state into a loader over another dataset, while a dataset moved to
another folder or host still resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import tarfile
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from meg_jax.data.shapes import ShapesConfig

__all__ = [
    "IMAGE_EXTENSIONS",
    "CAPTION_EXTENSIONS",
    "DataRecordError",
    "ImageFolderSource",
    "TarShardSource",
    "DiskDatasetSource",
    "ShapesSource",
]

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS: tuple[str, ...] = ("txt", "caption")


class DataRecordError(ValueError):
    """One record cannot be used (missing or corrupt image, missing caption).

    Attributes:
      name: the file (or tar member, or dataset row) that failed.
      reason: what is wrong with it.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _fingerprint(names: Iterable[str]) -> str:
    """A short hash of the record names (order included): a dataset's identity in ``repr``."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _read_bytes(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataRecordError(name, "file not found") from None
    except OSError as e:
        raise DataRecordError(name, f"cannot read the file ({e})") from None


def _read_caption_file(path: str, name: str) -> str:
    if not os.path.exists(path):
        raise DataRecordError(name, f"missing caption (no {os.path.basename(path)} beside the image)")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataRecordError(name, f"cannot read the caption file {os.path.basename(path)} ({e})") from None


# --------------------------------------------------------------------------- image folder


@dataclasses.dataclass(frozen=True)
class _FolderRecord:
    image: str  # path relative to the root, "/"-separated
    caption: str | None  # from metadata.jsonl; None when missing there or when read from .txt
    from_metadata: bool


class ImageFolderSource:
    """Images in a folder (recursively) with their captions.

    If any ``metadata.jsonl`` exists under ``root``, its lines are the records (diffusers'
    image-folder convention; several metadata files may sit in subfolders, each naming files
    relative to its own folder), in file order, metadata files sorted by path. Otherwise every
    image file under ``root`` (sorted by path) is a record whose caption is the ``.txt`` (or
    ``.caption``) file with the same stem beside it.

    Args:
      root: the folder.
      caption_column: the metadata key holding the caption.
      image_column: the metadata key holding the image's file name.
      extensions: image file extensions (lower case, no dot) considered in ``.txt`` mode.

    Raises:
      FileNotFoundError: ``root`` is not a folder.
      ValueError: no records found; a metadata line that is not a JSON object or lacks
        ``image_column`` (named with its file and line number).
    """

    def __init__(self, root: str | os.PathLike, *, caption_column: str = "text",
                 image_column: str = "file_name", extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolderSource: {self.root!r} is not a folder")
        self.caption_column = caption_column
        self.image_column = image_column
        self.extensions = tuple(e.lower().lstrip(".") for e in extensions)
        metadata_files = sorted(glob.glob(os.path.join(glob.escape(self.root), "**", "metadata.jsonl"),
                                          recursive=True))
        if metadata_files:
            self.mode = "metadata"
            self._records = [r for m in metadata_files for r in self._read_metadata(m)]
        else:
            self.mode = "txt"
            self._records = self._scan_images()
        if not self._records:
            raise ValueError(
                f"ImageFolderSource: no images in {self.root!r} (looked for metadata.jsonl and for "
                f"files ending in {', '.join('.' + e for e in self.extensions)})"
            )
        self._fingerprint = _fingerprint(
            f"{r.image}\t{r.caption if r.from_metadata else ''}" for r in self._records
        )

    def _read_metadata(self, path: str) -> list[_FolderRecord]:
        folder = os.path.relpath(os.path.dirname(path), self.root)
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"ImageFolderSource: {where} is not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"ImageFolderSource: {where} is not a JSON object")
                if self.image_column not in row:
                    raise ValueError(
                        f"ImageFolderSource: {where} has no {self.image_column!r} (the image's file "
                        f"name); keys: {sorted(row)}"
                    )
                caption = row.get(self.caption_column)
                image = os.path.normpath(os.path.join(folder, str(row[self.image_column])))
                records.append(_FolderRecord(image.replace(os.sep, "/"),
                                             caption if isinstance(caption, str) else None, True))
        return records

    def _scan_images(self) -> list[_FolderRecord]:
        records = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fn in sorted(filenames):
                ext = fn.rsplit(".", 1)[-1].lower() if "." in fn else ""
                if ext in self.extensions:
                    rel = os.path.relpath(os.path.join(dirpath, fn), self.root)
                    records.append(_FolderRecord(rel.replace(os.sep, "/"), None, False))
        records.sort(key=lambda r: r.image)
        return records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self._records[index]
        path = os.path.join(self.root, r.image)
        if r.from_metadata:
            if r.caption is None:
                raise DataRecordError(r.image, f"missing caption (no string {self.caption_column!r} "
                                               "in its metadata.jsonl line)")
            caption = r.caption
        else:
            stem = os.path.splitext(path)[0]
            candidates = [f"{stem}.{e}" for e in CAPTION_EXTENSIONS]
            found = next((c for c in candidates if os.path.exists(c)), candidates[0])
            caption = _read_caption_file(found, r.image)
        return {"image": _read_bytes(path, r.image), "caption": caption, "name": r.image}

    def __repr__(self) -> str:
        return f"ImageFolderSource(records={len(self)}, mode={self.mode}, fingerprint={self._fingerprint})"


# --------------------------------------------------------------------------- tar shards


@dataclasses.dataclass(frozen=True)
class _TarMember:
    offset: int  # byte offset of the member's data in the tar file
    size: int  # bytes
    name: str  # member name in the tar


@dataclasses.dataclass(frozen=True)
class _TarRecord:
    shard: int
    key: str
    image: _TarMember | None
    caption: _TarMember | None


class TarShardSource:
    """Webdataset-style tar shards: one record per key, its members ``key.<ext>``.

    The key of a member is its path up to the first dot of its file name (webdataset's rule),
    so ``a/0001.jpg``, ``a/0001.txt`` and ``a/0001.json`` form the record ``a/0001``. A
    record's image is its member with an image extension, its caption its ``.txt`` (or
    ``.caption``) member; a key with either missing is a bad record (see DataRecordError).
    Records are ordered by shard (as given, or sorted when a folder or glob is given), then by
    first appearance in the shard.

    Only uncompressed tars are supported: a compressed one cannot be read at an offset.

    Args:
      shards: a folder (its ``*.tar`` files), a glob pattern, or a list of tar paths.
      image_extensions: member extensions taken as the image (first match wins).
      caption_extensions: member extensions taken as the caption.

    Raises:
      FileNotFoundError: no shard found.
      ValueError: a shard that is not an uncompressed tar (named).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                 image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 caption_extensions: Sequence[str] = CAPTION_EXTENSIONS):
        if isinstance(shards, (str, os.PathLike)):
            spec = os.fspath(shards)
            paths = (sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar"))) if os.path.isdir(spec)
                     else sorted(glob.glob(spec)))
        else:
            paths = [os.fspath(p) for p in shards]
        if not paths:
            raise FileNotFoundError(f"TarShardSource: no tar shards found for {shards!r}")
        self.paths = tuple(paths)
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.caption_extensions = tuple(e.lower().lstrip(".") for e in caption_extensions)
        self._records: list[_TarRecord] = []
        for shard, path in enumerate(self.paths):
            self._records.extend(self._index(shard, path))
        if not self._records:
            raise ValueError(f"TarShardSource: the shards {list(self.paths)} hold no members")
        self._fingerprint = _fingerprint(
            f"{os.path.basename(self.paths[r.shard])}:{r.key}:{r.image and r.image.size}:"
            f"{r.caption and r.caption.size}" for r in self._records
        )

    def _index(self, shard: int, path: str) -> list[_TarRecord]:
        members: dict[str, dict[str, _TarMember]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:  # headers only: the data of each member is skipped by seeking
                    if not info.isfile():
                        continue
                    dirname, base = os.path.split(info.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{dirname}/{stem}" if dirname else stem
                    members.setdefault(key, {})[ext.lower()] = _TarMember(info.offset_data, info.size, info.name)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"TarShardSource: {path!r} is not a readable uncompressed tar ({e})") from None
        records = []
        for key, by_ext in members.items():  # dicts keep first-appearance order
            image = next((by_ext[e] for e in self.image_extensions if e in by_ext), None)
            caption = next((by_ext[e] for e in self.caption_extensions if e in by_ext), None)
            records.append(_TarRecord(shard, key, image, caption))
        return records

    def __len__(self) -> int:
        return len(self._records)

    def _read(self, shard: int, member: _TarMember, name: str) -> bytes:
        try:
            with open(self.paths[shard], "rb") as f:
                f.seek(member.offset)
                data = f.read(member.size)
        except OSError as e:
            raise DataRecordError(name, f"cannot read the member ({e})") from None
        if len(data) != member.size:
            raise DataRecordError(name, f"truncated member ({len(data)} of {member.size} bytes)")
        return data

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self._records[index]
        name = f"{os.path.basename(self.paths[r.shard])}:{r.key}"
        if r.image is None:
            raise DataRecordError(name, f"no image member (extensions {', '.join(self.image_extensions)})")
        if r.caption is None:
            raise DataRecordError(name, f"missing caption (no {r.key}.txt member)")
        try:
            caption = self._read(r.shard, r.caption, name).decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataRecordError(name, f"caption is not UTF-8 ({e})") from None
        return {"image": self._read(r.shard, r.image, name), "caption": caption,
                "name": f"{name}.{r.image.name.rsplit('.', 1)[-1]}"}

    def __repr__(self) -> str:
        return f"TarShardSource(shards={len(self.paths)}, records={len(self)}, fingerprint={self._fingerprint})"


# --------------------------------------------------------------------------- datasets.save_to_disk


class DiskDatasetSource:
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk``.

    The image column may be an ``Image`` feature (read undecoded: the loader decodes, so a
    corrupt image is a bad record rather than an exception inside ``datasets``) or raw bytes.

    Args:
      path: the folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``).
      image_column: column holding the image.
      caption_column: column holding the caption (str).
      split: the split of a saved ``DatasetDict`` (default: ``"train"``, or the only one).

    Raises:
      ImportError: ``datasets`` is not installed (``pip install 'meg-jax[data]'``).
      ValueError: a missing column or split (named, with the ones present).
    """

    def __init__(self, path: str | os.PathLike, *, image_column: str = "image", caption_column: str = "text",
                 split: str | None = None):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(
                "DiskDatasetSource needs the `datasets` package: pip install 'meg-jax[data]'"
            ) from e
        self.path = os.fspath(path)
        loaded = datasets.load_from_disk(self.path)
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if split is None:
                split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split not in splits:
                raise ValueError(f"DiskDatasetSource: {self.path!r} has splits {splits}; choose one with split=")
            loaded = loaded[split]
        elif split is not None:
            raise ValueError(f"DiskDatasetSource: {self.path!r} is a single Dataset; it has no split {split!r}")
        for what, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in loaded.column_names:
                raise ValueError(
                    f"DiskDatasetSource: {what}={column!r} is not a column of {self.path!r}; "
                    f"columns: {loaded.column_names}"
                )
        if isinstance(loaded.features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.caption_column = caption_column
        self.split = split
        self._dataset = loaded.select_columns([image_column, caption_column])
        self._fingerprint = loaded._fingerprint[:12] if getattr(loaded, "_fingerprint", None) else "none"

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        name = f"{os.path.basename(os.path.normpath(self.path))}[{index}]"
        row = self._dataset[index]
        image = row[self.image_column]
        if isinstance(image, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
            if image.get("bytes") is not None:
                image = image["bytes"]
            elif image.get("path"):
                name = f"{name} ({image['path']})"
                image = _read_bytes(image["path"], name)
            else:
                raise DataRecordError(name, "missing image (neither bytes nor path)")
        if image is None:
            raise DataRecordError(name, f"missing image (column {self.image_column!r} is empty)")
        caption = row[self.caption_column]
        if not isinstance(caption, str):
            raise DataRecordError(name, f"missing caption (column {self.caption_column!r} holds {caption!r})")
        return {"image": image, "caption": caption, "name": name}

    def __repr__(self) -> str:
        return (f"DiskDatasetSource(records={len(self)}, image_column={self.image_column}, "
                f"caption_column={self.caption_column}, split={self.split}, fingerprint={self._fingerprint})")


# --------------------------------------------------------------------------- procedural shapes


@functools.lru_cache(maxsize=8)
def _shapes_drawer(config: ShapesConfig) -> Callable[[int, int], tuple[np.ndarray, str]]:
    """``(seed, index) -> (image [R, R, 3] float32, prompt)``, one jitted program per config.

    Module level and built on first use, so every source of one config shares a compiled
    program, and a source pickled into a grain worker process compiles there.
    """
    import jax

    from meg_jax.data.shapes import prompt_of, render, sample_attributes

    @jax.jit
    def draw(seed: jax.Array, index: jax.Array) -> tuple[jax.Array, Any]:
        attrs = sample_attributes(jax.random.fold_in(jax.random.PRNGKey(seed), index), 1)
        return render(attrs, config)[0], attrs

    def record(seed: int, index: int) -> tuple[np.ndarray, str]:
        image, attrs = draw(np.uint32(seed), np.uint32(index))
        return np.asarray(image, np.float32), prompt_of(attrs)[0]

    return record


class ShapesSource:
    """The procedural shapes as records: record ``i`` is drawn from ``fold_in(PRNGKey(seed), i)``.

    The image is float32 ``[R, R, 3]`` in [-1, 1] at ``config.resolution`` (rendered by
    :func:`meg_jax.data.shapes.render`), the caption its prompt. The same index gives the same
    record in any process and on any run.

    Args:
      config: drawing settings (its resolution must equal the loader's).
      num_records: the dataset's length (records are drawn, not stored: any size is free).
      seed: the dataset's seed (which images exist), apart from the loader's order seed.
    """

    def __init__(self, config: ShapesConfig = ShapesConfig(), *, num_records: int = 65536, seed: int = 0):
        if num_records < 1:
            raise ValueError(f"ShapesSource: num_records must be >= 1, got {num_records}")
        self.config = config
        self.num_records = int(num_records)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"ShapesSource: index {index} outside [0, {self.num_records})")
        image, caption = _shapes_drawer(self.config)(self.seed, index)
        return {"image": image, "caption": caption, "name": f"shapes[{index}]"}

    def __repr__(self) -> str:
        c = self.config
        return (f"ShapesSource(records={self.num_records}, seed={self.seed}, resolution={c.resolution}, "
                f"radii=({c.small_radius}, {c.large_radius}), jitter={c.jitter}, edge_width={c.edge_width})")
