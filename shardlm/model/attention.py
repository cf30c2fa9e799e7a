"""Attention kernels behind one function: dense (XLA, or cuDNN flash on NVIDIA GPUs) and local, and
their context-parallel forms for queries split on T over devices: keys and values gathered whole
(`allgather`) or passed round a ring of devices (`ring`), and local attention's halo exchange."""
import functools
import logging

import jax
import jax.numpy as jnp

from shardlm.model import axes

log = logging.getLogger(__name__)
KINDS = ('dense', 'local')
CONTEXT = ('allgather', 'ring')  # dense attention under context parallelism
QKV = ('batch', 'length', 'act_heads', None)  # [B, T, N, H] queries, keys, values, outputs


def attend(q_btnh, k_btnh, v_btnh, *, kind='dense', causal=True, window=0, mask=None,
           context='allgather', zigzag=False):
  """Scaled dot-product attention over [B, T, N, H] queries, keys and values.

  `dense` attends to every earlier position (or every position, if not causal);
  `local` attends to the W = `window` most recent positions, itself included.
  `mask` (dense only), broadcastable to [B, N, T, T], True where attention is allowed; under
  `ring` it must be [B, 1, 1, T] (which keys each row may see).
  When the layout splits T (`length`) over devices (context parallelism), dense attention
  gathers the keys and values (`context='allgather'`) or passes their blocks round the devices
  (`'ring'`; with `zigzag` the sequence is in `to_zigzag` order); local attention exchanges a
  halo of W positions with the previous device.
  """
  if q_btnh.dtype == jnp.float16 and jax.default_backend() == 'cpu':
    # XLA:CPU has no float16 matmul accumulating in float32, which the float32 softmax needs.
    out = attend(*(x.astype(jnp.float32) for x in (q_btnh, k_btnh, v_btnh)), kind=kind,
                 causal=causal, window=window, mask=mask, context=context, zigzag=zigzag)
    return out.astype(jnp.float16)
  split = axes.ways('length') > 1
  if kind == 'dense':
    if split and context == 'ring':
      return ring_attention(q_btnh, k_btnh, v_btnh, causal=causal, mask=mask, zigzag=zigzag)
    if split and context != 'allgather':
      raise ValueError(f"context attention '{context}' is not one of {', '.join(CONTEXT)}")
    if split:  # queries stay split on T; keys and values are gathered whole
      k_btnh, v_btnh = (axes.constrain(x, ('batch', None, 'act_heads', None)) for x in (k_btnh, v_btnh))
    return _dense(q_btnh, k_btnh, v_btnh, causal, mask)
  if kind == 'local':
    if not causal or mask is not None:
      raise ValueError("attention kind 'local' is causal only, without a mask")
    if split:
      return halo_local_attention(q_btnh, k_btnh, v_btnh, window)
    return local_attention(q_btnh, k_btnh, v_btnh, window)
  raise ValueError(f"attention kind '{kind}' is not one of {', '.join(KINDS)}")


def uses_zigzag(kind: str, causal: bool, context: str) -> bool:
  """Whether a model whose every layer has attention `kind` runs its sequence in zigzag order when
  T is split: causal ring attention then gives every device equal work (see `to_zigzag`)."""
  return kind == 'dense' and causal and context == 'ring' and axes.ways('length') > 1


def to_zigzag(x, axis=1):
  """x's sequence `axis` reordered so that, cut into C = ways('length') equal blocks, block i holds
  chunks i and 2C-1-i of 2C: under a causal mask every block then has the same number of
  (query, key) pairs to compute (Megatron-LM's and MaxText's load balancing)."""
  C = axes.ways('length')
  x = jnp.moveaxis(x, axis, 0)
  chunks = x.reshape(2 * C, x.shape[0] // (2 * C), *x.shape[1:])
  pairs = jnp.stack([chunks[:C], chunks[C:][::-1]], axis=1)  # [C, 2, T/2C, ...]
  return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def from_zigzag(x, axis=1):
  """The inverse of `to_zigzag`."""
  C = axes.ways('length')
  x = jnp.moveaxis(x, axis, 0)
  pairs = x.reshape(C, 2, x.shape[0] // (2 * C), *x.shape[1:])
  chunks = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]], axis=0)
  return jnp.moveaxis(chunks.reshape(x.shape), 0, axis)


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


