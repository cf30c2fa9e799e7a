"""GPT (Megatron-LM / GPT-2): learned positions, pre-LayerNorm blocks scanned over layers, tied head."""
import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.model import attention
from shardlm.model.attention import dropout
from shardlm.model.layers import RESIDUAL, Embed, LayerNorm
from shardlm.model.transformer import Stack, TransformerConfig
from shardlm.model.axes import constrain

GPTConfig = TransformerConfig
BATCH_AXES = ('batch', None)  # tokens [B, T+1]: inputs and, shifted by one, targets


class GPT(nnx.Module):
  """Causal LM. Call on token ids [B, T]; returns float32 logits [B, T, V_padded]."""

  def __init__(self, c: TransformerConfig, *, rngs):
    self.config = c
    pdtype = jnp.dtype(c.param_dtype)
    self.wte = Embed(c.vocab_size, c.padded_vocab, c.hidden, std=c.init_std,
                     dtype=jnp.dtype(c.dtype), param_dtype=pdtype, rngs=rngs)
    self.wpe = nnx.Param(jax.random.normal(rngs.params(), (c.seq_len, c.hidden), pdtype) * c.init_std,
                         out_sharding=(None, 'embed'))
    self.h = Stack(c, rngs=rngs)
    self.ln_f = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)

  def __call__(self, ids_bt, cache=None, decode=None, *, key=None, segments_bt=None):
    """Training and scoring: `model(ids)`. Decoding: `model(ids, cache, decode)` with a key/value
    cache from `init_cache` and decode = {'pos': first cache position of `ids`, 'start': [B]
    position where each row's text begins}; returns (logits, updated cache).

    `key`: dropout's (training only). `segments_bt` [B, T]: several examples packed in a row
    (ids 1, 2, ...; 0 = padding): a token attends only within its own example, and positions
    restart at each example's start."""
    x_btd, cache = self.features(ids_bt, cache, decode, key=key, segments_bt=segments_bt)
    logits_btv = self.wte.attend(x_btd).astype(jnp.float32)
    return logits_btv if cache is None else (logits_btv, cache)

  def features(self, ids_bt, cache=None, decode=None, *, key=None, segments_bt=None):
    """(The final LayerNorm's output [B, T, D], the updated cache or None): what the LM head and
    the task heads (model/heads.py) read."""
    c = self.config
    T = ids_bt.shape[1]
    # Causal ring attention balances its work when the sequence runs in zigzag order: the
    # tokens and positions go in reordered, the hidden states come out in order.
    zigzag = cache is None and attention.uses_zigzag(c.attention, c.causal, c.context_attention)
    mask = None
    if segments_bt is not None:
      if zigzag or cache is not None:
        raise ValueError('packed segments take dense attention without ring or cache')
      pos_emb = jnp.take(self.wpe[...], packed_positions(segments_bt), axis=0)
      mask = (segments_bt[:, None, :, None] == segments_bt[:, None, None, :])  # [B, 1, T, T]
    elif cache is None:
      pos_emb = self.wpe[...][:T][None]
      if zigzag:
        ids_bt, pos_emb = attention.to_zigzag(ids_bt), attention.to_zigzag(pos_emb)
    else:  # positions count from each row's start, so left padding does not shift them
      pos_bt = jnp.maximum(decode['pos'] + jnp.arange(T)[None] - decode['start'][:, None], 0)
      pos_emb = jnp.take(self.wpe[...], pos_bt, axis=0)
    x_btd = self.wte(ids_bt) + pos_emb.astype(c.dtype)
    if key is not None:
      x_btd = dropout(x_btd, c.dropout, jax.random.fold_in(key, 0))
      key = jax.random.fold_in(key, 1)
    x_btd = constrain(x_btd, RESIDUAL)
    out = self.h(x_btd, mask=mask, cache=cache, decode=decode, key=key)
    x_btd, cache = out if cache is not None else (out, None)
    if zigzag:
      x_btd = constrain(attention.from_zigzag(x_btd), RESIDUAL)
    return self.ln_f(x_btd), cache

  def init_cache(self, batch: int, length: int, dtype=None):
    """Zeroed keys and values for `length` positions: {'k', 'v'}, each [L, B, S, N, H]."""
    c = self.config
    shape = (c.num_layers, batch, length, c.num_heads, c.hidden // c.num_heads)
    zeros = jnp.zeros(shape, dtype or c.dtype)
    names = ('layers', 'batch', None, 'act_heads', None)
    return {'k': constrain(zeros, names), 'v': constrain(zeros, names)}


def packed_positions(segments_bt):
  """Each token's position within its own example: 0 where a new segment id begins."""
  T = segments_bt.shape[1]
  starts = jnp.concatenate([jnp.ones_like(segments_bt[:, :1], bool),
                            segments_bt[:, 1:] != segments_bt[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, jnp.arange(T)[None], 0), axis=1)
  return jnp.arange(T)[None] - first


def mask_padding(logits_btv, vocab_size):
  """Padded vocabulary entries get a logit no softmax or sampling will pick."""
  V = logits_btv.shape[-1]
  if V == vocab_size:
    return logits_btv
  return jnp.where(jnp.arange(V) < vocab_size, logits_btv, -1e9)


def token_nll(logits_btv, targets_bt, vocab_size):
  """Per-token next-token cross-entropy [B, T] in float32, padded vocabulary masked out.

  The target logit is picked with a one-hot product rather than a gather, so that
  logits sharded on V are reduced in place and never gathered whole.
  """
  logits_btv = mask_padding(logits_btv.astype(jnp.float32), vocab_size)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  one_hot = jax.nn.one_hot(targets_bt, logits_btv.shape[-1], dtype=logits_btv.dtype)
  return logz_bt - jnp.sum(logits_btv * one_hot, axis=-1)


def lm_loss(logits_btv, targets_bt, vocab_size, weights_bt=None):
  """Mean cross-entropy; `weights_bt` (0/1) restricts it to some positions (BERT's masks)."""
  nll_bt = token_nll(logits_btv, targets_bt, vocab_size)
  if weights_bt is None:
    return jnp.mean(nll_bt)
  return jnp.sum(nll_bt * weights_bt) / jnp.maximum(jnp.sum(weights_bt), 1)


def objective(model: GPT, tokens_bt, key=None):
  """(loss, extra metrics) of one batch of T+1-token samples; `key`: dropout's."""
  logits_btv = model(tokens_bt[:, :-1], key=key)
  return lm_loss(logits_btv, tokens_bt[:, 1:], model.config.vocab_size), {}
