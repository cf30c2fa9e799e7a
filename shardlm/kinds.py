"""The model kinds, registered once: class, objective, batch axes, batches, config checks, HF name.

Nothing else in shardlm branches on `model.kind`: a new kind (or task head) is one `Kind` here.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from shardlm import hf
from shardlm.data import bert as bert_data, loader, tasks
from shardlm.errors import ConfigError
from shardlm.model import bert, gpt, heads as task_heads


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
  base: str = ''              # a task head's base kind: its checkpoints start this one
  heads: tuple = ()           # top-level parameters this kind adds to its base (drawn fresh)
  packs: bool = False         # packs examples with segment ids: needs dense attention, keys whole
  rows: Callable | None = None  # (examples, tokenizer, cfg) -> a classifier's rows (evaluate)


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


def _check_task(cfg, classify: bool):
  d, m = cfg.data, cfg.model
  if not d.train_jsonl:
    raise ConfigError(f"model.kind='{m.kind}' fine-tunes on data.train_jsonl: set it to a JSONL "
                      'file (docs/finetuning.md)')
  if d.overlong not in tasks.OVERLONG:
    raise ConfigError(f"data.overlong='{d.overlong}' is not one of {', '.join(tasks.OVERLONG)}")
  if classify and (len(d.labels) < 2 or len(set(map(str, d.labels))) != len(d.labels)):
    raise ConfigError(f'data.labels={tuple(d.labels)!r}: a classifier needs at least 2 distinct '
                      "labels, e.g. --config.data.labels=\"('neg', 'pos')\"")


def _task_batches(cfg, tok, formats, build):
  """(loader.Data, train, validation batches) from data.train_jsonl / valid_jsonl: both read and
  checked line by line before anything is built."""
  d, B = cfg.data, cfg.data.batch_size
  train = tasks.read_jsonl(d.train_jsonl, formats)
  valid = tasks.read_jsonl(d.valid_jsonl, formats) if d.valid_jsonl else None
  if valid is None:
    held = max(1, len(train) // 20)
    if len(train) < 2:
      raise ConfigError(f'{d.train_jsonl}: one example, nothing to hold out for validation; '
                        'give data.valid_jsonl')
    train, valid = train[:-held], train[-held:]
  rows = build(train), build(valid)
  summary = (f'{d.train_jsonl}: {len(train)} examples in {len(next(iter(rows[0].values())))} '
             f"rows; validation {d.valid_jsonl or 'the last 5% of it'}: {len(valid)} examples")
  return (loader.Data(None, None, None, summary), tasks.TaskBatches(rows[0], B, d.seed),
          tasks.TaskBatches(rows[1], B, d.seed, shuffle=False))


def _sft_batches(cfg, tok):
  return _task_batches(cfg, tok, tasks.SFT_FORMATS, lambda exs: tasks.pack_sft(
      exs, tok, cfg.model.seq_len, cfg.data.overlong))


def _classify_rows(bert_kind: bool):
  return lambda exs, tok, cfg: tasks.classify_rows(exs, tok, cfg.model.seq_len, tuple(cfg.data.labels),
                                                   bert_kind, cfg.data.overlong)


def _classify_batches(bert_kind: bool):
  rows = _classify_rows(bert_kind)
  return lambda cfg, tok: _task_batches(cfg, tok, tasks.CLASSIFY_FORMATS, lambda exs: rows(exs, tok, cfg))


def _choice_batches(bert_kind: bool):
  return lambda cfg, tok: _task_batches(cfg, tok, tasks.CHOICE_FORMATS, lambda exs: tasks.choice_rows(
      exs, tok, cfg.model.seq_len, bert_kind, cfg.data.overlong))


def _check_choice(cfg):
  if cfg.data.labels:
    raise ConfigError(f'data.labels={tuple(cfg.data.labels)!r}: a multiple-choice label is the index '
                      'of the right choice; leave data.labels empty')
  _check_task(cfg, classify=False)


def _classify_example(B, T):
  return {**{k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ('ids', 'types')},
          'pad': jax.ShapeDtypeStruct((B, T), jnp.bool_), 'label': jax.ShapeDtypeStruct((B,), jnp.int32)}


def relatives(kind: Kind) -> tuple:
  """The kinds whose checkpoints hold `kind`'s base model (a head's base, other heads on it)."""
  family = kind.base or kind.name
  return tuple(k.name for k in KINDS.values() if (k.base or k.name) == family and k is not kind)


_GPT = dict(transformer=dict(causal=True, gelu_approximate=True),
            needed_vocab=lambda tok: tok.vocab_size, hf=hf.GPT2)
_BERT = dict(transformer=dict(causal=False, gelu_approximate=False),
             needed_vocab=bert_data.vocab_size, hf=hf.BERT)
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
    # Fine-tuning (model/heads.py, data/tasks.py): a GPT trained on completions only; classifiers.
    Kind('gpt_sft', gpt.GPT, task_heads.sft_objective, task_heads.SFT_BATCH_AXES,
         example=lambda B, T: {'tokens': jax.ShapeDtypeStruct((B, T + 1), jnp.int32),
                               'segments': jax.ShapeDtypeStruct((B, T + 1), jnp.int32),
                               'weights': jax.ShapeDtypeStruct((B, T), jnp.float32)},
         check=lambda cfg: (_check_gpt(cfg), _check_task(cfg, classify=False)),
         batches=_sft_batches, causal_lm=True, base='gpt', packs=True, **_GPT),
    Kind('gpt_cls', task_heads.GPTClassifier, task_heads.classify_objective,
         task_heads.CLASSIFY_BATCH_AXES, example=_classify_example,
         check=lambda cfg: (_check_gpt(cfg), _check_task(cfg, classify=True)),
         batches=_classify_batches(False), causal_lm=False, base='gpt', heads=('cls',),
         rows=_classify_rows(False), **_GPT),
    Kind('bert_cls', task_heads.BERTClassifier, task_heads.classify_objective,
         task_heads.CLASSIFY_BATCH_AXES, example=_classify_example,
         check=lambda cfg: (_check_bert(cfg), _check_task(cfg, classify=True)),
         batches=_classify_batches(True), causal_lm=False, base='bert', heads=('cls',),
         rows=_classify_rows(True), **_BERT),
    # Multiple choice (RACE): the classifiers with a one-output head, a softmax over the choices.
    Kind('bert_choice', task_heads.BERTClassifier, task_heads.choice_objective,
         task_heads.CHOICE_BATCH_AXES,
         example=lambda B, T: {**{k: jax.ShapeDtypeStruct((B, 4, T), jnp.int32) for k in ('ids', 'types')},
                               'pad': jax.ShapeDtypeStruct((B, 4, T), jnp.bool_),
                               'valid': jax.ShapeDtypeStruct((B, 4), jnp.bool_),
                               'label': jax.ShapeDtypeStruct((B,), jnp.int32)},
         check=lambda cfg: (_check_bert(cfg), _check_choice(cfg)), batches=_choice_batches(True),
         causal_lm=False, base='bert', heads=('cls',),
         **{**_BERT, 'transformer': {**_BERT['transformer'], 'num_labels': 1}}),
)}


def get(name: str) -> Kind:
  if name not in KINDS:
    raise ConfigError(f"model.kind='{name}' is not one of {', '.join(KINDS)}")
  return KINDS[name]


def by_hf_model_type(model_type) -> Kind | None:
  """The kind whose Hugging Face format has this `model_type` (None: no kind has)."""
  return next((k for k in KINDS.values() if k.hf.model_type == model_type), None)
