"""gpt_1t: the 1-trillion-parameter GPT of Narayanan et al. (SC'21, Table 1), 128 layers x 25600 x 160.

Command:   sbatch --nodes=384 scripts/slurm.sbatch --config gpt_1t.py   (one task per GPU)
Hardware:  3072 GPUs (384 nodes of 8 A100 80 GB), the paper's run: 163 TFLOP/s per GPU, 52% of
           peak, with PTD-P.
Layout:    tensor parallel 8 inside a node (mesh.model=8) x pipeline 64 (mesh.stage=64: two
           layers per stage) x data parallel 6 across pipelines (mesh.data=-1). Each pipeline
           runs its 512 sequences of the global batch of 3072 as M=512 micro-batches of one
           sequence per data-parallel copy: bubble (P-1)/(RM+P-1) = 63/575 = 11%. The
           interleaved schedule halves it: --config.model.pipeline_repeats=2 (one layer per
           stage per repeat; 63/1087 = 5.8%).
Memory:    2.13B parameters per GPU (1/512 of the layers: 1.97B; 1/8 of the token table:
           0.16B); float32 parameters and Adam moments are 25.6 GB; activations recomputed per
           layer (remat=full).
Size:      1.008e12 parameters (checked against the paper's 1008B by the tests, abstractly).
Status:    the paper's throughput run, not a recipe to convergence: the optimizer is GPT-3's
           (lr 6e-5 with 2k warmup, cosine). Nobody here has run it; shardlm checks its layout
           and memory ahead of time only. Data: --config.data.tokenizer=gpt2/tokenizer.json
           --config.data.paths="('data/mycorpus',)" (docs/data.md).
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(num_layers=128, hidden=25600, num_heads=160, seq_len=2048, vocab_size=50257,
                 dtype='bfloat16', remat='full', pipeline_microbatches=512, pipeline_repeats=1)
  c.mesh.update(data=-1, stage=64, fsdp=1, model=8)
  c.data.update(batch_size=3072)
  c.optimizer.update(lr=6e-5, min_lr=6e-6, warmup_steps=2000, schedule='cosine', weight_decay=0.1)
  c.train.update(steps=100_000, eval_every=1000, eval_batches=10)
  c.log.update(every=10)
  return c
