"""Asynchronous, atomic, layout-free checkpoints: orbax-checkpoint on tensorstore (zarr3 + OCDBT).

`python -m shardlm.checkpoint inspect DIR` and `... export-params DIR OUT`.

A checkpoint is a directory CHECKPOINT_DIR/<step> with two items: `state/`, the train state
with every array stored whole (whatever mesh wrote it), and `meta/metadata`, JSON with the step,
the resolved config, the tokenizer's identity, the RNG seed and the data position. Orbax writes
it as `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every process has written
its own shards and process 0 the metadata: the rename is the commit, so a directory named by a
bare step number is complete, and a killed save leaves only a tmp directory (removed on restart).
"""
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # pinned: orbax < 0.13

from shardlm.config import ArgumentParser, ConfigError

FORMAT = 1
TRASH = '.trash'  # a name orbax never reads as a step
# Orbax reports through absl at INFO/WARNING on every save; shardlm prints its own lines.
logging.getLogger('absl').setLevel(logging.ERROR)


class Unreadable(Exception):
  """A checkpoint that is damaged or partial: a file missing, metadata cut short."""


def _quiet_abandoned_reads(unraisable):
  # When one read of a restore fails, orbax closes its event loop and drops its other read
  # coroutines while tensorstore still completes them: each then reports 'Event loop is closed'
  # or its own cancellation as an unraisable exception. The failure itself is reported once, as
  # an error or a warning; these echoes would bury it under pages of tracebacks.
  code = getattr(unraisable.object, 'cr_code', None)
  echo = (code is not None and 'orbax' in code.co_filename) or (
      isinstance(unraisable.exc_value, RuntimeError)
      and 'Event loop is closed' in str(unraisable.exc_value))
  if not echo:
    _default_unraisablehook(unraisable)


_default_unraisablehook = sys.unraisablehook
sys.unraisablehook = _quiet_abandoned_reads


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """`state`: a pytree in zarr3 over OCDBT; `meta`: JSON."""
  # Replica-parallel writing splits replicated arrays among the processes holding a copy; in
  # one process it only costs device slices (and seconds of compiling them on the first save).
  arrays = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=jax.process_count() > 1,
          array_metadata_store=array_metadata_store.Store())),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  state = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False,
                                      type_handler_registry=arrays)
  meta = ocp.JsonCheckpointHandler()
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for name, handler, save, restore in (('state', state, ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
                                       ('meta', meta, ocp.args.JsonSave, ocp.args.JsonRestore)):
    registry.add(name, save, handler)
    registry.add(name, restore, handler)
  return registry


def committed_steps(directory) -> list[int]:
  """Steps with a committed checkpoint under `directory`, ascending."""
  return sorted(ocp.utils.checkpoint_steps(directory)) if Path(directory).is_dir() else []


def _name(path) -> str:
  """A leaf's dotted name, as orbax names it: params.h.mlp.fc.kernel, opt_state.1.0.mu..."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def _flat(tree) -> dict:
  return {_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _stored_shape(leaf) -> tuple:
  """PRNG keys are stored as their key data: one more axis (2 words for threefry)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(leaf.shape)


def _brief(e: Exception) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:240]}{"..." if len(text) > 240 else ""}'


def _on_process_0(value: int) -> int:
  """Process 0's value everywhere, so that every process restores the same step."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _everywhere(ok: bool) -> bool:
  """True only if `ok` holds on every process: a shard unreadable anywhere fails them all."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'shardlm_checkpoint_{name}')


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f'shardlm: warning: {message}', file=sys.stderr, flush=True)


def read_meta(path: Path) -> dict:
  """The JSON metadata of a checkpoint; Unreadable if it is missing or cut short."""
  try:
    meta = json.loads((Path(path) / 'meta' / 'metadata').read_text())
  except (OSError, ValueError) as e:
    raise Unreadable(f'metadata: {_brief(e)}') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT or 'step' not in meta:
    raise Unreadable(f'metadata is not a shardlm checkpoint of format {FORMAT}')
  return meta


def read_arrays(path: Path) -> dict:
  """Dotted leaf name -> orbax ArrayMetadata (shape, dtype), from the metadata alone."""
  try:
    return _flat(ocp.PyTreeCheckpointHandler().metadata(Path(path) / 'state').tree)
  except Exception as e:  # orbax and tensorstore raise many kinds
    raise Unreadable(f'array metadata: {_brief(e)}') from None


