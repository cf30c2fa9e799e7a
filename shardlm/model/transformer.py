"""The transformer stack shared by GPT and BERT: its config, one block, and the layer runner that
applies L blocks: scanned, unrolled, or pipelined over stages (model/pipeline.py)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.model import pipeline
from shardlm.model.axes import constrain
from shardlm.model.attention import dropout
from shardlm.model.layers import MLP, RESIDUAL, LayerNorm, SelfAttention

# What each remat policy keeps from the forward pass; everything else is recomputed.
# `selective` recomputes only the attention core (scores, softmax, attention over values),
# as Korthikanti et al. 2022 do; `full` keeps only the residual stream between layers.
_SAVED = {
    'none': None,
    'selective': ('qkv', 'attn_out', 'mlp_in', 'mlp_out'),
    'full': (),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  num_layers: int
  hidden: int
  num_heads: int
  mlp_dim: int
  seq_len: int
  vocab_size: int
  padded_vocab: int
  init_std: float = 0.02
  ln_eps: float = 1e-5
  remat: str = 'none'
  attention: str = 'dense'  # dense | local | alternating (even layers dense, odd local)
  window: int = 256
  context_attention: str = 'allgather'  # dense attention with T split: allgather | ring
  scan_layers: bool = True
  causal: bool = True
  post_ln: bool = False     # LayerNorm after each residual add (original BERT) instead of before
  gelu_approximate: bool = True  # GPT-2's tanh GELU; BERT uses the exact erf form
  type_vocab: int = 2       # BERT's token types (segments)
  dropout: float = 0.0      # training only: embeddings, attention and MLP outputs
  attention_dropout: float = 0.0  # training only: attention probabilities
  num_labels: int = 0       # classification heads (model/heads.py): how many classes
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  stages: int = 1           # P > 1: the pipeline runner; the layer stack stored stage-major
  repeats: int = 1          # R: circular repeats
  microbatches: int = 1     # M: pipeline micro-batches

  @property
  def layer_order(self):
    """Which layer each position of the stored stack holds (None: the natural order)."""
    if self.stages == 1 or self.repeats == 1:
      return None
    return pipeline.stage_major(self.num_layers, self.stages, self.repeats)

  @classmethod
  def from_config(cls, model_cfg, padded_vocab: int, **fixed) -> 'TransformerConfig':
    """From the config's `model` section; `fixed`: the fields a model kind sets (causal, ...)."""
    m = model_cfg
    return cls(num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
               mlp_dim=m.mlp_dim or 4 * m.hidden, seq_len=m.seq_len, vocab_size=m.vocab_size,
               padded_vocab=padded_vocab, init_std=m.init_std, ln_eps=m.ln_eps, remat=m.remat,
               attention=m.attention, window=m.window,
               context_attention=m.context_attention, scan_layers=m.scan_layers,
               post_ln=m.post_ln, dropout=m.dropout, attention_dropout=m.attention_dropout,
               dtype=m.dtype, param_dtype=m.param_dtype, **fixed)


