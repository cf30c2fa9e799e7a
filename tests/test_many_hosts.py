"""Many processes on this machine (gloo over loopback, free ports, every child cleaned up): the same
losses as one process, checkpoints across process counts, a dead process, preemption, evaluation
and generation, the hybrid mesh, and the launchers' dry runs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, str(ROOT / 'scripts' / 'launch_local.py')]
HEARTBEAT = 5  # dist.heartbeat_timeout for these runs, seconds
# A small model on data=2 x fsdp=2 x model=2 (megatron_fsdp), a loss logged every step, a
# schedule pinned to 400 steps so that runs of any length follow it, checkpoints every 2 steps.
TINY = ['--config.model.num_layers=1', '--config.model.hidden=64', '--config.model.seq_len=32',
        '--config.data.batch_size=8', '--config.mesh.data=2', '--config.mesh.fsdp=2',
        '--config.mesh.model=2', '--config.optimizer.decay_steps=400',
        '--config.optimizer.warmup_steps=2', '--config.log.every=1', '--config.train.eval_every=0',
        '--config.train.eval_batches=1', '--config.log.tensorboard=false',
        '--config.checkpoint.every=2', f'--config.dist.heartbeat_timeout={HEARTBEAT}']
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module', autouse=True)
def corpus():
  """The built-in corpus, preprocessed once here rather than by several processes at once."""
  from shardlm.data import preprocess
  preprocess.stdlib_dataset('byte')


def env(devices: int) -> dict:
  e = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  return {**e, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def one_process(args: list[str], timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'shardlm.train', *TINY, *args], env=env(8),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def launch(n: int, args: list[str], log_dir: Path, mode='explicit', module='shardlm.train',
           timeout=150, wait=True):
  cmd = [*LAUNCH, '-n', str(n), '--devices-per-process', str(8 // n), '--mode', mode,
         '--grace', '30', '--timeout', str(timeout - 20), '--log-dir', str(log_dir),
         '--', sys.executable, '-m', module, *(TINY if module == 'shardlm.train' else ()), *args]
  proc = subprocess.Popen(cmd, env=env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, start_new_session=True)
  if not wait:
    return proc
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    _kill(proc)
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher; it kills its children in turn
    proc.wait()


def losses(run_dir: Path) -> dict[int, float]:
  records = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in records if 'loss' in r}


def log(log_dir: Path, i: int, stream='err') -> str:
  return (log_dir / f'process{i}.{stream}').read_text()


def child_pid(launcher_pid: int, process_id: int) -> int:
  """The pid of the launcher's child that runs as process `process_id` (explicit mode)."""
  out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(launcher_pid)], capture_output=True,
                       text=True, timeout=10).stdout
  for pid in map(int, out.split()):
    args = Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
    if f'--config.dist.process_id={process_id}'.encode() in args:
      return pid
  raise LookupError(f'no process {process_id} under {launcher_pid}')


def wait_for_line(path: Path, text: str, proc, timeout=90) -> None:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if path.exists() and text in path.read_text():
      return
    assert proc.poll() is None, 'the run ended early'
    time.sleep(0.1)
  raise TimeoutError(f'{text!r} not in {path}')


def wait_for_step(run_dir: Path, step: int, proc, timeout=120) -> None:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if (run_dir / 'metrics.jsonl').exists() and max(losses(run_dir), default=0) >= step:
      return
    assert proc.poll() is None, 'the run ended early'
    time.sleep(0.2)
  raise TimeoutError(f'step {step} not reached')


STEPS = 40  # of the uninterrupted runs


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """1 process x 8 devices."""
  run_dir = tmp_path_factory.mktemp('ref') / 'run'
  proc = one_process([f'--config.train.run_dir={run_dir}', f'--config.train.steps={STEPS}',
                      '--config.checkpoint.every=0'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return losses(run_dir)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """2 processes x 4 devices started as `srun` would (JAX's SLURM detection), uninterrupted;
  every checkpoint kept. The bitwise reference of the interrupted 2-process runs below."""
  tmp = tmp_path_factory.mktemp('two')
  proc = launch(2, [f'--config.train.run_dir={tmp / "run"}', f'--config.train.steps={STEPS}',
                    '--config.checkpoint.keep=100'], tmp / 'logs', mode='slurm')
  assert proc.returncode == 0, log(tmp / 'logs', 0)[-3000:] + log(tmp / 'logs', 1)[-3000:]
  return tmp


def test_slurm_environment_trains_as_one_process(two_process_run, reference):
  got = losses(two_process_run / 'run')
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)],
                             rtol=1e-6)
  first, mesh = log(two_process_run / 'logs', 0, 'out').splitlines()[:2]
  assert 'process 0 of 2 (SLURM job 1' in first
  # Two SLURM tasks of one node share its host: the mesh is not split across hosts.
  assert '4 local / 8 global cpu devices on 1 host(s)' in first
  assert mesh.startswith('mesh data=2 x stage=1 x fsdp=2 x context=1 x model=2; rules')
  assert log(two_process_run / 'logs', 1, 'out').count('validation loss') == 0  # process 0 logs


