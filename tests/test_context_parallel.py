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
from shardlm.model import attention, axes

# The context-parallel attention kernels: keys and values gathered, passed round a ring, or (local
# attention) a halo of W positions from the previous device. The local window (5) leaves ragged
# blocks at every context size.
ATTENTION = {'allgather': {}, 'ring': {'model.context_attention': 'ring'},
             'local': {'model.attention': 'local', 'model.window': 5, 'model.seq_len': 48}}


@pytest.mark.parametrize('context', [2, 4, 8])
@pytest.mark.parametrize('kind, kernel', [('gpt', 'allgather'), ('gpt', 'ring'), ('gpt', 'local'),
                                          ('bert', 'allgather'), ('bert', 'ring')])
def test_context_parallel_equals_one_device(kind, kernel, context):
  extra = ATTENTION[kernel]
  assert_same(loss_and_grads(make(kind, **{'mesh.context': context, **extra})),
              loss_and_grads(make(kind, **extra)))


def test_alternating_layers_under_context_parallelism():
  # dense layers by the ring without the zigzag order (the local layers need the natural one),
  # local layers by their halo
  extra = {**ATTENTION['local'], **ATTENTION['ring'], 'model.attention': 'alternating'}
  assert_same(loss_and_grads(make(**{'mesh.context': 4, **extra})), loss_and_grads(make(**extra)))


def test_zigzag_order_round_trips():
  layout = sharding.Layout(jax.make_mesh((4,), ('context',), devices=jax.devices()[:4]),
                           (('length', 'context'),))
  with axes.use(layout):
    x = jnp.arange(2 * 16).reshape(2, 16)
    z = attention.to_zigzag(x)
    np.testing.assert_array_equal(attention.from_zigzag(z), x)
  # device i (a block of 4) holds chunks i and 7 - i of 8
  np.testing.assert_array_equal(z[0].reshape(4, 2, 2)[1], [[2, 3], [12, 13]])


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


def context_violations(kernel='allgather'):
  """What the compiled step at context=4 (data=2) does other than the chosen kernel's own
  collectives: `allgather` gathers K and V whole from their T/4 shards; `ring` passes one
  [B, T/4, N, 2, H] block of K and V per trip of a C-trip loop; `local` sends one halo of
  W positions per layer. The queries and the residual stream stay split on T."""
  B, T, D, N, W, c = 16, 64, 96, 4, 8, 4  # B x T x D / 2 = 49152 is no weight's size
  extra = {**ATTENTION[kernel], 'model.window': W, 'model.seq_len': T}
  cfg = make(**{'model.hidden': D, 'data.batch_size': B, 'mesh.data': 2, 'mesh.context': c, **extra})
  s = train.setup(cfg, devices_for(cfg))
  compiled = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
  module = hlo.parse(compiled.as_text())
  full = B // 2 * T * D  # one data shard's [B, T, D]: keys or values whole
  # The forward pass's loops: those whose collectives are not transposes (the backward's). A
  # collective within a group of one device (a no-op psum that shard_map's transpose adds for
  # mesh axes of size 1) moves nothing.
  moves = lambda body: [i for i in module.collectives(computation=body) if i.group_size != 1]
  forward = [b for b in module.while_bodies if not any('transpose(' in i.line for i in moves(b))]
  layer_loops = [b for b in forward if module.trip_counts.get(b) == cfg.model.num_layers]
  gathers = [i for b in forward for i in module.collectives('all-gather', computation=b)
             if math.prod(i.shapes[0][1]) == full]
  permutes = [i for b in forward for i in module.collectives('collective-permute', computation=b)]
  problems = []
  # Besides the kernel's own, only parameters may move in a layer: nothing of an activation's size.
  weights = {math.prod(x.shape[1:]) for x in jax.tree.leaves(s.rt.abstract_params)}
  for b in forward:
    for i in moves(b):
      size = math.prod(i.shapes[0][1])
      if (i not in gathers + permutes and size >= full // c and size not in weights
          and size * c not in weights):
        problems.append(f'{i.op} {i.shapes} in a layer: an activation moved')
  block = (B // 2, T // c, N, 2, D // N)  # K and V of one device, stacked
  if kernel == 'allgather':
    if len(gathers) != 2:
      problems.append(f'{len(gathers)} all-gathers of a whole [B, T, D] per layer, expected 2 (K, V)')
    for i in gathers:
      operand = next(x for x in module.instrs if x.name == i.operands[0])
      if math.prod(operand.shapes[0][1]) * c != full:
        problems.append(f'all-gather of {operand.shapes}: not from T/{c} shards')
  else:
    if gathers:
      problems.append(f'{len(gathers)} all-gathers of a whole [B, T, D] per layer, expected none')
  if kernel == 'ring':
    rings = [b for b in forward if [i.shapes[0][1] for i in moves(b)] == [block]
             and moves(b)[0].op == 'collective-permute']
    if [module.trip_counts.get(b) for b in rings] != [c]:
      found = [(module.trip_counts.get(b), [(i.op, i.shapes) for i in moves(b)]) for b in forward]
      problems.append(f'no loop of {c} trips whose one collective is a collective-permute of '
                      f'the K/V block {block}; forward loops (trips, collectives): {found}')
  if kernel == 'local':
    halo = (B // 2, W, N, 2, D // N)
    found = [i.shapes[0][1] for b in layer_loops for i in moves(b) if i.op == 'collective-permute']
    if len(layer_loops) != 1 or found != [halo]:
      problems.append(f'expected one collective-permute of the halo {halo} per layer, found {found}')
  mem = compiled.memory_analysis()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.rt.abstract_params))
  if mem.argument_size_in_bytes > 1.1 * 3 * params / c:  # parameters and Adam's two moments
    problems.append(f'argument bytes {mem.argument_size_in_bytes:,}: the weights are not split '
                    'over context')
  return problems


