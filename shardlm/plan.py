"""`python -m shardlm.plan`: what a config costs per device on a given accelerator, before anyone
rents it.

  python -m shardlm.plan --config gpt_8b.py --devices 64 --device h100 --config.mesh.model=8
  python -m shardlm.plan --config gpt_345m --devices 8 --device a100-80 --json

The real train step is built for the target mesh on simulated CPU devices (a subprocess with as
many host devices as the plan needs) and compiled ahead of time, allocating nothing. From it:
parameter, gradient and optimizer bytes per device (exact, from the sharded abstract state), the
compiled temporaries (XLA:CPU's buffer assignment: an accelerator's compiler fuses differently),
every collective of the step with its mesh axes and bytes (optimized HLO, loops counted by their
trip counts), model FLOPs (Megatron's formula), and a roofline step time over the device table.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

from shardlm import config as config_lib, errors
from shardlm.errors import ConfigError

GiB = 2**30
MAX_DEVICES = 65536
# XLA:CPU builds no program over more than 2048 devices ("Multiprocess computations aren't
# implemented on the CPU backend"). A larger plan compiles fewer data-parallel copies (`fold`).
SIMULATED = 2048


@dataclasses.dataclass(frozen=True)
class Device:
  memory: float   # bytes of accelerator memory
  peak: float     # dense bf16 FLOP/s (V100: fp16 tensor cores)
  hbm: float      # memory bandwidth, bytes/s
  intra: float    # bytes/s one device sends within a host (NVLink, TPU ICI), one direction
  inter: float    # bytes/s one device sends across hosts (InfiniBand, data-centre network)
  per_host: int   # devices per host


# Sources: NVIDIA's H100, H200, A100 and V100 datasheets (SXM parts; NVLink per GPU is the
# datasheet's bidirectional figure halved; memory as nvidia-smi reports it for H100 and H200);
# one 400 Gb/s (H100/H200), 200 Gb/s (A100) or 100 Gb/s (V100: Megatron-LM 2019's DGX-2H has 8
# per 16 GPUs) InfiniBand adapter per GPU; Google Cloud's TPU v4, v5e, v5p and v6e system
# architecture pages (HBM, bf16 peak, ICI bandwidth per chip, halved per direction); the
# data-centre network per TPU chip is an estimate (100-200 Gb/s per host).
DEVICES = {
    'h100': Device(81559 * 2**20, 989e12, 3.35e12, 450e9, 50e9, 8),
    'h200': Device(143771 * 2**20, 989e12, 4.8e12, 450e9, 50e9, 8),
    'a100-80': Device(80 * GiB, 312e12, 2.039e12, 300e9, 25e9, 8),
    'a100-40': Device(40 * GiB, 312e12, 1.555e12, 300e9, 25e9, 8),
    'v100-32': Device(32 * GiB, 125e12, 900e9, 150e9, 6.25e9, 16),
    'tpu-v4': Device(32 * GiB, 275e12, 1.2e12, 150e9, 6.25e9, 4),
    'tpu-v5e': Device(16 * GiB, 197e12, 819e9, 100e9, 6.25e9, 8),
    'tpu-v5p': Device(95 * GiB, 459e12, 2.765e12, 300e9, 6.25e9, 4),
    'tpu-v6e': Device(32 * GiB, 918e12, 1.64e12, 224e9, 6.25e9, 8),
}


def parse(argv):
  """(config, device name, device count, json?, how many layouts a sweep compiles or None) from the
  command line; ConfigError if bad."""
  p = errors.ArgumentParser(prog='python -m shardlm.plan', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--devices', type=int, required=True, help='how many accelerators')
  p.add_argument('--device', default='h100', help=f"one of {', '.join(DEVICES)}")
  p.add_argument('--json', action='store_true', help='JSON (a list with --sweep) instead of a table')
  p.add_argument('--sweep', action='store_true',
                 help='every layout of the devices (model, stage, fsdp sizes; sequence parallelism; '
                      'the least recomputation that fits; pipeline micro-batches), ranked')
  p.add_argument('--top', type=int, default=24,
                 help='with --sweep: compile the best TOP layouts by formula (0: every one that '
                      'may fit); default 24')
  args, rest = p.parse_known_args(argv)
  if args.device not in DEVICES:
    raise ConfigError(f"--device={args.device} is not a device the planner knows; one of "
                      f"{', '.join(DEVICES)}")
  if args.top < 0:
    raise ConfigError(f'--top={args.top}: how many layouts to compile, 0 (all) or more')
  if args.devices <= 0:
    raise ConfigError(f'--devices={args.devices} must be positive')
  if args.devices > MAX_DEVICES:
    raise ConfigError(f'--devices={args.devices}: the planner plans at most {MAX_DEVICES} devices')
  cfg = config_lib.parse_args(rest)
  fold(cfg, args.devices)  # the mesh must divide the devices, and fit the simulation
  if args.sweep and args.devices > SIMULATED:
    raise ConfigError(f'--sweep simulates every layout of the {args.devices} devices, at most '
                      f'{SIMULATED}; plan a layout of them without --sweep')
  return cfg, args.device, args.devices, args.json, args.top if args.sweep else None


def fold(cfg, n: int) -> int:
  """How many data-parallel copies of the step to compile for n devices: all of them (the data
  axis's size) up to SIMULATED devices; beyond, the most that fit, at least 2 so that the data
  axis's collectives are in the program. Every copy runs the same program on its own rows, so
  per-device memory, FLOPs and buffers are the same; only the data groups' sizes grow, which
  `make_plan` puts back."""
  from shardlm import sharding
  data = sharding.mesh_shape(cfg, n)['data']
  if n <= SIMULATED:
    return data
  split = [name for name, to in sharding.rules_from_config(cfg)
           if name != 'batch' and 'data' in sharding.axes_of(to)]
  if split:  # then a copy's state is not what one device of the whole holds
    raise ConfigError(f"{n} devices: past {SIMULATED} the planner compiles part of the data axis, "
                      f"which needs only 'batch' on it; the rules also put {', '.join(split)} there")
  inner = n // data
  fits = [k for k in range(min(data, 2), data + 1) if data % k == 0 and inner * k <= SIMULATED]
  if not fits:
    raise ConfigError(f'{n} devices with {inner} per data-parallel copy: the planner compiles at '
                      f'most {SIMULATED} devices, at least 2 copies when there are several; fewer '
                      'model, stage, fsdp or context ways per copy would fit')
  return max(fits)


def main(argv=None):
  errors.run_cli(_main, argv)


def _main(argv):
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg, device, n, as_json, sweep = parse(argv)  # bad input fails here, before any process starts
  from shardlm import sharding
  data, copies = sharding.mesh_shape(cfg, n)['data'], fold(cfg, n)
  simulated = n // data * copies
  if os.environ.get('SHARDLM_PLAN_DEVICES') != str(n):
    # The plan needs n devices: a fresh process whose XLA makes that many on the CPU.
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env = {**os.environ, 'SHARDLM_PLAN_DEVICES': str(n), 'JAX_PLATFORMS': 'cpu',
           'JAX_NUM_CPU_DEVICES': str(simulated),
           'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={simulated}'])}
    rc = subprocess.run([sys.executable, '-m', 'shardlm.plan', *argv], env=env).returncode
    if rc < 0:
      raise ConfigError(f'the planning process for {n} devices was killed by signal {-rc} '
                        '(out of memory?)')
    sys.exit(rc)
  import jax
  if jax.device_count() != simulated:
    raise ConfigError(f'the planning process has {jax.device_count()} devices, not {simulated}: '
                      'unset JAX_NUM_CPU_DEVICES and JAX_PLATFORMS')
  if sweep is not None:
    plans = sweep_layouts(cfg, device, top=sweep, log=None if as_json else print)
    print(json.dumps(plans) if as_json else ranking(plans))
    return
  if copies < data:  # compile `copies` of the data axis's copies, on as many of their rows
    config_lib.override(cfg, 'mesh.data', str(copies))
    config_lib.override(cfg, 'data.batch_size', str(cfg.data.batch_size // data * copies))
  plan = make_plan(cfg, device, scale=data // copies)
  print(json.dumps(plan) if as_json else table(plan))


def layouts(cfg, n: int, dev: Device) -> list[dict]:
  """Every layout of n devices the config allows, as config overrides: model (dividing the heads,
  within a host), stage (dividing the layers) and fsdp sizes, data the rest (dividing the batch),
  context as the config has it; with model > 1 also sequence parallelism; with a pipeline, the
  micro-batch counts P, 2P and 4P that divide the batch."""
  m, B = cfg.model, cfg.data.batch_size
  context = max(cfg.mesh.context, 1)
  divisors = lambda k: [d for d in range(1, k + 1) if k % d == 0]
  out = []
  for model in divisors(n // context):
    if m.num_heads % model or model > dev.per_host:
      continue
    for stage in divisors(n // context // model):
      if m.num_layers % stage:
        continue
      for fsdp in divisors(n // context // model // stage):
        data = n // (context * model * stage * fsdp)
        batch = B // cfg.optimizer.grad_accum_steps
        if batch % (data * fsdp):
          continue
        mesh = {'mesh.data': data, 'mesh.stage': stage, 'mesh.fsdp': fsdp, 'mesh.context': context,
                'mesh.model': model}
        for preset in ('megatron_fsdp', 'megatron_sp') if model > 1 else ('megatron_fsdp',):
          for micro in ([stage * k for k in (1, 2, 4) if batch % (data * fsdp * stage * k) == 0]
                        if stage > 1 else [0]):
            out.append({**mesh, 'sharding.preset': preset, 'model.pipeline_microbatches': micro})
  return out


def sweep_layouts(cfg, device: str, top: int = 24, log=None) -> list[dict]:
  """Plans of the layouts (`layouts`) most likely to be fastest, ranked by predicted step time
  (those that fit first). For each layout the least recomputation (none, selective, full), then the
  fewest gradient-accumulation steps, whose formula total fits the device is chosen, or failing
  that, one that fits with 25% to spare for the formula's error; layouts where nothing does are
  pruned. The rest are ranked, the formula's fits first, by `analytic_step_time`, and the best
  `top` (0: all) are compiled and planned."""
  import jax

  from shardlm import train
  dev, n = DEVICES[device], jax.device_count()
  candidates, pruned = [], 0

  def with_(base, overrides):
    c = copy.deepcopy(base)
    for key, value in overrides.items():
      config_lib.override(c, key, str(value))
    return c

  for overrides in layouts(cfg, n, dev):
    likely = maybe = None  # the formula's total fits the device / fits with 25% to spare
    for remat in ('none', 'selective', 'full'):
      c = with_(cfg, {**overrides, 'model.remat': remat})
      try:
        s = train.setup(c)
      except ConfigError:
        break  # the layout is not allowed (a check the enumeration does not repeat)
      params, optimizer = state_bytes(s, jax.eval_shape(s.init))
      rows = c.data.batch_size // (c.mesh.data * c.mesh.fsdp * max(s.rt.model_config.microbatches, 1))
      for accum in (k for k in range(1, rows + 1) if rows % k == 0):
        a = with_(c, {'optimizer.grad_accum_steps': accum})  # the formula needs no new trainer
        total = params + optimizer + analytic_activations(a, s)
        if total <= 1.25 * dev.memory and maybe is None:
          maybe = (True, analytic_step_time(a, s, dev, params), a)
        if total <= dev.memory:
          likely = (False, analytic_step_time(a, s, dev, params), a)
          break
      if likely is not None:
        break
    if likely or maybe:
      candidates.append(likely or maybe)
    else:
      pruned += 1
  # The formula's likely fits first, each group by its step time.
  candidates.sort(key=lambda c: c[:2])
  best = candidates[:top] if top else candidates
  plans = []
  for _, estimate, c in best:
    p = make_plan(c, device)
    p['analytic_step_time_s'] = estimate
    plans.append(p)
    if log:
      log(f"  compiled {_layout(p)}: {'fits' if p['fits'] else 'does not fit'}, "
          f"{p['step_time_s'] * 1e3:.0f} ms (by formula {estimate * 1e3:.0f} ms)")
  if log:
    log(f'{len(plans)} layouts compiled; {len(candidates) - len(best)} more that may fit, slower '
        f'by formula, not compiled (--top 0 compiles them); {pruned} pruned: no policy fits')
  return sorted(plans, key=lambda p: (not p['fits'], p['step_time_s']))


def analytic_step_time(cfg, trainer, dev: Device, params: int) -> float:
  """A layout's roofline step time by formula, to rank layouts before compiling them: the compute
  as `make_plan` has it, plus, each over its link, the tensor-parallel all-reduces (Megatron: two
  per layer forward, two backward, two more when recomputed; sequence parallelism moves the same
  bytes), the data-parallel gradient all-reduce, FSDP's gathers (forward and backward) and
  reduce-scatter per accumulation step, the pipeline's sends per iteration and its output's
  all-reduce, and context parallelism's all-gather of keys and values (backward: reduce-scatter)."""
  import numpy as np
  m, mc, shape = cfg.model, trainer.rt.model_config, dict(trainer.rt.mesh.shape)
  n, e = math.prod(shape.values()), np.dtype(m.dtype).itemsize
  B, T, h, L = cfg.data.batch_size, m.seq_len, m.hidden, m.num_layers
  A, P = cfg.optimizer.grad_accum_steps, mc.stages
  M = mc.microbatches if P > 1 else 1
  d, f, c, t = shape['data'], shape['fsdp'], shape['context'], shape['model']
  names = list(shape)

  def link(axis):  # the bandwidth of a group along `axis`: devices in mesh order, per_host to a host
    inner = math.prod(shape[a] for a in names[names.index(axis):])
    return dev.inter if inner > dev.per_host else dev.intra

  rows = B / (d * f) / A / M  # one micro-batch's rows on one device
  act = rows * (T / c) * h * e  # one layer's input on one device
  applications = A * M * L / P
  _, compute = _compute_time(cfg, mc, dev, n)
  comm = 0.
  if t > 1:
    comm += applications * (6 if m.remat == 'full' else 4) * act * 2 * (t - 1) / t / link('model')
  if d > 1:
    comm += params * 2 * (d - 1) / d / link('data')
  if f > 1:
    comm += A * 3 * params * (f - 1) / link('fsdp')
  if P > 1:
    iterations = A * (mc.repeats * M + P - 1)
    comm += iterations * 2 * act / link('stage')
    comm += A * 2 * M * act * 2 * (P - 1) / P / link('stage')
  if c > 1:
    comm += applications * 2 * act * 2 / t * (c - 1) / link('context')
  return compute + comm


def _compute_time(cfg, mc, dev: Device, n: int) -> tuple[float, float]:
  """(Model FLOPs per step, seconds of compute per step on n devices): Megatron's formula, plus
  the recomputation's share (all of the forward pass, a third of the FLOPs, under `full`; the
  attention core, Megatron's T/6D term, under `selective`), at the device's peak, stretched by the
  pipeline's bubble (it idles every stage alike). BERT's layers and head (logits at every
  position) cost what GPT's do: the formula does not depend on the mask."""
  from shardlm import perf
  m, B, T = cfg.model, cfg.data.batch_size, cfg.model.seq_len
  flops = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, mc.padded_vocab)
  work = (mc.repeats * mc.microbatches + mc.stages - 1) / (mc.repeats * mc.microbatches)
  attention = (T / (6 * m.hidden)) / (flops / (72 * B * T * m.num_layers * m.hidden**2))
  recompute = {'none': 0., 'selective': attention / 3, 'full': 1 / 3}[m.remat]
  return flops, flops * (1 + recompute) / n / dev.peak * work


