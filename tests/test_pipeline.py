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
from conftest import random_tokens, run_steps
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
    # K = 1 layer per stage and repeat: each stage's flag depends on its stage and repeat.
    'P=4,R=2,M=4,alternating': pipelined(4, 2, 4, **{'model.attention': 'alternating',
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
  # Every slot a bubble could read holds NaN before anything real arrives: a NaN that reached
  # the loss, an output or a parameter gradient (0 x NaN is NaN) would show.
  monkeypatch.setattr(pipeline, 'STALE', float('nan'))
  assert_same(loss_and_grads(make(**pipelined(P, R, M))), reference('gpt'))


def test_grad_accumulation_outside_and_micro_batches_inside():
  plain = make(**{'optimizer.grad_accum_steps': 2, 'mesh.data': 2})
  piped = make(**pipelined(2, 2, 4, **{'optimizer.grad_accum_steps': 2, 'mesh.data': 2}))
  assert_same(loss_and_grads(piped), loss_and_grads(plain))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_trains_like_the_plain_step(dtype):
  losses = lambda cfg: run_steps(cfg, devices_for(cfg), steps=3)[2]['loss']
  plain = losses(make(**{'model.dtype': dtype}))
  piped = losses(make(**pipelined(2, 2, 4, **{'model.dtype': dtype})))
  assert np.all(np.isfinite(piped))
  np.testing.assert_allclose(piped, plain, rtol=2e-2)  # the same sums in another order


def test_memory_does_not_hold_the_layers_per_iteration():
  """The backward pass keeps each stage's layers once, not once per pipeline iteration: from
  M = 2 to M = 8 (6 more iterations) the temporary memory grows by less than one stage's layers
  (D = 256: 12 MiB of layers against a few MiB of activations)."""
  def temp(R, M, remat):
    cfg = make(**pipelined(2, R, M, **{'model.hidden': 256, 'data.batch_size': 8,
                                       'model.remat': remat}))
    s = train.setup(cfg, devices_for(cfg))
    tokens = jax.ShapeDtypeStruct((8, T + 1), jnp.int32)
    return s.grads.lower(s.rt.abstract_params, tokens).compile().memory_analysis().temp_size_in_bytes
  stage_bytes = L // 2 * 12 * 256 * 256 * 4
  for R, remat in ((1, 'none'), (2, 'full'), (2, 'selective')):
    assert temp(R, 8, remat) - temp(R, 2, remat) < stage_bytes, (R, remat)


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


@pytest.mark.parametrize('rule, problem', [
    (('layers', None), 'argument bytes'),         # every device holds every layer
    (('layers', 'data'), 'a layer stack gathered'),  # split on the wrong axis: gathered to run
])
def test_pipeline_check_catches_a_wrong_layer_rule(rule, problem):
  problems = pipeline_problems(rules=(rule,))
  assert any(problem in p for p in problems), problems


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
  def compile_seconds_and_size(layers):
    cfg = make(**pipelined(8, 1, 8, **{'model.num_layers': layers}))
    s = train.setup(cfg)
    t0 = time.perf_counter()
    compiled = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
    return time.perf_counter() - t0, len(hlo.parse(compiled.as_text()).instrs)
  compile_seconds_and_size(8)  # warm the compiler's caches of everything but the model
  (t8, n8), (t72, n72) = compile_seconds_and_size(8), compile_seconds_and_size(72)
  # The program barely grows with depth (deterministic: 4336 -> 5358 instructions, the stage's
  # 9-layer loop against 1 layer inlined); nor, roughly, does the compile time (loose: a shared
  # machine's noise; 72 unrolled layers would be several times the program and the time).
  assert n72 < 1.5 * n8, (n8, n72)
  assert t72 < 3 * t8, (t8, t72)


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


def test_a_circular_checkpoint_reads_in_layer_order_everywhere(tmp_path):
  """Parameters of an R=2 run read back in layer order by every reader: restore_params (the
  runtime's target), inference (evaluate, generate), export-params, and convert to-hf."""
  from safetensors.numpy import load_file
  from shardlm import convert, inference
  cfg = make(**pipelined(4, 2, 4, **{'mesh.data': 2, 'train.run_dir': tmp_path / 'run'}))
  path, _ = train_and_save(cfg, tmp_path / 'run', steps=2, more=0)
  s = train.setup(cfg, devices_for(cfg))
  state, _, _ = checkpoint.Checkpoints(cfg, tmp_path / 'run', ByteTokenizer(), s.target()).restore()
  want = checkpoint.flat_names(natural(s, state['params']))  # the run's own view, reordered
  kernel = 'h.blocks.mlp.fc.kernel'
  assert not np.array_equal(np.asarray(state['params']['h']['blocks']['mlp']['fc']['kernel']),
                            want[kernel])  # stored stage-major: the test can tell the orders apart
  readers = {
      'numpy': checkpoint.flat_names(checkpoint.read_params_numpy(path)['params']),
      'inference': checkpoint.flat_names(inference.load(path, devices=jax.devices()[:1]).params),
  }
  export = checkpoint.export_params(path, tmp_path / 'export')
  readers['export-params'] = checkpoint.flat_names(checkpoint.read_params_numpy(export)['params'])
  for reader, got in readers.items():
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f'{reader}: {name}')
  with pytest.raises(ConfigError, match='evaluation and generation run without the pipeline'):
    inference.load(path, ['--config.mesh.stage=2'], devices=jax.devices()[:2])
  hf = load_file(str(convert.to_hf(path, tmp_path / 'hf')['path'] / 'model.safetensors'))
  for i in range(L):  # GPT-2's c_fc is our [D, F] kernel of layer i
    got = next(v for k, v in hf.items() if k.endswith(f'h.{i}.mlp.c_fc.weight'))
    np.testing.assert_array_equal(got, want[kernel][i], err_msg=str(i))


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    (pipelined(4, 3, 4), 'model.num_layers=8 is not divisible by mesh.stage=4 x model.pipeline_repeats=3'),
    (pipelined(4, 1, 6), 'model.pipeline_microbatches=6 is not a multiple of mesh.stage=4'),
    (pipelined(2, 0, 2), 'model.pipeline_repeats=0 must be >= 1'),
    (pipelined(2, 1, -1), 'model.pipeline_microbatches=-1 must be >= 0'),
    (pipelined(3, 1, 3), 'mesh.stage may be one of [2, 4, 8]'),
    (pipelined(2, 1, 32), 'data.batch_size=16 is not divisible by optimizer.grad_accum_steps=1 x '
                          'model.pipeline_microbatches=32'),
])
def test_bad_pipeline_settings(overrides, message):
  cfg = make(**overrides)
  with pytest.raises(ConfigError, match=re.escape(message)):
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