def local_attention(q_btnh, k_btnh, v_btnh, window: int, prev=None, prev_valid=None):
  """Causal sliding-window attention, computed block-wise in O(T x W).

  Queries are cut into blocks of W. A query in block c can see only keys in blocks
  c-1 and c, so each block attends to 2W keys under a band mask: cost and memory grow
  linearly with T. Softmax in float32. `prev`: the keys and values ([B, W, N, H] each) of the
  W positions before the first, which the first block sees where `prev_valid` (a traced bool)
  is true; without them the sequence starts at position 0.
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

  def two_blocks(x_btnh, before):  # [B, C, 2W, N, H]: the previous block, then this one
    x = x_btnh.reshape(B, C, W, N, H)
    before = jnp.zeros_like(x[:, :1]) if before is None else before[:, None]
    return jnp.concatenate([jnp.concatenate([before, x[:, :-1]], axis=1), x], axis=2)

  k, v = (two_blocks(x, None if prev is None else p) for x, p in zip((k_btnh, v_btnh), prev or (None, None)))
  logits = jnp.einsum('BCqNH,BCkNH->BCNqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(H))
  # Query i (offset W + i within the two blocks) sees keys j with i < j <= i + W; in block 0
  # the "previous block" is padding (or an invalid halo), masked by position.
  qi = jnp.arange(W)[:, None] + W
  kj = jnp.arange(2 * W)[None, :]
  band = (kj <= qi) & (kj > qi - W)
  first = kj >= W
  start = jnp.arange(C)[:, None, None] == 0
  if prev_valid is not None:
    start &= ~prev_valid
  mask = jnp.where(start, band & first, band)  # [C, W, 2W]
  logits = jnp.where(mask[None, :, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BCNqk,BCkNH->BCqNH', probs, v)
  return out.reshape(B, C * W, N, H)[:, :T]


def halo_local_attention(q_btnh, k_btnh, v_btnh, window: int):
  """Local attention with T split over devices: each device receives the last W keys and values
  of the previous device's block (one collective-permute of [B, W, N, 2, H]) and attends
  locally. Needs W <= T / devices; the first device's halo is masked."""
  W = window

  def block(q, k, v):
    if q.shape[1] < W:
      raise ValueError(f'local attention under context parallelism needs window={W} <= the '
                       f'sequence block per device ({q.shape[1]})')
    tail = jnp.stack([k[:, -W:], v[:, -W:]], axis=3)  # [B, W, N, 2, H]: one transfer
    halo = axes.pass_on(tail, 'length', wrap=False)
    return local_attention(q, k, v, W, prev=(halo[:, :, :, 0], halo[:, :, :, 1]),
                           prev_valid=axes.position('length') > 0)

  return axes.shard_map(block, (QKV, QKV, QKV), QKV)(q_btnh, k_btnh, v_btnh)


