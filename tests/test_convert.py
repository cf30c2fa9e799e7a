"""Hugging Face interop: shardlm computes what transformers computes from the same weights, and
weights go both ways bit for bit. Models are random (nothing is downloaded), saved by
transformers' own save_pretrained."""
import copy
import json
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from shardlm import checkpoint, config, convert, generate, inference, runtime, train
from shardlm.errors import ConfigError
from shardlm.data.tokenizer import ByteTokenizer, train_bpe

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXT = ['def walk(path):\n    for root, dirs, files in os.walk(path):\n        yield files\n'] * 20


def hf_model(cls, hf_config, seed):
  """A random model whose every weight (LayerNorm scales and biases too) differs from its init."""
  torch.manual_seed(seed)
  model = cls(hf_config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """name -> (directory, model in eval mode), each saved by save_pretrained (safetensors)."""
  root = tmp_path_factory.mktemp('hf')
  train_bpe(iter(TEXT), 280, root / 'tok' / 'tokenizer.json', min_frequency=1)
  tok_json = (root / 'tok' / 'tokenizer.json').read_bytes()
  gpt2 = lambda **k: transformers.GPT2Config(n_layer=2, bos_token_id=0, eos_token_id=0, **k)
  bert = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=32, vocab_size=300)
  specs = {
      'gpt2': (transformers.GPT2LMHeadModel,
               gpt2(n_embd=64, n_head=4, n_positions=32, vocab_size=300)),
      # gpt2-medium's width and heads at 2 layers; vocabulary 1000 pads to 1024 on either mesh
      'gpt2_medium': (transformers.GPT2LMHeadModel,
                      gpt2(n_embd=1024, n_head=16, n_positions=16, vocab_size=1000)),
      'bert_pt': (transformers.BertForPreTraining, transformers.BertConfig(**bert)),
      'bert_mlm': (transformers.BertForMaskedLM, transformers.BertConfig(**bert)),
  }
  out = {}
  for seed, (name, (cls, hf_config)) in enumerate(specs.items()):
    model = hf_model(cls, hf_config, seed)
    model.save_pretrained(root / name)
    if name != 'bert_mlm':  # bert_mlm: a directory without a tokenizer
      (root / name / 'tokenizer.json').write_bytes(tok_json)
    out[name] = (root / name, model)
  # The same GPT-2 stored in bfloat16: converted to float32 and back, bit for bit.
  bf16 = root / 'gpt2_bf16'
  copy.deepcopy(out['gpt2'][1]).to(torch.bfloat16).save_pretrained(bf16)  # .to is in place
  (bf16 / 'tokenizer.json').write_bytes(tok_json)
  out['gpt2_bf16'] = (bf16, None)
  return out


@pytest.fixture(scope='module')
def ckpt(hf, tmp_path_factory):
  """name -> the from-hf checkpoint of hf[name]."""
  root = tmp_path_factory.mktemp('ckpt')
  return {name: convert.from_hf(d, root / name)['path'] for name, (d, _) in hf.items()}


def load_bert(path, n):
  """The checkpoint's model on a mesh model=n (inference.load takes GPTs only)."""
  cfg = config.load('tiny')
  cfg.model.update(checkpoint.read_meta(path)['config']['model'])
  cfg.mesh.update(data=1, model=n)
  rt = runtime.build(cfg, jax.devices()[:n])
  return types.SimpleNamespace(cfg=cfg, rt=rt, params=checkpoint.restore_params(path, rt.target())[0])


def forward(loaded, *args):
  return jax.device_get(jax.jit(loaded.rt.apply)(loaded.params, *args))


@pytest.mark.parametrize('name', ['gpt2', 'gpt2_medium'])
@pytest.mark.parametrize('n', [1, 4])
def test_gpt2_logits_equal_transformers(hf, ckpt, name, n):
  d, model = hf[name]
  V = model.config.vocab_size
  loaded = inference.load(ckpt[name], [f'--config.mesh.model={n}'], devices=jax.devices()[:n])
  assert loaded.rt.mesh.shape['model'] == n
  assert loaded.rt.model_config.padded_vocab == -(-V // (128 * n)) * 128 * n
  meta = checkpoint.read_meta(ckpt[name])
  assert loaded.tokenizer.fingerprint == meta['tokenizer']['fingerprint'] != 'none'
  ids = np.random.default_rng(0).integers(0, V, (2, 12)).astype(np.int32)
  ours = forward(loaded, ids)
  with torch.no_grad():
    theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours[..., :V], theirs, atol=1e-4, rtol=0)
  assert not ours[..., V:].any()  # padding rows are zero


