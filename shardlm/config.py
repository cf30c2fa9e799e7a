"""Config files (`get_config()` -> ConfigDict), `--config.a.b=value` overrides, validation."""
import ast
import difflib
import importlib.util
import traceback
from pathlib import Path

import ml_collections

from shardlm.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'
SECTIONS = ('model', 'mesh', 'sharding', 'data', 'optimizer', 'train', 'checkpoint', 'log', 'dist')


def defaults() -> ml_collections.ConfigDict:
  """Every key a config can set, with the values a GPT run starts from; config files edit these."""
  return ml_collections.ConfigDict(dict(
      model=dict(kind='gpt', num_layers=12, hidden=768, num_heads=12,
                 mlp_dim=0,  # 0 means 4 x hidden
                 seq_len=1024, vocab_size=50257,
                 vocab_multiple=128,  # padded to a multiple of this x the vocab's split (0: no padding)
                 init_std=0.02, ln_eps=1e-5, dtype='float32', param_dtype='float32',
                 remat='none',
                 attention='dense',  # dense | local (sliding window) | alternating (dense, local, ...)
                 window=256,
                 # Dense attention under context parallelism (mesh.context > 1): gather keys and
                 # values whole (allgather) or pass their blocks round the devices (ring).
                 context_attention='allgather',
                 # lax.scan over the layer stack: compile time flat in depth. False unrolls the
                 # layers, which is faster on CPU for small models (no stacked residual buffers).
                 scan_layers=True,
                 post_ln=False,  # BERT only: LayerNorm after each residual add (original BERT)
                 # Dropout in training only (Megatron's recipes: 0.1 for both): `dropout` on the
                 # embeddings and on each attention and MLP output, `attention_dropout` on the
                 # attention probabilities. Its randomness is a pure function of (train.seed, step).
                 dropout=0.0, attention_dropout=0.0,
                 # Pipeline (mesh.stage = P > 1): M micro-batches (0: M = P), R circular repeats
                 # (1: GPipe); the bubble is (P - 1) / (R M + P - 1). docs/pipeline.md.
                 pipeline_microbatches=0, pipeline_repeats=1),
      mesh=dict(data=-1, stage=1, fsdp=1, context=1, model=1),
      sharding=dict(preset='megatron_fsdp', rules=()),
      data=dict(corpus='stdlib',  # built-in corpus, used while paths is empty
                paths=(),          # preprocessed dataset prefixes (`python -m shardlm.data.preprocess`)
                weights=(),        # blending weights, one per path (default: by size)
                split='969,30,1',  # train,validation,test shares of each dataset's documents
                tokenizer='byte', batch_size=8, seed=0,
                prefetch=2,        # batches built ahead in a background thread
                mlm_prob=0.15,     # BERT: share of tokens masked (80% [MASK], 10% random, 10% kept)
                whole_word=False,  # BERT: mask whole words (WordPiece ## pieces; bytes: whitespace)
                # Fine-tuning (model.kind gpt_sft, gpt_cls, bert_cls; shardlm/data/tasks.py):
                # JSONL examples; without valid_jsonl the last 5% of train_jsonl's are held out.
                train_jsonl='', valid_jsonl='',
                labels=(),          # classification: the label set, in order (a label's index)
                overlong='error'),  # an example longer than model.seq_len: error | truncate
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
      # Many processes (shardlm.distributed): found from SLURM, Open MPI or JAX_* variables by
      # default; explicit settings for a hand-made cluster. Timeouts in seconds.
      dist=dict(method='auto',        # auto | none | slurm | ompi | tpu | explicit
                coordinator='',       # HOST:PORT of process 0 (explicit)
                num_processes=0, process_id=-1,
                local_device_ids='',  # e.g. '0,1,2,3': this process's GPUs
                init_timeout=300.0,   # to wait for every process to join
                heartbeat_timeout=60.0,  # a process silent this long is dead: the others stop
                shutdown_timeout=120.0,
                # A `model` axis spanning hosts runs every layer's collectives over the slow
                # network; refused unless this is set.
                allow_model_across_hosts=False),
  ))


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
  """Loads a config file by path or bare name, checks it against the defaults' schema, and records
  where it came from. A file that fails to run is one error line, not a traceback."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f'shardlm_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ConfigError(f'config file {path} has no get_config() function')
    cfg = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # a config file is user code: any error in it is bad input
    raise ConfigError(f'config file {path} fails to load: {_where(e, path)}{type(e).__name__}: '
                      f'{" ".join(str(e).split())[:300]}') from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() returned a {type(cfg).__name__}, not a '
                      'ConfigDict (start from shardlm.config.defaults())')
  check_schema(cfg, f'config file {path}')
  cfg.name = path.stem
  return cfg


def _where(error: Exception, path: Path) -> str:
  """'line N: ' of the config file where `error` arose, if it did."""
  if isinstance(error, SyntaxError) and error.lineno:
    return f'line {error.lineno}: '
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if Path(f.filename).resolve() == path.resolve()]
  return f'line {lines[-1]}: ' if lines else ''


def check_schema(cfg: ml_collections.ConfigDict, where: str = 'config') -> None:
  """Every section of the defaults is there, and every key set is one the defaults have.

  The `mesh` section is the one place that takes new keys: each is a mesh axis (an integer size);
  shardlm.sharding then requires a rule that uses it, so a misspelt axis is still an error.
  """
  reference = defaults()
  missing = [s for s in SECTIONS if s not in cfg]
  if missing:
    raise ConfigError(f"{where} lacks section(s) {', '.join(missing)}; every config has "
                      f"{', '.join(SECTIONS)} (start from shardlm.config.defaults())")
  valid = list(_all_keys(reference))
  for key in _all_keys(cfg):
    if key == 'name' or key in valid:
      continue
    section, _, rest = key.partition('.')
    if section == 'mesh' and rest and '.' not in rest:
      if isinstance(cfg.mesh[rest], bool) or not isinstance(cfg.mesh[rest], int):
        raise ConfigError(f'{where} sets mesh.{rest}={cfg.mesh[rest]!r}; a mesh axis size is an '
                          'integer')
      continue
    raise ConfigError(f"{where} sets unknown config key '{key}'{_hint(key, valid)}")
  have = set(_all_keys(cfg))
  for key in valid:
    if key not in have:
      raise ConfigError(f"{where} lacks config key '{key}' (start from shardlm.config.defaults() and "
                        'change values rather than replace sections)')
    value, default = _get(cfg, key), _get(reference, key)
    if not _same_kind(value, default):
      raise ConfigError(f"{where} sets '{key}' to {value!r}; it takes {_kind(default)} "
                        f'(default {default!r})')


def _get(cfg, key: str):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def _same_kind(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _kind(default) -> str:
  return {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string'}.get(
      type(default), 'a tuple')


def _all_keys(cfg, prefix=''):
  for k, v in cfg.items():
    key = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_keys(v, key + '.')
    else:
      yield key


def _hint(key: str, valid: list[str]) -> str:
  """'; did you mean: a.b, c.b?': the closest keys, and the same key name in other sections."""
  hint = difflib.get_close_matches(key, valid, n=3, cutoff=0.8)
  hint += [k for k in valid if k.rsplit('.', 1)[-1] == key.rsplit('.', 1)[-1] and k not in hint]
  return f"; did you mean: {', '.join(hint)}?" if hint else ''


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
      raise ConfigError(f"unknown config key '{key}'{_hint(key, list(_all_keys(cfg)))}"
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
