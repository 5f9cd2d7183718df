"""Tests for meg_jax.backbone.tome (token merging, ToMe for SD)."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.backbone import tome


# ---------------------------------------------------------------------------------------------
# Slow NumPy reference: a literal transcription of tomesd's bipartite_soft_matching_random2d
# (unmerged src in descending-score order, as tomesd returns them), in float64.
# ---------------------------------------------------------------------------------------------
def reference_tome(metric, x, h, w, sx, sy, r, choice):
    """Returns (merged positions per batch [set], src->dst position map per batch,
    merged output in tomesd order [B, N-r, C], unmerge of that output [B, N, C],
    positions of the output's unmerged src in tomesd order [B, U])."""
    metric = np.asarray(metric, np.float64)
    x = np.asarray(x, np.float64)
    batch, n, c = x.shape
    hsy, wsx = h // sy, w // sx
    buf = np.zeros((hsy, wsx, sy * sx), np.int64)
    for i in range(hsy):
        for j in range(wsx):
            buf[i, j, choice[i, j]] = -1
    buf = buf.reshape(hsy, wsx, sy, sx).transpose(0, 2, 1, 3).reshape(hsy * sy, wsx * sx)
    full = np.zeros((h, w), np.int64)
    full[: hsy * sy, : wsx * sx] = buf
    idx = np.argsort(full.reshape(-1), kind="stable")
    num_dst = hsy * wsx
    a_idx, b_idx = idx[num_dst:], idx[:num_dst]

    merged_sets, maps, outs, unmerged, unm_positions = [], [], [], [], []
    for bi in range(batch):
        m = metric[bi] / np.linalg.norm(metric[bi], axis=-1, keepdims=True)
        scores = m[a_idx] @ m[b_idx].T
        node_max, node_idx = scores.max(-1), scores.argmax(-1)
        edge_idx = np.argsort(-node_max, kind="stable")
        unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
        dst_idx = node_idx[src_idx]

        dst = x[bi, b_idx].copy()
        count = np.ones(num_dst)
        for s, d in zip(src_idx, dst_idx):
            dst[d] += x[bi, a_idx[s]]
            count[d] += 1
        dst /= count[:, None]
        unm = x[bi, a_idx[unm_idx]]
        y = np.concatenate([unm, dst], 0)

        back = np.zeros((n, c))
        back[b_idx] = dst
        back[a_idx[unm_idx]] = unm
        back[a_idx[src_idx]] = dst[dst_idx]

        merged_sets.append(set(a_idx[src_idx].tolist()))
        maps.append({int(a_idx[s]): int(b_idx[d]) for s, d in zip(src_idx, dst_idx)})
        outs.append(y)
        unmerged.append(back)
        unm_positions.append(a_idx[unm_idx])
    return merged_sets, maps, np.stack(outs), np.stack(unmerged), np.stack(unm_positions)


@functools.partial(jax.jit, static_argnames=("h", "w", "num_merge", "sx", "sy"))
def _plan_merge_unmerge(x, metric, key, *, h, w, num_merge, sx=2, sy=2):
    """One compiled call per case (eager dispatch would compile every small op separately)."""
    plan = tome.compute_merge(metric, h, w, num_merge, sx, sy, key)
    y = tome.merge(x, plan)
    return plan, y, tome.unmerge(y, plan)


def _choice(key, h, w, sx, sy):
    """The per-cell dst index the library draws from ``key`` (top-left when key is None)."""
    if key is None:
        return np.zeros((h // sy, w // sx), np.int64)
    return np.asarray(jax.random.randint(key, (h // sy, w // sx), 0, sy * sx, dtype=jnp.int32))


# (batch, h, w, channels, ratio, sx, sy, random dst)
REFERENCE_CASES = [
    (2, 4, 4, 8, 0.5, 2, 2, True),
    (1, 4, 4, 8, 0.75, 2, 2, False),
    (3, 8, 8, 16, 0.3, 2, 2, True),
    (2, 5, 7, 6, 0.4, 2, 2, True),  # grid not divisible: last row/column stay src
    (2, 6, 6, 5, 0.6, 3, 2, True),  # non-square cell
    (1, 9, 6, 4, 0.8, 3, 3, False),
    (4, 16, 16, 4, 0.5, 2, 2, True),  # C = 4 as for transmitted latents
]


@pytest.mark.parametrize("batch,h,w,c,ratio,sx,sy,rand", REFERENCE_CASES)
def test_matches_numpy_reference(batch, h, w, c, ratio, sx, sy, rand):
    key = jax.random.PRNGKey(batch * 1000 + h * 10 + w) if rand else None
    kx, km = jax.random.split(jax.random.PRNGKey(h * w + c))
    x = jax.random.normal(kx, (batch, h * w, c))
    metric = jax.random.normal(km, (batch, h * w, c + 3))
    r = tome.num_merged(h * w, ratio, sx, sy, h, w)
    assert r == math.floor(ratio * h * w)

    plan, y, back = _plan_merge_unmerge(x, metric, key, h=h, w=w, num_merge=r, sx=sx, sy=sy)
    y, back = np.asarray(y), np.asarray(back)

    sets, maps, y_ref, back_ref, unm_pos_ref = reference_tome(
        metric, x, h, w, sx, sy, r, _choice(key, h, w, sx, sy)
    )
    slot = np.asarray(plan.slot)
    keep_pos = np.asarray(plan.keep_pos)
    num_unm = h * w - r - (h // sy) * (w // sx)
    for bi in range(batch):
        # Exactly the same tokens merged, each into the same dst.
        assert set(np.asarray(plan.src_pos)[bi].tolist()) == sets[bi]
        got_map = {
            int(s): int(keep_pos[bi, slot[bi, s]]) for s in np.asarray(plan.src_pos)[bi]
        }
        assert got_map == maps[bi]
        # Same unmerged src; ours are in ascending position order, tomesd's in score order.
        np.testing.assert_array_equal(keep_pos[bi, :num_unm], np.sort(unm_pos_ref[bi]))
        reorder = np.argsort(unm_pos_ref[bi])
        y_ref_sorted = np.concatenate([y_ref[bi, :num_unm][reorder], y_ref[bi, num_unm:]], 0)
        np.testing.assert_allclose(y[bi], y_ref_sorted, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back, back_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h,w,ratio,sx,sy", [(8, 8, 0.5, 2, 2), (6, 9, 0.6, 3, 3), (7, 5, 0.3, 2, 2)])
def test_unmerge_of_merge_is_x_or_dst_mean(h, w, ratio, sx, sy):
    batch, c = 3, 5
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, h * w, c))
    r = tome.num_merged(h * w, ratio, sx, sy, h, w)
    plan, y, back = _plan_merge_unmerge(x, x, jax.random.PRNGKey(4), h=h, w=w, num_merge=r, sx=sx, sy=sy)
    back = np.asarray(back)
    xn = np.asarray(x, np.float64)
    slot = np.asarray(plan.slot)
    for bi in range(batch):
        for s in range(y.shape[1]):
            members = np.flatnonzero(slot[bi] == s)  # the kept token and what merged into it
            expected = xn[bi, members].mean(0)
            for p in members:
                np.testing.assert_allclose(back[bi, p], expected, rtol=1e-6, atol=1e-6)
            if len(members) == 1:  # no token merged here: exactly x
                np.testing.assert_array_equal(back[bi, members[0]], np.asarray(x)[bi, members[0]])
    # Every position belongs to exactly one output token; r positions were merged away.
    assert sum(len(set(slot[bi])) for bi in range(batch)) == batch * y.shape[1]


def test_ratio_zero_is_identity():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 7))
    for ratio in (0.0, 0.01):  # floor(0.01 * 64) = 0 as well
        y, plan = tome.merge_tokens(x, 8, 8, ratio, key=jax.random.PRNGKey(1))
        assert plan.num_merged == 0
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(tome.unmerge(y, plan)), np.asarray(x))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75])
@pytest.mark.parametrize("h,w", [(2, 2), (4, 4), (8, 8), (5, 6), (16, 12)])
def test_output_token_count(ratio, h, w):
    # Shapes are static: abstract evaluation (no compile) gives them.
    n = h * w
    x = jax.ShapeDtypeStruct((2, n, 3), jnp.float32)

    def roundtrip(x, key):
        y, plan = tome.merge_tokens(x, h, w, ratio, key=key)
        return y, tome.unmerge(y, plan)

    y, back = jax.eval_shape(roundtrip, x, jax.random.PRNGKey(0))
    assert y.shape == (2, n - math.floor(ratio * n), 3)
    assert back.shape == (2, n, 3)


def test_one_compile_per_shape_and_ratio():
    @functools.partial(jax.jit, static_argnums=(2,))
    @chex.assert_max_traces(n=3)
    def roundtrip(x, key, ratio):
        y, plan = tome.merge_tokens(x, 8, 8, ratio, key=key)
        return y, tome.unmerge(y, plan)

    for ratio in (0.3, 0.5, 0.3, 0.5):
        for seed in range(3):  # new data and keys reuse the compiled function
            x = jax.random.normal(jax.random.PRNGKey(seed), (2, 64, 4))
            roundtrip(x, jax.random.PRNGKey(seed + 10), ratio)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 4))  # a new batch size: one more trace
    roundtrip(x, jax.random.PRNGKey(0), 0.3)
    with pytest.raises(AssertionError):  # a fourth (shape, ratio) would trace again
        roundtrip(x, jax.random.PRNGKey(0), 0.5)


