"""The model kinds, registered once: class, objective, batch axes, batches, config checks, HF name.

Nothing else in shardlm branches on `model.kind`: a new kind (or task head) is one `Kind` here.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from shardlm import hf
from shardlm.data import bert as bert_data, loader
from shardlm.errors import ConfigError
from shardlm.model import bert, gpt


@dataclasses.dataclass(frozen=True)
class Kind:
  name: str
  model: type                 # nnx.Module class: model(TransformerConfig, rngs=...)
  objective: Callable         # (model, batch) -> (loss, {extra metrics})
  batch_axes: object          # logical axis names of a batch (a tree matching the batch)
  example: Callable           # (B, T) -> a batch's shapes and dtypes (jax.ShapeDtypeStruct tree)
  transformer: dict           # TransformerConfig fields the kind fixes (causal, GELU form)
  check: Callable             # (cfg) -> None; raises ConfigError on settings the kind refuses
  batches: Callable           # (cfg, tokenizer) -> (loader.Data, train batches, validation batches)
  needed_vocab: Callable      # tokenizer -> ids the model must have (with any special tokens)
  hf: hf.HFFormat             # its Hugging Face format (shardlm.convert reads and writes it)
  causal_lm: bool             # scores text left to right: evaluation and generation take it


def _check_gpt(cfg):
  if cfg.model.post_ln:
    raise ConfigError("model.post_ln=True is for BERT (model.kind='bert'); GPT is pre-LN")


def _gpt_batches(cfg, tok):
  data = loader.from_config(cfg.data, tok, cfg.model.seq_len, cfg.data.batch_size)
  return data, data.train, data.validation


def _check_bert(cfg):
  m = cfg.model
  if m.attention != 'dense':
    raise ConfigError(f"model.attention='{m.attention}' is causal; BERT (model.kind='bert') "
                      "attends both ways: use model.attention='dense'")
  if m.seq_len < 8:
    raise ConfigError(f'model.seq_len={m.seq_len}: a BERT row needs at least 8 positions '
                      '([CLS] A [SEP] B [SEP])')
  if not 0 < cfg.data.mlm_prob < 1:
    raise ConfigError(f'data.mlm_prob={cfg.data.mlm_prob} must be between 0 and 1 (BERT: 0.15)')


def _bert_batches(cfg, tok):
  """BERT rows are built from GPT samples of T-3 tokens (data/bert.py)."""
  T, B = cfg.model.seq_len, cfg.data.batch_size
  data = loader.from_config(cfg.data, tok, T - 4, B)
  make = lambda samples, seed: bert_data.BertBatches(
      samples, tok, T, seed, mask_prob=cfg.data.mlm_prob, whole_word=cfg.data.whole_word)
  return data, make(data.train, cfg.data.seed), make(data.validation, cfg.data.seed + 1)


KINDS = {k.name: k for k in (
    Kind('gpt', gpt.GPT, gpt.objective, gpt.BATCH_AXES,
         example=lambda B, T: jax.ShapeDtypeStruct((B, T + 1), jnp.int32),
         transformer=dict(causal=True, gelu_approximate=True), check=_check_gpt,
         batches=_gpt_batches, needed_vocab=lambda tok: tok.vocab_size, hf=hf.GPT2,
         causal_lm=True),
    Kind('bert', bert.BERT, bert.objective, bert.BATCH_AXES,
         example=lambda B, T: {
             **{k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ('ids', 'types', 'labels')},
             'pad': jax.ShapeDtypeStruct((B, T), jnp.bool_),
             'mlm_mask': jax.ShapeDtypeStruct((B, T), jnp.float32),
             'order': jax.ShapeDtypeStruct((B,), jnp.int32)},
         # BERT uses the exact erf GELU; GPT-2 the tanh approximation.
         transformer=dict(causal=False, gelu_approximate=False), check=_check_bert,
         batches=_bert_batches, needed_vocab=bert_data.vocab_size, hf=hf.BERT,
         causal_lm=False),
)}


def get(name: str) -> Kind:
  if name not in KINDS:
    raise ConfigError(f"model.kind='{name}' is not one of {', '.join(KINDS)}")
  return KINDS[name]


def by_hf_model_type(model_type) -> Kind | None:
  """The kind whose Hugging Face format has this `model_type` (None: no kind has)."""
  return next((k for k in KINDS.values() if k.hf.model_type == model_type), None)
