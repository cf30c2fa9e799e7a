"""Bad input gives one `shardlm: error:` line on stderr, exit status 2, and leaves nothing behind."""
import os
import subprocess
import sys

import pytest

from shardlm import config, runtime, sharding, train

# (overrides, substrings the error line must hold: the offending key or value, and a hint).
CASES = {
    'unknown key': ('--config.model.hiden=3', ['model.hiden', 'did you mean: model.hidden']),
    'unknown section': ('--config.modle.hidden=3', ['modle.hidden', 'did you mean: model.hidden']),
    'section given a value': ('--config.model=3', ["'model'", 'section']),
    'int key, word': ('--config.model.num_layers=abc', ['model.num_layers', "'abc'"]),
    'float key, word': ('--config.optimizer.lr=fast', ['optimizer.lr', "'fast'"]),
    'bool key, maybe': ('--config.log.tensorboard=maybe', ['log.tensorboard', "'maybe'"]),
    'override without value': ('--config.model.hidden', ['--config.model.hidden']),
    'stray argument': ('--steps=3', ["'--steps=3'"]),
    'mesh product': ('--config.mesh.data=3', ['data=3', '8']),
    'two -1 axes': ('--config.mesh.data=-1 --config.mesh.model=-1', ["'data': -1", "'model': -1"]),
    'heads vs model axis': ('--config.mesh.data=1 --config.mesh.model=8',
                            ['model.num_heads=4', 'mesh.model=8']),
    'unpadded vocab vs model axis': (
        '--config.model.vocab_multiple=0 --config.mesh.data=2 --config.mesh.model=4',
        ['model.vocab_size=257', 'mesh.model=4', 'model.vocab_multiple']),
    'batch vs data axis': ('--config.data.batch_size=12', ['data.batch_size=12', '8']),
    'unknown config': ('--config nosuch', ["'nosuch'", 'gpt_8b', 'tiny']),
    'misspelt config': ('--config gpt8b', ["'gpt8b'", 'did you mean: gpt_8b']),
    'unknown preset': ('--config.sharding.preset=megatorn', ["'megatorn'", 'megatron_fsdp']),
    'rule, unknown mesh axis': ('--config.sharding.rules=((\'mlp\',\'modle\'),)', ["'modle'", "'mlp'"]),
    'rule, unknown logical axis': ('--config.sharding.rules=((\'mpl\',\'model\'),)', ["'mpl'"]),
}

# Found only once the data is looked at; still before anything is written or compiled.
CASES.update({
    'vocab below the tokenizer': ('--config.model.vocab_size=100', ['model.vocab_size', '257']),
    'unknown tokenizer': ('--config.data.tokenizer=bpe', ['data.tokenizer', "'bpe'"]),
    'unknown corpus': ('--config.data.corpus=nosuch', ['data.corpus', "'nosuch'"]),
    'hidden vs fsdp axis': ('--config.model.hidden=100 --config.mesh.data=1 --config.mesh.fsdp=8',
                            ['100 is not divisible by 8', 'mesh']),
})


