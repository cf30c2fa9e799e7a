"""`python -m shardlm.checkpoint inspect DIR` and `... export-params DIR OUT`."""
import sys
from pathlib import Path

import numpy as np

from shardlm.checkpoint.format import (Unreadable, _list, committed_steps, find, read_arrays,
                                       read_meta, read_params_numpy, save_params)
from shardlm import errors
from shardlm.errors import ArgumentParser, ConfigError

DESCRIPTION = ('Asynchronous, atomic, layout-free checkpoints: orbax-checkpoint on tensorstore '
               '(zarr3 + OCDBT).')


def _size(path: Path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())


def _mb(n: int) -> str:
  return f'{n / 1e6:,.1f} MB' if n >= 1e5 else f'{n / 1e3:,.1f} kB'


def inspect(directory, out=sys.stdout) -> dict:
  """Prints step, config summary, parameter count, every array and the size on disk."""
  path = find(directory)
  meta, arrays = read_meta(path), read_arrays(path)
  c, m = meta['config'], meta['config']['model']
  params = {k: v for k, v in arrays.items() if k.startswith('params.')}
  n_params = sum(int(np.prod(v.shape)) for v in params.values())
  vocab = meta['model']
  mesh = ' x '.join(f'{k}={v}' for k, v in meta['mesh'].items())
  siblings = committed_steps(path.parent)
  print(f'checkpoint  {path}' + (f'  (committed here: steps {_list(siblings)})' if siblings else ''),
        file=out)
  print(f"step        {meta['step']}  ({meta['kind']})", file=out)
  print(f"config      {c.get('name', '?')}: {m['kind']} {m['num_layers']} layers x {m['hidden']} "
        f"hidden x {m['num_heads']} heads, T={m['seq_len']}; batch {c['data']['batch_size']}, "
        f"lr {c['optimizer']['lr']:g} {c['optimizer']['schedule']}, {c['train']['steps']} steps",
        file=out)
  print(f'written on  mesh {mesh}, {meta["processes"]} process(es)', file=out)
  if meta.get('stage_major'):  # a circular pipeline's layer stacks
    m = meta['stage_major']
    print(f"layers      stored stage-major for {m['stages']} stages x {m['repeats']} repeats "
          '(every restore puts them in layer order)', file=out)
  print(f"tokenizer   {meta['tokenizer']['name']} ({meta['tokenizer']['vocab_size']} ids, "
        f"fingerprint {meta['tokenizer']['fingerprint']})", file=out)
  print(f"parameters  {n_params:,} (vocabulary {vocab['vocab_size']} stored padded to "
        f"{vocab['padded_vocab']})", file=out)
  print(f"size        {_mb(_size(path))} on disk (state {_mb(_size(path / 'state'))}; "
        f"{_mb(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in arrays.values()))}"
        ' in memory)', file=out)
  print(f'arrays      {len(arrays)}', file=out)
  width = max(len(k) for k in arrays)
  for k in sorted(arrays, key=lambda k: (not k.startswith('params.'), k)):
    print(f'  {k:<{width}}  {np.dtype(arrays[k].dtype)!s:<8} {tuple(arrays[k].shape)}', file=out)
  return {'path': path, 'meta': meta, 'arrays': arrays, 'params': n_params}


def export_params(directory, out) -> Path:
  """Writes the parameters alone as a checkpoint of the same format, for inference and fine-tuning.

  The parameters pass through host memory once (numpy), so a machine without accelerators can
  export.
  """
  path, out = find(directory), Path(out)
  if out.exists():
    raise ConfigError(f'{out} already exists; export-params writes a new directory')
  meta = {k: v for k, v in read_meta(path).items() if k != 'stage_major'}  # read in layer order
  return save_params(out, read_params_numpy(path)['params'], meta)


def main(argv=None):
  errors.run_cli(_main, argv)


def _main(argv):
  parser = ArgumentParser(prog='python -m shardlm.checkpoint', description=DESCRIPTION)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('inspect', help='step, config, parameter count, arrays, size on disk')
  p.add_argument('dir', help='a checkpoint, a directory of them (the latest), or a run directory')
  p = sub.add_parser('export-params', help='the parameters alone, same format')
  p.add_argument('dir', help='a checkpoint, a directory of them (the latest), or a run directory')
  p.add_argument('out', help='a new directory')
  a = parser.parse_args(argv)
  try:
    if a.command == 'inspect':
      inspect(a.dir)
    else:
      out = export_params(a.dir, a.out)
      print(f'exported parameters to {out} ({_mb(_size(out))} on disk)')
  except Unreadable as e:
    raise ConfigError(f'checkpoint {a.dir} cannot be read: {e}') from None