@pytest.mark.parametrize('kernel', ['allgather', 'ring', 'local'])
def test_context_parallel_moves_only_what_its_kernel_needs(kernel):
  assert context_violations(kernel) == []


@pytest.mark.parametrize('kernel', ['allgather', 'ring', 'local'])
def test_context_check_catches_an_unsplit_sequence(monkeypatch, kernel):
  # The wrong layout: a context axis that no rule splits anything over (user rules cannot
  # express it: the context splits are composed into them).
  monkeypatch.setattr(sharding, 'with_context', lambda rules: rules)
  problems = context_violations(kernel)
  expected = {'allgather': 'all-gathers', 'ring': 'no loop', 'local': 'halo'}[kernel]
  assert any(expected in p for p in problems) and any('not split' in p for p in problems), problems


def test_ring_check_catches_gathered_keys(monkeypatch):
  # The wrong kernel: ring asked for, keys and values gathered instead.
  monkeypatch.setattr(attention, 'ring_attention', lambda q, k, v, **kw: attention._dense(
      q, *(axes.constrain(x, ('batch', None, 'act_heads', None)) for x in (k, v)), True, None))
  problems = context_violations('ring')
  assert any('expected none' in p for p in problems) and any('no loop' in p for p in problems), problems


def test_a_sequence_that_does_not_split_is_refused():
  cfg = make(**{'mesh.context': 4, 'model.seq_len': 18})
  with pytest.raises(config.ConfigError, match=r'model\.seq_len=18 is not divisible by mesh\.context=4'):
    train.setup(cfg, devices_for(cfg))


def long_context_temps(T, contexts):
  """Compiled temporary bytes per device of a step with local attention at sequence length T."""
  temps = {}
  for c in contexts:
    cfg = make(**{'model.seq_len': T, 'model.num_layers': 2, 'model.hidden': 64,
                  'model.attention': 'local', 'model.window': 256, 'data.batch_size': 1,
                  'mesh.context': c})
    s = train.setup(cfg, devices_for(cfg))
    lowered = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((1, T + 1), jnp.int32))
    temps[c] = lowered.compile().memory_analysis().temp_size_in_bytes
  return temps, s


def memory_falls_with_context(temps):
  """Problems, if the temporary memory per device does not fall as 1/context (within 20%)."""
  return [f'context={c}: {t:,} temporary bytes per device, {temps[1] / t:.2f}x less than one '
          f'device, expected {c}x' for c, t in temps.items() if not 0.8 < t * c / temps[1] < 1.25]


def test_a_65536_token_step_runs_and_its_memory_falls_with_context():
  T = 65536
  temps, s = long_context_temps(T, (1, 2, 4, 8))
  assert memory_falls_with_context(temps) == []
  ids = jax.device_put(np.random.default_rng(0).integers(0, 256, (1, T + 1), dtype=np.int32))
  _, metrics = s.step(s.init(), ids)  # the last setup: context=8
  assert abs(float(metrics['loss']) - math.log(256)) < 0.1  # random ids, a fresh model


def test_memory_check_catches_an_unsplit_sequence(monkeypatch):
  monkeypatch.setattr(sharding, 'with_context', lambda rules: rules)
  temps, _ = long_context_temps(8192, (1, 8))
  assert any('context=8' in p for p in memory_falls_with_context(temps))
