"""Plain vs pipelined layouts of one config, in one run: compile time, per-device memory, step time.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/bench_pipeline.py \
      --layouts "data=4;stage=2,data=2;stage=4" --config.model.num_layers=8
  python scripts/bench_pipeline.py --config gpt_345m --layouts "data=8;stage=8" --aot   # no run

Each layout is `axis=size,...` over the config's mesh (the others 1); `--microbatches` and
`--repeats` set M and R for the pipelined ones. Times are medians after a warm-up; the ratios
are against the first layout, measured in the same process. `--aot` compiles only (memory and
compile time, no allocation): what a mock topology (JAX's `jax_mock_gpu_topology`) allows.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import median_time  # noqa: E402

from shardlm import config as config_lib, train  # noqa: E402
from shardlm.model import pipeline  # noqa: E402


def layout_cfg(base, layout: str, microbatches: int, repeats: int):
  cfg = base.copy_and_resolve_references()
  cfg.mesh.update({axis: 1 for axis in cfg.mesh.keys()})
  for part in layout.split(','):
    axis, size = part.split('=')
    config_lib.override(cfg, f'mesh.{axis.strip()}', size.strip())
  if cfg.mesh.get('stage', 1) > 1:
    cfg.model.update(pipeline_microbatches=microbatches, pipeline_repeats=repeats)
  return cfg


def bench(cfg, repeats: int, aot: bool) -> dict:
  s = train.setup(cfg)
  m, B, T = s.rt.model_config, cfg.data.batch_size, cfg.model.seq_len
  abstract = jax.eval_shape(s.init)
  tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=s.batch_sharding)
  t0 = time.perf_counter()
  compiled = s.step.lower(abstract, tokens).compile()
  mem = compiled.memory_analysis()
  out = {'mesh': dict(s.rt.mesh.shape), 'compile_s': time.perf_counter() - t0,
         'argument_bytes': mem.argument_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
         'bubble': pipeline.bubble(m.stages, m.repeats, m.microbatches) if m.stages > 1 else 0.0,
         'stages': m.stages, 'repeats': m.repeats, 'microbatches': m.microbatches}
  if not aot:
    holder = [s.init()]
    batch = jax.device_put(np.random.default_rng(0).integers(0, m.vocab_size, (B, T + 1), np.int32),
                           s.batch_sharding)

    def run():
      holder[0], metrics = compiled(holder[0], batch)
      jax.block_until_ready(metrics)
    out['step_s'] = median_time(run, repeats)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--layouts', default='data=4;stage=2,data=2;stage=4',
                      help='layouts separated by ";", each axis=size,...; the first is the baseline')
  parser.add_argument('--microbatches', type=int, default=0, help='M (0: as many as stages)')
  parser.add_argument('--repeats', type=int, default=1, help='R')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per layout')
  parser.add_argument('--aot', action='store_true', help='compile only: memory and compile time')
  parser.add_argument('--out', help='write the results as JSON here')
  args, rest = parser.parse_known_args()
  try:
    base = config_lib.parse_args(rest)
    cfgs = [layout_cfg(base, layout, args.microbatches, args.repeats)
            for layout in args.layouts.split(';')]
  except config_lib.ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)
  results = {'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
             'config': base.name, 'layouts': []}
  for layout, cfg in zip(args.layouts.split(';'), cfgs):
    r = {'layout': layout, **bench(cfg, args.steps, args.aot)}
    results['layouts'].append(r)
    first = results['layouts'][0]
    line = (f"{layout:<22} compile {r['compile_s']:6.1f}s  args {r['argument_bytes'] / 2**20:8.1f} MiB"
            f"  temp {r['temp_bytes'] / 2**20:8.1f} MiB  bubble {100 * r['bubble']:4.1f}%")
    if 'step_s' in r:
      line += f"  step {r['step_s'] * 1e3:8.1f} ms ({r['step_s'] / first['step_s']:.2f}x)"
    print(line, flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
