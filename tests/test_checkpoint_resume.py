"""Checkpoints across processes: exact resume, SIGKILL at random moments, two processes saving."""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import shardlm
from shardlm import checkpoint, config, train

REPO = str(Path(shardlm.__file__).resolve().parent.parent)  # the code under test, wherever installed


def env(tmp_path, devices=8):
  # A compilation cache shared by the runs of one test: restarts then skip most of the compile.
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
          'PYTHONPATH': os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])}


def train_cmd(run_dir, *args):
  return [sys.executable, '-m', 'shardlm.train', f'--config.train.run_dir={run_dir}', *args]


def records(run_dir) -> list[dict]:
  return [json.loads(line) for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


def losses(run_dir) -> dict:
  """step -> (loss, grad norm, lr), checking that no step was logged twice."""
  rs = [r for r in records(run_dir) if 'loss' in r]
  steps = [r['step'] for r in rs]
  assert len(steps) == len(set(steps)), f'steps logged twice: {sorted(steps)}'
  return {r['step']: (r['loss'], r['grad_norm'], r['lr']) for r in rs}


# -- exact resume ---------------------------------------------------------------------------------

# The tiny model (batch 8, one row per device), logging every step. decay_steps pins the LR
# schedule to 20 steps, so that a run told to stop at 10 follows the same schedule as the 20-step
# run.
TINY = ['--config.optimizer.decay_steps=20', '--config.data.batch_size=8', '--config.log.every=1',
        '--config.train.eval_every=0', '--config.train.eval_batches=1',
        '--config.log.tensorboard=false', '--config.checkpoint.every=10']


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
  """A 20-step run, and a 10-step run that a fresh process then resumes to step 20; both with
  dropout, whose masks must come out the same after the resume."""
  tmp = tmp_path_factory.mktemp('exact')
  e = env(tmp)
  args = [*TINY, '--config.model.dropout=0.1', '--config.model.attention_dropout=0.1']
  full = subprocess.Popen(train_cmd(tmp / 'full', '--config.train.steps=20', *args), env=e,
                          cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = subprocess.run(train_cmd(tmp / 'split', '--config.train.steps=10', *args), env=e, cwd=tmp,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  second = subprocess.run(train_cmd(tmp / 'split', '--config.train.steps=20', *args), env=e, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  out, err = full.communicate(timeout=300)
  assert full.returncode == 0, err[-3000:]
  return tmp, second.stdout


@pytest.mark.slow
def test_resume_gives_bitwise_identical_losses(resumed):
  tmp, stdout = resumed
  assert f'resumed: step 10 from {tmp / "split" / "checkpoints" / "10"}' in stdout
  full, split = losses(tmp / 'full'), losses(tmp / 'split')
  assert sorted(full) == sorted(split) == list(range(1, 21))
  assert full[20][0] < full[1][0] - 1  # it trains: the comparison covers a moving state
  for step in range(1, 21):
    assert split[step] == full[step], f'step {step}: {split[step]} != {full[step]}'
  val = lambda d: [r['val_loss'] for r in records(d) if 'val_loss' in r and r['step'] == 20]
  assert val(tmp / 'split') == val(tmp / 'full')
  assert checkpoint.committed_steps(tmp / 'split' / 'checkpoints') == [10, 20]


@pytest.mark.slow
def test_a_damaged_checkpoint_named_exits_2_and_writes_nothing(resumed, tmp_path):
  tmp, _ = resumed
  damaged = tmp_path / 'damaged'
  shutil.copytree(tmp / 'split' / 'checkpoints' / '20', damaged)
  meta = damaged / 'meta' / 'metadata'
  meta.write_text(meta.read_text()[:100])
  run_dir = tmp_path / 'run'
  proc = subprocess.run(train_cmd(run_dir, f'--config.train.resume={damaged}', *TINY,
                                  '--config.train.steps=30'),
                        env=env(tmp), cwd=tmp_path, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f'shardlm: error: checkpoint {damaged} cannot be restored: metadata')
  assert not run_dir.exists()


# -- SIGKILL at random moments ------------------------------------------------------------------

SMALL = ['--config.model.num_layers=1', '--config.model.hidden=64', '--config.model.num_heads=2',
         '--config.model.seq_len=32', '--config.data.batch_size=8', '--config.train.steps=100',
         '--config.checkpoint.every=2', '--config.checkpoint.keep=2', '--config.log.every=1',
         '--config.train.eval_every=0', '--config.train.eval_batches=1',
         '--config.log.tensorboard=false']
TMP = '*.orbax-checkpoint-tmp*'


def wait_for(condition, proc, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, f'the run ended before {what}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_ten_times_then_finish_like_an_uninterrupted_run(tmp_path):
  e = env(tmp_path, devices=1)
  reference = subprocess.Popen(train_cmd(tmp_path / 'reference', *SMALL), env=e, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  rng = random.Random(20240611)
  run_dir = tmp_path / 'run'
  ckpts = run_dir / 'checkpoints'
  expected_start, killed_mid_save = 0, 0
  for i in range(11):  # 10 kills, then a run left to finish
    out, err = tmp_path / f'out{i}.txt', tmp_path / f'err{i}.txt'
    with out.open('w') as o, err.open('w') as r:
      proc = subprocess.Popen(train_cmd(run_dir, *SMALL), env=e, cwd=tmp_path, stdout=o, stderr=r)
    if i < 10 and i % 2 == 0:
      # During a save: once the save of a step a few checkpoints on is being written.
      target = expected_start + 2 * rng.randint(1, 3)
      started = lambda: [n for n in re.findall(r'^checkpoint: step (\d+) ->', out.read_text(), re.M)
                         if int(n) >= target]
      wait_for(started, proc, f'a save of step >= {target}')
      time.sleep(rng.uniform(0, 0.01))
    elif i < 10:
      # Anywhere: a random time after training started.
      wait_for(lambda: re.search(r'^step +\d+/', out.read_text(), re.M), proc, 'the first step')
      time.sleep(rng.uniform(0, 0.5))
    if i < 10:
      proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == (-signal.SIGKILL if i < 10 else 0), err.read_text()[-3000:]

    # The restart resumed from the newest committed checkpoint, and found every one it read whole.
    stdout, stderr = out.read_text(), err.read_text()
    if expected_start:
      resumed = re.escape(f'resumed: step {expected_start} from {ckpts / str(expected_start)}')
      assert re.search(resumed + r'( \(|\n)', stdout), stdout[-2000:]
    else:
      assert 'resumed:' not in stdout
    assert 'warning' not in stderr, stderr
    killed_mid_save += bool(list(ckpts.glob(TMP)))
    committed = checkpoint.committed_steps(ckpts)
    for step in committed:
      assert checkpoint.read_meta(ckpts / str(step))['step'] == step
    expected_start = committed[-1] if committed else 0

  assert expected_start == 100 and killed_mid_save >= 3, (expected_start, killed_mid_save)
  assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
  assert losses(run_dir) == losses(tmp_path / 'reference')
  assert sorted(losses(run_dir)) == list(range(1, 101))
  final = lambda d: [r['val_loss'] for r in records(d) if 'val_loss' in r and r['step'] == 100]
  assert final(run_dir) == final(tmp_path / 'reference')


# -- two processes ----------------------------------------------------------------------------

# Each process: 4 CPU devices of an 8-device (data=2, fsdp=2, model=2) mesh. Without a checkpoint
# it trains 2 steps and saves; with one it restores. Either way it writes the loss of its state on
# a fixed batch.
WORKER = r'''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
pid, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
import numpy as np
from shardlm import checkpoint, config, train
from shardlm.data.tokenizer import ByteTokenizer
cfg = config.load('tiny')
for k, v in %(OVERRIDES)r.items():
  config.override(cfg, k, v)
config.override(cfg, 'train.run_dir', run_dir)
s = train.setup(cfg)
tokens = np.arange(8 * 33).reshape(8, 33) %% 251
batch = jax.make_array_from_callback(tokens.shape, s.batch_sharding, lambda idx: tokens[idx])
ckpt = checkpoint.Checkpoints(cfg, run_dir, ByteTokenizer(), s.target())
state, start, _ = ckpt.restore()
if state is None:
  state = s.init()
  for _ in range(2):
    state, _ = s.step(state, batch)
  ckpt.save(2, state)
ckpt.close()
loss = float(s.eval_metrics(state['params'], batch)[0])
json.dump({'start': start, 'loss': loss}, open(f'{run_dir}/out{pid}.json', 'w'))
'''
OVERRIDES = {'model.num_layers': '1', 'model.hidden': '64', 'model.num_heads': '2',
             'model.seq_len': '32', 'data.batch_size': '8', 'mesh.data': '2', 'mesh.fsdp': '2',
             'mesh.model': '2'}


def run_two_processes(tmp_path, run_dir) -> list[dict]:
  script = tmp_path / 'worker.py'
  script.write_text(WORKER % dict(OVERRIDES=OVERRIDES))
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(run_dir)],
                            env=env(tmp_path, devices=4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [json.loads((run_dir / f'out{i}.json').read_text()) for i in range(2)]


@pytest.mark.slow
def test_two_processes_save_their_own_shards_and_restore_anywhere(tmp_path):
  run_dir = tmp_path / 'run'
  saved = run_two_processes(tmp_path, run_dir)
  assert [o['start'] for o in saved] == [0, 0] and saved[0]['loss'] == saved[1]['loss']
  step = run_dir / 'checkpoints' / '2'
  assert checkpoint.committed_steps(run_dir / 'checkpoints') == [2]
  # Each process wrote its own shards; the metadata was written once.
  assert {p.name for p in (step / 'state').glob('ocdbt.process_*')} == {
      'ocdbt.process_0', 'ocdbt.process_1'}
  assert checkpoint.read_meta(step)['processes'] == 2

  # Both processes restore what they wrote...
  restored = run_two_processes(tmp_path, run_dir)
  assert [o['start'] for o in restored] == [2, 2]
  assert restored[0]['loss'] == saved[0]['loss']

  # ...and so does one process on another mesh (data=8: vocabulary padded to 384, not 512).
  cfg = config.load('tiny')
  for k, v in {**OVERRIDES, 'mesh.data': '8', 'mesh.fsdp': '1', 'mesh.model': '1',
               'train.resume': str(step), 'train.run_dir': str(tmp_path / 'one')}.items():
    config.override(cfg, k, v)
  s = train.setup(cfg, jax.devices())
  from shardlm.data.tokenizer import ByteTokenizer
  state, start, _ = checkpoint.Checkpoints(cfg, tmp_path / 'one', ByteTokenizer(), s.target()).restore()
  tokens = np.arange(8 * 33).reshape(8, 33) % 251
  loss = float(s.eval_metrics(state['params'], jax.device_put(tokens, s.batch_sharding))[0])
  assert start == 2
  np.testing.assert_allclose(loss, saved[0]['loss'], rtol=1e-6)
