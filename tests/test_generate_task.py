"""`evaluate --task generate`: its metrics are the libraries' own, on the outputs it wrote."""
import json
import re

import jax
import numpy as np
import pytest
import sacrebleu
from conftest import params_checkpoint
from rouge_score import rouge_scorer

from shardlm import config, evaluate, generate, inference, metrics, runtime

HYPS = ['The cat sat on the mat.', 'A quick brown fox jumps over dogs. It was not amused.',
        'Returns the list of files.', 'nothing in common here',
        'Open the file. Read every line. Close it.', 'The dog ran home. The cat sat down.',
        'Home, home, run. Home!']
REFS = ['The cat sat on the mat.', 'The quick brown fox jumped over the lazy dog. The dog was amused.',
        'Return a list of the files in a directory.', 'An entirely different sentence.',
        'Open the file and read each line. Then close the file. Return the lines.',
        'The cat sat down. The dog ran home.', 'Run, run home. Go, go home.']


def direct(hyps, refs):
  """The numbers as a user computes them with the libraries, reference first for ROUGE."""
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL', 'rougeLsum'], use_stemmer=True)
  rouge = {t: [] for t in ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')}
  for h, r in zip(hyps, refs):
    for t, s in scorer.score(r, h).items():
      if t != 'rougeLsum':
        rouge[t].append(s.fmeasure)
    # rougeLsum wants one sentence per line: a newline after each . ! or ?
    split = [re.sub(r'(?<=[.!?])\s+', '\n', text) for text in (r, h)]
    rouge['rougeLsum'].append(scorer.score(*split)['rougeLsum'].fmeasure)
  return {'bleu': sacrebleu.corpus_bleu(hyps, [refs]).score,
          'chrf': sacrebleu.corpus_chrf(hyps, [refs]).score,
          **{t: 100 * np.mean(v) for t, v in rouge.items()},
          'exact': 100 * np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs)])}


def test_scores_equal_direct_sacrebleu_and_rouge_score_calls():
  got = metrics.score(HYPS, REFS, metrics.METRICS)
  want = direct(HYPS, REFS)
  for name, value in want.items():
    assert got[name] == pytest.approx(value, abs=1e-9), name
  assert 0 < got['bleu'] < 100 and got['exact'] == pytest.approx(100 / 7)
  # Sentences in another order: one common subsequence for rougeL, all of them for rougeLsum.
  assert got['rougeLsum'] != pytest.approx(got['rougeL'])
  signature = f'nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}'
  assert got['bleu_signature'] == signature
  # Reference first matters: rougeLsum's summary-level LCS is not symmetric (the last pair).
  assert metrics.score(REFS, HYPS, ['rouge'])['rougeLsum'] != pytest.approx(got['rougeLsum'])


def test_sentences_one_per_line():
  assert metrics.sentences('One. Two!  Three? four\nFive') == 'One.\nTwo!\nThree?\nfour\nFive'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  cfg = config.load('tiny')
  for key, value in dict(model__num_layers=1, model__seq_len=32).items():
    config.override(cfg, key.replace('__', '.'), str(value))
  return params_checkpoint(tmp_path_factory.mktemp('gen') / 'params', runtime.build(cfg, jax.devices()[:1]))


def test_generate_task_end_to_end(checkpoint, tmp_path, capsys):
  """Batched outputs equal each prompt decoded alone; the printed metrics equal the libraries'
  on the outputs written to --out."""
  prompts = ['def f(x):\n    ret', 'import o', 'class A:\n  de']
  m = inference.load(checkpoint, devices=jax.devices()[:1])
  gen = generate.Generator(m.rt, m.params, m.tokenizer.eod_id)
  alone = [m.tokenizer.decode(gen([m.tokenizer.encode(p)], 8)[0]).strip() for p in prompts]
  assert all(alone)
  # References: one the output itself (an exact hit), one that shares part of it, one unrelated.
  refs = [alone[0], alone[1] + ' and more.', 'Create an A.']
  data = tmp_path / 'test.jsonl'
  data.write_text(''.join(json.dumps({'prompt': p, 'completion': r}) + '\n' for p, r in zip(prompts, refs)))
  out = tmp_path / 'gen.jsonl'
  evaluate.main(['--checkpoint', str(checkpoint), '--task', 'generate', '--data', str(data),
                 '--metrics', 'bleu,chrf,rouge,exact', '--max-tokens', '8', '--batch-size', '2',
                 '--out', str(out), '--config.mesh.model=1'])
  printed = json.loads(capsys.readouterr().out)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['prompt'] for r in rows] == prompts and [r['reference'] for r in rows] == refs
  hyps = [r['output'] for r in rows]
  assert hyps == alone
  want = direct(hyps, refs)
  for name, value in want.items():
    assert printed[name] == pytest.approx(value, abs=1e-9), name
  # (BLEU is 0: a tiny random model's outputs are one repeated byte, one word, no 4-grams.)
  assert printed['exact'] == pytest.approx(100 / 3) and printed['chrf'] > 0 and printed['rouge1'] > 0
  assert printed['examples'] == 3 and printed['max_tokens'] == 8
  assert printed['bleu_signature'].startswith('nrefs:1|case:mixed|eff:no|tok:13a')
  # n-gram blocking: the repeated byte is refused once its bigram has been written.
  ids = m.tokenizer.encode(prompts[0])
  plain, blocked = gen([ids], 12)[0].tolist(), gen([ids], 12, no_repeat_ngram=2)[0].tolist()
  bigrams = list(zip(blocked, blocked[1:]))
  assert len(set(bigrams)) == len(bigrams) and len(set(zip(plain, plain[1:]))) < len(plain) - 1


