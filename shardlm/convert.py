"""Hugging Face <-> shardlm weights, through safetensors (never pickle).

`python -m shardlm.convert from-hf --model-dir DIR --out CKPT`: a GPT-2 (GPT2LMHeadModel) or
BERT (BertForMaskedLM, BertForPreTraining) directory -> a params-only shardlm checkpoint,
restorable on any mesh, its config in the metadata and the tokenizer files in CKPT/tokenizer/.
`python -m shardlm.convert to-hf --checkpoint CKPT --out DIR`: a params-only or train
checkpoint -> config.json and safetensors (sharded above --max-shard-size) that transformers'
`from_pretrained` loads.
"""
import json
import os
import re
import shutil
import sys
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy, so safetensors' numpy reader can hand it out
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from shardlm import config as config_lib
from shardlm.config import ArgumentParser, ConfigError

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'vocab.json', 'merges.txt', 'vocab.txt', 'tokenizer.model',
                   'spiece.model', 'sentencepiece.bpe.model')
PICKLED = ('*.bin', '*.pt', '*.pth', '*.ckpt', '*.pkl')
VOCAB_ROWS = ('wte.embedding', 'mlm.bias')  # padded on axis 0
ARCHITECTURES = {'gpt2': ('GPT2LMHeadModel', 'GPT2Model'),
                 'bert': ('BertForPreTraining', 'BertForMaskedLM')}
PREFIX = {'gpt2': 'transformer.', 'bert': 'bert.'}
# Buffers and tied copies that old or head-carrying checkpoints hold besides the weights.
IGNORED = re.compile(r'h\.\d+\.attn\.(bias|masked_bias)|embeddings\.position_ids')


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


