"""GPT (Megatron-LM / GPT-2): learned positions, pre-LayerNorm blocks scanned over layers, tied head."""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.model.layers import MLP, RESIDUAL, Embed, LayerNorm, SelfAttention
from shardlm.sharding import constrain

# What each remat policy keeps from the forward pass; everything else is recomputed.
# `selective` recomputes only the attention core (scores, softmax, attention over values),
# as Korthikanti et al. 2022 do; `full` keeps only the residual stream between layers.
_SAVED = {
    'none': None,
    'selective': ('qkv', 'attn_out', 'mlp_in', 'mlp_out'),
    'full': (),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
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
  causal: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @classmethod
  def from_config(cls, model_cfg, padded_vocab: int) -> 'GPTConfig':
    m = model_cfg
    return cls(num_layers=m.num_layers, hidden=m.hidden, num_heads=m.num_heads,
               mlp_dim=m.mlp_dim or 4 * m.hidden, seq_len=m.seq_len, vocab_size=m.vocab_size,
               padded_vocab=padded_vocab, init_std=m.init_std, ln_eps=m.ln_eps, remat=m.remat,
               attention=m.attention, window=m.window, dtype=m.dtype, param_dtype=m.param_dtype)


class Block(nnx.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(x)): pre-LayerNorm, as Megatron-LM and GPT-2."""

  def __init__(self, c: GPTConfig, *, rngs):
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)  # residual projections, GPT-2 style
    self.ln_1 = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)
    self.attn = SelfAttention(c.hidden, c.num_heads, std=c.init_std, out_std=out_std,
                              causal=c.causal, kind=c.attention, window=c.window, dtype=dtype,
                              param_dtype=pdtype, rngs=rngs)
    self.ln_2 = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)
    self.mlp = MLP(c.hidden, c.mlp_dim, std=c.init_std, out_std=out_std, dtype=dtype,
                   param_dtype=pdtype, rngs=rngs)

  def __call__(self, x_btd, local=None):
    x_btd = x_btd + self.attn(self.ln_1(x_btd), local)
    x_btd = x_btd + self.mlp(self.ln_2(x_btd))
    return constrain(x_btd, RESIDUAL)


class GPT(nnx.Module):
  """Causal LM. Call on token ids [B, T]; returns float32 logits [B, T, V_padded]."""

  def __init__(self, c: GPTConfig, *, rngs):
    self.config = c
    pdtype = jnp.dtype(c.param_dtype)
    self.wte = Embed(c.vocab_size, c.padded_vocab, c.hidden, std=c.init_std,
                     dtype=jnp.dtype(c.dtype), param_dtype=pdtype, rngs=rngs)
    self.wpe = nnx.Param(jax.random.normal(rngs.params(), (c.seq_len, c.hidden), pdtype) * c.init_std,
                         out_sharding=(None, 'embed'))

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(c, rngs=rngs)

    self.h = make_blocks(rngs)  # one Block whose parameters have a leading L axis
    self.ln_f = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)

  def __call__(self, ids_bt):
    c = self.config
    T = ids_bt.shape[1]
    x_btd = self.wte(ids_bt) + self.wpe[...][:T].astype(c.dtype)
    x_btd = constrain(x_btd, RESIDUAL)

    graphdef, layer_params = nnx.split(self.h)

    def layer(x_btd, xs):
      params, local = xs
      return nnx.merge(graphdef, params)(x_btd, local), None

    saved = _SAVED[c.remat]
    if saved is not None:
      policy = jax.checkpoint_policies.save_only_these_names(*saved)
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    local = jnp.arange(c.num_layers) % 2 == 1  # used only by 'alternating'
    x_btd, _ = jax.lax.scan(layer, x_btd, (layer_params, local))

    logits_btv = self.wte.attend(self.ln_f(x_btd))
    return logits_btv.astype(jnp.float32)


def lm_loss(logits_btv, targets_bt, vocab_size):
  """Mean next-token cross-entropy in float32, padded vocabulary entries masked out.

  The target logit is picked with a one-hot product rather than a gather, so that
  logits sharded on V are reduced in place and never gathered whole.
  """
  V = logits_btv.shape[-1]
  logits_btv = logits_btv.astype(jnp.float32)
  if V > vocab_size:
    logits_btv = jnp.where(jnp.arange(V) < vocab_size, logits_btv, -1e9)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_bt = jnp.sum(logits_btv * jax.nn.one_hot(targets_bt, V, dtype=logits_btv.dtype), axis=-1)
  return jnp.mean(logz_bt - target_bt)
