"""Start one shardlm command as N processes on this machine, each with its own CPU devices, joined
over loopback (gloo collectives): a cluster for anyone without one, and for the tests.

  python scripts/launch_local.py -n 2 -- python -m shardlm.train --config tiny
  python scripts/launch_local.py -n 4 --devices-per-process 2 -- python -m shardlm.evaluate ...
  python scripts/launch_local.py -n 2 --mode slurm -- python -m shardlm.train   # as srun would
  python scripts/launch_local.py -n 2 --dry-run -- python -m shardlm.train      # print, run nothing

--mode explicit (default) passes --config.dist.* settings; --mode slurm sets the environment
variables `srun` sets for a one-node step instead, so that JAX's SLURM detection is what joins
the processes. The launcher ends every child it started: once one exits with an error, the
others get --grace seconds to stop on their own (shardlm's watchdog stops them within
dist.heartbeat_timeout), then are killed; SIGTERM or Ctrl-C to the launcher is passed on as
SIGTERM (a preemption: they checkpoint and exit with status 75). Its status: 0 if every process
succeeded, 75 if they were preempted, else the first failure's.
"""
import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EXIT_PREEMPTED = 75  # shardlm.distributed.EXIT_PREEMPTED (not imported: this starts no JAX)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def plan(n: int, devices: int, mode: str, port: int, command: list[str]) -> list[tuple[dict, list]]:
  """(environment changes, argv) for each process."""
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device_count'))
  out = []
  for i in range(n):
    env = {'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}
    argv = list(command)
    if mode == 'slurm':
      env.update(SLURM_JOB_ID='1', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS=str(n),
                 SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID='0',
                 SLURM_STEP_TASKS_PER_NODE=str(n), JAX_COORDINATOR_PORT=str(port))
    else:
      argv += ['--config.dist.method=explicit', f'--config.dist.coordinator=127.0.0.1:{port}',
               f'--config.dist.num_processes={n}', f'--config.dist.process_id={i}']
    out.append((env, argv))
  return out


def _die_with_parent():
  """In the child, before exec: SIGKILL when the launcher dies, even by SIGKILL (Linux)."""
  try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: the launcher's finally still ends them when it can


def _signal_group(p, sig) -> None:
  """To the child and whatever it started (it leads its own session)."""
  try:
    os.killpg(p.pid, sig)
  except ProcessLookupError:
    pass


def describe(status: int) -> str:
  if status < 0:
    return f'killed by {signal.Signals(-status).name}'
  return {0: 'done', EXIT_PREEMPTED: 'preempted (checkpoint saved)', 2: 'bad input'}.get(
      status, f'status {status}')


def run(procs: list[tuple[dict, list]], grace: float, timeout: float, log_dir: Path | None) -> int:
  children, files = [], []
  stopping = {'since': None, 'why': ''}

  def forward(signum, frame):
    stopping['since'] = stopping['since'] or time.monotonic()
    stopping['why'] = f'{signal.Signals(signum).name} to the launcher'
    for p in children:
      if p.poll() is None:
        _signal_group(p, signal.SIGTERM)
  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i, (env, argv) in enumerate(procs):
      out = err = None
      if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
        out, err = open(log_dir / f'process{i}.out', 'w'), open(log_dir / f'process{i}.err', 'w')
        files += [out, err]
      # A session of its own: the child and anything it starts can be killed as one group.
      children.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=err,
                                       start_new_session=True, preexec_fn=_die_with_parent))
    start, failures, reported = time.monotonic(), [], set()

    def report(now):
      for i, p in enumerate(children):
        if p.returncode is not None and i not in reported:
          reported.add(i)
          if p.returncode != 0:
            print(f'launch_local: process {i} of {len(children)} ended: {describe(p.returncode)}',
                  file=sys.stderr, flush=True)
          if p.returncode not in (0, EXIT_PREEMPTED):
            failures.append(p.returncode)
            stopping['since'] = stopping['since'] or now
            stopping['why'] = stopping['why'] or f'process {i} failed'

    while any([p.poll() is None for p in children]):  # a list: poll every child, every time
      now = time.monotonic()
      report(now)
      if timeout and now - start > timeout and stopping['since'] is None:
        stopping['since'], stopping['why'] = now - grace, f'--timeout {timeout:g}s'
      if stopping['since'] is not None and now - stopping['since'] > grace:
        left = [i for i, p in enumerate(children) if p.poll() is None]
        print(f"launch_local: killing process(es) {left} ({stopping['why']}; {grace:g}s grace "
              'passed)', file=sys.stderr, flush=True)
        break
      time.sleep(0.1)
    report(time.monotonic())
  finally:
    for p in children:  # whatever happened: no child outlives the launcher
      if p.poll() is None:
        _signal_group(p, signal.SIGKILL)
      p.wait()
    for f in files:
      f.close()
    for s, handler in old.items():
      signal.signal(s, handler)
  codes = [p.returncode for p in children]
  if all(c == 0 for c in codes):
    return 0
  if not failures and all(c in (0, EXIT_PREEMPTED) for c in codes):
    return EXIT_PREEMPTED
  first = failures[0] if failures else -signal.SIGKILL  # else: killed here, after the grace
  return first if first > 0 else 128 - first


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python scripts/launch_local.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('-n', '--processes', type=int, default=2)
  parser.add_argument('--devices-per-process', type=int, default=4, help='simulated CPU devices each')
  parser.add_argument('--mode', choices=('explicit', 'slurm'), default='explicit')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
  parser.add_argument('--grace', type=float, default=90.0,
                      help='seconds the others get to stop after one fails (default 90)')
  parser.add_argument('--timeout', type=float, default=0.0, help='stop everything after this (0: never)')
  parser.add_argument('--log-dir', type=Path, help='write process<i>.out/.err here instead of the terminal')
  parser.add_argument('--dry-run', action='store_true', help='print what would run, run nothing')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command after --, e.g. -- python -m shardlm.train')
  if args.processes < 1 or args.devices_per_process < 1 or args.grace < 0 or args.timeout < 0:
    parser.error('--processes and --devices-per-process must be >= 1; --grace, --timeout >= 0')
  port = args.port or free_port()
  procs = plan(args.processes, args.devices_per_process, args.mode, port, command)
  if args.dry_run:
    for i, (env, argv_i) in enumerate(procs):
      sets = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
      print(f'# process {i}\n{sets} {shlex.join(argv_i)}')
    return 0
  return run(procs, args.grace, args.timeout, args.log_dir)


if __name__ == '__main__':
  sys.exit(main())
