"""Checkpoints in one process: restore onto other meshes, damaged checkpoints, retention, tools."""
import dataclasses
import io
import os
import shutil
import sysconfig
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from shardlm import checkpoint, config, train
from shardlm.errors import ConfigError
from shardlm.data.tokenizer import ByteTokenizer

# A failed restore abandons orbax's other reads; their echoes are not the test's subject.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

LAYOUTS = {'data=2,model=4': dict(data=2, fsdp=1, model=4),
           'fsdp=4,model=2': dict(data=1, fsdp=4, model=2)}


def make_cfg(run_dir, **overrides):
  """tiny with a small batch, writing into run_dir; keys as in the config (mesh.data=8)."""
  cfg = config.load('tiny')
  for key, value in {'data.batch_size': 8, 'train.run_dir': run_dir, **overrides}.items():
    config.override(cfg, key, str(value))
  return cfg


def small_cfg(run_dir, **overrides):
  """A one-layer model for tests about files, not numbers."""
  return make_cfg(run_dir, **{'model.num_layers': 1, 'model.hidden': 64, 'model.num_heads': 2,
                              'model.seq_len': 32, **overrides})


def checkpoints(cfg, s):
  return checkpoint.Checkpoints(cfg, Path(cfg.train.run_dir), ByteTokenizer(), s.target())


@pytest.fixture(scope='module')
def text():
  """Real bytes (so the model learns something), independent of the data pipeline."""
  root = Path(sysconfig.get_paths()['stdlib'])
  data = b''.join((root / name).read_bytes() for name in ('os.py', 'ast.py', 'typing.py'))
  return np.frombuffer(data, np.uint8).astype(np.int32)


def batch(s, text, step):
  B, T = s.rt.cfg.data.batch_size, s.rt.cfg.model.seq_len
  rows = [((step * B + j) * 7919) % ((len(text) - 1) // T) for j in range(B)]
  return jax.device_put(np.stack([text[r * T:r * T + T + 1] for r in rows]), s.batch_sharding)


def run(s, state, text, steps):
  losses = []
  for step in steps:
    state, metrics = s.step(state, batch(s, text, step))
    losses.append(float(metrics['loss']))
  return state, np.array(losses)


def host_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# -- restoring onto another mesh ------------------------------------------------------------------

@pytest.fixture(scope='module')
def saved_on_data8(tmp_path_factory, text):
  """3 steps on (data=8), an asynchronous save, then 5 more steps at once (donating the buffers
  the save copied): the checkpoint, a host copy of the state it must hold, and those 5 losses."""
  run_dir = tmp_path_factory.mktemp('data8')
  cfg = make_cfg(run_dir, **{'mesh.data': 8})
  s = train.setup(cfg, jax.devices())
  state, _ = run(s, s.init(), text, range(3))
  snapshot = host_copy(state)
  ckpt = checkpoints(cfg, s)
  path = ckpt.save(3, state)
  state, losses = run(s, state, text, range(3, 8))
  assert ckpt.close() == [3]
  return path, snapshot, losses


@pytest.mark.parametrize('layout', LAYOUTS.values(), ids=LAYOUTS.keys())
def test_restore_onto_another_mesh_continues_the_run(layout, saved_on_data8, text, tmp_path):
  path, snapshot, reference = saved_on_data8
  cfg = make_cfg(tmp_path, **{'train.resume': path}, **{f'mesh.{k}': v for k, v in layout.items()})
  s = train.setup(cfg, jax.devices())
  state, step, source = checkpoints(cfg, s).restore()
  assert (step, source) == (3, path)
  # Every array arrives in this mesh's layout, each device holding only its shard.
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(s.state_shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert leaf.addressable_shards[0].data.shape == sharding.shard_shape(leaf.shape)
  # The vocabulary was padded to 384 rows for model=1; this mesh pads to 512: the extra rows
  # arrive as zeros and the rest exactly as saved (the save was a snapshot, not a live view).
  emb = np.asarray(state['params']['wte']['embedding'])
  assert emb.shape == (512, 128) and not emb[384:].any()
  for key, saved in ((('params',), snapshot['params']), (('opt_state',), snapshot['opt_state'])):
    for a, b in zip(jax.tree.leaves(state[key[0]]), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a)[tuple(slice(n) for n in b.shape)], b)
  _, losses = run(s, state, text, range(3, 8))
  assert losses[-1] < losses[0] * 1.05 and not np.array_equal(losses, losses[:1].repeat(5))
  np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_restore_from_a_wider_padding_drops_only_zero_rows(saved_on_data8, text, tmp_path):
  """(data=2, model=4) pads to 512 rows; one device pads to 384: a round trip back is exact."""
  path, snapshot, _ = saved_on_data8
  cfg4 = make_cfg(tmp_path / 'm4', **{'train.resume': path, 'mesh.data': 2, 'mesh.model': 4})
  s4 = train.setup(cfg4, jax.devices())
  state4, _, _ = checkpoints(cfg4, s4).restore()
  ckpt = checkpoints(cfg4, s4)
  saved4 = ckpt.save(3, state4)
  ckpt.close()
  cfg1 = make_cfg(tmp_path / 'm1', **{'train.resume': saved4})
  s1 = train.setup(cfg1, jax.devices()[:1])
  state1, _, _ = checkpoints(cfg1, s1).restore()
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(snapshot)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_key_in_the_train_state_is_saved_with_it(tmp_path):
  """The step draws no random numbers yet; when it does, its key joins the state and round-trips."""
  cfg = small_cfg(tmp_path)
  base = train.setup(cfg, jax.devices()[:1])
  shardings = {**base.state_shardings, 'rng': base.state_shardings['step']}
  init = jax.jit(lambda: {**base.init(), 'rng': jax.random.key(7)}, out_shardings=shardings)
  s = dataclasses.replace(base, init=init, state_shardings=shardings)
  state = s.init()
  ckpt = checkpoints(cfg, s)
  ckpt.save(0, {**state, 'rng': jax.random.fold_in(state['rng'], 1)})
  ckpt.close()
  config.override(cfg, 'train.resume', str(tmp_path / 'checkpoints' / '0'))
  restored, _, _ = checkpoints(cfg, s).restore()
  assert jax.dtypes.issubdtype(restored['rng'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored['rng']),
                                jax.random.key_data(jax.random.fold_in(jax.random.key(7), 1)))


# -- damaged checkpoints --------------------------------------------------------------------------

def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    'array file deleted': lambda d: os.remove(max(
        (d / 'state' / 'ocdbt.process_0' / 'd').iterdir(), key=lambda f: f.stat().st_size)),
    'array metadata truncated': lambda d: _truncate(d / 'state' / '_METADATA'),
    'array index truncated': lambda d: _truncate(d / 'state' / 'manifest.ocdbt'),
    'checkpoint metadata truncated': lambda d: _truncate(d / 'meta' / 'metadata'),
}


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory, text):
  """A run directory with committed checkpoints at steps 1 and 2."""
  run_dir = tmp_path_factory.mktemp('two')
  cfg = small_cfg(run_dir)
  s = train.setup(cfg, jax.devices()[:1])
  ckpt = checkpoints(cfg, s)
  state = s.init()
  for step in (1, 2):
    state, _ = run(s, state, text, [step - 1])
    ckpt.save(step, state)
  assert ckpt.close() == [1, 2]
  return run_dir


