"""Attention kernels behind one function: dense (XLA, or cuDNN flash on NVIDIA GPUs) and local."""
import functools
import logging

import jax
import jax.numpy as jnp

from shardlm.model import axes

log = logging.getLogger(__name__)
KINDS = ('dense', 'local')


def attend(q_btnh, k_btnh, v_btnh, *, kind='dense', causal=True, window=0, mask=None):
  """Scaled dot-product attention over [B, T, N, H] queries, keys and values.

  `dense` attends to every earlier position (or every position, if not causal);
  `local` attends to the W = `window` most recent positions, itself included.
  `mask` (dense only), broadcastable to [B, N, T, T], True where attention is allowed.
  """
  if q_btnh.dtype == jnp.float16 and jax.default_backend() == 'cpu':
    # XLA:CPU has no float16 matmul accumulating in float32, which the float32 softmax needs.
    out = attend(*(x.astype(jnp.float32) for x in (q_btnh, k_btnh, v_btnh)), kind=kind,
                 causal=causal, window=window, mask=mask)
    return out.astype(jnp.float16)
  if kind == 'dense':
    return _dense(q_btnh, k_btnh, v_btnh, causal, mask)
  if kind == 'local':
    if not causal or mask is not None:
      raise ValueError("attention kind 'local' is causal only, without a mask")
    return local_attention(q_btnh, k_btnh, v_btnh, window)
  raise ValueError(f"attention kind '{kind}' is not one of {', '.join(KINDS)}")


def _dense(q_btnh, k_btnh, v_btnh, causal, mask):
  """cuDNN flash attention on NVIDIA GPUs when it accepts the shapes and dtype, else XLA's.

  Not under context parallelism: cuDNN's partitioning refuses queries split on T (checked when
  the step compiles, not while tracing), so a T split over devices takes XLA's attention."""
  if jax.default_backend() == 'gpu' and axes.ways('length') == 1:
    try:
      return jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask, is_causal=causal,
                                          implementation='cudnn')
    except Exception as e:  # jax checks cuDNN's constraints while tracing
      _warn_once(f'cuDNN flash attention unavailable for {q_btnh.dtype} {q_btnh.shape}: '
                 f'{str(e).splitlines()[0]}; using XLA attention')
  return jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask, is_causal=causal)


@functools.cache
def _warn_once(message):
  log.warning(message)


def local_attention(q_btnh, k_btnh, v_btnh, window: int):
  """Causal sliding-window attention, computed block-wise in O(T x W).

  Queries are cut into blocks of W. A query in block c can see only keys in blocks
  c-1 and c, so each block attends to 2W keys under a band mask: cost and memory grow
  linearly with T. Softmax in float32.
  """
  B, T, N, H = q_btnh.shape
  W = window
  if W <= 0:
    raise ValueError(f'local attention needs window > 0, got {W}')
  pad = -T % W
  if pad:  # ragged tail: pad the sequence, drop the padded queries at the end
    q_btnh, k_btnh, v_btnh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                              for x in (q_btnh, k_btnh, v_btnh))
  C = (T + pad) // W
  q = q_btnh.reshape(B, C, W, N, H)

  def two_blocks(x_btnh):  # [B, C, 2W, N, H]: the previous block, then this one
    x = x_btnh.reshape(B, C, W, N, H)
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    return jnp.concatenate([prev, x], axis=2)

  k, v = two_blocks(k_btnh), two_blocks(v_btnh)
  logits = jnp.einsum('BCqNH,BCkNH->BCNqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(H))
  # Query i (offset W + i within the two blocks) sees keys j with i < j <= i + W; in block 0
  # the "previous block" is padding, masked by position.
  qi = jnp.arange(W)[:, None] + W
  kj = jnp.arange(2 * W)[None, :]
  band = (kj <= qi) & (kj > qi - W)
  first = kj >= W
  mask = jnp.where(jnp.arange(C)[:, None, None] == 0, band & first, band)  # [C, W, 2W]
  logits = jnp.where(mask[None, :, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BCNqk,BCkNH->BCqNH', probs, v)
  return out.reshape(B, C * W, N, H)[:, :T]
