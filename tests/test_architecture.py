"""The shape of the code: one-way imports, a model package that knows only logical axes, mesh axes
and model kinds from the config, and entry points that never build what they do not need."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import params_checkpoint, run_steps

import shardlm
from shardlm import config, evaluate, generate, optim, runtime, sharding, train
from shardlm.errors import ConfigError
from shardlm.model import axes

ROOT = Path(shardlm.__file__).parent


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """shardlm module -> the shardlm modules it imports, anywhere in the file (a function-local
  import that dodges a cycle is still an edge)."""
  modules = {_module_name(p): p for p in ROOT.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + [base])
        # `from shardlm import x` names module x when there is one; else it names the package.
        for a in node.names:
          edges.add(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base)
    graph[name] = {e for e in edges if e in modules and e != name and e != 'shardlm'}
  return graph


def find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None
  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert 'shardlm.train' in graph and 'shardlm.model.gpt' in graph  # the walk found the modules
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_model_imports_only_its_axes_module():
  graph = import_graph()
  outside = {m: sorted(e for e in edges if not e.startswith('shardlm.model'))
             for m, edges in graph.items() if m.startswith('shardlm.model')}
  assert all(not e for e in outside.values()), outside
  assert graph['shardlm.model.axes'] == set()  # a leaf
  assert graph['shardlm.errors'] == set()
  # ...and at run time: importing the models loads nothing else of shardlm.
  code = ('import sys, shardlm.model.gpt, shardlm.model.bert; '
          'print(sorted(m for m in sys.modules if m.startswith("shardlm") and m != "shardlm"))')
  loaded = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                     check=True, timeout=120).stdout.replace("'", '"'))
  assert loaded and all(m.startswith('shardlm.model') for m in loaded), loaded


def test_an_unknown_logical_name_in_model_code_is_an_error():
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    axes.constrain(np.zeros((2, 3)), ('batch', 'hidden'))
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="unknown logical axis 'emb'"):
    sharding.named(mesh, (), ('emb', None))


def _axis_config(tmp_path, body: str) -> str:
  path = tmp_path / 'extra_axis.py'
  path.write_text('from shardlm import config\n\n\ndef get_config():\n'
                  "  c = config.load('tiny')\n" + body + '  return c\n')
  return str(path)


def test_an_extra_mesh_axis_through_the_config_alone(tmp_path):
  """A size-2 `replica` axis that the batch is split over: same losses as without it."""
  cfg = config.load(_axis_config(tmp_path, "  c.mesh.replica = 2\n"
                                 "  c.sharding.rules = (('batch', ('replica', 'data', 'fsdp')),)\n"))
  t, _, extra = run_steps(cfg, jax.devices(), steps=3)
  assert dict(t.rt.mesh.shape) == {'replica': 2, 'data': 4, 'stage': 1, 'fsdp': 1, 'context': 1,
                                     'model': 1}
  assert t.batch_sharding.spec[0] == ('replica', 'data', 'fsdp')
  _, _, plain = run_steps(config.load('tiny'), jax.devices(), steps=3)
  assert len(set(extra['loss'])) == 3  # the parameters move: later steps compare updated models
  np.testing.assert_allclose(extra['loss'], plain['loss'], rtol=1e-6)


def test_an_added_mesh_axis_no_rule_uses_is_a_typo(tmp_path):
  cfg = config.load(_axis_config(tmp_path, '  c.mesh.modle = 2\n'))
  with pytest.raises(ConfigError, match=r'mesh\.modle .*did you mean mesh\.model'):
    train.setup(cfg)


def test_evaluate_and_generate_never_build_an_optimizer(tmp_path, monkeypatch, capsys):
  cfg = config.load('tiny')
  for key, value in dict(model__num_layers=1, model__seq_len=32).items():
    config.override(cfg, key.replace('__', '.'), str(value))
  ckpt = params_checkpoint(tmp_path / 'params', runtime.build(cfg, jax.devices()[:1]))
  (tmp_path / 'text.txt').write_text('def f(x):\n    return x + 1\n' * 4)

  def forbidden(*args, **kwargs):
    raise AssertionError('an optimizer or train step was built')
  monkeypatch.setattr(optim, 'make', forbidden)
  monkeypatch.setattr(train, 'setup', forbidden)
  evaluate.main(['--checkpoint', str(ckpt), '--task', 'ppl', '--data', str(tmp_path / 'text.txt')])
  result = json.loads(capsys.readouterr().out)
  assert result['tokens_scored'] > 0 and np.isfinite(result['token_ppl'])
  generate.main(['--checkpoint', str(ckpt), '--prompt', 'def ', '--max-tokens', '5',
                 '--temperature', '0'])
  assert capsys.readouterr().out.startswith('def ')


def test_the_micro_batch_split_and_mean():
  """grad_accum: micro-batch i takes rows i, i+k, ...; the mean over micro-batches of a mean
  loss's value and gradient is the whole batch's."""
  from shardlm import grad_accum
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  micro = grad_accum.split({'x': x}, 4)['x']
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1], x[[1, 5]])
  w = np.array([0.5, -1.0, 2.0], np.float32)
  fn = jax.value_and_grad(lambda w, b: jax.numpy.mean(jax.numpy.sin(b['x'] @ w)))
  whole = fn(w, {'x': x})
  for k in (1, 2, 4, 8):
    got = grad_accum.value_and_grad(fn, w, {'x': x}, k)
    np.testing.assert_allclose(got[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], whole[1], rtol=1e-5)
