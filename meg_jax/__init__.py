"""meg-jax: mobile edge generation in JAX.

A latent diffusion model split between an edge server and a phone (``meg_jax.backbone``,
``meg_jax.meg``), a vectorized wireless CMDP environment on brax's API (``meg_jax.env``)
and MEG-CVPO, a constrained RL agent that chooses the denoising steps and feature merge
ratio per request (``meg_jax.rl``). Nothing in this package parses command lines; the
jobs live in ``train/`` and ``eval/``.
"""

__version__ = "0.1.0"