def test_key_determinism():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 8))

    plan_of = jax.jit(lambda key: tome.merge_tokens(x, 16, 16, 0.5, key=key)[1])

    def dst_positions(key):
        plan = plan_of(key)
        return np.asarray(plan.keep_pos[:, -64:])  # the 64 dst of a 16x16 grid

    a = plan_of(jax.random.PRNGKey(7))
    b = plan_of(jax.random.PRNGKey(7))
    for field in ("keep_pos", "src_pos", "src_slot", "slot"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    # The dst partition is shared by the batch (as in tomesd).
    d7 = dst_positions(jax.random.PRNGKey(7))
    np.testing.assert_array_equal(d7[0], d7[1])
    # Another key moves dst in most of the 64 cells (each stays put with probability 1/4).
    d8 = dst_positions(jax.random.PRNGKey(8))
    assert len(set(d7[0].tolist()) - set(d8[0].tolist())) > 16
    # No key: top-left of every cell, deterministic.
    top_left = sorted(2 * i * 16 + 2 * j for i in range(8) for j in range(8))
    np.testing.assert_array_equal(dst_positions(None)[0], top_left)


def test_ratio_cap_raises_with_max():
    with pytest.raises(ValueError, match="0.75"):
        tome.num_merged(64, 0.8)
    with pytest.raises(ValueError, match="0.75"):
        tome.merge_tokens(jnp.zeros((1, 64, 2)), 8, 8, 0.76)
    with pytest.raises(ValueError, match="0.888889"):
        tome.ToMeConfig(ratio=0.9, sx=3, sy=3)
    with pytest.raises(ValueError, match="ratio"):
        tome.ToMeConfig(ratio=-0.1)
    assert tome.num_merged(64, 0.75) == 48  # the cap itself is allowed
    assert tome.ToMeConfig(ratio=8 / 9, sx=3, sy=3).ratio == pytest.approx(8 / 9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="h \\* w"):
        tome.compute_merge(jnp.zeros((1, 10, 2)), 3, 3, 1)
    with pytest.raises(ValueError, match="num_merge must be in \\[0, 12\\]"):
        tome.compute_merge(jnp.zeros((1, 16, 2)), 4, 4, 13)
    with pytest.raises(ValueError, match="max_downsample"):
        tome.ToMeConfig(max_downsample=0)
    metric = jax.ShapeDtypeStruct((1, 16, 2), jnp.float32)
    plan = jax.eval_shape(lambda m: tome.compute_merge(m, 4, 4, 4), metric)
    with pytest.raises(ValueError, match="merge expects"):
        jax.eval_shape(tome.merge, jax.ShapeDtypeStruct((1, 15, 2), jnp.float32), plan)
    # A grid without a whole cell has nothing to merge into: r = 0.
    assert tome.num_merged(5, 0.5, h=1, w=5) == 0


def test_hand_computed_2x2():
    # 2x2 grid, no key: dst = top-left (position 0), src = positions 1, 2, 3.
    # Tokens (C = 2): p0 = (1, 0), p1 = (2, 0), p2 = (0, 3), p3 = (1, 1).
    # Cosine similarity of each src to the dst p0: p1 -> 1, p2 -> 0, p3 -> 1/sqrt(2) = 0.707.
    # ratio 0.5: r = floor(0.5 * 4) = 2 -> the two best src, p1 and p3, merge into p0.
    # New dst = mean(p0, p1, p3) = ((1 + 2 + 1) / 3, (0 + 0 + 1) / 3) = (4/3, 1/3).
    # Output [unmerged src ‖ dst] = [p2, dst] = [(0, 3), (4/3, 1/3)].
    # Unmerge: p0, p1, p3 <- (4/3, 1/3); p2 <- (0, 3).
    x = jnp.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    y, plan = tome.merge_tokens(x, 2, 2, 0.5)
    np.testing.assert_allclose(np.asarray(y), [[[0.0, 3.0], [4 / 3, 1 / 3]]], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(tome.unmerge(y, plan)),
        [[[4 / 3, 1 / 3], [4 / 3, 1 / 3], [0.0, 3.0], [4 / 3, 1 / 3]]],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(plan.slot), [[1, 1, 0, 1]])
    # Side info: 4 dst choices for the one cell x C(3, 2) = 3 merged sets x 1**2 dst maps
    # = 12 plans -> ceil(log2 12) = 4 bits; with the known top-left dst: 3 plans -> 2 bits.
    assert tome.side_info_bits(2, 2, 2) == 4
    assert tome.side_info_bits(2, 2, 2, use_rand=False) == 2


def test_side_info_bits():
    assert tome.side_info_bits(8, 8, 0) == 0
    # 8x8, r = 32: 16 cells x 2 bits + log2 C(48, 32) + 32 x log2(16) = 32 bits + ... exactly:
    expected = math.ceil(math.log2(4**16 * math.comb(48, 32) * 16**32))
    assert tome.side_info_bits(8, 8, 32) == expected
    # Never more than a naive code: per src one "merged" bit + 4 bits of dst index, 2 bits per cell.
    assert tome.side_info_bits(8, 8, 32) <= 48 + 32 * 4 + 16 * 2


def test_bfloat16_and_jit():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 16))
    key = jax.random.PRNGKey(5)
    ref, plan = tome.merge_tokens(x, 8, 8, 0.5, key=key)

    @jax.jit
    def run(xb):
        plan_b = tome.compute_merge(x, 8, 8, 32, key=key)  # same metric, same plan
        return tome.merge(xb, plan_b)

    y = run(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
    back = tome.unmerge(y, plan)
    assert back.dtype == jnp.bfloat16 and back.shape == x.shape


def test_config_applies():
    cfg = tome.ToMeConfig(ratio=0.5, max_downsample=2)
    assert cfg.applies(64 * 64, 64 * 64)
    assert cfg.applies(32 * 32, 64 * 64)  # one downsample
    assert not cfg.applies(16 * 16, 64 * 64)
    assert not tome.ToMeConfig(ratio=0.0).applies(64 * 64, 64 * 64)
