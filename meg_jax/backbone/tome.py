"""Token merging (ToMe for Stable Diffusion) with static shapes, so it jits.

One implementation serves two uses:

* inside the UNet's self-attention (compute): merge the block's tokens before ``attn1`` and
  unmerge its output after, with the ``ToMeConfig`` knobs ``ratio``, ``max_downsample``,
  ``sx``, ``sy``;
* on transmitted latent features (bandwidth): :func:`merge_tokens` returns the merged tokens
  and the :class:`MergePlan` a receiver needs to unmerge, and :func:`side_info_bits` counts
  what sending that plan costs.

Algorithm (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPRW 2023;
``tomesd.merge.bipartite_soft_matching_random2d``):

1. Tile the ``h x w`` token grid into ``sy x sx`` cells. In each whole cell one token is a
   destination (dst) — a random one per cell drawn from an explicit key, or the top-left one
   when no key is given; the others are sources (src). Tokens outside whole cells stay src.
2. Cosine similarity between every src and every dst token on the ``metric`` features.
3. Each src picks its most similar dst; the ``r`` src with the highest such score are merged.
4. ``merge``: each dst becomes the plain mean of itself and the src merged into it; output is
   ``[unmerged src ‖ dst]`` with ``N - r`` tokens.
5. ``unmerge``: each dst value goes back to its own position and to those of the src merged
   into it; unmerged src return to their positions.

One deliberate ordering choice differs from ``tomesd``: inside the output, unmerged src and
dst are each in ascending position (raster) order, whereas ``tomesd`` orders unmerged src by
descending score. The merged set and every value are the same; only the permutation of the
``unm`` block differs, which a self-attention cannot see (it has no positional terms), and a
canonical order means a receiver needs no permutation as side information.

All shapes are static given ``(B, h, w, C, r, sx, sy)``: the number merged ``r`` is a Python
int (:func:`num_merged`), selection uses ``argsort``/gathers, the mean uses a scatter-add with
counts. ``ratio == 0`` (``r == 0``) is the exact identity.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

__all__ = [
    "ToMeConfig",
    "MergePlan",
    "max_ratio",
    "num_merged",
    "compute_merge",
    "merge",
    "unmerge",
    "merge_tokens",
    "side_info_bits",
]

# Tolerance on the ratio cap so that a decimal written out by hand (e.g. 0.8888888888888888
# for sx = sy = 3) is accepted; r is capped at the number of src anyway.
_RATIO_TOL = 1e-9


def max_ratio(sx: int = 2, sy: int = 2) -> float:
    """Largest merge ratio for a ``sy x sx`` destination stride: ``1 - 1/(sx*sy)``."""
    _check_stride(sx, sy)
    return 1.0 - 1.0 / (sx * sy)


def _check_stride(sx: int, sy: int) -> None:
    if not (isinstance(sx, int) and isinstance(sy, int)) or sx < 1 or sy < 1:
        raise ValueError(f"ToMe strides sx, sy must be positive ints, got sx={sx!r}, sy={sy!r}")


def _check_ratio(ratio: float, sx: int, sy: int) -> None:
    cap = max_ratio(sx, sy)
    if not 0.0 <= ratio <= cap + _RATIO_TOL:
        raise ValueError(
            f"ToMe ratio must be in [0, 1 - 1/(sx*sy)] = [0, {cap:.6g}] for sx={sx}, sy={sy} "
            f"(one token per cell stays a destination); got ratio={ratio!r}"
        )


@dataclasses.dataclass(frozen=True)
class ToMeConfig:
    """Token-merging settings for the UNet's self-attention (ToMe for SD)."""

    # Fraction of a block's tokens merged away before self-attention, 0 <= ratio <= 1 - 1/(sx*sy).
    ratio: float = 0.0
    # Merge only in blocks with at least latent_tokens / max_downsample**2 tokens
    # (1: only the full-resolution blocks; 2: also the blocks one downsample below; ...).
    max_downsample: int = 1
    # Destination stride along x (width): one dst per sx-wide cell.
    sx: int = 2
    # Destination stride along y (height): one dst per sy-tall cell.
    sy: int = 2
    # True: a random dst per cell from an explicit key; False: the top-left token (deterministic).
    use_rand: bool = True

    def __post_init__(self) -> None:
        _check_stride(self.sx, self.sy)
        _check_ratio(self.ratio, self.sx, self.sy)
        if not isinstance(self.max_downsample, int) or self.max_downsample < 1:
            raise ValueError(
                f"ToMeConfig.max_downsample must be an int >= 1, got {self.max_downsample!r}"
            )

    def applies(self, num_tokens: int, latent_tokens: int) -> bool:
        """Whether a block with ``num_tokens`` tokens merges, for a latent of ``latent_tokens``.

        Args:
          num_tokens: tokens in the block's feature map (``h * w``).
          latent_tokens: tokens of the UNet's input latent (``H * W``).
        """
        return self.ratio > 0 and num_tokens * self.max_downsample**2 >= latent_tokens


