"""Every test sees 8 simulated CPU devices: the flag must be set before JAX is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from shardlm import config  # noqa: E402


@pytest.fixture
def tiny():
  """A fresh tiny config; tests edit it with config.override like the command line does."""
  def make(**overrides):
    cfg = config.load('tiny')
    for key, value in overrides.items():
      config.override(cfg, key.replace('__', '.'), str(value))
    return cfg
  return make


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
