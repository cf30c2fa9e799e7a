"""Task metrics for generated text, through the field's libraries: sacrebleu and rouge-score.

Every score is on a 0-100 scale. BLEU and chrF are corpus-level (sacrebleu's defaults: 13a
tokenization, exponential smoothing; the signature says so); ROUGE is the mean over examples
of rouge-score's F-measure, reference first, with the Porter stemmer; exact is the share of
outputs equal to their reference after stripping surrounding whitespace. mbr_pick chooses
among candidate outputs by the same ROUGE-L, for minimum-Bayes-risk decoding.
"""
import re

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

METRICS = ('bleu', 'chrf', 'rouge', 'exact')
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')

# rougeLsum reads one sentence per line. rouge-score would split with nltk's punkt, whose data
# is a separate download; a regex split after . ! ? (then whitespace) needs nothing and gives
# every machine the same numbers.
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def sentences(text: str) -> str:
  """`text` with one sentence per line, as rougeLsum expects."""
  return '\n'.join(s for line in text.split('\n') for s in _SENTENCE_END.split(line.strip()) if s)


def score(hypotheses: list[str], references: list[str], metrics=('bleu', 'rouge', 'exact')) -> dict:
  """The named `metrics` (of METRICS) of `hypotheses` against one reference each.

  Returns {name: value}, plus `bleu_signature` / `chrf_signature` (sacrebleu's, to quote
  beside the number) for those metrics.
  """
  if len(hypotheses) != len(references) or not references:
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  out = {}
  for name, metric in (('bleu', BLEU), ('chrf', CHRF)):
    if name in metrics:
      m = metric()
      out[name] = m.corpus_score(hypotheses, [references]).score
      out[f'{name}_signature'] = str(m.get_signature())
  if 'rouge' in metrics:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
      scores = scorer.score(target=sentences(ref), prediction=sentences(hyp))
      for t in ROUGE_TYPES:
        totals[t] += scores[t].fmeasure
    out.update({t: 100 * totals[t] / len(references) for t in ROUGE_TYPES})
  if 'exact' in metrics:
    out['exact'] = 100 * sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)
  return out


def mbr_pick(candidates: list[str]) -> int:
  """Minimum-Bayes-risk choice among one prompt's candidate outputs: the index of the one with
  the highest total ROUGE-L F-measure against all the others. Ties: the first."""
  if not candidates:
    raise ValueError('no candidate to choose from')
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  total = [0.0] * len(candidates)
  for i in range(len(candidates)):
    for j in range(i + 1, len(candidates)):  # the F-measure is symmetric: each pair once
      f = scorer.score(target=candidates[j], prediction=candidates[i])['rougeL'].fmeasure
      total[i] += f
      total[j] += f
  return max(range(len(candidates)), key=total.__getitem__)
