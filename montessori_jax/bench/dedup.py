"""``montessori bench dedup``: our ROUGE-L dedup against the ``rouge-score`` package.

The task is the synthesis filter's: ``candidates`` instruction-like texts arrive one by one;
each is dropped when its ROUGE-L F1 with any entry of the growing pool (the packaged seeds,
then every candidate kept so far) is above the threshold, else it joins the pool.

- ours: ``RougeLIndex.is_similar`` then ``add``, the whole stream, timed end to end;
- rouge-score: what the original code does, ``RougeScorer(["rougeL"]).score`` on every
  (candidate, pool entry) pair, in one process. All pairs would take far too long, so it is
  timed on ``rouge_pairs`` pairs drawn uniformly from the stream's real pairs and
  extrapolated to all of them (``rouge_score_s`` is that estimate; ``rouge_score_measured``
  says how many pairs were really scored).

Correctness on the same data: every sampled pair's score must equal rouge-score's exactly,
and for ``check_candidates`` candidates spread over the stream the keep/drop decision is
recomputed with rouge-score against the full pool of that moment.

The candidates are synthetic and deterministic for a seed: template instructions over a
Zipf-distributed vocabulary (common words plus generated content words), with a fraction of
near-duplicates (a few words of an earlier candidate changed), so both dedup outcomes occur.
"""

from __future__ import annotations

import time

import numpy as np

from montessori_jax.bench.common import machine_info
from montessori_jax.stages.synthesis.rouge import RougeLIndex, rouge_l
from montessori_jax.stages.synthesis.seeds import load_seed_pool

_COMMON = (
    "the a of to and in for is on that with as it be this are by from or an at your which "
    "how what why when who can should would could about into than more most some any each "
    "every its their them they you we our my one two three first new good best short simple"
).split()
_VERBS = (
    "write explain describe list summarize compare classify translate rewrite generate find "
    "calculate suggest create identify outline analyze evaluate design plan convert name give"
).split()
_NOUNS = (
    "poem story email essay recipe function paragraph sentence argument question answer table "
    "letter review joke riddle list speech plan report summary definition example slogan"
).split()


def synthetic_candidates(n: int, seed: int = 0, near_duplicate_rate: float = 0.25) -> list[str]:
    """``n`` instruction-like texts: templates over a Zipfian vocabulary, some near-duplicates."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    content = sorted({"".join(rng.choice(syllables, size=rng.integers(2, 4))) for _ in range(6000)})
    vocab = _COMMON + content
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < near_duplicate_rate:
            words = out[int(rng.integers(len(out)))].split()
            for _ in range(int(rng.integers(1, 4))):
                words[int(rng.integers(len(words)))] = str(rng.choice(vocab, p=weights))
            out.append(" ".join(words))
            continue
        length = int(rng.integers(4, 30)) if rng.random() < 0.9 else int(rng.integers(60, 120))
        body = " ".join(rng.choice(vocab, size=length, p=weights))
        out.append(f"{str(rng.choice(_VERBS)).capitalize()} a {rng.choice(_NOUNS)} about {body}.")
    return out


def bench_dedup(
    candidates: int = 10_000,
    *,
    seed: int = 0,
    threshold: float = 0.7,
    rouge_pairs: int = 20_000,
    check_candidates: int = 20,
    progress: bool = True,
) -> dict:
    """Time both on the same stream; returns a dict (see ``format_table``)."""
    from rouge_score import rouge_scorer
    from tqdm.auto import tqdm

    seeds = [t.text for t in load_seed_pool()]
    texts = synthetic_candidates(candidates, seed)

    index = RougeLIndex(threshold, seeds)
    pool_sizes = np.zeros(len(texts), np.int64)  # pool size each candidate is checked against
    kept_mask = np.zeros(len(texts), bool)
    t0 = time.perf_counter()
    for i, text in enumerate(tqdm(texts, desc="ours", unit="cand", disable=not progress, mininterval=1)):
        pool_sizes[i] = len(index)
        if not index.is_similar(text):
            index.add(text)
            kept_mask[i] = True
    ours_s = time.perf_counter() - t0
    pool = seeds + [t for t, k in zip(texts, kept_mask) if k]  # the pool in insertion order
    total_pairs = int(pool_sizes.sum())

    # rouge-score on pairs drawn uniformly from the stream's pairs
    rng = np.random.default_rng(seed + 1)
    flat = np.sort(rng.choice(total_pairs, size=min(rouge_pairs, total_pairs), replace=False))
    starts = np.concatenate([[0], np.cumsum(pool_sizes)[:-1]])
    cand_of = np.searchsorted(starts, flat, side="right") - 1
    entry_of = flat - starts[cand_of]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [(texts[c], pool[e]) for c, e in zip(cand_of, entry_of)]
    t0 = time.perf_counter()
    ref_scores = [scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs]
    sample_s = time.perf_counter() - t0

    mismatches = sum(rouge_l(a, b) != s for (a, b), s in zip(pairs, ref_scores))
    per_pair = sample_s / max(1, len(pairs))

    # the keep/drop decision, recomputed with rouge-score against the full pool of the moment
    check = np.linspace(0, len(texts) - 1, num=min(check_candidates, len(texts))).astype(int)
    decision_errors = 0
    for c in check:
        best = max((scorer.score(texts[c], p)["rougeL"].fmeasure for p in pool[: pool_sizes[c]]), default=0.0)
        decision_errors += int((best <= threshold) != kept_mask[c])

    rouge_s = per_pair * total_pairs

    return {
        "benchmark": "dedup",
        "settings": {"candidates": len(texts), "seed_pool": len(seeds), "threshold": threshold, "seed": seed,
                     "rouge_score_pairs_sampled": len(pairs), "decision_checks": len(check)},
        "kept": int(kept_mask.sum()),
        "dropped": int((~kept_mask).sum()),
        "pairs": total_pairs,
        "ours_s": ours_s,
        "rouge_score_s": rouge_s,
        "rouge_score_measured": {"pairs": len(pairs), "seconds": sample_s, "us_per_pair": per_pair * 1e6},
        "ratio": rouge_s / ours_s,
        "score_mismatches": int(mismatches),
        "decision_mismatches": int(decision_errors),
        "machine": machine_info(),
    }


def format_table(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    rm = result["rouge_score_measured"]
    rows = [
        ("ours (RougeLIndex)", f"{result['ours_s']:.2f} s", "measured, whole stream"),
        ("rouge-score", f"{result['rouge_score_s']:.1f} s",
         f"extrapolated: {rm['pairs']} pairs in {rm['seconds']:.2f} s ({rm['us_per_pair']:.1f} us/pair)"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [
        f"bench dedup: {s['candidates']} candidates against a growing pool ({s['seed_pool']} seeds + kept), "
        f"ROUGE-L F1 > {s['threshold']} drops",
        f"machine: {m.get('cpu')} x{m.get('cpu_count')}, {m.get('memory_gb')} GB, python {m.get('python')}",
        f"kept {result['kept']}, dropped {result['dropped']}, {result['pairs']:,} (candidate, pool) pairs",
    ]
    lines += [f"  {name.ljust(w)}  {t:>10}  {note}" for name, t, note in rows]
    lines.append(f"  ratio: ours is {result['ratio']:.0f}x faster")
    lines.append(f"  equality: {result['score_mismatches']} score mismatches in {rm['pairs']} sampled pairs, "
                 f"{result['decision_mismatches']} decision mismatches in {s['decision_checks']} full re-checks")
    return "\n".join(lines)