AOT = textwrap.dedent('''
    import json, os, sys, time
    name, devices, overrides = json.loads(sys.argv[1])
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax, jax.numpy as jnp
    from shardlm import config, train
    cfg = config.load(name)
    for k, v in overrides.items():
      config.override(cfg, k, str(v))
    t0 = time.perf_counter()
    s = train.setup(cfg)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.model.seq_len + 1), jnp.int32)
    compiled = s.step.lower(jax.eval_shape(s.init), tokens).compile()
    m = compiled.memory_analysis()
    print(json.dumps({'seconds': time.perf_counter() - t0, 'mesh': dict(s.rt.mesh.shape),
                      'argument_bytes': m.argument_size_in_bytes, 'alias_bytes': m.alias_size_in_bytes,
                      'temp_bytes': m.temp_size_in_bytes}))
''')


def compile_ahead(name, devices, overrides):
  """`name` with `overrides` compiled ahead of time for `devices` simulated CPU devices, in a
  subprocess (its own XLA_FLAGS): seconds, mesh and memory_analysis bytes per device."""
  out = subprocess.run([sys.executable, '-c', AOT, json.dumps([name, devices, overrides])],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def per_device_params(L, D, V, T, stage, model):
  """GPT parameters per device under megatron_fsdp with `layers -> stage`: the layers' tensor-
  parallel matrices and the Q/K/V and first MLP biases split stage x model ways, the layers' six
  D-vectors (two LayerNorms, two output biases) stage ways, the token table model ways
  (vocabulary-parallel), positions and ln_f whole."""
  F = 4 * D
  return (L * (4 * D * D + 3 * D + 2 * D * F + F) // (stage * model) + L * 6 * D // stage
          + V * D // model + T * D + 2 * D)


def test_gpt_8b_compiles_for_64_devices_at_stage_8_model_8():
  B = 8
  r = compile_ahead('gpt_8b', 64, {'mesh.stage': 8, 'mesh.model': 8, 'mesh.data': 1,
                                   'data.batch_size': B})
  assert r['mesh'] == {'data': 1, 'stage': 8, 'fsdp': 1, 'context': 1, 'model': 8}
  assert r['seconds'] < 300
  # float32 parameters and Adam's two moments: 150M parameters per device, 1/64 of the layers.
  state_bytes = 12 * per_device_params(72, 3072, 51200, 1024, stage=8, model=8)
  assert abs(r['argument_bytes'] - (state_bytes + B * 1025 * 4)) < 1024  # + int32 counters
  assert r['alias_bytes'] >= state_bytes  # donated: updated in place


def test_gpt_1t_compiles_for_512_devices_at_stage_64_model_8():
  # One pipeline of the paper's layout (its 6 data-parallel copies are the same program).
  B = 64
  r = compile_ahead('gpt_1t', 512, {'mesh.data': 1, 'data.batch_size': B,
                                    'model.pipeline_microbatches': 64})
  assert r['mesh'] == {'data': 1, 'stage': 64, 'fsdp': 1, 'context': 1, 'model': 8}
  state_bytes = 12 * per_device_params(128, 25600, 51200, 2048, stage=64, model=8)
  assert 26.1e9 < state_bytes < 26.3e9  # 2.18B parameters per device
  assert abs(r['argument_bytes'] - (state_bytes + B * 2049 * 4)) < 1024