def test_four_explicit_processes_train_as_one_process(tmp_path, reference):
  proc = launch(4, [f'--config.train.run_dir={tmp_path / "run"}', '--config.train.steps=4',
                    '--config.checkpoint.every=0'], tmp_path / 'logs')
  assert proc.returncode == 0, log(tmp_path / 'logs', 0)[-3000:]
  got = losses(tmp_path / 'run')
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)],
                             rtol=1e-6)


def test_a_two_process_checkpoint_resumes_on_one_and_on_four(two_process_run, reference, tmp_path):
  step2 = two_process_run / 'run' / 'checkpoints' / '2'
  assert json.loads((step2 / 'meta' / 'metadata').read_text())['processes'] == 2
  for n, name in ((1, 'one'), (4, 'four')):
    args = [f'--config.train.run_dir={tmp_path / name}', f'--config.train.resume={step2}',
            '--config.train.steps=4']
    if n == 1:
      proc = one_process(args)
      assert proc.returncode == 0, proc.stderr[-3000:]
    else:
      proc = launch(n, args, tmp_path / f'{name}_logs')
      assert proc.returncode == 0, log(tmp_path / f'{name}_logs', 0)[-3000:]
    got = losses(tmp_path / name)
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [reference[3], reference[4]], rtol=1e-6)


def resume_matches(tmp_path: Path, step: int, uninterrupted: Path) -> None:
  """The same 2-process command again, to step + 2: it resumes at `step`, and its next two losses
  equal the uninterrupted run's bitwise."""
  again = launch(2, [f'--config.train.run_dir={tmp_path / "run"}', f'--config.train.steps={step + 2}'],
                 tmp_path / 'logs2')
  assert again.returncode == 0, log(tmp_path / 'logs2', 0)[-3000:]
  assert f'resumed: step {step}' in log(tmp_path / 'logs2', 0, 'out')
  got, ref = losses(tmp_path / 'run'), losses(uninterrupted)
  assert [got[s] for s in (step + 1, step + 2)] == [ref[s] for s in (step + 1, step + 2)]


def test_sigterm_saves_at_an_agreed_step_and_resumes_exactly(two_process_run, tmp_path):
  """SIGTERM to process 1 of 2: both agree on a step, save there, exit 75; running again gives
  the uninterrupted run's losses bitwise."""
  run = [f'--config.train.run_dir={tmp_path / "run"}', '--config.train.steps=400']
  proc = launch(2, run, tmp_path / 'logs', wait=False)
  try:
    wait_for_step(tmp_path / 'run', 2, proc)
    os.kill(child_pid(proc.pid, 1), signal.SIGTERM)
    proc.communicate(timeout=60)
  finally:
    _kill(proc)
  assert proc.returncode == 75, log(tmp_path / 'logs', 0)[-2000:] + log(tmp_path / 'logs', 1)[-2000:]
  out = log(tmp_path / 'logs', 0, 'out')
  line = [l for l in out.splitlines() if l.startswith('preempted:')]
  assert len(line) == 1 and 'exiting with status 75' in line[0], out[-2000:]
  step = int(line[0].split('checkpoint at step ')[1].split()[0])
  meta = tmp_path / 'run' / 'checkpoints' / str(step) / 'meta' / 'metadata'
  assert json.loads(meta.read_text())['step'] == step
  assert max(losses(tmp_path / 'run')) == step  # nobody went past the agreed step
  assert step + 3 <= STEPS, step
  # Resumed, and SIGTERM again before its first step (while it restores and compiles): the
  # agreed step is this run's first, step + 1.
  proc = launch(2, run, tmp_path / 'logs_early', wait=False)
  try:
    wait_for_line(tmp_path / 'logs_early' / 'process0.out', 'shardlm: config', proc)
    os.kill(child_pid(proc.pid, 1), signal.SIGTERM)
    proc.communicate(timeout=90)
  finally:
    _kill(proc)
  assert proc.returncode == 75, log(tmp_path / 'logs_early', 0)[-3000:]
  assert f'preempted: SIGTERM; checkpoint at step {step + 1} ' in log(tmp_path / 'logs_early', 0, 'out')
  resume_matches(tmp_path, step + 1, two_process_run / 'run')