@pytest.mark.parametrize('n', [1, 4])
def test_bert_logits_equal_transformers(hf, ckpt, n):
  d, model = hf['bert_pt']
  V, B, T = model.config.vocab_size, 3, 16
  loaded = load_bert(ckpt['bert_pt'], n)
  assert loaded.rt.model_config.padded_vocab == 384 * (n == 1) + 512 * (n == 4)
  assert loaded.cfg.model.post_ln and loaded.cfg.model.ln_eps == 1e-12
  rng = np.random.default_rng(1)
  ids = rng.integers(0, V, (B, T)).astype(np.int32)
  tt = (np.arange(T)[None] >= np.array([[8], [5], [3]])).astype(np.int32)
  pad = np.arange(T)[None] < np.array([[T], [11], [6]])  # rows 1 and 2 padded at the end
  mlm, sop = forward(loaded, ids, tt, pad)
  with torch.no_grad():
    long = lambda x: torch.tensor(x, dtype=torch.long)
    out = model(long(ids), token_type_ids=long(tt), attention_mask=long(pad))
  theirs = out.prediction_logits.numpy()
  np.testing.assert_allclose(mlm[..., :V][pad], theirs[pad], atol=1e-4, rtol=0)
  np.testing.assert_allclose(sop, out.seq_relationship_logits.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['gpt2', 'gpt2_bf16', 'bert_pt', 'bert_mlm'])
def test_round_trip_is_bitwise(hf, ckpt, name, tmp_path):
  d, _ = hf[name]
  r = convert.to_hf(ckpt[name], tmp_path / 'out')
  before, after = load_file(d / 'model.safetensors'), load_file(r['path'] / 'model.safetensors')
  assert sorted(after) == sorted(before)  # tied weights are left out, as save_pretrained does
  for key, a in before.items():
    assert after[key].dtype == a.dtype and np.array_equal(after[key], a), key
  assert (json.loads((r['path'] / 'config.json').read_text())
          == json.loads((d / 'config.json').read_text()))
  if name == 'bert_mlm':  # no pooler / next-sentence head in: none out, and none named
    assert r['architecture'] == 'BertForMaskedLM' and not (r['path'] / 'tokenizer.json').exists()
    meta = checkpoint.read_meta(ckpt[name])
    assert meta['hf']['fresh'] == ['pooler.bias', 'pooler.kernel', 'sop.bias', 'sop.kernel']
    assert meta['tokenizer']['name'] == 'none'
  else:
    assert (r['path'] / 'tokenizer.json').read_bytes() == (d / 'tokenizer.json').read_bytes()
    assert (ckpt[name] / 'tokenizer' / 'tokenizer.json').is_file()


