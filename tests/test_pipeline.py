"""Pipeline parallelism: the pipelined step equals the plain one, bubbles never reach a result, the
compiled program moves one buffer per iteration and holds 1/P of the layers, checkpoints cross
between pipelined and plain layouts, and big configs compile ahead of time."""
import json
import math
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from conftest import random_tokens
from test_bert import synthetic_batch

from shardlm import checkpoint, config, hlo, train
from shardlm.data.tokenizer import ByteTokenizer
from shardlm.errors import ConfigError
from shardlm.model import pipeline

B, T, D, L = 16, 16, 32, 8


def make(kind='gpt', **overrides):
  """A small 8-layer model (every P, R of the tests divides it); keys as on the command line."""
  cfg = config.load('tiny')
  base = {'model.kind': kind, 'model.num_layers': L, 'model.hidden': D, 'model.num_heads': 4,
          'model.seq_len': 32 if kind == 'bert' else T, 'model.scan_layers': True,
          'data.batch_size': B, 'mesh.data': 1}
  for key, value in {**base, **overrides}.items():
    config.override(cfg, key, str(value))
  return cfg


def pipelined(P, R, M, **overrides):
  return {'mesh.stage': P, 'model.pipeline_repeats': R, 'model.pipeline_microbatches': M,
          **overrides}


def devices_for(cfg):
  return jax.devices()[:math.prod(v for v in cfg.mesh.values() if v > 0)]


def batch_for(cfg, sharding):
  if cfg.model.kind == 'bert':
    return jax.device_put(synthetic_batch(0), sharding)
  return random_tokens(cfg).global_batch(0, sharding)


def natural(s, params):
  """Parameters (or gradients) with every layer stack in layer order, on the host."""
  order = s.rt.model_config.layer_order
  back = np.argsort(order) if order is not None else None
  return jax.tree.map(lambda a, stacked: np.asarray(a)[back] if stacked and back is not None
                      else np.asarray(a), params, s.rt.stacked)


def loss_and_grads(cfg):
  s = train.setup(cfg, devices_for(cfg))
  loss, grads = s.grads(s.rt.init_params(0), batch_for(cfg, s.batch_sharding))
  return float(loss), natural(s, grads)


_REFERENCES = {}


def reference(kind):
  """The plain (unpipelined) run on one device."""
  if kind not in _REFERENCES:
    _REFERENCES[kind] = loss_and_grads(make(kind))
  return _REFERENCES[kind]


def assert_same(got, want, rtol=1e-5, atol=1e-6):
  (loss, grads), (loss0, grads0) = got, want
  np.testing.assert_allclose(loss, loss0, rtol=rtol)
  flat, flat0 = checkpoint.flat_names(grads), checkpoint.flat_names(grads0)
  assert flat.keys() == flat0.keys()
  for name in flat:
    a, b = flat[name], flat0[name]
    # model=2 pads the vocabulary further: padding rows carry zero gradient.
    common = tuple(slice(min(m, n)) for m, n in zip(a.shape, b.shape))
    assert not np.any(a[tuple(slice(n, None) for n in b.shape[:1])]), name
    np.testing.assert_allclose(a[common], b[common], rtol=rtol, atol=atol, err_msg=name)


CASES = {f'P={P},R={R},M={M}{name}': pipelined(P, R, M, **mesh)
         for name, mesh in (('', {}), (',model=2', {'mesh.model': 2}), (',data=2', {'mesh.data': 2}))
         for P in (2, 4) for R in (1, 2) for M in (P, 2 * P)}
CASES.update({
    'P=2,R=2,M=2,data=2,model=2': pipelined(2, 2, 2, **{'mesh.data': 2, 'mesh.model': 2}),
    'P=2,R=1,M=2,fsdp=2': pipelined(2, 1, 2, **{'mesh.fsdp': 2}),
    'P=2,R=2,M=4,remat=full': pipelined(2, 2, 4, **{'model.remat': 'full'}),
    'P=2,R=2,M=4,remat=selective': pipelined(2, 2, 4, **{'model.remat': 'selective'}),
    'P=2,R=2,M=2,unrolled': pipelined(2, 2, 2, **{'model.scan_layers': False}),
    'P=2,R=1,M=2,alternating': pipelined(2, 1, 2, **{'model.attention': 'alternating',
                                                     'model.window': 4}),
})


