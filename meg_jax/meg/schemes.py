"""Conventional generation schemes, and the quality measurement every scheme shares.

DESIGN.md section 5 compares MEG with

(a) **centralised** — the ES runs the teacher at full steps and the VAE decoder, and sends
    the image as a PNG file (its size measured with a real encoder, Pillow) at the Shannon
    rate;
(b) **MEG uncompressed** — the teacher at full steps on the ES, all latent tokens sent over
    the link (``r = 0``), the UE decodes;
(c) **on-device** — the UE runs text encoder, teacher UNet and decoder; nothing is sent.

Quality is measured the same way for every scheme (and for MEG's (K, r) grid in
``meg_jax.meg.calibrate``): the image the user sees is the 8-bit RGB image (``[-1, 1]`` ->
``uint8``, as a display or a PNG holds it), scored by

* **accuracy** — the attribute classifier's fraction of the five prompt attributes (size,
  colour, shape, position, background) it reads correctly, per image;
* **PSNR** — against the teacher's 50-step, uncompressed, noiseless float image from the
  same noise and prompt (``data_range = 2``). The 8-bit rounding alone caps it near
  58.9 dB, so every value is finite.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meg_jax import metrics
from meg_jax.meg import costs as costs_lib
from meg_jax.meg import pipeline, pricing
from meg_jax.meg.link import LinkConfig

__all__ = [
    "SCHEMES",
    "Quality",
    "to_display",
    "score_images",
    "png_bits",
    "SchemeResult",
    "centralised",
    "meg_uncompressed",
    "on_device",
    "meg",
    "price",
    "comparison_rows",
]

SCHEMES = ("centralised", "meg_uncompressed", "on_device")


@struct.dataclass
class Quality:
    """Per-image quality (see the module docstring).

    Attributes:
      accuracy: ``[B]`` fraction of the five attributes the classifier reads right.
      psnr: ``[B]`` PSNR of the 8-bit image against the float reference, dB.
    """

    accuracy: jax.Array
    psnr: jax.Array


@struct.dataclass
class SchemeResult:
    """Images, costs and quality of one scheme on one batch."""

    images: jax.Array  # [B, H, W, 3] displayed images in [-1, 1] (8-bit levels)
    costs: costs_lib.Costs  # every field [B]
    quality: Quality


def to_display(images: jax.Array) -> jax.Array:
    """Rounds ``[-1, 1]`` images to the 256 levels of 8-bit RGB, back in ``[-1, 1]``."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def _classes(attrs: Any) -> dict[str, jax.Array]:
    from meg_jax.data.shapes import ATTRIBUTE_NAMES

    if isinstance(attrs, dict):
        return {n: attrs[n] for n in ATTRIBUTE_NAMES}
    return {n: getattr(attrs, n) for n in ATTRIBUTE_NAMES}


def score_images(backbone: Any, images: jax.Array, attrs: Any, reference: jax.Array) -> Quality:
    """Quality of generated ``images`` ``[B, H, W, 3]`` (traceable).

    Args:
      backbone: the ``Backbone`` (its classifier scores the attributes).
      images: generated images in ``[-1, 1]`` (rounded to 8 bit here).
      attrs: the prompts' ``Attributes`` (or a dict of ``[B]`` class arrays).
      reference: ``[B, H, W, 3]`` the teacher's float reference images.
    """
    from meg_jax.data.classifier import classify

    shown = to_display(images)
    logits = classify(backbone.classifier, shown, backbone.classifier_config)
    truth = _classes(attrs)
    correct = jnp.stack([jnp.argmax(logits[n], axis=-1) == truth[n] for n in truth])
    return Quality(
        accuracy=jnp.mean(correct.astype(jnp.float32), axis=0),
        psnr=metrics.psnr(shown, reference),
    )


def pixel_accuracy(backbone: Any, images: jax.Array, attrs: Any) -> jax.Array:
    """The pixel reading's accuracy of ``images`` ``[B, H, W, 3]`` (traceable): ``[B]``.

    The fraction of the five attributes :func:`meg_jax.data.pixel_reading.read_attributes`
    reads right from the 8-bit image: the same definition as :class:`Quality`'s classifier
    accuracy, from an analytic reading that nothing was trained for.
    """
    from meg_jax.data import pixel_reading

    reading = pixel_reading.read_attributes(to_display(images), backbone.classifier_config.data)
    truth = _classes(attrs)
    return jnp.mean(jnp.stack([reading[n] == truth[n] for n in truth]).astype(jnp.float32), axis=0)


