"""A trained model loaded for evaluation and generation: parameters straight into this mesh."""
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from shardlm import checkpoint, config as config_lib, distributed, runtime
from shardlm.data import tokenizer as tokenizer_lib
from shardlm.errors import ConfigError
from shardlm.model.gpt import mask_padding, token_nll


@dataclasses.dataclass
class Loaded:
  cfg: ml_collections.ConfigDict
  rt: runtime.Runtime
  params: dict
  tokenizer: object
  source: Path

  def score(self, tokens_bt):
    """Per-token loss and whether the top prediction is right: ([B, T], [B, T]) numpy."""
    # numpy in (the same rows in every process), replicated out: read back on any process.
    return jax.device_get(self._score(self.params, np.asarray(tokens_bt, np.int32)))

  @functools.cached_property
  def _score(self):
    rt = self.rt
    vocab_size = rt.model_config.vocab_size

    def score(params, tokens_bt):
      logits_btv = rt.apply(params, tokens_bt[:, :-1])
      nll_bt = token_nll(logits_btv, tokens_bt[:, 1:], vocab_size)
      top_bt = jnp.argmax(mask_padding(logits_btv, vocab_size), axis=-1)
      return nll_bt, top_bt == tokens_bt[:, 1:]
    return jax.jit(score, out_shardings=rt.replicated)


def load(directory, overrides=(), devices=None, causal=True) -> Loaded:
  """The latest checkpoint under `directory` (a run, a checkpoints folder, or one checkpoint).

  The model config comes from the checkpoint; the mesh defaults to every device of a host on the
  model axis (Megatron tensor parallelism, the cache split over heads), falling back to fewer
  when the heads do not divide, and data parallelism over the rest; `--config.mesh.*` overrides
  choose another. Joins a multi-process job first (shardlm.distributed), as the CLIs do.
  `causal`: refuse a model that is not a causal LM (scoring and generation need one).
  """
  path = checkpoint.find(directory)
  try:
    meta = checkpoint.read_meta(path)
  except checkpoint.Unreadable as e:
    raise ConfigError(f'checkpoint {path} cannot be read: {e}') from None
  cfg = config_lib.defaults()
  cfg.update_from_flattened_dict(_flatten(meta['config']))
  if causal and not runtime.kinds.get(cfg.model.kind).causal_lm:
    raise ConfigError(f'checkpoint {path} holds a {cfg.model.kind} model; evaluation and '
                      'generation take a causal language model (a GPT)')
  # Where the training run resumed or started from is history here, and may be gone; so is the
  # cluster it ran on.
  cfg.train.update(resume='none', init_from='')
  cfg.checkpoint.dir = ''
  cfg.dist = config_lib.defaults().dist
  cfg.mesh.update({axis: 1 for axis in cfg.mesh.keys()})
  cfg.mesh.data = -1
  cfg.model.update(pipeline_microbatches=0, pipeline_repeats=1)  # the stack runs whole here
  for arg in overrides:
    if not arg.startswith('--config.') or '=' not in arg:
      raise ConfigError(f"unexpected argument '{arg}'; expected --config.section.key=value")
    key, raw = arg[len('--config.'):].split('=', 1)
    config_lib.override(cfg, key, raw)
  if cfg.mesh.get('stage', 1) != 1:
    raise ConfigError(f'mesh.stage={cfg.mesh.stage}: evaluation and generation run without the '
                      'pipeline (mesh.stage=1); split the model with --config.mesh.model instead')
  distributed.initialize(cfg)  # before anything touches a device
  devices = list(devices if devices is not None else jax.devices())
  if not any(a.startswith('--config.mesh.model=') for a in overrides):
    # Every device of a host on the model axis, as many as divide the heads.
    local = min(len(devices), jax.local_device_count())
    cfg.mesh.model = max(d for d in range(1, local + 1)
                         if local % d == 0 and cfg.model.num_heads % d == 0)
  rt = runtime.build(cfg, devices)
  params, path, meta = checkpoint.restore_params(path, rt.target())
  # The tokenizer it was trained with: --config.data.tokenizer=... overrides; a checkpoint that
  # carries its own tokenizer files (shardlm.convert) finds them wherever it has been moved.
  name = meta['tokenizer']['name']
  own = path / 'tokenizer' / 'tokenizer.json'
  chosen = any(a.startswith('--config.data.tokenizer=') for a in overrides)
  if chosen:
    name = cfg.data.tokenizer
  elif own.is_file():
    name = str(own)
  if name == 'none':
    raise ConfigError(f'checkpoint {path} records no tokenizer; give one with '
                      '--config.data.tokenizer=PATH/tokenizer.json')
  tok = tokenizer_lib.get_tokenizer(name)
  want = meta['tokenizer'].get('fingerprint')
  if want and meta['tokenizer']['name'] != 'none' and getattr(tok, 'fingerprint', tok.name) != want:
    raise ConfigError(f"tokenizer {name} is not the one checkpoint {path} was trained with "
                      f"({meta['tokenizer']['name']}, fingerprint {want})"
                      + ('' if chosen else '; give it with --config.data.tokenizer=PATH'))
  return Loaded(cfg, rt, params, tok, path)


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(_tuple(x) for x in v) if isinstance(v, list) else v
  return out


def _tuple(x):
  return tuple(_tuple(y) for y in x) if isinstance(x, list) else x