def test_mbr_pick_is_the_candidate_of_highest_total_rouge_l_against_the_others():
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  for candidates in (['a dog ran home', 'the cat sat', 'the cat sat on the mat', 'cats sitting down'],
                     ['Return the files.', 'Returns a list of files.', 'Open a file.', 'List files.'],
                     ['one', 'two', 'three'], ['x y', 'a b', 'a b', 'a c']):
    total = [sum(scorer.score(o, c)['rougeL'].fmeasure for j, o in enumerate(candidates) if j != i)
             for i, c in enumerate(candidates)]
    assert metrics.mbr_pick(candidates) == int(np.argmax(total))  # argmax: the first of a tie
  assert metrics.mbr_pick(['a dog ran home', 'the cat sat', 'the cat sat on the mat']) == 1
  assert metrics.mbr_pick(['one', 'two', 'three']) == 0 and metrics.mbr_pick(['only']) == 0
  assert metrics.mbr_pick(['x y', 'a b', 'a b', 'a c']) == 1  # a repeated candidate counts twice


def test_generate_task_with_mbr_keeps_each_prompts_pick_of_greedy_and_samples(checkpoint, tmp_path,
                                                                                capsys):
  prompts = ['def f(x):\n    ret', 'import o', 'class A:\n  de']
  data = tmp_path / 'test.jsonl'
  data.write_text(''.join(json.dumps({'prompt': p, 'completion': 'Return x.'}) + '\n' for p in prompts))
  out = tmp_path / 'gen.jsonl'
  evaluate.main(['--checkpoint', str(checkpoint), '--task', 'generate', '--data', str(data),
                 '--metrics', 'rouge', '--max-tokens', '6', '--batch-size', '2', '--temperature', '1.5',
                 '--seed', '5', '--mbr', '3', '--no-repeat-ngram', '2', '--out', str(out),
                 '--config.mesh.model=1'])
  printed = json.loads(capsys.readouterr().out)
  hyps = [json.loads(line)['output'] for line in out.read_text().splitlines()]
  m = inference.load(checkpoint, devices=jax.devices()[:1])
  gen = generate.Generator(m.rt, m.params, m.tokenizer.eod_id)
  ids = [m.tokenizer.encode(p) for p in prompts]
  runs = [generate.in_batches(gen, ids, 2, 6, no_repeat_ngram=2, **kw)  # blocked as every candidate
          for kw in [{}] + [dict(temperature=1.5, seed=5 + k) for k in (1, 2, 3)]]
  eod = m.tokenizer.eod_id
  candidates = [[m.tokenizer.decode(run[i][:-1] if run[i][-1] == eod else run[i]).strip()
                 for run in runs] for i in range(3)]
  picks = [metrics.mbr_pick(c) for c in candidates]
  assert hyps == [c[k] for c, k in zip(candidates, picks)]
  assert any(c[k] != c[0] for c, k in zip(candidates, picks))  # a sample kept, not the greedy one
  assert printed['mbr'] == 3 and printed['generated_tokens'] == sum(len(t) for r in runs for t in r)
  assert printed['mbr_greedy_kept'] == sum(c[k] == c[0] for c, k in zip(candidates, picks))
  assert printed['rougeL'] == pytest.approx(metrics.score(hyps, ['Return x.'] * 3, ['rouge'])['rougeL'])