def png_bits(images: jax.Array | np.ndarray) -> np.ndarray:
    """Size in bits of each image ``[B, H, W, 3]`` (``[-1, 1]``) as an 8-bit RGB PNG (Pillow).

    Host side; Pillow's default zlib level (6) and filters.
    """
    from PIL import Image

    arr = np.asarray(jax.device_get(images), dtype=np.float32)
    u8 = np.round((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    sizes = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img, mode="RGB").save(buf, format="PNG")
        sizes.append(8 * len(buf.getvalue()))
    return np.asarray(sizes, dtype=np.float64)


@jax.jit
def _teacher_and_reference(backbone, tokens, noise):
    latents = pipeline.teacher_latents(backbone, pipeline.encode_text(backbone, tokens), noise)
    return latents, pipeline.decode_latents(backbone, latents)


_score_jit = jax.jit(score_images)
_transmit_jit = jax.jit(pipeline.transmit_latents, static_argnums=(1, 2))


def _reference_and_score(backbone, tokens, noise, attrs):
    # One compiled program makes the reference for every scheme, so all compare to the
    # same float image bit for bit.
    _, reference = _teacher_and_reference(backbone, tokens, noise)
    return reference, _score_jit(backbone, reference, attrs, reference)


def _preset(cost: str | costs_lib.CostPreset) -> costs_lib.CostPreset:
    return costs_lib.cost_preset(cost) if isinstance(cost, str) else cost


def centralised(
    backbone: Any,
    tokens: jax.Array,
    attrs: Any,
    noise: jax.Array,
    link: LinkConfig,
    snr_db: float | jax.Array,
    *,
    cost: str | costs_lib.CostPreset = "tiny",
    image_bits: np.ndarray | None = None,
) -> SchemeResult:
    """Scheme (a): ES teacher + decoder, the PNG goes at the Shannon rate.

    Args:
      backbone, tokens, attrs, noise: model, prompts ``[B, L]``, their attributes, noise.
      link: the link (its bandwidth sets the rate; the file is digital in any link mode).
      snr_db: receive SNR (dB), scalar or ``[B]``.
      cost: cost preset.
      image_bits: ``[B]`` file sizes to price instead of the measured PNGs (for presets
        whose resolution is not the backbone's, e.g. scaled from the measured bits/pixel).
    """
    reference, quality = _reference_and_score(backbone, tokens, noise, attrs)
    bits = png_bits(reference) if image_bits is None else np.asarray(image_bits, np.float64)
    snr = jnp.broadcast_to(jnp.asarray(snr_db, jnp.float32), (tokens.shape[0],))
    c = costs_lib.centralised_costs(_preset(cost), link, snr, jnp.asarray(bits, jnp.float32))
    return SchemeResult(images=to_display(reference), costs=c, quality=quality)


@jax.jit
def _decode_and_score(backbone, latents, attrs, reference):
    images = pipeline.ue_decode_latents(backbone, latents)  # what crossed the link: the UE's decoder
    return images, score_images(backbone, images, attrs, reference)


def meg_uncompressed(
    backbone: Any,
    tokens: jax.Array,
    attrs: Any,
    noise: jax.Array,
    link: LinkConfig,
    snr_db: float | jax.Array,
    key: jax.Array,
    *,
    cost: str | costs_lib.CostPreset = "tiny",
) -> SchemeResult:
    """Scheme (b): teacher at full steps on the ES, every token over ``link``, UE decodes."""
    snr = jnp.broadcast_to(jnp.asarray(snr_db, jnp.float32), (tokens.shape[0],))
    latents, reference = _teacher_and_reference(backbone, tokens, noise)
    received = _transmit_jit(latents, 0.0, link, snr, key)
    images, quality = _decode_and_score(backbone, received, attrs, reference)
    c = costs_lib.uncompressed_costs(_preset(cost), link, snr)
    return SchemeResult(images=to_display(images), costs=c, quality=quality)


def on_device(
    backbone: Any,
    tokens: jax.Array,
    attrs: Any,
    noise: jax.Array,
    *,
    cost: str | costs_lib.CostPreset = "tiny",
) -> SchemeResult:
    """Scheme (c): the UE runs everything (teacher at full steps); nothing is sent."""
    reference, quality = _reference_and_score(backbone, tokens, noise, attrs)
    c = costs_lib.on_device_costs(_preset(cost), jnp.full((tokens.shape[0],), jnp.inf))
    return SchemeResult(images=to_display(reference), costs=c, quality=quality)


def meg(
    backbone: Any,
    tokens: jax.Array,
    attrs: Any,
    noise: jax.Array,
    steps: int,
    merge_ratio: float,
    link: LinkConfig,
    snr_db: float | jax.Array,
    key: jax.Array,
    *,
    cost: str | costs_lib.CostPreset = "tiny",
    reference: jax.Array | None = None,
) -> SchemeResult:
    """MEG at a fixed (K, r), scored like the conventional schemes (for side-by-side tables)."""
    if reference is None:
        reference, _ = _reference_and_score(backbone, tokens, noise, attrs)
    images, c = pipeline.generate(backbone, tokens, steps, merge_ratio, link, key,
                                  snr_db=snr_db, noise=noise, cost=_preset(cost))
    quality = _score_jit(backbone, images, attrs, reference)
    return SchemeResult(images=to_display(images), costs=c, quality=quality)


# ----------------------------------------------------------------------------- tables


def price(artifact: Any, snr_db: float, *, steps_index: int | None = None, ratio_index: int | None = None,
          scheme: str | None = None, snr_floor_db: float = pricing.DEFAULT_SNR_FLOOR_DB) -> tuple[float, float]:
    """Latency (s) and UE energy (J) at ``snr_db`` by the artifact's own pricing formula.

    Give either ``steps_index`` and ``ratio_index`` (an MEG action on the artifact's grid) or
    ``scheme`` (a conventional scheme stored in the artifact). The rate is
    ``meg_jax.meg.pricing``'s, at max(``snr_db``, ``snr_floor_db``), as the environment prices.
    """
    if scheme is not None:
        s = artifact.conventional_schemes[scheme]
        mode = s.link_mode
        es, payload, side, ue_t, ue_e = (s.es_compute_time_s, s.payload, s.side_info_bits,
                                         s.ue_compute_time_s, s.ue_compute_energy_j)
    else:
        mode = artifact.link_mode
        es = artifact.es_compute_time_s[steps_index]
        payload = artifact.payload[ratio_index]
        side = artifact.side_info_bits[ratio_index]
        ue_t = artifact.ue_compute_time_s[ratio_index]
        ue_e = artifact.ue_compute_energy_j[ratio_index]
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731  (the environment's dtype)
    t_tx = pricing.artifact_air_time_s(f32(payload), f32(side), f32(artifact.bandwidth_hz), snr_db, snr_floor_db, mode)
    lat, energy = pricing.request_costs(f32(es), t_tx, f32(ue_t), f32(ue_e), f32(artifact.ue_receive_power_w))
    return float(lat), float(energy)


def comparison_rows(artifact: Any, snr_db: float, accuracy_floor: float,
                    relative_to: str | None = None) -> list[dict[str, Any]]:
    """The three conventional schemes and the best fixed (K, r) meeting an accuracy floor.

    Quality is averaged uniformly over task classes at the grid SNR ``snr_db`` (must be on
    the artifact's grid). "Best" is the lowest latency among the (K, r) whose mean accuracy
    is at least the floor; ties go to lower UE energy. The floor is ``accuracy_floor``, or,
    with ``relative_to`` naming a conventional scheme, ``accuracy_floor`` times that
    scheme's accuracy at the same SNR (e.g. 0.95 of MEG uncompressed).

    Returns:
      One dict per row: ``name``, ``latency_s``, ``ue_energy_j``, ``accuracy``, ``psnr``,
      and for the MEG row ``steps`` and ``merge_ratio`` (None when no setting qualifies).
    """
    grid = np.asarray(artifact.snr_db)
    hits = np.nonzero(np.isclose(grid, snr_db))[0]
    if hits.size == 0:
        raise ValueError(f"snr_db={snr_db} is not on the artifact's grid {grid.tolist()}")
    si = int(hits[0])
    rows = []
    for name in SCHEMES:
        s = artifact.conventional_schemes[name]
        lat, energy = price(artifact, snr_db, scheme=name)
        rows.append(dict(name=name, latency_s=lat, ue_energy_j=energy,
                         accuracy=float(np.mean(s.accuracy[si])), psnr=float(np.mean(s.psnr[si]))))
    floor = accuracy_floor
    if relative_to is not None:
        floor = accuracy_floor * float(np.mean(artifact.conventional_schemes[relative_to].accuracy[si]))
    best = None
    for ki, k in enumerate(artifact.steps):
        for ri, r in enumerate(artifact.merge_ratios):
            acc = float(np.mean(artifact.accuracy[ki, ri, si]))
            if acc < floor:
                continue
            lat, energy = price(artifact, snr_db, steps_index=ki, ratio_index=ri)
            if best is None or (lat, energy) < (best["latency_s"], best["ue_energy_j"]):
                best = dict(name="meg_best_fixed", latency_s=lat, ue_energy_j=energy, accuracy=acc,
                            psnr=float(np.mean(artifact.psnr[ki, ri, si])), steps=int(k), merge_ratio=float(r),
                            floor=floor)
    rows.append(best or dict(name="meg_best_fixed", latency_s=float("nan"), ue_energy_j=float("nan"),
                             accuracy=float("nan"), psnr=float("nan"), steps=None, merge_ratio=None,
                             floor=floor))
    return rows
