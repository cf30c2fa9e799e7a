"""Sharded equals unsharded: the same model on every layout gives the single-device losses."""
import jax
import numpy as np
import pytest
from conftest import run_steps

from shardlm import config, train
from shardlm.data import loader, tokenizer

STEPS = 5


@pytest.fixture(scope='module')
def tokens():
  tok = tokenizer.ByteTokenizer()
  return np.concatenate([tok.encode(p.read_bytes()) for p in loader.stdlib_files()[:40]])


def run_losses(cfg, tokens, devices):
  data = loader.Batches(tokens, cfg.model.seq_len, cfg.data.batch_size, cfg.data.seed)
  _, _, m = run_steps(cfg, devices, STEPS, data.global_batch)
  return m['loss'], m['grad_norm']


@pytest.fixture(scope='module')
def reference(tokens):
  cfg = config.load('tiny')
  return run_losses(cfg, tokens, jax.devices()[:1])


@pytest.mark.parametrize('layout', [
    dict(data=8, fsdp=1, model=1),
    dict(data=2, fsdp=1, model=4),
    dict(data=1, fsdp=8, model=1),
    dict(data=2, fsdp=2, model=2),
    dict(data=2, fsdp=1, model=4, preset='megatron_sp'),  # + the residual stream split on T
])
def test_layout_matches_single_device(layout, tokens, reference):
  cfg = config.load('tiny')
  for axis, size in layout.items():
    config.override(cfg, 'sharding.preset' if axis == 'preset' else f'mesh.{axis}', str(size))
  losses, grad_norms = run_losses(cfg, tokens, jax.devices())
  ref_losses, ref_norms = reference
  assert losses[-1] < losses[0]  # it trains, so the comparison covers updated parameters
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, ref_norms, rtol=1e-4)


def test_padding_does_not_change_the_model(tokens):
  """model=4 pads the vocabulary to 512, model=1 to 384: same initial loss, same run."""
  cfg = config.load('tiny')
  s1 = train.setup(cfg, jax.devices()[:1])
  config.override(cfg, 'mesh.model', '4')
  config.override(cfg, 'mesh.data', '1')
  s4 = train.setup(cfg, jax.devices()[:4])
  assert (s1.rt.model_config.padded_vocab, s4.rt.model_config.padded_vocab) == (384, 512)
  data = loader.Batches(tokens, cfg.model.seq_len, cfg.data.batch_size, 0)
  l1 = s1.eval_metrics(s1.init()['params'], data.global_batch(0, s1.batch_sharding))[0]
  l4 = s4.eval_metrics(s4.init()['params'], data.global_batch(0, s4.batch_sharding))[0]
  np.testing.assert_allclose(float(l1), float(l4), rtol=1e-6)


def test_megatron_sp_gradients_equal_megatron(tokens):
  """Sequence parallelism moves the same numbers differently: the gradients of one batch match."""
  cfg = config.load('tiny')
  for key, value in {'mesh.data': 2, 'mesh.model': 4}.items():
    config.override(cfg, key, str(value))
  plain = train.setup(cfg)
  config.override(cfg, 'sharding.preset', 'megatron_sp')
  sp = train.setup(cfg)
  params = plain.rt.init_params(0)
  batch = loader.Batches(tokens, cfg.model.seq_len, cfg.data.batch_size, 0).global_batch
  (l0, g0), (l1, g1) = plain.grads(params, batch(0, plain.batch_sharding)), sp.grads(
      params, batch(0, sp.batch_sharding))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