@pytest.mark.parametrize('overrides', CASES.values(), ids=CASES.keys())
def test_pipelined_loss_and_gradients_equal_the_plain_step(overrides):
  extra = {k: v for k, v in overrides.items() if k in ('model.attention', 'model.window')}
  want = reference('gpt') if not extra else loss_and_grads(make(**extra))
  assert_same(loss_and_grads(make(**overrides)), want)


def test_pipelined_bert_equals_the_plain_step():
  assert_same(loss_and_grads(make('bert', **pipelined(2, 2, 4, **{'mesh.data': 2}))),
              reference('bert'))


@pytest.mark.parametrize('P, R, M', [(2, 1, 2), (4, 2, 8)])
def test_bubbles_never_touch_the_result(P, R, M, monkeypatch):
  # Every input a bubble computes on becomes NaN: a NaN that reached the loss, an output or a
  # parameter gradient (0 x NaN is NaN) would show.
  monkeypatch.setattr(pipeline, 'BUBBLE_FILL', float('nan'))
  assert_same(loss_and_grads(make(**pipelined(P, R, M))), reference('gpt'))


def test_grad_accumulation_outside_and_micro_batches_inside():
  plain = make(**{'optimizer.grad_accum_steps': 2, 'mesh.data': 2})
  piped = make(**pipelined(2, 2, 4, **{'optimizer.grad_accum_steps': 2, 'mesh.data': 2}))
  assert_same(loss_and_grads(piped), loss_and_grads(plain))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_trains_like_the_plain_step(dtype):
  def losses(cfg):
    s = train.setup(cfg, devices_for(cfg))
    state, out = s.init(), []
    for step in range(3):
      state, metrics = s.step(state, random_tokens(cfg).global_batch(step, s.batch_sharding))
      out.append(float(metrics['loss']))
    return np.array(out)
  plain = losses(make(**{'model.dtype': dtype}))
  piped = losses(make(**pipelined(2, 2, 4, **{'model.dtype': dtype})))
  assert np.all(np.isfinite(piped))
  np.testing.assert_allclose(piped, plain, rtol=2e-2)  # the same sums in another order


# -- the compiled program ---------------------------------------------------------------------------

