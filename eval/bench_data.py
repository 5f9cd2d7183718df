"""Throughput of the image-caption loader vs what the tiny preset's student step consumes.

    python -m eval.bench_data                      # the table in docs/bench_data.md
    python -m eval.bench_data --no_time_step       # loader rows only (seconds)
    python -m eval.bench_data --help               # every flag with its default

Rows (``meg_jax.data.loader.ImageCaptionLoader`` over ``ImageFolderSource``, generated in a
temporary folder first, not timed):

* **32 x 32**: ``--small_images`` PNGs of 40 x 48 / 48 x 40 pixels (mixed orientation), the
  tiny preset's resolution.
* **512 x 512**: ``--large_images`` JPEGs (quality 90) of 640 x 512 / 512 x 640 pixels.

Images are smooth colour gradients plus noise (so they compress like photographs, not like
flat colour or white noise); captions in ``metadata.jsonl``. Each row reads batches of the
student stage's batch size (``meg_jax.distill.config.preset("tiny").student.batch_size``)
with shuffling and the default read threads, after 2 warm-up batches; records/s = records /
wall seconds of ``--seconds`` of reading. "per CPU-s" divides by this process's CPU time
(all threads): on the shared 2-core machine it is less sensitive to other jobs than wall time.

Consumption: records/s = batch size / seconds per student train step. With ``--time_step``
(default) the tiny preset's student step is built (random weights: the cost does not depend
on their values) with K = 1 only and timed: K = 1 is its cheapest step, so its rate is the
most the student stage can ever ask for (the trained mix of K in (1, 2, 4, 8) asks for less;
the config notes a K = 8 step at about 3.6 s). The target is loader >= 2 x consumption.

The table goes to stdout, progress to the log (stderr).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["Args", "main", "parse_args"]

log = logging.getLogger("eval.bench_data")


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_data``."""

    small_images: int = 512  # images of the 32 x 32 row
    large_images: int = 64  # images of the 512 x 512 row
    seconds: float = 8.0  # reading time per row (s)
    read_threads: Optional[int] = None  # loader read threads (None: LoaderConfig's default)
    time_step: bool = True  # time the tiny preset's student step (K = 1)
    out: Optional[str] = None  # write the results as JSON here


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_data"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    bad = None
    if args.small_images < 1 or args.large_images < 1:
        name = "small_images" if args.small_images < 1 else "large_images"
        bad = f"--{name} must be >= 1, got {getattr(args, name)}"
    elif not args.seconds > 0:
        bad = f"--seconds must be > 0, got {args.seconds}"
    elif args.read_threads is not None and args.read_threads < 1:
        bad = f"--read_threads must be >= 1 (or None), got {args.read_threads}"
    if bad:
        sys.stderr.write(f"{prog}: error: {bad}\n")
        raise SystemExit(2)
    return args


