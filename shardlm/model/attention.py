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
           context='allgather', zigzag=False, dropout=None):
  """Scaled dot-product attention over [B, T, N, H] queries, keys and values.

  `dense` attends to every earlier position (or every position, if not causal);
  `local` attends to the W = `window` most recent positions, itself included.
  `mask` (dense only), broadcastable to [B, N, T, T], True where attention is allowed; under
  `ring` it must be [B, 1, 1, T] (which keys each row may see).
  When the layout splits T (`length`) over devices (context parallelism), dense attention
  gathers the keys and values (`context='allgather'`) or passes their blocks round the devices
  (`'ring'`; with `zigzag` the sequence is in `to_zigzag` order); local attention exchanges a
  halo of W positions with the previous device. `dropout`: None, or (rate, key) for dropout on
  the attention probabilities (dense attention with the keys whole only).
  """
  if q_btnh.dtype == jnp.float16 and jax.default_backend() == 'cpu':
    # XLA:CPU has no float16 matmul accumulating in float32, which the float32 softmax needs.
    out = attend(*(x.astype(jnp.float32) for x in (q_btnh, k_btnh, v_btnh)), kind=kind,
                 causal=causal, window=window, mask=mask, context=context, zigzag=zigzag,
                 dropout=dropout)
    return out.astype(jnp.float16)
  split = axes.ways('length') > 1
  if dropout is not None and (kind != 'dense' or (split and context == 'ring')):
    raise ValueError('attention dropout needs dense attention with the keys whole '
                     '(runtime.check_model refuses the rest)')
  if kind == 'dense':
    if split and context == 'ring':
      return ring_attention(q_btnh, k_btnh, v_btnh, causal=causal, mask=mask, zigzag=zigzag)
    if split and context != 'allgather':
      raise ValueError(f"context attention '{context}' is not one of {', '.join(CONTEXT)}")
    if split:  # queries stay split on T; keys and values are gathered whole
      k_btnh, v_btnh = (axes.constrain(x, ('batch', None, 'act_heads', None)) for x in (k_btnh, v_btnh))
    if dropout is not None:
      return _dense_dropout(q_btnh, k_btnh, v_btnh, causal, mask, *dropout)
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


def _dense_dropout(q_btnh, k_btnh, v_btnh, causal, mask, rate, key):
  """XLA attention with dropout on the probabilities (training): softmax in float32, then each
  probability zeroed with probability `rate` and the rest scaled by 1 / (1 - rate)."""
  T, S, H = q_btnh.shape[1], k_btnh.shape[1], q_btnh.shape[-1]
  s_bnts = jnp.einsum('btnh,bsnh->bnts', q_btnh, k_btnh, preferred_element_type=jnp.float32)
  s_bnts = s_bnts / jnp.sqrt(jnp.float32(H))
  allowed = jnp.ones((1, 1, T, S), bool) if mask is None else mask
  if causal:
    allowed = allowed & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
  # A finite floor, not -inf: a row with no key (padding) gives 0 and finite gradients.
  p_bnts = jax.nn.softmax(jnp.where(allowed, s_bnts, jnp.finfo(jnp.float32).min), axis=-1)
  p_bnts = jnp.where(allowed, p_bnts, 0)
  p_bnts = dropout(p_bnts, rate, key).astype(v_btnh.dtype)
  return jnp.einsum('bnts,bsnh->btnh', p_bnts, v_btnh)


