"""Reading compiled HLO text: which collectives a program runs, on what shapes, inside which loops."""
import dataclasses
import glob
import math
import re
import tempfile
from pathlib import Path

import numpy as np

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')
# replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}: groups along the
# named axes of a mesh over those device ids (without device_ids: ids in order)
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]"
                          r"(?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?)\))?[^{]*\{([^}]*)\}")
_CALLED = re.compile(r'(?:body|calls|to_apply|branch_computations)=\{?([^}\s]*(?:, %[\w.\-]+)*)')


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
  callers: dict = dataclasses.field(default_factory=dict)  # computation -> the one that calls it

  def collectives(self, op=None, computation=None):
    return [i for i in self.instrs
            if i.op.removesuffix('-start') in (COLLECTIVES if op is None else (op,))
            and (computation is None or i.computation == computation)]

  def users(self, name):
    return [i for i in self.instrs if name in i.operands]

  def multiplicity(self, computation: str) -> int:
    """How many times one run of the program runs `computation`: the trip counts of the loops
    around it multiplied (a loop without a known trip count counts once)."""
    times, seen = 1, set()
    while computation in self.callers and computation not in seen:
      seen.add(computation)
      times *= self.trip_counts.get(computation, 1)
      computation = self.callers[computation]
    return times

  @staticmethod
  def groups(instr: Instr) -> list:
    """The device groups of a collective, as lists of device ids: each replica group, or each
    source -> target pair of a collective-permute that moves something. [] if not stated."""
    line = instr.line
    pairs = re.search(r'source_target_pairs=\{(\{[\d,{}]*\})\}', line)
    if pairs:
      found = [tuple(int(x) for x in p.split(',')) for p in re.findall(r'\{(\d+,\d+)\}', pairs.group(1))]
      return [list(p) for p in found if p[0] != p[1]]
    mesh = _MESH_GROUPS.search(line)
    if mesh:
      shape = [int(n) for n in re.findall(r"'\w+'=(\d+)", mesh.group(1))]
      names = re.findall(r"'(\w+)'=", mesh.group(1))
      ids = _iota(mesh.group(2)) if mesh.group(2) else np.arange(math.prod(shape))
      ids = ids.reshape(shape)
      along = [names.index(a) for a in re.findall(r"'(\w+)'", mesh.group(3))]
      rest = [d for d in range(len(shape)) if d not in along]
      size = math.prod(shape[d] for d in along)
      return ids.transpose(rest + along).reshape(-1, size).tolist()
    iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)', line)
    if iota:
      return _iota(iota.group(3)).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    explicit = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', line)
    if explicit:
      return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}', explicit.group(1))]
    return []


def _iota(text: str):
  """XLA's iota device list `[d0,d1,...]T(p0,p1,...)`: arange reshaped, transposed, flattened."""
  m = re.fullmatch(r'\[([\d,]+)\](?:T\(([\d,]+)\))?', text.strip())
  dims = [int(d) for d in m.group(1).split(',')]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(2):
    ids = ids.transpose([int(p) for p in m.group(2).split(',')])
  return ids.reshape(-1)


def parse(text: str) -> Module:
  instrs, bodies, trips, callers, comp = [], [], {}, {}, None
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
    for called in _CALLED.findall(rest):
      for c in re.findall(r'%?([\w.\-]+)', called):
        callers.setdefault(c, comp)
    if op == 'while':
      body = re.search(r'body=%?([\w.\-]+)', line)
      if body:
        bodies.append(body.group(1))
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if trip:
          trips[body.group(1)] = int(trip.group(1))
  return Module(instrs, bodies, trips, callers)


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
