"""Hugging Face formats (GPT-2, BERT): tensor names, config.json keys and what each refuses.

One `HFFormat` per `model_type`; shardlm.kinds gives each model kind its format and
shardlm.convert reads and writes the files from it alone.
"""
import dataclasses
import json
import re
from collections.abc import Callable

import numpy as np

from shardlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HFFormat:
  model_type: str             # config.json's `model_type`
  display: str                # the name users know it by, in messages
  architectures: tuple        # `architectures` read; the first when config.json names none
  export_as: dict             # architecture read -> the one written (the same weights)
  refused: dict               # architecture -> why it does not convert (messages only)
  prefix: str                 # of base-model tensors; heads (`heads`) and old checkpoints lack it
  heads: tuple                # name prefixes of tensors outside the base model: never prefixed
  layer: str                  # one layer's tensors: layer.format(i=i) + the table's name
  tables: Callable            # (D, N, H) -> (layer rows, top rows); rows as below
  tied: tuple                 # (stored copy, tensor it is tied to, what it is): equal or refused
  aliases: tuple              # (name, stand-in): the stand-in is read where the name is missing
  ignored: re.Pattern         # buffers stored besides the weights, never read
  optional: tuple             # top-level shardlm leaves (by first name) that some architectures
                              # lack: drawn fresh on import, left out again on export
  without_optional: tuple     # the architectures that lack them
  from_config: Callable       # (config.json, where) -> shardlm model keys (all but `kind`)
  to_config: Callable         # shardlm model, vocab, eod -> (config.json keys, keys of a new one)
  check_export: Callable      # (shardlm model, checkpoint path) -> None; ConfigError if it can't be

  @property
  def described(self) -> str:
    """'bert (BertForMaskedLM, BertForPreTraining)': the architectures written back as read."""
    both_ways = sorted(a for a in self.architectures if a not in self.export_as)
    return f"{self.model_type} ({', '.join(both_ways)})"

  def rows(self, model: dict):
    """(layer rows, top rows) for a shardlm model's dimensions."""
    D, N = model['hidden'], model['num_heads']
    return self.tables(D, N, D // N)

  def layer_name(self, i: int, name: str) -> str:
    return self.layer.format(i=i) + name

  def is_head(self, name: str) -> bool:
    return name.startswith(self.heads)

  def config(self, model: dict, vocab: int, architecture: str, dtype: str, eod, original) -> dict:
    """config.json for a shardlm model: the imported one updated, or a new one."""
    hf, new = self.to_config(model, vocab, eod)
    out = dict(original) if original else {**new}
    out.update(hf, architectures=[architecture], tie_word_embeddings=True, dtype=dtype)
    if 'torch_dtype' in out:  # the spelling of transformers < 4.56
      out['torch_dtype'] = dtype
    return out


# -- name tables --------------------------------------------------------------------------------
# Rows of (shardlm leaf, HF tensor names, HF -> shardlm, shardlm -> HF). Layer rows name one
# layer: shardlm stacks L of them on axis 0 under h.blocks. GPT-2's Conv1D weights are [in, out]
# and c_attn is q|k|v, each head-major, so [D, 3D] is [D, 3, N, H] reshaped; BERT's Linear
# weights are [out, in].

def _same(*names):
  return [(ours, (theirs,), lambda a: a, lambda a: (a,)) for ours, theirs in names]


def _linear(ours, theirs):  # BERT Linear [out, in] <-> shardlm kernel [in, out]
  return (ours, (theirs,), lambda w: w.T, lambda k: (k.T,))


def _norm(ours, theirs):
  return _same((f'{ours}.scale', f'{theirs}.weight'), (f'{ours}.bias', f'{theirs}.bias'))


def _gpt2_tables(D, N, H):
  layer = [*_norm('ln_1', 'ln_1'), *_norm('ln_2', 'ln_2'),
           ('attn.qkv.kernel', ('attn.c_attn.weight',), lambda w: w.reshape(D, 3, N, H),
            lambda k: (k.reshape(D, 3 * D),)),
           ('attn.qkv.bias', ('attn.c_attn.bias',), lambda b: b.reshape(3, N, H),
            lambda b: (b.reshape(3 * D),)),
           ('attn.out.kernel', ('attn.c_proj.weight',), lambda w: w.reshape(N, H, D),
            lambda k: (k.reshape(D, D),)),
           *_same(('attn.out.bias', 'attn.c_proj.bias'), ('mlp.fc.kernel', 'mlp.c_fc.weight'),
                  ('mlp.fc.bias', 'mlp.c_fc.bias'), ('mlp.proj.kernel', 'mlp.c_proj.weight'),
                  ('mlp.proj.bias', 'mlp.c_proj.bias'))]
  top = [*_same(('wte.embedding', 'wte.weight'), ('wpe', 'wpe.weight')), *_norm('ln_f', 'ln_f')]
  return layer, top


def _bert_tables(D, N, H):
  qkv = tuple(f'attention.self.{x}' for x in ('query', 'key', 'value'))
  layer = [('attn.qkv.kernel', tuple(f'{x}.weight' for x in qkv),
            lambda *w: np.stack([x.T for x in w], 1).reshape(D, 3, N, H),
            lambda k: tuple(k.reshape(D, 3, D)[:, c].T for c in range(3))),
           ('attn.qkv.bias', tuple(f'{x}.bias' for x in qkv),
            lambda *b: np.stack(b).reshape(3, N, H), lambda b: tuple(b.reshape(3, D))),
           ('attn.out.kernel', ('attention.output.dense.weight',),
            lambda w: w.T.reshape(N, H, D), lambda k: (k.reshape(D, D).T,)),
           *_same(('attn.out.bias', 'attention.output.dense.bias')),
           *_norm('ln_1', 'attention.output.LayerNorm'),  # post-LN: ln_1(x + attn(x))
           _linear('mlp.fc.kernel', 'intermediate.dense.weight'),
           *_same(('mlp.fc.bias', 'intermediate.dense.bias')),
           _linear('mlp.proj.kernel', 'output.dense.weight'),
           *_same(('mlp.proj.bias', 'output.dense.bias')),
           *_norm('ln_2', 'output.LayerNorm')]
  top = [*_same(('wte.embedding', 'embeddings.word_embeddings.weight'),
                ('wpe', 'embeddings.position_embeddings.weight'),
                ('wtt', 'embeddings.token_type_embeddings.weight')),
         *_norm('ln_e', 'embeddings.LayerNorm'),
         _linear('mlm.dense.kernel', 'cls.predictions.transform.dense.weight'),
         *_same(('mlm.dense.bias', 'cls.predictions.transform.dense.bias')),
         *_norm('mlm.ln', 'cls.predictions.transform.LayerNorm'),
         *_same(('mlm.bias', 'cls.predictions.bias')),
         # BertForMaskedLM has neither: they are drawn fresh on import and left out on export.
         _linear('pooler.kernel', 'pooler.dense.weight'),
         *_same(('pooler.bias', 'pooler.dense.bias')),
         # shardlm's sentence-order head in HF's next-sentence slot (same shape, [D] -> 2).
         _linear('sop.kernel', 'cls.seq_relationship.weight'),
         *_same(('sop.bias', 'cls.seq_relationship.bias'))]
  return layer, top


# -- config.json <-> shardlm model keys ---------------------------------------------------------

def _need(hf: dict, where: str, *keys):
  missing = [k for k in keys if hf.get(k) is None]
  if missing:
    raise ConfigError(f"{where} lacks {', '.join(missing)}")
  return [hf[k] for k in keys]


def _check(hf: dict, where: str, key: str, allowed, why: str):
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise ConfigError(f'{where}: {key}={json.dumps(value)} is not supported ({why}; shardlm '
                      f"needs {' or '.join(json.dumps(a) for a in allowed)})")


def _gpt2_from_config(hf: dict, where: str) -> dict:
  """Refuses what shardlm's GPT computes otherwise."""
  _check(hf, where, 'activation_function', ('gelu_new', 'gelu_pytorch_tanh'),
         "shardlm's GPT uses GPT-2's tanh-approximate GELU")
  _check(hf, where, 'scale_attn_weights', (True,), 'attention scores are scaled by 1/sqrt(H)')
  _check(hf, where, 'scale_attn_by_inverse_layer_idx', (False,),
         'scores are not scaled by layer depth')
  _check(hf, where, 'add_cross_attention', (False,), 'no cross-attention')
  L, D, N, V = _need(hf, where, 'n_layer', 'n_embd', 'n_head', 'vocab_size')
  T = hf.get('n_positions') or _need(hf, where, 'n_ctx')[0]
  return dict(num_layers=L, hidden=D, num_heads=N, mlp_dim=hf.get('n_inner') or 0, seq_len=T,
              vocab_size=V, init_std=hf.get('initializer_range', 0.02),
              ln_eps=hf.get('layer_norm_epsilon', 1e-5), post_ln=False)


def _bert_from_config(hf: dict, where: str) -> dict:
  """Refuses what shardlm's BERT computes otherwise."""
  _check(hf, where, 'hidden_act', ('gelu',), "shardlm's BERT uses the exact (erf) GELU")
  _check(hf, where, 'position_embedding_type', ('absolute',), 'learned absolute positions')
  _check(hf, where, 'type_vocab_size', (2,), 'two token types (segments A and B)')
  _check(hf, where, 'is_decoder', (False,), 'a bidirectional encoder')
  _check(hf, where, 'add_cross_attention', (False,), 'no cross-attention')
  L, D, N, F, T, V = _need(hf, where, 'num_hidden_layers', 'hidden_size', 'num_attention_heads',
                           'intermediate_size', 'max_position_embeddings', 'vocab_size')
  return dict(num_layers=L, hidden=D, num_heads=N, mlp_dim=F, seq_len=T, vocab_size=V,
              init_std=hf.get('initializer_range', 0.02), ln_eps=hf.get('layer_norm_eps', 1e-12),
              post_ln=True)


def _gpt2_to_config(model: dict, vocab: int, eod):
  D, F = model['hidden'], model['mlp_dim'] or 4 * model['hidden']
  hf = dict(model_type='gpt2', n_layer=model['num_layers'], n_embd=D, n_head=model['num_heads'],
            n_inner=None if F == 4 * D else F, n_positions=model['seq_len'], vocab_size=vocab,
            activation_function='gelu_new', layer_norm_epsilon=model['ln_eps'])
  new = dict(initializer_range=model['init_std'], scale_attn_weights=True,
             bos_token_id=eod, eos_token_id=eod,
             # shardlm trains without dropout
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  return hf, new


def _bert_to_config(model: dict, vocab: int, eod):
  D, F = model['hidden'], model['mlp_dim'] or 4 * model['hidden']
  hf = dict(model_type='bert', num_hidden_layers=model['num_layers'], hidden_size=D,
            num_attention_heads=model['num_heads'], intermediate_size=F,
            max_position_embeddings=model['seq_len'], vocab_size=vocab, hidden_act='gelu',
            type_vocab_size=2, layer_norm_eps=model['ln_eps'])
  new = dict(initializer_range=model['init_std'], position_embedding_type='absolute',
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return hf, new


def _gpt2_check_export(model: dict, path):
  if model.get('attention', 'dense') != 'dense':
    raise ConfigError(f"checkpoint {path} uses model.attention='{model['attention']}'; GPT-2 "
                      'attends densely, so only dense-attention models convert')


def _bert_check_export(model: dict, path):
  if not model.get('post_ln'):
    raise ConfigError(f'checkpoint {path} is a pre-LN (Megatron) BERT; transformers BERT is the '
                      'original post-LN one, so only model.post_ln=True BERTs convert')


GPT2 = HFFormat(
    model_type='gpt2', display='GPT-2', architectures=('GPT2LMHeadModel', 'GPT2Model'),
    # GPT2Model holds the same weights; the LM head is the tied embedding.
    export_as={'GPT2Model': 'GPT2LMHeadModel'}, refused={},
    prefix='transformer.', heads=(), layer='h.{i}.', tables=_gpt2_tables,
    tied=(('lm_head.weight', 'wte.weight', 'the LM head'),), aliases=(),
    # Older checkpoints store the attention-mask buffers.
    ignored=re.compile(r'h\.\d+\.attn\.(bias|masked_bias)'),
    optional=(), without_optional=(),
    from_config=_gpt2_from_config, to_config=_gpt2_to_config, check_export=_gpt2_check_export)

BERT = HFFormat(
    model_type='bert', display='BERT', architectures=('BertForPreTraining', 'BertForMaskedLM'),
    export_as={}, refused={'BertModel': 'BertModel has no masked-LM head'},
    prefix='bert.', heads=('cls.',), layer='encoder.layer.{i}.', tables=_bert_tables,
    tied=(('cls.predictions.decoder.weight', 'embeddings.word_embeddings.weight',
           'the masked-LM decoder'),
          ('cls.predictions.decoder.bias', 'cls.predictions.bias', 'the decoder bias')),
    # Older checkpoints store the decoder's bias and no separate one.
    aliases=(('cls.predictions.bias', 'cls.predictions.decoder.bias'),),
    ignored=re.compile(r'embeddings\.position_ids'),
    optional=('pooler', 'sop'), without_optional=('BertForMaskedLM',),
    from_config=_bert_from_config, to_config=_bert_to_config, check_export=_bert_check_export)
