"""Benchmark the jitted train step (and attention kernels) of a config on this machine.

  python scripts/bench.py --config tiny                         # step time, tokens/s, MFU
  python scripts/bench.py --config tiny --compare-torch         # + PyTorch/transformers GPT-2 step
  python scripts/bench.py --config tiny --config.model.num_layers=6 --config.model.hidden=512 \
      --config.model.num_heads=8 --compare-torch                # the 6-layer D=512 byte GPT
  python scripts/bench.py --config tiny --profile               # + where the step's time goes
  python scripts/bench.py --attention --window 256              # local vs dense, T = 2048..16384
  python scripts/bench.py --generate --config.model.seq_len=1024 # decoding tokens/s, cache or not
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python scripts/bench.py --context-attention                # ring vs allgather vs local halo
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python scripts/bench.py --long-context                     # T=65536 step, memory by context

Compile and warm-up are excluded; times are medians. On CPU, MFU is against the best
matmul rate measured in the same run (XLA float32 before and after the timed steps, and
PyTorch's when it is installed).
"""
import argparse
import collections
import glob
import json
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from shardlm import config as config_lib, perf, runtime, sharding, train
from shardlm.model import attention, axes, pipeline
from shardlm.model.attention import local_attention


def median_time(fn, repeats):
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def torch_matmul_peak(n=1024, repeats=5):
  import torch
  a = torch.ones(n, n)
  return 2 * n**3 / median_time(lambda: a @ a, repeats)


def profile_ops(compiled, run, steps=5):
  """Time of each compiled HLO op per step, from a jax.profiler trace of `steps` calls of `run`.

  Each op is labelled with the JAX operation it came from (the HLO metadata) and its phase:
  forward (`jvp`), backward (`transpose(jvp)`) or the rest (optimizer update, loss scaling).
  Times are per device: summed over this process's devices, then divided by their number.
  Returns the per-op rows (longest first) and the totals by phase and by XLA op kind.
  """
  meta = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(.*?op_name="([^"]+)"', line)
    # Control flow (a scanned layer loop, a cond) encloses its body's ops: not counted twice.
    if m and m.group(3) not in ('while', 'conditional', 'call'):
      meta[m.group(1)] = (m.group(2), m.group(4))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      run()
    jax.profiler.stop_trace()
    (path,) = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in meta:
          per_op[event.name] += event.duration_ns / 1e9 / steps / jax.local_device_count()
  rows, phases, kinds = [], {}, {}
  for name, seconds in per_op.most_common():
    shape, op = meta[name]
    phase = 'backward' if 'transpose(jvp' in op else 'forward' if 'jvp(' in op else 'update/other'
    kind = re.sub(r'[._]\d+$', '', name)
    phases[phase] = phases.get(phase, 0) + seconds
    kinds[kind] = kinds.get(kind, 0) + seconds
    rows.append({'op': name, 'seconds': seconds, 'shape': shape, 'phase': phase,
                 'source': op.split('/', 1)[-1]})
  return {'rows': rows, 'by_phase': dict(phases), 'by_kind': dict(kinds)}


def print_profile(p, top=25):
  total = sum(p['by_phase'].values())
  print(f'profile: {total * 1e3:.1f} ms of ops per step; by phase: '
        + ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in
                                     sorted(p['by_phase'].items(), key=lambda kv: -kv[1])))
  print('  by op kind: ' + ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in
                                     sorted(p['by_kind'].items(), key=lambda kv: -kv[1])[:8]))
  for r in p['rows'][:top]:
    print(f"  {r['seconds'] * 1e3:7.2f} ms  {r['phase']:<12} {r['op']:<26} {r['shape'][:34]:<34} "
          f"{r['source'][-70:]}")


