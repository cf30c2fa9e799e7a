"""bert_tiny: a 4-layer byte-level BERT (masked LM + sentence order) on the Python standard library.

Command:   python -m shardlm.train --config bert_tiny.py
Hardware:  any CPU; a few minutes on 2 cores, compile included.
Layout:    all devices on the data axis; try --config.mesh.model=4 on 8 simulated devices.
Data:      rows [CLS] A [SEP] B [SEP] cut from the packed corpus, A and B swapped half the time
           (the sentence-order label); 15% of A and B masked (80% [MASK], 10% random, 10% kept).
           The byte tokenizer's 257 ids plus [CLS] [SEP] [MASK] [PAD] make a vocabulary of 261.
Expect:    the masked-LM loss falls from ~5.6 (ln 261) to about 2; sentence-order accuracy
           climbs above chance (0.5) as the model learns to spot a swapped cut.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(kind='bert', num_layers=4, hidden=128, num_heads=4, seq_len=128, vocab_size=261)
  c.data.update(corpus='stdlib', tokenizer='byte', batch_size=32)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.01)
  c.train.update(steps=300, eval_every=100)
  c.checkpoint.update(every=150)
  return c
