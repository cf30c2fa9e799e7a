"""Mixed precision, float16 loss scaling and micro-batches: the numbers float32 gives."""
import json

import jax
import numpy as np
import pytest

from conftest import random_tokens as random_batches

from shardlm import train


def small(tiny, **overrides):
  return tiny(**{'model__num_layers': 2, 'model__seq_len': 64, 'data__batch_size': 16, **overrides})


def test_four_micro_batches_of_four_equal_one_batch_of_sixteen(tiny):
  whole = small(tiny, mesh__data=2)
  split = small(tiny, mesh__data=2, optimizer__grad_accum_steps=4)
  s1, s4 = train.setup(whole, jax.devices()[:2]), train.setup(split, jax.devices()[:2])
  params = s1.init()['params']
  tokens = random_batches(whole).global_batch(0, s1.batch_sharding)
  (l1, g1), (l4, g4) = s1.grads(params, tokens), s4.grads(params, tokens)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 sums in another order
  # The whole step agrees too, and shows the accumulation is really in the compiled step.
  state1, m1 = s1.step(s1.init(), tokens)
  state4, m4 = s4.step(s4.init(), tokens)
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)
  np.testing.assert_allclose(m4['grad_norm'], m1['grad_norm'], rtol=1e-6)
  assert 'while' in s4.step.lower(s4.init(), tokens).as_text()


@pytest.mark.parametrize('hysteresis', [1, 2])
def test_float16_overflow_skips_the_step_and_lowers_the_scale(tiny, hysteresis):
  # A scale near float32's maximum makes the scaled loss itself overflow.
  cfg = small(tiny, model__dtype='float16', optimizer__initial_loss_scale=3e38,
              optimizer__hysteresis=hysteresis)
  s = train.setup(cfg, jax.devices()[:1])
  data = random_batches(cfg)
  state = s.init()
  before = jax.tree.map(np.asarray, state['params'])
  scales = []
  for step in range(hysteresis):
    state, m = s.step(state, data.global_batch(step, s.batch_sharding))
    assert bool(m['skipped'])
    scales.append(float(state['loss_scale']['scale']))
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)  # skipped: parameters untouched
  assert int(state['step']) == hysteresis  # the data position still moves on
  # ...but the learning-rate schedule does not: the next update is still the first one.
  _, m = s.step(state, data.global_batch(hysteresis, s.batch_sharding))
  assert float(m['lr']) == float(s.schedule(0))
  # With hysteresis 2 the first overflow keeps the scale; the second halves it.
  assert scales == pytest.approx([3e38] * (hysteresis - 1) + [1.5e38], rel=1e-6)
  # Once the scale is sane, steps go through and train in float16.
  cfg2 = small(tiny, model__dtype='float16')
  s2 = train.setup(cfg2, jax.devices()[:1])
  state2 = s2.init()
  state2, m2 = s2.step(state2, data.global_batch(0, s2.batch_sharding))
  assert not bool(m2['skipped']) and float(state2['loss_scale']['scale']) == 2.0**16
  assert np.isfinite(float(m2['loss']))


def test_loss_scale_grows_after_a_window_of_clean_steps(tiny):
  cfg = small(tiny, model__dtype='float16', optimizer__loss_scale_window=2)
  s = train.setup(cfg, jax.devices()[:1])
  data, state = random_batches(cfg), s.init()
  for step in range(2):
    state, _ = s.step(state, data.global_batch(step, s.batch_sharding))
  assert float(state['loss_scale']['scale']) == 2.0**17


@pytest.mark.slow
def test_half_precision_trains_as_well_as_float32(default_run):
  """The default run (one CPU device, as a user has it) in bfloat16 and float16 ends within 2%
  of float32's validation loss."""
  final = {}
  for dtype in ('float32', 'bfloat16', 'float16'):
    proc, run_dir, _ = default_run(dtype)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    final[dtype] = [r['val_loss'] for r in records if 'val_loss' in r][-1]
  assert final['float32'] < 3.0, final
  for dtype in ('bfloat16', 'float16'):
    assert abs(final[dtype] - final['float32']) <= 0.02 * final['float32'], final