class Block(nnx.Module):
  """Pre-LN: x + attn(ln_1(x)), then + mlp(ln_2(x)) (Megatron-LM, GPT-2, Megatron BERT).
  Post-LN: ln_1(x + attn(x)), then ln_2(x + mlp(x)) (original BERT)."""

  def __init__(self, c: TransformerConfig, *, rngs):
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)  # residual projections, GPT-2 style
    self.ln_1 = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)
    self.attn = SelfAttention(c.hidden, c.num_heads, std=c.init_std, out_std=out_std,
                              causal=c.causal, kind=c.attention, window=c.window, dtype=dtype,
                              param_dtype=pdtype, rngs=rngs, context=c.context_attention,
                              attention_dropout=c.attention_dropout)
    self.ln_2 = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)
    self.mlp = MLP(c.hidden, c.mlp_dim, std=c.init_std, out_std=out_std,
                   gelu_approximate=c.gelu_approximate, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.post_ln, self.rate = c.post_ln, c.dropout

  def __call__(self, x_btd, local=None, mask=None, cache=None, decode=None, key=None):
    """With a key/value `cache` (decoding) returns (x, updated cache). `key`: dropout's (training
    only; None: none)."""
    new_cache = None
    keys = [None] * 3 if key is None else [jax.random.fold_in(key, i) for i in range(3)]

    def attn(x):
      nonlocal new_cache
      out = self.attn(x, local, mask, cache, decode, key=keys[0])
      if cache is not None:
        out, new_cache = out
      return dropout(out, self.rate, keys[1])

    mlp = lambda x: dropout(self.mlp(x), self.rate, keys[2])
    if self.post_ln:
      x_btd = self.ln_1(x_btd + attn(x_btd))
      x_btd = self.ln_2(x_btd + mlp(x_btd))
    else:
      x_btd = x_btd + attn(self.ln_1(x_btd))
      x_btd = x_btd + mlp(self.ln_2(x_btd))
    x_btd = constrain(x_btd, RESIDUAL)
    return x_btd if cache is None else (x_btd, new_cache)


class Stack(nnx.Module):
  """L blocks whose parameters are stacked on a leading `layers` axis, run by lax.scan, unrolled,
  or pipelined. A circular pipeline (R > 1) stores the stack in its stage-major order
  (`TransformerConfig.layer_order`); checkpoints record the order and restores convert it."""

  def __init__(self, c: TransformerConfig, *, rngs):
    self.config = c

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(c, rngs=rngs)

    self.blocks = make_blocks(rngs)
    if c.layer_order is not None:  # drawn in layer order, whatever the layout
      state = nnx.state(self.blocks, nnx.Param)
      nnx.update(self.blocks, jax.tree.map(lambda a: a[c.layer_order], state))

  def __call__(self, x_btd, mask=None, cache=None, decode=None, key=None):
    """With a `cache` ({'k', 'v'}, each [L, B, S, N, H]) returns (x, updated cache). `key`:
    dropout's, folded with each layer's index (training only; None: no dropout).

    Decoding carries the whole stacked cache from layer to layer, and layer i writes only its
    new positions into it (decode['layer'] = i): with the cache donated, XLA updates it in
    place, so a step costs the new tokens, not a copy of the cache.
    """
    c = self.config
    graphdef, layer_params = nnx.split(self.blocks)
    local = jnp.arange(c.num_layers) % 2 == 1  # used only by 'alternating'
    if cache is not None:
      if c.stages > 1:
        raise ValueError('decoding runs without the pipeline: build the model with mesh.stage=1')
      def decode_layer(carry, xs):
        x_btd, cache = carry
        params, is_local, i = xs
        return nnx.merge(graphdef, params)(x_btd, is_local, mask, cache, {**decode, 'layer': i}), None
      xs = (layer_params, local, jnp.arange(c.num_layers))
      if c.scan_layers:
        (x_btd, cache), _ = jax.lax.scan(decode_layer, (x_btd, cache), xs)
      else:
        for i in range(c.num_layers):
          (x_btd, cache), _ = decode_layer((x_btd, cache), jax.tree.map(lambda a: a[i], xs))
      return x_btd, cache

    def block(x_btd, params, is_local, mask, key=None):
      return nnx.merge(graphdef, params)(x_btd, is_local, mask, key=key)

    def remat(f):
      saved = _SAVED[c.remat]
      if saved is None:
        return f
      policy = jax.checkpoint_policies.save_only_these_names(*saved)
      return jax.checkpoint(f, policy=policy, prevent_cse=False)

    if c.stages > 1:
      if key is not None and (c.dropout or c.attention_dropout):
        raise ValueError('dropout under the pipeline is not built (runtime.check_model refuses it)')
      # Each parameter's logical names, as its module declared them (`layers` first).
      names = jax.tree.map(lambda v: tuple(v.get_metadata()['out_sharding']), layer_params,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
      return pipeline.run(block, remat, layer_params, names, x_btd, mask, stages=c.stages,
                          repeats=c.repeats, microbatches=c.microbatches, scan=c.scan_layers)
    layer = remat(block)
    # Layer i's dropout draws from fold_in(key, i): recomputation (remat) draws the same masks.
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(c.num_layers))
    if c.scan_layers:
      x_btd, _ = jax.lax.scan(lambda x, xs: (layer(x, *xs[:2], mask, xs[2]), None), x_btd,
                              (layer_params, local, keys))
    else:  # unrolled: compile time grows with depth, but no stacking of saved activations
      for i in range(c.num_layers):
        x_btd = layer(x_btd, *jax.tree.map(lambda a: a[i], (layer_params, local)), mask,
                      None if keys is None else keys[i])
    return x_btd
