"""The on-disk format: orbax-checkpoint on tensorstore (zarr3 + OCDBT), and how it reads back.

A checkpoint is a directory CHECKPOINT_DIR/<step> with two items: `state/`, the train state
with every array stored whole (whatever mesh wrote it), and `meta/metadata`, JSON with the step,
the resolved config, the tokenizer's identity, the RNG seed and the data position. Orbax writes
it as `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every process has written
its own shards and process 0 the metadata: the rename is the commit, so a directory named by a
bare step number is complete, and a killed save leaves only a tmp directory (removed on restart).
A params-only checkpoint (export-params, shardlm.convert) is the same with `params` alone.
"""
import contextlib
import dataclasses
import gc
import json
import logging
import sys
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # pinned: orbax < 0.13

from shardlm.errors import ConfigError

FORMAT = 1


class Unreadable(Exception):
  """A checkpoint that is damaged or partial: a file missing, metadata cut short."""


@dataclasses.dataclass(frozen=True)
class Target:
  """What a restore reads into: abstract arrays (jax.ShapeDtypeStruct tree), their shardings, and the
  model's padded vocabulary (the one axis allowed to differ from the stored shape)."""
  abstract: object
  shardings: object
  padded_vocab: int
  kind: str          # model kind ('gpt', 'bert'): a checkpoint of another kind is refused
  mesh_shape: dict   # axis name -> size, recorded in the metadata
  # A circular pipeline keeps its layer stacks (the `stacked` leaves, dotted names) stage-major:
  # (P, R) = (stages, repeats), model/pipeline.py; None is the natural layer order.
  stage_major: tuple | None = None
  stacked: frozenset = frozenset()
  # ...but for these, of the same base model (a task head's kind and its base), whose checkpoints
  # lack (or add) the `heads`: the top-level parameters only this kind has.
  relatives: tuple = ()
  heads: tuple = ()


def layer_order_meta(target: Target) -> dict:
  """What the metadata records of the order a checkpoint's layer stacks are written in."""
  if target.stage_major is None:
    return {}
  P, R = target.stage_major
  return {'stage_major': {'stages': P, 'repeats': R, 'arrays': sorted(target.stacked)}}


