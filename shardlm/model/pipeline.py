"""The circular pipeline over the `stage` axis: GSPMD-style (Xu et al. 2021), as MaxText runs it.

The layer stack [L] runs as [R, P, K] (K = L / (R P)): repeat r of stage p is the K layers from
(r P + p) K on. The batch [B] is cut into M micro-batches of b = B / M rows. Work item
u = r M + m (micro-batch m, repeat r) is at stage p in iteration u + p, so R M + P - 1
iterations run everything. In each, every stage applies its K layers to its own item at once
(vmap over P, with P split over the mesh's `stage` axis so each device runs only its stage),
then the buffer [P, b, T, D] moves one stage on: a collective-permute, the last stage's output
wrapping round to stage 0.

Stage 0 reads its input from `io` [P, M, b, T, D]: micro-batch m fresh in repeat 0, and after
that the last stage's output for it, written there M - P + 1 iterations before it is read; `io`
ends holding the outputs. Only stage 0's row of `io` is real: each stage keeps a row of its own
so that every read and write stays on its devices, as MaxText's circular storage does.

An iteration in which stage p has no item (u < 0 or u >= R M) is a bubble: (P - 1) / (R M + P - 1)
of the time. It computes on zeros, whatever its slot holds, and its output is never read: nothing
it computes reaches a result (its gradients are exactly zero).
"""
import jax
import jax.numpy as jnp
import numpy as np

from shardlm.model import axes

# G = the batch's split (data x fsdp): each group of devices holding a block of the batch runs its
# own pipeline on its own copy of the stage's layers, so that the layers' gradients are summed over
# the groups once per step, after the loop, not in every iteration (XLA reduces a loop-invariant
# weight's gradient inside the loop). Under FSDP the copy is gathered once per step likewise.
BUFFER = ('act_stage', 'batch', None, 'act_length', 'act_embed')   # [P, G, c, T, D], c = b / G
IO = ('act_stage', None, 'batch', None, 'act_length', 'act_embed')  # [P, M, G, c, T, D]
STALE = 0.0  # what bubble slots hold before anything arrives; tests set NaN: it must never matter


