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
