"""Prints the backbone FLOP table of docs/flops.md and reconciles the UNet counts.

    python -m eval.flops_table             # tiny @ 8x8, sd15 @ 64x64, sdxl @ 128x128
    python -m eval.flops_table --no_torch  # XLA counts only (skips the diffusers cross-check)

Two tables:

1. Per-forward FLOPs of the UNet, VAE decoder, VAE encoder and text encoder from
   ``meg_jax.backbone.flops`` (XLA's cost analysis on abstract shapes).
2. The UNet count reconciled with an independent count on diffusers' PyTorch
   ``UNet2DConditionModel`` built on the ``meta`` device (no weights, no data): forward hooks
   sum the multiply-accumulates (MACs) of every ``Conv2d`` (full kernel, and taps inside the
   input only) and ``Linear``, and of the attention's two batched matmuls (q·kᵀ and
   weights·v). Published "MACs" (e.g. BK-SDM's 339 G for SD1.5) count Conv2d + Linear with
   full kernels; XLA counts convs without padding taps, the attention matmuls, and one FLOP
   per elementwise op.

The tables go to stdout, progress to the log (stderr).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Optional, Sequence

from meg_jax.backbone import flops, preset
from meg_jax.backbone.config import UNetConfig

__all__ = ["Args", "diffusers_unet_macs", "main", "parse_args"]

log = logging.getLogger("eval.flops_table")

CASES = (("tiny", 8), ("sd15", 64), ("sdxl", 128))


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.flops_table``."""

    torch: bool = True  # reconcile the UNet counts with diffusers' PyTorch model (--no_torch: XLA counts only)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    return config_lib.parse_cli(Args, argv, prog="python -m eval.flops_table", description=__doc__.split("\n")[0])


def diffusers_unet_macs(
    config: UNetConfig, latent_hw: tuple[int, int], batch: int = 1, seq_len: int = 77
) -> dict[str, int]:
    """MACs of diffusers' ``UNet2DConditionModel(**config.to_diffusers())``, by kind.

    Runs the PyTorch model on the ``meta`` device (shapes only) with forward hooks.

    Returns:
      ``conv_full`` (every Conv2d tap, as published counts do), ``conv_valid`` (only taps
      inside the input, as XLA counts), ``linear`` (every Linear), ``attention`` (q·kᵀ and
      weights·v of every Attention).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    counts = {"conv_full": 0, "conv_valid": 0, "linear": 0, "attention": 0}

    def valid_taps(n_in: int, n_out: int, k: int, stride: int, pad: int) -> int:
        return sum(1 for o in range(n_out) for t in range(k) if 0 <= o * stride - pad + t < n_in)

    def conv_hook(mod: Any, inputs: Any, out: Any) -> None:
        x = inputs[0]
        b, cout, ho, wo = out.shape
        cin = mod.in_channels // mod.groups
        kh, kw = mod.kernel_size
        counts["conv_full"] += b * cout * ho * wo * cin * kh * kw
        vh = valid_taps(x.shape[2], ho, kh, mod.stride[0], mod.padding[0])
        vw = valid_taps(x.shape[3], wo, kw, mod.stride[1], mod.padding[1])
        counts["conv_valid"] += b * cout * cin * vh * vw

    def linear_hook(mod: Any, inputs: Any, out: Any) -> None:
        counts["linear"] += out.numel() * mod.in_features

    def attention_hook(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hidden.shape[1]
        keys = n if context is None else context.shape[1]
        # q·kᵀ and weights·v: each n x keys x inner MACs per batch element.
        counts["attention"] += hidden.shape[0] * 2 * n * keys * mod.to_q.out_features

    with torch.device("meta"):
        model = UNet2DConditionModel(**config.to_diffusers())
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.register_forward_hook(conv_hook)
            elif isinstance(mod, torch.nn.Linear):
                mod.register_forward_hook(linear_hook)
            elif isinstance(mod, Attention):
                mod.register_forward_hook(attention_hook, with_kwargs=True)
        h, w = latent_hw
        added = None
        if config.addition_embed_type == "text_time":
            added = {"text_embeds": torch.zeros(batch, config.text_embeds_dim), "time_ids": torch.zeros(batch, 6)}
        cond = None if config.time_cond_proj_dim is None else torch.zeros(batch, config.time_cond_proj_dim)
        with torch.no_grad():
            model(
                torch.zeros(batch, config.in_channels, h, w),
                torch.zeros(batch),
                torch.zeros(batch, seq_len, config.cross_attention_dim_tuple[0]),
                timestep_cond=cond,
                added_cond_kwargs=added,
            )
    return counts


def _gflop(value: float) -> str:
    """GFLOP: one decimal from 100 up, else 4 significant digits (tiny is tens of MFLOP)."""
    g = value / 1e9
    return f"{g:,.1f}" if abs(g) >= 100 else f"{g:.4g}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: prints the two tables."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from meg_jax import job_setup

    job_setup.configure_logging()

    print("Per-forward FLOPs, batch 1 (XLA cost analysis; GFLOP)\n")
    print("| preset | latent | image | UNet | VAE decoder | VAE encoder | text encoder (L) |")
    print("|---|---|---|---|---|---|---|")
    for name, hw in CASES:
        log.info("XLA cost analysis of %s @ %dx%d", name, hw, hw)
        cfg = preset(name)
        costs = flops.cost_breakdown(cfg, hw)
        image = hw * cfg.vae.downsample_factor
        print(
            f"| {name} | {hw}x{hw} | {image}x{image} | {_gflop(costs['unet'])} | {_gflop(costs['vae_decoder'])} "
            f"| {_gflop(costs['vae_encoder'])} | {_gflop(costs['text_encoder'])} ({cfg.text_encoder.max_length}) |"
        )
    if not args.torch:
        return

    print("\nUNet reconciliation with diffusers' PyTorch model (meta device; GFLOP = 2 x G MACs)\n")
    print(
        "| preset | XLA total | 2 x (Conv2d full + Linear) [published convention] | 2 x attention matmuls "
        "| conv padding taps | XLA - 2 x (conv valid + linear + attention) [elementwise] |"
    )
    print("|---|---|---|---|---|---|")
    for name, hw in CASES:
        cfg = preset(name)
        log.info("diffusers MACs of %s @ %dx%d (meta device)", name, hw, hw)
        total = flops.unet_flops(cfg, hw)
        macs = diffusers_unet_macs(cfg.unet, (hw, hw), seq_len=cfg.text_encoder.max_length)
        published = 2 * (macs["conv_full"] + macs["linear"])
        matmuls = 2 * (macs["conv_valid"] + macs["linear"] + macs["attention"])
        print(
            f"| {name} @ {hw}x{hw} | {_gflop(total)} | {_gflop(published)} | {_gflop(2 * macs['attention'])} "
            f"| -{_gflop(2 * (macs['conv_full'] - macs['conv_valid']))} | {_gflop(total - matmuls)} |"
        )


if __name__ == "__main__":
    main()
