"""Checkpoint interop with diffusers: model folders and PyTorch state dicts <-> Flax params.

A diffusers model folder holds ``config.json`` (``_class_name`` ``UNet2DConditionModel`` or
``AutoencoderKL``) and its weights in any layout ``save_pretrained`` writes (one
``diffusion_pytorch_model.safetensors``, shards with an index, ``variant`` files such as
``diffusion_pytorch_model.fp16.safetensors``, fp16/bf16 tensors, or a legacy pickled ``.bin``
read only through ``torch.load(..., weights_only=True)``); ``meg_jax.backbone.weights`` reads them.

Names: the Flax modules use diffusers' state-dict names with list indices folded in
(``down_blocks.0.resnets.1.conv1.weight`` <-> ``down_blocks_0/resnets_1/conv1/kernel``).
Tensors: conv OIHW <-> HWIO, linear [out, in] <-> [in, out], norm ``weight`` <-> ``scale``.
Every tensor is checked against the shape of a freshly initialised Flax tree (computed
with ``jax.eval_shape``, nothing allocated); mismatches, missing and unexpected keys raise
``ValueError`` naming the parameters.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from meg_jax.backbone import weights as weights_lib
from meg_jax.backbone.config import UNetConfig, VAEConfig
from meg_jax.backbone.unet import UNet, example_inputs
from meg_jax.backbone.vae import AutoencoderKL, example_image

__all__ = [
    "from_diffusers",
    "read_config",
    "to_diffusers",
    "config_from_diffusers",
    "params_from_torch_state_dict",
    "params_to_torch_state_dict",
    "check_state_dict_shapes",
    "param_shapes",
]

WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
# Parent modules that diffusers keeps in ModuleLists: ``name.i`` in torch, ``name_i`` here.
_LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)
_LIST_RE = re.compile(rf"^({'|'.join(_LIST_MODULES)})_(\d+)$")
# Names of the VAE attention in checkpoints saved before diffusers 0.14.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

ModelConfig = UNetConfig | VAEConfig


def _module_for(config: ModelConfig) -> nn.Module:
    if isinstance(config, UNetConfig):
        return UNet(config)
    if isinstance(config, VAEConfig):
        return AutoencoderKL(config)
    raise TypeError(f"expected a UNetConfig or VAEConfig, got {type(config).__name__}")


def _class_name(config: ModelConfig) -> str:
    return "UNet2DConditionModel" if isinstance(config, UNetConfig) else "AutoencoderKL"


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``path -> shape`` of the Flax params for ``config`` (no arrays allocated)."""
    module = _module_for(config)
    key = jax.random.key(0)
    if isinstance(config, UNetConfig):
        init = lambda: module.init({"params": key, "tome": key}, **example_inputs(config))  # noqa: E731
    else:
        init = lambda: module.init(key, example_image(config))  # noqa: E731
    shapes = jax.eval_shape(init)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def config_from_diffusers(data: Mapping[str, Any]) -> ModelConfig:
    """UNetConfig or VAEConfig from a diffusers ``config.json`` dict, by its ``_class_name``."""
    name = data.get("_class_name")
    if name == "UNet2DConditionModel":
        return UNetConfig.from_diffusers(data)
    if name == "AutoencoderKL":
        return VAEConfig.from_diffusers(data)
    raise ValueError(
        f"config.json has _class_name={name!r}; meg-jax reads 'UNet2DConditionModel' and 'AutoencoderKL'"
    )


def _torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
    """``a.0.b.weight`` -> (("a_0", "b"), "weight")."""
    m = _OLD_ATTN_RE.match(key)
    if m:
        key = f"{m.group(1)}.{_OLD_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
    parts = key.split(".")
    out: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out), parts[-1]


def _path_to_torch_key(path: tuple[str, ...]) -> str:
    """(("a_0", "b", "kernel")) -> ``a.0.b.weight``."""
    parts = []
    for p in path[:-1]:
        m = _LIST_RE.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    leaf = path[-1]
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy() if value.dtype.is_floating_point else value.cpu().numpy()
    value = np.asarray(value)
    # float16/bfloat16 checkpoints: widen before the transpose and the final cast.
    return value.astype(np.float32) if value.dtype.kind == "f" or value.dtype.name == "bfloat16" else value


def _flax_target(
    key: str, shape: tuple[int, ...], expected: Mapping[tuple[str, ...], tuple[int, ...]]
) -> tuple[tuple[str, ...] | None, str]:
    """Where torch tensor ``key`` goes and how: (flax path or None if unexpected, transform).

    transform: "copy", "linear" ([out, in] -> [in, out]), "conv" (OIHW -> HWIO) or
    "conv1x1_linear" (a 1x1 conv stored for a linear layer, as in old VAE attention).
    """
    path, leaf = _torch_key_to_path(key)
    if leaf == "bias":
        target = path + ("bias",)
    elif leaf == "weight":
        target = path + ("scale",) if len(shape) == 1 else path + ("kernel",)
    else:
        return None, "copy"
    if target not in expected:
        return None, "copy"
    if target[-1] != "kernel":
        return target, "copy"
    if len(shape) == 4 and len(expected[target]) == 2 and tuple(shape[2:]) == (1, 1):
        return target, "conv1x1_linear"
    return target, "conv" if len(shape) == 4 else "linear"


def _flax_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "conv":
        return (shape[2], shape[3], shape[1], shape[0])
    if transform == "linear" and len(shape) == 2:
        return (shape[1], shape[0])
    if transform == "conv1x1_linear":
        return (shape[1], shape[0])
    return tuple(shape)


