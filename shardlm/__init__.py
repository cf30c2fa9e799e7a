"""shardlm: Megatron-class Transformer language models in JAX, sharded by a rule table."""
import flax

# Parameters carry *logical* axis names, which are not mesh axes; shardings come from the
# rule table (shardlm.sharding), so Flax must not try to shard variables eagerly by name.
flax.config.update('flax_always_shard_variable', False)

__version__ = '0.1.0'