@flax.struct.dataclass
class MergePlan:
    """Which token goes where: everything ``merge`` and ``unmerge`` need, with static shapes.

    ``B`` batch, ``N`` input tokens, ``r`` merged tokens, ``M = N - r`` output tokens, of which
    the first ``U = N_src - r`` are the unmerged src (ascending position) and the last
    ``N_dst`` the dst (ascending position). All arrays are int32.

    A receiver needs only ``slot`` to unmerge; the other fields serve ``merge``.

    Attributes:
      keep_pos: ``[B, M]`` input position of each output token (unmerged src, then dst).
      src_pos: ``[B, r]`` input positions of the merged src (ascending).
      src_slot: ``[B, r]`` output index (``U + dst index``) each merged src is averaged into.
      slot: ``[B, N]`` output index each input token ends up in (its own for kept tokens,
        its dst's for merged src); ``unmerge`` is a gather by this index.
    """

    keep_pos: jax.Array
    src_pos: jax.Array
    src_slot: jax.Array
    slot: jax.Array

    @property
    def num_tokens(self) -> int:
        """``N``, the number of tokens before merging (static)."""
        return self.slot.shape[1]

    @property
    def num_merged(self) -> int:
        """``r``, the number of tokens merged away (static)."""
        return self.src_pos.shape[1]