def run_train(args: list[str], cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  # The timeout bounds a regression that starts training instead of stopping.
  return subprocess.run([sys.executable, '-m', 'shardlm.train', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def check_rejected(overrides: str, expected: list[str], tmp_path):
  run_dir = tmp_path / 'run'
  proc = run_train(overrides.split() + [f'--config.train.run_dir={run_dir}'], cwd=tmp_path)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('shardlm: error: '), lines[0]
  for s in expected:
    assert s in lines[0]
  assert proc.stdout == ''  # stopped before the first log line, i.e. before setup ran
  assert not run_dir.exists()


@pytest.mark.parametrize('overrides, expected', CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_one_line(overrides, expected, tmp_path):
  check_rejected(overrides, expected, tmp_path)


# In-process checks of shardlm.config.

@pytest.mark.parametrize('key, raw, expected', [
    ('model.num_layers', '12', 12),
    ('model.num_layers', '-1', -1),
    ('optimizer.lr', '3e-4', 3e-4),
    ('optimizer.lr', '1', 1.0),  # an int spelling of a float key stays a float
    ('log.tensorboard', 'false', False),
    ('log.tensorboard', 'True', True),
    ('model.dtype', 'bfloat16', 'bfloat16'),
    ('sharding.rules', "(('mlp', None), ('embed', ('data', 'fsdp')))",
     (('mlp', None), ('embed', ('data', 'fsdp')))),
])
def test_override_keeps_the_type(tiny, key, raw, expected):
  cfg = tiny()
  config.override(cfg, key, raw)
  section, name = key.split('.')
  value = cfg[section][name]
  assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('key, raw', [
    ('model.num_layers', 'abc'),
    ('model.num_layers', '1.5'),
    ('model.num_layers', 'true'),
    ('optimizer.lr', 'fast'),
    ('log.tensorboard', 'maybe'),
    ('log.tensorboard', '2'),
    ('sharding.rules', 'mlp'),       # not a Python literal
    ('sharding.rules', "'mlp'"),     # a literal, but not a tuple
    ('model', '3'),
    ('model.hiden', '3'),
    ('model.hidden.x', '3'),
])
def test_override_rejects(tiny, key, raw):
  cfg = tiny()
  before = cfg.to_dict()
  with pytest.raises(config.ConfigError, match=key.replace('.', r'\.')):
    config.override(cfg, key, raw)
  assert cfg.to_dict() == before


def test_unknown_key_suggests_the_closest(tiny):
  with pytest.raises(config.ConfigError, match=r'did you mean: model\.hidden'):
    config.override(tiny(), 'model.hiden', '3')


@pytest.mark.parametrize('data, fsdp, model, shape', [
    (-1, 1, 1, (8, 1, 1)),
    (-1, 1, 2, (4, 1, 2)),
    (2, -1, 1, (2, 4, 1)),
    (1, 1, -1, (1, 1, 8)),
    (2, 2, 2, (2, 2, 2)),
])
def test_mesh_shape_fills_minus_one(tiny, data, fsdp, model, shape):
  got = sharding.mesh_shape(tiny(mesh__data=data, mesh__fsdp=fsdp, mesh__model=model), 8)
  assert tuple(got) == ('data', 'stage', 'fsdp', 'context', 'model')
  assert got['stage'] == got['context'] == 1
  assert (got['data'], got['fsdp'], got['model']) == shape


@pytest.mark.parametrize('data, fsdp, model', [
    (3, 1, 1), (-1, -1, 1), (-1, 1, 3), (0, 1, 8), (-2, 1, 4), (4, 1, 4),
])
def test_mesh_shape_rejects(tiny, data, fsdp, model):
  with pytest.raises(config.ConfigError, match='mesh'):
    sharding.mesh_shape(tiny(mesh__data=data, mesh__fsdp=fsdp, mesh__model=model), 8)


@pytest.mark.parametrize('model_axis, padded', [(1, 50304), (2, 50432), (4, 50688), (8, 51200)])
def test_padded_vocab_follows_megatron(model_axis, padded):
  # GPT-2's 50257 ids to a multiple of 128 x model axis: Megatron-LM's make-vocab-size-divisible-by.
  assert runtime.padded_vocab(config.load('gpt_345m').model, model_axis) == padded


def test_padded_vocab_with_padding_off(tiny):
  assert runtime.padded_vocab(tiny(model__vocab_multiple=0).model, 1) == 257


@pytest.mark.parametrize('overrides', [
    dict(log__every=0),                                           # ZeroDivisionError in the loop
    dict(data__batch_size=0),                                     # trains on empty batches, nan
    dict(data__batch_size=-8),                                    # -8 % 8 == 0
    dict(model__hidden=100, mesh__data=1, mesh__fsdp=8),          # IndivisibleError at init
    dict(sharding__rules="(('mlp', 1),)"),                        # TypeError, not ConfigError
], ids=['log.every=0', 'batch_size=0', 'batch_size=-8', 'hidden%fsdp', 'rule axis 1'])
def test_setup_rejects(tiny, overrides):
  with pytest.raises(config.ConfigError):
    train.setup(tiny(**overrides))  # validates and builds abstract shapes; compiles nothing


def test_config_path_from_another_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config.config_path('gpt_8b.py') == config.CONFIG_DIR / 'gpt_8b.py'
  assert config.config_path('gpt_8b') == config.CONFIG_DIR / 'gpt_8b.py'
  cfg = config.load('gpt_8b.py')
  assert cfg.name == 'gpt_8b' and cfg.model.num_layers == 72
  # A file given by path is loaded as it is, wherever it lives.
  (tmp_path / 'mine.py').write_text(
      'from shardlm.config import defaults\n\n'
      'def get_config():\n  c = defaults()\n  c.model.hidden = 64\n  return c\n')
  mine = config.load(str(tmp_path / 'mine.py'))
  assert mine.name == 'mine' and mine.model.hidden == 64
  with pytest.raises(config.ConfigError, match='did you mean: gpt_8b'):
    config.config_path('gpt8b')


# Config files are held to the same standard as the command line.

CONFIG_FILES = {
    'typo in a key': ('c.model.update(num_layer=72)',
                      ["'model.num_layer'", 'did you mean: model.num_layers']),
    'unknown section': ('c.modle = config_dict.ConfigDict({"hidden": 3})', ["'modle.hidden'"]),
    'syntax error': ('c.model.hidden = (', ['fails to load', 'line 8', 'SyntaxError']),
    'exception in get_config': ('c.model.hidden = 1 // 0', ['fails to load', 'line 8', 'ZeroDivisionError']),
    'wrong type': ("c.model.hidden = 'big'", ['fails to load', 'TypeError']),
    'added axis no rule uses': ('c.mesh.modle = 2', ['mesh.modle', 'did you mean mesh.model']),
}


@pytest.mark.parametrize('line, expected', CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_a_bad_config_file_exits_2_with_one_line(line, expected, tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('from ml_collections import config_dict  # noqa: F401\n\n'
                  'from shardlm.config import defaults\n\n\n'
                  f'def get_config():\n  c = defaults()\n  {line}\n  return c\n')
  check_rejected(f'--config {path}', expected, tmp_path)


def test_a_config_file_typo_in_process(tmp_path):
  (tmp_path / 'typo.py').write_text('from shardlm.config import defaults\n\n\ndef get_config():\n'
                                    '  c = defaults()\n  c.model.update(num_layer=72)\n  return c\n')
  with pytest.raises(config.ConfigError, match=r"'model\.num_layer'.*did you mean: model\.num_layers"):
    config.load(str(tmp_path / 'typo.py'))


def test_a_window_as_long_as_the_sequence_is_flagged(tiny, capsys):
  train.setup(tiny(model__attention='local', model__window=128))
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('shardlm: warning: model.window=128 >= model.seq_len=128')
  train.setup(tiny(model__attention='local', model__window=64))
  assert capsys.readouterr().err == ''


def cli_error(main, args, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    main(args)
  assert e.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert lines and lines[-1].startswith('shardlm: error: '), lines
  return '\n'.join(lines)


@pytest.mark.parametrize('args, expected', [
    (['--temperature', 'nan'], '--temperature nan'),
    (['--temperature', '-1'], '--temperature -1.0'),
    (['--temperature', 'inf'], '--temperature inf'),
    (['--top-p', 'nan'], '--top-p nan'),
    (['--top-p', '0'], '--top-p 0.0'),
    (['--max-tokens', '-3'], '--max-tokens -3'),
    (['--temperature', 'warm'], "argument --temperature: invalid float value: 'warm'"),
])
def test_generate_checks_its_numbers_before_loading(args, expected, tmp_path, capsys):
  from shardlm import generate
  # The checkpoint does not exist: the numbers are refused before anything is loaded.
  err = cli_error(generate.main, ['--checkpoint', str(tmp_path / 'none'), '--prompt', 'x', *args], capsys)
  assert expected in err and err.count('\n') == 0


def test_generate_refuses_an_empty_prompts_file(tmp_path, capsys):
  from shardlm import generate
  (tmp_path / 'prompts.txt').write_text('\n\n  \n')
  err = cli_error(generate.main, ['--checkpoint', str(tmp_path / 'none'),
                                  '--prompts', str(tmp_path / 'prompts.txt')], capsys)
  assert 'holds no prompt' in err and err.count('\n') == 0


def test_evaluate_flags_an_explicit_stride_0_and_refuses_empty_data(tmp_path, capsys):
  from shardlm import evaluate
  (tmp_path / 'empty.txt').write_text('')
  err = cli_error(evaluate.main, ['--checkpoint', str(tmp_path / 'none'), '--task', 'ppl',
                                  '--data', str(tmp_path / 'empty.txt'), '--stride', '0'], capsys)
  warning, error = err.splitlines()
  assert warning.startswith('shardlm: warning: --stride 0') and 'is empty' in error
