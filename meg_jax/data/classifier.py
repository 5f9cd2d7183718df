"""Attribute classifier: scores prompt adherence of generated images and gives FD features.

A small CNN (about 70k parameters at the default width) reads a 32 x 32 RGB image in
[-1, 1] and predicts every attribute of ``meg_jax.data.shapes`` with one head each: size (2),
color (8), shape (4), position (9), background (8). Its penultimate activations
(:meth:`AttributeClassifier.features`, ``[B, feature_dim]``) are the features of the
Fréchet distance in the quality table (``meg_jax.metrics.frechet_distance``).

Training needs no data set: :func:`train_step` draws its batch on device from the step's key
and degrades it (:func:`augment`: blur, contrast, colour shift, Gaussian noise) so the
classifier also reads the imperfect images a few-step generator makes. It is pure and
jittable over a :class:`ClassifierTrainState` pytree, so a training harness can run it in its
own loop (``jax.jit(train_step, donate_argnums=0)``) and checkpoint the state with orbax;
:func:`train_classifier` is a plain loop for tests and scripts.

Parameters are Flax variables ``{"params": ...}`` throughout (what :func:`init_classifier`
returns and what ``model.apply`` takes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from meg_jax import metrics as metrics_lib
from meg_jax.data.shapes import ATTRIBUTE_NAMES, NUM_CLASSES, Attributes, ShapesConfig, render, sample_attributes

__all__ = [
    "ClassifierConfig",
    "AttributeClassifier",
    "ClassifierTrainState",
    "init_classifier",
    "make_optimizer",
    "create_train_state",
    "classify",
    "extract_features",
    "augment",
    "training_batch",
    "classifier_loss",
    "train_step",
    "evaluate",
    "train_classifier",
]

Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture, data and optimisation of the attribute classifier."""

    width: int = 16  # channels of the first conv; the next three have 2x, 4x, 2x
    feature_dim: int = 64  # size of the penultimate features (Fréchet distance input)
    batch_size: int = 64  # images per train step
    learning_rate: float = 5e-3  # peak Adam learning rate (cosine decay to 5% over num_steps)
    warmup_steps: int = 50  # linear warm-up of the learning rate
    num_steps: int = 600  # train steps of a full run (also the length of the lr schedule)
    seed: int = 0  # seed of initialisation and batches in train_classifier
    noise_std: float = 0.1  # augmentation: Gaussian noise std drawn per image from U(0, noise_std)
    blur: float = 1.0  # augmentation: per image, mix of a 3x3 binomial blur drawn from U(0, blur)
    contrast: float = 0.2  # augmentation: per image, scale drawn from U(1 - contrast, 1)
    color_shift: float = 0.1  # augmentation: per image and channel, offset from U(-color_shift, color_shift)
    data: ShapesConfig = ShapesConfig()  # images the classifier is trained on (sets the input size)

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "batch_size", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"ClassifierConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"ClassifierConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("noise_std", "blur", "color_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"ClassifierConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.contrast < 1:
            raise ValueError(f"ClassifierConfig.contrast must be in [0, 1), got {self.contrast}")
        if self.data.resolution % 8:
            raise ValueError(
                f"ClassifierConfig.data.resolution={self.data.resolution} must be a multiple of 8 "
                "(two poolings and a stride-2 convolution)"
            )


class AttributeClassifier(nn.Module):
    """CNN with one linear head per attribute.

    Input: the image and its distance to its own mean colour (6 channels). Two 3 x 3
    convolutions at full resolution, 2 x 2 max-pooling, a third convolution, max-pooling
    again (8 x 8 at 32 x 32 input), then two branches into one dense feature layer: the
    global max and mean of each 8 x 8 channel (what, which colours) and a stride-2
    convolution's 4 x 4 map, flattened (where).
    """

    config: ClassifierConfig

    def setup(self) -> None:
        w = self.config.width
        self.conv = [
            nn.Conv(w, (3, 3)),  # 32 x 32
            nn.Conv(2 * w, (3, 3)),  # 32 x 32, then max-pooled to 16 x 16
            nn.Conv(4 * w, (3, 3)),  # 16 x 16, then max-pooled to 8 x 8
            nn.Conv(2 * w, (3, 3), strides=2),  # 8 x 8 -> 4 x 4
        ]
        self.reduce = nn.Conv(w, (1, 1))
        self.dense = nn.Dense(self.config.feature_dim)
        self.head = {name: nn.Dense(NUM_CLASSES[name]) for name in ATTRIBUTE_NAMES}

    def features(self, images: jax.Array) -> jax.Array:
        """Penultimate activations.

        Args:
          images: [B, H, W, 3] in [-1, 1], H = W = config.data.resolution.

        Returns:
          [B, feature_dim] float32.
        """
        r = self.config.data.resolution
        if images.shape[1:] != (r, r, 3):
            raise ValueError(f"AttributeClassifier expects images [B, {r}, {r}, 3], got {images.shape}")
        # Edges of the same shape have any of 56 colour pairs, i.e. either sign in any channel;
        # distance to the image's mean colour (mostly background) shows the shape the same way
        # for all of them, so shape detectors need not be learnt once per colour pair.
        contrast = jnp.abs(images - jnp.mean(images, axis=(1, 2), keepdims=True))
        x = jnp.concatenate([images, contrast], axis=-1)
        # Two convolutions at full resolution before any downsampling: a small shape is ~6
        # pixels across, and circle, square and triangle differ in 1-pixel details (strided
        # convolutions from the start learnt the shape several times slower).
        x = nn.gelu(self.conv[0](x))
        x = nn.max_pool(nn.gelu(self.conv[1](x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.gelu(self.conv[2](x)), (2, 2), (2, 2))
        # What and which colour: the strongest and the mean response of each 8 x 8 channel,
        # wherever the shape is. Where: the 4 x 4 map, flattened.
        pooled = jnp.concatenate([jnp.max(x, axis=(1, 2)), jnp.mean(x, axis=(1, 2))], axis=-1)
        x = nn.gelu(self.reduce(nn.gelu(self.conv[3](x))))
        x = jnp.concatenate([pooled, x.reshape(x.shape[0], -1)], axis=-1)
        return nn.gelu(self.dense(x))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Logits per attribute.

        Args:
          images: [B, H, W, 3] in [-1, 1].

        Returns:
          attribute name -> [B, NUM_CLASSES[name]] logits.
        """
        feats = self.features(images)
        return {name: head(feats) for name, head in self.head.items()}


def init_classifier(config: ClassifierConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised classifier variables ``{"params": ...}``."""
    r = config.data.resolution
    return AttributeClassifier(config).init(key, jnp.zeros((1, r, r, 3), jnp.float32))


def make_optimizer(config: ClassifierConfig) -> optax.GradientTransformation:
    """Adam with linear warm-up and cosine decay to 5% of the peak over ``num_steps``."""
    warmup = min(config.warmup_steps, config.num_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=0.05 * config.learning_rate,
    )
    return optax.adam(schedule)


@struct.dataclass
class ClassifierTrainState:
    """What :func:`train_step` changes; a pytree (orbax can save it whole).

    Attributes:
      step: scalar int32, optimizer steps done.
      params: classifier variables ``{"params": ...}``.
      opt_state: optax state of :func:`make_optimizer`.
      config: the ClassifierConfig (static: the model, optimizer and data follow from it).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    config: ClassifierConfig = struct.field(pytree_node=False)


def create_train_state(config: ClassifierConfig, key: jax.Array) -> ClassifierTrainState:
    """A fresh state at step 0 with parameters initialised from ``key``."""
    params = init_classifier(config, key)
    return ClassifierTrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(config).init(params), config=config
    )


def classify(params: Variables, images: jax.Array, config: ClassifierConfig = ClassifierConfig()) -> dict[str, jax.Array]:
    """Logits per attribute of ``images`` [B, H, W, 3] (see AttributeClassifier)."""
    return AttributeClassifier(config).apply(params, images)


def extract_features(params: Variables, images: jax.Array, config: ClassifierConfig = ClassifierConfig()) -> jax.Array:
    """Penultimate features [B, feature_dim] of ``images`` [B, H, W, 3] (for a Fréchet distance)."""
    return AttributeClassifier(config).apply(params, images, method="features")


def _binomial_blur(images: jax.Array) -> jax.Array:
    """3 x 3 binomial blur ([1, 2, 1] / 4 per axis), edge pixels replicated; [B, H, W, C]."""
    x = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
    return 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]


def augment(key: jax.Array, images: jax.Array, config: ClassifierConfig) -> jax.Array:
    """Degrades clean images the way a generator might (jittable; strengths drawn per image).

    Blur (mix with a 3 x 3 blur), lower contrast, a colour shift per channel, Gaussian noise,
    in that order; the strengths come from ``config``. Colours stay apart: each channel of a
    clean image is +-1, and the worst case moves it by ``contrast + color_shift`` plus noise.

    Args:
      key: a ``jax.random`` key.
      images: [B, H, W, 3] in [-1, 1].
      config: augmentation strengths.

    Returns:
      [B, H, W, 3] float32 (may leave [-1, 1] slightly through the noise).
    """
    b = images.shape[0]
    k_blur, k_contrast, k_shift, k_sigma, k_noise = jax.random.split(key, 5)
    per_image = (b, 1, 1, 1)
    mix = jax.random.uniform(k_blur, per_image, maxval=config.blur)
    x = images + jnp.minimum(mix, 1.0) * (_binomial_blur(images) - images)
    x = x * jax.random.uniform(k_contrast, per_image, minval=1.0 - config.contrast, maxval=1.0)
    x = x + jax.random.uniform(k_shift, (b, 1, 1, 3), minval=-config.color_shift, maxval=config.color_shift)
    sigma = jax.random.uniform(k_sigma, per_image, maxval=config.noise_std)
    return x + sigma * jax.random.normal(k_noise, images.shape)


def training_batch(key: jax.Array, config: ClassifierConfig) -> tuple[jax.Array, Attributes]:
    """The augmented batch :func:`train_step` trains on for ``key``.

    Returns:
      images [batch_size, H, W, 3] float32 and their Attributes.
    """
    k_attrs, k_aug = jax.random.split(key)
    attrs = sample_attributes(k_attrs, config.batch_size)
    return augment(k_aug, render(attrs, config.data), config), attrs


def classifier_loss(
    model: nn.Module | Callable[..., Mapping[str, jax.Array]],
    params: Variables,
    images: jax.Array,
    attrs: Attributes,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over attributes of the mean softmax cross-entropy.

    Args:
      model: an AttributeClassifier, or its ``apply`` function.
      params: classifier variables ``{"params": ...}``.
      images: [B, H, W, 3] in [-1, 1].
      attrs: the true Attributes of the images.

    Returns:
      (loss, metrics): the scalar loss, and ``ce_<name>`` (cross-entropy) and ``acc_<name>``
      (batch accuracy) per attribute plus ``acc_all`` (every attribute right).
    """
    apply = model.apply if isinstance(model, nn.Module) else model
    logits = apply(params, images)
    metrics: dict[str, jax.Array] = {}
    loss = jnp.zeros((), jnp.float32)
    for name in ATTRIBUTE_NAMES:
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[name], getattr(attrs, name)))
        metrics[f"ce_{name}"] = ce
        loss = loss + ce
    accuracy = metrics_lib.attribute_accuracy(logits, attrs)
    metrics.update({f"acc_{name}": value for name, value in accuracy.items()})
    return loss, metrics


def train_step(state: ClassifierTrainState, key: jax.Array) -> tuple[ClassifierTrainState, dict[str, jax.Array]]:
    """One Adam step on a batch generated (and augmented) on device from ``key``.

    Pure; jit it once, donating the state: ``jax.jit(train_step, donate_argnums=0)``. Pass
    a different key per step (e.g. ``fold_in(base_key, step)``).

    Returns:
      The new state and metrics: ``loss``, ``grad_norm`` and those of :func:`classifier_loss`.
    """
    config = state.config
    images, attrs = training_batch(key, config)
    (loss, metrics), grads = jax.value_and_grad(classifier_loss, argnums=1, has_aux=True)(
        AttributeClassifier(config), state.params, images, attrs
    )
    tx = make_optimizer(config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}


_EVAL_CHUNK = 256  # images classified per lax.map iteration in evaluate


@functools.partial(jax.jit, static_argnums=(2, 3))
def _correct_counts(params: Variables, key: jax.Array, num: int, config: ClassifierConfig) -> dict[str, jax.Array]:
    chunk = min(num, _EVAL_CHUNK)
    num_chunks = math.ceil(num / chunk)
    model = AttributeClassifier(config)

    def counts(args: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        chunk_key, index = args
        attrs = sample_attributes(chunk_key, chunk)
        logits = model.apply(params, render(attrs, config.data))
        # Samples past ``num`` in the last chunk do not count.
        valid = index * chunk + jnp.arange(chunk) < num
        right = {n: (jnp.argmax(logits[n], -1) == getattr(attrs, n)) & valid for n in ATTRIBUTE_NAMES}
        right["all"] = jnp.all(jnp.stack([right[n] for n in ATTRIBUTE_NAMES]), axis=0)
        return {n: jnp.sum(r.astype(jnp.int32)) for n, r in right.items()}

    keys = jax.random.split(key, num_chunks)
    per_chunk = jax.lax.map(counts, (keys, jnp.arange(num_chunks)))
    return {n: jnp.sum(c) for n, c in per_chunk.items()}


def evaluate(params: Variables, key: jax.Array, num: int, config: ClassifierConfig = ClassifierConfig()) -> dict[str, float]:
    """Accuracy on ``num`` fresh, clean samples drawn from ``key``.

    Args:
      params: classifier variables ``{"params": ...}``.
      key: a ``jax.random`` key (use one the training never saw).
      num: number of samples (static; drawn in chunks of 256).
      config: the classifier's config (architecture and data).

    Returns:
      Accuracy in [0, 1] per attribute name and ``"all"`` (every attribute right).
    """
    if num < 1:
        raise ValueError(f"evaluate needs num >= 1 samples, got {num}")
    counts = jax.device_get(_correct_counts(params, key, int(num), config))
    return {name: int(c) / num for name, c in counts.items()}


def train_classifier(
    config: ClassifierConfig = ClassifierConfig(),
    key: jax.Array | None = None,
    num_steps: int | None = None,
    *,
    log_every: int = 100,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[ClassifierTrainState, list[dict[str, float]]]:
    """Trains a classifier from scratch with :func:`train_step` (for tests and scripts).

    Args:
      config: the classifier config; ``num_steps`` replaces ``config.num_steps`` when given
        (the learning-rate schedule follows it).
      key: initialisation and batch key; default ``PRNGKey(config.seed)``.
      num_steps: optimizer steps to run.
      log_every: fetch metrics to the host every this many steps (and at the last step).
      callback: called as ``callback(step, metrics)`` at each fetch.

    Returns:
      The final state and the fetched metrics (each with ``step`` and ``seconds`` since start).
    """
    if num_steps is not None:
        config = dataclasses.replace(config, num_steps=num_steps)
    if key is None:
        key = jax.random.PRNGKey(config.seed)
    init_key, data_key = jax.random.split(key)
    state = create_train_state(config, init_key)
    step_fn = jax.jit(train_step, donate_argnums=0)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(config.num_steps):
        state, metrics = step_fn(state, jax.random.fold_in(data_key, step))
        if (step + 1) % log_every == 0 or step + 1 == config.num_steps:
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            record.update(step=step + 1, seconds=time.perf_counter() - start)
            history.append(record)
            if callback is not None:
                callback(step + 1, record)
    return state, history
