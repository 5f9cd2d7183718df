"""Images at a policy's choices (report item 5), generated with the shipped backbone.

Application code of the evaluation job: picks requests of a ``Rollout`` at target SNRs
(:func:`policy_image_cases`), generates the image at each case's (K, r, SNR) with
``meg_jax.meg.pipeline.generate`` beside the teacher's reference (:func:`generate_case_images`)
and the (K, r) grid of one prompt (:func:`image_grid`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.data.shapes import SHAPES, attributes_of_prompts
from meg_jax.meg import pipeline, schemes
from meg_jax.meg.link import LinkConfig
from meg_jax.rl.evaluate import Rollout

__all__ = ["policy_image_cases", "class_prompt", "CLASS_PROMPTS", "link_of_artifact", "generate_case_images",
           "image_grid"]


def policy_image_cases(ro: Rollout, task_classes: Sequence[str], target_snrs_db: Sequence[float] = (0.0, 10.0, 25.0),
                       ) -> list[dict[str, Any]]:
    """Item 5: requests of ``ro`` nearest each target SNR; the policy's (K, r) there.

    Classes cycle over the task classes so the images show several prompts. Each case:
    ``snr_db`` (true), ``task_class``, ``steps`` K, ``merge_ratio`` r (rounded to 0.01,
    the generator compiles per r), ``latency_s``, ``energy_j``, ``quality`` (calibrated).
    """
    cases = []
    for i, target in enumerate(target_snrs_db):
        c = i % len(task_classes)
        mask = ro.task_class == c
        dist = np.where(mask, np.abs(ro.snr_db - target), np.inf)
        e, t = np.unravel_index(int(np.argmin(dist)), dist.shape)
        cases.append({
            "target_snr_db": float(target),
            "snr_db": float(ro.snr_db[e, t]),
            "task_class": int(ro.task_class[e, t]),
            "task": task_classes[int(ro.task_class[e, t])],
            "steps": int(round(ro.steps[e, t])),
            "merge_ratio": float(np.round(ro.merge_ratio[e, t], 2)),
            "latency_s": float(ro.latency_s[e, t]),
            "energy_j": float(ro.energy_j[e, t]),
            "quality": float(ro.quality[e, t]),
        })
    return cases


CLASS_PROMPTS = (
    "a large red {} at the center on a blue background",
    "a large yellow {} at the top left on a black background",
    "a large white {} at the bottom on a green background",
    "a large cyan {} at the right on a magenta background",
)


def class_prompt(task: str, index: int = 0) -> str:
    """A prompt of the procedural grammar whose shape is the task class ``task``.

    A class name the grammar does not know (e.g. the synthetic test artifact's) is replaced
    by the grammar's shape of the same index.
    """
    if task not in SHAPES:
        task = SHAPES[index % len(SHAPES)]
    return CLASS_PROMPTS[index % len(CLASS_PROMPTS)].format(task)


def link_of_artifact(artifact: Any) -> Any:
    """The ``LinkConfig`` an artifact was calibrated with (mode, bandwidth, power, fading)."""
    prov = dict(artifact.provenance)
    return LinkConfig(
        mode=artifact.link_mode,
        bandwidth_hz=float(artifact.bandwidth_hz),
        tx_power_dbm=float(artifact.tx_power_dbm if artifact.tx_power_dbm is not None else 30.0),
        noise_figure_db=float(artifact.noise_figure_db if artifact.noise_figure_db is not None else 7.0),
        bits=int(artifact.bits_per_value or 8),
        fading=str(prov.get("fading", "awgn")) if prov.get("fading") in ("awgn", "rayleigh") else "awgn",
    )


def _score(backbone: Any, images: jax.Array, prompts: Sequence[str], reference: jax.Array) -> Optional[dict[str, list[float]]]:
    if backbone.classifier is None:
        return None
    q = schemes.score_images(backbone, images, attributes_of_prompts(list(prompts)), reference)
    return {"accuracy": np.asarray(q.accuracy).tolist(), "psnr_db": np.asarray(q.psnr).tolist()}


def generate_case_images(backbone: Any, cases: Sequence[dict[str, Any]], link: Any, key: jax.Array,
                         cost: str = "tiny") -> dict[str, Any]:
    """Item 5: the image at each case's (K, r, SNR) with ``pipeline.generate``, and the teacher's.

    Same prompt and initial noise for both; the teacher's is the 50-step, uncompressed,
    noiseless reference. Returns images ``[N, H, W, 3]`` in [-1, 1] (NumPy), the prompts,
    the pipeline's costs per case and, with a classifier, accuracy/PSNR of each image.
    """
    prompts = [class_prompt(c["task"], i) for i, c in enumerate(cases)]
    h = backbone.config.latent_size
    noise = jax.random.normal(jax.random.fold_in(key, 1), (len(cases), h, h, backbone.config.vae.latent_channels))
    reference = pipeline.reference_images(backbone, prompts, noise)
    images, costs = [], []
    for i, c in enumerate(cases):
        img, cst = pipeline.generate(backbone, prompts[i:i + 1], int(c["steps"]), float(c["merge_ratio"]), link,
                                     jax.random.fold_in(key, 100 + i), snr_db=float(c["snr_db"]),
                                     noise=noise[i:i + 1], cost=cost)
        images.append(np.asarray(img[0]))
        costs.append({"latency_s": float(cst.latency_s[0]), "ue_energy_j": float(cst.ue_energy_j[0]),
                      "tx_time_s": float(cst.tx_time_s[0]), "es_time_s": float(cst.es_time_s[0])})
    images = np.stack(images)
    return {
        "prompts": prompts,
        "images": images,
        "reference": np.asarray(reference),
        "pipeline_costs": costs,
        "scores": _score(backbone, jnp.asarray(images), prompts, reference),
        "reference_scores": _score(backbone, reference, prompts, reference),
    }


def image_grid(backbone: Any, steps: Sequence[int], ratios: Sequence[float], link: Any, snr_db: float,
               key: jax.Array, prompt: str) -> np.ndarray:
    """Images ``[len(steps), len(ratios), H, W, 3]`` of one prompt and noise over a (K, r) grid.

    The ES latents are computed once per K and sent at every r (one compile per K and per r
    rather than per pair).
    """
    tokens = pipeline.tokenize(backbone, [prompt])
    h = backbone.config.latent_size
    noise = jax.random.normal(jax.random.fold_in(key, 1), (1, h, h, backbone.config.vae.latent_channels))
    context = jax.jit(pipeline.encode_text)(backbone, tokens)
    es = jax.jit(pipeline.es_latents, static_argnums=3)
    rows = []
    for k in steps:
        latents = es(backbone, context, noise, int(k))
        row = []
        for r in ratios:
            row.append(np.asarray(_receive(backbone, latents, float(r), link, jnp.float32(snr_db), key)[0]))
        rows.append(row)
    return np.asarray(rows)


def _receive_impl(backbone, latents, snr_db, key, merge_ratio, link):
    received = pipeline.transmit_latents(latents, merge_ratio, link, jnp.broadcast_to(snr_db, latents.shape[:1]), key)
    return pipeline.ue_decode_latents(backbone, received)


_receive_jit = jax.jit(_receive_impl, static_argnames=("merge_ratio", "link"))


def _receive(backbone, latents, merge_ratio, link, snr_db, key):
    return _receive_jit(backbone, latents, snr_db, key, merge_ratio=merge_ratio, link=link)
