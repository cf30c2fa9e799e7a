"""Building blocks with logical axis names: embedding, LayerNorm, MLP, self-attention."""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from shardlm.model import axes
from shardlm.model import attention
from shardlm.model.axes import constrain

RESIDUAL = ('batch', 'act_length', 'act_embed')  # the residual stream: T split under sequence parallelism


def project(x, kernel, n_in=1):
  """x [..., *in] times kernel [*in, *out] -> [..., *out], as one 2D matmul [rows, in] @ [in, out].

  The same product as an einsum, but XLA:CPU gives the weight gradient of a matmul whose rows
  span several dimensions (B and T) a transposed copy of the activations first; flattened to
  rows it does not (one MLP's forward+backward: 23.7 -> 10.5 ms on a 2-core CPU).
  The merged rows keep the batch sharding as long as 'length' is not split over a mesh axis
  (megatron_sp splits only the residual stream's 'act_length', whose shards are gathered before
  a column-parallel projection anyway); under context parallelism T is split, and B and T stay
  apart.
  """
  k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  if x.shape[x.ndim - n_in:] != k_in:
    raise ValueError(f'project: input dims {x.shape[x.ndim - n_in:]} != kernel input dims {k_in}')
  w = kernel.reshape(math.prod(k_in), math.prod(k_out))
  if axes.ways('length') > 1:  # T split (context parallel): B x T rows cannot merge in place
    return (x.reshape(*lead, math.prod(k_in)) @ w).reshape(*lead, *k_out)
  y = x.reshape(-1, math.prod(k_in)) @ w
  return y.reshape(*lead, *k_out)


def _param(rngs, shape, std, names, dtype):
  return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, out_sharding=names)


def _zeros(shape, names, dtype):
  return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names)


class Embed(nnx.Module):
  """Token table [V, D], vocabulary-parallel; the LM head reuses it (tied)."""

  def __init__(self, vocab, padded_vocab, hidden, *, std, dtype, param_dtype, rngs):
    # Real rows are drawn at their unpadded shape and padding rows are zero, so the model
    # is the same function whatever padding the model-axis size asks for.
    table = jax.random.normal(rngs.params(), (vocab, hidden), param_dtype) * std
    table = jnp.pad(table, ((0, padded_vocab - vocab), (0, 0)))
    self.embedding = nnx.Param(table, out_sharding=('vocab', 'embed'))
    self.dtype = dtype

  def __call__(self, ids_bt):
    # A gather from a table sharded on V: each shard looks up its own rows and the
    # partitioner sums the partial results (Megatron's vocab-parallel embedding).
    return jnp.take(self.embedding[...].astype(self.dtype), ids_bt, axis=0)

  def attend(self, x_btd):
    logits_btv = project(x_btd, self.embedding[...].astype(self.dtype).T)
    return constrain(logits_btv, ('batch', 'length', 'act_vocab'))


class LayerNorm(nnx.Module):
  """LayerNorm over D, computed in float32 whatever the compute dtype."""

  def __init__(self, hidden, *, eps, param_dtype):
    self.scale = nnx.Param(jnp.ones((hidden,), param_dtype), out_sharding=('embed',))
    self.bias = _zeros((hidden,), ('embed',), param_dtype)
    self.eps = eps

  def __call__(self, x_btd):
    x = x_btd.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x_btd.dtype)


class MLP(nnx.Module):
  """D -> F -> D with GELU; F is split over the model axis (column- then row-parallel)."""

  def __init__(self, hidden, mlp_dim, *, std, out_std, gelu_approximate, dtype, param_dtype, rngs):
    self.fc = nnx.Dict(kernel=_param(rngs, (hidden, mlp_dim), std, ('embed', 'mlp'), param_dtype),
                       bias=_zeros((mlp_dim,), ('mlp',), param_dtype))
    self.proj = nnx.Dict(kernel=_param(rngs, (mlp_dim, hidden), out_std, ('mlp', 'embed'), param_dtype),
                         bias=_zeros((hidden,), ('embed',), param_dtype))
    self.dtype, self.gelu_approximate = dtype, gelu_approximate

  def __call__(self, x_btd):
    h_btf = project(x_btd, self.fc['kernel'][...].astype(self.dtype))
    h_btf = h_btf + self.fc['bias'][...].astype(self.dtype)
    h_btf = constrain(checkpoint_name(h_btf, 'mlp_in'), ('batch', 'length', 'act_mlp'))
    h_btf = jax.nn.gelu(h_btf, approximate=self.gelu_approximate)
    y_btd = project(h_btf, self.proj['kernel'][...].astype(self.dtype))
    y_btd = y_btd + self.proj['bias'][...].astype(self.dtype)
    return checkpoint_name(constrain(y_btd, RESIDUAL), 'mlp_out')


