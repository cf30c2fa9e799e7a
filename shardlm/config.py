"""Config files (`get_config()` -> ConfigDict), `--config.a.b=value` overrides, validation."""
import argparse
import ast
import difflib
import importlib.util
import math
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'
SECTIONS = ('model', 'mesh', 'sharding', 'data', 'optimizer', 'train', 'checkpoint', 'log')


def defaults() -> ml_collections.ConfigDict:
  """Every key a config can set, with the values a GPT run starts from; config files edit these."""
  return ml_collections.ConfigDict(dict(
      model=dict(kind='gpt', num_layers=12, hidden=768, num_heads=12,
                 mlp_dim=0,  # 0 means 4 x hidden
                 seq_len=1024, vocab_size=50257,
                 vocab_multiple=128,  # padded to a multiple of this x mesh.model (0: no padding)
                 init_std=0.02, ln_eps=1e-5, dtype='float32', param_dtype='float32',
                 remat='none',
                 attention='dense',  # dense | local (sliding window) | alternating (dense, local, ...)
                 window=256,
                 # lax.scan over the layer stack: compile time flat in depth. False unrolls the
                 # layers, which is faster on CPU for small models (no stacked residual buffers).
                 scan_layers=True,
                 post_ln=False),  # BERT only: LayerNorm after each residual add (original BERT)
      mesh=dict(data=-1, fsdp=1, model=1),
      sharding=dict(preset='megatron_fsdp', rules=()),
      data=dict(corpus='stdlib',  # built-in corpus, used while paths is empty
                paths=(),          # preprocessed dataset prefixes (`python -m shardlm.data.preprocess`)
                weights=(),        # blending weights, one per path (default: by size)
                split='969,30,1',  # train,validation,test shares of each dataset's documents
                tokenizer='byte', batch_size=8, seed=0,
                prefetch=2,        # batches built ahead in a background thread
                mlm_prob=0.15,     # BERT: share of tokens masked (80% [MASK], 10% random, 10% kept)
                whole_word=False), # BERT: mask whole words (WordPiece ## pieces; bytes: whitespace)
      optimizer=dict(lr=1.5e-4, min_lr=1e-5, warmup_steps=2000, schedule='cosine', decay_steps=0,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
                     grad_accum_steps=1,  # micro-batches per step: batch = micro x accum x data-parallel
                     # float16 only: 0 = dynamic loss scaling (Megatron's), > 0 = this fixed scale
                     loss_scale=0.0, initial_loss_scale=2.0**16, min_loss_scale=1.0,
                     loss_scale_window=1000, hysteresis=2),
      train=dict(steps=1000, seed=0, eval_every=1000, eval_batches=8, run_dir='',
                 resume='auto',   # auto: latest good checkpoint in checkpoint.dir; none; or a path
                 init_from=''),   # parameters to start from (a checkpoint, e.g. from shardlm.convert)
      checkpoint=dict(dir='',          # default RUN_DIR/checkpoints
                      every=1000,      # save every this many steps, and always at the end
                      keep=3,          # the newest N are kept...
                      keep_every=0,    # ...and every step that is a multiple of this (0: none)
                      asynchronous=True),  # write in the background while training goes on
      log=dict(every=10, tensorboard=True, progress=True),
  ))


class ConfigError(ValueError):
  """Bad user input: printed as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are ConfigErrors: one line, exit status 2, as every bad input."""

  def error(self, message):
    raise ConfigError(f'{message} (see {self.prog} --help)')


def config_path(name: str) -> Path:
  """A path as given, else a bare name (with or without `.py`) looked up in configs/."""
  p = Path(name)
  if p.is_file():
    return p
  stem = p.name[:-3] if p.name.endswith('.py') else p.name
  candidate = CONFIG_DIR / f'{stem}.py'
  if candidate.is_file():
    return candidate
  known = sorted(f.stem for f in CONFIG_DIR.glob('*.py'))
  hint = difflib.get_close_matches(stem, known, n=3)
  raise ConfigError(
      f"config '{name}' not found as a file or in {CONFIG_DIR}"
      + (f" (did you mean: {', '.join(hint)}?)" if hint else '')
      + f"; known configs: {', '.join(known)}")


