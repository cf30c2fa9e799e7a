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
from pathlib import Path

import jax
import ml_dtypes  # registers bfloat16 with numpy, so safetensors' numpy reader can hand it out
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from shardlm import checkpoint, config as config_lib, errors, kinds, runtime
from shardlm.data import tokenizer as tokenizer_lib
from shardlm.errors import ArgumentParser, ConfigError
from shardlm.hf import HFFormat

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'vocab.json', 'merges.txt', 'vocab.txt', 'tokenizer.model',
                   'spiece.model', 'sentencepiece.bpe.model')
PICKLED = ('*.bin', '*.pt', '*.pth', '*.ckpt', '*.pkl')
VOCAB_ROWS = ('wte.embedding', 'mlm.bias')  # padded on axis 0


# -- reading a Hugging Face directory -----------------------------------------------------------

def _read_config(src: Path) -> tuple[dict, kinds.Kind, str]:
  """(config.json, the model kind of its model_type, the architecture)."""
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
  kind = kinds.by_hf_model_type(model_type)
  if kind is None:
    raise ConfigError(f'{path}: model_type {json.dumps(model_type)} is not supported; shardlm '
                      f"converts {' and '.join(k.hf.described for k in kinds.KINDS.values())}")
  fmt = kind.hf
  arch = (hf.get('architectures') or [fmt.architectures[0]])[0]
  if arch not in fmt.architectures:
    raise ConfigError(f"{path}: architecture {arch} is not supported; for {model_type} shardlm "
                      f"converts {', '.join(fmt.architectures)}"
                      + (f' ({fmt.refused[arch]})' if arch in fmt.refused else ''))
  return hf, kind, arch


class _Weights:
  """The tensors of a safetensors model directory by name (prefix stripped), read on demand."""

  def __init__(self, src: Path, fmt: HFFormat, architecture: str):
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
    self.src, self.what, prefix = src, fmt.display, fmt.prefix
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


def _check_tied(w: _Weights, fmt: HFFormat):
  """Stand-ins fill in missing names; a stored copy of a tied weight must equal its original."""
  for name, stand_in in fmt.aliases:
    if name not in w and stand_in in w:
      w.where[name] = w.where[stand_in]
  for head, embedding, what in fmt.tied:
    if head in w and not np.array_equal(w[head], w[embedding]):
      raise ConfigError(f'{w.src}: {head} differs from {embedding}; shardlm ties {what} to '
                        'the token embedding, so untied heads cannot be converted')


def _params_from_hf(w: _Weights, fmt: HFFormat, architecture, model, abstract, where):
  """(parameters as the tree `abstract` describes, in numpy, names drawn fresh): HF tensors ->
  shardlm leaves, layers stacked on axis 0, the vocabulary padded with zero rows."""
  _check_tied(w, fmt)
  layer_rows, top_rows = fmt.rows(model)
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
        take(theirs, fwd, lambda t, i=i: fmt.layer_name(i, t))
        for i in range(model['num_layers'])])
  for ours, theirs, fwd, _ in top_rows:
    if ours.split('.')[0] in fmt.optional and not any(t in w for t in theirs):
      fresh.append(ours)  # e.g. BertForMaskedLM: heads shardlm's BERT has and this model lacks
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
  tied = {head for head, _, _ in fmt.tied}
  unused = sorted(n for n in set(w.where) - w.used
                  if not fmt.ignored.fullmatch(n) and n not in tied)
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
  src, out = Path(model_dir).resolve(), Path(out).resolve()
  hf, kind, architecture = _read_config(src)
  if out.exists():
    raise ConfigError(f'--out {out} already exists; choose a new directory for the checkpoint')
  fmt, where, notes = kind.hf, f'{src}/config.json', []
  model = dict(kind=kind.name, **fmt.from_config(hf, where))
  w = _Weights(src, fmt, architecture)

  cfg = config_lib.defaults()
  cfg.name = f'hf-{fmt.model_type}'
  try:
    cfg.model.update(model)
  except TypeError as e:  # a value of the wrong type in config.json (ml_collections is typed)
    raise ConfigError(f'{where}: {e}') from None

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
    rt = runtime.build(cfg, jax.devices()[:1])  # mesh model=1: the vocabulary padded to 128s
  except ConfigError as e:
    raise ConfigError(f'{where} gives a model shardlm cannot build: {e}') from None

  params, fresh = _params_from_hf(w, fmt, architecture, model, rt.abstract_params, where)
  if fresh:
    notes.append(f"{architecture} has no {' or '.join(sorted({f.split('.')[0] for f in fresh}))} "
                 f"weights: shardlm's {fmt.display} has them, so they start from random values "
                 f'(N(0, {model["init_std"]})); to-hf leaves them out again')
  dtype = w.dtypes.pop() if len(w.dtypes) == 1 else 'float32'

  meta = {'config': json.loads(cfg.to_json()), 'tokenizer': tokenizer,
          'model': {'vocab_size': model['vocab_size'], 'padded_vocab': rt.model_config.padded_vocab},
          'mesh': dict(rt.mesh.shape), 'processes': 1,
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
  kind = kinds.get(model.get('kind', 'gpt'))
  fmt = kind.hf
  fmt.check_export(model, path)
  architecture = hf_meta.get('architecture') or fmt.architectures[0]
  dtype = dtype or hf_meta.get('dtype') or model.get('param_dtype', 'float32')
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")

  flat = _read_params(path)
  V = meta['model']['vocab_size']
  for name in VOCAB_ROWS:  # drop the padding rows
    if name in flat:
      flat[name] = flat[name][:V]
  prefix = fmt.prefix if hf_meta.get('prefixed', True) else ''
  hf_name = lambda t: t if fmt.is_head(t) else prefix + t
  layer_rows, top_rows = fmt.rows(model)
  skip = set(hf_meta.get('fresh', ())) if architecture in fmt.without_optional else set()
  tensors = {}

  def put(names, arrays):
    for t, a in zip(names, arrays):
      tensors[hf_name(t)] = np.ascontiguousarray(a).astype(DTYPES[dtype], copy=False)
  try:
    for ours, theirs, _, bwd in layer_rows:
      stacked = flat.pop(f'h.blocks.{ours}')
      for i in range(model['num_layers']):
        put([fmt.layer_name(i, t) for t in theirs], bwd(stacked[i]))
    for ours, theirs, _, bwd in top_rows:
      if ours in skip:
        flat.pop(ours)
      else:
        put(theirs, bwd(flat.pop(ours)))
  except KeyError as e:
    raise ConfigError(f'checkpoint {path} lacks parameter {e.args[0]} of a shardlm '
                      f'{kind.name}') from None
  architecture = fmt.export_as.get(architecture, architecture)

  hf = fmt.config(model, V, architecture, dtype, meta['tokenizer'].get('eod_id'),
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
  errors.run_cli(_main, argv)


def _main(argv):
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


if __name__ == '__main__':
  main()