def _layout(p: dict) -> str:
  mesh = ' '.join(f'{k}={v}' for k, v in p['mesh'].items() if v > 1) or 'one device'
  micro = f" M={p['microbatches']}" if p.get('microbatches') else ''
  accum = f" accum={p['accumulation']}" if p.get('accumulation', 1) > 1 else ''
  return f"{mesh} {p['preset']} remat={p['remat']}{accum}{micro}"


def ranking(plans: list) -> str:
  """The sweep as a ranked table."""
  lines = [f"{'rank':>4}  {'layout':<62} {'memory':>10}  {'fits':<4} {'step':>10} {'MFU':>6}"]
  for k, p in enumerate(plans, 1):
    lines.append(f"{k:>4}  {_layout(p):<62} {p['bytes_per_device']['total'] / GiB:7.1f} GiB  "
                 f"{'yes' if p['fits'] else 'no':<4} {p['step_time_s'] * 1e3:7.0f} ms "
                 f"{100 * p['mfu']:5.1f}%")
  return '\n'.join(lines)


def make_plan(cfg, device: str, scale: int = 1) -> dict:
  """The plan of `cfg` on every visible device, as the accelerator `device` would run it; with
  `scale` > 1 the mesh compiled is one of `scale` equal parts of the data axis (`fold`), and the
  plan is of the whole: `scale` times the devices and the batch, data groups `scale` times larger."""
  import jax

  from shardlm import hlo, train
  dev = DEVICES[device]
  s = train.setup(cfg)
  mesh, B, T = s.rt.mesh, cfg.data.batch_size, cfg.model.seq_len
  state = jax.eval_shape(s.init)
  example = s.rt.kind.example(B, T)
  try:
    compiled = s.step.lower(state, example).compile()
  except jax.errors.JaxRuntimeError as e:  # the layout passed the checks but XLA cannot build it
    raise ConfigError(f'the step does not compile on mesh {dict(mesh.shape)}: '
                      f"{(str(e).splitlines() or ['no message'])[0]}") from None
  mem = compiled.memory_analysis()
  params, optimizer = state_bytes(s, state)
  grads = params  # one gradient per parameter, in its dtype and sharding
  batch = sum(jax.tree.leaves(jax.tree.map(
      lambda x, sh: math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize, example,
      s.rt.batch_sharding)))
  temps = mem.temp_size_in_bytes
  analytic = analytic_activations(cfg, s)
  # XLA:CPU computes bfloat16 and float16 in float32: its temporaries then overstate a GPU's or
  # TPU's, by at most 2x; the verdict takes the formula's or half the compiled, the larger.
  half = cfg.model.dtype != 'float32'
  verdict = max(analytic, temps // 2) if half else temps
  takes = 'compiled' if not half else 'formula' if analytic >= temps // 2 else 'compiled / 2'
  total = params + optimizer + batch + verdict  # the gradients live among the temporaries
  m = cfg.model
  B *= scale
  colls = collectives(hlo.parse(compiled.as_text()), mesh, dev, scale)
  n = mesh.devices.size * scale
  mc = s.rt.model_config
  whole = copy.deepcopy(cfg)  # the batch of all the data copies
  config_lib.override(whole, 'data.batch_size', str(B))
  flops, compute = _compute_time(whole, mc, dev, n)
  comm = sum(c['seconds'] for c in colls)
  step = compute + comm  # no overlap assumed: an upper bound on the roofline
  shape = dict(mesh.shape)
  return {
      'config': cfg.name, 'device': device, 'devices': n,
      'mesh': {**shape, 'data': shape['data'] * scale}, 'compiled_mesh': shape,
      'preset': cfg.sharding.preset, 'remat': m.remat,
      'accumulation': cfg.optimizer.grad_accum_steps,
      'microbatches': mc.microbatches if mc.stages > 1 else 0,
      'bytes_per_device': {'params': params, 'grads': grads, 'optimizer': optimizer,
                           'batch': batch, 'activations_compiled': temps,
                           'activations_analytic': analytic,
                           'arguments_compiled': mem.argument_size_in_bytes, 'total': total},
      'total_takes': takes,
      'device_memory_bytes': dev.memory, 'fits': total <= dev.memory,
      'margin_bytes': dev.memory - total,
      'model_flops_per_step': flops, 'collectives': colls,
      'compute_s': compute, 'communication_s': comm, 'step_time_s': step,
      'tokens_per_s': B * T / step, 'mfu': flops / (step * n * dev.peak),
  }


def state_bytes(trainer, state, only=None) -> tuple[int, int]:
  """(parameter bytes, optimizer-state bytes) one device holds: each array of the abstract train
  state at the shape its sharding gives one device (the step counter and loss scale go with the
  optimizer). `only`: a tree of bools over the parameters, which of them to count."""
  import jax
  one = lambda x, sh: math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
  shards = lambda tree, shardings: sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))
  rest = lambda tree: {k: v for k, v in tree.items() if k != 'params'}
  if only is not None:  # tree.map checks that the three trees have one structure
    params = sum(jax.tree.leaves(jax.tree.map(
        lambda x, sh, keep: one(x, sh) if keep else 0, state['params'],
        trainer.state_shardings['params'], only)))
    return params, 0
  return (shards(state['params'], trainer.state_shardings['params']),
          shards(rest(state), rest(trainer.state_shardings)))


