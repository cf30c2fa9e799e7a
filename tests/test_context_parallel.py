"""Context parallelism (a `context` mesh axis, every activation split on T): the same losses and
gradients as one device, keys and values gathered from their T shards, weights split like FSDP."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps
from test_pipeline import assert_same, devices_for, loss_and_grads, make

from shardlm import config, hlo, sharding, train

ATTENTION = {'dense': {}, 'local': {'model.attention': 'local', 'model.window': 4}}


@pytest.mark.parametrize('context', [2, 4, 8])
@pytest.mark.parametrize('kind, attention', [('gpt', 'dense'), ('gpt', 'local'), ('bert', 'dense')])
def test_context_parallel_equals_one_device(kind, attention, context):
  extra = ATTENTION[attention]
  assert_same(loss_and_grads(make(kind, **{'mesh.context': context, **extra})),
              loss_and_grads(make(kind, **extra)))


@pytest.mark.parametrize('overrides', [
    {'mesh.context': 2, 'mesh.model': 2, 'sharding.preset': 'megatron_sp'},
    {'mesh.context': 2, 'mesh.fsdp': 2, 'mesh.model': 2},
    {'mesh.context': 2, 'mesh.stage': 2, 'model.pipeline_microbatches': 2},
    {'mesh.context': 2, 'mesh.model': 2, 'sharding.rules': "(('embed', 'model'),)"},
], ids=['megatron_sp', 'fsdp,model', 'stage', 'user rule'])
def test_context_combines_with_other_axes(overrides):
  assert_same(loss_and_grads(make(**overrides)), loss_and_grads(make()))


def test_data_context_model_trains_like_one_device():
  def losses(**mesh):
    cfg = config.load('tiny')
    config.override(cfg, 'optimizer.warmup_steps', '1')  # so that 5 steps visibly learn
    for axis, size in mesh.items():
      config.override(cfg, f'mesh.{axis}', str(size))
    return run_steps(cfg, devices_for(cfg), steps=5)[2]['loss']
  plain = losses(data=1)
  np.testing.assert_allclose(losses(data=2, context=2, model=2), plain, rtol=1e-5)
  assert np.ptp(plain) > 1e-3  # the parameters move: later steps compare updated models


def context_violations():
  """What the forward layer loop at context=4 (data=2) does other than gather K and V from their
  T/4 shards: the queries and the residual stream stay split on T."""
  B, T, D, c = 16, 64, 96, 4  # B x T x D / 2 = 49152 is no weight's size
  cfg = make(**{'model.seq_len': T, 'model.hidden': D, 'data.batch_size': B, 'mesh.data': 2,
                'mesh.context': c})
  s = train.setup(cfg, devices_for(cfg))
  compiled = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
  module = hlo.parse(compiled.as_text())
  full = B // 2 * T * D  # one data shard's [B, T, D]: keys or values whole
  # The forward layer loop: the loop body whose collectives are not transposes (the backward's).
  forward = [b for b in module.while_bodies
             if not any('transpose(' in i.line for i in module.collectives(computation=b))]
  gathers = [i for b in forward for i in module.collectives('all-gather', computation=b)
             if math.prod(i.shapes[0][1]) == full]
  problems = []
  # Besides K and V, only parameters may move in a layer: nothing of an activation's size.
  weights = {math.prod(x.shape[1:]) for x in jax.tree.leaves(s.rt.abstract_params)}
  for b in forward:
    for i in module.collectives(computation=b):
      size = math.prod(i.shapes[0][1])
      if i not in gathers and size >= full // c and size not in weights and size * c not in weights:
        problems.append(f'{i.op} {i.shapes} in a layer: an activation moved')
  if len(gathers) != 2:
    problems.append(f'{len(gathers)} all-gathers of a whole [B, T, D] per layer, expected 2 (K, V)')
  for i in gathers:
    operand = next(x for x in module.instrs if x.name == i.operands[0])
    if math.prod(operand.shapes[0][1]) * c != full:
      problems.append(f'all-gather of {operand.shapes}: not from T/{c} shards')
  mem = compiled.memory_analysis()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.rt.abstract_params))
  if mem.argument_size_in_bytes > 1.1 * 3 * params / c:  # parameters and Adam's two moments
    problems.append(f'argument bytes {mem.argument_size_in_bytes:,}: the weights are not split '
                    'over context')
  return problems


def test_context_parallel_gathers_keys_and_values_only():
  assert context_violations() == []


def test_context_check_catches_an_unsplit_sequence(monkeypatch):
  # The wrong layout: a context axis that no rule splits anything over (user rules cannot
  # express it: the context splits are composed into them).
  monkeypatch.setattr(sharding, 'with_context', lambda rules: rules)
  problems = context_violations()
  assert any('all-gathers' in p for p in problems) and any('not split' in p for p in problems), \
      problems


def test_a_sequence_that_does_not_split_is_refused():
  cfg = make(**{'mesh.context': 4, 'model.seq_len': 18})
  with pytest.raises(config.ConfigError, match=r'model\.seq_len=18 is not divisible by mesh\.context=4'):
    train.setup(cfg, devices_for(cfg))