class SelfAttention(nnx.Module):
  """Fused Q/K/V [D, 3, N, H] and output [N, H, D] projections, split over heads."""

  def __init__(self, hidden, num_heads, *, std, out_std, causal, kind, window, dtype, param_dtype,
               rngs, context='allgather', attention_dropout=0.0):
    head_dim = hidden // num_heads
    # [D, 3, N, H] is GPT-2's c_attn [D, 3D] reshaped, so weights map one to one.
    self.qkv = nnx.Dict(
        kernel=_param(rngs, (hidden, 3, num_heads, head_dim), std, ('embed', None, 'heads', 'kv'),
                      param_dtype),
        bias=_zeros((3, num_heads, head_dim), (None, 'heads', 'kv'), param_dtype))
    self.out = nnx.Dict(
        kernel=_param(rngs, (num_heads, head_dim, hidden), out_std, ('heads', 'kv', 'embed'),
                      param_dtype),
        bias=_zeros((hidden,), ('embed',), param_dtype))
    self.causal, self.kind, self.window, self.dtype = causal, kind, window, dtype
    self.context = context  # dense attention under context parallelism: allgather | ring
    self.rate = attention_dropout  # on the attention probabilities, in training (dense attention only)

  def __call__(self, x_btd, local=None, mask=None, cache=None, decode=None, key=None):
    """`local` (a traced bool) picks the kernel per layer when kind is 'alternating';
    `mask` [B, 1, 1, T] (True = attend) hides padding keys. With a `cache` ({'k', 'v'}, each
    [L, B, S, N, H], all layers) the new keys and values are written at layer `decode['layer']`,
    position `decode['pos']`, and the queries attend over that layer's cache; returns (output,
    updated cache) then."""
    # Heads first in the flattened output ([D, N, 3, H]: a copy of the kernel, small next to
    # the activations), so that heads split over the model axis stay split through the 2D
    # matmul, with no gathering.
    kernel = self.qkv['kernel'][...].astype(self.dtype).transpose(0, 2, 1, 3)
    qkv = project(x_btd, kernel) + self.qkv['bias'][...].astype(self.dtype).transpose(1, 0, 2)
    qkv = constrain(checkpoint_name(qkv, 'qkv'), ('batch', 'length', 'act_heads', None, None))
    q_btnh, k_btnh, v_btnh = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # of [B, T, N, 3, H]
    if cache is not None:
      o_btnh, cache = self._attend_cached(q_btnh, k_btnh, v_btnh, local, cache, decode)
    else:
      zigzag = attention.uses_zigzag(self.kind, self.causal, self.context)
      drop = None if key is None or not self.rate else (self.rate, key)
      core = lambda kind: lambda q, k, v: attention.attend(
          q, k, v, kind=kind, causal=self.causal, window=self.window, mask=mask,
          context=self.context, zigzag=zigzag, dropout=drop)
      if self.kind == 'alternating':
        o_btnh = jax.lax.cond(local, core('local'), core('dense'), q_btnh, k_btnh, v_btnh)
      else:
        o_btnh = core(self.kind)(q_btnh, k_btnh, v_btnh)
    o_btnh = checkpoint_name(o_btnh, 'attn_core')
    y_btd = project(o_btnh, self.out['kernel'][...].astype(self.dtype), n_in=2)
    y_btd = y_btd + self.out['bias'][...].astype(self.dtype)
    y_btd = checkpoint_name(constrain(y_btd, RESIDUAL), 'attn_out')
    return y_btd if cache is None else (y_btd, cache)

  def _attend_cached(self, q_btnh, k_btnh, v_btnh, local, cache, decode):
    """Causal attention of T new positions over a key/value cache of S positions.

    Row b's tokens start at cache position decode['start'][b] (prompts are left-padded);
    everything before it, and every position after the query's own, is masked.
    """
    pos, start_b, i = decode['pos'], decode['start'], decode['layer']
    names = ('layers', 'batch', None, 'act_heads', None)  # the cache stays split over heads
    # This layer's new keys and values go into the stacked cache [L, B, S, N, H] in place.
    cache = {name: constrain(jax.lax.dynamic_update_slice(
                 cache[name], new[None].astype(cache[name].dtype), (i, 0, pos, 0, 0)), names)
             for name, new in (('k', k_btnh), ('v', v_btnh))}
    k_bsnh, v_bsnh = (jax.lax.dynamic_index_in_dim(cache[n], i, 0, keepdims=False) for n in 'kv')
    T, S = q_btnh.shape[1], k_bsnh.shape[1]
    q_pos, k_pos = pos + jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    mask_bts = (k_pos <= q_pos)[None] & (k_pos[None] >= start_b[:, None, None])
    if self.kind != 'dense':
      in_window = k_pos > q_pos - self.window
      mask_bts &= in_window if self.kind == 'local' else (in_window | ~local)
    o_btnh = attention.attend(q_btnh, k_bsnh.astype(q_btnh.dtype), v_bsnh.astype(q_btnh.dtype),
                              causal=False, mask=mask_bts[:, None])
    return o_btnh, cache
