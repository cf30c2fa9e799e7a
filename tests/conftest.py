"""Every test sees 8 simulated CPU devices: the flag must be set before JAX is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shardlm import config, train  # noqa: E402
from shardlm.data import loader  # noqa: E402


def random_tokens(cfg, seed=0):
  """Step-indexed batches of uniformly random byte ids, the shape `cfg` trains on."""
  tokens = np.random.default_rng(seed).integers(0, 256, 50_000).astype(np.uint16)
  return loader.Batches(tokens, cfg.model.seq_len, cfg.data.batch_size, seed)


def run_steps(cfg, devices=None, steps=3, batch=None):
  """The one shared helper: builds `cfg`'s trainer on `devices` (default: all), initializes, runs
  `steps` steps. `batch(step, sharding)` gives each step's batch (default: random_tokens).

  Returns (trainer, final state, {metric: np.array over the steps}).
  """
  t = train.setup(cfg, devices)
  batch = batch or random_tokens(cfg).global_batch
  state, history = t.init(), []
  for step in range(steps):
    state, metrics = t.step(state, batch(step, t.batch_sharding))
    history.append(jax.device_get(metrics))
  return t, state, {k: np.array([float(m[k]) for m in history]) for k in history[0]}


@pytest.fixture
def tiny():
  """A fresh tiny config; tests edit it with config.override like the command line does."""
  def make(**overrides):
    cfg = config.load('tiny')
    for key, value in overrides.items():
      config.override(cfg, key.replace('__', '.'), str(value))
    return cfg
  return make


def params_checkpoint(out, rt, cfg=None):
  """A params-only checkpoint of `rt`'s model drawn from seed 0, as convert or export-params
  writes one; `cfg` (default: the runtime's) is the config its metadata records."""
  import json
  from shardlm import checkpoint
  from shardlm.data.tokenizer import ByteTokenizer
  tok, cfg = ByteTokenizer(), cfg or rt.cfg
  meta = {'config': json.loads(cfg.to_json()),
          'tokenizer': {'name': tok.name, 'vocab_size': tok.vocab_size, 'eod_id': tok.eod_id,
                        'fingerprint': tok.fingerprint},
          'model': {'vocab_size': cfg.model.vocab_size, 'padded_vocab': rt.model_config.padded_vocab}}
  return checkpoint.save_params(out, rt.init_params(0), meta)


def pytest_report_header():
  return f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices'


@pytest.fixture(scope='session')
def default_run(tmp_path_factory):
  """`python -m shardlm.train` as a user runs it (one CPU device), once per config and dtype.

  Returns (process, run directory, seconds). Shared by the tests that need a real default run,
  since each costs a minute or two of CPU.
  """
  import subprocess
  import sys
  import time
  runs = {}

  def run(dtype='float32', config='tiny'):
    key = (config, dtype)
    if key not in runs:
      run_dir = tmp_path_factory.mktemp('default_run') / f'{config}_{dtype}'
      env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
      args = [f'--config.train.run_dir={run_dir}']
      if config != 'tiny':
        args = ['--config', config, *args]
      if dtype != 'float32':
        args.append(f'--config.model.dtype={dtype}')
      start = time.monotonic()
      proc = subprocess.run([sys.executable, '-m', 'shardlm.train', *args], capture_output=True,
                            text=True, env=env, cwd=run_dir.parent, timeout=900)
      runs[key] = (proc, run_dir, time.monotonic() - start)
    return runs[key]
  return run