# What one layer keeps for its backward pass, per remat policy, as Korthikanti et al. (2022) count
# it, for shardlm's layer: (multiples of b s h in the residual region, split by sequence
# parallelism; multiples of b s h split over the heads' tensor-parallel group; bytes per attention
# score element). Counted from JAX's saved residuals of one block (jax.ad_checkpoint's
# saved_residuals): `none` keeps the LayerNorm inputs and outputs (8), the projections' and
# GELU's F-wide arrays and the heads (28), and the float32 scores, probabilities and exponentials
# with a boolean mask (3 x 4 + 1); `selective` keeps only its named checkpoints: qkv (3) and the
# MLP's input (4), split over heads, and the attention and MLP outputs (2) in the residual region;
# `full` keeps the layer's input.
KEPT = {'none': (8, 28, 13), 'selective': (2, 7, 0), 'full': (1, 0, 0)}


def analytic_activations(cfg, trainer) -> int:
  """Temporary bytes per device by formula: the layers' kept activations (KEPT) for every layer
  application whose backward is pending (L, or with a pipeline (R M + P - 1) x L/(R P) per stage,
  each of one micro-batch), with the weights cast to the compute dtype when they are kept; the
  layers' gradients; one layer's working set during its backward (everything `none` keeps, two
  float32 score arrays); and the float32 logits, their softmax and gradient."""
  import numpy as np

  from shardlm import sharding
  m, rt = cfg.model, trainer.rt
  mc, shape = rt.model_config, dict(rt.mesh.shape)
  ways = lambda name: sharding.split_ways(shape, rt.rules, name)
  e = np.dtype(m.dtype).itemsize
  P, R, M = mc.stages, mc.repeats, mc.microbatches
  b = cfg.data.batch_size / ways('batch') / cfg.optimizer.grad_accum_steps / (M if P > 1 else 1)
  T, h, a = m.seq_len, m.hidden, m.num_heads
  s = T / ways('length')  # queries per device
  keys = {'dense': T if m.context_attention == 'allgather' else s, 'local': 2 * m.window,
          'alternating': T}[m.attention]  # keys a query block meets at once
  rep, tp = b * (T / ways('act_length')) * h, b * s * h / ways('heads')
  scores = b * a / ways('heads') * s * keys
  layer = lambda r, t, sc: e * (r * rep + t * tp) + sc * scores
  applications = m.num_layers if P == 1 else (R * M + P - 1) * m.num_layers // (R * P)
  params, _ = state_bytes(trainer, {'params': rt.abstract_params}, only=rt.stacked)
  per_layer = params / (m.num_layers / P)  # a layer's weights on one device
  kept_cast = m.dtype != m.param_dtype and m.remat != 'full'
  cast = per_layer * e / np.dtype(m.param_dtype).itemsize if kept_cast else 0
  working = layer(*KEPT['none'][:2], 2 * 4)
  # The embedding and the LM head run outside the pipeline, on all its micro-batches at once.
  logits = 3 * 4 * b * (M if P > 1 else 1) * s * mc.padded_vocab / ways('vocab')
  return int(applications * (layer(*KEPT[m.remat]) + cast) + params + working + logits)


