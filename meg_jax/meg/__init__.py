"""The split MEG system: ES generation, feature merging over a link, UE decoding, costs.

Submodules (imported lazily, so that ``meg_jax.meg.artifact`` — the only part the RL half
reads — pulls in no Flax model):

* ``link`` — digital/analog feature transmission (``LinkConfig``, ``transmit_features``);
* ``devices`` — cited device profiles and the FLOP cost model;
* ``costs`` — the ``Costs`` pytree, cost presets (``tiny``, ``sd15-512``, ``sdxl-1024``);
* ``pricing`` — the one Shannon-rate / air-time / request-cost function set (jnp only; the env
  prices actions with it too);
* ``generator`` — the interface the MEG path asks of a model, with adapters for the tiny
  backbone and a diffusers pipeline folder (``meg_jax.backbone.load_pipeline``);
* ``pipeline`` — ``generate(model, prompts, K, r, link, key) -> (images, Costs)``;
* ``schemes`` — centralised / MEG uncompressed / on-device, and the shared quality metric;
* ``calibrate`` — the (K, r, SNR, task class) quality grid -> calibration artifact;
* ``calibrate_pipeline`` — the same grid for a diffusers pipeline, scored against its own
  full-step image (PSNR, MSE);
* ``artifact`` — the artifact's schema, ``save``/``load``.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("artifact", "calibrate", "calibrate_pipeline", "costs", "devices", "generator", "link", "pipeline",
               "pricing", "schemes")
_EXPORTS = {
    "LinkConfig": "link",
    "Costs": "costs",
    "CostPreset": "costs",
    "cost_preset": "costs",
    "DeviceProfile": "devices",
    "generate": "pipeline",
    "CalibrationConfig": "calibrate",
}

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