@pytest.mark.parametrize('damage', DAMAGE.values(), ids=DAMAGE.keys())
def test_auto_skips_a_damaged_checkpoint_with_a_warning(damage, two_steps, tmp_path, capsys):
  run_dir = tmp_path / 'run'
  shutil.copytree(two_steps, run_dir)
  damage(run_dir / 'checkpoints' / '2')
  cfg = small_cfg(run_dir)
  s = train.setup(cfg, jax.devices()[:1])
  ckpt = checkpoints(cfg, s)
  state, step, _ = ckpt.restore()
  assert step == 1 and int(state['step']) == 1
  warning = capsys.readouterr().err
  assert 'shardlm: warning: checkpoint' in warning and 'checkpoints/2 is damaged' in warning
  # Moved aside, so that the resumed run can save step 2 again.
  assert checkpoint.committed_steps(run_dir / 'checkpoints') == [1]
  assert (run_dir / 'checkpoints' / '2.corrupt').is_dir()
  ckpt.save(2, state)
  assert ckpt.close() == [1, 2]


@pytest.mark.parametrize('damage', DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_named_is_an_error(damage, two_steps, tmp_path):
  shutil.copytree(two_steps / 'checkpoints' / '2', tmp_path / 'named')
  damage(tmp_path / 'named')
  cfg = small_cfg(tmp_path / 'run', **{'train.resume': tmp_path / 'named'})
  s = train.setup(cfg, jax.devices()[:1])
  with pytest.raises(ConfigError, match=r'checkpoint .*named cannot be restored: '):
    checkpoints(cfg, s).restore()
  assert not (tmp_path / 'run').exists()


def test_a_partial_save_is_never_listed(two_steps, tmp_path):
  """What a killed save leaves: a tmp directory, invisible to restore and removed by the next save."""
  run_dir = tmp_path / 'run'
  shutil.copytree(two_steps, run_dir)
  ckpts = run_dir / 'checkpoints'
  shutil.copytree(ckpts / '2', ckpts / '3.orbax-checkpoint-tmp-1234')
  assert checkpoint.committed_steps(ckpts) == [1, 2]
  cfg = small_cfg(run_dir)
  s = train.setup(cfg, jax.devices()[:1])
  ckpt = checkpoints(cfg, s)
  state, step, _ = ckpt.restore()
  assert step == 2
  ckpt.save(4, state)
  assert ckpt.close() == [1, 2, 4] and not list(ckpts.glob('*tmp*'))


# -- what does not fit ------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    ({'train.resume': 'none'}, r'already holds checkpoints \(steps 1, 2\).*train.resume=none'),
    ({'train.resume': 'CKPT/1'}, r'holds checkpoints after step 1 \(steps 2\)'),
    ({'model.hidden': 128}, r'there and .* here \(it was written with model\.hidden=64\)'),
    ({'train.steps': 1}, r'at step 2, past train.steps=1'),
], ids=['resume=none', 'resume an older step', 'another model', 'past the end'])
def test_a_checkpoint_that_does_not_fit_is_an_error(overrides, message, two_steps):
  overrides = {k: str(v).replace('CKPT', str(two_steps / 'checkpoints')) for k, v in overrides.items()}
  cfg = small_cfg(two_steps, **overrides)
  s = train.setup(cfg, jax.devices()[:1])
  with pytest.raises(ConfigError, match=message):
    checkpoints(cfg, s).restore()


