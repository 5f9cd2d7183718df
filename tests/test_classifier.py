"""Tests of the attribute classifier (meg_jax.data.classifier)."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import config as config_lib
from meg_jax import metrics
from meg_jax.data import classifier as clf
from meg_jax.data import shapes
from meg_jax.data.classifier import ClassifierConfig

# Small and quick for the CPU (the default config's run is measured separately); this one
# has to learn every attribute to prove the pipeline learns. 300 steps of 32 images.
TEST_CONFIG = ClassifierConfig(batch_size=32, warmup_steps=0, num_steps=300, learning_rate=6e-3)
STEP_CONFIG = dataclasses.replace(TEST_CONFIG, batch_size=16)

# Compile once per config and shape, and never run op by op (eager JAX is slow on CPU).
_init = jax.jit(clf.init_classifier, static_argnums=0)
_training_batch = jax.jit(clf.training_batch, static_argnums=1)


@functools.partial(jax.jit, static_argnums=3)
def _loss(params, images, attrs, config):
    return clf.classifier_loss(clf.AttributeClassifier(config), params, images, attrs)


@pytest.fixture(scope="module")
def trained():
    state, history = clf.train_classifier(TEST_CONFIG, jax.random.PRNGKey(0), log_every=100)
    return state, history


def test_model_outputs_and_size():
    init = functools.partial(clf.init_classifier, ClassifierConfig())
    params = jax.eval_shape(init, jax.random.key(0))  # shapes only, nothing compiled
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    logits = jax.eval_shape(functools.partial(clf.classify, config=ClassifierConfig()), params, images)
    assert {k: v.shape for k, v in logits.items()} == {
        "size": (3, 2),
        "color": (3, 8),
        "shape": (3, 4),
        "position": (3, 9),
        "background": (3, 8),
    }
    assert jax.eval_shape(clf.extract_features, params, images).shape == (3, 64)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    assert 20_000 < num_params < 100_000, num_params
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        jax.eval_shape(clf.classify, params, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))


def test_loss_of_uniform_logits_is_the_sum_of_log_class_counts():
    params = jax.tree.map(jnp.zeros_like, _init(STEP_CONFIG, jax.random.key(0)))
    images, attrs = _training_batch(jax.random.key(1), STEP_CONFIG)
    loss, m = _loss(params, images, attrs, STEP_CONFIG)
    # Zero weights -> zero logits -> cross-entropy ln(K) per head:
    # ln 2 + ln 8 + ln 4 + ln 9 + ln 8 = 0.6931 + 2.0794 + 1.3863 + 2.1972 + 2.0794 = 8.4355.
    np.testing.assert_allclose(float(loss), 8.4355, atol=1e-4)
    np.testing.assert_allclose(float(m["ce_position"]), math.log(9), atol=1e-5)
    assert set(m) >= {"acc_size", "acc_color", "acc_shape", "acc_position", "acc_background", "acc_all"}


def test_one_train_step_reduces_the_loss_and_compiles_once():
    config = STEP_CONFIG
    params = _init(config, jax.random.key(0))
    state = clf.ClassifierTrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=clf.make_optimizer(config).init(params), config=config
    )
    key = jax.random.key(1)
    images, attrs = _training_batch(key, config)
    loss_before, _ = _loss(state.params, images, attrs, config)
    step = jax.jit(chex.assert_max_traces(clf.train_step, n=1), donate_argnums=0)
    state, m = step(state, key)  # trains on exactly the batch above
    loss_after, _ = _loss(state.params, images, attrs, config)
    assert float(loss_after) < float(loss_before)
    np.testing.assert_allclose(float(m["loss"]), float(loss_before), rtol=1e-5)
    for i in range(2):
        state, m = step(state, jax.random.fold_in(key, i))
    assert int(state.step) == 3
    chex.assert_tree_all_finite((state.params, m))


def test_batches_are_deterministic_and_augmented():
    config = STEP_CONFIG
    a, attrs_a = _training_batch(jax.random.key(3), config)
    b, attrs_b = _training_batch(jax.random.key(3), config)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    chex.assert_trees_all_equal(attrs_a, attrs_b)
    c, _ = _training_batch(jax.random.key(4), config)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.5

    @functools.partial(jax.jit, static_argnums=2)
    def clean_and_augmented(key, attrs, config):
        clean = shapes.render(attrs, config.data)
        return clean, clf.augment(key, clean, config)

    clean, augmented = clean_and_augmented(jax.random.key(3), attrs_a, config)
    assert 0.01 < float(jnp.abs(augmented - clean).mean()) < 0.3
    # Zero strengths: the augmentation is the identity.
    off = dataclasses.replace(config, noise_std=0.0, blur=0.0, contrast=0.0, color_shift=0.0)
    clean, same = clean_and_augmented(jax.random.key(3), attrs_a, off)
    np.testing.assert_allclose(np.asarray(same), np.asarray(clean), atol=1e-6)


def test_short_training_reaches_high_accuracy(trained):
    state, history = trained
    assert int(state.step) == TEST_CONFIG.num_steps
    assert history[-1]["loss"] < history[0]["loss"]
    acc = clf.evaluate(state.params, jax.random.key(12345), 512, TEST_CONFIG)
    # Measured at these settings: 1.0 for everything on these 512 samples, 0.997 all-right on
    # 4096 others (the shape learns last); the margin allows other CPUs' float rounding.
    for name in shapes.ATTRIBUTE_NAMES:
        assert acc[name] >= 0.98, acc
    assert acc["all"] >= 0.95, acc
    assert acc["all"] <= min(acc[n] for n in shapes.ATTRIBUTE_NAMES)


def test_evaluate_counts_exactly_num_samples(trained):
    state, _ = trained
    # 300 samples = one chunk of 256 and 44 of a second chunk of 256 (the rest masked).
    n = 300
    key = jax.random.key(99)
    got = clf.evaluate(state.params, key, n, TEST_CONFIG)

    @jax.jit
    def by_hand(params, key):
        keys = jax.random.split(key, 2)
        attrs = [shapes.sample_attributes(k, 256) for k in keys]
        attrs = jax.tree.map(lambda a, b: jnp.concatenate([a, b])[:n], *attrs)
        logits = clf.classify(params, shapes.render(attrs, TEST_CONFIG.data), TEST_CONFIG)
        correct = {k: jnp.argmax(v, -1) == getattr(attrs, k) for k, v in logits.items()}
        # Near-ties: samples whose two largest logits are within 1e-3. This program (one batch
        # of 300) and evaluate's (chunks of 256) round differently, by ~1e-6 relative on these
        # O(1-10) logits, so an argmax can flip only where the margin is below ~1e-5: 1e-3 is
        # a 100x safe bound, and outside it both programs must classify alike.
        ties = {k: -jnp.diff(jax.lax.top_k(v, 2)[0], axis=-1)[:, 0] < 1e-3 for k, v in logits.items()}
        correct["all"] = jnp.all(jnp.stack([correct[k] for k in logits]), axis=0)
        ties["all"] = jnp.any(jnp.stack([ties[k] for k in logits]), axis=0)
        return ({k: jnp.sum(c) for k, c in correct.items()}, {k: jnp.sum(t) for k, t in ties.items()})

    want, ties = jax.device_get(by_hand(state.params, key))
    assert set(got) == set(want)
    for name, count in want.items():
        # evaluate returns count / 300 as a Python float; compare the counts as integers (a
        # float32 mean of 298 ones is not 298/300 in float64, hence no float equality here)
        got_count = got[name] * n
        assert abs(got_count - round(got_count)) < 1e-9, (name, got[name])  # a whole count / 300
        assert abs(round(got_count) - int(count)) <= int(ties[name]), (name, got_count, count, ties[name])
    with pytest.raises(ValueError, match="num"):
        clf.evaluate(state.params, key, 0, TEST_CONFIG)


def test_features_separate_real_from_degraded_images(trained):
    state, _ = trained
    config = TEST_CONFIG

    @jax.jit
    def features(params, key):
        k1, k2, k3 = jax.random.split(key, 3)
        real_a = shapes.render(shapes.sample_attributes(k1, 512), config.data)
        real_b = shapes.render(shapes.sample_attributes(k2, 512), config.data)
        noisy = real_b + 0.5 * jax.random.normal(k3, real_b.shape)
        return [clf.extract_features(params, x, config) for x in (real_a, real_b, noisy)]

    feats = features(state.params, jax.random.key(7))
    same = metrics.frechet_distance(feats[0], feats[1])
    degraded = metrics.frechet_distance(feats[0], feats[2])
    assert degraded > 5 * same, (same, degraded)


def test_config_round_trip_and_validation():
    config = ClassifierConfig(width=8, data=shapes.ShapesConfig(jitter=0.1))
    assert config_lib.from_dict(ClassifierConfig, config_lib.to_dict(config)) == config
    with pytest.raises(ValueError, match="width"):
        ClassifierConfig(width=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        ClassifierConfig(data=shapes.ShapesConfig(resolution=36))
    with pytest.raises(ValueError, match="contrast"):
        ClassifierConfig(contrast=1.0)
