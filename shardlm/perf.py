"""Model FLOPs (Megatron's count), device peaks, and the CPU matmul peak measured at start-up."""
import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks, FLOP/s per device (DESIGN.md).
PEAKS = {'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'v5p': 459e12, 'v5 lite': 197e12,
         'v5e': 197e12}


def gpt_flops_per_step(batch, seq_len, num_layers, hidden, vocab) -> float:
  """Narayanan et al. 2021, without recomputation: 72 B T L D^2 (1 + T/6D + V/12LD)."""
  B, T, L, D, V = batch, seq_len, num_layers, hidden, vocab
  return 72 * B * T * L * D**2 * (1 + T / (6 * D) + V / (12 * L * D))


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul rate of XLA on the first device, in FLOP/s."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def device_peak() -> tuple[float, str]:
  """(FLOP/s available to the whole run, how it was obtained).

  On accelerators: the table peak times the device count. On CPU the simulated devices
  share the same cores, so the peak is the machine's measured matmul rate, once.
  """
  devices = jax.devices()
  kind = devices[0].device_kind.lower()
  if devices[0].platform == 'cpu':
    return measure_matmul_peak(), 'measured CPU f32 matmul'
  for name, peak in PEAKS.items():
    if name in kind:
      return peak * len(devices), f'{devices[0].device_kind} dense bf16 peak'
  return float('nan'), f'unknown peak for {devices[0].device_kind}'
