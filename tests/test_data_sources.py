"""Image-caption sources and the grain loader (meg_jax.data.sources / loader / cache).

A few tiny PNG and JPEG images with captions are written once per module in four layouts (an
image folder with metadata.jsonl, one with .txt captions, two tar shards, a `datasets`
dataset saved to disk); every test reads them.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from meg_jax.data import shapes
from meg_jax.data.cache import LatentCacheSource, write_latent_cache
from meg_jax.data.loader import ImageCaptionLoader, LoaderConfig, prepare_image
from meg_jax.data.sources import (
    DataRecordError,
    DiskDatasetSource,
    ImageFolderSource,
    ShapesSource,
    TarShardSource,
)

N = 24  # records; divisible by 2, 3 and 4 (shard counts, batch sizes)
RES = 16


def _image(i: int) -> tuple[bytes, str]:
    """Image i: landscape PNGs and portrait JPEGs of random pixels (the crop must pick the centre)."""
    rng = np.random.default_rng(i)
    if i % 2 == 0:
        pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H x W: landscape
        fmt, ext = "PNG", "png"
    else:
        pixels = rng.integers(0, 256, (34, 24, 3), dtype=np.uint8)  # portrait
        fmt, ext = "JPEG", "jpg"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue(), ext


def _caption(i: int) -> str:
    return f"picture number {i}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = [_image(i) for i in range(N)]
    meta, txt, shards = root / "meta", root / "txt", root / "shards"
    for d in (meta, txt, shards):
        d.mkdir()
    with open(meta / "metadata.jsonl", "w") as f:
        for i, (data, ext) in enumerate(images):
            (meta / f"{i:03d}.{ext}").write_bytes(data)
            f.write(json.dumps({"file_name": f"{i:03d}.{ext}", "text": _caption(i)}) + "\n")
    for i, (data, ext) in enumerate(images):
        (txt / f"{i:03d}.{ext}").write_bytes(data)
        (txt / f"{i:03d}.txt").write_text(_caption(i))
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * N // 2, (s + 1) * N // 2):
                data, ext = images[i]
                _add_member(tar, f"sub/{i:03d}.{ext}", data)
                _add_member(tar, f"sub/{i:03d}.txt", _caption(i).encode())
    return root


@pytest.fixture(scope="module")
def hf_path(data_root):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _image(i)[0], "path": None} for i in range(N)], "text": [_caption(i) for i in range(N)]},
        features=features,
    )
    path = data_root / "hf"
    ds.save_to_disk(str(path))
    return path


def _epoch_indices(loader: ImageCaptionLoader) -> list[int]:
    return [int(i) for b in loader for i in b["index"]]


def _config(**kw) -> LoaderConfig:
    base = dict(resolution=RES, batch_size=4, seed=0, num_epochs=1, read_threads=2, prefetch_records=8)
    return LoaderConfig(**{**base, **kw})


# --------------------------------------------------------------------------- sources


def test_every_source_pairs_each_image_with_its_caption(data_root, hf_path):
    """All four layouts hold the same 24 records: image i with caption i, decoded identically."""
    expected = {_caption(i): prepare_image(_image(i)[0], RES) for i in range(N)}
    sources = [ImageFolderSource(data_root / "meta"), ImageFolderSource(data_root / "txt"),
               TarShardSource(data_root / "shards"), DiskDatasetSource(hf_path)]
    for source in sources:
        assert len(source) == N, source
        for i in range(N):
            record = source[i]
            # Same bytes through the same decoder: identical arrays.
            np.testing.assert_array_equal(prepare_image(record["image"], RES), expected[record["caption"]],
                                          err_msg=f"{source!r} record {i} ({record['name']})")
    assert [s[5]["caption"] for s in sources] == [_caption(5)] * 4  # sorted / file order
    # Identity for grain's restore check: content, not paths or addresses.
    assert "0x" not in repr(sources[0]) and str(data_root) not in repr(sources[0])
    with pytest.raises(ValueError, match="caption_column='caption' is not a column"):
        DiskDatasetSource(hf_path, caption_column="caption")


def test_shapes_source_renders_record_from_its_index():
    cfg = shapes.ShapesConfig()
    source = ShapesSource(cfg, num_records=10, seed=3)
    record = source[7]
    again = ShapesSource(cfg, num_records=10, seed=3)[7]  # same program: identical
    np.testing.assert_array_equal(record["image"], again["image"])
    assert record["caption"] == again["caption"]
    others = [source[8], ShapesSource(cfg, num_records=10, seed=4)[7]]
    assert all(o["caption"] != record["caption"] or not np.array_equal(o["image"], record["image"]) for o in others)
    # The image shows its caption: a shape of at most ~10 % of the area on a background
    # exactly the caption's background colour (coverage 0 outside the soft edge).
    background = int(shapes.attributes_of_prompt(record["caption"]).background[0])
    colours, counts = np.unique(record["image"].reshape(-1, 3), axis=0, return_counts=True)
    np.testing.assert_array_equal(colours[np.argmax(counts)], shapes.COLOR_RGB[background])
    assert counts.max() < cfg.resolution**2  # and the shape is there
    batch = next(iter(ImageCaptionLoader(source, _config(resolution=cfg.resolution, batch_size=5))))
    assert batch["image"].shape == (5, cfg.resolution, cfg.resolution, 3)
    shapes.attributes_of_prompts(list(batch["caption"]))  # every caption follows the grammar
    with pytest.raises(ValueError, match="drawn at 32 pixels"):
        ImageCaptionLoader(source, _config(resolution=16))


# --------------------------------------------------------------------------- images


def test_prepare_image_resizes_shorter_side_and_crops_centre():
    rng = np.random.default_rng(0)
    # 64 wide x 48 high -> shorter side 48 to 24 is a factor 2: resize to 32 x 24, keep
    # columns 4..28 (diffusers' Resize + CenterCrop, done by hand as the reference).
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(pixels).resize((32, 24), Image.Resampling.BILINEAR))[:, 4:28]
    out = prepare_image(pixels, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    # Both sample the source at the same points with the same filter; PIL's fixed-point
    # rounding may still differ by one uint8 level = 2 / 255 in [-1, 1].
    np.testing.assert_allclose(out, ref / 127.5 - 1.0, atol=2.0 / 255 + 1e-6)
    # Portrait 32 x 48: rows 8..40 are kept. A white band in rows 0..5 is gone (the bilinear
    # filter at factor 2 reaches 2 source rows past the crop, to row 6); one in rows 0..8 is not.
    tall = np.zeros((48, 32, 3), np.uint8)
    tall[:6] = 255
    assert prepare_image(tall, 16).max() == -1.0
    tall[:9] = 255
    assert prepare_image(tall, 16)[0].min() > -1.0 and prepare_image(tall, 16)[1:].max() == -1.0
    # Range: black -> -1, white -> +1 exactly; grey-scale and RGBA become RGB.
    white = Image.new("L", (10, 7), 255)
    buf = io.BytesIO()
    white.save(buf, format="PNG")
    np.testing.assert_array_equal(prepare_image(buf.getvalue(), 5), np.ones((5, 5, 3), np.float32))
    rgba = Image.new("RGBA", (9, 9), (0, 0, 0, 0))
    np.testing.assert_array_equal(prepare_image(np.asarray(rgba.convert("RGB")), 3), -np.ones((3, 3, 3)))
    with pytest.raises(DataRecordError, match="x.png: cannot decode"):
        prepare_image(b"not an image", 8, name="x.png")


# --------------------------------------------------------------------------- order, sharding


def test_order_is_fixed_by_the_seed(data_root):
    source = ImageFolderSource(data_root / "meta")
    a = _epoch_indices(ImageCaptionLoader(source, _config(seed=0, num_epochs=2)))
    b = _epoch_indices(ImageCaptionLoader(source, _config(seed=0, num_epochs=2)))
    c = _epoch_indices(ImageCaptionLoader(source, _config(seed=1, num_epochs=2)))
    assert a == b
    assert a != c
    for order in (a, c):  # each epoch is a permutation of all records, reshuffled per epoch
        assert sorted(order[:N]) == sorted(order[N:]) == list(range(N))
    assert a[:N] != a[N:] and a[:N] != list(range(N))
    assert _epoch_indices(ImageCaptionLoader(source, _config(shuffle=False))) == list(range(N))


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_data(data_root, count):
    source = TarShardSource(data_root / "shards")
    parts = []
    for p in range(count):
        loader = ImageCaptionLoader(source, _config(batch_size=2 * count, seed=5), shard_index=p, shard_count=count)
        batches = list(loader)
        assert all(len(b["index"]) == 2 for b in batches)  # the global batch split over processes
        parts.append([int(i) for b in batches for i in b["index"]])
    assert sum(len(p) for p in parts) == N
    assert sorted(i for p in parts for i in p) == list(range(N))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        ImageCaptionLoader(source, _config(batch_size=4), shard_index=0, shard_count=3)


def test_batches_hold_images_captions_tokens(data_root):
    def tokenizer(caption: str) -> np.ndarray:  # the caption's number, padded to 4 ids
        return np.array([int(caption.split()[-1]), 0, 0, 0])

    loader = ImageCaptionLoader(ImageFolderSource(data_root / "txt"), _config(), tokenizer=tokenizer)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, RES, RES, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["tokens"].shape == (4, 4) and batch["tokens"].dtype == np.int32
    assert [_caption(i) for i in batch["index"]] == list(batch["caption"])
    np.testing.assert_array_equal(batch["tokens"][:, 0], batch["index"])


# --------------------------------------------------------------------------- resume


def test_resume_through_orbax_gives_the_same_batches(data_root, tmp_path):
    """Read 5 batches, checkpoint (train state + iterator) with orbax, read 4 more; a fresh
    loader restored from the checkpoint yields those 4 again (across the epoch boundary at 6)."""
    source = ImageFolderSource(data_root / "meta")
    config = _config(num_epochs=None, read_threads=3)
    it = iter(ImageCaptionLoader(source, config))
    for _ in range(5):
        next(it)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": np.array(5, np.int32)}),
                                            data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(4)]

    fresh = iter(ImageCaptionLoader(source, config))
    restored = manager.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
        data=grain.checkpoint.CheckpointRestore(fresh)))
    assert int(restored.state["step"]) == 5
    for want in expected:
        got = next(restored.data)
        # Same files through the same code on the same machine: bit-identical.
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # Restoring into a loader of another order is refused, naming the sampler.
    other = iter(ImageCaptionLoader(source, _config(num_epochs=None, seed=9)))
    with pytest.raises(ValueError, match="Sampler in checkpoint does not match"):
        other.set_state(it.get_state())
    manager.close()


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_folder(data_root):
    """The 24 good images, plus a corrupt PNG, a truncated JPEG, an image without a caption,
    and a metadata line naming a file that does not exist."""
    root = data_root / "bad"
    root.mkdir()
    lines = []
    for i in range(N):
        data, ext = _image(i)
        (root / f"{i:03d}.{ext}").write_bytes(data)
        lines.append({"file_name": f"{i:03d}.{ext}", "text": _caption(i)})
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "truncated.jpg").write_bytes(_image(1)[0][:200])
    (root / "uncaptioned.png").write_bytes(_image(0)[0])
    lines += [{"file_name": "corrupt.png", "text": "c"}, {"file_name": "truncated.jpg", "text": "t"},
              {"file_name": "uncaptioned.png"}, {"file_name": "gone.png", "text": "g"}]
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return root


def test_bad_records_are_skipped_counted_and_logged(bad_folder, caplog):
    loader = ImageCaptionLoader(ImageFolderSource(bad_folder), _config(batch_size=4, drop_remainder=False))
    with caplog.at_level(logging.WARNING, logger="meg_jax.data.loader"):
        indices = _epoch_indices(loader)
    assert sorted(indices) == list(range(N))  # the good ones, each once
    assert loader.num_skipped == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name, reason in (("corrupt.png", "cannot decode"), ("truncated.jpg", "cannot decode"),
                         ("uncaptioned.png", "missing caption"), ("gone.png", "file not found")):
        assert f"{name}: {reason}" in logged
    assert "(4 so far in this process)" in logged


def test_bad_records_stop_the_job_by_option(bad_folder, data_root):
    loader = ImageCaptionLoader(ImageFolderSource(bad_folder), _config(on_error="raise", shuffle=False))
    with pytest.raises(DataRecordError, match="corrupt.png: cannot decode"):
        list(loader)
    # A tar record without its caption member: named by shard and key.
    path = data_root / "one.tar"
    with tarfile.open(path, "w") as tar:
        _add_member(tar, "k1.png", _image(0)[0])
    with pytest.raises(DataRecordError, match=r"one.tar:k1: missing caption"):
        list(ImageCaptionLoader(TarShardSource([path]), _config(on_error="raise", batch_size=1)))


# --------------------------------------------------------------------------- latent cache


def test_latent_cache_round_trip(data_root, tmp_path):
    """A trivial jitted encoder (4 x 4 mean-pool "latents", a scaled token "embedding") over
    the dataset, written by two processes in files of 5 records, read back as a source."""

    @jax.jit
    def encode(image: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        b = image.shape[0]
        return {"latents": image.reshape(b, RES // 4, 4, RES // 4, 4, 3).mean(axis=(2, 4)),
                "text_embeddings": tokens.astype(jnp.float32)[..., None] * 0.5}

    def tokenizer(caption: str) -> np.ndarray:
        return np.array([int(caption.split()[-1]), 1])

    source = ImageFolderSource(data_root / "meta")
    for p in range(2):
        index = write_latent_cache(source, lambda b: encode(b["image"], b["tokens"]), tmp_path, resolution=RES,
                                   batch_size=5, records_per_file=5, tokenizer=tokenizer, shard_index=p,
                                   shard_count=2)
        assert index["records"] == N // 2 and [f["records"] for f in index["files"]] == [5, 5, 2]
        if p == 0:
            with pytest.raises(ValueError, match=r"lacks the index of process\(es\) \[1\]"):
                LatentCacheSource(tmp_path)
    cache = LatentCacheSource(tmp_path)
    assert len(cache) == N
    seen = set()
    for i in range(N):
        record = cache[i]
        j = int(record["source_index"])
        seen.add(j)
        assert record["caption"] == _caption(j)
        image = prepare_image(_image(j)[0], RES)
        # The jitted mean of 16 float32 values vs numpy's: a few ulps of values in [-1, 1].
        np.testing.assert_allclose(record["latents"], image.reshape(4, 4, 4, 4, 3).mean(axis=(1, 3)), atol=1e-6)
        np.testing.assert_array_equal(record["text_embeddings"][:, 0], [j * 0.5, 0.5])
    assert seen == set(range(N))
    batch = next(iter(ImageCaptionLoader(cache, _config(batch_size=6))))
    assert batch["latents"].shape == (6, 4, 4, 3) and batch["text_embeddings"].shape == (6, 2, 1)
    assert "image" not in batch
    with pytest.raises(FileNotFoundError, match="no index"):
        LatentCacheSource(tmp_path / "nothing")
