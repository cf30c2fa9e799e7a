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
import dataclasses
import json
import math
import os
import subprocess
import sys

from shardlm import config as config_lib, errors
from shardlm.errors import ConfigError

GiB = 2**30
MAX_DEVICES = 4096  # simulated CPU devices; a 4096-device compile takes minutes


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
  """(config, device name, device count, json?) from the command line; ConfigError if bad."""
  p = errors.ArgumentParser(prog='python -m shardlm.plan', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--devices', type=int, required=True, help='how many accelerators')
  p.add_argument('--device', default='h100', help=f"one of {', '.join(DEVICES)}")
  p.add_argument('--json', action='store_true', help='JSON (a list with --sweep) instead of a table')
  p.add_argument('--sweep', action='store_true',
                 help='every layout of the devices (model, stage, fsdp sizes; sequence parallelism; '
                      'the least recomputation that fits; pipeline micro-batches), ranked')
  args, rest = p.parse_known_args(argv)
  if args.device not in DEVICES:
    raise ConfigError(f"--device={args.device} is not a device the planner knows; one of "
                      f"{', '.join(DEVICES)}")
  if args.devices <= 0:
    raise ConfigError(f'--devices={args.devices} must be positive')
  if args.devices > MAX_DEVICES:
    raise ConfigError(f'--devices={args.devices}: the planner simulates at most {MAX_DEVICES} '
                      'devices on this CPU')
  cfg = config_lib.parse_args(rest)
  from shardlm import sharding
  sharding.mesh_shape(cfg, args.devices)  # the mesh must divide the devices
  return cfg, args.device, args.devices, args.json, args.sweep


def main(argv=None):
  errors.run_cli(_main, argv)


def _main(argv):
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg, device, n, as_json, sweep = parse(argv)  # bad input fails here, before any process starts
  if os.environ.get('SHARDLM_PLAN_DEVICES') != str(n):
    # The plan needs n devices: a fresh process whose XLA makes that many on the CPU.
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env = {**os.environ, 'SHARDLM_PLAN_DEVICES': str(n), 'JAX_PLATFORMS': 'cpu',
           'JAX_NUM_CPU_DEVICES': str(n),
           'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])}
    rc = subprocess.run([sys.executable, '-m', 'shardlm.plan', *argv], env=env).returncode
    if rc < 0:
      raise ConfigError(f'the planning process for {n} devices was killed by signal {-rc} '
                        '(out of memory?)')
    sys.exit(rc)
  import jax
  if jax.device_count() != n:
    raise ConfigError(f'the planning process has {jax.device_count()} devices, not {n}: '
                      'unset JAX_NUM_CPU_DEVICES and JAX_PLATFORMS')
  if sweep:
    plans = sweep_layouts(cfg, device, log=None if as_json else print)
    print(json.dumps(plans) if as_json else ranking(plans))
    return
  plan = make_plan(cfg, device)
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


def sweep_layouts(cfg, device: str, log=None) -> list[dict]:
  """Plans of every layout (`layouts`) that may fit, ranked by predicted step time (those that fit
  first). For each layout the least recomputation (none, selective, full), then the fewest
  gradient-accumulation steps, whose formula total fits the device (with 25% to spare for the
  formula's error) is compiled; layouts where nothing does are pruned without compiling."""
  import copy

  import jax

  from shardlm import train
  dev, n = DEVICES[device], jax.device_count()
  plans, pruned = [], 0

  def with_(base, overrides):
    c = copy.deepcopy(base)
    for key, value in overrides.items():
      config_lib.override(c, key, str(value))
    return c

  for overrides in layouts(cfg, n, dev):
    chosen = None
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
        if params + optimizer + analytic_activations(a, s) <= 1.25 * dev.memory:
          chosen = a
          break
      if chosen is not None:
        break
    if chosen is None:
      pruned += 1
      continue
    p = make_plan(chosen, device)
    plans.append(p)
    if log:
      log(f"  compiled {_layout(p)}: {'fits' if p['fits'] else 'does not fit'}, "
          f"{p['step_time_s'] * 1e3:.0f} ms")
  if log:
    log(f'{len(plans)} layouts compiled, {pruned} pruned by the formula (no policy fits)')
  return sorted(plans, key=lambda p: (not p['fits'], p['step_time_s']))


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


def make_plan(cfg, device: str) -> dict:
  """The plan of `cfg` on every visible device, as the accelerator `device` would run it."""
  import jax
  import jax.numpy as jnp

  from shardlm import hlo, perf, train
  dev = DEVICES[device]
  if cfg.model.kind != 'gpt':
    raise ConfigError(f"model.kind='{cfg.model.kind}': the planner takes GPT configs so far")
  s = train.setup(cfg)
  mesh, B, T = s.rt.mesh, cfg.data.batch_size, cfg.model.seq_len
  state = jax.eval_shape(s.init)
  tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
  try:
    compiled = s.step.lower(state, tokens).compile()
  except jax.errors.JaxRuntimeError as e:  # the layout passed the checks but XLA cannot build it
    raise ConfigError(f'the step does not compile on mesh {dict(mesh.shape)}: '
                      f"{(str(e).splitlines() or ['no message'])[0]}") from None
  mem = compiled.memory_analysis()
  params, optimizer = state_bytes(s, state)
  grads = params  # one gradient per parameter, in its dtype and sharding
  batch = math.prod(s.rt.batch_sharding.shard_shape(tokens.shape)) * tokens.dtype.itemsize
  temps = mem.temp_size_in_bytes
  analytic = analytic_activations(cfg, s)
  # XLA:CPU computes bfloat16 and float16 in float32: its temporaries then overstate a GPU's or
  # TPU's, by at most 2x; the verdict takes the formula's or half the compiled, the larger.
  half = cfg.model.dtype != 'float32'
  verdict = max(analytic, temps // 2) if half else temps
  takes = 'compiled' if not half else 'formula' if analytic >= temps // 2 else 'compiled / 2'
  total = params + optimizer + batch + verdict  # the gradients live among the temporaries
  m = cfg.model
  flops = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, s.rt.model_config.padded_vocab)
  colls = collectives(hlo.parse(compiled.as_text()), mesh, dev)
  n = mesh.devices.size
  mc = s.rt.model_config
  work = (mc.repeats * mc.microbatches + mc.stages - 1) / (mc.repeats * mc.microbatches)
  # Recomputation repeats part of the forward pass (a third of the model FLOPs): all of it under
  # `full`, the attention core (Megatron's T/6D term) under `selective`.
  attention = (T / (6 * m.hidden)) / (flops / (72 * B * T * m.num_layers * m.hidden**2))
  recompute = {'none': 0., 'selective': attention / 3, 'full': 1 / 3}[m.remat]
  compute = flops * (1 + recompute) / n / dev.peak * work  # the bubble idles every stage alike
  comm = sum(c['seconds'] for c in colls)
  step = compute + comm  # no overlap assumed: an upper bound on the roofline
  return {
      'config': cfg.name, 'device': device, 'devices': n, 'mesh': dict(mesh.shape),
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


def collectives(module, mesh, dev: Device) -> list:
  """The step's collectives grouped by kind and mesh axes: how many run per step (loops counted by
  their trip counts), the bytes of their whole buffers, whether a group crosses hosts (devices in
  mesh order, `dev.per_host` to a host), and their time at that link's bandwidth with ring
  algorithms (an all-reduce sends 2 (n-1)/n of its buffer per device, an all-gather,
  reduce-scatter or all-to-all (n-1)/n, a collective-permute all of it)."""
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
    n = len(groups[0])
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
