"""The calibration artifact: the seam between the generative half and the RL half.

The MEG system (``meg_jax.meg.calibrate``) measures image quality of the real split pipeline
on a grid of denoising steps K x merge ratio r x SNR x task class, and prices every action
with its device/link cost model. It stores both here. The environment (``meg_jax.env``)
reads only this file, so the RL half runs, and installs, without the backbone's weights.
This module imports numpy and json only (no Flax, no JAX).

File format: one ``.npz`` (``numpy.savez_compressed``, loaded with ``allow_pickle=False``) holding the
numeric arrays under the names below plus one entry ``metadata.json``: a 0-d unicode array
with a JSON object for the strings and scalars. Schema version :data:`SCHEMA_VERSION`.

Arrays (``K = len(steps)``, ``R = len(merge_ratios)``, ``S = len(snr_db)``,
``C = len(task_classes)``):

=========================  ==============  =====================================================
name                       shape, dtype    meaning (unit)
=========================  ==============  =====================================================
steps                      [K] int64       denoising step counts K, strictly increasing, >= 1
merge_ratios               [R] float64     fraction of latent tokens merged away, strictly
                                           increasing, in [0, 1), R >= 2
snr_db                     [S] float64     post-equalisation SNR grid (dB), strictly
                                           increasing, S >= 2
accuracy                   [K,R,S,C] f64   attribute-classifier accuracy in [0, 1]
psnr                       [K,R,S,C] f64   PSNR vs the teacher's reference image (dB)
num_samples                [K,R,S,C] int64 prompts measured per cell (>= 1)
es_compute_time_s          [K] float64     ES time for text encoding + K student steps +
                                           merging (s)
payload                    [R] float64     feature payload after merging: bits if
                                           link_mode == "digital", complex symbols if "analog"
side_info_bits             [R] float64     merge map + quantiser scale etc., always sent
                                           digitally at the Shannon rate (bits)
ue_compute_time_s          [R] float64     UE time for unmerge + VAE decode (s)
ue_compute_energy_j        [R] float64     UE energy for unmerge + VAE decode (J)
=========================  ==============  =====================================================

Optional arrays (schema 2; absent in artifacts measured without them, and in every schema-1
file, which still loads). ``P`` = prompts per task class, the same in every cell:

=========================  ================  ===================================================
prompt_accuracy            [K,R,S,C,P] f32   each prompt's classifier accuracy (the per-request
                                             replay of the environment); its mean over P is
                                             ``accuracy``
prompt_psnr                [K,R,S,C,P] f32   each prompt's PSNR vs its own full-step reference
                                             (dB, data range 2: MSE on [-1, 1] pixels is
                                             4 * 10^(-PSNR/10)); its mean over P is ``psnr``
pixel_accuracy             [K,R,S,C] f64     the analytic pixel reading's accuracy
                                             (:mod:`meg_jax.data.pixel_reading`), a second
                                             reading independent of the classifier
prompt_pixel_accuracy      [K,R,S,C,P] f32   the same per prompt; its mean over P is
                                             ``pixel_accuracy``
clip_score                 [K,R,S,C] f64     mean CLIP score in [0, 100] of the cell's images
                                             vs their prompts (torchmetrics' definition,
                                             :mod:`meg_jax.backbone.clip_score`); pipeline
                                             calibrations given a CLIP model only. Not read by
                                             the environment's reward
=========================  ================  ===================================================

Scalars / strings in ``metadata.json``: ``schema_version`` (int), ``task_classes`` (list of
C unique names), ``link_mode`` ("analog" | "digital"), ``bits_per_value`` (int for digital,
null for analog), ``bandwidth_hz`` (link bandwidth B, Hz), ``ue_receive_power_w`` (UE radio
power while receiving, W), ``tx_power_dbm`` and ``noise_figure_db`` (the ES transmit power
(dBm) and UE receiver noise figure (dB) of the link config that was calibrated; null if
unknown — the environment then uses its own config), ``provenance`` (object with at least ``backbone_checkpoint_hash``,
``backbone_preset``, ``cost_preset``, ``created`` (ISO-8601 date) and ``command``; any
extra keys are kept), and ``conventional_schemes`` (object name -> scalar fields of
:class:`ConventionalScheme`; their ``accuracy``/``psnr`` arrays [S, C] are stored as
``conventional/<name>/accuracy`` and ``conventional/<name>/psnr``).

How an action (K, r) is priced at SNR γ (linear) — the environment does exactly this::

    rate      = B * log2(1 + γ)                                        (bit/s)
    t_tx      = payload / rate + side_info_bits / rate                  (digital)
              = payload / B    + side_info_bits / rate                  (analog: 1 symbol/Hz/s)
    latency   = es_compute_time_s[K] + t_tx + ue_compute_time_s[r]      (s)
    ue_energy = ue_compute_energy_j[r] + ue_receive_power_w * t_tx      (J)

Per-r quantities are interpolated linearly in r, quality bilinearly in (r, SNR) with K the
nearest option; the environment clamps SNR to the grid for quality.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "PROMPT_METRICS",
    "psnr_to_neg_log_mse",
    "REQUIRED_PROVENANCE",
    "ConventionalScheme",
    "CalibrationArtifact",
    "load",
    "synthetic_artifact",
]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # schema 1 = schema 2 without the optional per-prompt / pixel tables
REQUIRED_PROVENANCE = ("backbone_checkpoint_hash", "backbone_preset", "cost_preset", "created", "command")
LINK_MODES = ("analog", "digital")
SCHEME_LINK_MODES = ("analog", "digital", "none")

# Per-action arrays: name -> which grid axis gives its length.
_GRID_ARRAYS = ("steps", "merge_ratios", "snr_db")
_QUALITY_ARRAYS = ("accuracy", "psnr", "num_samples")
# optional per-prompt tables [K, R, S, C, P] -> the class-mean table [K, R, S, C] they average to
# (None: no class table is stored for it but ``pixel_accuracy``, itself optional)
_PROMPT_ARRAYS = {"prompt_accuracy": "accuracy", "prompt_psnr": "psnr", "prompt_pixel_accuracy": "pixel_accuracy"}
# Tolerance of "the mean over prompts is the class table": the per-prompt tables are stored in
# float32 (relative rounding 6e-8), the class tables in float64; a mean of float32 values is off
# by at most their rounding, so 1e-6 of accuracy and 1e-4 dB of PSNR (values <= ~100 dB).
# optional class tables [K, R, S, C] -> their value range
_OPTIONAL_TABLES = {"pixel_accuracy": (0.0, 1.0), "clip_score": (0.0, 100.0)}
_PROMPT_MEAN_ATOL = {"accuracy": 1e-6, "psnr": 1e-4, "pixel_accuracy": 1e-6}
_COST_ARRAYS = {
    "es_compute_time_s": "K",
    "payload": "R",
    "side_info_bits": "R",
    "ue_compute_time_s": "R",
    "ue_compute_energy_j": "R",
}
_SCHEME_SCALARS = (
    "link_mode",
    "es_compute_time_s",
    "payload",
    "side_info_bits",
    "ue_compute_time_s",
    "ue_compute_energy_j",
)


@dataclasses.dataclass(frozen=True, eq=False)
class ConventionalScheme:
    """Cost and quality of one conventional (non-MEG) generation scheme, for comparison.

    Priced like an action (see the module docstring) with its own ``link_mode``; "none"
    means nothing is transmitted (on-device generation).
    """

    link_mode: str  # "analog" | "digital" | "none"
    es_compute_time_s: float  # ES compute time per request (s)
    payload: float  # bits (digital) or complex symbols (analog); 0 for "none"
    side_info_bits: float  # digital side information (bits)
    ue_compute_time_s: float  # UE compute time per request (s)
    ue_compute_energy_j: float  # UE compute energy per request (J)
    accuracy: np.ndarray  # [S, C] accuracy in [0, 1] over the artifact's SNR grid
    psnr: np.ndarray  # [S, C] PSNR (dB)


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationArtifact:
    """Quality tables and the cost model of the split MEG system (see module docstring).

    Build one with keyword arguments, call :meth:`validate` (``save`` and ``load`` do),
    and ``save(path)``. Arrays are converted to numpy on construction.
    """

    steps: np.ndarray  # [K] int, denoising step options
    merge_ratios: np.ndarray  # [R] float, merge ratio grid in [0, 1)
    snr_db: np.ndarray  # [S] float, SNR grid (dB)
    task_classes: tuple[str, ...]  # [C] task class names
    accuracy: np.ndarray  # [K, R, S, C] accuracy in [0, 1]
    psnr: np.ndarray  # [K, R, S, C] PSNR (dB)
    num_samples: np.ndarray  # [K, R, S, C] int, prompts per cell
    es_compute_time_s: np.ndarray  # [K] ES compute time (s)
    payload: np.ndarray  # [R] bits (digital) or complex symbols (analog)
    side_info_bits: np.ndarray  # [R] digital side information (bits)
    ue_compute_time_s: np.ndarray  # [R] UE unmerge + decode time (s)
    ue_compute_energy_j: np.ndarray  # [R] UE unmerge + decode energy (J)
    ue_receive_power_w: float  # UE receive power (W)
    bandwidth_hz: float  # link bandwidth (Hz)
    link_mode: str  # "analog" | "digital"
    bits_per_value: int | None  # quantiser bits (digital); None for analog
    provenance: Mapping[str, Any]  # see REQUIRED_PROVENANCE
    tx_power_dbm: float | None = None  # ES transmit power of the calibrated link (dBm)
    noise_figure_db: float | None = None  # UE receiver noise figure of the calibrated link (dB)
    conventional_schemes: Mapping[str, ConventionalScheme] = dataclasses.field(default_factory=dict)
    prompt_accuracy: np.ndarray | None = None  # [K, R, S, C, P] per-prompt accuracy (replay)
    prompt_psnr: np.ndarray | None = None  # [K, R, S, C, P] per-prompt PSNR (dB)
    pixel_accuracy: np.ndarray | None = None  # [K, R, S, C] the pixel reading's accuracy
    prompt_pixel_accuracy: np.ndarray | None = None  # [K, R, S, C, P] the same per prompt
    clip_score: np.ndarray | None = None  # [K, R, S, C] mean CLIP score in [0, 100] (pipelines, --clip_model)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Normalise container types so that validation and saving see numpy arrays.
        set_ = object.__setattr__
        for name in _PROMPT_ARRAYS:
            if getattr(self, name) is not None:
                set_(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        for name in _OPTIONAL_TABLES:
            if getattr(self, name) is not None:
                set_(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        set_(self, "steps", np.asarray(self.steps))
        for name in ("merge_ratios", "snr_db", "accuracy", "psnr", *_COST_ARRAYS):
            set_(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        set_(self, "num_samples", np.asarray(self.num_samples))
        set_(self, "task_classes", tuple(self.task_classes))
        set_(self, "provenance", dict(self.provenance))
        set_(self, "conventional_schemes", dict(self.conventional_schemes))

    # ------------------------------------------------------------------ sizes
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Grid sizes (K, R, S, C)."""
        return (len(self.steps), len(self.merge_ratios), len(self.snr_db), len(self.task_classes))

    @property
    def prompts_per_class(self) -> int | None:
        """P, the prompts per class of the per-prompt tables; None without them (no replay)."""
        return None if self.prompt_accuracy is None else int(self.prompt_accuracy.shape[-1])

    def prompt_quality(self, metric: str) -> np.ndarray:
        """The per-prompt table [K, R, S, C, P] of ``metric``.

        Args:
          metric: "accuracy", "psnr", "neg_log_mse" (the authors' reward, -ln MSE of [-1, 1]
            pixels vs the prompt's full-step reference, from the PSNR) or "pixel_accuracy".

        Raises:
          ValueError: an unknown metric, or an artifact without per-prompt tables (a schema-1
            file, or one measured without them): the message says how to regenerate it.
        """
        if metric not in PROMPT_METRICS:
            raise ValueError(f"unknown per-prompt quality metric {metric!r}; choose from {PROMPT_METRICS}")
        name = "prompt_pixel_accuracy" if metric == "pixel_accuracy" else (
            "prompt_psnr" if metric in ("psnr", "neg_log_mse") else "prompt_accuracy")
        table = getattr(self, name)
        if table is None:
            raise ValueError(
                f"this calibration artifact has no per-prompt {name!r} table (schema "
                f"{self.provenance.get('loaded_schema_version', self.schema_version)}; per-request replay "
                "needs schema 2 with per-prompt tables): regenerate it with `meg-jax calibrate`")
        if metric == "neg_log_mse":
            return psnr_to_neg_log_mse(table)
        return table

    # ------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every way in which this artifact breaks the schema (empty if valid)."""
        out: list[str] = []
        if self.schema_version != SCHEMA_VERSION:
            out.append(f"schema_version is {self.schema_version}, this loader reads {SCHEMA_VERSION}")
        k_, r_, s_, c_ = self.shape
        # Grids.
        for name, arr in (("steps", self.steps), ("merge_ratios", self.merge_ratios), ("snr_db", self.snr_db)):
            if arr.ndim != 1:
                out.append(f"{name} must be 1-D, has shape {arr.shape}")
                continue
            if not np.all(np.isfinite(arr)):
                out.append(f"{name} has non-finite values")
            elif arr.size > 1 and not np.all(np.diff(arr) > 0):
                out.append(f"{name} must be strictly increasing, got {arr.tolist()}")
        if self.steps.ndim == 1:
            if k_ < 1:
                out.append("steps is empty")
            if not np.issubdtype(self.steps.dtype, np.integer) or np.any(self.steps < 1):
                out.append(f"steps must be integers >= 1, got {self.steps.tolist()}")
        if self.merge_ratios.ndim == 1:
            if r_ < 2:
                out.append(f"merge_ratios needs >= 2 values to interpolate, has {r_}")
            if np.any(self.merge_ratios < 0) or np.any(self.merge_ratios >= 1):
                out.append(f"merge_ratios must lie in [0, 1), got {self.merge_ratios.tolist()}")
        if self.snr_db.ndim == 1 and s_ < 2:
            out.append(f"snr_db needs >= 2 values to interpolate, has {s_}")
        if c_ < 1:
            out.append("task_classes is empty")
        if len(set(self.task_classes)) != c_ or not all(isinstance(c, str) and c for c in self.task_classes):
            out.append(f"task_classes must be unique non-empty strings, got {list(self.task_classes)}")
        # Quality tables.
        want = (k_, r_, s_, c_)
        for name in _QUALITY_ARRAYS:
            arr = getattr(self, name)
            if arr.shape != want:
                out.append(f"{name} has shape {arr.shape}, grids (steps, merge_ratios, snr_db, task_classes) say {want}")
            elif not np.all(np.isfinite(arr)):
                out.append(f"{name} has {int(np.sum(~np.isfinite(arr)))} non-finite values")
        if self.accuracy.shape == want and np.all(np.isfinite(self.accuracy)):
            if np.any(self.accuracy < 0) or np.any(self.accuracy > 1):
                out.append("accuracy must lie in [0, 1]")
        if self.num_samples.shape == want:
            if not np.issubdtype(self.num_samples.dtype, np.integer) or np.any(self.num_samples < 1):
                out.append("num_samples must be integers >= 1 in every cell")
        out += self._prompt_problems(want)
        # Cost model.
        lengths = {"K": k_, "R": r_}
        for name, axis in _COST_ARRAYS.items():
            arr = getattr(self, name)
            if arr.shape != (lengths[axis],):
                out.append(f"{name} has shape {arr.shape}, expected ({lengths[axis]},) (one per {axis})")
            elif not np.all(np.isfinite(arr)) or np.any(arr < 0):
                out.append(f"{name} must be finite and >= 0, got {arr.tolist()}")
        for name in ("ue_receive_power_w", "bandwidth_hz"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value) or value < 0:
                out.append(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.bandwidth_hz, (int, float, np.number)) and self.bandwidth_hz <= 0:
            out.append(f"bandwidth_hz must be > 0, got {self.bandwidth_hz}")
        for name in ("tx_power_dbm", "noise_figure_db"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float, np.number)) or not np.isfinite(value)):
                out.append(f"{name} must be a finite number or None, got {value!r}")
        if self.link_mode not in LINK_MODES:
            out.append(f"link_mode must be one of {LINK_MODES}, got {self.link_mode!r}")
        if self.link_mode == "digital" and not (isinstance(self.bits_per_value, int) and self.bits_per_value > 0):
            out.append(f"bits_per_value must be a positive int for a digital link, got {self.bits_per_value!r}")
        if self.link_mode == "analog" and self.bits_per_value is not None:
            out.append(f"bits_per_value must be None for an analog link, got {self.bits_per_value!r}")
        # Provenance.
        missing = [k for k in REQUIRED_PROVENANCE if k not in self.provenance]
        if missing:
            out.append(f"provenance lacks {missing} (required: {list(REQUIRED_PROVENANCE)})")
        # Conventional schemes.
        for name, scheme in self.conventional_schemes.items():
            if not isinstance(scheme, ConventionalScheme):
                out.append(f"conventional_schemes[{name!r}] is a {type(scheme).__name__}, not a ConventionalScheme")
                continue
            if scheme.link_mode not in SCHEME_LINK_MODES:
                out.append(f"conventional_schemes[{name!r}].link_mode must be one of {SCHEME_LINK_MODES}")
            for field in _SCHEME_SCALARS[1:]:
                value = getattr(scheme, field)
                if not np.isfinite(value) or value < 0:
                    out.append(f"conventional_schemes[{name!r}].{field} must be finite and >= 0, got {value!r}")
            for field in ("accuracy", "psnr"):
                arr = np.asarray(getattr(scheme, field))
                if arr.shape != (s_, c_):
                    out.append(f"conventional_schemes[{name!r}].{field} has shape {arr.shape}, expected {(s_, c_)}")
                elif not np.all(np.isfinite(arr)):
                    out.append(f"conventional_schemes[{name!r}].{field} has non-finite values")
        return out

    def _prompt_problems(self, want: tuple[int, int, int, int]) -> list[str]:
        """Schema problems of the optional per-prompt and pixel-reading tables."""
        out: list[str] = []
        for name, (lo, hi) in _OPTIONAL_TABLES.items():
            table = getattr(self, name)
            if table is None:
                continue
            if table.shape != want:
                out.append(f"{name} has shape {table.shape}, the grids say {want}")
            elif not np.all((table >= lo) & (table <= hi)):
                out.append(f"{name} must lie in [{lo:g}, {hi:g}] (and be finite)")
        present = {n: getattr(self, n) for n in _PROMPT_ARRAYS if getattr(self, n) is not None}
        if not present:
            return out
        if self.prompt_accuracy is None or self.prompt_psnr is None:
            out.append("per-prompt tables come as a set: prompt_accuracy and prompt_psnr are both required "
                       f"when any is present (present: {sorted(present)})")
        for name, arr in present.items():
            if arr.ndim != 5 or arr.shape[:4] != want or arr.shape[4] < 1:
                out.append(f"{name} has shape {arr.shape}, expected {want + ('P',)} with P >= 1")
                continue
            if not np.all(np.isfinite(arr)):
                out.append(f"{name} has {int(np.sum(~np.isfinite(arr)))} non-finite values")
                continue
            if name != "prompt_psnr" and (np.any(arr < 0) or np.any(arr > 1)):
                out.append(f"{name} must lie in [0, 1]")
            table = _PROMPT_ARRAYS[name]
            means = getattr(self, table)
            if means is None:
                out.append(f"{name} is present without the class table {table!r} it averages to")
            elif means.shape == want:
                err = float(np.max(np.abs(arr.astype(np.float64).mean(-1) - means)))
                if not err <= _PROMPT_MEAN_ATOL[table]:
                    out.append(f"{name} averaged over prompts differs from {table} by up to {err:.3g} "
                               f"(allowed {_PROMPT_MEAN_ATOL[table]:g})")
        sizes = {arr.shape[-1] for arr in present.values() if arr.ndim == 5}
        if len(sizes) > 1:
            out.append(f"the per-prompt tables disagree on P: {sorted(sizes)}")
        elif sizes and self.num_samples.shape == want and np.any(self.num_samples != sizes.pop()):
            out.append("num_samples must equal P (the per-prompt tables' last axis) in every cell")
        return out

    def validate(self) -> "CalibrationArtifact":
        """Raises ``ValueError`` listing every schema problem; returns ``self`` if none."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid calibration artifact:\n  - " + "\n  - ".join(problems))
        return self

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> None:
        """Validates and writes the artifact to ``path`` (``.npz``), atomically."""
        self.validate()
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(f"calibration artifacts are .npz files; got {path!r}")
        arrays: dict[str, np.ndarray] = {
            "steps": self.steps.astype(np.int64),
            "merge_ratios": self.merge_ratios,
            "snr_db": self.snr_db,
            "accuracy": self.accuracy,
            "psnr": self.psnr,
            "num_samples": self.num_samples.astype(np.int64),
        }
        for name in _COST_ARRAYS:
            arrays[name] = getattr(self, name)
        for name in (*_PROMPT_ARRAYS, *_OPTIONAL_TABLES):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        schemes_meta = {}
        for name, scheme in self.conventional_schemes.items():
            if "/" in name:
                raise ValueError(f"conventional scheme name {name!r} must not contain '/'")
            schemes_meta[name] = {f: _plain(getattr(scheme, f)) for f in _SCHEME_SCALARS}
            arrays[f"conventional/{name}/accuracy"] = np.asarray(scheme.accuracy, dtype=np.float64)
            arrays[f"conventional/{name}/psnr"] = np.asarray(scheme.psnr, dtype=np.float64)
        meta = {
            "schema_version": self.schema_version,
            "task_classes": list(self.task_classes),
            "link_mode": self.link_mode,
            "bits_per_value": self.bits_per_value,
            "bandwidth_hz": float(self.bandwidth_hz),
            "ue_receive_power_w": float(self.ue_receive_power_w),
            "tx_power_dbm": _plain(self.tx_power_dbm),
            "noise_figure_db": _plain(self.noise_figure_db),
            "provenance": {k: _plain(v) for k, v in self.provenance.items()},
            "conventional_schemes": schemes_meta,
        }
        arrays["metadata.json"] = np.array(json.dumps(meta, sort_keys=True))
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = path[: -len(".npz")] + ".tmp.npz"
        np.savez_compressed(tmp, **arrays)  # the per-prompt tables compress (accuracy: 6 values)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationArtifact":
        """Reads and validates an artifact written by :meth:`save`.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: the file is not a calibration artifact of this schema version, is
            truncated or corrupt, or its contents are inconsistent; the message names the file
            and every mismatch.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        contents = _read_npz(path)
        if "metadata.json" not in contents:
            raise ValueError(f"{path}: not a calibration artifact (no 'metadata.json' entry)")
        try:
            meta = json.loads(str(contents.pop("metadata.json")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: its 'metadata.json' entry is not valid JSON ({e}); {_REMAKE}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: its 'metadata.json' entry is {type(meta).__name__}, not an object; {_REMAKE}")
        version = meta.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: schema_version {version!r}, this loader reads {list(READABLE_VERSIONS)}; "
                "regenerate it with `meg-jax calibrate`"
            )
        required_arrays = (*_GRID_ARRAYS, *_QUALITY_ARRAYS, *_COST_ARRAYS)
        required_meta = ("task_classes", "link_mode", "bits_per_value", "bandwidth_hz", "ue_receive_power_w", "provenance")
        missing = [f"array {k!r}" for k in required_arrays if k not in contents]
        missing += [f"metadata {k!r}" for k in required_meta if k not in meta]
        if missing:
            raise ValueError(f"{path}: calibration artifact lacks {', '.join(missing)}")
        schemes = {}
        for name, fields in meta.get("conventional_schemes", {}).items():
            lacking = [f for f in _SCHEME_SCALARS if f not in fields]
            lacking += [f"{q} array" for q in ("accuracy", "psnr") if f"conventional/{name}/{q}" not in contents]
            if lacking:
                raise ValueError(f"{path}: conventional scheme {name!r} lacks {lacking}")
            schemes[name] = ConventionalScheme(
                **{f: fields[f] for f in _SCHEME_SCALARS},
                accuracy=contents[f"conventional/{name}/accuracy"],
                psnr=contents[f"conventional/{name}/psnr"],
            )
        artifact = cls(
            **{k: contents[k] for k in required_arrays},
            task_classes=tuple(meta["task_classes"]),
            link_mode=meta["link_mode"],
            bits_per_value=meta["bits_per_value"],
            bandwidth_hz=meta["bandwidth_hz"],
            ue_receive_power_w=meta["ue_receive_power_w"],
            tx_power_dbm=meta.get("tx_power_dbm"),
            noise_figure_db=meta.get("noise_figure_db"),
            provenance=meta["provenance"],
            conventional_schemes=schemes,
            # schema 1 is schema 2 without the optional tables: it loads as such (and says so)
            **{k: contents[k] for k in (*_PROMPT_ARRAYS, *_OPTIONAL_TABLES) if k in contents},
        )
        if version != SCHEMA_VERSION:
            artifact.provenance["loaded_schema_version"] = version
        problems = artifact.problems()
        if problems:
            raise ValueError(f"{path}: invalid calibration artifact:\n  - " + "\n  - ".join(problems))
        return artifact


PROMPT_METRICS = ("accuracy", "psnr", "neg_log_mse", "pixel_accuracy")


def psnr_to_neg_log_mse(psnr_db: np.ndarray) -> np.ndarray:
    """-ln(MSE) of [-1, 1] pixels from a PSNR of data range 2 (MSE = 4 * 10^(-PSNR/10))."""
    return np.asarray(psnr_db) * (np.log(10.0) / 10.0) - np.log(4.0)


def load(path: str | os.PathLike) -> CalibrationArtifact:
    """Shorthand for :meth:`CalibrationArtifact.load`."""
    return CalibrationArtifact.load(path)


_REMAKE = "remake it with `meg-jax calibrate` (or restore the shipped file from git)"


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every entry of the ``.npz`` at ``path``; a truncated or corrupt file raises ``ValueError`` naming it.

    ``np.load`` reads the zip directory at once but each member only when asked, so a
    truncation shows up either here (no directory: "not a zip file") or while reading a member
    (short read, CRC mismatch); both are reported with the file and the member.
    """
    size = os.path.getsize(path)
    member = None
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy holds one array, no entries
                raise ValueError("it is a single .npy array, not an .npz archive")
            contents = {}
            for member in data.files:
                contents[member] = data[member]
            return contents
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        where = f" while reading entry {member!r}" if member is not None else ""
        raise ValueError(
            f"{path}: not a readable calibration artifact ({size} bytes; truncated or corrupt?){where}: "
            f"{type(e).__name__}: {e}; {_REMAKE}"
        ) from e


def _plain(value: Any) -> Any:
    """JSON-ready copy of a scalar (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


# The synthetic test artifact lives in its own module; imported last (it builds on the classes above).
from meg_jax.meg.artifact_synthetic import synthetic_artifact  # noqa: E402