def test_repeated_ngrams_are_the_tokens_that_would_repeat_one():
  banned = generate.repeated_ngrams([[5, 6, 5], [5, 6, 7, 5, 6], [], [4]], 3, 10)
  assert [np.flatnonzero(b).tolist() for b in banned] == [[], [7], [], []]
  banned = generate.repeated_ngrams([[5, 6, 5], [1, 2, 1, 2]], 2, 10)  # after 5 not 6; after 2 not 1
  assert [np.flatnonzero(b).tolist() for b in banned] == [[6], [1]]
  assert np.flatnonzero(generate.repeated_ngrams([[3, 1, 3]], 1, 5)[0]).tolist() == [1, 3]


def cli_error(args, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    evaluate.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith('shardlm: error: '), err
  return err


GOOD = '{"prompt": "a", "completion": "b"}'


@pytest.mark.parametrize('line, expected', [
    ('{"prompt": "a", "completion": ', 'not JSON'),
    ('["a", "b"]', 'a JSON list, not an object'),
    ('{"prompt": "a", "answer": "b"}', "no \"completion\" key (it has 'prompt', 'answer')"),
    ('{"text": "a"}', 'no "prompt" key'),
    ('{"prompt": 3, "completion": "b"}', '"prompt" is a JSON int, not a string'),
    ('{"prompt": "a", "completion": "  "}', 'empty "completion"'),
    ('{"prompt": "", "completion": "b"}', 'empty "prompt"'),
])
def test_a_bad_line_names_file_and_line_and_writes_nothing(line, expected, tmp_path, capsys):
  data = tmp_path / 'test.jsonl'
  data.write_text(f'{GOOD}\n\n{line}\n{GOOD}\n')
  err = cli_error(['--checkpoint', str(tmp_path / 'none'), '--task', 'generate', '--data', str(data),
                   '--out', str(tmp_path / 'gen.jsonl')], capsys)
  assert f'{data}:3: {expected}' in err
  assert 'each line is one JSON object {"prompt": "...", "completion": "..."}' in err or 'empty' in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['test.jsonl']


@pytest.mark.parametrize('args, expected', [
    (['--metrics', 'bleu,meteor'], "--metrics 'bleu,meteor': no metric 'meteor'; give a comma-separated "
                                   'list of bleu, chrf, rouge, exact'),
    (['--out', '/nonexistent/gen.jsonl'], '--out /nonexistent/gen.jsonl: no directory /nonexistent'),
    (['--temperature', '-1'], '--temperature -1.0 must be'),
    (['--no-repeat-ngram', '-1'], '--no-repeat-ngram -1 must be >= 0 (0: off)'),
    (['--mbr', '8'], '--mbr 8: its samples need --temperature > 0 (0.7 is a good start)'),
    (['--mbr', '-1', '--temperature', '0.7'], '--mbr -1 must be 0 (off) or >= 2'),
    (['--mbr', '1', '--temperature', '0.7'], '--mbr 1 must be 0 (off) or >= 2'),
    (['--mbr', '2', '--temperature', '0.7', '--seed', str(2**63 - 2)], 'seeds must fit in 64 bits'),
])
def test_bad_flags_are_refused_before_loading(args, expected, tmp_path, capsys):
  data = tmp_path / 'test.jsonl'
  data.write_text(GOOD + '\n')
  err = cli_error(['--checkpoint', str(tmp_path / 'none'), '--task', 'generate', '--data', str(data),
                   *args], capsys)
  assert expected in err


def test_a_prompt_too_long_for_the_model_names_its_line(checkpoint, tmp_path, capsys):
  data = tmp_path / 'test.jsonl'
  data.write_text(f'{GOOD}\n' + json.dumps({'prompt': 'x' * 40, 'completion': 'y'}) + '\n')
  args = ['--checkpoint', str(checkpoint), '--task', 'generate', '--data', str(data),
          '--out', str(tmp_path / 'gen.jsonl'), '--config.mesh.model=1']
  err = cli_error(args, capsys)
  assert f"{data}:2: a prompt of 40 tokens leaves no room in the model's 32 positions" in err
  data.write_text(f'{GOOD}\n' + json.dumps({'prompt': 'x' * 30, 'completion': 'y'}) + '\n')
  err = cli_error([*args, '--max-tokens', '5'], capsys)
  assert f"{data}:2: a prompt of 30 tokens + --max-tokens 5 exceeds the model's 32 positions" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['test.jsonl']