def find(path) -> Path:
  """A checkpoint step directory from a path to one, to a directory of them (its latest), or to
  a run directory holding `checkpoints/`."""
  path = Path(path).resolve()  # orbax wants absolute paths
  for candidate in (path, path / 'checkpoints'):
    if (candidate / 'meta').is_dir() or (candidate / 'state').is_dir():
      return candidate
    steps = committed_steps(candidate)
    if steps:
      return candidate / str(steps[-1])
  raise ConfigError(f'{path} holds no committed checkpoint (expected DIR/<step>/state and '
                    'DIR/<step>/meta, as written by python -m shardlm.train)')


def restore_params(directory, s, expect=None) -> tuple[dict, Path, dict]:
  """(parameters, checkpoint path, metadata) from a train-state or params-only checkpoint, read
  straight into the shardings of setup `s` (any mesh wrote it; the vocabulary padding is adapted
  as in Checkpoints._restore_args). For evaluation, generation and train.init_from.
  `expect`: the config key that named the checkpoint, for the error messages."""
  path = find(directory)
  what = f'checkpoint {path}' + (f' ({expect})' if expect else '')
  try:
    meta, stored = read_meta(path), read_arrays(path)
  except Unreadable as e:
    raise ConfigError(f'{what} cannot be read: {e}') from None
  theirs, ours = meta['config']['model'].get('kind', 'gpt'), s.cfg.model.kind
  if theirs != ours:  # a pre-LN BERT holds every GPT parameter: shapes alone would not tell
    raise ConfigError(f'{what} holds a {theirs} model, and this config builds a {ours} '
                      f"(model.kind='{ours}')")
  stored = {k[len('params.'):]: v for k, v in stored.items() if k.startswith('params.')}
  was, now = meta['model']['padded_vocab'], s.model_config.padded_vocab
  abstract = jax.eval_shape(s.init)['params']

  def args(p, leaf, sharding):
    name = _name(p)
    if name not in stored:
      raise ConfigError(f'{what} does not fit this config: it lacks parameter {name} '
                        f"(it holds a {meta['config']['model'].get('kind', 'gpt')} model of "
                        f"{meta['config']['model']['num_layers']} layers x "
                        f"{meta['config']['model']['hidden']})")
    have, want = tuple(stored[name].shape), tuple(leaf.shape)
    if have != want and not (len(have) == len(want) and
                             all(a == b or (a, b) == (was, now) for a, b in zip(have, want))):
      raise ConfigError(f'{what} does not fit this config: {name} is {have} there and {want} here')
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                strict=have == want)
  restore_args = {'params': jax.tree_util.tree_map_with_path(args, abstract,
                                                             s.state_shardings['params'])}
  try:
    params = ocp.PyTreeCheckpointHandler().restore(path / 'state', args=ocp.args.PyTreeRestore(
        item={'params': abstract}, restore_args=restore_args, partial_restore=True))['params']
  except Exception as e:  # orbax and tensorstore raise many kinds
    raise ConfigError(f'{what} cannot be read: {_brief(e)}') from None
  return params, path, meta


def save_params(out, params, meta: dict) -> Path:
  """Writes `params` (arrays, on devices or in host memory) as a params-only checkpoint at OUT.

  Orbax writes OUT as a tmp directory and renames it when complete: atomic, like a save. `meta`
  needs config, tokenizer and model (vocab_size, padded_vocab) as a train checkpoint has them.
  """
  out = Path(out).resolve()
  if out.exists():
    raise ConfigError(f'{out} already exists; choose a new directory for the parameters')
  out.parent.mkdir(parents=True, exist_ok=True)
  writer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))
  try:
    writer.save(out, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({'params': params}),
        meta=ocp.args.JsonSave({'format': FORMAT, 'step': 0, **meta, 'kind': 'params'})))
  finally:
    writer.close()
  return out