def pipeline_problems(rules=()):
  """What in the compiled step at P=4 (R=2, M=8, data=2) departs from the pipeline's design."""
  P, R, M = 4, 2, 8
  cfg = make(**pipelined(P, R, M, **{'mesh.data': 2, 'sharding.rules': repr(rules)}))
  s = train.setup(cfg, devices_for(cfg))
  tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
  compiled = s.grads.lower(s.rt.abstract_params, tokens).compile()
  module = hlo.parse(compiled.as_text())
  problems = []
  # The loops: forward and backward, R M + P - 1 iterations each (XLA's known trip count).
  trips = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled.as_text())]
  loops = [b for b in module.while_bodies if module.collectives(computation=b)]
  if len(loops) != 2 or sorted(trips) != [R * M + P - 1] * 2:
    problems.append(f'expected 2 loops of {R * M + P - 1} iterations, found {loops} {trips}')
  # Each iteration moves the [B/M, T, D] buffer (per data shard) one stage on: one permute.
  buffer = ('f32', (1, 1, B // M // 2, T, D))
  for body in loops:
    moves = [i for i in module.collectives(computation=body) if i.op.startswith('collective-permute')]
    if [i.shapes for i in moves] != [[buffer]]:
      problems.append(f'loop {body}: collective-permutes {[i.shapes for i in moves]}, expected '
                      f'one of {buffer}')
    for i in module.collectives(computation=body):
      if not i.op.startswith('collective-permute') and i.group_size > 1:
        problems.append(f'loop {body}: {i.op} {i.shapes} over {i.group_size} devices per iteration')
  # No layer parameter is gathered across stages.
  per_stage = {L // P, R * (L // (R * P))}
  for i in module.collectives('all-gather'):
    if any(dims and dims[0] in per_stage | {L} for _, dims in i.shapes):
      problems.append(f'all-gather {i.shapes}: a layer stack gathered')
  # Each device's arguments: 1/P of every layer stack, the rest whole (data=2 splits the batch).
  size = lambda x: x.size * x.dtype.itemsize
  flat = checkpoint.flat_names(s.rt.abstract_params)
  stacked = checkpoint.flat_names(s.rt.stacked)
  want = sum(size(x) // (P if stacked[n] else 1) for n, x in flat.items()) + B * (T + 1) * 4 // 2
  got = compiled.memory_analysis().argument_size_in_bytes
  if got != want:
    problems.append(f'argument bytes {got:,}, expected {want:,} (1/{P} of the layers)')
  return problems


def test_compiled_pipeline_moves_one_buffer_per_iteration_and_holds_a_stage():
  assert pipeline_problems() == []


def test_pipeline_check_catches_replicated_layers():
  problems = pipeline_problems(rules=(('layers', None),))
  assert any('argument bytes' in p for p in problems), problems


def test_executed_work_is_the_formula():
  """What the compiled stack (forward and backward) executes, pipelined over plain, is
  (R M + P - 1) / (R M), bubble iterations included: 19/16 at P=4, M=8, R=2. XLA's cost analysis
  counts a loop body once, so the executed work is its count times the loop's trip count (the
  rest of the program, a few elementwise ops, is negligible at these sizes)."""
  P, R, M = 4, 2, 8
  size = {'model.hidden': 128, 'model.seq_len': 64, 'data.batch_size': 32}

  def executed(cfg):
    s = train.setup(cfg, devices_for(cfg))

    def loss(params, x):
      with s.rt.rules_active():
        return jnp.sum(nnx.merge(s.rt.graphdef, params).h(x) ** 2)
    x = jax.ShapeDtypeStruct((32, 64, 128), jnp.float32, sharding=s.rt.sharding(('batch', None, None)))
    fn = jax.jit(jax.grad(loss), in_shardings=(s.rt.param_shardings, x.sharding))
    compiled = fn.lower(s.rt.abstract_params, x).compile()
    trips = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled.as_text())]
    assert len(set(trips)) == 1 and len(trips) == 2, trips  # one loop forward, one backward
    return compiled.cost_analysis()['flops'] * len(s.rt.mesh.devices.flat) * trips[0], trips[0]

  piped, iterations = executed(make(**pipelined(P, R, M, **size)))
  plain, layers = executed(make(**size))
  assert (iterations, layers) == (R * M + P - 1, L)
  assert abs(piped / plain / ((R * M + P - 1) / (R * M)) - 1) < 0.02, piped / plain


def test_scanned_compile_time_is_flat_in_depth():
  def compile_seconds(layers):
    cfg = make(**pipelined(8, 1, 8, **{'model.num_layers': layers}))
    s = train.setup(cfg)
    t0 = time.perf_counter()
    s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
    return time.perf_counter() - t0
  compile_seconds(8)  # warm the compiler's caches of everything but the model
  shallow, deep = compile_seconds(8), compile_seconds(72)
  assert deep < 1.5 * shallow, (shallow, deep)


# -- checkpoints ------------------------------------------------------------------------------------

def train_and_save(cfg, run_dir, steps=3, more=3):
  """`steps` steps, a save, `more` steps: (checkpoint path, the losses of the `more` steps)."""
  s = train.setup(cfg, devices_for(cfg))
  data = random_tokens(cfg)
  state = s.init()
  for step in range(steps):
    state, _ = s.step(state, data.global_batch(step, s.batch_sharding))
  ckpt = checkpoint.Checkpoints(cfg, run_dir, ByteTokenizer(), s.target())
  path = ckpt.save(steps, state)
  losses = []
  for step in range(steps, steps + more):
    state, metrics = s.step(state, data.global_batch(step, s.batch_sharding))
    losses.append(float(metrics['loss']))
  ckpt.close()
  return path, np.array(losses)


def resume(cfg, path, steps=3, more=3):
  s = train.setup(cfg, devices_for(cfg))
  ckpt = checkpoint.Checkpoints(cfg, path.parent.parent, ByteTokenizer(), s.target())
  state, step, _ = ckpt.restore()
  assert step == steps
  data, losses = random_tokens(cfg), []
  for step in range(steps, steps + more):
    state, metrics = s.step(state, data.global_batch(step, s.batch_sharding))
    losses.append(float(metrics['loss']))
  ckpt.close()
  return np.array(losses)


@pytest.mark.parametrize('direction', ['pipelined to plain', 'plain to pipelined'])
def test_checkpoints_cross_between_pipelined_and_plain(direction, tmp_path):
  piped = pipelined(4, 2, 4, **{'mesh.data': 2})  # R=2: the stack is stored stage-major
  plain = {'mesh.data': 8}
  first, second = (piped, plain) if direction == 'pipelined to plain' else (plain, piped)
  path, want = train_and_save(make(**first, **{'train.run_dir': tmp_path / 'a'}), tmp_path / 'a')
  got = resume(make(**second, **{'train.run_dir': tmp_path / 'b', 'train.resume': path}), path)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    (pipelined(4, 3, 4), 'model.num_layers=8 is not divisible by mesh.stage=4 x model.pipeline_repeats=3'),
    (pipelined(4, 1, 6), 'model.pipeline_microbatches=6 is not a multiple of mesh.stage=4'),
    (pipelined(2, 0, 2), 'model.pipeline_repeats=0 must be >= 1'),
    (pipelined(2, 1, 32), 'data.batch_size=16 is not divisible by optimizer.grad_accum_steps=1 x 32'),
])
def test_bad_pipeline_settings(overrides, message):
  cfg = make(**overrides)
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    train.setup(cfg, devices_for(cfg))


