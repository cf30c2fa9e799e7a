"""How a process finds its job (SLURM, Open MPI, explicit, none), how hosts split the mesh, and
what each launcher would run: no processes are joined here (tests/test_many_hosts.py does that)."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shardlm import config, distributed, sharding
from shardlm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SLURM = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'gpu[001-002]', 'SLURM_NTASKS': '16',
         'SLURM_PROCID': '11', 'SLURM_LOCALID': '3', 'SLURM_NODEID': '1',
         'SLURM_STEP_TASKS_PER_NODE': '8(x2)', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}


def dist(**overrides):
  cfg = config.defaults()
  cfg.dist.update(overrides)
  return cfg.dist


def test_one_process_needs_nothing():
  assert distributed.plan(dist(), env={}).method == 'single'
  assert distributed.plan(dist(method='none'), env=SLURM).method == 'single'


def test_slurm_one_task_per_gpu_takes_its_gpu():
  p = distributed.plan(dist(), env=SLURM)
  assert p.method == 'slurm' and p.kwargs['cluster_detection_method'] == 'slurm'
  assert p.kwargs['local_device_ids'] == [3]
  assert 'SLURM job 77 (16 tasks; task 11' in p.how


def test_slurm_one_task_per_node_takes_every_gpu():
  env = {**SLURM, 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '0',
         'SLURM_STEP_TASKS_PER_NODE': '1(x2)'}
  assert distributed.plan(dist(), env=env).kwargs['local_device_ids'] == list(range(8))
  # ...and two tasks of a node split its GPUs between them.
  env.update(SLURM_NTASKS='4', SLURM_LOCALID='1', SLURM_STEP_TASKS_PER_NODE='2(x2)')
  assert distributed.plan(dist(), env=env).kwargs['local_device_ids'] == [4, 5, 6, 7]
  env.update(SLURM_STEP_TASKS_PER_NODE='3(x2)')
  with pytest.raises(ConfigError, match='3 tasks and 8 GPUs'):
    distributed.plan(dist(), env=env)
  # SLURM binding GPUs to tasks (--gpus-per-task=1): each task sees its own, and takes them all.
  env.update(SLURM_STEP_TASKS_PER_NODE='8(x2)', CUDA_VISIBLE_DEVICES='5')
  assert distributed.plan(dist(), env=env).kwargs['local_device_ids'] == [0]


def test_slurm_without_gpus_leaves_the_devices_to_jax():
  env = {k: v for k, v in SLURM.items() if k != 'CUDA_VISIBLE_DEVICES'}
  assert distributed.plan(dist(), env=env).kwargs['local_device_ids'] is None
  # A one-task step is one process.
  assert distributed.plan(dist(), env={**env, 'SLURM_NTASKS': '1'}).method == 'single'


def test_open_mpi_and_explicit_settings():
  ompi = {'OMPI_MCA_orte_hnp_uri': '1234.0;tcp://10.0.0.1:5000', 'OMPI_COMM_WORLD_SIZE': '4'}
  assert distributed.plan(dist(), env=ompi).kwargs['cluster_detection_method'] == 'ompi'
  p = distributed.plan(dist(coordinator='10.0.0.1:1234', num_processes=4, process_id=2,
                            local_device_ids='0,1', heartbeat_timeout=20.0), env={})
  assert p.method == 'explicit'
  assert p.kwargs == dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2,
                          local_device_ids=[0, 1], cluster_detection_method='deactivate',
                          initialization_timeout=300, heartbeat_timeout_seconds=50,
                          shutdown_timeout_seconds=120)
  # JAX's own variables say the same.
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2'}
  assert distributed.plan(dist(), env=env).kwargs['process_id'] == 2


@pytest.mark.parametrize('settings, message', [
    (dict(method='explicit', coordinator='h:1'), 'needs dist.coordinator=HOST:PORT, dist.num_processes'),
    (dict(coordinator='h:1', num_processes=2, process_id=2), 'dist.process_id=2 must lie in 0..1'),
    (dict(coordinator='nohost'), "dist.coordinator='nohost' is not HOST:PORT"),
    (dict(method='mpi'), "dist.method='mpi' is not one of"),
    (dict(heartbeat_timeout=0.0), 'dist.heartbeat_timeout=0.0 must be a positive'),
    (dict(init_timeout=float('nan')), 'dist.init_timeout=nan'),
    (dict(local_device_ids='0,x'), "dist.local_device_ids='0,x' must be comma-separated"),
    (dict(method='slurm'), 'SLURM_JOB_ID, SLURM_STEP_NODELIST'),
])
def test_bad_settings_are_one_clear_error(settings, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('.', r'\.')):
    distributed.plan(dist(**settings), env={})


def test_hosts_go_to_the_slow_axes_and_never_to_model_unasked():
  shape = {'data': 2, 'fsdp': 2, 'model': 2}
  assert sharding.split_over_hosts(shape, 2) == {'data': 2, 'fsdp': 1, 'model': 1}
  assert sharding.split_over_hosts(shape, 4) == {'data': 2, 'fsdp': 2, 'model': 1}
  assert sharding.split_over_hosts({'replica': 2, **shape}, 4) == \
      {'replica': 2, 'data': 2, 'fsdp': 1, 'model': 1}
  with pytest.raises(ConfigError, match='split mesh.model across hosts'):
    sharding.split_over_hosts(shape, 8)
  assert sharding.split_over_hosts(shape, 8, allow_model=True) == {'data': 2, 'fsdp': 2, 'model': 2}
  with pytest.raises(ConfigError, match='cannot be laid over 3 hosts'):
    sharding.split_over_hosts(shape, 3)


def run(*cmd):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_local_launcher_dry_run():
  out = run(sys.executable, 'scripts/launch_local.py', '-n', '2', '--devices-per-process', '4',
            '--port', '4321', '--dry-run', '--', 'python', '-m', 'shardlm.train', '--config', 'tiny')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      '# process 0',
      'JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m shardlm.train '
      '--config tiny --config.dist.method=explicit --config.dist.coordinator=127.0.0.1:4321 '
      '--config.dist.num_processes=2 --config.dist.process_id=0',
      '# process 1',
      'JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m shardlm.train '
      '--config tiny --config.dist.method=explicit --config.dist.coordinator=127.0.0.1:4321 '
      '--config.dist.num_processes=2 --config.dist.process_id=1']
  slurm = run(sys.executable, 'scripts/launch_local.py', '-n', '2', '--mode', 'slurm', '--port', '4321',
              '--dry-run', '--', 'python', '-m', 'shardlm.train')
  assert 'SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_LOCALID=1' in slurm.stdout
  assert 'JAX_COORDINATOR_PORT=4321' in slurm.stdout and '--config.dist' not in slurm.stdout


def test_slurm_batch_file_dry_run():
  out = run('bash', 'scripts/slurm.sbatch', '--dry-run', '--config', 'gpt_8b.py', '--config.mesh.model=8')
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == ('srun --wait=600 python -m shardlm.train '
                                '--config gpt_8b.py --config.mesh.model=8')
  text = (ROOT / 'scripts' / 'slurm.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=8' in text and '#SBATCH --gpus-per-node=8' in text


def test_tpu_pod_dry_run():
  out = run('bash', 'scripts/tpu_pod.sh', 'pod', 'us-central2-b', '--project', 'p', '--dry-run', '--',
            '--config', 'gpt_8b.py')
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)  # as a shell reads the printed command
  assert words[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone', 'us-central2-b',
                       '--project']
  assert '--worker=all' in words
  assert words[-2:-1] == ['--command']
  assert words[-1] == 'cd ~/shardlm && python3 -m shardlm.train --config.dist.method=tpu --config gpt_8b.py'
  bad = run('bash', 'scripts/tpu_pod.sh', 'pod')
  assert bad.returncode == 2 and 'usage' in bad.stderr