def _grid_counts(h: int, w: int, sx: int, sy: int) -> tuple[int, int]:
    """(number of dst, number of src) for an ``h x w`` grid and ``sy x sx`` cells."""
    num_dst = (h // sy) * (w // sx)
    return num_dst, h * w - num_dst


def num_merged(
    num_tokens: int,
    ratio: float,
    sx: int = 2,
    sy: int = 2,
    h: int | None = None,
    w: int | None = None,
) -> int:
    """Number of tokens merged away, ``r = floor(ratio * N)`` capped at the number of src.

    Args:
      num_tokens: ``N``, tokens before merging.
      ratio: fraction merged, ``0 <= ratio <= 1 - 1/(sx*sy)``.
      sx, sy: destination stride (cell width and height in tokens).
      h, w: the token grid; needed for the exact src count when the grid does not tile into
        whole cells. Without them the grid is assumed to tile (``N // (sx*sy)`` dst).

    Returns:
      ``r`` as a Python int (static). 0 when the grid holds no whole cell (nothing to merge
      into).

    Raises:
      ValueError: ratio outside ``[0, 1 - 1/(sx*sy)]`` (the message gives the max), or
        ``h * w != num_tokens``.
    """
    _check_stride(sx, sy)
    _check_ratio(ratio, sx, sy)
    if (h is None) != (w is None):
        raise ValueError(f"give both h and w or neither, got h={h!r}, w={w!r}")
    if h is not None and w is not None:
        if h * w != num_tokens:
            raise ValueError(f"h * w = {h}*{w} = {h * w} must equal num_tokens = {num_tokens}")
        num_dst, num_src = _grid_counts(h, w, sx, sy)
    else:
        num_dst = num_tokens // (sx * sy)
        num_src = num_tokens - num_dst
    if num_dst == 0:
        return 0
    # int(N * ratio) as tomesd computes it (floor for non-negative values).
    return min(math.floor(ratio * num_tokens), num_src)


def _identity_plan(batch: int, n: int) -> MergePlan:
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    empty = jnp.zeros((batch, 0), jnp.int32)
    return MergePlan(keep_pos=pos, src_pos=empty, src_slot=empty, slot=pos)


def _partition(h: int, w: int, sx: int, sy: int, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Splits grid positions into (dst positions [N_dst], src positions [N_src]), each ascending."""
    hsy, wsx = h // sy, w // sx
    if key is None:
        choice = jnp.zeros((hsy, wsx), jnp.int32)  # top-left of every cell
    else:
        choice = jax.random.randint(key, (hsy, wsx), 0, sy * sx, dtype=jnp.int32)
    # Index k inside a cell is row k // sx, column k % sx (tomesd's (sy, sx) view of the cell).
    rows = jnp.arange(hsy, dtype=jnp.int32)[:, None] * sy + choice // sx
    cols = jnp.arange(wsx, dtype=jnp.int32)[None, :] * sx + choice % sx
    is_dst = jnp.zeros((h, w), jnp.int32).at[rows, cols].set(1).reshape(-1)
    # Stable sort on (1 - is_dst): dst first, then src, each in ascending position.
    order = jnp.argsort(1 - is_dst, stable=True).astype(jnp.int32)
    num_dst = hsy * wsx
    return order[:num_dst], order[num_dst:]


def compute_merge(
    metric: jax.Array,
    h: int,
    w: int,
    num_merge: int,
    sx: int = 2,
    sy: int = 2,
    key: jax.Array | None = None,
) -> MergePlan:
    """Bipartite soft matching with 2-D destinations: decides which tokens merge where.

    Args:
      metric: ``[B, N, C]`` features compared by cosine similarity (any float dtype; the
        similarity is computed in float32), ``N = h * w`` in raster (row-major) order.
      h, w: token grid height and width.
      num_merge: ``r``, tokens to merge away (static; see :func:`num_merged`).
      sx, sy: destination stride: one dst per ``sy x sx`` cell.
      key: PRNG key for the random dst per cell (shared by the batch, as in tomesd);
        ``None`` picks each cell's top-left token.

    Returns:
      The :class:`MergePlan`; ``num_merge == 0`` gives the identity plan.

    Raises:
      ValueError: bad shapes, or ``num_merge`` outside ``[0, number of src]``.
    """
    _check_stride(sx, sy)
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {metric.shape}")
    batch, n, _ = metric.shape
    if h * w != n:
        raise ValueError(f"h * w = {h}*{w} = {h * w} must equal the token count N = {n}")
    num_dst, num_src = _grid_counts(h, w, sx, sy)
    max_merge = num_src if num_dst > 0 else 0
    if not 0 <= num_merge <= max_merge:
        raise ValueError(
            f"num_merge must be in [0, {max_merge}] (number of src tokens of a {h}x{w} grid "
            f"with sx={sx}, sy={sy}), got {num_merge}; use num_merged() to get it from a ratio"
        )
    if num_merge == 0:
        return _identity_plan(batch, n)

    dst_pos, src_pos_all = _partition(h, w, sx, sy, key)

    m = metric.astype(jnp.float32)
    # Cosine similarity; the floor keeps an all-zero token finite (it then scores 0 everywhere).
    m = m * jax.lax.rsqrt(jnp.maximum(jnp.sum(m * m, axis=-1, keepdims=True), 1e-12))
    a = m[:, src_pos_all]  # [B, N_src, C]
    b = m[:, dst_pos]  # [B, N_dst, C]
    scores = jnp.einsum("bsc,bdc->bsd", a, b)
    best_dst = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, N_src]
    best_score = jnp.max(scores, axis=-1)

    # Top-r src by score (ties: lower position first). Then a stable sort on the merged flag
    # puts the unmerged src in ascending position order, followed by the merged ones.
    rank = jnp.argsort(-best_score, axis=-1, stable=True)
    merged = jnp.zeros((batch, num_src), jnp.int32)
    merged = merged.at[jnp.arange(batch)[:, None], rank[:, :num_merge]].set(1)
    order = jnp.argsort(merged, axis=-1, stable=True).astype(jnp.int32)  # [B, N_src]
    num_unm = num_src - num_merge
    unm_idx, src_idx = order[:, :num_unm], order[:, num_unm:]

    unm_pos = src_pos_all[unm_idx]  # [B, U]
    src_pos = src_pos_all[src_idx]  # [B, r]
    src_slot = num_unm + jnp.take_along_axis(best_dst, src_idx, axis=1)  # [B, r]
    keep_pos = jnp.concatenate([unm_pos, jnp.broadcast_to(dst_pos, (batch, num_dst))], axis=1)

    rows = jnp.arange(batch)[:, None]
    out_idx = jnp.broadcast_to(jnp.arange(n - num_merge, dtype=jnp.int32), (batch, n - num_merge))
    slot = jnp.zeros((batch, n), jnp.int32)
    slot = slot.at[rows, keep_pos].set(out_idx).at[rows, src_pos].set(src_slot)
    return MergePlan(keep_pos=keep_pos, src_pos=src_pos, src_slot=src_slot, slot=slot)


def _check_plan_input(x: jax.Array, plan: MergePlan, n: int, what: str) -> None:
    if x.ndim != 3 or x.shape[0] != plan.slot.shape[0] or x.shape[1] != n:
        raise ValueError(
            f"{what} expects [B={plan.slot.shape[0]}, {n}, C] for this plan, got shape {x.shape}"
        )


def merge(x: jax.Array, plan: MergePlan) -> jax.Array:
    """Merges tokens by ``plan``: each dst becomes the mean of itself and its merged src.

    Args:
      x: ``[B, N, C]`` tokens (any C and float dtype; the mean is taken in float32).
      plan: from :func:`compute_merge` for the same ``B`` and ``N``.

    Returns:
      ``[B, N - r, C]``: unmerged src (ascending position) then dst (ascending position);
      ``x`` itself when ``r == 0``.
    """
    _check_plan_input(x, plan, plan.num_tokens, "merge")
    if plan.num_merged == 0:
        return x
    batch, _, c = x.shape
    rows = jnp.arange(batch)[:, None]
    kept = x[rows, plan.keep_pos].astype(jnp.float32)  # [B, M, C]
    src = x[rows, plan.src_pos].astype(jnp.float32)  # [B, r, C]
    sums = kept.at[rows, plan.src_slot].add(src)
    counts = jnp.ones(kept.shape[:2], jnp.float32).at[rows, plan.src_slot].add(1.0)
    return (sums / counts[..., None]).astype(x.dtype)


def unmerge(y: jax.Array, plan: MergePlan) -> jax.Array:
    """Undoes :func:`merge`: every input position gets the value of the token it went into.

    Args:
      y: ``[B, N - r, C]`` merged tokens (or anything computed token-wise from them).
      plan: the plan ``y`` was merged with.

    Returns:
      ``[B, N, C]``; ``y`` itself when ``r == 0``.
    """
    _check_plan_input(y, plan, plan.num_tokens - plan.num_merged, "unmerge")
    if plan.num_merged == 0:
        return y
    rows = jnp.arange(y.shape[0])[:, None]
    return y[rows, plan.slot]


def merge_tokens(
    x: jax.Array,
    h: int,
    w: int,
    ratio: float,
    *,
    key: jax.Array | None = None,
    sx: int = 2,
    sy: int = 2,
    metric: jax.Array | None = None,
) -> tuple[jax.Array, MergePlan]:
    """Merges ``floor(ratio * N)`` tokens of a ``[B, N, C]`` feature map (e.g. for transmission).

    Args:
      x: ``[B, N, C]`` tokens, ``N = h * w`` in raster order (any C, e.g. 4 latent channels).
      h, w: token grid.
      ratio: fraction merged, ``0 <= ratio <= 1 - 1/(sx*sy)``.
      key: PRNG key for the random dst per cell; ``None``: top-left (deterministic).
      sx, sy: destination stride.
      metric: ``[B, N, C']`` features for the similarity; defaults to ``x``.

    Returns:
      ``(merged [B, N - r, C], plan)``; ``unmerge(merged, plan)`` restores ``[B, N, C]``.
    """
    r = num_merged(x.shape[1], ratio, sx, sy, h, w)
    plan = compute_merge(x if metric is None else metric, h, w, r, sx, sy, key)
    return merge(x, plan), plan


def side_info_bits(
    h: int,
    w: int,
    num_merge: int,
    sx: int = 2,
    sy: int = 2,
    *,
    use_rand: bool = True,
) -> int:
    """Bits a receiver needs, per batch element, to unmerge a ``h x w`` map with ``r`` merged.

    Encoding counted (one fixed-length mixed-radix / enumerative code word, i.e. the minimal
    fixed length for a uniform choice among all possible plans):

    * the dst choice in each whole cell: ``sx*sy`` options per cell (only with ``use_rand``;
      the top-left choice is known to the receiver);
    * which ``r`` of the ``N_src`` src were merged: ``C(N_src, r)`` options (the unmerged src
      are sent in ascending position order, so no permutation is needed);
    * for each merged src (in ascending position order), its dst: ``N_dst**r`` options.

    Bits = ``ceil(log2((sx*sy)**cells * C(N_src, r) * N_dst**r))``, computed exactly with
    integers. ``h, w, sx, sy, r`` themselves are assumed known to both ends (static
    configuration); ``r == 0`` costs 0 bits.

    Args:
      h, w: token grid.
      num_merge: ``r``, merged tokens.
      sx, sy: destination stride.
      use_rand: whether dst were chosen at random per cell (their choice must be sent).

    Returns:
      Number of bits (Python int).
    """
    _check_stride(sx, sy)
    num_dst, num_src = _grid_counts(h, w, sx, sy)
    max_merge = num_src if num_dst > 0 else 0
    if not 0 <= num_merge <= max_merge:
        raise ValueError(f"num_merge must be in [0, {max_merge}] for a {h}x{w} grid, got {num_merge}")
    if num_merge == 0:
        return 0
    cell_options = (sx * sy) ** num_dst if use_rand else 1
    count = cell_options * math.comb(num_src, num_merge) * num_dst**num_merge
    return (count - 1).bit_length()  # ceil(log2(count)) for count >= 1
