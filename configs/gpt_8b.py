"""gpt_8b: the 8.3B-parameter GPT of Megatron-LM (Shoeybi et al. 2019), 72 layers x 3072 x 32 heads.

Command:   python -m shardlm.train --config gpt_8b.py
Hardware:  one 8-GPU node per model copy: 8-way tensor parallel (Megatron-LM Table 1).
Layout:    mesh.model=8 (Megatron tensor parallel inside a node), data parallel across copies;
           add --config.mesh.fsdp=N to shard parameters and optimizer state ZeRO-3 style when
           memory is short.
64 GPUs:   one model copy over 8 nodes, 3-D (PTD-P): --config.mesh.stage=8 --config.mesh.model=8
           --config.model.pipeline_microbatches=64 --config.optimizer.grad_accum_steps=4:
           8 pipeline stages of 9 layers, each 8-way tensor parallel; each of 4 accumulation
           steps runs 64 micro-batches of 2 sequences, bubble 7/71 = 10% (add
           --config.model.pipeline_repeats=3 for 7/199 = 3.5%). 150M parameters (1.8 GB of
           state) per device; XLA's estimate of temporary memory is 35 GB per device (133 GB
           without the accumulation: the embedding and LM head see the whole batch on every
           stage). Compiles ahead of time for 64 simulated devices in seconds
           (tests/test_pipeline.py); not run on GPUs yet.
Recipe:    Megatron-LM's GPT-2 schedule: global batch 512 x 1024, lr 1.5e-4, 3k warmup, cosine
           to 1e-5 over 300k steps, weight decay 0.01, bf16 compute. GPT-2's 50257 ids are padded
           to a multiple of 128 x mesh.model. Data: add --config.data.tokenizer=gpt2/tokenizer.json
           --config.data.paths="('data/mycorpus',)" (docs/data.md); without them it
           trains on the byte-level standard library, good for layout and throughput checks only.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(num_layers=72, hidden=3072, num_heads=32, seq_len=1024, vocab_size=50257,
                 dtype='bfloat16', remat='full')
  c.mesh.update(data=-1, fsdp=1, model=8)
  c.data.update(batch_size=512)
  c.optimizer.update(lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, schedule='cosine', weight_decay=0.01)
  c.train.update(steps=300_000, eval_every=1000, eval_batches=10)
  c.log.update(every=100)
  return c
