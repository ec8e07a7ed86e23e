"""Plain-JAX attention: the ground truth every kernel in this package is tested against.

    S = scale * Q K^T + B,        B_ij = 0 if mask_j else -inf
    P = softmax(S, axis=keys),    O = P V,    lse_i = log sum_j exp(S_ij)

A query row whose keys are all masked has no softmax; here (and in every kernel) its output is 0,
its log-sum-exp is +inf and its gradients are 0. `jax.nn.dot_product_attention` instead returns the
mean of V for such rows (it masks with a large finite number); `flash_attention` fixes that up.
"""

import jax
import jax.numpy as jnp


def default_softmax_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim) (Vaswani et al. 2017)."""
    return float(head_dim) ** -0.5


def key_padding_bias(mask: jax.Array) -> jax.Array:
    """(batch, seq_k) bool, True = attend  ->  (batch, seq_k) f32 additive bias: 0 or -inf."""
    return jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)


def reference_attention_with_lse(q, k, v, *, mask=None, softmax_scale=None):
    """Returns (out, lse): out like q, lse (batch, heads, seq_q) f32. Math in f32; it materializes
    the (seq_q, seq_k) scores, so use it for testing, not for long sequences."""
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    s = (
        jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        * scale
    )
    if mask is not None:
        s = s + key_padding_bias(mask)[:, None, None, :]
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # all-masked rows: avoid -inf - -inf
    p = jnp.exp(s - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    empty = denom == 0.0
    p = p / jnp.where(empty, 1.0, denom)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, denom)))[..., 0]
    return out.astype(q.dtype), lse


def reference_attention(q, k, v, *, mask=None, softmax_scale=None):
    """softmax(scale * q k^T + bias) v.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, heads, head_dim); mask: optional
    (batch, seq_k) bool key-padding mask, True = attend. Returns q's shape and dtype.
    """
    return reference_attention_with_lse(q, k, v, mask=mask, softmax_scale=softmax_scale)[0]
