"""A trained model loaded for evaluation and generation: parameters straight into this mesh."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from shardlm import checkpoint, config as config_lib, sharding, train
from shardlm.config import ConfigError
from shardlm.data import tokenizer as tokenizer_lib
from shardlm.model.gpt import mask_padding, token_nll


@dataclasses.dataclass
class Loaded:
  cfg: ml_collections.ConfigDict
  setup: train.Setup
  params: dict
  tokenizer: object
  source: Path

  def score(self, tokens_bt):
    """Per-token loss and whether the top prediction is right: ([B, T], [B, T]) numpy."""
    return jax.device_get(self._score(self.params, jnp.asarray(tokens_bt, jnp.int32)))

  @property
  def _score(self):
    s = self.setup

    def score(params, tokens_bt):
      with sharding.use(s.mesh, s.rules):
        logits_btv = nnx.merge(s.graphdef, params)(tokens_bt[:, :-1])
        nll_bt = token_nll(logits_btv, tokens_bt[:, 1:], s.model_config.vocab_size)
        top_bt = jnp.argmax(mask_padding(logits_btv, s.model_config.vocab_size), axis=-1)
        return nll_bt, top_bt == tokens_bt[:, 1:]
    return _jit_cached(self, 'score', score)

  def generator(self):
    from shardlm.generate import Generator
    s = self.setup
    return Generator(s.graphdef, self.params, s.mesh, s.rules, s.model_config, self.tokenizer.eod_id)


def _jit_cached(obj, name, fn):
  cache = obj.__dict__.setdefault('_jitted', {})
  if name not in cache:
    cache[name] = jax.jit(fn)
  return cache[name]


def load(directory, overrides=(), devices=None) -> Loaded:
  """The latest checkpoint under `directory` (a run, a checkpoints folder, or one checkpoint).

  The model config comes from the checkpoint; the mesh defaults to every device on the model
  axis (Megatron tensor parallelism, the cache split over heads), falling back to fewer when
  the heads do not divide; `--config.mesh.*` overrides choose another.
  """
  path = checkpoint.find(directory)
  try:
    meta = checkpoint.read_meta(path)
  except checkpoint.Unreadable as e:
    raise ConfigError(f'checkpoint {path} cannot be read: {e}') from None
  cfg = config_lib.defaults()
  cfg.update_from_flattened_dict(_flatten(meta['config']))
  if cfg.model.kind != 'gpt':
    raise ConfigError(f'checkpoint {path} holds a {cfg.model.kind} model; evaluation and '
                      'generation take a GPT (a causal language model)')
  devices = list(devices if devices is not None else jax.devices())
  model = max(d for d in range(1, len(devices) + 1)
              if len(devices) % d == 0 and cfg.model.num_heads % d == 0)
  cfg.mesh.update(data=-1, fsdp=1, model=model)
  # Where the training run resumed or started from is history here, and may be gone.
  cfg.train.update(resume='none', init_from='')
  cfg.checkpoint.dir = ''
  for arg in overrides:
    if not arg.startswith('--config.') or '=' not in arg:
      raise ConfigError(f"unexpected argument '{arg}'; expected --config.section.key=value")
    key, raw = arg[len('--config.'):].split('=', 1)
    config_lib.override(cfg, key, raw)
  data, fsdp, _ = config_lib.mesh_shape(cfg, len(devices))
  cfg.data.batch_size = data * fsdp  # unused here, but setup checks it divides the mesh
  cfg.optimizer.grad_accum_steps = 1
  s = train.setup(cfg, devices)

  params, path, meta = checkpoint.restore_params(path, s)
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
  return Loaded(cfg, s, params, tok, path)


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
