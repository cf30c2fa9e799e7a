"""Many processes: start-up (SLURM, Open MPI, TPU pod, explicit settings), barriers that name who is
missing, a watchdog that stops everyone when a process dies, and preemption (SIGTERM).

Every entry point calls `initialize(cfg)` before it touches a device; for a single training
process it only arranges for SIGTERM to stop the run at the next step with a checkpoint.

What JAX 0.10 does on its own, and why this module adds to it: a process that loses a peer is
aborted from C++ (a fatal log and a stack trace, the lost task's number on another line) about
`heartbeat_timeout_seconds` later, and a peer's death inside a gloo collective can also hang or
raise. So shardlm keeps its own heartbeat through the coordination service's key-value store with
a shorter timeout than JAX's: its one line, naming the lost process, comes first. JAX's
preemption notifier takes SIGTERM once initialized (a Python handler would break it), and
`reached_preemption_sync_point(step)` turns it into a step every process agrees on.
"""
import atexit
import dataclasses
import math
import os
import re
import signal
import socket
import sys
import threading
import time

from shardlm import errors
from shardlm.errors import ConfigError

EXIT_PREEMPTED = 75   # SIGTERM: a checkpoint was saved at the agreed step; run again to resume
EXIT_PEER_LOST = 76   # another process died, froze or failed: this one stopped; run again to resume
METHODS = ('auto', 'none', 'slurm', 'ompi', 'tpu', 'explicit')