def collectives(module, mesh, dev: Device, scale: int = 1) -> list:
  """The step's collectives grouped by kind and mesh axes: how many run per step (loops counted by
  their trip counts), the bytes of their whole buffers, whether a group crosses hosts (devices in
  mesh order, `dev.per_host` to a host), and their time at that link's bandwidth with ring
  algorithms (an all-reduce sends 2 (n-1)/n of its buffer per device, an all-gather,
  reduce-scatter or all-to-all (n-1)/n, a collective-permute all of it). `scale`: the mesh is
  one of that many parts of the data axis; a group over `data` has `scale` times the devices."""
  import numpy as np
  position = {d.id: np.unravel_index(k, mesh.devices.shape) for k, d in enumerate(mesh.devices.flat)}
  host = {d.id: k // dev.per_host for k, d in enumerate(mesh.devices.flat)}
  rows = {}
  for i in module.collectives():
    kind = i.op.removesuffix('-start')
    groups = module.groups(i)
    if not groups:  # every device as one group ({}), or a form this reader does not know
      known = 'replica_groups={}' in i.line
      groups = [[d.id for d in mesh.devices.flat]]
    else:
      known = True
    groups = [g for g in groups if len(g) > 1]
    if not groups:
      continue  # groups of one device move nothing
    axes = tuple(name for d, name in enumerate(mesh.axis_names)
                 if any(len({position[x][d] for x in g}) > 1 for g in groups)) if known else ('unknown',)
    across = any(len({host[x] for x in g}) > 1 for g in groups)
    n = len(groups[0]) * (scale if 'data' in axes else 1)
    sizes = [math.prod(dims) * _ITEM.get(dtype, 4) for dtype, dims in i.shapes]
    # An async start's tuple is (operand, result): the larger is the buffer; a combined
    # collective's tuple holds several buffers. A reduce-scatter's result is 1/n of its buffer.
    size = max(sizes) if i.op.endswith('-start') else sum(sizes)
    size *= len(groups[0]) if kind == 'reduce-scatter' else 1
    times = module.multiplicity(i.computation)
    row = rows.setdefault((kind, axes), {'kind': kind, 'axes': list(axes), 'count': 0, 'bytes': 0,
                                         'across_hosts': False, 'seconds': 0.0})
    row['count'] += times
    row['bytes'] += times * size
    row['across_hosts'] |= across
    row['seconds'] += times * size * _SHARE[kind](n) / (dev.inter if across else dev.intra)
  return sorted(rows.values(), key=lambda r: -r['seconds'])


_ITEM = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
         'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_SHARE = {'all-reduce': lambda n: 2 * (n - 1) / n, 'all-gather': lambda n: (n - 1) / n,
          'reduce-scatter': lambda n: (n - 1) / n, 'all-to-all': lambda n: (n - 1) / n,
          'collective-permute': lambda n: 1.0}


