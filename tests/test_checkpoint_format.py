"""The checkpoint format alone: importing it changes no process-wide state; the padding rule."""
import logging
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardlm.checkpoint import format as ckpt_format

# -- no process-wide state at import ------------------------------------------------------------

def test_importing_changes_neither_the_unraisable_hook_nor_the_absl_level():
  code = ('import logging, sys\n'
          "before = (sys.unraisablehook, logging.getLogger('absl').level)\n"
          'import shardlm.checkpoint\n'
          "after = (sys.unraisablehook, logging.getLogger('absl').level)\n"
          'print(before == after, before, after)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('True'), proc.stdout


def _unraisable(exc, obj=None):
  return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                               err_msg=None, object=obj)


def test_quiet_drops_only_orbax_echoes_and_puts_everything_back(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  absl = logging.getLogger('absl')
  level = absl.level
  absl.setLevel(logging.INFO)
  try:
    with ckpt_format.quiet():
      assert absl.level == logging.ERROR
      with ckpt_format.quiet():  # nested: the outer one puts things back
        sys.unraisablehook(_unraisable(RuntimeError('Event loop is closed')))
      assert absl.level == logging.ERROR and sys.unraisablehook != seen.append
      other = _unraisable(ValueError('not an echo'))
      sys.unraisablehook(other)
    assert seen == [other]
    assert sys.unraisablehook == seen.append and absl.level == logging.INFO
  finally:
    absl.setLevel(level)


# -- the padding rule ---------------------------------------------------------------------------

WAS, NOW = 256, 384  # padded vocabulary of the checkpoint, and of the model reading it


@pytest.fixture(scope='module')
def tree():
  """A params-like tree on a 1-device mesh: the embedding has the padded vocabulary."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('model',))
  abstract = {'wte': jax.ShapeDtypeStruct((NOW, 8), jnp.float32),
              'h': {'kernel': jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)},
              'rng': jax.ShapeDtypeStruct((), jax.random.key(0).dtype)}
  shardings = {'wte': jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('model', None)),
               'h': {'kernel': jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())},
               'rng': jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
  return abstract, shardings


class Mismatch(Exception):
  pass


def _args(tree, **stored_shapes):
  abstract, shardings = tree
  shapes = {'wte': (NOW, 8), 'h.kernel': (8, 16), 'rng': (2,)}  # a key is stored as its data
  shapes.update({k.replace('__', '.'): v for k, v in stored_shapes.items()})
  stored = {k: types.SimpleNamespace(shape=v) for k, v in shapes.items() if v is not None}
  return ckpt_format.restore_args(abstract, shardings, stored, WAS, NOW,
                                  lambda *why: Mismatch(why))


def test_same_shapes_are_read_strictly(tree):
  args = _args(tree)
  flat = ckpt_format.flat_names(args)
  assert set(flat) == {'wte', 'h.kernel', 'rng'}
  assert all(a.strict for a in flat.values())
  assert args['h']['kernel'].dtype == jnp.bfloat16
  assert args['wte'].sharding == tree[1]['wte'] and args['wte'].global_shape == (NOW, 8)


def test_only_the_padded_vocabulary_may_differ_and_then_not_strictly(tree):
  args = _args(tree, wte=(WAS, 8))
  assert not args['wte'].strict and args['wte'].global_shape == (NOW, 8)
  assert args['h']['kernel'].strict


@pytest.mark.parametrize('stored, why', [
    ({'h__kernel': (8, 32)}, ('h.kernel', (8, 32), (8, 16))),      # another model
    ({'wte': (WAS, 16)}, ('wte', (WAS, 16), (NOW, 8))),            # vocabulary and another axis
    ({'wte': (512, 8)}, ('wte', (512, 8), (NOW, 8))),              # not the recorded padding
    ({'h__kernel': (WAS, 16)}, ('h.kernel', (WAS, 16), (8, 16))),  # a vocabulary size elsewhere
    ({'wte': (WAS, 8, 1)}, ('wte', (WAS, 8, 1), (NOW, 8))),        # another rank
    ({'h__kernel': None}, ('h.kernel', None, (8, 16))),            # missing
])
def test_any_other_difference_is_a_mismatch(tree, stored, why):
  with pytest.raises(Mismatch) as e:
    _args(tree, **stored)
  assert e.value.args[0] == why