def _to_natural(a, stage_major):
  """A stack [L, ...] stored stage-major ([P, R, K] flattened) in layer order ([R, P, K])."""
  if stage_major is None:
    return a
  P, R = stage_major
  return a.reshape(P, R, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def _from_natural(a, stage_major):
  if stage_major is None:
    return a
  P, R = stage_major
  return a.reshape(R, P, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def _stored_order(meta: dict):
  m = meta.get('stage_major')
  return None if m is None else (m['stages'], m['repeats'])


def reorder_layers(tree, target: Target, meta: dict):
  """The restored `tree` with every stacked leaf put from the order the checkpoint recorded into
  the target's: the stack is stored whole ([L, ...]) in the writer's order, so that saving costs
  no copy; restoring costs one per stacked leaf when the orders differ (a reshape and transpose:
  an all-to-all between stages, never a gather of the whole stack)."""
  stored, wanted = _stored_order(meta), target.stage_major
  if stored == wanted:
    return tree

  def move(path, leaf):
    if _name(path) not in target.stacked:
      return leaf
    convert = lambda a: _from_natural(_to_natural(a, stored), wanted)
    return jax.jit(convert, out_shardings=leaf.sharding, donate_argnums=0)(leaf)
  return jax.tree_util.tree_map_with_path(move, tree)


def in_layer_order(params: dict, meta: dict) -> dict:
  """Host (numpy) parameters as `read_params_numpy` gives them ({'params': ...}), every layer
  stack in layer order whatever order the checkpoint stored it in."""
  order = _stored_order(meta)
  if order is None:
    return params
  stacked = set(meta['stage_major']['arrays'])
  return jax.tree_util.tree_map_with_path(
      lambda path, a: _to_natural(a, order) if _name(path) in stacked else a, params)


# -- quiet orbax --------------------------------------------------------------------------------

class _Quiet:
  """Held by count, so that overlapping holders (a manager's lifetime, a restore within it) put
  the previous hook and absl level back only when the last one lets go."""

  def __init__(self):
    self._lock, self._holders = threading.Lock(), 0
    self._hook, self._level = None, None

  def hold(self) -> None:
    with self._lock:
      if self._holders == 0:
        absl = logging.getLogger('absl')
        self._hook, self._level = sys.unraisablehook, absl.level
        sys.unraisablehook = self._quiet_abandoned_reads
        # Orbax reports through absl at INFO/WARNING on every save; shardlm prints its own lines.
        absl.setLevel(logging.ERROR)
      self._holders += 1

  def release(self) -> None:
    with self._lock:
      self._holders -= 1
      if self._holders == 0:
        # What someone else set meanwhile stays.
        if sys.unraisablehook == self._quiet_abandoned_reads:
          sys.unraisablehook = self._hook
        absl = logging.getLogger('absl')
        if absl.level == logging.ERROR:
          absl.setLevel(self._level)

  def _quiet_abandoned_reads(self, unraisable):
    # When one read of a restore fails, orbax closes its event loop and drops its other read
    # coroutines while tensorstore still completes them: each then reports 'Event loop is closed'
    # or its own cancellation as an unraisable exception. The failure itself is reported once, as
    # an error or a warning; these echoes would bury it under pages of tracebacks.
    code = getattr(unraisable.object, 'cr_code', None)
    echo = (code is not None and 'orbax' in code.co_filename) or (
        isinstance(unraisable.exc_value, RuntimeError)
        and 'Event loop is closed' in str(unraisable.exc_value))
    if not echo:
      (self._hook or sys.__unraisablehook__)(unraisable)


_QUIET = _Quiet()


@contextlib.contextmanager
def quiet():
  """Orbax's absl reports below ERROR and the echoes of a failed restore's abandoned reads are
  dropped while inside; the previous hook and level come back on leaving (process-wide state, so
  set only around orbax's calls, never at import)."""
  _QUIET.hold()
  try:
    yield
  finally:
    _QUIET.release()


def _quietly(call, error):
  """call() inside quiet(); where orbax fails, error(brief message) is raised instead, once the
  reads it abandoned are finalized while the quiet hook is still in place."""
  with quiet():
    try:
      return call()
    except Exception as e:  # orbax and tensorstore raise many kinds
      failure = _brief(e)
    _finalize_abandoned_reads()
  raise error(failure)


def _finalize_abandoned_reads(timeout_s: float = 2.0) -> None:
  # Each abandoned read stays referenced until tensorstore completes it (milliseconds on a local
  # disk), then waits in a reference cycle for the garbage collector: left alone, its echo would
  # come with some later collection, after quiet() has put the previous hook back.
  end = time.monotonic() + timeout_s
  while True:
    gc.collect()
    if time.monotonic() > end or not any(
        type(o) is types.CoroutineType and 'orbax' in o.cr_code.co_filename
        for o in gc.get_objects()):
      return
    time.sleep(0.01)


# -- reading and writing ------------------------------------------------------------------------

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


def flat_names(tree) -> dict:
  """Dotted leaf name -> leaf, the names `inspect` prints ('params.h.blocks.attn.qkv.kernel')."""
  return _flat(tree)


def _stored_shape(leaf) -> tuple:
  """PRNG keys are stored as their key data: one more axis (2 words for threefry)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(leaf.shape)


def _brief(e: Exception) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:240]}{"..." if len(text) > 240 else ""}'


def _list(steps) -> str:
  steps = list(steps)
  return ', '.join(map(str, steps)) if len(steps) <= 6 else f'{steps[0]} ... {steps[-1]}'


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
  tree = _quietly(lambda: ocp.PyTreeCheckpointHandler().metadata(Path(path) / 'state').tree,
                  lambda failure: Unreadable(f'array metadata: {failure}'))
  return _flat(tree)


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


def restore_args(abstract, shardings, stored: dict, was_padded: int, now_padded: int, mismatch):
  """Per leaf of `abstract`: read into its sharding and its current (vocabulary-padded) shape.

  Arrays are stored as the writing mesh padded them: the vocabulary to a multiple of
  128 x the number of vocabulary shards (mesh.model under the Megatron presets). Onto a mesh
  with another split, tensorstore pads the extra rows with zeros or drops the surplus ones,
  shard by shard (strict=False). That is exact: padding
  rows are zero and never trained (no token id reaches them and their logits are masked, so
  their gradients, Adam moments and weight decay stay zero). Storing the padded shape keeps
  saving a plain copy of the live arrays; slicing to the true vocabulary first would copy the
  embedding and leave uneven shards. Only an axis that is the padded vocabulary on both sides
  may differ; any other mismatch means another model.

  Args:
    abstract: the tree to read into, of jax.ShapeDtypeStruct.
    shardings: its shardings, a tree of the same structure.
    stored: dotted leaf name (as `flat_names(abstract)` names it) -> what the checkpoint holds
      there (orbax's array metadata; anything with a `.shape`).
    was_padded: the padded vocabulary the checkpoint was written with.
    now_padded: the padded vocabulary of `abstract`.
    mismatch: (name, stored shape or None where the checkpoint lacks the leaf, wanted shape) ->
      the exception to raise for a leaf that does not fit.

  Returns:
    A tree of ocp.ArrayRestoreArgs like `abstract`.
  """
  def args(path, leaf, sharding):
    name, want = _name(path), _stored_shape(leaf)
    if name not in stored:
      raise mismatch(name, None, want)
    have = tuple(stored[name].shape)
    if not (len(have) == len(want) and
            all(a == b or (a, b) == (was_padded, now_padded) for a, b in zip(have, want))):
      raise mismatch(name, have, want)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                strict=have == want)
  return jax.tree_util.tree_map_with_path(args, abstract, shardings)


def read_params_numpy(path: Path) -> dict:
  """{'params': tree of numpy arrays} of a train or params-only checkpoint, through host memory,
  every layer stack in layer order; the optimizer state, two thirds of a checkpoint under Adam,
  is not read."""
  handler, state = ocp.PyTreeCheckpointHandler(), Path(path) / 'state'

  def error(failure):
    return ConfigError(f'checkpoint {path} cannot be read: {failure}')
  tree = _quietly(lambda: handler.metadata(state).tree, error)
  if 'params' not in tree:
    raise ConfigError(f'checkpoint {path} holds no parameters')
  item = {'params': tree['params']}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  params = _quietly(lambda: handler.restore(state, args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True)), error)
  return in_layer_order(params, read_meta(Path(path)))


def save_params(out, params, meta: dict) -> Path:
  """Writes `params` (arrays, on devices or in host memory) as a params-only checkpoint at OUT.

  Orbax writes OUT as a tmp directory and renames it when complete: atomic, like a save. `meta`
  needs config, tokenizer and model (vocab_size, padded_vocab) as a train checkpoint has them.
  """
  out = Path(out).resolve()
  if out.exists():
    raise ConfigError(f'{out} already exists; choose a new directory for the parameters')
  out.parent.mkdir(parents=True, exist_ok=True)
  with quiet():
    writer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))
    try:
      writer.save(out, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave({'params': params}),
          meta=ocp.args.JsonSave({'format': FORMAT, 'step': 0, **meta, 'kind': 'params'})))
    finally:
      writer.close()
  return out