# GPU defaults, each overridable by the user's own XLA_FLAGS (a flag given there wins):
GPU_XLA_FLAGS = {
    # A collective stuck longer than this (a dead or hung peer) becomes an error, not a hang.
    'xla_gpu_nccl_termination_timeout_seconds': '600',
    # Overlap collectives with compute (MaxText's GPU defaults).
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
    # Combine small collectives into few large ones (gradients of many small parameters).
    'xla_gpu_all_reduce_combine_threshold_bytes': '134217728',
    'xla_gpu_all_gather_combine_threshold_bytes': '134217728',
    'xla_gpu_reduce_scatter_combine_threshold_bytes': '134217728',
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job, found from the config and the environment alone."""
  method: str                 # single | slurm | ompi | tpu | explicit
  how: str                    # for the log: how the cluster was detected
  kwargs: dict                # for jax.distributed.initialize


def _slurm_tasks_on_node(env) -> int:
  """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE is like '4(x2),3'."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE') or ''
  counts = []
  for part in spec.split(','):
    m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if m:
      counts += [int(m.group(1))] * int(m.group(2) or 1)
  node = int(env.get('SLURM_NODEID', 0))
  return counts[node] if node < len(counts) else 1


def _visible_gpus(env) -> int:
  """GPUs this node's tasks share, as SLURM or CUDA_VISIBLE_DEVICES says (0: unknown or none)."""
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible:
    return len([d for d in visible.split(',') if d.strip()])
  for key in ('SLURM_GPUS_ON_NODE', 'SLURM_GPUS_PER_NODE'):
    m = re.search(r'(\d+)$', env.get(key, ''))
    if m:
      return int(m.group(1))
  return 0


def slurm_local_devices(env) -> list[int] | None:
  """This task's GPUs (numbers among the GPUs it sees): the node's visible GPUs split evenly
  among its tasks, as Levanter does, so that one task per node takes every GPU and one task per
  GPU takes one; where SLURM already binds GPUs to tasks (--gpus-per-task, --gpu-bind: fewer
  visible than tasks) every visible one. JAX's own SLURM detection would give each task GPU
  number SLURM_LOCALID only. None where the GPUs are unknown (no CUDA_VISIBLE_DEVICES and no
  SLURM_GPUS_*): see `plan`."""
  gpus, tasks = _visible_gpus(env), _slurm_tasks_on_node(env)
  if not gpus:
    return None
  if gpus < tasks and 'CUDA_VISIBLE_DEVICES' in env:
    return list(range(gpus))  # bound per task: all that this task sees are its own
  if gpus % tasks:
    raise ConfigError(f'SLURM gives this node {tasks} tasks and {gpus} GPUs, which do not split '
                      'evenly; use one task per GPU (--ntasks-per-node=GPUS) or one per node')
  per, local = gpus // tasks, int(env.get('SLURM_LOCALID', 0))
  return list(range(local * per, (local + 1) * per))


def _ids(text: str, key: str) -> list[int] | None:
  if not text:
    return None
  try:
    return [int(x) for x in str(text).split(',') if x.strip()]
  except ValueError:
    raise ConfigError(f"{key}='{text}' must be comma-separated device numbers, e.g. '0,1,2,3'") from None


def plan(d, env=None) -> Plan:
  """The start-up plan for the `dist` config section `d` in environment `env` (default: ours)."""
  env = os.environ if env is None else env
  check_config(d)
  method = d.method
  timeouts = dict(initialization_timeout=int(d.init_timeout),
                  # JAX's own heartbeat fires well after shardlm's watchdog: ours names the process.
                  heartbeat_timeout_seconds=int(2 * d.heartbeat_timeout + 10),
                  shutdown_timeout_seconds=int(d.shutdown_timeout))
  coordinator = d.coordinator or env.get('JAX_COORDINATOR_ADDRESS', '')
  num = d.num_processes or int(env.get('JAX_NUM_PROCESSES', 0) or 0)
  pid = d.process_id if d.process_id >= 0 else int(env.get('JAX_PROCESS_ID', -1) or -1)
  local = _ids(d.local_device_ids or env.get('JAX_LOCAL_DEVICE_IDS', ''), 'dist.local_device_ids')
  if method == 'auto':
    if d.coordinator and not num:
      raise ConfigError(f"dist.coordinator='{d.coordinator}' needs dist.num_processes and "
                        'dist.process_id as well')
    if coordinator and num:
      method = 'explicit'
    elif 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', 1)) > 1:
      method = 'ompi'
    elif all(k in env for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID')) and \
        int(env.get('SLURM_NTASKS', 1)) > 1:
      method = 'slurm'
    elif _on_cloud_tpu_vm(env):
      method = 'tpu'
    else:
      method = 'none'
  if method == 'none':
    return Plan('single', 'one process', {})
  if method == 'explicit':
    if not (coordinator and num and pid >= 0):
      raise ConfigError('dist.method=explicit needs dist.coordinator=HOST:PORT, dist.num_processes '
                        'and dist.process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, '
                        'JAX_PROCESS_ID)')
    if not 0 <= pid < num:
      raise ConfigError(f'dist.process_id={pid} must lie in 0..{num - 1} (dist.num_processes={num})')
    return Plan('explicit', f'explicit settings, coordinator {coordinator}',
                dict(coordinator_address=coordinator, num_processes=num, process_id=pid,
                     local_device_ids=local, cluster_detection_method='deactivate', **timeouts))
  if method == 'slurm':
    missing = [k for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                           'SLURM_LOCALID') if k not in env]
    if missing:
      raise ConfigError(f"dist.method=slurm, but {', '.join(missing)} not set: start each task "
                        'with srun (scripts/slurm.sbatch)')
    local = local if local is not None else slurm_local_devices(env)
    gpus = f', GPUs {local}' if local else ''
    how = (f"SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks; task "
           f"{env['SLURM_PROCID']}, local task {env['SLURM_LOCALID']}{gpus})")
    if local is None and _slurm_tasks_on_node(env) == 1:
      # GPUs unknown and the node's only task: JAX's detection would still restrict it to
      # device SLURM_LOCALID (one GPU); take its coordinator, count and rank, and no restriction.
      from jax._src.clusters import slurm_cluster
      c = slurm_cluster.SlurmCluster
      return Plan('slurm', how, dict(coordinator_address=c.get_coordinator_address(
                                         None, env.get('JAX_COORDINATOR_PORT')),
                                     num_processes=c.get_process_count(),
                                     process_id=c.get_process_id(),
                                     cluster_detection_method='deactivate', **timeouts))
    return Plan('slurm', how, dict(local_device_ids=local, cluster_detection_method='slurm',
                                   **timeouts))
  if method == 'ompi':
    return Plan('ompi', f"Open MPI ({env.get('OMPI_COMM_WORLD_SIZE', '?')} ranks)",
                dict(local_device_ids=local, cluster_detection_method='ompi', **timeouts))
  return Plan('tpu', 'TPU pod (JAX detects the workers)', dict(**timeouts))  # method == 'tpu'


def _on_cloud_tpu_vm(env) -> bool:
  if env is not os.environ:  # a made-up environment (tests): not this machine
    return 'TPU_WORKER_HOSTNAMES' in env
  from jax._src import cloud_tpu_init  # no device touched: a check of the VM's files
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def check_config(d) -> None:
  if d.method not in METHODS:
    raise ConfigError(f"dist.method='{d.method}' is not one of {', '.join(METHODS)}")
  for key in ('init_timeout', 'heartbeat_timeout', 'shutdown_timeout'):
    if not (math.isfinite(d[key]) and d[key] > 0):
      raise ConfigError(f'dist.{key}={d[key]} must be a positive number of seconds')
  if d.num_processes < 0:
    raise ConfigError(f'dist.num_processes={d.num_processes} must be >= 1 (0: from the environment)')
  if d.coordinator and not re.fullmatch(r'\[?[\w.:-]+\]?:\d+', d.coordinator):
    raise ConfigError(f"dist.coordinator='{d.coordinator}' is not HOST:PORT")
  _ids(d.local_device_ids, 'dist.local_device_ids')


# -- start-up -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _State:
  plan: Plan | None = None
  hosts: tuple = ()          # host key of each process: processes on one host share it
  watchdog: object = None
  sigterm: bool = False      # single process: SIGTERM seen


_state = _State()


def _apply_gpu_defaults() -> None:
  """XLA flags for GPUs (set before the backend starts; any flag the user set is kept)."""
  import importlib.util
  if not any(importlib.util.find_spec(p) for p in ('jax_cuda12_plugin', 'jax_cuda13_plugin')):
    return
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{k}={v}' for k, v in GPU_XLA_FLAGS.items() if f'--{k}=' not in flags]
  os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()


def initialize(cfg, preemptible: bool = False) -> Plan:
  """Joins the job described by cfg.dist and the environment; a no-op after the first call.

  Must run before anything touches a device. `preemptible` (training): SIGTERM is turned into a
  checkpoint at an agreed step (`preempted`); otherwise SIGTERM ends the process as usual.
  Returns the plan (method and how it was found).
  """
  if _state.plan is not None:
    return _state.plan
  p = plan(cfg.dist)
  _apply_gpu_defaults()
  if p.method == 'single':
    _state.plan = p
    _state.hosts = ('process0',)
    if preemptible:
      signal.signal(signal.SIGTERM, _on_sigterm)
    return p
  import jax
  # JAX's preemption notifier swallows SIGTERM once initialized: only where a step can act on it.
  jax.config.update('jax_enable_preemption_service', preemptible)
  # gloo: CPU collectives across processes (JAX's default now; set so that it stays so).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**p.kwargs)
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
    raise ConfigError(f'could not join the job ({p.how}): {" ".join(str(e).split())[:300]}') from None
  _state.plan = p
  client = _client()
  pid, n = jax.process_index(), jax.process_count()
  # Processes on one machine share a host key; stand-alone processes (explicit settings, the
  # local launcher) each stand for a host of their own.
  key = socket.gethostname() if p.method in ('slurm', 'ompi', 'tpu') else f'process{pid}'
  client.key_value_set(f'shardlm/host/{pid}', key, allow_overwrite=True)
  _state.hosts = tuple(client.blocking_key_value_get(f'shardlm/host/{i}', int(cfg.dist.init_timeout * 1000))
                       for i in range(n))
  _state.watchdog = _Watchdog(client, pid, n, cfg.dist.heartbeat_timeout)
  _state.watchdog.start()
  # Runs before JAX's own exit hook (registered earlier, run later): the watchdog stops and says
  # why, so that a process that finishes first is not taken for a dead one, and one that failed
  # on an error of its own (an uncaught exception: Python sets sys.last_value) stops the others
  # at once instead of leaving them in a collective.
  atexit.register(lambda: _state.watchdog.finish('failed' if hasattr(sys, 'last_value') else 'finished'))
  return p


def describe() -> str:
  """The first log line's cluster part: process i of N, devices, how the cluster was found."""
  import jax
  p = _state.plan or Plan('single', 'one process', {})
  hosts = len(set(_state.hosts)) or 1
  return (f'process {jax.process_index()} of {jax.process_count()} ({p.how}); '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'{jax.devices()[0].platform} devices on {hosts} host(s)')


def host_of(process_index: int) -> str:
  """The host key of a process (one host per process unless they share a machine)."""
  return _state.hosts[process_index] if _state.hosts else f'process{process_index}'


def _client():
  from jax._src import distributed as jax_distributed  # the coordination service client
  return jax_distributed.global_state.client


# -- barriers -----------------------------------------------------------------------------------

_barrier_count = {}


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process arrives, through the coordination service (never a device
  collective, which cannot time out); a timeout names the processes that did not arrive."""
  import jax
  if jax.process_count() == 1:
    return
  import jax.errors
  n = _barrier_count[name] = _barrier_count.get(name, 0) + 1
  uid, client = f'{name}.{n}', _client()
  client.key_value_set(f'shardlm/arrived/{uid}/{jax.process_index()}', '1', allow_overwrite=True)
  try:
    client.wait_at_barrier(f'shardlm/{uid}', int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError:
    arrived = {int(k.rsplit('/', 1)[1]) for k, _ in client.key_value_dir_get(f'shardlm/arrived/{uid}/')}
    missing = sorted(set(range(jax.process_count())) - arrived)
    raise TimeoutError(f"barrier '{name}': process(es) {missing} of {jax.process_count()} did not "
                       f'arrive within {timeout_s:g}s') from None


# -- dead or frozen processes -------------------------------------------------------------------

def _exit(message: str, status: int) -> None:
  """One line, then out at once: a normal exit would wait in JAX's shutdown barrier for the
  processes that are gone."""
  errors.print_error(message)
  sys.stdout.flush()
  os._exit(status)


class _Watchdog(threading.Thread):
  """Each process writes a counter to the key-value store every `period` and reads everyone's;
  a counter that stops changing for `timeout` seconds means that process is dead or frozen."""

  def __init__(self, client, pid: int, n: int, timeout: float):
    super().__init__(name='shardlm-watchdog', daemon=True)
    self.client, self.pid, self.n, self.timeout = client, pid, n, timeout
    self.period = min(1.0, timeout / 10)
    self.finished = threading.Event()

  def run(self):
    seen = {i: (None, time.monotonic()) for i in range(self.n) if i != self.pid}
    count = 0
    while not self.finished.is_set():
      count += 1
      try:
        self.client.key_value_set(f'shardlm/hb/{self.pid}', str(count), allow_overwrite=True)
        beats = dict(self.client.key_value_dir_get('shardlm/hb/'))
        abort = dict(self.client.key_value_dir_get('shardlm/abort'))
      except Exception:  # the coordination service is gone: process 0 died
        if not self.finished.is_set():
          self.stop([0], 'the coordination service (process 0) stopped answering')
        return
      if abort:
        _exit(next(iter(abort.values())), EXIT_PEER_LOST)
      now, stale = time.monotonic(), []
      for i, (value, since) in seen.items():
        beat = beats.get(f'shardlm/hb/{i}')
        if beat in ('finished', 'stopping'):  # ending normally, or stopping for a lost peer
          continue
        if beat == 'failed':
          self.stop([i], 'it stopped on an error of its own: see its log')
          return
        if beat != value:
          seen[i] = (beat, now)
        elif now - since > self.timeout:
          stale.append(i)
      if stale:
        self.stop(stale, f'no heartbeat for {self.timeout:g}s (dist.heartbeat_timeout): it died or froze')
        return
      self.finished.wait(self.period)

  def wait_for_others(self, timeout: float) -> None:
    """Until every other process has said it is ending (or `timeout`)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      try:
        beats = dict(self.client.key_value_dir_get('shardlm/hb/'))
      except Exception:
        return
      if all(beats.get(f'shardlm/hb/{i}') in ('finished', 'failed', 'stopping') for i in range(self.n)):
        time.sleep(self.period)  # their os._exit comes right after their mark
        return
      time.sleep(self.period / 2)

  def finish(self, how: str) -> None:
    """This process ends (`how`: 'finished' or 'failed'): stop watching, and tell the others."""
    self.finished.set()
    self.join(timeout=5 * self.period + 1)
    try:
      self.client.key_value_set(f'shardlm/hb/{self.pid}', how, allow_overwrite=True)
    except Exception:
      pass

  def stop(self, lost: list[int], why: str) -> None:
    names = ', '.join(map(str, lost))
    message = (f'process {names} of {self.n} lost ({why}); stopping every process. The last '
               'committed checkpoint is intact: run the same command again to resume')
    try:  # ending: a process 0 that waits for the others to go first need not wait longer
      self.client.key_value_set(f'shardlm/hb/{self.pid}', 'stopping', allow_overwrite=True)
      if self.pid == 0 and 0 not in lost:
        # Process 0 hosts the coordination service: tell the others before it goes.
        self.client.key_value_set('shardlm/abort/0', message, allow_overwrite=True)
        time.sleep(min(2.0, 3 * self.period))
    except Exception:
      pass
    _exit(message, EXIT_PEER_LOST)


def await_peers(error: Exception) -> None:
  """With many processes, an error can be the echo of a lost peer (a collective whose connection
  closed): give the watchdog the time to name the lost process and stop this one. Returns (for
  the caller to re-raise) if everyone is alive, or with one process."""
  import jax.errors
  w = _state.watchdog
  if w is None or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  deadline = time.monotonic() + w.timeout + 5 * w.period + 5
  while time.monotonic() < deadline and w.is_alive():
    time.sleep(w.period)


def run(fn):
  """Runs an entry point's body. With many processes, any end but success or preemption is a
  failure the others must hear of: this process prints its error, marks itself failed (their
  watchdogs stop them with a line naming it) and leaves at once, since JAX's exit barrier would
  wait for processes that are not coming."""
  import traceback
  try:
    return fn()
  except BaseException as e:
    w = _state.watchdog
    code = e.code if isinstance(e, SystemExit) else None
    if w is None or isinstance(e, Preempted) or (isinstance(e, SystemExit) and
                                                  code in (0, None, EXIT_PREEMPTED)):
      raise
    await_peers(e)  # a collective that broke because a peer died: the watchdog names it first
    w.finished.set()  # from here on this process leaves on its own account
    if isinstance(e, ConfigError):
      errors.print_error(e)
      status = 2
      # Bad input is usually the same in every process: let theirs say so themselves first.
      time.sleep(3 * w.period)
    elif isinstance(e, SystemExit):
      status = code if isinstance(code, int) else 1
    else:
      traceback.print_exc()
      status = 1
    w.finish('failed')
    if w.pid == 0:  # it hosts the coordination service: the others must go first
      w.wait_for_others(timeout=w.timeout)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -- preemption ---------------------------------------------------------------------------------

class Preempted(Exception):
  """SIGTERM reached the run; a checkpoint was written at `step`."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def _on_sigterm(signum, frame):
  _state.sigterm = True
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once


def preempted(step: int) -> bool:
  """True once SIGTERM has reached any process, at the same `step` in every process. Call it at
  every step with the same steps in every process, counted from 1 in this run: JAX agrees on the
  step after the highest one any process has reported, starting from none (so a resumed run that
  passed its own step numbers would never reach an agreement made before its loop)."""
  if _state.plan is None or _state.plan.method == 'single':
    return _state.sigterm
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
