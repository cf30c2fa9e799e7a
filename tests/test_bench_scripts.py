"""The benchmark scripts run end to end (at toy size, on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_dry_run(tmp_path):
  out = tmp_path / 'results.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(['bash', str(ROOT / 'scripts/bench_gpu.sh'), '--dry-run', '--out', str(out)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results) == {'gpt_1_2b', 'gpt_345m'}
  for r in results.values():
    assert r['step']['tokens_per_s'] > 0 and 0 < r['step']['mfu'] < 1
  assert f'results: {out}' in proc.stdout


def test_bench_attention_local_beats_dense(tmp_path):
  """A small version of the local-attention benchmark: at T = 8W local must already win."""
  out = tmp_path / 'attn.json'
  proc = subprocess.run([sys.executable, str(ROOT / 'scripts/bench.py'), '--attention', '--window', '64',
                         '--lengths', '512', '--repeats', '3', '--out', str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())['attention']
  assert row['T'] == 512 and row['speedup'] > 1.5, row


def test_bench_generate_reports_both_paths(tmp_path):
  """A toy run of `bench.py --generate`: every batch size timed with and without the cache."""
  out = tmp_path / 'gen.json'
  proc = subprocess.run([sys.executable, str(ROOT / 'scripts/bench.py'), '--generate', '--new-tokens', '8',
                         '--prompt-len', '4', '--batches', '1,2', '--config.model.num_layers=1',
                         '--out', str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())['generate']
  assert [r['batch'] for r in rows] == [1, 2]
  for r in rows:
    assert r['cached_tokens_per_s'] > 0 and r['recompute_tokens_per_s'] > 0
  assert proc.stdout.count('with cache') == 2


def test_bench_profile_splits_the_step(tmp_path):
  """`bench.py --profile` attributes the traced step's op time to forward, backward and the
  update, op by op, each op named by the JAX operation it came from."""
  out = tmp_path / 'step.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device: ops in sequence
  proc = subprocess.run([sys.executable, str(ROOT / 'scripts/bench.py'), '--config.model.num_layers=1',
                         '--profile', '--repeats', '2', '--out', str(out)],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step = json.loads(out.read_text())['step']
  p = step['profile']
  assert p['by_phase']['forward'] > 0 and p['by_phase']['backward'] > 0
  seconds = [r['seconds'] for r in p['rows']]
  assert any('dot_general' in r['source'] for r in p['rows'])
  # The ops of one step take no more than the step itself (plus timer noise across threads).
  assert 0 < sum(seconds) < 2 * step['step_s']
  assert 'profile:' in proc.stdout and 'backward' in proc.stdout


def test_sop_probe_runs_and_refuses_gpt():
  """`scripts/sop_probe.py` trains the sentence-order head alone and reports held-out accuracy
  against what a constant prediction scores; a GPT config is refused with exit status 2."""
  probe = [sys.executable, str(ROOT / 'scripts/sop_probe.py')]
  proc = subprocess.run(probe + ['--steps', '4', '--evals', '2', '--eval-rows', '64',
                                 '--config.data.batch_size=8'], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '64 held-out rows; a constant prediction scores' in proc.stdout
  assert proc.stdout.count('held-out sop_acc') == 2
  proc = subprocess.run(probe + ['--steps', '2', '--config', 'tiny'], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and 'needs a BERT config' in proc.stderr


def test_bench_pipeline_compares_layouts_in_one_run(tmp_path):
  """`bench_pipeline.py`: a plain and a pipelined layout timed in one process, with the bubble."""
  out = tmp_path / 'pipe.json'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  proc = subprocess.run([sys.executable, str(ROOT / 'scripts/bench_pipeline.py'), '--layouts',
                         'data=2;stage=2', '--microbatches', '4', '--steps', '2',
                         '--config.model.num_layers=2', '--config.model.scan_layers=true',
                         '--out', str(out)], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plain, piped = json.loads(out.read_text())['layouts']
  assert (plain['stages'], piped['stages'], piped['microbatches']) == (1, 2, 4)
  assert piped['bubble'] == 1 / 5 and plain['bubble'] == 0
  assert plain['step_s'] > 0 and piped['step_s'] > 0
  assert piped['argument_bytes'] < plain['argument_bytes']  # half the layers per device
