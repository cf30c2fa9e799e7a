"""BERT: the GPT blocks without the causal mask, a masked-LM head tied to the embedding, and a
sentence-order head. Pre-LN (Megatron's, stable from scratch) or post-LN (original BERT)."""
import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.model.gpt import lm_loss
from shardlm.model.attention import dropout
from shardlm.model.layers import RESIDUAL, Embed, LayerNorm, project
from shardlm.model.transformer import Stack, TransformerConfig
from shardlm.model.axes import constrain

# A batch: ids, token types, padding mask (True = real), MLM targets and where they count, and
# the sentence-order label (1 = the two segments were swapped).
BATCH_AXES = {'ids': ('batch', None), 'types': ('batch', None), 'pad': ('batch', None),
              'labels': ('batch', None), 'mlm_mask': ('batch', None), 'order': ('batch',)}


def _dense(rngs, d_in, d_out, names, std, pdtype):
  return nnx.Dict(kernel=nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), pdtype) * std,
                                   out_sharding=names),
                  bias=nnx.Param(jnp.zeros((d_out,), pdtype), out_sharding=names[1:]))


class BERT(nnx.Module):
  """Call on ids [B, T], token types [B, T] and a padding mask [B, T] (True = real token);
  returns float32 masked-LM logits [B, T, V_padded] and sentence-order logits [B, 2]."""

  def __init__(self, c: TransformerConfig, *, rngs):
    self.config = c
    pdtype, std = jnp.dtype(c.param_dtype), c.init_std
    self.wte = Embed(c.vocab_size, c.padded_vocab, c.hidden, std=std, dtype=jnp.dtype(c.dtype),
                     param_dtype=pdtype, rngs=rngs)
    self.wpe = nnx.Param(jax.random.normal(rngs.params(), (c.seq_len, c.hidden), pdtype) * std,
                         out_sharding=(None, 'embed'))
    self.wtt = nnx.Param(jax.random.normal(rngs.params(), (c.type_vocab, c.hidden), pdtype) * std,
                         out_sharding=(None, 'embed'))
    # Post-LN BERT normalizes the embeddings; pre-LN normalizes the stack's output instead.
    self.ln_e = LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype) if c.post_ln else None
    self.h = Stack(c, rngs=rngs)
    self.ln_f = None if c.post_ln else LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype)
    # The heads are small and replicated over the model axis, as in Megatron-LM.
    self.mlm = nnx.Dict(dense=_dense(rngs, c.hidden, c.hidden, ('embed', None), std, pdtype),
                        ln=LayerNorm(c.hidden, eps=c.ln_eps, param_dtype=pdtype),
                        bias=nnx.Param(jnp.zeros((c.padded_vocab,), pdtype), out_sharding=('vocab',)))
    self.pooler = _dense(rngs, c.hidden, c.hidden, ('embed', None), std, pdtype)
    self.sop = _dense(rngs, c.hidden, 2, ('embed', None), std, pdtype)

  def __call__(self, ids_bt, types_bt, pad_bt, key=None):
    c = self.config
    x_btd = self.features(ids_bt, types_bt, pad_bt, key)
    h_btd = self.mlm['ln'](jax.nn.gelu(self._dense(self.mlm['dense'], x_btd),
                                       approximate=c.gelu_approximate))
    mlm_btv = self.wte.attend(h_btd) + self.mlm['bias'][...].astype(c.dtype)
    pooled_bd = jnp.tanh(self._dense(self.pooler, x_btd[:, 0]))
    return mlm_btv.astype(jnp.float32), self._dense(self.sop, pooled_bd).astype(jnp.float32)

  def _dense(self, p, x):
    return project(x, p['kernel'][...].astype(self.config.dtype)) + p['bias'][...].astype(self.config.dtype)

  def pooled(self, ids_bt, types_bt, pad_bt, key=None):
    """The pooler's tanh of [CLS]'s final state [B, D]: what sentence-level heads read."""
    return jnp.tanh(self._dense(self.pooler, self.features(ids_bt, types_bt, pad_bt, key)[:, 0]))

  def features(self, ids_bt, types_bt, pad_bt, key=None):
    """The stack's output [B, T, D] (after the final LayerNorm when pre-LN)."""
    c = self.config
    T = ids_bt.shape[1]
    x_btd = (self.wte(ids_bt) + self.wpe[...][:T].astype(c.dtype)
             + jnp.take(self.wtt[...].astype(c.dtype), types_bt, axis=0))
    if self.ln_e is not None:
      x_btd = self.ln_e(x_btd)
    if key is not None:  # dropout (training only)
      x_btd = dropout(x_btd, c.dropout, jax.random.fold_in(key, 0))
      key = jax.random.fold_in(key, 1)
    mask = pad_bt[:, None, None, :]  # [B, 1, 1, T]: every query sees every real key
    x_btd = self.h(constrain(x_btd, RESIDUAL), mask=mask, key=key)
    return x_btd if self.ln_f is None else self.ln_f(x_btd)


def bert_loss(mlm_btv, sop_b2, batch, vocab_size):
  """Masked-LM loss over the masked positions plus sentence-order loss; and SOP accuracy."""
  mlm = lm_loss(mlm_btv, batch['labels'], vocab_size, weights_bt=batch['mlm_mask'])
  sop_logp = jax.nn.log_softmax(sop_b2, axis=-1)
  sop = -jnp.mean(jnp.take_along_axis(sop_logp, batch['order'][:, None], axis=-1))
  acc = jnp.mean(jnp.argmax(sop_b2, axis=-1) == batch['order'])
  return mlm + sop, {'mlm_loss': mlm, 'sop_loss': sop, 'sop_acc': acc}


def objective(model: BERT, batch, key=None):
  mlm_btv, sop_b2 = model(batch['ids'], batch['types'], batch['pad'], key)
  return bert_loss(mlm_btv, sop_b2, batch, model.config.vocab_size)