def make_folder(root: str, count: int, size: tuple[int, int], fmt: str, seed: int = 0) -> None:
    """Writes ``count`` images (alternating ``size`` and its transpose) and metadata.jsonl."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(count):
            w, h = size if i % 2 == 0 else size[::-1]
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            base = rng.uniform(0, 255, 3)
            slope = rng.uniform(-1, 1, (2, 3)) * 255 / max(w, h)
            pixels = base + y[..., None] * slope[0] + x[..., None] * slope[1] + rng.normal(0, 8, (h, w, 3))
            name = f"{i:05d}.{ext}"
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(os.path.join(root, name), format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            f.write(json.dumps({"file_name": name, "text": f"image {i} of a smooth gradient"}) + "\n")


def loader_rate(root: str, resolution: int, batch_size: int, seconds: float, read_threads: int) -> dict:
    """Records/s (wall and per CPU-second) of the loader over the folder at ``root``."""
    from meg_jax.data.loader import ImageCaptionLoader, LoaderConfig
    from meg_jax.data.sources import ImageFolderSource

    config = LoaderConfig(resolution=resolution, batch_size=batch_size, seed=0, read_threads=read_threads)
    it = iter(ImageCaptionLoader(ImageFolderSource(root), config))
    for _ in range(2):
        next(it)
    records, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        batch = next(it)
        records += batch["image"].shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert batch["image"].shape[1:] == (resolution, resolution, 3)
    return {"records": records, "wall_s": wall, "records_per_s": records / wall, "records_per_cpu_s": records / cpu}


def student_step(folder: str, read_threads: int, repeats: int = 3) -> dict:
    """Times the tiny preset's student step at K = 1, alone and fed by the loader.

    "Fed": each step first takes a batch from a 32 x 32 loader over ``folder`` (its read
    threads decode the next records while the step runs); if the prefetch overlaps the step,
    the fed step is no slower than the step alone.

    Returns:
      step_s / fed_step_s (best of ``repeats``), batch_size, compile_s.
    """
    import jax
    import jax.numpy as jnp

    from meg_jax import parallel
    from meg_jax.backbone.text_encoder import init_text_encoder
    from meg_jax.backbone.unet import init_unet
    from meg_jax.backbone.vae import init_vae
    from meg_jax.data.loader import ImageCaptionLoader, LoaderConfig
    from meg_jax.data.sources import ImageFolderSource
    from meg_jax.distill import config as distill_config
    from meg_jax.distill.objectives import build_models, student_loss_fn
    from meg_jax.distill.train import init_stage_state, make_optimizer, make_train_step

    cfg = distill_config.preset("tiny")
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, step_counts=(1,), step_probs=(1.0,)))
    b = cfg.backbone
    models = build_models(cfg)
    mesh = parallel.make_mesh()
    k_unet, k_text, k_vae, k_data = jax.random.split(jax.random.PRNGKey(0), 4)
    teacher = {"unet": init_unet(b.unet, k_unet), "text_encoder": init_text_encoder(b.text_encoder, k_text)}
    state = parallel.replicate(init_stage_state("student", models, cfg, teacher_params=teacher), mesh)
    n = 256
    side = cfg.data.resolution // 2 ** (len(b.vae.block_out_channels) - 1)
    latent = (n, side, side, b.vae.latent_channels)
    k_noise, k_lat, k_tok = jax.random.split(k_data, 3)
    targets = {"noise": jax.random.normal(k_noise, latent), "latents": jax.random.normal(k_lat, latent),
               "tokens": jax.random.randint(k_tok, (n, cfg.data.max_length), 0, 40, jnp.int32)}
    inputs = parallel.replicate({"vae": init_vae(b.vae, k_vae), "latent_scale": jnp.float32(1.0),
                                 "text_encoder": teacher["text_encoder"], "targets": targets}, mesh)
    step = make_train_step(student_loss_fn(models, cfg, mesh), make_optimizer(cfg.student), cfg.student.ema_decay,
                           mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, inputs, jax.random.PRNGKey(1))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    loader = ImageCaptionLoader(ImageFolderSource(folder), LoaderConfig(
        resolution=cfg.data.resolution, batch_size=cfg.student.batch_size, read_threads=read_threads))
    it = iter(loader)
    next(it)  # start the read threads
    alone, fed = [], []
    for i in range(repeats):
        for times, feed in ((alone, False), (fed, True)):
            t0 = time.perf_counter()
            if feed:
                images = jax.device_put(next(it)["image"])  # what a data-fed step would transfer
            state, metrics = step(state, inputs, jax.random.PRNGKey(2 + i))
            jax.block_until_ready((metrics, images) if feed else metrics)
            times.append(time.perf_counter() - t0)
    return {"step_s": min(alone), "fed_step_s": min(fed), "batch_size": cfg.student.batch_size,
            "compile_s": compile_s}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command-line entry point: measures the rows, prints the table and returns the results."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from meg_jax import job_setup

    job_setup.configure_logging()

    from meg_jax.data.loader import LoaderConfig
    from meg_jax.distill import config as distill_config

    batch = distill_config.preset("tiny").student.batch_size
    threads = LoaderConfig().read_threads if args.read_threads is None else args.read_threads
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for resolution, count, size, fmt in ((32, args.small_images, (48, 40), "PNG"),
                                             (512, args.large_images, (640, 512), "JPEG")):
            folder = os.path.join(tmp, f"r{resolution}")
            t0 = time.perf_counter()
            make_folder(folder, count, size, fmt)
            made = time.perf_counter() - t0
            log.info("%d x %d row: %d %s images generated in %.1f s; reading for %g s", resolution, resolution,
                     count, fmt, made, args.seconds)
            rate = loader_rate(folder, resolution, batch, args.seconds, threads)
            rows.append({"resolution": resolution, "images": count, "source_size": f"{size[0]}x{size[1]}",
                         "format": fmt, "generate_s": made, **rate})
        result = {"batch_size": batch, "read_threads": threads, "rows": rows, "load_before": load_before,
                  "machine": f"{os.cpu_count()}-core {platform.machine()}"}
        if args.time_step:
            log.info("timing the tiny preset's student step (K = 1; compiles first)")
            result.update(student_step(os.path.join(tmp, "r32"), threads))
            result["consumption_per_s"] = result["batch_size"] / result["step_s"]
    result["load_after"] = os.getloadavg()

    print(f"batch {batch}, {threads} read threads, {result['machine']}, load {load_before[0]:.1f} -> "
          f"{result['load_after'][0]:.1f}")
    if args.time_step:
        print(f"student step (tiny, K = 1, batch {batch}): {result['step_s']:.3f} s -> consumes "
              f"{result['consumption_per_s']:.1f} records/s (compile {result['compile_s']:.1f} s); "
              f"fed by the 32 x 32 loader: {result['fed_step_s']:.3f} s")
    header = "| resolution | source images | loader records/s | per CPU-s |"
    header += " loader / step |" if args.time_step else ""
    print(header)
    print("|---:|---|---:|---:|" + ("---:|" if args.time_step else ""))
    for r in rows:
        line = (f"| {r['resolution']} x {r['resolution']} | {r['images']} {r['format']} {r['source_size']} | "
                f"{r['records_per_s']:,.0f} | {r['records_per_cpu_s']:,.0f} |")
        if args.time_step:
            line += f" {r['records_per_s'] / result['consumption_per_s']:.1f}x |"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        log.info("wrote %s", args.out)
    return result


if __name__ == "__main__":
    main()