def _convert_array(arr: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        return arr.transpose(2, 3, 1, 0)
    if transform == "linear" and arr.ndim == 2:
        return arr.T
    if transform == "conv1x1_linear":
        return arr[:, :, 0, 0].T
    return arr


def _plan_conversion(
    config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[tuple[str, ...], str]]:
    """Maps every torch key to (flax path, transform); raises naming every problem."""
    expected = param_shapes(config)
    plan: dict[str, tuple[tuple[str, ...], str]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    covered: set[tuple[str, ...]] = set()
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        target, transform = _flax_target(key, shape, expected)
        if target is None:
            unexpected.append(key)
            continue
        if target in covered:  # e.g. both old (query) and new (to_q) VAE attention names
            unexpected.append(f"{key} (a second tensor for {'/'.join(target)})")
            continue
        covered.add(target)
        got = _flax_shape(shape, transform)
        if got != expected[target]:
            mismatched.append(
                f"{key}: checkpoint shape {shape} (Flax layout {got}) but {'/'.join(target)} "
                f"of this config has shape {expected[target]}"
            )
            continue
        plan[key] = (target, transform)
    missing = sorted(_path_to_torch_key(p) for p in expected if p not in covered)
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint ({len(unexpected)}): {sorted(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint does not fit {_class_name(config)} with this config:\n" + "\n".join(problems))
    return plan


def check_state_dict_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Checks torch key -> shape against ``config`` without touching any tensor data.

    Raises:
      ValueError: as :func:`params_from_torch_state_dict` does.
    """
    _plan_conversion(config, shapes)


def params_from_torch_state_dict(
    config: ModelConfig, state_dict: Mapping[str, Any], dtype: Any = np.float32
) -> dict[str, Any]:
    """Converts a diffusers PyTorch state dict into Flax variables ``{"params": ...}``.

    Args:
      config: the architecture the state dict belongs to.
      state_dict: torch key -> tensor (torch.Tensor or numpy array).
      dtype: dtype of the returned leaves (float32; bfloat16 halves the memory).

    Returns:
      Flax variables for ``UNet(config)`` / ``AutoencoderKL(config)`` (numpy leaves of ``dtype``).

    Raises:
      ValueError: a tensor whose shape does not fit (naming the parameter and both shapes),
        or keys that are missing / unexpected (listing them).
    """
    plan = _plan_conversion(config, {k: tuple(v.shape) for k, v in state_dict.items()})
    flat = {
        target: np.ascontiguousarray(_convert_array(_to_numpy(state_dict[key]), transform), dtype=dtype)
        for key, (target, transform) in plan.items()
    }
    return {"params": traverse_util.unflatten_dict(flat)}


def params_to_torch_state_dict(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_torch_state_dict`: Flax variables -> torch-layout numpy arrays."""
    tree = params["params"] if "params" in params else params
    flat = traverse_util.flatten_dict(dict(tree))
    expected = param_shapes(config)
    extra = sorted("/".join(p) for p in flat if p not in expected)
    missing = sorted("/".join(p) for p in expected if p not in flat)
    if extra or missing:
        raise ValueError(f"params do not fit {_class_name(config)} with this config: missing {missing}, extra {extra}")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        arr = np.asarray(jax.device_get(value), dtype=np.float32)
        if tuple(arr.shape) != expected[path]:
            raise ValueError(f"{'/'.join(path)} has shape {arr.shape}, this config needs {expected[path]}")
        if path[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
        out[_path_to_torch_key(path)] = np.ascontiguousarray(arr)
    return out


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The UNetConfig / VAEConfig of a diffusers model folder's ``config.json``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise weights_lib.WeightsError(weights_lib._single_file_message(path))
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path} is not a diffusers model folder: no config.json")
    try:
        with open(cfg_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    try:
        return config_from_diffusers(data)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e


def from_diffusers(
    path: str | os.PathLike, *, variant: str | None = None, dtype: Any = np.float32
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a diffusers ``UNet2DConditionModel`` or ``AutoencoderKL`` model folder.

    Args:
      path: folder with ``config.json`` and weights in any layout ``save_pretrained`` writes
        (single, sharded, variant, fp16/bf16 safetensors, or a legacy ``.bin``).
      variant: weight variant such as ``"fp16"``; ``None`` reads the plain files, or the one
        variant present when there are none.
      dtype: dtype of the returned params (float32 default; stored fp16/bf16 are cast).

    Returns:
      ``(module, variables)``: ``module.apply(variables, ...)`` runs the model.

    Raises:
      meg_jax.backbone.weights.WeightsError: weights missing, corrupt or in a format not read
        (naming the file); ValueError: a config or checkpoint that does not fit.
    """
    path = os.fspath(path)
    config = read_config(path)
    state = weights_lib.load_state_dict(path, variant, np.float32, names=(weights_lib.DIFFUSERS_WEIGHTS_NAME,))
    try:
        params = params_from_torch_state_dict(config, state, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return _module_for(config), params


def to_diffusers(module: nn.Module, params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers' ``from_pretrained`` loads.

    Args:
      module: a ``UNet`` or ``AutoencoderKL`` (its ``config`` is written).
      params: its variables ``{"params": ...}``.
      path: output folder (created if needed).
    """
    from safetensors.numpy import save_file

    config = getattr(module, "config", None)
    if not isinstance(config, (UNetConfig, VAEConfig)):
        raise TypeError(f"to_diffusers needs a UNet or AutoencoderKL module, got {type(module).__name__}")
    state = params_to_torch_state_dict(config, params)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = {"_class_name": _class_name(config), **config.to_diffusers()}
    try:
        import diffusers

        cfg["_diffusers_version"] = diffusers.__version__
    except ImportError:  # writing does not need diffusers
        pass
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(state, os.path.join(path, WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