def test_a_dead_process_stops_the_others_with_one_line(two_process_run, tmp_path):
  """SIGKILL process 1 of 2: process 0 names it within the heartbeat timeout (+30 s), exits 76,
  and leaves only committed checkpoints; running again resumes with the uninterrupted losses."""
  run = [f'--config.train.run_dir={tmp_path / "run"}', '--config.train.steps=400']
  proc = launch(2, run, tmp_path / 'logs', wait=False)
  try:
    wait_for_step(tmp_path / 'run', 6, proc)
    os.kill(child_pid(proc.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, launcher = proc.communicate(timeout=HEARTBEAT + 60)
    took = time.monotonic() - killed
  finally:
    _kill(proc)
  assert took < HEARTBEAT + 30
  assert 'process 1 of 2 ended: killed by SIGKILL' in launcher, launcher
  assert 'process 0 of 2 ended: status 76' in launcher, launcher + log(tmp_path / 'logs', 0)[-3000:]
  err = [l for l in log(tmp_path / 'logs', 0).splitlines() if l.startswith('shardlm: error:')]
  assert len(err) == 1 and 'process 1 of 2 lost' in err[0], log(tmp_path / 'logs', 0)[-3000:]
  assert 'Traceback' not in log(tmp_path / 'logs', 0)
  ckpts = tmp_path / 'run' / 'checkpoints'
  names = [p.name for p in ckpts.iterdir() if not p.name.startswith('.')]
  steps = sorted(int(n) for n in names if n.isdigit())  # orbax's tmp names are not digits
  assert steps and all((ckpts / str(s) / 'meta' / 'metadata').is_file() for s in steps), names
  last = steps[-1]
  assert last + 2 <= STEPS, last
  resume_matches(tmp_path, last, two_process_run / 'run')


# gloo's C++ prints one line per connection on stdout, piece by piece ("[Gloo] Rank ", the rank,
# " is connected to ", ...) from several threads at once, so the pieces of two lines can
# interleave with each other and with the program's output: the prefixes go first, then whole
# lines; a run whose pieces interleaved past that is run again (see below).
GLOO_PREFIX = re.compile(r'\[Gloo\] Rank ')
GLOO = re.compile(r'\d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : '
                  r'\d+\n?')


def test_evaluate_and_generate_as_two_processes_print_what_one_prints(two_process_run, tmp_path):
  ckpt = two_process_run / 'run'
  (tmp_path / 'text.txt').write_text('def add(a, b):\n    return a + b\n' * 8)
  cmds = {'evaluate': ['--checkpoint', str(ckpt), '--task', 'ppl', '--data', str(tmp_path / 'text.txt')],
          'generate': ['--checkpoint', str(ckpt), '--prompt', 'def ', '--max-tokens', '12',
                       '--temperature', '0']}
  for module, args in cmds.items():
    one = subprocess.run([sys.executable, '-m', f'shardlm.{module}', *args], env=env(8),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    mine = lambda text: GLOO.sub('', GLOO_PREFIX.sub('', text))
    for attempt in range(3):  # gloo's interleaved pieces are noise outside the program
      two = launch(2, args, tmp_path / f'{module}{attempt}', module=f'shardlm.{module}')
      assert two.returncode == 0, log(tmp_path / f'{module}{attempt}', 0)[-3000:]
      out0, out1 = (log(tmp_path / f'{module}{attempt}', i, 'out') for i in (0, 1))
      if not any('peer ranks' in mine(text) for text in (out0, out1)):
        break
    assert mine(out1) == ''  # process 0 prints
    if module == 'evaluate':
      a, b = json.loads(one.stdout), json.loads(mine(out0))
      assert a.keys() == b.keys() and a['tokens_scored'] == b['tokens_scored'] > 0
      for k in ('token_ppl', 'bits_per_byte', 'word_ppl', 'loss'):
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
    else:
      assert mine(out0) == one.stdout and one.stdout.startswith('def ')


MESH_CHECK = r'''
import json, sys
from shardlm import config, distributed, runtime
from shardlm.errors import ConfigError
cfg = config.parse_args(sys.argv[1:])
distributed.initialize(cfg)
out = {}
from jax.experimental import mesh_utils
for data, fsdp, model in ((2, 2, 2), (2, 1, 4), (1, 2, 4), (4, 1, 2)):
  cfg.mesh.update(data=data, fsdp=fsdp, model=model)
  mesh = runtime.build(cfg).mesh
  groups = mesh.devices.reshape(-1, mesh.shape['model'])  # model is the last axis
  out[f'{data},{fsdp},{model}'] = [sorted({d.process_index for d in g}) for g in groups]
  if data % 2 == 0:  # the layout JAX's own hybrid mesh gives (a process per host)
    hybrid = mesh_utils.create_hybrid_device_mesh((data // 2, 1, fsdp, 1, model), (2, 1, 1, 1, 1),
                                                  process_is_granule=True)  # stage, context = 1
    out[f'{data},{fsdp},{model} as jax'] = bool((mesh.devices == hybrid).all())
cfg.mesh.update(data=1, fsdp=1, model=8)
try:
  runtime.build(cfg)
except ConfigError as e:
  out['model=8'] = str(e)
import jax
if jax.process_index() == 0:  # process 1 never comes to this barrier
  try:
    distributed.barrier('lonely', 2.0)
  except TimeoutError as e:
    out['barrier'] = str(e)
distributed.barrier('together', 60.0)
if jax.process_index() == 0:
  print(json.dumps(out))
'''


def test_model_groups_stay_inside_a_process_and_model_across_hosts_is_refused(tmp_path):
  (tmp_path / 'mesh_check.py').write_text(MESH_CHECK)
  over = ['--config.model.num_heads=8', '--config.model.hidden=64']
  cmd = [*LAUNCH, '-n', '2', '--log-dir', str(tmp_path / 'logs'), '--timeout', '100', '--',
         sys.executable, str(tmp_path / 'mesh_check.py'), *over]
  run = subprocess.run(cmd, env={**env(8), 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
  assert run.returncode == 0, log(tmp_path / 'logs', 0)[-3000:]
  out = json.loads([l for l in log(tmp_path / 'logs', 0, 'out').splitlines() if l.startswith('{')][0])
  for layout in ('2,2,2', '2,1,4', '1,2,4', '4,1,2'):
    assert all(len(g) == 1 for g in out[layout]), (layout, out[layout])  # one process per group
    assert {g[0] for g in out[layout]} == {0, 1}
  for layout in ('2,2,2', '2,1,4', '4,1,2'):  # (1,2,4): fsdp crosses hosts, not data
    assert out[f'{layout} as jax'], layout
  assert out['barrier'] == "barrier 'lonely': process(es) [1] of 2 did not arrive within 2s"
  assert 'split mesh.model across hosts' in out['model=8']
  assert 'dist.allow_model_across_hosts=true' in out['model=8']
  # On the command line: one line, exit 2, from each process.
  bad = launch(2, ['--config.mesh.data=1', '--config.mesh.fsdp=1', '--config.mesh.model=8',
                   *over, f'--config.train.run_dir={tmp_path / "run"}'], tmp_path / 'bad')
  for i in range(2):
    lines = [l for l in log(tmp_path / 'bad', i).splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('shardlm: error: mesh ') and \
        'dist.allow_model_across_hosts' in lines[0], lines
  assert bad.returncode == 2 and not (tmp_path / 'run').exists()


def test_one_process_takes_sigterm_the_same_way(reference, tmp_path):
  run = [f'--config.train.run_dir={tmp_path / "run"}', '--config.train.steps=400']
  proc = subprocess.Popen([sys.executable, '-m', 'shardlm.train', *TINY, *run], env=env(8),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          start_new_session=True)
  try:
    wait_for_step(tmp_path / 'run', 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    _kill(proc)
  assert proc.returncode == 75, err[-3000:]
  step = int(out.split('preempted: SIGTERM; checkpoint at step ')[1].split()[0])
  assert step + 2 <= STEPS and max(losses(tmp_path / 'run')) == step
  again = one_process([f'--config.train.run_dir={tmp_path / "run"}', f'--config.train.steps={step + 2}'])
  assert again.returncode == 0, again.stderr[-3000:]
  got = losses(tmp_path / 'run')
  assert [got[s] for s in (step + 1, step + 2)] == [reference[s] for s in (step + 1, step + 2)]
