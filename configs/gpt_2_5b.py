"""gpt_2_5b: the 2.5B-parameter GPT of Megatron-LM (Shoeybi et al. 2019), 54 layers x 1920 x 20 heads.

Command:   python -m shardlm.train --config gpt_2_5b.py
Hardware:  GPUs in pairs: 2-way tensor parallel (Megatron-LM Table 1).
Layout:    mesh.model=2 (Megatron tensor parallel inside a node), data parallel across copies;
           add --config.mesh.fsdp=N to shard parameters and optimizer state ZeRO-3 style when
           memory is short.
Recipe:    Megatron-LM's GPT-2 schedule: global batch 512 x 1024, lr 1.5e-4, 3k warmup, cosine
           to 1e-5 over 300k steps, weight decay 0.01, bf16 compute. GPT-2's 50257 ids are padded
           to a multiple of 128 x mesh.model. Data: add --config.data.tokenizer=gpt2/tokenizer.json
           --config.data.paths="('data/mycorpus',)" (docs/data.md); without them it
           trains on the byte-level standard library, good for layout and throughput checks only.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(num_layers=54, hidden=1920, num_heads=20, seq_len=1024, vocab_size=50257,
                 dtype='bfloat16', remat='full')
  c.mesh.update(data=-1, fsdp=1, model=2)
  c.data.update(batch_size=512)
  c.optimizer.update(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, schedule='cosine', weight_decay=0.01)
  c.train.update(steps=300_000, eval_every=1000, eval_batches=10)
  c.log.update(every=100)
  return c