def bubble(stages: int, repeats: int, microbatches: int) -> float:
  """The share of iterations a stage idles: (P - 1) / (R M + P - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def stage_major(num_layers: int, stages: int, repeats: int) -> np.ndarray:
  """Which layer each position of the stored stack holds when pipelined: [P, R, K] flattened, so
  that the stack split evenly over the stages gives stage p its layers of every repeat. With
  R = 1 it is the natural order."""
  K = num_layers // (stages * repeats)
  return np.arange(num_layers).reshape(repeats, stages, K).transpose(1, 0, 2).reshape(-1)


def run(block, remat, params, names, x_btd, mask, *, stages: int, repeats: int,
        microbatches: int, scan: bool = True):
  """The stack's layers over x, pipelined.

  Args:
    block: (x [c, T, D], one layer's parameters, is_local, mask) -> x: one layer.
    remat: the layers' recomputation: a function -> the function under jax.checkpoint.
    params: the stacked layer parameters [L, ...], in `stage_major` order.
    names: their logical names (a tree of tuples, the first name 'layers').
    x_btd: [B, T, D], B a multiple of M x the batch's split.
    mask: None, or [B, 1, 1, T] (True = attend), cut into micro-batches like x.
    stages, repeats, microbatches: P, R, M.
    scan: a stage's K layers in lax.scan (compile time flat in depth); False unrolls them.

  Returns:
    [B, T, D], as the layers applied in order 0..L-1 would give.
  """
  P, R, M = stages, repeats, microbatches
  B, T, D = x_btd.shape
  L = jax.tree.leaves(params)[0].shape[0]
  G = axes.ways('batch')
  if L % (R * P) or B % (M * G):
    raise ValueError(f'pipeline: {L} layers do not split into R={R} x P={P} stages, or a batch of '
                     f'{B} rows into M={M} micro-batches x {G} batch shards')
  K, b = L // (R * P), B // M
  c = b // G

  def split(a):  # [B, ...] -> [M, G, c, ...]: micro-batch m takes rows m, m + M, ...
    return jnp.swapaxes(a.reshape(b, M, *a.shape[1:]), 0, 1).reshape(M, G, c, *a.shape[1:])

  def copies(a, names):  # [L, ...] -> [G, P, K, R, ...]: a copy per batch group
    a = jnp.swapaxes(a.reshape(P, R, K, *a.shape[1:]), 1, 2)
    a = axes.constrain(jnp.broadcast_to(a, (G, *a.shape)), ('batch', 'stage', None, None, *names[1:]))
    return a[:, :, :, 0] if R == 1 else a
  # The layers' inputs must not change from iteration to iteration: JAX then keeps one copy for
  # the backward pass instead of one per iteration. With R > 1, each layer picks its repeat
  # inside its own recomputation (remat), so the picked copy is recomputed, not kept.
  if R == 1:
    layer = remat(block)
  else:
    layer = remat(lambda x, w_r, r, is_local, mask: block(
        x, jax.tree.map(lambda a: a[r], w_r), is_local, mask))
  leaves, tree = jax.tree.flatten(params)
  w = tree.unflatten([copies(a, n) for a, n in zip(
      leaves, jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)), strict=True)])
  masks = None if mask is None else split(mask)
  io = axes.constrain(jnp.broadcast_to(split(x_btd)[None], (P, M, G, c, T, D)), IO)
  buf = axes.constrain(jnp.full((P, G, c, T, D), STALE, x_btd.dtype), BUFFER)
  if STALE != 0:  # test-only: every row but stage 0's holds nothing a result may use
    io = io.at[1:].set(STALE)
  p_ids = jnp.arange(P)
  shift = axes.shard_map(lambda a: axes.rotate(a, 'act_stage'), (BUFFER,), BUFFER)

  def stage(w_k, x, r, local_k, mask):
    """One stage's K layers (of repeat r) on one batch group's item: x [c, T, D]."""
    def one(x, xs):
      w, is_local = xs
      return (layer(x, w, is_local, mask) if R == 1 else layer(x, w, r, is_local, mask)), None
    if scan:
      return jax.lax.scan(one, x, (w_k, local_k))[0]
    for k in range(K):
      x, _ = one(x, jax.tree.map(lambda a: a[k], (w_k, local_k)))
    return x

  per_group = axes.vmap(stage, 'batch', in_axes=(0, 0, None, None, 0))
  per_stage = axes.vmap(per_group, 'act_stage', in_axes=(1, 0, 0, 0, 0))

  def iteration(carry, t):
    buf, io = carry
    u = t - p_ids                       # each stage's work item
    valid = (u >= 0) & (u < R * M)
    r = jnp.clip(u // M, 0, R - 1)
    x = jnp.where((p_ids == 0)[:, None, None, None, None],
                  jax.lax.dynamic_index_in_dim(io, t % M, axis=1, keepdims=False), buf)
    # A bubble computes on zeros, whatever its slot holds, so that nothing there (stale data,
    # an overflow in float16) reaches the parameters' gradients as 0 x inf = NaN.
    x = axes.constrain(jnp.where(valid[:, None, None, None, None], x, 0).astype(buf.dtype), BUFFER)
    local = ((r * P + p_ids)[:, None] * K + jnp.arange(K)) % 2 == 1  # [P, K]: 'alternating'
    mask_p = None if masks is None else jnp.take(masks, u % M, axis=0)
    out = axes.constrain(per_stage(w, x, r, local, mask_p), BUFFER)
    buf = shift(out)  # stage p's output is stage p + 1's input; the last one's lands on stage 0
    slot = (t - P + 1) % M  # ... whose io row keeps it for the next repeat, and as the result
    old = jax.lax.dynamic_index_in_dim(io, slot, axis=1, keepdims=False)
    io = jax.lax.dynamic_update_index_in_dim(io, jnp.where(t >= P - 1, buf, old), slot, axis=1)
    return (buf, axes.constrain(io, IO)), None

  # The iterations are always a loop (unrolled, R M + P - 1 copies of a stage would compile for
  # minutes); `scan` decides only for the K layers of a stage.
  (_, io), _ = jax.lax.scan(iteration, (buf, io), jnp.arange(R * M + P - 1))
  # Stage 0's row, to every stage: a masked sum over the stage axis (one all-reduce), whose
  # gradient stays split over the stages; `io[0]` would gather the whole of `io` to slice it.
  first = (p_ids == 0).reshape(P, 1, 1, 1, 1, 1)
  out_mbtd = jnp.sum(jnp.where(first, io, 0), axis=0).reshape(M, b, T, D)
  return jnp.swapaxes(out_mbtd, 0, 1).reshape(B, T, D)