def ring_attention(q_btnh, k_btnh, v_btnh, *, causal=True, mask=None, zigzag=False):
  """Dense attention with T split over C devices, keys and values passed round the ring.

  Each device keeps its query block and, over C steps, attends to every key/value block while
  passing the block it holds to the next device (one collective-permute of [B, T/C, N, 2, H] per
  step, independent of the step's compute, so the two can overlap). An online softmax (running
  max and sum in float32) merges the blocks, so no device ever holds the [T/C, T] logits or all
  keys at once in the forward pass; each step is rematerialized in the backward pass. Causal
  masks come from positions: with `zigzag` (the sequence in `to_zigzag` order) every device
  holds an early and a late chunk, and at every step past the first each device computes half
  a block (the half that the mask leaves), so all devices do equal work. `mask`: [B, 1, 1, T]
  or None, which keys each row may see (BERT's padding); its blocks travel with the keys.
  """
  C = axes.ways('length')
  B, T, N, H = q_btnh.shape
  if mask is not None and mask.shape != (B, 1, 1, T):
    raise ValueError(f'ring attention takes a key mask [B, 1, 1, T] = {(B, 1, 1, T)}, got {mask.shape}')

  def positions(block, t):  # the sequence positions of a device's block of t
    if not zigzag:
      return block * t + jnp.arange(t)
    h = t // 2
    return jnp.concatenate([block * h + jnp.arange(h), (2 * C - 1 - block) * h + jnp.arange(h)])

  def run(q, k, v, keep=None):  # keep [B, t]: which keys may be seen (None: all)
    t, h = q.shape[1], q.shape[1] // 2
    me = axes.position('length')
    q_pos = positions(me, t)

    def step(carry, s):
      acc, kv, keep = carry
      incoming = axes.pass_on((kv, keep), 'length')  # sent while this block is computed
      src = (me - s) % C  # whose block this device holds at step s
      k_pos = positions(src, t)
      whole = lambda acc: _merge(acc, q, kv, q_pos, k_pos, keep, causal)
      half = lambda x: None if x is None else x[:, :h]
      if not causal:
        return (whole(acc), *incoming), None
      if not zigzag:  # later blocks are wholly masked; skipping them saves energy, not time
        acc = jax.lax.cond(src <= me, whole, lambda acc: acc, acc)
        return (acc, *incoming), None
      # zigzag: an earlier device's late chunk and a later device's early chunk are masked
      earlier = lambda acc: _merge(acc, q, kv[:, :h], q_pos, k_pos[:h], half(keep), causal)

      def later(acc):
        o, m, l = acc
        o2, m2, l2 = _merge((o[:, h:], m[..., h:], l[..., h:]), q[:, h:], kv, q_pos[h:], k_pos,
                            keep, causal)
        return (jnp.concatenate([o[:, :h], o2], 1), jnp.concatenate([m[..., :h], m2], -1),
                jnp.concatenate([l[..., :h], l2], -1))
      which = jnp.where(s == 0, 0, jnp.where(src < me, 1, 2))
      return (jax.lax.switch(which, (whole, earlier, later), acc), *incoming), None

    kv = jnp.stack([k, v], axis=3)  # [B, t, N, 2, H]: one transfer per step
    (o, _, l), _, _ = jax.lax.scan(jax.checkpoint(step), (_empty(q), kv, keep), jnp.arange(C))[0]
    return (o / jnp.swapaxes(l, 1, 2)[..., None]).astype(q.dtype)

  if mask is None:
    return axes.shard_map(run, (QKV, QKV, QKV), QKV)(q_btnh, k_btnh, v_btnh)
  return axes.shard_map(run, (QKV, QKV, QKV, ('batch', 'length')), QKV)(
      q_btnh, k_btnh, v_btnh, mask[:, 0, 0])


def _empty(q_btnh):
  """The online softmax's start: output 0, running max -inf, running sum 0 (float32)."""
  B, t, N, _ = q_btnh.shape
  return (jnp.zeros(q_btnh.shape, jnp.float32), jnp.full((B, N, t), -jnp.inf, jnp.float32),
          jnp.zeros((B, N, t), jnp.float32))


def _merge(acc, q_btnh, kv_btn2h, q_pos, k_pos, keep_bt, causal):
  """One key/value block folded into the online softmax `acc` = (output [B, t, N, H] unnormalized,
  running max [B, N, t], running sum [B, N, t]), all float32."""
  o, m, l = acc
  k, v = kv_btn2h[:, :, :, 0], kv_btn2h[:, :, :, 1]
  logits = jnp.einsum('bqnh,bknh->bnqk', q_btnh, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q_btnh.shape[-1]))
  allowed = jnp.ones((), bool) if keep_bt is None else keep_bt[:, None, None, :]
  if causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
  logits = jnp.where(allowed, logits, -jnp.inf)
  m_new = jnp.maximum(m, logits.max(-1))
  base = jnp.where(jnp.isfinite(m_new), m_new, 0.)  # a row with nothing visible yet stays 0
  p = jnp.exp(logits - base[..., None])
  scale = jnp.exp(m - base)
  o = o * jnp.swapaxes(scale, 1, 2)[..., None] + jnp.einsum(
      'bnqk,bknh->bqnh', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o, m_new, l * scale + p.sum(-1)
