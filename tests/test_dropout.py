"""Dropout: off in evaluation, on in training, drawn from (seed, step, micro-batch), the same on
every layout; a resumed run with dropout is bitwise the uninterrupted one (test_checkpoint_resume)."""
import jax
import numpy as np
import pytest

from conftest import random_tokens, run_steps
from shardlm import train
from shardlm.config import ConfigError

DROP = {'model.dropout': 0.1, 'model.attention_dropout': 0.1}


def test_dropout_is_off_in_evaluation_and_on_in_training(tiny):
  cfg = tiny(**DROP)
  t = train.setup(cfg)
  state = t.init()
  batch = random_tokens(cfg).global_batch(0, t.batch_sharding)
  evals = [float(t.eval_metrics(state['params'], batch)[0]) for _ in range(3)]
  assert evals[0] == evals[1] == evals[2]
  # the same parameters, trained on: the step's loss is the dropped-out model's
  _, m = t.step(jax.tree.map(lambda x: x.copy(), state), batch)
  assert abs(float(m['loss']) - evals[0]) > 1e-4
  # without dropout the step's loss is the evaluation's
  plain = train.setup(tiny())
  _, m0 = plain.step(plain.init(), batch)
  assert abs(float(m0['loss']) - evals[0]) < 1e-6


def test_dropout_masks_change_with_the_step_and_the_micro_batch(tiny):
  # two steps on the same batch and parameters draw different masks: different gradients
  cfg = tiny(**DROP)
  t = train.setup(cfg)
  state = t.init()
  batch = random_tokens(cfg).global_batch(0, t.batch_sharding)
  losses = []
  for step in (0, 1):
    s = jax.tree.map(lambda x: x.copy(), state)
    s['step'] = s['step'] + step
    losses.append(float(t.step(s, batch)[1]['loss']))
  assert losses[0] != losses[1]


def test_dropout_is_the_same_on_every_layout(tiny):
  # tensor parallel, FSDP and data parallel at once, with 2 accumulation steps (each micro-batch
  # draws its own masks), against one device
  accum = {'optimizer.grad_accum_steps': 2}
  one = run_steps(tiny(**DROP, **accum), devices=jax.devices()[:1])[2]['loss']
  many = run_steps(tiny(**DROP, **accum, **{'sharding.preset': 'megatron_fsdp', 'mesh.fsdp': 2,
                                            'mesh.model': 2}))[2]['loss']
  np.testing.assert_allclose(many, one, rtol=1e-5)


@pytest.mark.parametrize('overrides, message', [
    ({'model.dropout': 1.0}, 'model.dropout=1.0 must be in [0, 1)'),
    ({'model.attention_dropout': 0.1, 'model.attention': 'local', 'model.window': 8},
     'model.attention_dropout=0.1 needs model.attention=dense'),
    ({'model.dropout': 0.1, 'mesh.stage': 2}, 'dropout under the pipeline (mesh.stage > 1) is not built'),
])
def test_bad_dropout_settings(tiny, overrides, message):
  with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(')', r'\)')
                     .replace('(', r'\(')):
    train.setup(tiny(**overrides))