class Checkpoints:
  """Restores the train state at start-up and saves it every `checkpoint.every` steps."""

  def __init__(self, cfg, run_dir: Path, s, tokenizer):
    self.cfg, self.s = cfg, s
    self.dir = Path(cfg.checkpoint.dir or Path(run_dir) / 'checkpoints').resolve()
    self.tokenizer = {'name': tokenizer.name, 'vocab_size': tokenizer.vocab_size,
                      'eod_id': getattr(tokenizer, 'eod_id', None),
                      'fingerprint': getattr(tokenizer, 'fingerprint', tokenizer.name)}
    self._manager = None  # created by the first save: a failed restore writes nothing
    self._doomed, self._deleting, self._seen_threads = set(), [], set()
    self._restored_step = None

  # -- restore --------------------------------------------------------------------------------

  def restore(self):
    """(state, step, path) from `train.resume`, or (None, 0, None) to start from scratch.

    auto: the newest committed checkpoint that reads back whole; damaged ones are skipped with a
    warning and renamed `<step>.corrupt`, so the run can save that step again. A path: that
    checkpoint, and a damaged one is a ConfigError. A checkpoint that does not fit the config
    (another model, optimizer or tokenizer) is a ConfigError either way.
    """
    resume = self.cfg.train.resume
    if resume == 'none':
      steps = committed_steps(self.dir)
      if steps:
        raise ConfigError(f'{self.dir} already holds checkpoints (steps {_list(steps)}) and '
                          'train.resume=none would mix a new run into them; set train.resume=auto '
                          'to continue, or choose another train.run_dir or checkpoint.dir')
      return None, 0, None
    if resume != 'auto':
      path = find(resume)
      try:
        state, step = self._restore(path)
      except Unreadable as e:
        raise ConfigError(f'checkpoint {path} cannot be restored: {e}') from None
      newer = [t for t in committed_steps(self.dir) if t > step]
      if newer:
        raise ConfigError(f'{self.dir} holds checkpoints after step {step} (steps {_list(newer)}); '
                          'resuming from an earlier one would overwrite them: choose another '
                          'train.run_dir or checkpoint.dir')
      return state, step, path
    steps = committed_steps(self.dir)
    while steps:
      step = _on_process_0(steps[-1])
      path = self.dir / str(step)
      try:
        state, _ = self._restore(path)
        error = None
      except Unreadable as e:
        state, error = None, e
      if _everywhere(error is None):
        return state, step, path
      if jax.process_index() == 0:
        aside = _aside(path)
        path.rename(aside)
        _warn(f'checkpoint {path} is damaged ({error or "unreadable on another process"}); '
              f'skipped it and moved it to {aside.name}')
      _sync(f'skipped_{step}')
      steps = [t for t in steps if t < step]
    return None, 0, None

  def _restore(self, path: Path):
    meta = read_meta(path)
    stored = read_arrays(path)
    self._check_fits(meta, path)
    abstract = jax.eval_shape(self.s.init)
    args = self._restore_args(abstract, stored, meta, path)
    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))
    try:
      state = reader.restore(path, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=abstract, restore_args=args))).state
    except Exception as e:  # orbax and tensorstore raise many kinds
      raise Unreadable(_brief(e)) from None
    finally:
      reader.close()
    step = int(np.asarray(state['step'].addressable_data(0)))
    if step != meta['step']:
      raise Unreadable(f"its state is at step {step} but its metadata says {meta['step']}")
    if step > self.cfg.train.steps:
      raise ConfigError(f'checkpoint {path} is at step {step}, past train.steps='
                        f'{self.cfg.train.steps}; raise train.steps to continue it')
    self._restored_step = step
    return state, step

  def _check_fits(self, meta: dict, path: Path) -> None:
    if meta.get('kind') != 'train_state':
      raise ConfigError(f"checkpoint {path} holds {meta.get('kind')}, not a train state to resume "
                        'from (an export-params output carries no optimizer state)')
    if meta['tokenizer']['fingerprint'] != self.tokenizer['fingerprint']:
      raise ConfigError(f"checkpoint {path} was trained with tokenizer {meta['tokenizer']['name']} "
                        f"({meta['tokenizer']['fingerprint']}), this config uses "
                        f"{self.tokenizer['name']} ({self.tokenizer['fingerprint']}); set "
                        'data.tokenizer to match')

  def _restore_args(self, abstract, stored: dict, meta: dict, path: Path):
    """Per leaf: read into the current sharding and the current (vocabulary-padded) shape.

    Arrays are stored as the writing mesh padded them: the vocabulary to a multiple of
    128 x mesh.model. Onto a mesh with another model-axis size, tensorstore pads the extra rows
    with zeros or drops the surplus ones, shard by shard (strict=False). That is exact: padding
    rows are zero and never trained (no token id reaches them and their logits are masked, so
    their gradients, Adam moments and weight decay stay zero). Storing the padded shape keeps
    saving a plain copy of the live arrays; slicing to the true vocabulary first would copy the
    embedding and leave uneven shards. Only an axis that is the padded vocabulary on both sides
    may differ; any other mismatch means another model.
    """
    was, now = meta['model']['padded_vocab'], self.s.model_config.padded_vocab
    wanted = _flat(abstract)
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
      raise self._mismatch(meta, path, f'its state lacks {missing[:3]} and has {extra[:3]}'
                           if missing and extra else f'its state lacks {missing[:3]}' if missing
                           else f'its state has arrays this config does not: {extra[:3]}')

    def args(p, leaf, sharding):
      name, have, want = _name(p), tuple(stored[_name(p)].shape), _stored_shape(leaf)
      pad = len(have) == len(want) and all(a == b or (a, b) == (was, now) for a, b in zip(have, want))
      if have != want and not pad:
        raise self._mismatch(meta, path, f'{name} is {have} there and {want} here')
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                  strict=have == want)
    return jax.tree_util.tree_map_with_path(args, abstract, self.s.state_shardings)

  def _mismatch(self, meta, path, what) -> ConfigError:
    theirs, ours = meta['config']['model'], self.cfg.model.to_dict()
    differ = [f'model.{k}={v!r}' for k, v in theirs.items() if v != ours.get(k)]
    return ConfigError(f'checkpoint {path} does not fit this config: {what}'
                       + (f' (it was written with {", ".join(differ)})' if differ else ''))

  # -- save -----------------------------------------------------------------------------------

  def due(self, step: int) -> bool:
    every = self.cfg.checkpoint.every
    return step == self.cfg.train.steps or bool(every and step % every == 0)

  def save(self, step: int, state) -> Path | None:
    """Starts writing `state`; returns once it is copied off the devices (asynchronous) or
    written (not). Waits first for the previous save to commit."""
    if step == self._restored_step:
      return None  # already on disk: the run resumed at its last step
    if self._manager is not None:
      self._manager.wait_until_finished()  # as orbax's save would; then nothing moves to TRASH
    self._empty_trash()
    if self._manager is None:
      c = self.cfg.checkpoint
      self._manager = ocp.CheckpointManager(
          self.dir, handler_registry=_registry(),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=c.keep, keep_period=c.keep_every or None, create=True,
              cleanup_tmp_directories=True,  # what killed saves left behind
              # Old checkpoints leave by an atomic rename into TRASH, emptied here: deleting them
              # in place, a kill could leave a half-deleted directory under a committed name.
              todelete_subdir=TRASH,
              enable_async_checkpointing=c.asynchronous))
    before = {t.native_id for t in threading.enumerate()}
    # force: shardlm decides when to save (due); orbax would skip steps off its own interval.
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(self._meta(step))))
    _to_background(before, self._seen_threads)
    return self.dir / str(step)

  def _meta(self, step: int) -> dict:
    mc, mesh = self.s.model_config, self.s.mesh
    return {
        'format': FORMAT, 'kind': 'train_state', 'step': step,
        'config': json.loads(self.cfg.to_json()),
        'tokenizer': self.tokenizer,
        # The batch of step s is a pure function of (data.seed, s): the step is the position.
        'data': {'step': step, 'seed': self.cfg.data.seed},
        # No randomness in the step yet; a key added to the train state is saved with it.
        'rng': {'seed': self.cfg.train.seed, 'impl': str(jax.config.jax_default_prng_impl)},
        'model': {'vocab_size': mc.vocab_size, 'padded_vocab': mc.padded_vocab},
        'mesh': dict(mesh.shape), 'processes': jax.process_count(),
    }

  def close(self) -> list[int]:
    """Waits for the last save to commit; returns the committed steps."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._empty_trash()
    for thread in self._deleting:
      thread.join()
    return committed_steps(self.dir)

  def _empty_trash(self) -> None:
    """Deletes what orbax moved to TRASH, and what killed runs left, in the background."""
    if jax.process_index() != 0:
      return
    if (self.dir / TRASH).is_dir():
      (self.dir / TRASH).rename(self.dir / f'{TRASH}-{time.time_ns()}')
    for doomed in self.dir.glob(f'{TRASH}-*'):
      if doomed not in self._doomed:
        self._doomed.add(doomed)
        self._deleting.append(threading.Thread(
            target=shutil.rmtree, args=(doomed,), kwargs={'ignore_errors': True}, daemon=True))
        self._deleting[-1].start()


def _to_background(before: set, seen: set) -> None:
  """Lowest CPU priority (nice 19) for the threads that write checkpoints: orbax's new ones and
  tensorstore's pool workers. Where the host CPU also computes the step (CPU training, data
  loading), a save then yields the cores to the step: it takes longer, the step less. `seen`:
  threads already looked at. Linux only (nice is per thread there); elsewhere a no-op."""
  tasks = Path('/proc/self/task')
  if not tasks.is_dir():
    return
  main = threading.main_thread().native_id
  tids = {t.native_id for t in threading.enumerate()} - before - {main, None}  # None: starting
  for task in tasks.iterdir():
    tid = int(task.name)
    if tid in seen:
      continue
    seen.add(tid)
    try:
      if (task / 'comm').read_text().strip() == 'ts_pool_worker':
        tids.add(tid)
    except OSError:
      pass  # the thread ended
  for tid in tids:
    try:
      os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
      pass


def _aside(path: Path) -> Path:
  """A name orbax does not read as a step, free to use."""
  aside, n = path.with_name(f'{path.name}.corrupt'), 1
  while aside.exists():
    n += 1
    aside = path.with_name(f'{path.name}.corrupt{n}')
  return aside


def _list(steps) -> str:
  steps = list(steps)
  return ', '.join(map(str, steps)) if len(steps) <= 6 else f'{steps[0]} ... {steps[-1]}'


# -- python -m shardlm.checkpoint ---------------------------------------------------------------

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
    print(f'  {k:<{width}}  {str(np.dtype(arrays[k].dtype)):<8} {tuple(arrays[k].shape)}', file=out)
  return {'path': path, 'meta': meta, 'arrays': arrays, 'params': n_params}


def read_params_numpy(path: Path) -> dict:
  """{'params': tree of numpy arrays} of a train or params-only checkpoint, through host memory;
  the optimizer state, two thirds of a checkpoint under Adam, is not read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(Path(path) / 'state').tree
    if 'params' not in tree:
      raise ConfigError(f'checkpoint {path} holds no parameters')
    item = {'params': tree['params']}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return handler.restore(Path(path) / 'state', args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  except ConfigError:
    raise
  except Exception as e:  # orbax and tensorstore raise many kinds
    raise ConfigError(f'checkpoint {path} cannot be read: {_brief(e)}') from None


def flat_names(tree) -> dict:
  """Dotted leaf name -> leaf, the names `inspect` prints ('params.h.blocks.attn.qkv.kernel')."""
  return _flat(tree)


def export_params(directory, out) -> Path:
  """Writes the parameters alone as a checkpoint of the same format, for inference and fine-tuning.

  The parameters pass through host memory once (numpy), so a machine without accelerators can
  export.
  """
  path, out = find(directory), Path(out)
  if out.exists():
    raise ConfigError(f'{out} already exists; export-params writes a new directory')
  meta = read_meta(path)
  return save_params(out, read_params_numpy(path)['params'], meta)


def main(argv=None):
  parser = ArgumentParser(prog='python -m shardlm.checkpoint', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('inspect', help='step, config, parameter count, arrays, size on disk')
  p.add_argument('dir', help='a checkpoint, a directory of them (the latest), or a run directory')
  p = sub.add_parser('export-params', help='the parameters alone, same format')
  p.add_argument('dir', help='a checkpoint, a directory of them (the latest), or a run directory')
  p.add_argument('out', help='a new directory')
  try:
    a = parser.parse_args(argv)
    if a.command == 'inspect':
      inspect(a.dir)
    else:
      out = export_params(a.dir, a.out)
      print(f'exported parameters to {out} ({_mb(_size(out))} on disk)')
  except Unreadable as e:
    print(f'shardlm: error: checkpoint {a.dir} cannot be read: {e}', file=sys.stderr)
    sys.exit(2)
  except ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
