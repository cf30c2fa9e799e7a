"""Tokenizers and preprocessing: identical files for any worker count, every document round-trips."""
import gzip
import io
import json
import multiprocessing
import os
import random
import time
import tracemalloc

import numpy as np
import pytest
import zstandard

from shardlm.data import indexed, preprocess, sources, tokenizer
from shardlm.errors import ConfigError

WORDS = ['alpha', 'beta', 'γάμμα', 'δέλτα', '€uro', 'naïve', '日本語', '🙂', 'x' * 40, '\n', '  ', '"q"',
         '\\', 'tab\t', 'def f(x):', 'return', '{', '}']


def make_docs(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  docs = [''.join(rng.choice(WORDS) + rng.choice([' ', '', '\n']) for _ in range(rng.randint(0, 80)))
          for _ in range(n)]
  docs[3] = ''  # an empty document still ends in the end-of-document token
  return docs


def write_jsonl(path, docs, key='text'):
  data = ''.join(json.dumps({key: d, 'id': i}) + '\n' for i, d in enumerate(docs)).encode()
  if path.suffix == '.gz':
    data = gzip.compress(data)
  elif path.suffix == '.zst':
    data = zstandard.ZstdCompressor().compress(data)
  path.write_bytes(data)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Three JSONL files (plain, gzip, zstd) and the documents in corpus order."""
  d = tmp_path_factory.mktemp('corpus')
  docs = []
  for i, name in enumerate(['a.jsonl', 'b.jsonl.gz', 'c.jsonl.zst']):
    part = make_docs(400, seed=i)
    write_jsonl(d / name, part)
    docs += part
  return d, docs


@pytest.fixture(scope='module')
def bpe(tmp_path_factory, corpus):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  return tokenizer.train_bpe(iter(corpus[1]), 400, path, min_frequency=1)


def check_round_trip(prefix, tok, docs):
  ds = indexed.IndexedDataset(prefix)
  assert len(ds) == len(docs) and ds.vocab_size == tok.vocab_size
  for i, doc in enumerate(docs):
    ids = ds[i]
    np.testing.assert_array_equal(ids[:-1], tok.encode(doc), err_msg=f'document {i}')
    assert ids[-1] == tok.eod_id
  return ds


@pytest.mark.parametrize('kind', ['byte', 'bpe'])
def test_two_workers_write_the_same_bytes_and_every_document_round_trips(
    kind, corpus, bpe, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'CHUNK_DOCS', 37)  # many chunks in flight, finished out of order
  d, docs = corpus
  name = 'byte' if kind == 'byte' else bpe.name
  tok = tokenizer.get_tokenizer(name)
  # The input order is the order given, each glob sorted: a, b.gz, c.zst.
  inputs = sources.Corpus(sources.expand([str(d / '*.jsonl*')]))
  s1 = preprocess.preprocess(inputs, tmp_path / 'one', name, workers=1)
  # Worker processes start at once, as if a core were idle, and the parent (two threads) is slow,
  # so that they take over part of the corpus from it: the parent's parse is patched, theirs is not.
  monkeypatch.setattr(sources, 'cpu_count', lambda: 2)
  monkeypatch.setattr(preprocess, '_PROBE_SECONDS', 0)
  monkeypatch.setattr(preprocess, '_idle_cpus', lambda t0, cpu0: 1.0)
  parse, in_parent = sources.parse, []

  def slow_parse(chunk):
    in_parent.append(1)
    time.sleep(1 if kind == 'bpe' else 0)
    return parse(chunk)
  monkeypatch.setattr(sources, 'parse', slow_parse)
  monkeypatch.setenv('TOKENIZERS_PARALLELISM', 'true')
  s2 = preprocess.preprocess(inputs, tmp_path / 'two', name, workers=2)
  assert os.environ['TOKENIZERS_PARALLELISM'] == 'true'  # off only while the parent's threads encode
  assert s1.documents == s2.documents == len(docs) and s1.tokens == s2.tokens
  for ext in ('.bin', '.idx'):
    assert (tmp_path / f'one{ext}').read_bytes() == (tmp_path / f'two{ext}').read_bytes()
  chunks = -(-400 // 37) * 3
  if kind == 'byte':  # faster inline than sent anywhere: no worker process
    assert s2.workers == 1 and len(in_parent) == chunks
  else:
    assert s2.workers == 2 and 0 < len(in_parent) < chunks, (len(in_parent), chunks)
  ds = check_round_trip(tmp_path / 'two', tok, docs)
  assert ds.dtype == np.uint16  # 257 (byte) and 400 (BPE) ids both need 16 bits
  assert ds.num_tokens == s1.tokens == sum(len(tok.encode(x)) + 1 for x in docs)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['one.bin', 'one.idx', 'two.bin', 'two.idx']


def test_workers_start_only_when_a_core_is_idle(corpus, bpe, tmp_path, monkeypatch):
  """The parent works alone first; with no idle core then, no worker process ever starts."""
  d, docs = corpus
  inputs = sources.Corpus(sources.expand([str(d / '*.jsonl*')]))
  monkeypatch.setattr(sources, 'CHUNK_DOCS', 37)
  monkeypatch.setattr(preprocess, '_PROBE_SECONDS', 0)
  idle = []
  monkeypatch.setattr(preprocess, '_idle_cpus', lambda t0, cpu0: idle.append(1) or 0.5)
  s = preprocess.preprocess(inputs, tmp_path / 'o', bpe.name, workers=2)
  assert s.workers == 1 and s.documents == len(docs) and len(idle) == -(-400 // 37) * 3
  monkeypatch.setattr(preprocess, '_PROBE_SECONDS', 3600)  # a short job: never even asked
  idle.clear()
  assert preprocess.preprocess(inputs, tmp_path / 'o', bpe.name, workers=2).workers == 1 and not idle


@pytest.mark.parametrize('workers', [1, 2])
def test_a_bad_document_stops_threads_and_workers_and_leaves_nothing(workers, bpe, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'CHUNK_DOCS', 5)
  monkeypatch.setattr(preprocess, '_PROBE_SECONDS', 0)
  monkeypatch.setattr(preprocess, '_idle_cpus', lambda t0, cpu0: 1.0)
  write_jsonl(tmp_path / 'c.jsonl', make_docs(100, seed=3))
  with open(tmp_path / 'c.jsonl', 'a') as f:
    f.write('{"text": oops}\n' + '\n'.join(
        json.dumps({'text': d}) for d in make_docs(100, seed=4)) + '\n')
  with pytest.raises(ConfigError, match='c.jsonl:101: invalid JSON'):
    preprocess.preprocess(sources.Corpus([tmp_path / 'c.jsonl']), tmp_path / 'o', bpe.name, workers)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['c.jsonl']
  assert multiprocessing.active_children() == []


def test_byte_level_bpe_is_lossless_and_the_cli_trains_one(corpus, tmp_path, capsys):
  d, docs = corpus
  out = tmp_path / 'tok.json'
  tokenizer.main(['train', '--input', str(d / 'a.jsonl'), '--vocab-size', '300', '--out', str(out)])
  assert 'wrote' in capsys.readouterr().out
  tok = tokenizer.get_tokenizer(str(out))
  assert tok.vocab_size == 300 and tok.special_ids['eod'] == tok.eod_id
  assert tok.decode(tok.encode('<|endoftext|>')) == '<|endoftext|>'  # the special is one id
  assert list(tok.encode('<|endoftext|>')) == [tok.eod_id]
  for doc in docs[:50]:
    assert tok.decode(tok.encode(doc)) == doc
  (tmp_path / 'tokenizer.json').write_bytes(out.read_bytes())
  assert tokenizer.get_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint


def test_wordpiece_keeps_bert_specials_and_ends_documents_with_sep(tmp_path):
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  vocab = {t: i for i, t in enumerate(specials + ['the', 'cat', 'sat', 'on', 'mat', '##s', '.'])}
  wp = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  wp.normalizer = normalizers.BertNormalizer(lowercase=True)
  wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  wp.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]',
                                                    special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
  wp.add_special_tokens(specials)
  wp.save(str(tmp_path / 'bert.json'))
  tok = tokenizer.get_tokenizer(str(tmp_path / 'bert.json'))
  assert tok.special_ids == {'pad': 0, 'cls': 2, 'sep': 3, 'mask': 4, 'eod': 3}
  assert tok.vocab()[10] == '##s' and len(tok.vocab()) == tok.vocab_size == 12
  # No [CLS] ... [SEP] around each document: preprocessing appends the end-of-document id itself.
  assert list(tok.encode('The cats sat on the mat.')) == [5, 6, 10, 7, 8, 5, 9, 11]
  (tmp_path / 'c.txt').write_text('The cats sat.\n\nOn the mat.\n')
  preprocess.preprocess(sources.Corpus([tmp_path / 'c.txt'], text_docs='paragraph'), tmp_path / 'o',
                        str(tmp_path / 'bert.json'))
  ds = indexed.IndexedDataset(tmp_path / 'o')
  assert [list(ds[i]) for i in range(len(ds))] == [[5, 6, 10, 7, 11, 3], [8, 5, 9, 11, 3]]


def test_sentencepiece_model_and_a_one_byte_dtype(tmp_path):
  import sentencepiece as spm
  docs = make_docs(200, seed=7)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(d for d in docs if d.strip()),
                                 model_writer=model, vocab_size=100, minloglevel=2,
                                 character_coverage=1.0)
  (tmp_path / 'sp.model').write_bytes(model.getvalue())
  tok = tokenizer.get_tokenizer(str(tmp_path / 'sp.model'))
  assert tok.vocab_size == 100 and tok.eod_id == 2  # sentencepiece's </s>
  assert tok.vocab()[2] == '</s>' and len(tok.vocab()) == 100
  write_jsonl(tmp_path / 'in.jsonl', docs)
  preprocess.preprocess(sources.Corpus([tmp_path / 'in.jsonl']), tmp_path / 'o', str(tmp_path / 'sp.model'))
  ds = check_round_trip(tmp_path / 'o', tok, docs)
  assert ds.dtype == np.uint8 and (tmp_path / 'o.bin').stat().st_size == ds.num_tokens


def test_text_files_as_files_lines_or_paragraphs(tmp_path):
  (tmp_path / 'x.txt').write_text('one\ntwo\n\n\nthree\nfour\n')
  (tmp_path / 'y.txt.gz').write_bytes(gzip.compress(b'five\n'))
  files = sources.expand([str(tmp_path / 'x.txt'), str(tmp_path)])  # the folder repeats x.txt
  assert [f.name for f in files] == ['x.txt', 'y.txt.gz']
  tok = tokenizer.ByteTokenizer()
  expected = {'file': ['one\ntwo\n\n\nthree\nfour\n', 'five\n'],
              'line': ['one', 'two', 'three', 'four', 'five'],
              'paragraph': ['one\ntwo', 'three\nfour', 'five']}
  for mode, docs in expected.items():
    preprocess.preprocess(sources.Corpus(files, text_docs=mode), tmp_path / mode)
    check_round_trip(tmp_path / mode, tok, docs)


def test_memory_does_not_grow_with_the_corpus(tmp_path):
  # 24 MB of JSONL through the byte tokenizer: the peak of Python allocations stays near one
  # chunk (1 MB of text, as 2-byte tokens and their copies), not the corpus size.
  line = json.dumps({'text': 'lorem ipsum dolor sit amet ' * 37}) + '\n'
  with open(tmp_path / 'big.jsonl', 'w') as f:
    for _ in range(24):
      f.write(line * (1_000_000 // len(line)))
  tracemalloc.start()
  try:
    s = preprocess.preprocess(sources.Corpus([tmp_path / 'big.jsonl']), tmp_path / 'o')
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert s.text_bytes > 23e6
  assert peak < 12e6, f'peak {peak / 1e6:.1f} MB for {s.text_bytes / 1e6:.0f} MB of text'


def test_token_dtype_is_the_smallest_that_holds_the_vocabulary():
  assert [indexed.token_dtype(v).name for v in (2, 256, 257, 65536, 65537, 2 ** 32)] == \
      ['uint8', 'uint8', 'uint16', 'uint16', 'uint32', 'uint32']
  assert indexed.token_dtype(300, 'uint32').name == 'uint32'
