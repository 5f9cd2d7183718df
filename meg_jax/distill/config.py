"""Configs of the distillation job: one frozen dataclass per stage, bundled with the models.

``DistillConfig`` is everything ``python -m train.distill`` needs: the backbone architecture
(``meg_jax.backbone.config.BackboneConfig``), the procedural data (``ShapesConfig``), the
classifier, and the stages (classifier, VAE, decoder, teacher, teacher_ft, student) with
their step counts, batch sizes, learning rates, EMA decays, checkpoint intervals and seeds.
``decoder`` and ``teacher_ft`` are optional refinements (``None`` skips them): both keep the
VAE's latent space, so they change what the later stages start from, not what they read.
``ue_decoder`` (optional, last) is the merging-aware decoder of the user's device: the refined
decoder fine-tuned on latents that went through the split pipeline's merge -> link -> unmerge
path; it is shipped beside the VAE and changes nothing the other stages read. Named presets:
``tiny`` (the shipped checkpoints, sized for a 2-core CPU) and ``test`` (seconds per stage,
for the tests). The command line only overrides fields (``--student.steps 100``).

``pipeline`` (off by default) replaces the procedural world with a user's: a diffusers
Stable Diffusion folder is the frozen teacher and the student's starting point, and an
image–caption folder is the data; only the student stage runs
(``meg_jax.distill.pipeline_teacher``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from meg_jax.backbone.config import BackboneConfig
from meg_jax.backbone.config import preset as backbone_preset
from meg_jax.data.classifier import ClassifierConfig
from meg_jax.data.shapes import ShapesConfig
from meg_jax.partition import ParallelConfig

__all__ = [
    "StageConfig",
    "ClassifierStageConfig",
    "VAEStageConfig",
    "TeacherStageConfig",
    "DecoderStageConfig",
    "TeacherFinetuneStageConfig",
    "StudentStageConfig",
    "UEDecoderStageConfig",
    "SamplingConfig",
    "ComputeConfig",
    "PipelineConfig",
    "ParallelConfig",
    "REMAT_POLICIES",
    "DistillConfig",
    "STAGES",
    "OPTIONAL_STAGES",
    "preset",
    "PRESETS",
]

STAGES = ("classifier", "vae", "decoder", "teacher", "teacher_ft", "student", "ue_decoder")
OPTIONAL_STAGES = ("decoder", "teacher_ft", "ue_decoder")  # skipped when their config is None


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Optimisation and bookkeeping shared by every stage."""

    steps: int = 1000  # optimizer steps of the stage
    batch_size: int = 64  # global batch (split over devices; must divide evenly)
    learning_rate: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up from 0 to the peak
    final_lr_fraction: float = 0.1  # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global-norm gradient clipping
    ema_decay: float = 0.999  # EMA of the parameters (the exported weights are the EMA)
    checkpoint_every: int = 500  # steps between orbax checkpoints (and the last step)
    log_every: int = 50  # steps between metric fetches (JSONL/TensorBoard, NaN check)
    seed: int = 0  # seed of initialisation and of every batch of the stage

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{type(self).__name__}.{f} must be >= 1, got {getattr(self, f)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{type(self).__name__}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.learning_rate <= 0:
            raise ValueError(f"{type(self).__name__}.learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class ClassifierStageConfig(StageConfig):
    """Attribute classifier: cross-entropy on fresh, augmented images (``classifier_model``
    gives the architecture and the augmentation; this gives the optimisation)."""

    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05
    checkpoint_every: int = 300
    log_every: int = 50
    ema_decay: float = 0.0  # the classifier is used as trained (no EMA needed)


@dataclasses.dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    """VAE: reconstruction (MSE) + small KL to N(0, I) + an edge (image-gradient) term."""

    # 6000 steps: 1500 stopped at 24.8 dB with PSNR still rising and shapes blurred to
    # blobs (classifier shape accuracy 0.37 on reconstructions); 2e-3 stalled at ~10 dB for
    # its first 700 steps, 1e-3 with a longer warm-up does not.
    steps: int = 6000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    log_every: int = 50
    kl_weight: float = 1e-6  # weight of the per-element KL (keeps latents bounded, not Gaussian)
    edge_weight: float = 0.5  # weight of the MSE between horizontal/vertical image gradients
    # Decode a posterior sample (True) or the mean (False). With a tiny KL weight the sampled
    # noise (std 1 at init) swamps the still-small means for hundreds of steps and the decoder
    # learns only the mean image; decoding the mean trains in the step budget of a CPU.
    sample_posterior: bool = False


@dataclasses.dataclass(frozen=True)
class TeacherStageConfig(StageConfig):
    """Teacher LDM (UNet + text encoder) on VAE latents, with prompt dropout for CFG."""

    # 8000 steps: at 1600 the teacher followed colour and background but placed shapes at
    # random (position accuracy at chance); the text-to-layout binding is learnt later
    # (0.22 at step 2000 of an 8000-step run).
    steps: int = 8000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    checkpoint_every: int = 1000
    log_every: int = 50
    cond_dropout: float = 0.1  # probability of training a sample unconditionally (zero context)
    latent_scale_samples: int = 1024  # images used to measure the latent std after the VAE stage
    num_latents: int = 8192  # generated images encoded once by the frozen VAE (the teacher's data)
    latent_chunk: int = 1024  # images encoded per resumable chunk

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_latents % self.latent_chunk:
            raise ValueError(
                f"TeacherStageConfig.num_latents={self.num_latents} must be a multiple of "
                f"latent_chunk={self.latent_chunk}"
            )


@dataclasses.dataclass(frozen=True)
class DecoderStageConfig(StageConfig):
    """Decoder refinement: the VAE decoder trained further with the encoder frozen.

    The latents (and so the teacher's data and the latent scale) stay exactly as the VAE
    stage left them; only how latents become pixels improves. The loss adds to the VAE's
    MSE + edge terms a *shape* term: the squared error over a dilated mask of the pixels
    that differ from the background colour, normalised by the mask's area. Whole-image MSE
    is dominated by the background; a small shape covers ~5% of a 32 x 32 image, and the
    VAE stage left small squares and crosses decoded round (classifier shape accuracy 0.85
    on reconstructions of small shapes). Normalising per shape makes its outline count as
    much as a large one's.
    """

    # 4500 steps at 3e-4: a 1500 + 3000-step probe took reconstructions' small-shape accuracy
    # from 0.88 to 0.98 and PSNR from 32.6 to 35.0 dB (1024 fresh images), still rising
    # slowly at the end.
    steps: int = 4500
    batch_size: int = 16
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 1
    edge_weight: float = 0.5  # as in the VAE stage
    shape_weight: float = 4.0  # weight of the foreground-normalised MSE
    mask_dilation: int = 5  # odd window of the max-pool that widens the shape mask (edges included)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_dilation < 1 or self.mask_dilation % 2 == 0:
            raise ValueError(f"DecoderStageConfig.mask_dilation must be odd and >= 1, got {self.mask_dilation}")


@dataclasses.dataclass(frozen=True)
class TeacherFinetuneStageConfig(StageConfig):
    """Teacher continuation: the teacher stage's EMA weights trained further, at a lower
    learning rate, on a larger set of freshly encoded latents (its own seed and cache).

    Small shapes are where the teacher fails (their outline is a few latent pixels); at the
    end of the teacher stage its small-shape accuracy was still climbing, and a bigger
    latent set keeps the longer run from memorising 8192 images.
    """

    # 12000 steps at 5e-4 over 65536 latents: probes of 8000 steps on 32768 latents (5e-4)
    # followed by 4000 on 32768 others (2e-4) took the teacher from 0.79 to 0.90 all-five
    # accuracy at DDIM-50 with the refined decoder.
    steps: int = 12000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.995
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 7
    cond_dropout: float = 0.1  # as in the teacher stage
    num_latents: int = 65536  # generated images encoded once by the frozen VAE encoder
    latent_chunk: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_latents % self.latent_chunk:
            raise ValueError(
                f"TeacherFinetuneStageConfig.num_latents={self.num_latents} must be a multiple of "
                f"latent_chunk={self.latent_chunk}"
            )


@dataclasses.dataclass(frozen=True)
class StudentStageConfig(StageConfig):
    """Step-conditioned student: unrolled K-step trailing DDIM regressed onto teacher DDIM-50.

    The student starts as a copy of the teacher (step-conditioning projection at zero),
    samples K ∈ ``step_counts`` trailing DDIM steps from the stored noise and prompt, and the
    result is regressed onto the teacher's guided ``target_steps``-step DDIM sample from the
    same noise and prompt (latent MSE, plus decoded-pixel MSE with ``pixel_weight``).
    """

    # 250 steps: a step unrolls up to K = 8 UNet passes with backprop (about 3.6 s on one
    # CPU core at batch 32), so this stage is the costliest per step.
    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 4e-4
    warmup_steps: int = 20
    ema_decay: float = 0.99
    checkpoint_every: int = 100
    log_every: int = 10
    step_counts: tuple[int, ...] = (1, 2, 4, 8)  # K values one set of weights serves
    # More weight on K = 4 and 8: their error vs the teacher is smallest and is what must
    # keep falling with K (at uniform weights and 200 steps K = 8 was no better than K = 4).
    step_probs: tuple[float, ...] = (0.15, 0.2, 0.3, 0.35)  # how often each K is trained
    num_targets: int = 2048  # (noise, prompt, teacher sample) triples precomputed
    target_steps: int = 50  # teacher DDIM steps of a target (trailing spacing, with CFG)
    target_chunk: int = 256  # triples generated per resumable chunk
    pixel_weight: float = 0.0  # weight of the decoded-pixel MSE (0: latents only)
    # Weight of the decoded-pixel MSE over the target's shape (pixels off its background
    # colour, widened by a ``mask_dilation`` max-pool) normalised by the mask's area, as in
    # the decoder stage: a small shape's outline counts as much as a large one's (0: off).
    shape_weight: float = 0.0
    mask_dilation: int = 3  # odd window of the max-pool that widens the shape mask
    # Start from these student weights instead of the teacher copy: an exported backbone
    # folder (its student/unet.safetensors) or a .safetensors file ("": the teacher copy
    # with the step conditioning zeroed). Continues distilling a shipped student.
    init_weights: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_dilation < 1 or self.mask_dilation % 2 == 0:
            raise ValueError(f"StudentStageConfig.mask_dilation must be odd and >= 1, got {self.mask_dilation}")
        if self.shape_weight < 0 or self.pixel_weight < 0:
            raise ValueError(f"StudentStageConfig: pixel_weight={self.pixel_weight} and shape_weight="
                             f"{self.shape_weight} must be >= 0")
        if len(self.step_counts) != len(self.step_probs):
            raise ValueError(
                f"StudentStageConfig: step_counts {self.step_counts} and step_probs "
                f"{self.step_probs} need the same length"
            )
        if any(k < 1 for k in self.step_counts):
            raise ValueError(f"StudentStageConfig.step_counts must be >= 1, got {self.step_counts}")
        if self.num_targets % self.target_chunk:
            raise ValueError(
                f"StudentStageConfig.num_targets={self.num_targets} must be a multiple of "
                f"target_chunk={self.target_chunk}"
            )


@dataclasses.dataclass(frozen=True)
class UEDecoderStageConfig(DecoderStageConfig):
    """Merging-aware UE decoder: the refined decoder fine-tuned on merged, channel-noised latents.

    The split pipeline (``meg_jax.meg.pipeline``) merges the ES latent's tokens with ratio r,
    sends them over the link at some SNR and unmerges at the UE; a decoder trained only on
    clean latents sees averaged tokens and channel noise it never met. Here every sample of
    a fresh batch is encoded by the frozen encoder (posterior mean, scaled to the UNet's
    units), sent through exactly that path (``pipeline.transmit_latents``) at its own r,
    drawn uniformly from ``merge_ratios``, and its own SNR, drawn uniformly in dB over
    ``snr_db_range``, and decoded; the target is the clean image, with the decoder stage's
    loss (MSE + edge + shape-mask terms). One decoder serves every (r, SNR). The authors'
    decoder is fine-tuned the same way (r ~ U[0, 1), feature-noise sigma ~ U[0.05, 0.32]).

    The link fields must match the link the decoder will serve (the calibration's default:
    analog AWGN); the bandwidth and powers do not change what arrives, so they are not here.
    """

    # 3000 steps at 3e-4 from the refined decoder: 1000 steps at 1e-4, 1500 and 3000 at 3e-4
    # gained at every SNR (K = 4, r = 0.5), each more than the one before (docs/ue_decoder.md).
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 3e-4
    warmup_steps: int = 50
    ema_decay: float = 0.99
    checkpoint_every: int = 250
    log_every: int = 50
    seed: int = 11
    # r values a sample is drawn from (the calibration's grid = the env's action range): the
    # number of merged tokens is static in the pipeline, so each r is one branch of the step.
    merge_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    snr_db_range: tuple[float, float] = (-5.0, 30.0)  # receive SNR drawn uniformly in dB (calibration's grid ends)
    link_mode: Literal["analog", "digital"] = "analog"  # the link the decoder serves (meg_jax.meg.link)
    fading: Literal["awgn", "rayleigh"] = "awgn"  # analog channel
    bits: int = 8  # digital quantisation bits
    # Weigh each sample's gradient by (batch-mean loss / its own loss): the gradient of the
    # mean log-loss, so every sample's relative error counts alike (the loss value stays the
    # mean). Off, the noisiest samples dominate and the decoder got worse at high SNR.
    balance_samples: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.merge_ratios
        if not r or list(r) != sorted(set(r)) or not 0.0 <= r[0] <= r[-1] <= 0.75:
            raise ValueError(f"UEDecoderStageConfig.merge_ratios must be increasing values in [0, 0.75] "
                             f"(2x2 ToMe cells), got {r}")
        if len(self.snr_db_range) != 2 or not self.snr_db_range[0] <= self.snr_db_range[1]:
            raise ValueError(f"UEDecoderStageConfig.snr_db_range must be (low, high) dB with low <= high, "
                             f"got {self.snr_db_range}")

    def link(self):  # -> meg_jax.meg.link.LinkConfig (imported here: the link module is heavier)
        """The ``LinkConfig`` the latents are sent over (default bandwidth and powers)."""
        from meg_jax.meg.link import LinkConfig

        return LinkConfig(mode=self.link_mode, fading=self.fading, bits=self.bits)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the shipped teacher and student are sampled (stored in ``backbone.json``)."""

    guidance_scale: float = 3.0  # classifier-free guidance of the teacher (student: none)
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # timestep spacing
    teacher_steps: int = 50  # the reference: teacher DDIM steps
    # Width of the student's step embedding (sinusoid of the step size T/K, fed to the
    # UNet's ``timestep_cond``); equals ``UNetConfig.time_cond_proj_dim``.
    step_embedding_dim: int = 32


# ``jax.checkpoint_policies`` a UNet block may be rematerialised with (what the forward keeps).
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Precision and memory of the UNet's train steps (the defaults are the plain fp32 step).

    Parameters, EMA and optimiser state stay float32 whatever ``dtype`` says (master
    weights); ``dtype`` is what the UNet computes in (Flax casts each kernel to it at use),
    with norms, softmax, losses and gradients in float32.
    """

    dtype: Literal["float32", "bfloat16"] = "float32"  # UNet compute dtype
    # Rematerialise each UNet down/mid/up block in the backward pass with this
    # ``jax.checkpoint_policies`` policy ("none": keep every activation).
    remat: str = "none"
    # Rematerialise each UNet pass of the student's unrolled K-step rollout: the backward
    # keeps K latents instead of K passes' activations (memory ~ one pass, not K).
    rollout_remat: bool = False
    # Attention kernel: "reference" (meg_jax's matmul-softmax-matmul, the parity-tested
    # default), "chunked" (the same, 512 queries at a time, rematerialised: no whole
    # [B, H, N, N] logits) or ``jax.nn.dot_product_attention`` with "xla" or "cudnn" (GPU).
    attention: Literal["reference", "chunked", "xla", "cudnn"] = "reference"
    # Split each stage's batch into this many microbatches whose gradients are averaged
    # (a scan inside the step): same update, 1/N of the activation memory.
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ComputeConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ComputeConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ("reference", "chunked", "xla", "cudnn"):
            raise ValueError(
                f"ComputeConfig.attention must be 'reference', 'chunked', 'xla' or 'cudnn', got {self.attention!r}"
            )
        if self.grad_accum_steps < 1:
            raise ValueError(f"ComputeConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A diffusers pipeline folder as the frozen teacher, and image–caption data from disk.

    With this section on, ``python -m train.distill`` runs only the student stage: its
    teacher is the pipeline's UNet (guided at ``sampling.guidance_scale`` with the
    pipeline's own empty-prompt embedding as the unconditional branch), its text encoder
    the pipeline's CLIP, its noise schedule and prediction type the pipeline scheduler's;
    the student starts as the teacher UNet with a zero-initialised ``time_cond_proj``
    (``sampling.step_embedding_dim`` wide). ``backbone``, ``data`` and the other stages'
    sections are then not read.
    """

    teacher: str = ""  # diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)
    # Image–caption data: a folder (metadata.jsonl, or a .txt beside each image) or a glob of
    # uncompressed webdataset tar shards ("shards/*.tar").
    data: str = ""
    caption_column: str = "text"  # metadata.jsonl key of the caption
    image_column: str = "file_name"  # metadata.jsonl key of the image's file name
    # A corrupt image or a missing caption: "skip" drops it with a counted warning naming the
    # file; "raise" stops the job naming it.
    on_error: Literal["skip", "raise"] = "skip"
    resolution: int | None = None  # image side, pixels (None: the pipeline's default size)
    read_threads: int = 4  # grain threads reading + decoding images per process

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"PipelineConfig.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"PipelineConfig.resolution must be >= 1 or None, got {self.resolution}")
        if self.read_threads < 0:
            raise ValueError(f"PipelineConfig.read_threads must be >= 0, got {self.read_threads}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Everything the distillation job needs."""

    preset: str  # the preset these values came from (informational)
    backbone: BackboneConfig  # UNet, VAE and text encoder architectures, prediction type
    data: ShapesConfig = ShapesConfig()  # procedural text-to-image data
    sampling: SamplingConfig = SamplingConfig()  # guidance scale, spacing, step embedding
    classifier_model: ClassifierConfig = ClassifierConfig()  # classifier architecture + augmentation
    classifier: ClassifierStageConfig = ClassifierStageConfig()
    vae: VAEStageConfig = VAEStageConfig()
    teacher: TeacherStageConfig = TeacherStageConfig()
    student: StudentStageConfig = StudentStageConfig()
    # Optional refinements (None: skipped; ``--decoder None`` turns one off).
    decoder: DecoderStageConfig | None = None
    teacher_ft: TeacherFinetuneStageConfig | None = None
    ue_decoder: UEDecoderStageConfig | None = None  # merging-aware UE decoder (shipped beside the VAE)
    keep_checkpoints: int = 2  # orbax keeps the latest N steps per stage
    async_checkpointing: bool = True  # orbax saves in a background thread
    # Parameter layout on the mesh (replicated / fsdp, tensor-parallel axis); not part of
    # the stages' records: a run may resume with another layout.
    parallel: ParallelConfig = ParallelConfig()
    compute: ComputeConfig = ComputeConfig()  # UNet precision, remat, attention kernel, accumulation
    # A diffusers pipeline as the teacher and image–caption data (None: the procedural world;
    # any ``--pipeline.FIELD`` switches it on). Only the student stage runs then.
    pipeline: PipelineConfig | None = None

    def __post_init__(self) -> None:
        unet = self.backbone.unet
        # With a pipeline teacher the backbone is not read (the student's UNet is the pipeline's
        # with time_cond_proj_dim = step_embedding_dim).
        if self.pipeline is None and unet.time_cond_proj_dim != self.sampling.step_embedding_dim:
            raise ValueError(
                f"DistillConfig: backbone.unet.time_cond_proj_dim={unet.time_cond_proj_dim} must equal "
                f"sampling.step_embedding_dim={self.sampling.step_embedding_dim} (the student's step "
                "conditioning enters through timestep_cond)"
            )
        if self.backbone.text_encoder.max_length != self.data.max_length:
            raise ValueError(
                f"DistillConfig: backbone.text_encoder.max_length={self.backbone.text_encoder.max_length} "
                f"must equal data.max_length={self.data.max_length}"
            )
        if self.data.resolution != (self.backbone.vae.sample_size if isinstance(self.backbone.vae.sample_size, int)
                                    else self.backbone.vae.sample_size[0]):
            raise ValueError(
                f"DistillConfig: data.resolution={self.data.resolution} must equal "
                f"backbone.vae.sample_size={self.backbone.vae.sample_size}"
            )
        if self.classifier_model.data != self.data:
            raise ValueError(
                "DistillConfig: classifier_model.data must equal data (the classifier reads the same images)"
            )
        if self.student.target_steps != self.sampling.teacher_steps:
            raise ValueError(
                f"DistillConfig: student.target_steps={self.student.target_steps} must equal "
                f"sampling.teacher_steps={self.sampling.teacher_steps} (the reference the student imitates)"
            )


def _tiny() -> DistillConfig:
    backbone = dataclasses.replace(backbone_preset("tiny"), prediction_type="v_prediction")
    return DistillConfig(preset="tiny", backbone=backbone, decoder=DecoderStageConfig(),
                         teacher_ft=TeacherFinetuneStageConfig(), ue_decoder=UEDecoderStageConfig())


def _test() -> DistillConfig:
    """Seconds per stage: a handful of steps at tiny batches (for tests, not for quality)."""
    backbone = dataclasses.replace(backbone_preset("tiny"), prediction_type="v_prediction")
    small = dict(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1)
    return DistillConfig(
        preset="test",
        backbone=backbone,
        classifier=ClassifierStageConfig(**small),
        vae=VAEStageConfig(**small),
        teacher=TeacherStageConfig(**small, latent_scale_samples=16, num_latents=32, latent_chunk=16),
        decoder=DecoderStageConfig(**small),
        teacher_ft=TeacherFinetuneStageConfig(**small, num_latents=32, latent_chunk=16),
        # Two r values: each is its own merge branch of the compiled step.
        ue_decoder=UEDecoderStageConfig(**small, learning_rate=1e-3, merge_ratios=(0.0, 0.5)),
        # Two step counts, not four: each K is its own unrolled branch of the compiled student
        # step, and compilation is what a test pays for.
        student=StudentStageConfig(**small, num_targets=16, target_chunk=8, target_steps=4,
                                   step_counts=(1, 2), step_probs=(0.5, 0.5)),
        sampling=SamplingConfig(teacher_steps=4),
        keep_checkpoints=2,
    )


PRESETS = {"tiny": _tiny, "test": _test}


def preset(name: str) -> DistillConfig:
    """Named distillation configs: ``tiny`` (shipped checkpoints) and ``test`` (tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown distill preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
