"""Fine-tuning: the completion-only loss of packed examples, classification heads, starting from a
pretrained checkpoint, and bad fine-tuning data (one line naming file and line, exit 2)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import params_checkpoint, run_steps
from shardlm import kinds, train
from shardlm.data import tasks
from shardlm.data.tokenizer import ByteTokenizer
from shardlm.model import gpt, heads

TOK = ByteTokenizer()
EXAMPLES = [{'prompt': 'def add(a, b):', 'completion': ' return a + b'},
            {'prompt': 'x = ', 'completion': '1'},
            {'prompt': 'import ', 'completion': 'os'}]


def write_jsonl(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  return str(path)


def sft(tiny, tmp_path, **overrides):
  cfg = tiny(**{'model.kind': 'gpt_sft', 'data.train_jsonl': write_jsonl(tmp_path / 'sft.jsonl', EXAMPLES),
                'model.seq_len': 48, **overrides})
  return cfg, train.setup(cfg, jax.devices()[:1])


def examples(rows, form='completion'):
  return [{**r, '_form': form, '_where': f'x:{n}'} for n, r in enumerate(rows, 1)]


def batch_of(packed):
  return {k: jnp.asarray(v) for k, v in packed.items()}


def test_sft_loss_is_the_hand_computed_mean_over_completion_tokens(tiny, tmp_path):
  cfg, t = sft(tiny, tmp_path)
  params = t.rt.init_params(0)
  packed = tasks.pack_sft(examples(EXAMPLES), TOK, 48, 'error')
  assert packed['tokens'].shape[0] == 1  # all three fit one row of 49 tokens
  loss, _ = jax.jit(t.rt.objective)(params, batch_of(packed))
  # By hand: each example alone from position 0, log-softmax of its logits, the completion's
  # tokens and end-of-document predicted, summed and divided by their count.
  total, count = 0.0, 0
  for ex in EXAMPLES:
    p, c = TOK.encode(ex['prompt']), [*TOK.encode(ex['completion']), TOK.eod_id]
    ids = np.asarray([*p, *c], np.int32)
    logits = np.asarray(t.rt.apply(params, jnp.asarray(ids[None, :-1])))[0, :, :TOK.vocab_size]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    for t_ in range(len(p) - 1, len(ids) - 1):
      total -= logp[t_, ids[t_ + 1]]
      count += 1
  assert count == int(packed['weights'].sum())
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-6)


def test_no_gradient_reaches_a_prompt_position(tiny, tmp_path):
  cfg, t = sft(tiny, tmp_path)
  packed = tasks.pack_sft(examples(EXAMPLES), TOK, 48, 'error')
  params = t.rt.init_params(0)
  logits = t.rt.apply(params, jnp.asarray(packed['tokens'][:, :-1]),
                      segments_bt=jnp.asarray(packed['segments'][:, :-1]))
  g = jax.grad(lambda x: gpt.lm_loss(x, packed['tokens'][:, 1:], cfg.model.vocab_size,
                                     packed['weights']))(logits)
  touched = np.abs(np.asarray(g)).sum(-1) > 0  # [1, T]: which positions' logits get a gradient
  np.testing.assert_array_equal(touched, packed['weights'] > 0)
  assert 0 < touched.sum() < touched.size


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(tiny, tmp_path):
  cfg, t = sft(tiny, tmp_path, **{'data.batch_size': 2})
  params = t.rt.init_params(0)
  two = examples(EXAMPLES[:2])
  packed = tasks.pack_sft(two, TOK, 48, 'error')             # one row holding both
  alone = [tasks.pack_sft([e], TOK, 48, 'error') for e in two]  # a row each
  unpacked = {k: np.concatenate([a[k] for a in alone]) for k in packed}
  packed = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in packed.items()}  # + an empty row
  packed['tokens'][1] = TOK.eod_id
  assert packed['tokens'].shape == unpacked['tokens'].shape == (2, 49)
  (l1, g1), (l2, g2) = t.grads(params, batch_of(packed)), t.grads(params, batch_of(unpacked))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_changing_one_packed_example_leaves_the_others_losses(tiny, tmp_path):
  cfg, t = sft(tiny, tmp_path)
  params = t.rt.init_params(0)

  def nll(rows):
    p = tasks.pack_sft(examples(rows), TOK, 48, 'error')
    logits = t.rt.apply(params, jnp.asarray(p['tokens'][:, :-1]),
                        segments_bt=jnp.asarray(p['segments'][:, :-1]))
    return np.asarray(gpt.token_nll(logits, p['tokens'][:, 1:], cfg.model.vocab_size)), p
  before, p = nll(EXAMPLES)
  after, q = nll([EXAMPLES[0], {'prompt': 'y = ', 'completion': '2'}, EXAMPLES[2]])
  np.testing.assert_array_equal(p['segments'], q['segments'])
  for seg in (1, 3):  # the first and third examples: bitwise the same losses at every position
    where = (p['segments'][0, :-1] == seg) & (p['segments'][0, 1:] == seg)  # whose target is theirs
    np.testing.assert_array_equal(before[0][where], after[0][where])
  assert not np.array_equal(before[0][p['segments'][0, :-1] == 2], after[0][p['segments'][0, :-1] == 2])


def test_truncation_keeps_the_completion(tiny):
  long = examples([{'prompt': 'p' * 60, 'completion': 'abc'}])
  with pytest.raises(tasks.ConfigError, match=r'x:1: 64 tokens, more than model.seq_len \+ 1 = 49'):
    tasks.pack_sft(long, TOK, 48, 'error')
  cut = tasks.pack_sft(long, TOK, 48, 'truncate')
  assert bytes(cut['tokens'][0, -4:-1].astype(np.uint8)) == b'abc' and cut['weights'].sum() == 4


def classify_data(tmp_path, n=16):
  rows = [{'text': ('yes ' if i % 2 else 'no ') * 3, 'label': 'pos' if i % 2 else 'neg'} for i in range(n)]
  return write_jsonl(tmp_path / 'cls.jsonl', rows)


@pytest.mark.parametrize('kind', ['gpt_cls'])  # BERT's head: the multiple-choice test below
def test_classifiers_equal_on_megatron_and_one_device(tiny, tmp_path, kind):
  over = {'model.kind': kind, 'data.train_jsonl': classify_data(tmp_path), 'model.seq_len': 16,
          'data.labels': "('neg', 'pos')", 'data.batch_size': 8, 'model.dropout': 0.1}
  cfg = tiny(**over)
  data, batches, _ = kinds.get(kind).batches(cfg, TOK)
  one = run_steps(cfg, jax.devices()[:1], batch=batches.global_batch)[2]
  many = run_steps(tiny(**over, **{'sharding.preset': 'megatron', 'mesh.model': 4}),
                   batch=batches.global_batch)[2]
  np.testing.assert_allclose(many['loss'], one['loss'], rtol=1e-5)
  np.testing.assert_allclose(many['accuracy'], one['accuracy'])


def test_a_classifier_starts_from_a_pretrained_gpt(tiny, tmp_path):
  base = tiny()
  path = params_checkpoint(tmp_path / 'gpt', train.setup(base, jax.devices()[:1]).rt)
  cfg = tiny(**{'model.kind': 'gpt_cls', 'data.train_jsonl': classify_data(tmp_path),
                'data.labels': "('neg', 'pos')", 'train.init_from': str(path)})
  t = train.setup(cfg, jax.devices()[:1])
  from shardlm import checkpoint
  params, _, _ = checkpoint.restore_params(path, t.rt.target())
  assert 'cls' not in params  # the base's checkpoint: every parameter but the head
  pretrained = train.setup(base, jax.devices()[:1]).rt.init_params(0)
  for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves({k: params[k] for k in pretrained})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BAD = [
    ('gpt_sft', [{'prompt': 'a', 'completion': 'b'}, {'prompt': 'a', 'answer': 'b'}],
     ':2: keys \'prompt\', \'answer\''),
    ('gpt_sft', [{'prompt': 'a', 'completion': 'b'}, {'prompt': 'a', 'completion': '  '}],
     ':2: "completion" is empty'),
    ('gpt_sft', [{'prompt': 'p' * 200, 'completion': 'b'}, {'prompt': 'a', 'completion': 'b'}],
     ":1: 202 tokens, more than model.seq_len + 1 = 33; shorten it or set data.overlong='truncate'"),
    ('gpt_sft', ['{"prompt": "a", "completion": "b"}', '{not json'], ':2: not a JSON object'),
    ('gpt_cls', [{'text': 'a', 'label': 'pos'}, {'text': 'b', 'label': 'maybe'}],
     ':2: label "maybe" is not in data.labels (neg, pos)'),
]


@pytest.mark.parametrize('kind, rows, message', BAD)
def test_bad_fine_tuning_data_is_one_line_naming_file_and_line(tiny, tmp_path, capsys, kind, rows,
                                                               message):
  data = write_jsonl(tmp_path / 'bad.jsonl', rows)
  run_dir = tmp_path / 'run'
  args = ['--config', 'tiny', f'--config.model.kind={kind}', f'--config.data.train_jsonl={data}',
          f'--config.data.valid_jsonl={data}', '--config.model.seq_len=32',
          "--config.data.labels=('neg','pos')", f'--config.train.run_dir={run_dir}']
  with pytest.raises(SystemExit) as e:
    train.main(args)
  assert e.value.code == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f'shardlm: error: {data}') and message in lines[0], lines
  assert not run_dir.exists()


def test_the_heads_are_registered_kinds():
  assert kinds.get('gpt_cls').model is heads.GPTClassifier and kinds.relatives(kinds.get('gpt_cls')) == (
      'gpt', 'gpt_sft')


def test_evaluate_classify_scores_a_classifier_checkpoint(tiny, tmp_path, capsys):
  from shardlm import evaluate, runtime
  cfg = tiny(**{'model.kind': 'gpt_cls', 'data.train_jsonl': classify_data(tmp_path),
                'data.labels': "('neg', 'pos')", 'model.seq_len': 16})
  rt = runtime.build(cfg, jax.devices()[:1])
  ckpt = params_checkpoint(tmp_path / 'cls', rt)
  rows = [{'text': t, 'label': label} for t, label in
          [('yes yes', 'pos'), ('no', 'neg'), ('maybe no', 'neg'), ('yes no yes', 'pos'), ('no no', 'neg')]]
  data = write_jsonl(tmp_path / 'test.jsonl', rows)
  evaluate.main(['--checkpoint', str(ckpt), '--task', 'classify', '--data', data, '--batch-size', '2'])
  out = json.loads(capsys.readouterr().out)
  # the same predictions, made here: the model on each row alone
  batch = tasks.classify_rows(examples(rows, 'single'), TOK, 16, ('neg', 'pos'), False, 'error')
  params = rt.init_params(0)
  pred = np.asarray(jnp.argmax(rt.apply(params, *(jnp.asarray(batch[k]) for k in ('ids', 'types', 'pad')),
                                        method='classify'), -1))
  gold = batch['label']
  f1 = [2 * np.sum((pred == c) & (gold == c)) / (np.sum(pred == c) + np.sum(gold == c))
        for c in set(pred) | set(gold)]
  assert out['examples'] == 5 and out['majority_label'] == 'neg' and out['majority_accuracy'] == 60
  assert out['accuracy'] == pytest.approx(100 * np.mean(pred == gold))
  assert out['macro_f1'] == pytest.approx(100 * np.mean(f1))


def test_the_docstring_demo_reads_code_and_summary():
  from shardlm.data import demos
  source = ('def parse_url(url, strict=True):\n    """Parse a URL into its parts.\n\n    More.\n    """\n'
            '    return url.split("/")\n\n\nclass A:\n  def _helper(self):\n    return 1\n')
  (ex,) = demos.function_examples('m.py', source)  # the helper has no docstring
  assert ex['completion'] == ' Parse a URL into its parts.' and ex['name'] == 'parse_url'
  assert ex['prompt'] == 'def parse_url(url, strict=True):\n    return url.split("/")\n# summary:'
  assert demos.name_baseline('parseURLFrom_http') == 'parse urlfrom http'
  assert demos.name_baseline('_get_user_name') == 'get user name'


@pytest.mark.parametrize('name', ['finetune_docstrings', 'classify_packages', 'bert_glue'])
def test_the_fine_tuning_configs_build(name):
  from shardlm import config
  cfg = config.load(name)
  cfg.train.init_from = ''  # the checkpoint it starts from is the user's to make first
  t = train.setup(cfg, jax.devices()[:1])  # abstract: reads no data, allocates nothing
  assert t.rt.kind.name == cfg.model.kind and t.rt.model_config.dropout == 0.1


def test_multiple_choice_equal_on_megatron_and_one_device(tiny, tmp_path):
  rows = [{'text': 'the answer is yes', 'choices': ['yes', 'no', 'maybe'][:2 + i % 2], 'label': i % 2}
          for i in range(16)]
  over = {'model.kind': 'bert_choice', 'data.train_jsonl': write_jsonl(tmp_path / 'mc.jsonl', rows),
          'model.seq_len': 32, 'data.batch_size': 8, 'model.vocab_size': 261}
  cfg = tiny(**over)
  _, batches, _ = kinds.get('bert_choice').batches(cfg, TOK)
  b = batches.rows(0, 0, 8)
  assert b['ids'].shape == (8, 3, 32) and b['valid'].sum() == 8 * 2 + 4  # half have a 3rd choice
  one = run_steps(cfg, jax.devices()[:1], batch=batches.global_batch)[2]
  many = run_steps(tiny(**over, **{'sharding.preset': 'megatron', 'mesh.model': 4}),
                   batch=batches.global_batch)[2]
  np.testing.assert_allclose(many['loss'], one['loss'], rtol=1e-5)
  with pytest.raises(tasks.ConfigError, match=r'x:1: label 2 is not the index of one of its 2 choices'):
    tasks.choice_rows(examples([{'text': 'a', 'choices': ['b', 'c'], 'label': 2}], 'choice'), TOK, 16,
                      True, 'error')


def test_truncation_and_dialogue_rules():
  # a completion that nearly fills the row: the prompt keeps its last token, so the completion's
  # first token is still predicted; the completion then loses its end
  cut = tasks.pack_sft(examples([{'prompt': 'pq', 'completion': 'c' * 48}]), TOK, 48, 'truncate')
  assert bytes(cut['tokens'][0, :2].astype(np.uint8)) == b'qc' and cut['weights'].sum() == 48
  # pairs lose a token at a time from the longer text: [30, 10] into 20 -> [10, 10]
  rows = tasks.classify_rows(examples([{'text_a': 'a' * 30, 'text_b': 'b' * 10, 'label': 'x'}], 'pair'),
                             TOK, 21, ('x',), False, 'truncate')
  assert bytes(rows['ids'][0].astype(np.uint8)) == b'a' * 10 + b'\n' + b'b' * 10
  talk = [{'_form': 'dialogue', '_where': 'x:1', 'messages': [
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
      {'role': 'user', 'content': 'bye'}]}]
  with pytest.raises(tasks.ConfigError, match="x:1: the last message is not the assistant's"):
    tasks.pack_sft(talk, TOK, 48, 'error')
  ids, trained = tasks.sft_tokens({**talk[0], 'messages': talk[0]['messages'][:2]}, TOK)
  assert bytes(ids[trained][:-1].astype(np.uint8)) == b'hello\n' and ids[-1] == TOK.eod_id


def test_every_dropout_site_draws_its_own_mask(tiny, monkeypatch):
  from shardlm.model import attention, gpt as gpt_model, transformer
  seen = []

  def record(x, rate, key):
    seen.append(np.asarray(jax.random.key_data(key)).tobytes())
    return x
  for module in (attention, gpt_model, transformer):
    monkeypatch.setattr(module, 'dropout', record)
  cfg = tiny(**{'model.dropout': 0.1, 'model.attention_dropout': 0.1, 'model.seq_len': 16})
  t = train.setup(cfg, jax.devices()[:1])
  ids = jnp.zeros((2, 16), jnp.int32)
  with jax.disable_jit():  # eager: the keys are concrete
    for step in (0, 1):
      t.rt.apply(t.rt.init_params(0), ids, key=jax.random.fold_in(jax.random.key(0), step))
  # per step: the embeddings, and 3 sites (attention probabilities, attention and MLP outputs)
  # in each of 4 layers
  assert len(seen) == 2 * (1 + 3 * 4) and len(set(seen)) == len(seen)


def test_a_head_is_drawn_on_the_base_checkpoint(tiny, tmp_path, capsys):
  base = tiny(**{'model.seq_len': 16})
  path = params_checkpoint(tmp_path / 'gpt', train.setup(base, jax.devices()[:1]).rt)
  run_dir = tmp_path / 'run'
  train.main(['--config', 'tiny', '--config.model.kind=gpt_cls', f'--config.train.init_from={path}',
              f'--config.data.train_jsonl={classify_data(tmp_path)}', "--config.data.labels=('neg','pos')",
              '--config.model.seq_len=16', '--config.train.steps=1', '--config.train.eval_batches=1',
              '--config.log.tensorboard=false', f'--config.train.run_dir={run_dir}'])
  out = capsys.readouterr().out
  assert f'initialized: parameters from {path} (gpt); drawn: cls' in out, out
  assert (run_dir / 'checkpoints' / '1').is_dir()