def load(name: str) -> ml_collections.ConfigDict:
  """Loads a config file by path or bare name and records where it came from."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f'shardlm_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} has no get_config() function')
  cfg = module.get_config()
  missing = [s for s in SECTIONS if s not in cfg]
  if missing:
    raise ConfigError(f"config {path} lacks section(s) {', '.join(missing)}; "
                      f"every config has {', '.join(SECTIONS)}")
  cfg.name = path.stem
  return cfg


def _all_keys(cfg, prefix=''):
  for k, v in cfg.items():
    key = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_keys(v, key + '.')
    else:
      yield key


def _parse_value(key: str, raw: str, current):
  """Parses `raw` into the type of the current value; a mismatch is a ConfigError."""
  def bad(expected):
    return ConfigError(f"config key '{key}' expects {expected}, got {raw!r}")
  if isinstance(current, bool):
    low = raw.strip().lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise bad('a boolean (true/false)')
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise bad('an integer') from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise bad('a number') from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      raise bad('a Python tuple literal, e.g. "((\'mlp\', None),)"') from None
    if not isinstance(value, (tuple, list)):
      raise bad('a tuple')
    return tuple(value)
  raise ConfigError(f"config key '{key}' holds a {type(current).__name__} and cannot be overridden")


def override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets cfg[key] (dotted) from a command-line string, checking key and type."""
  parts = key.split('.')
  node = cfg
  for i, part in enumerate(parts):
    is_last = i == len(parts) - 1
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = list(_all_keys(cfg))
      hint = difflib.get_close_matches(key, valid, n=3, cutoff=0.8)
      hint += [k for k in valid if k.rsplit('.', 1)[-1] == parts[-1] and k not in hint]
      raise ConfigError(f"unknown config key '{key}'"
                        + (f"; did you mean: {', '.join(hint)}?" if hint else '')
                        + f" (see `python -m shardlm.train --config {cfg.get('name', 'NAME')} --show`"
                        " for all keys)")
    if is_last:
      current = node[part]
      if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. {key}."
                          f'{next(iter(current.keys()))}=...')
      node[part] = _parse_value(key, raw, current)
    else:
      node = node[part]


def parse_args(argv: list[str]) -> ml_collections.ConfigDict:
  """`[--config NAME] [--config.a.b=value ...]` -> a validated-by-type ConfigDict."""
  name = 'tiny'
  overrides = []
  it = iter(argv)
  for arg in it:
    if arg in ('--config', '-c'):
      name = next(it, None)
      if name is None:
        raise ConfigError('--config needs a config name or path')
    elif arg.startswith('--config='):
      name = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' in body:
        key, raw = body.split('=', 1)
      else:
        key, raw = body, next(it, None)
        if raw is None or raw.startswith('--'):
          raise ConfigError(f"override '{arg}' has no value; write {arg}=VALUE")
      overrides.append((key, raw))
    else:
      raise ConfigError(f"unexpected argument '{arg}'; expected --config NAME and "
                        '--config.section.key=value overrides')
  cfg = load(name)
  for key, raw in overrides:
    override(cfg, key, raw)
  return cfg


def mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, model) sizes with a single -1 filled in; must multiply to num_devices."""
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model]
  names = ('data', 'fsdp', 'model')
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f'mesh.{n}={s}: a mesh axis size is a positive integer or -1')
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh {dict(zip(names, sizes))}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh {dict(zip(names, sizes))}: the fixed axes ({known}) do not divide '
                        f'the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh data={sizes[0]} x fsdp={sizes[1]} x model={sizes[2]} = '
                      f'{math.prod(sizes)} devices, but {num_devices} are available; '
                      'make the product equal the device count or set one axis to -1')
  return tuple(sizes)


def padded_vocab(cfg, model_axis: int) -> int:
  """Vocabulary padded to a multiple of vocab_multiple x model-axis size (Megatron's rule)."""
  m = cfg.model.vocab_multiple * model_axis
  return -(-cfg.model.vocab_size // m) * m if m else cfg.model.vocab_size


def validate(cfg, num_devices: int) -> tuple[int, int, int]:
  """Checks the config against the device count before anything is compiled."""
  shape = mesh_shape(cfg, num_devices)
  data, fsdp, model = shape
  m = cfg.model
  for key in ('num_layers', 'hidden', 'num_heads', 'seq_len', 'vocab_size'):
    if m[key] <= 0:
      raise ConfigError(f'model.{key}={m[key]} must be positive')
  if m.hidden % m.num_heads:
    raise ConfigError(f'model.hidden={m.hidden} is not divisible by model.num_heads={m.num_heads}')
  if m.num_heads % model:
    raise ConfigError(f'model.num_heads={m.num_heads} is not divisible by mesh.model={model}; '
                      f'choose mesh.model among {[d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]}')
  mlp = m.mlp_dim or 4 * m.hidden
  if mlp % model:
    raise ConfigError(f'model.mlp_dim={mlp} is not divisible by mesh.model={model}')
  if m.vocab_multiple < 0:
    raise ConfigError(f'model.vocab_multiple={m.vocab_multiple} must be >= 0 (0 turns padding off)')
  if m.vocab_multiple == 0 and m.vocab_size % model:
    raise ConfigError(f'model.vocab_size={m.vocab_size} is not divisible by mesh.model={model} and '
                      'vocabulary padding is off (model.vocab_multiple=0); set model.vocab_multiple=128')
  if m.attention != 'dense' and m.window <= 0:
    raise ConfigError(f"model.window={m.window} must be positive for model.attention='{m.attention}'")
  if m.mlp_dim < 0:
    raise ConfigError(f'model.mlp_dim={m.mlp_dim} must be >= 0 (0 means 4 x model.hidden)')
  if m.kind == 'bert' and m.attention != 'dense':
    raise ConfigError(f"model.attention='{m.attention}' is causal; BERT (model.kind='bert') "
                      "attends both ways: use model.attention='dense'")
  if m.post_ln and m.kind != 'bert':
    raise ConfigError("model.post_ln=True is for BERT (model.kind='bert'); GPT is pre-LN")
  if m.kind == 'bert' and m.seq_len < 8:
    raise ConfigError(f'model.seq_len={m.seq_len}: a BERT row needs at least 8 positions '
                      '([CLS] A [SEP] B [SEP])')
  if not 0 < cfg.data.mlm_prob < 1:
    raise ConfigError(f'data.mlm_prob={cfg.data.mlm_prob} must be between 0 and 1 (BERT: 0.15)')
  for key, allowed in (('kind', ('gpt', 'bert')),
                       ('remat', ('none', 'full', 'selective')),
                       ('attention', ('dense', 'local', 'alternating')),
                       ('dtype', ('float32', 'bfloat16', 'float16')),
                       ('param_dtype', ('float32', 'bfloat16'))):
    if m[key] not in allowed:
      raise ConfigError(f"model.{key}='{m[key]}' is not one of {', '.join(allowed)}")
  positive = {'data.batch_size': cfg.data.batch_size, 'log.every': cfg.log.every,
              'train.eval_batches': cfg.train.eval_batches, 'train.steps': cfg.train.steps}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f'{key}={value} must be a positive integer')
  if cfg.train.eval_every < 0:
    raise ConfigError(f'train.eval_every={cfg.train.eval_every} must be >= 0 (0: only at the start and end)')
  from shardlm.data import loader  # late: imports jax
  loader.check_config(cfg.data)
  batch_shards = data * fsdp
  if cfg.data.batch_size % batch_shards:
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by '
                      f'mesh.data x mesh.fsdp = {batch_shards}')
  o = cfg.optimizer
  if o.grad_accum_steps < 1 or cfg.data.batch_size % (o.grad_accum_steps * batch_shards):
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by '
                      f'optimizer.grad_accum_steps={o.grad_accum_steps} x mesh.data x mesh.fsdp '
                      f'= {o.grad_accum_steps * batch_shards}: each micro-batch spans every '
                      'data-parallel device')
  if o.loss_scale < 0 or o.min_loss_scale <= 0 or o.loss_scale_window < 1 or o.hysteresis < 1:
    raise ConfigError('optimizer.loss_scale >= 0, min_loss_scale > 0, loss_scale_window >= 1 and '
                      'hysteresis >= 1 are required')
  if o.schedule not in ('cosine', 'linear', 'constant'):
    raise ConfigError(f"optimizer.schedule='{o.schedule}' is not one of cosine, linear, constant")
  if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
    raise ConfigError(f'optimizer.lr={o.lr}, optimizer.min_lr={o.min_lr}: need 0 <= min_lr <= lr, lr > 0')
  c = cfg.checkpoint
  if c.every < 0 or c.keep_every < 0 or c.keep < 1:
    raise ConfigError(f'checkpoint.every={c.every}, checkpoint.keep={c.keep}, checkpoint.keep_every='
                      f'{c.keep_every}: need every >= 0 (0: only at the end), keep >= 1, keep_every >= 0')
  resume = cfg.train.resume
  if resume not in ('auto', 'none') and not Path(resume).is_dir():
    raise ConfigError(f"train.resume='{resume}' is not a directory; give a checkpoint "
                      "(RUN_DIR/checkpoints/STEP) or a directory of them, 'auto' or 'none'")
  if cfg.train.init_from and not Path(cfg.train.init_from).is_dir():
    raise ConfigError(f"train.init_from='{cfg.train.init_from}' is not a directory; give a "
                      'checkpoint (RUN_DIR/checkpoints/STEP, an export-params or convert output)')
  from shardlm import sharding  # late: sharding imports jax
  sharding.rules_from_config(cfg)  # raises ConfigError on a bad preset or rule
  return shape
