"""Context parallelism (a `context` mesh axis, every activation split on T): the same losses and
gradients as one device with keys and values gathered, passed round a ring, or (local attention)
a halo from the previous device; what each compiled kernel moves; weights split like FSDP; a
65,536-token step and its memory per device."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import params_checkpoint, run_steps
from test_pipeline import assert_same, batch_for, devices_for, loss_and_grads, make

from shardlm import config, generate, hlo, inference, sharding, train
from shardlm.model import attention, axes

# The context-parallel attention kernels: keys and values gathered, passed round a ring, or (local
# attention) a halo of W positions from the previous device. The local window (5) leaves ragged
# blocks at every context size.
ATTENTION = {'allgather': {}, 'ring': {'model.context_attention': 'ring'},
             'local': {'model.attention': 'local', 'model.window': 5, 'model.seq_len': 48}}


# The whole model at the smallest and largest split (the kernels alone at every size, below).
@pytest.mark.parametrize('context', [2, 8])
@pytest.mark.parametrize('kind, kernel', [('gpt', 'allgather'), ('gpt', 'ring'), ('gpt', 'local'),
                                          ('bert', 'allgather'), ('bert', 'ring')])
def test_context_parallel_equals_one_device(kind, kernel, context):
  assert_same(loss_and_grads(make(kind, **{'mesh.context': context, **ATTENTION[kernel]})),
              one_device(kind, kernel))


@functools.cache
def one_device(kind, kernel):  # computed once for the three context sizes
  return loss_and_grads(make(kind, **ATTENTION[kernel]))


@pytest.mark.parametrize('context', [2, 4, 8])
def test_ring_and_halo_kernels_equal_unsplit_attention(context):
  B, T, N, H = 2, 64, 4, 8
  q, k, v, w = (jax.random.normal(key, (B, T, N, H)) for key in jax.random.split(jax.random.key(0), 4))
  pad = (jnp.arange(T)[None] < jnp.array([[T], [T - 13]]))[:, None, None, :]  # BERT's key mask
  layout = sharding.Layout(sharding.make_mesh({'context': context}, jax.devices()[:context]),
                           (('length', 'context'),))
  cases = {'causal ring': dict(context='ring'), 'zigzag ring': dict(context='ring', zigzag=True),
           'bidirectional ring': dict(context='ring', causal=False, mask=pad),
           'local halo': dict(kind='local', window=5)}
  for name, kw in cases.items():
    got, want = (outputs_and_grads(f, q, k, v, w) for f in (split(layout, kw), whole(kw)))
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def split(layout, kw):
  def f(q, k, v):
    with axes.use(layout):
      zigzag = kw.get('zigzag', False)
      q, k, v = (attention.to_zigzag(x) if zigzag else x for x in (q, k, v))
      o = attention.attend(q, k, v, **kw)
      return attention.from_zigzag(o) if zigzag else o
  return f


def whole(kw):
  return lambda q, k, v: attention.attend(q, k, v, **{**kw, 'context': 'allgather', 'zigzag': False})


def outputs_and_grads(f, q, k, v, w):
  """f's output, and the gradients of its weighted sum (float32)."""
  loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w)
  return (jax.jit(f)(q, k, v), *jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v))


def test_ring_in_bfloat16_and_with_a_row_of_padding_only():
  B, T, N, H, C = 2, 32, 2, 8, 4
  q, k, v, w = (jax.random.normal(key, (B, T, N, H)) for key in jax.random.split(jax.random.key(1), 4))
  layout = sharding.Layout(sharding.make_mesh({'context': C}, jax.devices()[:C]), (('length', 'context'),))
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = outputs_and_grads(split(layout, dict(context='ring', zigzag=True)), *bf16, w)
  want = outputs_and_grads(whole({}), q, k, v, w)
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=0.05, rtol=0.05)
  # Row 1 sees no key at all: finite outputs (0) and gradients, row 0 unchanged.
  pad = jnp.array([[True] * T, [False] * T])[:, None, None, :]
  got = outputs_and_grads(split(layout, dict(context='ring', causal=False, mask=pad)), q, k, v, w)
  want = outputs_and_grads(whole(dict(causal=False, mask=pad)), q, k, v, w)
  assert all(bool(jnp.isfinite(a).all()) for a in got)
  np.testing.assert_array_equal(got[0][1], 0)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_alternating_layers_under_context_parallelism():
  # dense layers by the ring without the zigzag order (the local layers need the natural one),
  # local layers by their halo
  extra = {**ATTENTION['local'], **ATTENTION['ring'], 'model.attention': 'alternating'}
  assert_same(loss_and_grads(make(**{'mesh.context': 4, **extra})), loss_and_grads(make(**extra)))