def test_decoding_refuses_the_pipeline():
  cfg = make(**pipelined(2, 1, 2))
  s = train.setup(cfg, devices_for(cfg))

  def decode(params):
    cache = s.rt.apply(params, 2, 4, method='init_cache')
    return s.rt.apply(params, jnp.zeros((2, 1), jnp.int32), cache,
                      {'pos': 0, 'start': jnp.zeros((2,), jnp.int32)})
  with pytest.raises(ValueError, match='decoding runs without the pipeline'):
    jax.eval_shape(decode, s.rt.abstract_params)


GPT_8B_AOT = textwrap.dedent('''
    import os, json, time
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=64'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax, jax.numpy as jnp
    from shardlm import config, train
    cfg = config.load('gpt_8b')
    for k, v in {'mesh.stage': 8, 'mesh.model': 8, 'mesh.data': 1, 'data.batch_size': 8}.items():
      config.override(cfg, k, str(v))
    t0 = time.perf_counter()
    s = train.setup(cfg)
    compiled = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((8, 1025), jnp.int32)).compile()
    m = compiled.memory_analysis()
    print(json.dumps({'seconds': time.perf_counter() - t0, 'mesh': dict(s.rt.mesh.shape),
                      'argument_bytes': m.argument_size_in_bytes, 'alias_bytes': m.alias_size_in_bytes}))
''')


def test_gpt_8b_compiles_for_64_devices_at_stage_8_model_8():
  out = subprocess.run([sys.executable, '-c', GPT_8B_AOT], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['mesh'] == {'data': 1, 'stage': 8, 'fsdp': 1, 'model': 8}
  assert r['seconds'] < 300
  # Per device: the layers' tensor-parallel matrices (and Q/K/V and first MLP biases) 1/64 (8
  # stages x 8-way Megatron); the layers' six D-vectors 1/8 (stages only); the token table 1/8
  # (vocabulary-parallel); positions and ln_f whole. Parameters and Adam's two moments, float32.
  L, D, V, T = 72, 3072, 51200, 1024
  F = 4 * D
  params = (L * (4 * D * D + 3 * D + 2 * D * F + F) // 64 + L * 6 * D // 8 + V * D // 8
            + T * D + 2 * D)
  state_bytes, tokens_bytes = 12 * params, 8 * (T + 1) * 4
  assert abs(r['argument_bytes'] - (state_bytes + tokens_bytes)) < 1024  # + int32 counters
  assert r['alias_bytes'] >= state_bytes  # donated: updated in place