def _tables(model_type, model):
  D, N = model['hidden'], model['num_heads']
  return (_gpt2_tables if model_type == 'gpt2' else _bert_tables)(D, N, D // N)


def _layer_name(model_type, i, name):
  return f'h.{i}.{name}' if model_type == 'gpt2' else f'encoder.layer.{i}.{name}'


def _is_head(name):  # BERT's heads sit outside the base model: no `bert.` prefix
  return name.startswith('cls.')


# -- config.json <-> shardlm config -------------------------------------------------------------

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


def _model_from_hf(hf: dict, where: str) -> dict:
  """shardlm model keys for a GPT-2 or BERT config.json; refuses what shardlm computes otherwise."""
  if hf['model_type'] == 'gpt2':
    _check(hf, where, 'activation_function', ('gelu_new', 'gelu_pytorch_tanh'),
           "shardlm's GPT uses GPT-2's tanh-approximate GELU")
    _check(hf, where, 'scale_attn_weights', (True,), 'attention scores are scaled by 1/sqrt(H)')
    _check(hf, where, 'scale_attn_by_inverse_layer_idx', (False,),
           'scores are not scaled by layer depth')
    _check(hf, where, 'add_cross_attention', (False,), 'no cross-attention')
    L, D, N, V = _need(hf, where, 'n_layer', 'n_embd', 'n_head', 'vocab_size')
    T = hf.get('n_positions') or _need(hf, where, 'n_ctx')[0]
    return dict(kind='gpt', num_layers=L, hidden=D, num_heads=N, mlp_dim=hf.get('n_inner') or 0,
                seq_len=T, vocab_size=V, init_std=hf.get('initializer_range', 0.02),
                ln_eps=hf.get('layer_norm_epsilon', 1e-5), post_ln=False)
  _check(hf, where, 'hidden_act', ('gelu',), "shardlm's BERT uses the exact (erf) GELU")
  _check(hf, where, 'position_embedding_type', ('absolute',), 'learned absolute positions')
  _check(hf, where, 'type_vocab_size', (2,), 'two token types (segments A and B)')
  _check(hf, where, 'is_decoder', (False,), 'a bidirectional encoder')
  _check(hf, where, 'add_cross_attention', (False,), 'no cross-attention')
  L, D, N, F, T, V = _need(hf, where, 'num_hidden_layers', 'hidden_size', 'num_attention_heads',
                           'intermediate_size', 'max_position_embeddings', 'vocab_size')
  return dict(kind='bert', num_layers=L, hidden=D, num_heads=N, mlp_dim=F, seq_len=T,
              vocab_size=V, init_std=hf.get('initializer_range', 0.02),
              ln_eps=hf.get('layer_norm_eps', 1e-12), post_ln=True)


def _hf_config(model: dict, vocab: int, architecture: str, dtype: str, eod, original) -> dict:
  """config.json for a shardlm model: the imported one updated, or a new one."""
  D, F = model['hidden'], model['mlp_dim'] or 4 * model['hidden']
  if model['kind'] == 'gpt':
    hf = dict(model_type='gpt2', n_layer=model['num_layers'], n_embd=D, n_head=model['num_heads'],
              n_inner=None if F == 4 * D else F, n_positions=model['seq_len'], vocab_size=vocab,
              activation_function='gelu_new', layer_norm_epsilon=model['ln_eps'])
    new = dict(initializer_range=model['init_std'], scale_attn_weights=True,
               bos_token_id=eod, eos_token_id=eod,
               # shardlm trains without dropout
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  else:
    hf = dict(model_type='bert', num_hidden_layers=model['num_layers'], hidden_size=D,
              num_attention_heads=model['num_heads'], intermediate_size=F,
              max_position_embeddings=model['seq_len'], vocab_size=vocab, hidden_act='gelu',
              type_vocab_size=2, layer_norm_eps=model['ln_eps'])
    new = dict(initializer_range=model['init_std'], position_embedding_type='absolute',
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  out = dict(original) if original else {**new}
  out.update(hf, architectures=[architecture], tie_word_embeddings=True, dtype=dtype)
  if 'torch_dtype' in out:  # the spelling of transformers < 4.56
    out['torch_dtype'] = dtype
  return out


# -- reading a Hugging Face directory -----------------------------------------------------------

def _read_config(src: Path) -> dict:
  if not src.is_dir():
    raise ConfigError(f'--model-dir {src} is not a directory')
  path = src / 'config.json'
  try:
    hf = json.loads(path.read_text())
  except FileNotFoundError:
    raise ConfigError(f'{src} has no config.json; expected a Hugging Face model directory '
                      '(config.json + model.safetensors), as save_pretrained writes it') from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} cannot be read: {e}') from None
  if not isinstance(hf, dict):
    raise ConfigError(f'{path} is not a JSON object')
  model_type = hf.get('model_type')
  if model_type not in ARCHITECTURES:
    raise ConfigError(f'{path}: model_type {json.dumps(model_type)} is not supported; shardlm '
                      'converts gpt2 (GPT2LMHeadModel) and bert (BertForMaskedLM, '
                      'BertForPreTraining)')
  arch = (hf.get('architectures') or [ARCHITECTURES[model_type][0]])[0]
  if arch not in ARCHITECTURES[model_type]:
    raise ConfigError(f"{path}: architecture {arch} is not supported; for {model_type} shardlm "
                      f"converts {', '.join(ARCHITECTURES[model_type])}"
                      + (' (BertModel has no masked-LM head)' if arch == 'BertModel' else ''))
  return hf


class _Weights:
  """The tensors of a safetensors model directory by name (prefix stripped), read on demand."""

  def __init__(self, src: Path, model_type: str, architecture: str):
    index = src / 'model.safetensors.index.json'
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{index} is not a safetensors index (a weight_map): {e}') from None
      files = sorted(set(weight_map.values()))
    elif (src / 'model.safetensors').is_file():
      files = ['model.safetensors']
    else:
      pickled = sorted(p.name for pattern in PICKLED for p in src.glob(pattern))
      raise ConfigError(
          f'{src} has no model.safetensors (or model.safetensors.index.json)'
          + (f"; it holds only pickled weights ({', '.join(pickled[:3])}), which shardlm never "
             'loads (unpickling runs code). Convert them once with transformers: python -c "from '
             f"transformers import {architecture}; {architecture}.from_pretrained('{src}')"
             f".save_pretrained('{src}', safe_serialization=True)\"" if pickled else ''))
    self.where, self.dtypes, self.prefixed, self.used = {}, set(), False, set()
    self.src, self.what = src, 'GPT-2' if model_type == 'gpt2' else 'BERT'
    prefix = PREFIX[model_type]
    for name in files:
      path = src / name
      if not path.is_file():
        raise ConfigError(f'{src}: shard {name} named by the index is missing')
      try:
        with safe_open(path, framework='np') as f:
          for key in f.keys():
            short = key[len(prefix):] if key.startswith(prefix) else key
            self.prefixed |= short != key
            # Checkpoints of older BERT code name LayerNorm parameters gamma and beta.
            short = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight',
                           re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', short))
            self.where[short] = (path, key)
      except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f'{path} is not a readable safetensors file: {e}') from None

  def __contains__(self, name):
    return name in self.where

  def __getitem__(self, name) -> np.ndarray:
    if name not in self.where:
      raise ConfigError(f'{self.src} lacks tensor {name}; it is not a complete {self.what} '
                        'checkpoint')
    path, key = self.where[name]
    with safe_open(path, framework='np') as f:
      a = f.get_tensor(key)
    if a.dtype.name not in DTYPES:
      raise ConfigError(f'{path}: tensor {key} is {a.dtype.name}; shardlm reads float32, '
                        'bfloat16 and float16 weights')
    self.used.add(name)
    self.dtypes.add(a.dtype.name)
    return a


def _check_tied(w: _Weights, head: str, embedding: str, what: str):
  """A stored copy of a tied weight must equal the tensor it is tied to."""
  if head in w:
    if not np.array_equal(w[head], w[embedding]):
      raise ConfigError(f'{w.src}: {head} differs from {embedding}; shardlm ties {what} to '
                        'the token embedding, so untied heads cannot be converted')


def _params_from_hf(w: _Weights, model_type, architecture, model, abstract, where):
  """(parameters as the tree `abstract` describes, in numpy, names drawn fresh): HF tensors ->
  shardlm leaves, layers stacked on axis 0, the vocabulary padded with zero rows."""
  import jax
  if model_type == 'gpt2':
    _check_tied(w, 'lm_head.weight', 'wte.weight', 'the LM head')
  else:
    _check_tied(w, 'cls.predictions.decoder.weight', 'embeddings.word_embeddings.weight',
                'the masked-LM decoder')
    if 'cls.predictions.bias' not in w and 'cls.predictions.decoder.bias' in w:
      w.where['cls.predictions.bias'] = w.where['cls.predictions.decoder.bias']
    _check_tied(w, 'cls.predictions.decoder.bias', 'cls.predictions.bias', 'the decoder bias')
  layer_rows, top_rows = _tables(model_type, model)
  flat, fresh = {}, []

  def take(theirs, fwd, name):
    arrays = [w[name(t)] for t in theirs]
    try:
      return fwd(*arrays)
    except ValueError:
      raise ConfigError(f"{w.src}: {', '.join(name(t) for t in theirs)} of shape "
                        f"{', '.join(str(a.shape) for a in arrays)} do not fit {where} "
                        f"(hidden {model['hidden']}, {model['num_heads']} heads)") from None

  for ours, theirs, fwd, _ in layer_rows:
    flat[f'h.blocks.{ours}'] = np.stack([
        take(theirs, fwd, lambda t, i=i: _layer_name(model_type, i, t))
        for i in range(model['num_layers'])])
  for ours, theirs, fwd, _ in top_rows:
    if ours.split('.')[0] in ('pooler', 'sop') and not any(t in w for t in theirs):
      fresh.append(ours)  # BertForMaskedLM: heads shardlm's BERT has and this model lacks
    else:
      flat[ours] = take(theirs, fwd, lambda t: t)
  rng = np.random.default_rng(0)

  def leaf(path, spec):
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    if name in fresh:
      return (rng.standard_normal(spec.shape) * model['init_std'] if name.endswith('kernel')
              else np.zeros(spec.shape)).astype(spec.dtype)
    a = flat.pop(name).astype(spec.dtype)  # float32: upcasting float16 or bfloat16 is exact
    if name in VOCAB_ROWS:  # padding rows are zero: no id reaches them, their logits are masked
      a = np.pad(a, [(0, spec.shape[0] - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    if a.shape != spec.shape:
      raise ConfigError(f'{w.src}: {name} would be {a.shape} but {where} makes it {spec.shape}')
    return a
  params = jax.tree_util.tree_map_with_path(leaf, abstract)
  tied = ('lm_head.weight', 'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')
  unused = sorted(n for n in set(w.where) - w.used if not IGNORED.fullmatch(n) and n not in tied)
  if unused:
    more = f' and {len(unused) - 4} more' if len(unused) > 4 else ''
    raise ConfigError(f"{w.src} holds tensors a plain {architecture} does not: "
                      f"{', '.join(unused[:4])}{more}")
  return params, sorted(fresh)


# -- from-hf ------------------------------------------------------------------------------------

def from_hf(model_dir, out) -> dict:
  """Converts a Hugging Face GPT-2 or BERT directory into a params-only checkpoint at `out`.

  Returns {'path', 'config', 'notes'}: what was written and what the user should know.
  """
  import jax  # late: the error paths above need no JAX
  from shardlm import checkpoint, train
  from shardlm.data import tokenizer as tokenizer_lib
  src, out = Path(model_dir).resolve(), Path(out).resolve()
  hf = _read_config(src)
  if out.exists():
    raise ConfigError(f'--out {out} already exists; choose a new directory for the checkpoint')
  model_type, where, notes = hf['model_type'], f'{src}/config.json', []
  architecture = (hf.get('architectures') or [ARCHITECTURES[model_type][0]])[0]
  model = _model_from_hf(hf, where)
  w = _Weights(src, model_type, architecture)

  cfg = config_lib.defaults()
  cfg.name = f'hf-{model_type}'
  cfg.model.update(model)

  # Tokenizer: a tokenizer.json is what shardlm reads (data.tokenizer); every tokenizer file
  # travels in CKPT/tokenizer/ so that to-hf can hand them back.
  files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
  tokenizer = {'name': 'none', 'vocab_size': model['vocab_size'],
               'eod_id': hf.get('eos_token_id'), 'fingerprint': 'none'}
  if 'tokenizer.json' in files:
    try:
      tok = tokenizer_lib.HFTokenizer(src / 'tokenizer.json')
      tokenizer = {'name': str(out / 'tokenizer' / 'tokenizer.json'), 'vocab_size': tok.vocab_size,
                   'eod_id': tok.eod_id, 'fingerprint': tok.fingerprint}
    except ConfigError as e:
      notes.append(f'the tokenizer is copied but shardlm cannot use it: {e}')
  else:
    notes.append(f'{src} has no tokenizer.json, so the checkpoint names no tokenizer; save a fast '
                 'tokenizer (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) and convert '
                 'again to evaluate or generate')
  cfg.data.tokenizer = tokenizer['name']
  try:
    s = train.setup(cfg, jax.devices()[:1])  # mesh model=1: the vocabulary padded to 128s
  except ConfigError as e:
    raise ConfigError(f'{where} gives a model shardlm cannot build: {e}') from None
  abstract = jax.eval_shape(s.init)['params']

  params, fresh = _params_from_hf(w, model_type, architecture, model, abstract, where)
  if fresh:
    notes.append(f"{architecture} has no {' or '.join(sorted({f.split('.')[0] for f in fresh}))} "
                 "weights: shardlm's BERT has them, so they start from random values "
                 f'(N(0, {model["init_std"]})); to-hf leaves them out again')
  dtype = w.dtypes.pop() if len(w.dtypes) == 1 else 'float32'

  meta = {'config': json.loads(cfg.to_json()), 'tokenizer': tokenizer,
          'model': {'vocab_size': model['vocab_size'], 'padded_vocab': s.model_config.padded_vocab},
          'mesh': {'data': 1, 'fsdp': 1, 'model': 1}, 'processes': 1,
          'hf': {'model_dir': str(src), 'architecture': architecture, 'dtype': dtype,
                 'prefixed': w.prefixed, 'fresh': fresh, 'config': hf,
                 'tokenizer_files': files}}
  # Written under a temporary name, tokenizer included, then renamed: never half there.
  tmp = out.with_name(f'.{out.name}.convert-tmp-{os.getpid()}')
  try:
    checkpoint.save_params(tmp, params, meta)
    if files:
      (tmp / 'tokenizer').mkdir()
      for f in files:
        shutil.copy2(src / f, tmp / 'tokenizer' / f)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'path': out, 'config': cfg, 'notes': notes}


# -- to-hf --------------------------------------------------------------------------------------

def _read_params(path: Path) -> dict:
  """Dotted name -> numpy array of every parameter of a params-only or train checkpoint."""
  from shardlm import checkpoint
  return checkpoint.flat_names(checkpoint.read_params_numpy(path)['params'])


def parse_size(text: str) -> int:
  """'2GB' (10^9), '500MiB' (2^20), '1000' (bytes) -> bytes."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*', str(text).lower())
  units = {'': 1, 'b': 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'tb': 1e12,
           'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}
  if not m or m.group(2) not in units or float(m.group(1)) * units[m.group(2)] < 1:
    raise ConfigError(f"--max-shard-size '{text}' is not a size; write e.g. 2GB, 500MB, 1GiB")
  return int(float(m.group(1)) * units[m.group(2)])


def _write_safetensors(tensors: dict, directory: Path, max_bytes: int) -> list[str]:
  """model.safetensors, or model-0000k-of-0000n.safetensors shards and their index."""
  shards, size = [{}], 0
  for name, a in tensors.items():
    if shards[-1] and size + a.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = a
    size += a.nbytes
  if len(shards) == 1:
    save_file(tensors, directory / 'model.safetensors', metadata={'format': 'pt'})
    (directory / 'model.safetensors').chmod(0o644)  # safetensors writes 0600; this is for sharing
    return ['model.safetensors']
  names = [f'model-{k:05d}-of-{len(shards):05d}.safetensors' for k in range(1, len(shards) + 1)]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, directory / name, metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(shard, name))
  for name in names:
    (directory / name).chmod(0o644)
  index = {'metadata': {'total_size': sum(a.nbytes for a in tensors.values())},
           'weight_map': weight_map}
  (directory / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2) + '\n')
  return [*names, 'model.safetensors.index.json']


def _tokenizer_files(path: Path, meta: dict) -> list[Path]:
  """The checkpoint's own tokenizer/ files, else those next to a tokenizer.json it names."""
  if (path / 'tokenizer').is_dir():
    return sorted(p for p in (path / 'tokenizer').iterdir() if p.is_file())
  name = Path(meta['tokenizer']['name'])
  if name.suffix == '.json' and name.is_file():
    return [name] + [name.parent / f for f in TOKENIZER_FILES
                     if f != name.name and (name.parent / f).is_file()]
  return []


def to_hf(checkpoint_dir, out, max_shard_size='2GB', dtype=None) -> dict:
  """Writes a shardlm checkpoint (params-only or train) as a Hugging Face model directory.

  Returns {'path', 'architecture', 'files', 'notes'}.
  """
  from shardlm import checkpoint
  out = Path(out).resolve()
  max_bytes = parse_size(max_shard_size)
  path = checkpoint.find(checkpoint_dir)
  if out.exists():
    raise ConfigError(f'--out {out} already exists; choose a new directory for the model')
  try:
    meta = checkpoint.read_meta(path)
  except checkpoint.Unreadable as e:
    raise ConfigError(f'checkpoint {path} cannot be read: {e}') from None
  model, hf_meta, notes = meta['config']['model'], meta.get('hf') or {}, []
  kind = model.get('kind', 'gpt')
  if kind == 'gpt' and model.get('attention', 'dense') != 'dense':
    raise ConfigError(f"checkpoint {path} uses model.attention='{model['attention']}'; GPT-2 "
                      'attends densely, so only dense-attention models convert')
  if kind == 'bert' and not model.get('post_ln'):
    raise ConfigError(f'checkpoint {path} is a pre-LN (Megatron) BERT; transformers BERT is the '
                      'original post-LN one, so only model.post_ln=True BERTs convert')
  model_type = 'gpt2' if kind == 'gpt' else 'bert'
  architecture = hf_meta.get('architecture') or ARCHITECTURES[model_type][0]
  dtype = dtype or hf_meta.get('dtype') or model.get('param_dtype', 'float32')
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")

  flat = _read_params(path)
  V = meta['model']['vocab_size']
  for name in VOCAB_ROWS:  # drop the padding rows
    if name in flat:
      flat[name] = flat[name][:V]
  prefix = PREFIX[model_type] if hf_meta.get('prefixed', True) else ''
  hf_name = lambda t: t if model_type == 'bert' and _is_head(t) else prefix + t
  layer_rows, top_rows = _tables(model_type, model)
  skip = set(hf_meta.get('fresh', ())) if architecture == 'BertForMaskedLM' else set()
  tensors = {}

  def put(names, arrays):
    for t, a in zip(names, arrays):
      tensors[hf_name(t)] = np.ascontiguousarray(a).astype(DTYPES[dtype], copy=False)
  try:
    for ours, theirs, _, bwd in layer_rows:
      stacked = flat.pop(f'h.blocks.{ours}')
      for i in range(model['num_layers']):
        put([_layer_name(model_type, i, t) for t in theirs], bwd(stacked[i]))
    for ours, theirs, _, bwd in top_rows:
      if ours in skip:
        flat.pop(ours)
      else:
        put(theirs, bwd(flat.pop(ours)))
  except KeyError as e:
    raise ConfigError(f'checkpoint {path} lacks parameter {e.args[0]} of a shardlm '
                      f'{kind}') from None
  if architecture == 'GPT2Model':
    architecture = 'GPT2LMHeadModel'  # the same weights; the LM head is the tied embedding

  hf = _hf_config(model, V, architecture, dtype, meta['tokenizer'].get('eod_id'),
                  hf_meta.get('config'))
  tok_files = _tokenizer_files(path, meta)
  if not tok_files:
    notes.append(f"checkpoint {path} carries no tokenizer files (tokenizer "
                 f"{meta['tokenizer']['name']}); give transformers one of its own")
  # Written into a temporary directory, then renamed: never half there.
  tmp = out.with_name(f'.{out.name}.convert-tmp-{os.getpid()}')
  try:
    tmp.mkdir(parents=True)
    files = _write_safetensors(tensors, tmp, max_bytes)
    (tmp / 'config.json').write_text(json.dumps(hf, indent=2, sort_keys=True) + '\n')
    for f in tok_files:
      shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'path': out, 'architecture': architecture, 'notes': notes,
          'files': ['config.json', *files, *(f.name for f in tok_files)]}


# -- python -m shardlm.convert ------------------------------------------------------------------

def main(argv=None):
  parser = ArgumentParser(prog='python -m shardlm.convert', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('from-hf',
                     help='a Hugging Face GPT-2 or BERT directory -> a shardlm checkpoint')
  p.add_argument('--model-dir', required=True, help='config.json + model.safetensors (or shards)')
  p.add_argument('--out', required=True, help='a new checkpoint directory')
  p = sub.add_parser('to-hf', help='a shardlm checkpoint -> a Hugging Face model directory')
  p.add_argument('--checkpoint', required=True,
                 help='a params-only or train checkpoint, a directory of them, or a run directory')
  p.add_argument('--out', required=True, help='a new directory')
  p.add_argument('--max-shard-size', default='2GB', help='larger models are split (default 2GB)')
  p.add_argument('--dtype', choices=DTYPES,
                 help="default: the imported model's, else the parameters' (param_dtype)")
  try:
    a = parser.parse_args(argv)
    if a.command == 'from-hf':
      r = from_hf(a.model_dir, a.out)
      m = r['config'].model
      print(f'wrote {r["path"]}: {m.kind} {m.num_layers} layers x {m.hidden} hidden x '
            f'{m.num_heads} heads, vocabulary {m.vocab_size}, {m.seq_len} positions; tokenizer '
            f'{r["config"].data.tokenizer}')
    else:
      r = to_hf(a.checkpoint, a.out, a.max_shard_size, a.dtype)
      print(f"wrote {r['path']}: {r['architecture']} ({', '.join(r['files'])})")
    for note in r['notes']:
      print(f'note: {note}')
  except ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
