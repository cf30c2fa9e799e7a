"""Train-state checkpoints of a run: restore at start-up (skipping damaged ones), save on schedule,
retention; and parameters read into a model's shardings (restore_params)."""
import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from shardlm.checkpoint.format import (FORMAT, Target, Unreadable, _flat, _list, _quietly, _registry,
                                       layer_order_meta, reorder_layers,
                                       committed_steps, find, quiet, read_arrays, read_meta,
                                       restore_args)
from shardlm import distributed, errors
from shardlm.errors import ConfigError

TRASH = '.trash'  # a name orbax never reads as a step


def restore_params(directory, target: Target, expect=None) -> tuple[dict, Path, dict]:
  """Parameters from a train-state or params-only checkpoint, read straight into `target`.

  Any mesh may have written it; the vocabulary padding is adapted (format.restore_args). For
  evaluation, generation and train.init_from. A checkpoint of a related kind (`target.relatives`:
  the base model of a task head, or another head on it) gives every parameter but the target's
  `heads`, which the caller draws fresh.

  Args:
    directory: a checkpoint, a directory of them (the latest) or a run directory.
    target: the parameters' tree (the pure dict of parameters, as the model's init makes it).
    expect: the config key that named the checkpoint, for the error messages.

  Returns:
    (parameters, checkpoint path, metadata).
  """
  path = find(directory)
  what = f'checkpoint {path}' + (f' ({expect})' if expect else '')
  try:
    meta, stored = read_meta(path), read_arrays(path)
  except Unreadable as e:
    raise ConfigError(f'{what} cannot be read: {e}') from None
  model = meta['config']['model']
  theirs, ours = model.get('kind', 'gpt'), target.kind
  if theirs != ours and theirs not in target.relatives:
    # a pre-LN BERT holds every GPT parameter: shapes alone would not tell
    raise ConfigError(f'{what} holds a {theirs} model, and this config builds a {ours} '
                      f"(model.kind='{ours}')")
  if theirs != ours and target.heads:
    target = dataclasses.replace(target, **{
        k: {n: v for n, v in getattr(target, k).items() if n not in target.heads}
        for k in ('abstract', 'shardings')})
  stored = {k[len('params.'):]: v for k, v in stored.items() if k.startswith('params.')}

  def mismatch(name, have, want):
    if have is None:
      return ConfigError(f'{what} does not fit this config: it lacks parameter {name} '
                         f"(it holds a {model.get('kind', 'gpt')} model of "
                         f"{model['num_layers']} layers x {model['hidden']})")
    return ConfigError(f'{what} does not fit this config: {name} is {have} there and {want} here')
  args = {'params': restore_args(target.abstract, target.shardings, stored,
                                 meta['model']['padded_vocab'], target.padded_vocab, mismatch)}

  def read():
    return ocp.PyTreeCheckpointHandler().restore(path / 'state', args=ocp.args.PyTreeRestore(
        item={'params': target.abstract}, restore_args=args, partial_restore=True))['params']
  params = _quietly(read, lambda failure: ConfigError(f'{what} cannot be read: {failure}'))
  params = reorder_layers(params, target, meta)
  return params, path, meta


class Checkpoints:
  """Restores the train state at start-up and saves it every `checkpoint.every` steps."""

  def __init__(self, cfg, run_dir: Path, tokenizer, target: Target):
    """`target`: the whole train state ({'step', 'params', 'opt_state', maybe 'loss_scale'})."""
    self.cfg, self.target = cfg, target
    self.dir = Path(cfg.checkpoint.dir or Path(run_dir) / 'checkpoints').resolve()
    self.tokenizer = {'name': tokenizer.name, 'vocab_size': tokenizer.vocab_size,
                      'eod_id': getattr(tokenizer, 'eod_id', None),
                      'fingerprint': getattr(tokenizer, 'fingerprint', tokenizer.name)}
    self._manager = None  # created by the first save: a failed restore writes nothing
    # Orbax's saves report from background threads after save() returns: quiet from the first
    # save to close().
    self._quiet = contextlib.ExitStack()
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
    with quiet():
      if resume != 'auto':
        return self._restore_named(find(resume))
      return self._restore_latest()

  def _restore_named(self, path: Path):
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

  def _restore_latest(self):
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
      _sync(f'skipped_{step}', self.cfg.dist.init_timeout)
      steps = [t for t in steps if t < step]
    return None, 0, None

  def _restore(self, path: Path):
    meta = read_meta(path)
    stored = read_arrays(path)
    self._check_fits(meta, path)
    args = self._restore_args(stored, meta, path)
    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))

    def read():
      return reader.restore(path, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=self.target.abstract, restore_args=args))).state
    try:
      state = _quietly(read, Unreadable)
    finally:
      reader.close()
    state = reorder_layers(state, self.target, meta)
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

  def _restore_args(self, stored: dict, meta: dict, path: Path):
    """The whole train state, read as format.restore_args says: the same arrays, the same shapes
    but for the vocabulary padding."""
    wanted = _flat(self.target.abstract)
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
      raise self._mismatch(meta, path, f'its state lacks {missing[:3]} and has {extra[:3]}'
                           if missing and extra else f'its state lacks {missing[:3]}' if missing
                           else f'its state has arrays this config does not: {extra[:3]}')
    return restore_args(
        self.target.abstract, self.target.shardings, stored, meta['model']['padded_vocab'],
        self.target.padded_vocab,
        lambda name, have, want: self._mismatch(meta, path, f'{name} is {have} there and {want} here'))

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
      self._quiet.enter_context(quiet())
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
    return {
        'format': FORMAT, 'kind': 'train_state', 'step': step,
        'config': json.loads(self.cfg.to_json()),
        'tokenizer': self.tokenizer,
        # The batch of step s is a pure function of (data.seed, s): the step is the position.
        'data': {'step': step, 'seed': self.cfg.data.seed},
        # No randomness in the step yet; a key added to the train state is saved with it.
        'rng': {'seed': self.cfg.train.seed, 'impl': str(jax.config.jax_default_prng_impl)},
        'model': {'vocab_size': self.cfg.model.vocab_size, 'padded_vocab': self.target.padded_vocab},
        'mesh': dict(self.target.mesh_shape), 'processes': jax.process_count(),
        **layer_order_meta(self.target),
    }

  def close(self) -> list[int]:
    """Waits for the last save to commit; returns the committed steps."""
    try:
      if self._manager is not None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._manager = None  # closing twice (preemption, then the run's end) is harmless
        self._empty_trash()
      for thread in self._deleting:
        thread.join()
    finally:
      self._quiet.close()
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


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    errors.warn(message)


# -- every process the same ---------------------------------------------------------------------

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


def _sync(name: str, timeout_s: float) -> None:
  """A barrier through the coordination service (never a device collective, which cannot time
  out); its error names the processes that did not arrive."""
  distributed.barrier(f'checkpoint_{name}', timeout_s)