def test_sharded_export_loads_in_transformers(hf, ckpt, tmp_path):
  _, model = hf['gpt2']
  r = convert.to_hf(ckpt['gpt2'], tmp_path / 'out', max_shard_size='100KB')
  index = json.loads((r['path'] / 'model.safetensors.index.json').read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 2 and not (r['path'] / 'model.safetensors').exists()
  assert all((r['path'] / s).stat().st_size <= 100_000 + 20_000 for s in shards)  # + header
  loaded, info = transformers.GPT2LMHeadModel.from_pretrained(r['path'], output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  ids = torch.arange(10)[None]
  with torch.no_grad():
    assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
  # ... and from-hf reads a sharded directory (its index) back to the same parameters.
  again = convert.from_hf(r['path'], tmp_path / 'again')['path']
  assert_same_params(again, ckpt['gpt2'])


def assert_same_params(a, b):
  pa, pb = convert._read_params(a), convert._read_params(b)
  assert sorted(pa) == sorted(pb)
  for k in pa:
    assert np.array_equal(pa[k], pb[k]), k


def test_hub_layouts_convert(hf, ckpt, tmp_path):
  """Names as older checkpoints write them: no `transformer.` prefix, GPT-2's attention-mask
  buffers and a stored tied head; BERT's gamma/beta, position_ids and decoder copies."""
  def rewrite(name, rename, extra):
    d = tmp_path / f'{name}_{len(list(tmp_path.iterdir()))}'
    d.mkdir()
    src = hf[name][0]
    tensors = {rename(k): v for k, v in load_file(src / 'model.safetensors').items()}
    save_file({**tensors, **extra(tensors)}, d / 'model.safetensors', metadata={'format': 'pt'})
    (d / 'config.json').write_bytes((src / 'config.json').read_bytes())
    return d

  T = 32
  gpt2 = rewrite('gpt2', lambda k: k.removeprefix('transformer.'), lambda t: {
      'lm_head.weight': t['wte.weight'],
      'h.0.attn.bias': np.tril(np.ones((1, 1, T, T), np.float32)),
      'h.1.attn.masked_bias': np.float32([-1e4])})
  r = convert.from_hf(gpt2, tmp_path / 'gpt2_ckpt')
  assert_same_params(r['path'], ckpt['gpt2'])
  out = convert.to_hf(r['path'], tmp_path / 'gpt2_out')['path']
  assert 'h.0.attn.c_attn.weight' in load_file(out / 'model.safetensors')  # the prefix as it was
  transformers.GPT2LMHeadModel.from_pretrained(out)

  bert = rewrite('bert_mlm', lambda k: k.replace('LayerNorm.weight', 'LayerNorm.gamma')
                 .replace('LayerNorm.bias', 'LayerNorm.beta'), lambda t: {
      'bert.embeddings.position_ids': np.arange(T)[None],
      'cls.predictions.decoder.weight': t['bert.embeddings.word_embeddings.weight'],
      'cls.predictions.decoder.bias': t['cls.predictions.bias']})
  assert_same_params(convert.from_hf(bert, tmp_path / 'bert_ckpt')['path'], ckpt['bert_mlm'])

  untied = rewrite('gpt2', lambda k: k,
                   lambda t: {'lm_head.weight': t['transformer.wte.weight'] + 1})
  with pytest.raises(ConfigError, match='lm_head.weight differs'):
    convert.from_hf(untied, tmp_path / 'untied_ckpt')


def test_trained_gpt_generates_the_same_tokens_in_transformers(tmp_path):
  """Real steps (enough to leave the random model's repeats), a real train checkpoint
  (train_state) -> to-hf -> greedy decoding in both."""
  cfg = config.load('tiny')
  for key, value in {'model.num_layers': 2, 'model.hidden': 64, 'model.seq_len': 48,
                     'model.scan_layers': False, 'data.batch_size': 4, 'mesh.data': 1,
                     'optimizer.lr': 3e-3, 'optimizer.warmup_steps': 1, 'train.steps': 30}.items():
    config.override(cfg, key, str(value))
  t = train.setup(cfg, jax.devices()[:1])
  row = np.frombuffer(b'for root, dirs, files in os.walk(path): yield files\n', np.uint8)
  batch = np.stack([np.roll(row, k)[:cfg.model.seq_len + 1] for k in range(4)]).astype(np.int32)
  state = t.init()
  for _ in range(30):
    state, _ = t.step(state, jax.device_put(batch, t.batch_sharding))
  saver = checkpoint.Checkpoints(cfg, tmp_path / 'run', ByteTokenizer(), t.target())
  saver.save(30, state)
  assert saver.close() == [30]

  r = convert.to_hf(tmp_path / 'run', tmp_path / 'hf')
  assert r['architecture'] == 'GPT2LMHeadModel'
  model = transformers.AutoModelForCausalLM.from_pretrained(r['path']).eval()
  prompt = np.frombuffer(b'for root, dirs', np.uint8).astype(np.int32)
  loaded = inference.load(tmp_path / 'run', devices=jax.devices()[:1])
  ours = generate.Generator(loaded.rt, loaded.params, loaded.tokenizer.eod_id)(
      [prompt], max_tokens=20, temperature=0.0)[0]
  with torch.no_grad():
    theirs = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=20,
                            do_sample=False, eos_token_id=256, pad_token_id=256)[0, len(prompt):]
  assert ours.tolist() == theirs.tolist() and len(set(ours.tolist())) >= 5


def test_bad_input_is_one_clear_error(hf, ckpt, tmp_path, monkeypatch):
  monkeypatch.setattr(torch, 'load', lambda *a, **k: pytest.fail('torch.load called'))
  gpt2_config = json.loads((hf['gpt2'][0] / 'config.json').read_text())
  cases = {
      'pickled': ({'config.json': json.dumps(gpt2_config), 'pytorch_model.bin': 'not read'},
                  'safe_serialization=True'),
      'llama': ({'config.json': json.dumps({'model_type': 'llama'})}, 'model_type "llama"'),
      'layer_scaled': ({'config.json': json.dumps({**gpt2_config,
                                                   'scale_attn_by_inverse_layer_idx': True})},
                       'scale_attn_by_inverse_layer_idx=true'),
      'no_config': ({'model.safetensors': ''}, 'no config.json'),
  }
  for name, (files, message) in cases.items():
    d = tmp_path / name
    d.mkdir()
    for f, text in files.items():
      (d / f).write_text(text)
    with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
      convert.from_hf(d, tmp_path / f'{name}_out')
    assert not (tmp_path / f'{name}_out').exists()
  with pytest.raises(ConfigError, match='already exists'):
    convert.from_hf(hf['gpt2'][0], ckpt['bert_pt'])
  with pytest.raises(ConfigError, match='already exists'):
    convert.to_hf(ckpt['gpt2'], hf['gpt2'][0])
  with pytest.raises(ConfigError, match='not a size'):
    convert.to_hf(ckpt['gpt2'], tmp_path / 'x', max_shard_size='lots')
  assert not any('convert-tmp' in p.name for p in tmp_path.iterdir())

  proc = subprocess.run([sys.executable, '-m', 'shardlm.convert', 'from-hf', '--model-dir',
                         str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith('shardlm: error: --model-dir') and 'Traceback' not in proc.stderr
