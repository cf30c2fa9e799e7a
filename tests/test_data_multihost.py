"""Two real processes over loopback (gloo): each reads only its rows, and together they hold the
global batch that one process builds alone."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import shardlm
from shardlm import config
from shardlm.data import loader, preprocess, sources, tokenizer

T, B, STEPS = 32, 16, (0, 1, 5, 40)

# Each process: 4 CPU devices of an 8-device (data=2, fsdp=2, model=2) mesh, the batch sharded
# as the train step shards it. It writes the rows it holds, and a sum over the global array that
# needs both processes' rows (a gloo collective), to a JSON file.
WORKER = r'''
import json, sys
import jax
import jax.numpy as jnp
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
pid, port, out, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3], tuple(sys.argv[4:])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from shardlm import config, sharding
from shardlm.data import loader, tokenizer
cfg = config.load('tiny')
cfg.data.update(paths=paths, weights=(0.7, 0.3), split='90,10')
mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'model': 2})
batch_sharding = sharding.named(mesh, sharding.rules_from_config(cfg), ('batch', None))
data = loader.from_config(cfg.data, tokenizer.ByteTokenizer(), %(T)d, %(B)d)
total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
result = {'devices': jax.device_count(), 'local': jax.local_device_count(), 'steps': {}}
for step in %(STEPS)r:
  x = data.train.global_batch(step, batch_sharding)
  rows = {}
  for shard in x.addressable_shards:
    rows[shard.index[0].start or 0] = np.asarray(shard.data).tolist()
  result['steps'][step] = {'rows': rows, 'sum': int(total(x))}
json.dump(result, open(out, 'w'))
''' % dict(T=T, B=B, STEPS=STEPS)  # noqa: UP031  (the worker's own braces stay literal)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_build_the_single_process_batch(tmp_path):
  paths = []
  for name, n in (('a', 300), ('b', 200)):
    (tmp_path / f'{name}.jsonl').write_text(
        ''.join(json.dumps({'text': f'{name}{i} ' * (i % 13 + 1)}) + '\n' for i in range(n)))
    preprocess.preprocess(sources.Corpus([tmp_path / f'{name}.jsonl']), tmp_path / name)
    paths.append(str(tmp_path / name))

  # The reference: one process, the same config, rows read directly.
  cfg = config.load('tiny')
  cfg.data.update(paths=tuple(paths), weights=(0.7, 0.3), split='90,10')
  reference = loader.from_config(cfg.data, tokenizer.ByteTokenizer(), T, B).train

  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  repo = str(Path(shardlm.__file__).resolve().parent.parent)  # the code under test, wherever installed
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([repo] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                             str(tmp_path / f'out{i}.json'), *paths],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  outs = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]
  assert [(o['devices'], o['local']) for o in outs] == [(8, 4), (8, 4)]
  for step in STEPS:
    full = reference.rows(step, 0, B)
    for o in outs:
      got = o['steps'][str(step)]
      assert got['sum'] == int(full.sum())  # the global array is the same on both processes
      for start, rows in got['rows'].items():
        np.testing.assert_array_equal(np.array(rows), full[int(start):int(start) + len(rows)])
    # The batch is split in 4 row blocks over data x fsdp; each process holds two, together all.
    starts = [sorted(int(s) for s in o['steps'][str(step)]['rows']) for o in outs]
    assert set(starts[0]).isdisjoint(starts[1])
    assert sorted(starts[0] + starts[1]) == list(range(0, B, B // 4))