def test_another_tokenizer_is_an_error(two_steps):
  cfg = small_cfg(two_steps)
  s = train.setup(cfg, jax.devices()[:1])
  other = types.SimpleNamespace(name='bpe.json', vocab_size=257, eod_id=256, fingerprint='9f2c')
  with pytest.raises(ConfigError, match=r'trained with tokenizer byte \(byte\).*bpe.json \(9f2c\)'):
    checkpoint.Checkpoints(cfg, two_steps, other, s.target()).restore()


@pytest.mark.parametrize('key, value', [('checkpoint.every', -1), ('checkpoint.keep', 0),
                                        ('checkpoint.keep_every', -5), ('train.resume', '/no/such')])
def test_bad_checkpoint_settings(key, value, tmp_path):
  with pytest.raises(ConfigError, match=key.split('.')[1]):
    train.setup(small_cfg(tmp_path, **{key: value}), jax.devices()[:1])


def test_keep_last_n_and_every_k(tmp_path):
  cfg = small_cfg(tmp_path, **{'checkpoint.keep': 2, 'checkpoint.keep_every': 4})
  s = train.setup(cfg, jax.devices()[:1])
  ckpt = checkpoints(cfg, s)
  state = s.init()
  for step in range(1, 10):
    ckpt.save(step, state)
  assert ckpt.close() == [4, 8, 9]


# -- inspect and export ---------------------------------------------------------------------------

def test_inspect_and_export_params(two_steps, tmp_path):
  out = io.StringIO()
  info = checkpoint.inspect(two_steps, out=out)  # a run directory: its latest checkpoint
  text = out.getvalue()
  assert info['path'] == two_steps / 'checkpoints' / '2'
  assert info['params'] == 76_736  # wte 384 x 64 + wpe 32 x 64 + one block of 49,984 + ln_f
  for line in ('step        2  (train_state)', 'committed here: steps 1, 2',
               'params.wte.embedding', 'float32  (384, 64)', 'opt_state.1.0.mu.wpe', 'on disk'):
    assert line in text

  exported = checkpoint.export_params(two_steps / 'checkpoints' / '2', tmp_path / 'params')
  out = io.StringIO()
  info = checkpoint.inspect(exported, out=out)
  assert '(params)' in out.getvalue() and set(info['arrays']) == {
      k for k in checkpoint.read_arrays(two_steps / 'checkpoints' / '2') if k.startswith('params.')}
  with pytest.raises(ConfigError, match='already exists'):
    checkpoint.export_params(two_steps, tmp_path / 'params')
  # Parameters only: not something to resume training from.
  cfg = small_cfg(tmp_path / 'run', **{'train.resume': exported})
  with pytest.raises(ConfigError, match='holds params, not a train state'):
    checkpoints(cfg, train.setup(cfg, jax.devices()[:1])).restore()


def test_init_from_takes_the_parameters_and_a_fresh_optimizer(two_steps, tmp_path):
  src = two_steps / 'checkpoints' / '2'
  cfg = small_cfg(tmp_path, **{'train.init_from': src})
  s = train.setup(cfg, jax.devices()[:1])
  params, path, _ = checkpoint.restore_params(cfg.train.init_from, s.rt.target(), 'train.init_from')
  state = s.init_with(params)
  stored = checkpoint.read_params_numpy(src)['params']
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(a, b)
  assert path == src and int(state['step']) == 0
  assert all(not np.any(x) for x in jax.tree.leaves(state['opt_state']))  # moments and counts 0
  # Shapes alone would not catch a model of another kind (a pre-LN BERT holds every GPT name).
  bert = train.setup(small_cfg(tmp_path, **{'model.kind': 'bert'}), jax.devices()[:1])
  with pytest.raises(ConfigError, match='holds a gpt model, and this config builds a bert'):
    checkpoint.restore_params(src, bert.rt.target(), 'train.init_from')