def bench_step(cfg, repeats, profile=False):
  s = train.setup(cfg)
  B, T, m = cfg.data.batch_size, cfg.model.seq_len, s.rt.model_config
  state = s.init()
  tokens = jax.device_put(np.random.default_rng(0).integers(0, m.vocab_size, (B, T + 1), np.int32),
                          s.batch_sharding)
  step = s.step.lower(state, tokens).compile()
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], tokens)
    jax.block_until_ready(metrics)
  dt = median_time(run, repeats)
  flops = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, m.padded_vocab)
  # A pipeline's bubble is idle time, not work: the MFU counts the model's FLOPs only.
  out = {'pipeline': {'stages': m.stages, 'repeats': m.repeats, 'microbatches': m.microbatches,
                      'bubble': pipeline.bubble(m.stages, m.repeats, m.microbatches)},
         'step_s': dt, 'tokens_per_s': B * T / dt, 'flops_per_s': flops / dt,
         'tflops_per_device': flops / dt / jax.device_count() / 1e12,
         'params': sum(x.size for x in jax.tree.leaves(holder[0]['params']))}
  if profile:
    out['profile'] = profile_ops(step, run)
  return out


def bench_torch(cfg, repeats, attention='sdpa'):
  """The same GPT-2 shape as a Hugging Face GPT2LMHeadModel, trained with AdamW in PyTorch;
  attention by torch's fused scaled_dot_product_attention ('sdpa', transformers' default) or
  by plain matmuls and softmax ('eager')."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  m, B, T = cfg.model, cfg.data.batch_size, cfg.model.seq_len
  model = GPT2LMHeadModel(GPT2Config(
      vocab_size=m.vocab_size, n_positions=T, n_embd=m.hidden, n_layer=m.num_layers,
      n_head=m.num_heads, n_inner=m.mlp_dim or None, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, activation_function='gelu_new', attn_implementation=attention))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ids = torch.randint(0, m.vocab_size, (B, T + 1))

  def run():
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return median_time(run, repeats)


def bench_attention(window, lengths, repeats, dense_max, B=1, N=8, H=64):
  """Forward + backward of one attention call, local against dense, at each length. Dense
  attention keeps N x T x T float32 scores (8.6 GB at T=16384), so it runs only up to
  `dense_max`; the time per token of local attention shows whether it grows linearly."""
  rows = []
  for T in lengths:
    q, k, v = (jax.random.normal(key, (B, T, N, H)) for key in jax.random.split(jax.random.key(0), 3))
    grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
    local = grad(lambda q, k, v: local_attention(q, k, v, window))
    dense = grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    t_local = median_time(lambda: jax.block_until_ready(local(q, k, v)), repeats)
    row = {'T': T, 'local_s': t_local, 'local_us_per_token': t_local / T * 1e6}
    line = f'T={T:>6}  local {t_local * 1e3:9.1f} ms ({row["local_us_per_token"]:.2f} us/token)'
    if T <= dense_max:
      t_dense = median_time(lambda: jax.block_until_ready(dense(q, k, v)), repeats)
      row.update(dense_s=t_dense, speedup=t_dense / t_local)
      line += f'   dense {t_dense * 1e3:9.1f} ms   dense/local {t_dense / t_local:6.1f}x'
    rows.append(row)
    print(line, flush=True)
  return rows


def bench_context_attention(window, lengths, repeats, max_len, B=1, N=2, H=64):
  """Forward + backward of one causal attention call with T split over every device (a
  `context` mesh axis): keys and values gathered (`allgather`), passed round the ring in zigzag
  order (`ring`), and local attention's halo exchange (`local`). `max_len`: the longest T each
  of allgather and ring runs at (allgather keeps [T/C, T] float32 scores per device)."""
  C = jax.device_count()
  mesh = sharding.make_mesh({'context': C})
  layout = sharding.Layout(mesh, (('length', 'context'),))
  split = jax.NamedSharding(mesh, jax.P(None, 'context'))
  # The inputs are random, so the ring can take them as already in zigzag order: the work is the
  # same as in training, where the model reorders the tokens once per step.
  kernels = {'allgather': dict(kind='dense'), 'ring': dict(kind='dense', context='ring', zigzag=True),
             'local': dict(kind='local', window=window)}
  rows = []
  for T in lengths:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(jax.random.normal(key, (B, T, N, H)), split) for key in keys)
    row, line = {'T': T}, f'T={T:>6} on {C} devices:'
    for name, kw in kernels.items():
      if name in max_len and T > max_len[name]:
        continue

      def loss(q, k, v, kw=kw):
        with axes.use(layout):
          return jnp.sum(attention.attend(q, k, v, causal=True, **kw))
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      row[f'{name}_s'] = median_time(lambda: jax.block_until_ready(step(q, k, v)), repeats)
      line += f'  {name} {row[f"{name}_s"] * 1e3:9.1f} ms'
    for a, b in (('allgather', 'ring'), ('ring', 'local'), ('allgather', 'local')):
      if f'{a}_s' in row and f'{b}_s' in row:
        row[f'{a}/{b}'] = row[f'{a}_s'] / row[f'{b}_s']
        line += f'  {a}/{b} {row[f"{a}/{b}"]:5.2f}x'
    rows.append(row)
    print(line, flush=True)
  return rows


def long_context(T, window, contexts):
  """A tiny GPT with local attention at sequence length T: each context size's compiled temporary
  memory per device (XLA's memory_analysis), and one timed step at the largest."""
  rows = []
  for c in contexts:
    cfg = config_lib.load('tiny')
    for key, value in {'model.seq_len': T, 'model.attention': 'local', 'model.window': window,
                       'data.batch_size': 1, 'mesh.data': 1, 'mesh.context': c}.items():
      config_lib.override(cfg, key, str(value))
    s = train.setup(cfg, jax.devices()[:c])
    tokens = jax.ShapeDtypeStruct((1, T + 1), jnp.int32)
    compiled = s.step.lower(jax.eval_shape(s.init), tokens).compile()
    mem = compiled.memory_analysis()
    rows.append({'context': c, 'temp_bytes': mem.temp_size_in_bytes,
                 'argument_bytes': mem.argument_size_in_bytes})
    print(f'T={T} context={c}: temporary {mem.temp_size_in_bytes / 2**20:8.1f} MiB per device, '
          f'arguments {mem.argument_size_in_bytes / 2**20:6.1f} MiB', flush=True)
  state = s.init()
  ids = jax.device_put(np.random.default_rng(0).integers(0, 256, (1, T + 1), dtype=np.int32))
  t = time.perf_counter()
  state, metrics = s.step(state, ids)
  loss = float(metrics['loss'])
  rows[-1].update(step_s=time.perf_counter() - t, loss=loss)
  print(f'one step at context={contexts[-1]}: {rows[-1]["step_s"]:.1f} s with compile, loss {loss:.3f}')
  return rows


def bench_generate(cfg, new_tokens, prompt_len, batches):
  """Decoding tokens/s of the Generator with its KV cache and by recomputing the whole window.

  Random weights (speed does not depend on them) and an end-of-document id that never comes, so
  every row decodes exactly `new_tokens`. Each path is compiled and warmed up first; then one
  timed generation of `new_tokens` per batch size and path.
  """
  from shardlm.generate import Generator
  rt = runtime.build(cfg)
  m = rt.model_config
  gen = Generator(rt, rt.init_params(cfg.train.seed), eod_id=-1)
  rng = np.random.default_rng(0)
  rows = []
  for B in batches:
    prompts = [rng.integers(0, m.vocab_size, prompt_len).astype(np.int32) for _ in range(B)]
    row = {'batch': B, 'new_tokens': new_tokens, 'prompt': prompt_len}
    for name, cache in (('cached', True), ('recompute', False)):
      if cache:
        gen(prompts, new_tokens)  # compiles the prefill and the one-token step
      else:  # the same window shape as the timed run: compiled once, not run 512 times
        S = prompt_len + new_tokens
        jax.block_until_ready(gen._full(gen.params, jnp.zeros((B, S), jnp.int32), jnp.int32(S)))
      t = time.perf_counter()
      out = gen(prompts, new_tokens, use_cache=cache)
      dt = time.perf_counter() - t
      assert all(len(o) == new_tokens for o in out)
      row[f'{name}_tokens_per_s'] = B * new_tokens / dt
    row['cache_speedup'] = row['cached_tokens_per_s'] / row['recompute_tokens_per_s']
    rows.append(row)
    print(f"batch {B:>3}: {new_tokens} tokens after a {prompt_len}-token prompt | with cache "
          f"{row['cached_tokens_per_s']:,.0f} tok/s | recomputing {row['recompute_tokens_per_s']:,.0f} "
          f"tok/s | cache {row['cache_speedup']:.1f}x faster", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--compare-torch', action='store_true')
  parser.add_argument('--torch-attention', choices=('sdpa', 'eager'), default='sdpa',
                      help="the PyTorch reference's attention (default: transformers' own default)")
  parser.add_argument('--profile', action='store_true',
                      help="trace 5 steps and print where the step's time goes, op by op")
  parser.add_argument('--attention', action='store_true', help='time local vs dense attention')
  parser.add_argument('--window', type=int, default=256)
  parser.add_argument('--lengths', default='2048,4096,8192,16384')
  parser.add_argument('--dense-max', type=int, default=8192, help='longest T to time dense attention at')
  parser.add_argument('--context-attention', action='store_true',
                      help='time ring vs allgather vs local-halo attention over all devices')
  parser.add_argument('--context-lengths', default='8192,16384,32768,65536')
  parser.add_argument('--allgather-max', type=int, default=16384)
  parser.add_argument('--ring-max', type=int, default=32768)
  parser.add_argument('--long-context', action='store_true',
                      help='memory per device of a T=65536 local-attention step at context 1..8')
  parser.add_argument('--generate', action='store_true', help='time decoding with/without cache')
  parser.add_argument('--new-tokens', type=int, default=512)
  parser.add_argument('--prompt-len', type=int, default=16)
  parser.add_argument('--batches', default='1,16')
  parser.add_argument('--out', help='write the results as JSON here')
  args, rest = parser.parse_known_args()
  results = {'device': jax.devices()[0].device_kind, 'devices': jax.device_count()}

  if args.attention:
    results['attention'] = bench_attention(args.window, [int(t) for t in args.lengths.split(',')],
                                           args.repeats, args.dense_max)
  elif args.context_attention or args.long_context:
    if jax.device_count() < 2:
      print('shardlm: error: --context-attention and --long-context split T over several '
            'devices; on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8',
            file=sys.stderr)
      sys.exit(2)
    if args.context_attention:
      results['context_attention'] = bench_context_attention(
          args.window, [int(t) for t in args.context_lengths.split(',')], args.repeats,
          {'allgather': args.allgather_max, 'ring': args.ring_max})
    else:
      sizes = [c for c in (1, 2, 4, 8) if c <= jax.device_count()]
      results['long_context'] = long_context(65536, args.window, sizes)
  else:
    try:
      cfg = config_lib.parse_args(rest)
    except config_lib.ConfigError as e:
      print(f'shardlm: error: {e}', file=sys.stderr)
      sys.exit(2)
    if args.generate:
      results.update(config=cfg.name, generate=bench_generate(
          cfg, args.new_tokens, args.prompt_len, [int(b) for b in args.batches.split(',')]))
    else:
      peak, source = perf.device_peak()
      r = bench_step(cfg, args.repeats, args.profile)
      if jax.devices()[0].platform == 'cpu':
        # Measured before and after the step: on a shared machine one low reading (another
        # job on the cores) would otherwise inflate the MFU.
        peaks = {'xla_f32_matmul': max(peak, perf.measure_matmul_peak())}
        if args.compare_torch:
          peaks['torch_f32_matmul'] = torch_matmul_peak()
        source = max(peaks, key=peaks.get)
        peak = peaks[source]
        results['matmul_peaks'] = peaks
      r['mfu'] = r['flops_per_s'] / peak
      results.update(config=cfg.name, peak=peak, peak_source=source, step=r)
      print(f"{cfg.name}: {r['params']:,} params, step {r['step_s'] * 1e3:.1f} ms, "
            f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops_per_device'] * 1e3:.1f} GFLOP/s/device, "
            f"MFU {100 * r['mfu']:.1f}% of {peak / 1e9:.1f} GFLOP/s ({source})")
      if r['pipeline']['stages'] > 1:
        p = r['pipeline']
        print(f"pipeline: P={p['stages']} R={p['repeats']} M={p['microbatches']}, bubble "
              f"{100 * p['bubble']:.1f}%")
      if args.profile:
        print_profile(r['profile'])
      if args.compare_torch:
        t = bench_torch(cfg, args.repeats, args.torch_attention)
        results['torch_step_s'] = t
        results['jax_over_torch_speed'] = t / r['step_s']
        print(f'PyTorch GPT2LMHeadModel ({args.torch_attention} attention) step {t * 1e3:.1f} ms; shardlm is '
              f'{t / r["step_s"]:.2f}x the speed of PyTorch')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
