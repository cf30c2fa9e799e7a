"""Task heads on the pretrained models, each a model kind (shardlm/kinds.py): supervised
fine-tuning's loss on completion tokens, and classification on GPT's last token or BERT's [CLS].

A head's model holds every parameter of its base model under the same names, plus its own
(`cls`), so that a GPT or BERT checkpoint (trained here or imported from Hugging Face) starts it:
train.init_from reads the base's parameters and draws the head's.
"""
import jax
import jax.numpy as jnp

from shardlm.model import bert, gpt
from shardlm.model.attention import dropout
from shardlm.model.layers import project
from shardlm.model.transformer import TransformerConfig

SFT_BATCH_AXES = {'tokens': ('batch', None), 'segments': ('batch', None), 'weights': ('batch', None)}
CLASSIFY_BATCH_AXES = {'ids': ('batch', None), 'types': ('batch', None), 'pad': ('batch', None),
                       'label': ('batch',)}
CHOICE_BATCH_AXES = {'ids': ('batch', None, None), 'types': ('batch', None, None),
                     'pad': ('batch', None, None), 'valid': ('batch', None), 'label': ('batch',)}


def sft_objective(model: gpt.GPT, batch, key=None):
  """Next-token loss on the completion tokens only (`weights`), normalized by their count; the
  packed examples of a row see only themselves (`segments`)."""
  logits_btv = model(batch['tokens'][:, :-1], key=key, segments_bt=batch['segments'][:, :-1])
  loss = gpt.lm_loss(logits_btv, batch['tokens'][:, 1:], model.config.vocab_size,
                     weights_bt=batch['weights'])
  return loss, {'completion_tokens': jnp.sum(batch['weights'])}


def _head(rngs, c: TransformerConfig):
  return bert._dense(rngs, c.hidden, c.num_labels, ('embed', None), c.init_std, jnp.dtype(c.param_dtype))


def _logits(c: TransformerConfig, head, x_bd, key):  # [B, D] -> [B, labels]
  x_bd = dropout(x_bd, c.dropout, key)
  out = project(x_bd, head['kernel'][...].astype(c.dtype)) + head['bias'][...].astype(c.dtype)
  return out.astype(jnp.float32)


class GPTClassifier(gpt.GPT):
  """GPT read at each row's last real token: logits [B, num_labels]."""

  def __init__(self, c: TransformerConfig, *, rngs):
    super().__init__(c, rngs=rngs)
    self.cls = _head(rngs, c)

  def classify(self, ids_bt, types_bt, pad_bt, key=None):
    del types_bt  # GPT has no token types
    body, head = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
    x_btd, _ = self.features(ids_bt, key=body)
    last_b = jnp.maximum(jnp.sum(pad_bt, axis=1) - 1, 0)
    x_bd = jnp.take_along_axis(x_btd, last_b[:, None, None], axis=1)[:, 0]
    return _logits(self.config, self.cls, x_bd, head)


class BERTClassifier(bert.BERT):
  """BERT's pooled [CLS] (the pooler, as Megatron-LM and Hugging Face classify): logits
  [B, num_labels]. The pretraining heads stay (unused), so that checkpoints keep one layout."""

  def __init__(self, c: TransformerConfig, *, rngs):
    super().__init__(c, rngs=rngs)
    self.cls = _head(rngs, c)

  def classify(self, ids_bt, types_bt, pad_bt, key=None):
    body, head = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
    pooled_bd = self.pooled(ids_bt, types_bt, pad_bt, key=body)
    return _logits(self.config, self.cls, pooled_bd, head)


def choice_objective(model, batch, key=None):
  """Multiple choice: every (example, choice) row scored by a one-output head, a softmax over an
  example's choices (those it has), cross-entropy against the right one; accuracy."""
  B, choices, T = batch['ids'].shape
  flat = (batch[k].reshape(B * choices, T) for k in ('ids', 'types', 'pad'))
  scores = model.classify(*flat, key).reshape(B, choices)
  scores = jnp.where(batch['valid'], scores, -1e9)
  logp = jax.nn.log_softmax(scores, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, batch['label'][:, None], axis=-1))
  return loss, {'accuracy': jnp.mean(jnp.argmax(scores, axis=-1) == batch['label'])}


def classify_objective(model, batch, key=None):
  """Cross-entropy over the labels; accuracy."""
  logits = model.classify(batch['ids'], batch['types'], batch['pad'], key)  # [B, labels]
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, batch['label'][:, None], axis=-1))
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits, axis=-1) == batch['label'])}