def dropout(x, rate: float, key):
  """Zeroes each element with probability `rate` and scales the rest by 1 / (1 - rate); the
  identity when `key` is None (evaluation) or the rate is 0. The bits come from JAX's
  partitionable threefry: the same on every layout."""
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1 - rate, x.shape)
  return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


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
  passing the block it holds on to the next device (C - 1 collective-permutes of [B, T/C, N, 2, H],
  each independent of the step's compute, so the two can overlap). An online softmax (running
  max and sum in float32) merges the blocks, so no device holds the [T/C, T] logits or more than
  two key/value blocks. The backward pass goes round the ring again (Liu et al. 2023), the keys'
  and values' gradients travelling with their blocks (C more permutes) and arriving home; it
  keeps only q, k, v, the output and its log-sum-exp per device. Causal masks come from
  positions: with `zigzag` (the sequence in `to_zigzag` order) every device holds an early and a
  late chunk, and at every step past the first it computes only the half block that the mask
  leaves, so all devices do equal work.
  `mask`: [B, 1, 1, T] or None, which keys each row may see (BERT's padding); its blocks travel
  with the keys.
  """
  C = axes.ways('length')
  B, T, N, H = q_btnh.shape
  if mask is not None and mask.shape != (B, 1, 1, T):
    raise ValueError(f'ring attention takes a key mask [B, 1, 1, T] = {(B, 1, 1, T)}, got {mask.shape}')
  scale = 1 / float(H) ** 0.5

  def positions(block, t):  # the sequence positions of a device's block of t
    if not zigzag:
      return block * t + jnp.arange(t)
    h = t // 2
    return jnp.concatenate([block * h + jnp.arange(h), (2 * C - 1 - block) * h + jnp.arange(h)])

  def run(q, k, v, keep=None):  # keep [B, t]: which keys may be seen (None: all)
    t, h = q.shape[1], q.shape[1] // 2

    def ring(fold, state, q_side, kv, keep, acc=None):
      """C steps; at step s this device holds device (me - s)'s keys and values, folds them into
      `state` (by query: [B, t, ...]) and `acc` (by key, travelling with the block), and passes
      the block on, except after the last step (a loop of C - 1 trips, then the last block);
      `acc` is passed C times, which brings it home. Arrays by query or key have that axis
      second."""
      me = axes.position('length')  # traced here: custom_vjp's rules may not close over tracers
      q_pos = positions(me, t)

      def fold_step(state, kv, keep, acc, s):
        src = (me - s) % C
        k_pos = positions(src, t)

        def part(qs, ks):  # fold rows qs of the queries against rows ks of the keys
          def apply(sa):
            state, acc = sa
            new_state, new_acc = fold(_rows(state, qs), _rows(acc, ks), _rows(q_side, qs),
                                      kv[:, ks], _rows(keep, ks), q_pos[qs], k_pos[ks])
            return _put(state, new_state, qs), _put(acc, new_acc, ks)
          return apply
        every, early, late = slice(None), slice(None, h), slice(h, None)
        if not causal:
          state, acc = part(every, every)((state, acc))
        elif not zigzag:  # a later device's block is wholly masked: skipped (energy, not time)
          state, acc = jax.lax.cond(src <= me, part(every, every), lambda sa: sa, (state, acc))
        else:  # an earlier device's late chunk and a later device's early chunk are masked
          which = jnp.where(s == 0, 0, jnp.where(src < me, 1, 2))
          state, acc = jax.lax.switch(
              which, (part(every, every), part(every, early), part(late, every)), (state, acc))
        return state, acc

      def step(carry, s):
        state, kv, keep, acc = carry
        incoming = axes.pass_on((kv, keep), 'length')  # independent of this step's compute
        state, acc = fold_step(state, kv, keep, acc, s)
        return (state, *incoming, axes.pass_on(acc, 'length')), None
      (state, kv, keep, acc), _ = jax.lax.scan(step, (state, kv, keep, acc), jnp.arange(C - 1))
      state, acc = fold_step(state, kv, keep, acc, C - 1)
      return state, axes.pass_on(acc, 'length')

    def forward_fold(state, acc, q, kv, keep, q_pos, k_pos):
      o, m, l = state
      logits = _scores(q, kv[:, :, :, 0], keep, q_pos, k_pos, causal, scale)
      m_new = jnp.maximum(m, logits.max(-1))
      base = jnp.where(jnp.isfinite(m_new), m_new, 0.)  # a row with nothing visible yet stays 0
      p = jnp.exp(logits - base[..., None])
      rescale = jnp.exp(m - base)
      o = o * rescale[..., None] + jnp.einsum('bqnk,bknh->bqnh', p.astype(kv.dtype), kv[:, :, :, 1],
                                              preferred_element_type=jnp.float32)
      return (o, m_new, l * rescale + p.sum(-1)), acc

    def backward_fold(dq, dkv, q_side, kv, keep, q_pos, k_pos):
      q, do, lse, delta = q_side  # do in the compute dtype; lse, delta float32
      k, v = kv[:, :, :, 0], kv[:, :, :, 1]
      mm = lambda spec, a, b: jnp.einsum(spec, a.astype(q.dtype), b, preferred_element_type=jnp.float32)
      p = jnp.exp(_scores(q, k, keep, q_pos, k_pos, causal, scale) - lse[..., None])
      dv = mm('bqnk,bqnh->bknh', p, do)
      ds = p * (mm('bqnh,bknh->bqnk', do, v) - delta[..., None]) * scale
      dk = mm('bqnk,bqnh->bknh', ds, q)
      dq = dq + mm('bqnk,bknh->bqnh', ds, k)
      return dq, dkv + jnp.stack([dk, dv], axis=3)

    @jax.custom_vjp
    def attend_ring(q, k, v, keep):
      return forward(q, k, v, keep)[0]

    def forward(q, k, v, keep):
      B, t, N, H = q.shape
      start = (jnp.zeros((B, t, N, H), jnp.float32), jnp.full((B, t, N), -jnp.inf, jnp.float32),
               jnp.zeros((B, t, N), jnp.float32))
      (o, m, l), _ = ring(forward_fold, start, q, jnp.stack([k, v], axis=3), keep)
      # A row that sees no key (BERT's, when every key is padding) gives 0, not 0/0, and its
      # log-sum-exp +inf makes its probabilities 0 in the backward pass.
      seen = l > 0
      o = o / jnp.where(seen, l, 1.)[..., None]
      return o.astype(q.dtype), (q, k, v, keep, o, jnp.where(seen, m + jnp.log(l), jnp.inf))

    def backward(res, do):
      q, k, v, keep, o, lse = res
      delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1)  # [B, t, N]: softmax's backward term
      kv = jnp.stack([k, v], axis=3)
      dq, dkv = ring(backward_fold, jnp.zeros(q.shape, jnp.float32), (q, do, lse, delta), kv, keep,
                     acc=jnp.zeros(kv.shape, jnp.float32))
      return dq.astype(q.dtype), dkv[:, :, :, 0].astype(k.dtype), dkv[:, :, :, 1].astype(v.dtype), None

    attend_ring.defvjp(axes.bound(forward), axes.bound(backward))
    return attend_ring(q, k, v, keep)

  if mask is None:
    return axes.shard_map(run, (QKV, QKV, QKV), QKV)(q_btnh, k_btnh, v_btnh)
  return axes.shard_map(run, (QKV, QKV, QKV, ('batch', 'length')), QKV)(
      q_btnh, k_btnh, v_btnh, mask[:, 0, 0])


def _rows(tree, rows):
  """Every array of tree cut to `rows` (a slice) of its second axis."""
  return jax.tree.map(lambda x: x[:, rows], tree)


def _put(tree, new, rows):
  """tree with `rows` (a slice of the second axis: all, the first half or the second) from new."""
  def put(x, y):
    if rows.start is None and rows.stop is None:
      return y
    h = x.shape[1] // 2
    return jnp.concatenate([y, x[:, h:]] if rows.stop is not None else [x[:, :h], y], axis=1)
  return jax.tree.map(put, tree, new)


def _scores(q_btnh, k_btnh, keep_bt, q_pos, k_pos, causal, scale):
  """Scaled logits [B, q, N, k] in float32, -inf where a key is masked (by `keep`, or after the
  query when causal)."""
  logits = jnp.einsum('bqnh,bknh->bqnk', q_btnh, k_btnh, preferred_element_type=jnp.float32) * scale
  allowed = jnp.ones((), bool) if keep_bt is None else keep_bt[:, None, None, :]
  if causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, :, None, :]
  return jnp.where(allowed, logits, -jnp.inf)
