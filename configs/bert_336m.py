"""bert_336m: the 336M BERT of Megatron-LM (Shoeybi et al. 2019, Table 4), 24 layers x 1024 x 16 heads.

Command:   python -m shardlm.train --config bert_336m.py
Hardware:  one 16-80 GB GPU per model copy (Megatron-LM: 1 GPU).
Layout:    pure data parallel (--config.mesh.model=1); --config.mesh.fsdp=N shards parameters and
           optimizer state when memory is short.
Recipe:    Megatron-LM's BERT schedule: global batch 1024 x 512, lr 1e-4, 10k warmup, linear decay
           over 2M steps, weight decay 0.01, pre-LN (stable at this size), bf16 compute. Masked LM
           (15%, 80/10/10) and sentence-order prediction.
Data:      add --config.data.tokenizer=bert/tokenizer.json (a WordPiece vocabulary of 30522 with
           [CLS] [SEP] [MASK] [PAD]) --config.data.paths="('data/mycorpus',)" (docs/data.md);
           without them it trains on the byte-level standard library, good for layout and
           throughput checks only.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(kind='bert', num_layers=24, hidden=1024, num_heads=16, seq_len=512, vocab_size=30522,
                 dtype='bfloat16', remat='selective')
  c.mesh.update(model=1)
  c.data.update(batch_size=1024)
  c.optimizer.update(lr=1e-4, min_lr=0.0, warmup_steps=10_000, schedule='linear', weight_decay=0.01)
  c.train.update(steps=2_000_000, eval_every=2000, eval_batches=10)
  c.log.update(every=100)
  return c