def test_zigzag_order_round_trips():
  layout = sharding.Layout(sharding.make_mesh({'context': 4}, jax.devices()[:4]),
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
    {'mesh.context': 2, 'mesh.stage': 2, 'model.pipeline_microbatches': 2, **ATTENTION['ring']},
    {'mesh.context': 2, 'mesh.model': 2, 'sharding.preset': 'megatron_sp', **ATTENTION['local']},
    {'mesh.context': 2, 'mesh.fsdp': 2, 'mesh.model': 2, 'model.remat': 'full', **ATTENTION['ring']},
    {'mesh.context': 4, 'mesh.data': 2, 'model.remat': 'selective', **ATTENTION['ring']},
], ids=['megatron_sp', 'fsdp,model', 'stage', 'user rule', 'ring,stage', 'local,megatron_sp',
        'ring,fsdp,model,full remat', 'ring,data,selective remat'])
def test_context_combines_with_other_axes(overrides):
  alone = {k: v for k, v in overrides.items() if k.startswith('model.') and 'pipeline' not in k}
  assert_same(loss_and_grads(make(**overrides)), loss_and_grads(make(**alone)))


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
  [B, T/4, N, 2, H] block of K and V per trip of a loop of C - 1 trips (the last block is
  folded in after it, with nothing left to send); `local` sends one halo of W positions per
  layer. The queries and the residual stream stay split on T."""
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
  block = (B // 2, T // c, N, 2, D // N)  # K and V of one device, stacked
  halo = (B // 2, W, N, 2, D // N)  # the last W positions of K and V
  expected = {'allgather': None, 'ring': block, 'local': halo}[kernel]
  permutes = [i for b in forward for i in module.collectives('collective-permute', computation=b)
              if i.shapes[0][1] == expected]
  problems = []
  # Besides the kernel's own, only parameters may move in a layer: nothing of an activation's size.
  weights = {math.prod(x.shape[1:]) for x in jax.tree.leaves(s.rt.abstract_params)}
  for b in forward:
    for i in moves(b):
      size = math.prod(i.shapes[0][1])
      if (i not in gathers + permutes and size >= full // c and size not in weights
          and size * c not in weights):
        problems.append(f'{i.op} {i.shapes} in a layer: an activation moved')
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
    if [module.trip_counts.get(b) for b in rings] != [c - 1]:
      found = [(module.trip_counts.get(b), [(i.op, i.shapes) for i in moves(b)]) for b in forward]
      problems.append(f'no loop of {c - 1} trips whose one collective is a collective-permute of '
                      f'the K/V block {block}; forward loops (trips, collectives): {found}')
  if kernel == 'local':
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


def test_a_context_parallel_model_decodes_on_a_plain_layout(tmp_path):
  """The checkpoint does not depend on context parallelism: a ring-trained model's parameters
  load for scoring and decoding without a context axis and give the same loss."""
  cfg = make(**{'mesh.context': 4, **ATTENTION['ring']})
  s = train.setup(cfg, devices_for(cfg))
  batch = batch_for(cfg, s.batch_sharding)
  loss, _ = s.eval_metrics(s.rt.init_params(0), batch)
  m = inference.load(params_checkpoint(tmp_path / 'params', s.rt), devices=jax.devices()[:1])
  assert dict(m.rt.mesh.shape)['context'] == 1
  nll, _ = m.score(np.asarray(batch))
  np.testing.assert_allclose(nll.mean(), float(loss), rtol=1e-5)
  out = generate.Generator(m.rt, m.params, m.tokenizer.eod_id)([np.array([5, 6, 7], np.int32)], 4)
  assert len(out[0]) == 4


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


@pytest.mark.parametrize('overrides, message', [
    ({'model.context_attention': 'rng'}, r"model\.context_attention='rng' is not one of allgather, ring"),
    ({'model.context_attention': 'ring', 'model.seq_len': 20},
     r'model\.seq_len=20 is not divisible by 2 x mesh\.context=4'),
    ({'model.attention': 'local', 'model.window': 8, 'model.seq_len': 16},
     r'model\.window=8 is longer than the sequence block per device \(model\.seq_len=16 / '
     r'mesh\.context=4 = 4\)'),
])
def test_context_attention_settings_that_cannot_work_are_refused(overrides, message):
  cfg = make(**{'mesh.context': 4, **overrides})
  with pytest.raises(config.ConfigError, match=message):
    train.setup(cfg, devices_for(cfg))
