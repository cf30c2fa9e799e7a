"""Reading compiled HLO text: which collectives a program runs, on what shapes, inside which loops."""
import dataclasses
import glob
import math
import re
import tempfile
from pathlib import Path

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')


@dataclasses.dataclass
class Instr:
  name: str
  op: str
  shapes: list          # [(dtype, dims)], one per array in the (possibly tuple) result
  operands: list        # names of operand instructions
  computation: str
  line: str

  @property
  def group_size(self) -> int:
    """How many devices take part in each group of a collective (0 if not stated)."""
    m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', self.line)
    if m:
      return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", self.line)
    if m:
      sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
      return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r'replica_groups=\{\{([\d,]*)\}', self.line)
    return len(m.group(1).split(',')) if m else 0


@dataclasses.dataclass
class Module:
  instrs: list
  while_bodies: list    # computation names used as `body=` of a while loop, in text order
  trip_counts: dict = dataclasses.field(default_factory=dict)  # body -> XLA's known trip count

  def collectives(self, op=None, computation=None):
    return [i for i in self.instrs
            if i.op.removesuffix('-start') in (COLLECTIVES if op is None else (op,))
            and (computation is None or i.computation == computation)]

  def users(self, name):
    return [i for i in self.instrs if name in i.operands]


def parse(text: str) -> Module:
  instrs, bodies, trips, comp = [], [], {}, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      comp = header.group(1)
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, type_str, op, rest = m.groups()
    args = rest.split(')', 1)[0]
    shapes = [(dt, tuple(int(d) for d in dims.split(',') if d)) for dt, dims in _ARRAY.findall(type_str)]
    instrs.append(Instr(name, op, shapes, _OPERAND.findall(args), comp, line.strip()))
    if op == 'while':
      body = re.search(r'body=%?([\w.\-]+)', line)
      if body:
        bodies.append(body.group(1))
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if trip:
          trips[body.group(1)] = int(trip.group(1))
  return Module(instrs, bodies, trips)


def partitioned_text(lowered) -> str:
  """The HLO right after SPMD partitioning, before fusion and the backend's own passes.

  XLA's CPU pipeline has no pass that fuses an all-reduce and the dynamic-slice that
  follows it into a reduce-scatter (GPU and TPU pipelines do), so the partitioner's
  output is where the data movement it chose can be read off plainly.
  """
  with tempfile.TemporaryDirectory() as tmp:
    lowered.compile(compiler_options={'xla_dump_to': tmp,
                                      'xla_dump_hlo_pass_re': 'spmd-partitioning'})
    files = sorted(glob.glob(f'{tmp}/*after_spmd-partitioning*'))
    if not files:
      raise RuntimeError('XLA wrote no post-partitioning dump; the pass name may have changed')
    return Path(files[-1]).read_text()