def table(plan: dict) -> str:
  """The plan as the lines a person reads."""
  b = plan['bytes_per_device']
  gib = lambda x: f'{x / GiB:9.2f} GiB' if x >= GiB / 10 else f'{x / 2**20:9.2f} MiB'
  mesh = ' x '.join(f'{k}={v}' for k, v in plan['mesh'].items())
  verdict = 'fits' if plan['fits'] else 'DOES NOT FIT'
  lines = [f"plan: {plan['config']} on {plan['devices']} x {plan['device']}; mesh {mesh}",
           *([f"  (compiled for data={plan['compiled_mesh']['data']} of the data axis's "
              f"{plan['mesh']['data']} copies, each running the same program; the data groups' "
              "collectives scaled to the whole)"] if plan['compiled_mesh'] != plan['mesh'] else []),
           'per device:',
           f"  parameters          {gib(b['params'])}",
           f"  gradients           {gib(b['grads'])}   (inside the temporaries while the step runs)",
           f"  optimizer state     {gib(b['optimizer'])}",
           f"  batch               {gib(b['batch'])}",
           f"  temporaries         {gib(b['activations_compiled'])}   (compiled for XLA:CPU; "
           f"by formula {gib(b['activations_analytic']).strip()}; the total takes the "
           f"{plan['total_takes']})",
           f"  total               {gib(b['total'])}   of {gib(plan['device_memory_bytes']).strip()}: "
           f"{verdict}, margin {plan['margin_bytes'] / GiB:.2f} GiB",
           f"model FLOPs per step  {plan['model_flops_per_step']:.3e}",
           'collectives per step (kind, mesh axes, count, bytes, link, time):']
  for c in plan['collectives']:
    link = 'across hosts' if c['across_hosts'] else 'within a host'
    lines.append(f"  {c['kind']:<18} {','.join(c['axes']) or '-':<22} {c['count']:>6} "
                 f"{gib(c['bytes'])}  {link:<13} {c['seconds'] * 1e3:9.2f} ms")
  lines += [f"step time (roofline)  {plan['step_time_s'] * 1e3:.1f} ms = compute "
            f"{plan['compute_s'] * 1e3:.1f} ms + communication {plan['communication_s'] * 1e3:.1f} ms "
            '(none overlapped)',
            f"predicted             {plan['tokens_per_s']:,.0f} tokens/s, MFU {100 * plan['mfu']:.1f}%"]
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
