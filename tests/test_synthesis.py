"""Synthesis: seed pools, prompts, parsing and filters, ROUGE-L, resume, the stage end to end."""

import json
import os
import random

import pytest

from montessori_jax.errors import UserError
from montessori_jax.files import PACKAGED_REFERENCE, SHARED_DATA_ENV, shared_data_path
from montessori_jax.stages.synthesis import (
    DROP_REASONS,
    Completion,
    GenerationConfig,
    InstructionFilter,
    RougeLIndex,
    SynthesisConfig,
    build_prompt,
    extract_instruction,
    load_seed_pool,
    rouge_l,
    synthesize,
)
from montessori_jax.stages.synthesis import records as records_lib
from montessori_jax.stages.synthesis.filters import normalize
from montessori_jax.stages.synthesis.prompts import DEFAULT_PREAMBLE
from montessori_jax.stages.synthesis.rouge import lcs_length, tokenize

SELF_INSTRUCT = shared_data_path("self_instruct_seed_tasks.jsonl")
REFERENCE = shared_data_path("reference_alpaca_eval_gpt4_1106.jsonl")
# the project's shared data sets sit beside the repository, not in it: a clone elsewhere skips
# the tests that read them, with this reason, unless MONTESSORI_SHARED_DATA points at them
needs_shared_data = pytest.mark.skipif(
    not (os.path.exists(SELF_INSTRUCT) and os.path.exists(REFERENCE)),
    reason=f"shared data not found at {os.path.dirname(SELF_INSTRUCT)} (set {SHARED_DATA_ENV})")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def shots_of(prompt, preamble=DEFAULT_PREAMBLE):
    """The example instructions of a prompt (the lines after its preamble)."""
    body = prompt[len(preamble):] if prompt.startswith(preamble) else prompt
    return [line[len("<instruction>") : -len("</instruction>")] for line in body.splitlines()
            if line.startswith("<instruction>")]


# ---------------------------------------------------------------------------------------------
# seed pools


def test_seed_formats_alpaca_self_instruct_plain_and_mapping(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Sum the numbers.", "input": "1, 2, 3", "output": "6"},
        {"instruction": "Name a color.", "input": "", "output": "Red"},
    ])
    tasks = load_seed_pool(alpaca)
    assert [t.text for t in tasks] == ["Sum the numbers. 1, 2, 3", "Name a color."]
    assert tasks[0].output == "6" and tasks[1].where.endswith("a.jsonl, line 2")

    plain = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Tell a joke."}, "", {"instruction": "Hi there."}])
    assert [t.text for t in load_seed_pool(plain)] == ["Tell a joke.", "Hi there."]

    mapped = write_jsonl(tmp_path / "m.jsonl", [{"question": "Why is ice slippery?", "context": "in winter"}])
    tasks = load_seed_pool(mapped, fields={"instruction": "question", "input": "context"})
    assert tasks[0].text == "Why is ice slippery? in winter"


@needs_shared_data
def test_seed_pool_in_the_self_instruct_format():
    si = load_seed_pool(SELF_INSTRUCT)
    assert len(si) == 175
    first = json.loads(open(SELF_INSTRUCT).readline())
    assert si[0].instruction == first["instruction"].strip()
    assert si[0].output == first["instances"][0]["output"].strip()
    with_input = next(t for t in si if t.input)
    assert with_input.text == f"{with_input.instruction} {with_input.input}"


def test_seed_pool_from_a_saved_datasets_folder(tmp_path):
    import datasets

    rows = [{"instruction": f"Task number {i}.", "input": "", "output": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert [t.text for t in load_seed_pool(str(tmp_path / "ds"))] == [r["instruction"] for r in rows]
    assert len(load_seed_pool(str(tmp_path / "dd"))) == 2
    with pytest.raises(UserError, match="no split 'test'"):
        load_seed_pool(str(tmp_path / "dd"), split="test")


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "ok"}', '{"instruction": 3}'], r"x\.jsonl, line 2: no 'instruction' field"),
        (['{"instruction": "ok"}', "", '{"prompt": "hi"}'], r"x\.jsonl, line 3: .*keys: prompt"),
        (['{"instruction": "ok"}', "[1, 2]"], r"x\.jsonl, line 2: expected a JSON object"),
        (['{"instruction": "ok"}', '{"instruction": "a", "input": 5}'], r"line 2: 'input' must be a string"),
        (['{"instruction": "ok", "instances": []}'], r"line 1: 'instances' must be a non-empty list"),
        (['{"instruction": "ok"', ""], r"x\.jsonl, line 1: not valid JSON"),
        (["", "  "], r"x\.jsonl: the seed pool is empty"),
    ],
)
def test_malformed_or_empty_pool_names_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.raises(UserError, match=message):
        load_seed_pool(path)


def test_missing_pool_and_bad_mapping():
    with pytest.raises(UserError, match="no such seed pool"):
        load_seed_pool("./nowhere/seeds.jsonl")
    with pytest.raises(UserError, match="unknown field 'prompt'"):
        load_seed_pool("default", fields={"prompt": "q"})


def test_packaged_pool_and_reference_set():
    seeds = load_seed_pool()
    assert 45 <= len(seeds) <= 60
    assert len({t.text for t in seeds}) == len(seeds)
    ref = [json.loads(line) for line in open(PACKAGED_REFERENCE, encoding="utf-8")]
    assert len(ref) == 64
    assert all(isinstance(r["instruction"], str) and isinstance(r["response"], str) and r["response"] for r in ref)
    # written for the package: no task shared between the seed pool and the reference set
    seed_texts = {t.instruction for t in seeds}
    assert not seed_texts & {r["instruction"] for r in ref}
    # every seed passes the filters it is shown with
    filt = InstructionFilter([])
    assert all(filt.check(f"<instruction>{t.text}</instruction>").reason in (None, "too_long") for t in seeds)


@needs_shared_data
def test_packaged_data_takes_nothing_from_the_shared_data():
    packaged = {t.instruction for t in load_seed_pool()}
    packaged |= {json.loads(line)["instruction"] for line in open(PACKAGED_REFERENCE, encoding="utf-8")}
    shared = {json.loads(line)["instruction"] for path in (SELF_INSTRUCT, REFERENCE) for line in open(path)}
    assert len(shared) > 400 and not packaged & shared


# ---------------------------------------------------------------------------------------------
# prompts


SEEDS = [f"Seed task {w} about {v}." for w in "abcdefghijkl" for v in ("rivers", "poems")]


def test_prompt_has_eight_seed_shots_until_two_instructions_exist():
    for generated in ([], ["Generated instruction one."]):
        prompt = build_prompt(SEEDS, generated, seed=0, iteration=0, index=3)
        assert prompt.startswith(DEFAULT_PREAMBLE)
        shots = shots_of(prompt)
        assert len(shots) == 8 and len(set(shots)) == 8
        assert set(shots) <= set(SEEDS)
        assert prompt == DEFAULT_PREAMBLE + "".join(f"<instruction>{s}</instruction>\n" for s in shots)


def test_prompt_has_six_seeds_and_two_generated_once_two_exist():
    generated = [f"Generated instruction number {i}." for i in range(5)]
    positions = set()
    for index in range(20):
        shots = shots_of(build_prompt(SEEDS, generated, seed=1, iteration=0, index=index))
        assert len(shots) == 8 and len(set(shots)) == 8
        assert sum(s in SEEDS for s in shots) == 6
        assert sum(s in generated for s in shots) == 2
        positions |= {i for i, s in enumerate(shots) if s in generated}
    assert len(positions) > 2  # the generated shots are shuffled in, not appended


def test_prompts_are_deterministic_for_a_seed():
    generated = ["Generated one.", "Generated two.", "Generated three."]
    a = [build_prompt(SEEDS, generated, seed=7, iteration=0, index=i) for i in range(10)]
    b = [build_prompt(SEEDS, generated, seed=7, iteration=0, index=i) for i in reversed(range(10))][::-1]
    assert a == b
    assert len(set(a)) == 10
    assert a != [build_prompt(SEEDS, generated, seed=8, iteration=0, index=i) for i in range(10)]
    assert a != [build_prompt(SEEDS, generated, seed=7, iteration=1, index=i) for i in range(10)]


def test_prompt_options_and_small_pool():
    shots = shots_of(build_prompt(SEEDS, ["G1", "G2", "G3"], seed=0, iteration=0, index=0, shots=4,
                                  generated_shots=1, preamble="P\n"), preamble="P\n")
    assert len(shots) == 4 and sum(s.startswith("G") for s in shots) == 1
    with pytest.raises(ValueError, match="needs 8"):
        build_prompt(SEEDS[:5], [], seed=0, iteration=0, index=0)


# ---------------------------------------------------------------------------------------------
# parsing and filters


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("I think this is useful.", None),  # no tag
        ("<instruction>Name a bird.</instruction>", "Name a bird."),
        ("why: ... <instruction>First one.</instruction> then <instruction>Second one.</instruction> bye",
         "Second one."),  # several tags: the last
        ("<instruction>Complete one.</instruction> <instruction>cut off at the lim", "Complete one."),  # unclosed
        ("<instruction>never closed", None),
        ("stray </instruction> only", None),
        ("<instruction>draft <instruction>Final one.</instruction>", "Final one."),
        ("<instruction>Fix this HTML: <p>Hi<b>there</p></instruction>", "Fix this HTML: <p>Hi<b>there</p>"),
        ("<instruction>Summarize: <input>Text.</input></instruction> trailing </instruction>",
         "Summarize: <input>Text.</input>"),
        ("<instruction></instruction>", ""),
    ],
)
def test_extract_instruction_edge_cases(raw, expected):
    assert extract_instruction(raw) == expected


def _tag(text):
    return f"Because it is useful.\n<instruction>{text}</instruction>"


@pytest.mark.parametrize(
    "raw, reason, instruction",
    [
        ("no tag at all", "no_instruction_tag", None),
        (_tag("  Sort\n these   numbers:\t3, 1, 2  "), None, "Sort these numbers: 3, 1, 2"),
        (_tag("Summarize the text. <input>The cat sat.</input>"), None, "Summarize the text. The cat sat."),
        (_tag("Why?"), "too_short", "Why?"),
        (_tag("Why ?"), None, "Why ?"),  # 5 characters: kept
        (_tag("\n  Hi!  \n"), "too_short", "Hi!"),  # whitespace collapsed before measuring
        (_tag("Say " + "a" * 396), None, "Say " + "a" * 396),  # 400: kept
        (_tag("Say " + "a" * 397), "too_long", "Say " + "a" * 397),
        (_tag("Say " + "a " * 300 + "with an image"), "too_long", None),  # length is checked first
        (_tag("Describe the image below."), "blacklisted_word", None),
        (_tag("Compare these two GRAPHS for me."), "blacklisted_word", None),
        (_tag("Plot the sales figures by month."), "blacklisted_word", None),
        (_tag("Open the attached files and count words."), "blacklisted_word", None),
        (_tag("Please go\n to the store and buy milk."), "blacklisted_word", None),
        (_tag("Explain how a mapping between sets works."), None, None),  # whole words only
        (_tag("Explain why students like drawing lessons."), None, None),
        (_tag("- List three fruits."), "starts_with_punctuation", None),
        (_tag('"Quote" this sentence back to me.'), "starts_with_punctuation", None),
        (_tag("¿Qué hora es en Madrid ahora?"), "starts_with_non_ascii", None),
        (_tag("Écris un poème sur la mer."), "starts_with_non_ascii", None),
    ],
)
def test_each_filter(raw, reason, instruction):
    verdict = InstructionFilter(["Completely unrelated seed task about volcanoes."]).check(raw)
    assert verdict.reason == reason
    if instruction is not None:
        assert verdict.instruction == instruction


def test_rouge_filter_against_seeds_and_earlier_kept_instructions():
    filt = InstructionFilter(["Write a short poem about the sea."])
    v = filt(_tag("Write a short poem about the sea and the sky."))
    assert v.reason == "too_similar" and v.similar_to == "Write a short poem about the sea."
    assert v.score == rouge_l(v.instruction, v.similar_to) > 0.7
    first = filt(_tag("List five famous bridges in Europe and their lengths."))
    assert first.kept
    again = filt(_tag("List five famous bridges in Asia and their lengths."))
    assert again.reason == "too_similar" and again.similar_to == first.instruction
    assert filt(_tag("Explain how vaccines train the immune system.")).kept


def test_rouge_threshold_is_strict():
    a, b = "one two three four five six seven eight nine ten", "one two three four five six seven x y z"
    score = rouge_l(a, b)
    assert InstructionFilter([a], rouge_threshold=score).check(_tag(b)).kept
    assert InstructionFilter([a], rouge_threshold=score - 1e-6).check(_tag(b)).reason == "too_similar"


def test_drop_reasons_listed_in_filter_order():
    assert DROP_REASONS == ("no_instruction_tag", "too_short", "too_long", "blacklisted_word",
                            "starts_with_punctuation", "starts_with_non_ascii", "too_similar")


# ---------------------------------------------------------------------------------------------
# ROUGE-L


def _shared_texts():
    texts = []
    for line in open(SELF_INSTRUCT, encoding="utf-8"):
        row = json.loads(line)
        texts.append(row["instruction"])
        texts += [inst["input"][:800] for inst in row["instances"] if inst["input"]][:1]
    for line in open(REFERENCE, encoding="utf-8"):
        row = json.loads(line)
        texts += [row["instruction"], row["response"][:800]]
    return texts


def _mutate(text, rng):
    words = text.split()
    for _ in range(rng.randint(1, 4)):
        if not words:
            break
        i, op = rng.randrange(len(words)), rng.random()
        if op < 0.3:
            del words[i]
        elif op < 0.6:
            words.insert(i, rng.choice(words))
        else:
            words[i] = rng.choice(["the", "Über", "naïve", "İstanbul", "K", "x-ray", "3.14"])
    return " ".join(words)


@needs_shared_data
def test_rouge_l_equals_rouge_score_on_shared_data():
    from rouge_score import rouge_scorer  # a test dependency: the reference implementation

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    texts = _shared_texts()
    texts += [_mutate(t, rng) for t in rng.sample(texts, 150)]  # near-duplicates: scores near 1
    texts += ["", "!!! ???", "ÀÉÎ 123 abc", "a a a a b b a"]
    assert max(len(tokenize(t)) for t in texts) > 128  # the multi-word LCS path runs too
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(800)]
    pairs += [(t, _mutate(t, rng)) for t in rng.sample(texts, 200)]
    for a, b in pairs:
        assert tokenize(a) == scorer._tokenizer.tokenize(a)
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)

    pool = rng.sample(texts, 150)
    index = RougeLIndex(0.7, pool)
    for query in rng.sample(texts, 5) + [_mutate(pool[0], rng), pool[1]]:
        expected = [scorer.score(query, p)["rougeL"].fmeasure for p in pool]
        assert index.scores(query).tolist() == expected
        best, entry = index.best_match(query)
        if max(expected) > 0.7:
            assert best == max(expected) and expected[entry] == best
        else:
            assert (best, entry) == (0.0, -1)
        assert index.is_similar(query) == (max(expected) > 0.7)


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(1)

    def dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    for _ in range(300):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 150))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 150))]
        assert lcs_length(a, b) == dp(a, b)
    # the vectorised index at word boundaries (63, 64, 65, 128, 129 candidate tokens)
    for m in (63, 64, 65, 128, 129):
        a = " ".join(f"w{rng.randrange(8)}" for _ in range(m))
        pool = [" ".join(f"w{rng.randrange(8)}" for _ in range(rng.randrange(1, 200))) for _ in range(30)]
        scores = RougeLIndex(0.7, pool).scores(a)
        assert scores.tolist() == [rouge_l(a, p) for p in pool]


# ---------------------------------------------------------------------------------------------
# the stage, with a scripted generator


_WORDS = ("river mountain poem recipe budget planet violin garden bridge castle engine comet "
          "library pepper winter harbor lantern meadow puzzle rocket saddle tunnel velvet walnut").split()


class FakeTeacher:
    """Deterministic per (seed, row id, sample): mostly new instructions, some bad outputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
        self.calls.append({"prompts": list(prompts), "n": n, "seed": seed, "row_ids": list(row_ids),
                           "temperature": params.temperature, "prefix": prefix})
        out = []
        for prompt, row in zip(prompts, row_ids):
            samples = []
            for j in range(n):
                rng = random.Random(f"{seed}/{row}/{j}")
                if n == 1:  # a response
                    samples.append(Completion(f"Answer to: {prompt}", "stop", 9))
                    continue
                kind = rng.random()
                words = " ".join(rng.sample(_WORDS, 5))
                if kind < 0.15:
                    text = "I could not think of one."
                elif kind < 0.25:
                    text = f"<instruction>Describe the picture of a {words}.</instruction>"
                elif kind < 0.3:
                    text = "<instruction>Hmm.</instruction>"
                else:
                    lines = rng.randint(2, 9)
                    text = f"Useful because. <instruction>Write about {words} in {lines} lines.</instruction>"
                samples.append(Completion(text, "stop" if rng.random() < 0.9 else "length", 20))
            out.append(samples)
        return out


def _cfg(**kw):
    base = dict(num_instructions=30, prompts_per_round=4, samples_per_prompt=4)
    base.update(kw)
    return SynthesisConfig(**base)


RECORD_KEYS = {"id", "iteration", "prompt_index", "sample_index", "seed_prompt", "raw_output", "instruction",
               "response", "teacher", "instruction_sampling", "response_sampling", "finish_reason",
               "response_finish_reason"}


def _check_run(out, summary, cfg, seed=0):
    records = [json.loads(line) for line in open(os.path.join(out, "records.jsonl"))]
    dropped = [json.loads(line) for line in open(os.path.join(out, "dropped.jsonl"))]
    assert summary["kept"] == len(records)
    assert summary["samples"] == summary["kept"] + sum(summary["drops"].values()) + summary["unused"]
    assert summary["dropped"] == len(dropped) == sum(summary["drops"].values())
    assert set(summary["drops"]) == set(DROP_REASONS)
    for reason, count in summary["drops"].items():
        assert count == sum(d["reason"] == reason for d in dropped)
    ids = [r["id"] for r in records] + [d["id"] for d in dropped]
    assert len(ids) == len(set(ids))
    kept_before = []
    seeds = [t.text for t in load_seed_pool(cfg.seed_pool)]
    rounds = [json.loads(line) for line in open(os.path.join(out, "progress.jsonl"))][1:]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert extract_instruction(r["raw_output"]) is not None
        assert r["instruction"] == normalize(extract_instruction(r["raw_output"]))
        assert isinstance(r["response"], str)
        assert r["instruction_sampling"]["n"] == cfg.samples_per_prompt
        assert r["instruction_sampling"]["temperature"] == cfg.instruction_sampling.temperature
        assert r["response_sampling"]["temperature"] == cfg.response_sampling.temperature
        # the prompt is exactly what build_prompt gives from the instructions kept before its round
        start = next(x["prompt_start"] for x in rounds if x["prompt_start"] <= r["prompt_index"] < x["prompt_end"])
        earlier = [k["instruction"] for k in records if k["prompt_index"] < start]
        assert r["seed_prompt"] == build_prompt(seeds, earlier, seed=seed, iteration=cfg.iteration,
                                                index=r["prompt_index"], shots=cfg.shots,
                                                generated_shots=cfg.generated_shots, preamble=cfg.preamble)
        kept_before.append(r["instruction"])
    return records, dropped


def test_stage_records_and_drop_counts(tmp_path):
    cfg = _cfg(splits={"warmup": 10, "probe": 20})
    teacher = FakeTeacher()
    summary = synthesize(cfg, str(tmp_path / "out"), generator=teacher, seed=3, progress=False)
    records, dropped = _check_run(str(tmp_path / "out"), summary, cfg, seed=3)
    assert summary["kept"] == 30 and summary["stopped"] == "num_instructions reached"
    assert summary["drops"]["no_instruction_tag"] > 0 and summary["drops"]["blacklisted_word"] > 0
    assert summary["drops"]["too_short"] > 0
    # responses: one call per round with kept instructions, n=1, each instruction as the prompt
    response_calls = [c for c in teacher.calls if c["n"] == 1]
    assert [p for c in response_calls for p in c["prompts"]] == [r["instruction"] for r in records]
    assert all(r["response"] == f"Answer to: {r['instruction']}" for r in records)
    assert {c["temperature"] for c in response_calls} == {0.6}
    assert {c["temperature"] for c in teacher.calls if c["n"] == 4} == {1.0}
    # the later rounds show 2 kept instructions among the 8 shots
    last = records[-1]["seed_prompt"]
    assert sum(s in [r["instruction"] for r in records] for s in shots_of(last)) == 2
    # splits: contiguous slices in order, a seed prompt's records never cut between two splits
    warm = [json.loads(line) for line in open(tmp_path / "out" / "warmup.jsonl")]
    probe = [json.loads(line) for line in open(tmp_path / "out" / "probe.jsonl")]
    assert warm + probe == records
    assert not {r["seed_prompt"] for r in warm} & {r["seed_prompt"] for r in probe}
    cut = records_lib.split_bounds(30, {"warmup": 10, "probe": 20}, [r["seed_prompt"] for r in records])
    assert len(warm) == cut["warmup"][1] >= 10 and summary["splits"]["probe"]["rows"] == len(probe)


def test_stage_unused_samples_when_the_target_is_reached_mid_round(tmp_path):
    summary = synthesize(_cfg(num_instructions=3, prompts_per_round=8), str(tmp_path / "o"),
                         generator=FakeTeacher(), progress=False)
    assert summary["kept"] == 3 and summary["unused"] > 0
    assert summary["samples"] == 32 == 3 + summary["dropped"] + summary["unused"]


def test_stage_stops_at_the_prompt_budget(tmp_path):
    class Silent(FakeTeacher):
        def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
            return [[Completion("nothing", "stop", 1)] * n for _ in prompts]

    cfg = _cfg(num_instructions=10, max_prompts=6, splits={"warmup": 1})
    with pytest.raises(UserError, match="splits need 1 records .* has 0"):
        synthesize(cfg, str(tmp_path / "o"), generator=Silent(), progress=False)
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    assert summary["prompts"] == 6 and summary["kept"] == 0
    assert summary["drops"]["no_instruction_tag"] == 24 and summary["stopped"] == "prompt budget spent"


@pytest.mark.parametrize("splits, bounds", [
    ({"a": 0.5, "b": 0.5}, [(0, 5), (5, 10)]),
    ({"a": 0.25, "b": 0.5}, [(0, 2), (2, 8)]),  # cumulative rounding: 2.5 -> 2, 7.5 -> 8
    ({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, [(0, 3), (3, 7), (7, 10)]),
    ({"a": 3, "b": 4}, [(0, 3), (3, 7)]),
])
def test_split_bounds(splits, bounds):
    assert list(records_lib.split_bounds(10, splits).values()) == bounds
    with pytest.raises(UserError, match="need 7 records .* has 6"):
        records_lib.split_bounds(6, {"a": 3, "b": 4})


def test_split_order_puts_pairable_prompts_in_probe():
    from montessori_jax.stages.synthesis.stage import split_order

    recs = [{"seed_prompt": p, "i": i} for i, p in enumerate("abbcddde")]
    order = [r["i"] for r in split_order(recs, {"warmup": 3, "probe": 5}, 2)]
    assert order == [0, 3, 7, 1, 2, 4, 5, 6]  # a, c, e alone; then b b d d d
    assert [r["i"] for r in split_order(recs, {"probe": 5, "warmup": 3}, 2)] == [1, 2, 4, 5, 6, 0, 3, 7]
    assert [r["i"] for r in split_order(recs, {"warmup": 3, "probe": 5}, 1)] == list(range(8))
    groups = [r["seed_prompt"] for r in split_order(recs, {"warmup": 3, "probe": 5}, 2)]
    assert records_lib.split_bounds(8, {"warmup": 3, "probe": 5}, groups) == {"warmup": (0, 3), "probe": (3, 8)}


def test_split_bounds_keep_groups_whole():
    groups = list("aaabbbbccd")  # 10 records, 4 prompts
    assert list(records_lib.split_bounds(10, {"w": 0.5, "p": 0.5}, groups).values()) == [(0, 7), (7, 10)]
    assert list(records_lib.split_bounds(10, {"w": 3, "p": 4}, groups).values()) == [(0, 3), (3, 7)]
    assert list(records_lib.split_bounds(10, {"w": 2, "p": 2}, groups).values()) == [(0, 3), (3, 7)]
    assert list(records_lib.split_bounds(10, {"w": 0.05, "p": 0.05}, groups).values()) == [(0, 0), (0, 3)]


def test_config_validation():
    from montessori_jax.config import Config, ConfigError, load_config

    cfg = load_config(Config, None, ["synthesis.splits={warmup: 0.5, probe: 0.5}",
                                      "synthesis.instruction_sampling.temperature=0.8"])
    assert cfg.synthesis.splits == {"warmup": 0.5, "probe": 0.5}
    assert cfg.synthesis.instruction_sampling.temperature == 0.8
    assert cfg.synthesis.instruction_sampling.top_p == 0.9
    assert cfg.synthesis.response_sampling.temperature == 0.6
    for bad, match in [("synthesis.splits={a: 1, b: 0.5}", "all counts"), ("synthesis.shots=0", "shots=0"),
                       ("synthesis.generated_shots=9", "generated_shots=9"), ("synthesis.bogus=1", "unknown key"),
                       ("synthesis.splits={a: 100}", "splits need 100"),
                       ("synthesis.response_sampling.top_p=0", "top_p")]:
        with pytest.raises(ConfigError, match=match):
            load_config(Config, None, [bad])


# ---------------------------------------------------------------------------------------------
# resume


def _files(out):
    return {name: open(os.path.join(out, name), "rb").read()
            for name in ("records.jsonl", "dropped.jsonl", "warmup.jsonl", "probe.jsonl")}


class Crash(Exception):
    pass


def test_resume_after_a_kill_at_every_write_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = _cfg(num_instructions=14, splits={"warmup": 6, "probe": 8})
    ref_dir = str(tmp_path / "ref")
    reference = synthesize(cfg, ref_dir, generator=FakeTeacher(), progress=False)
    expected = _files(ref_dir)
    n_appends = 3 * reference["rounds"]

    real_append = records_lib.append_rows
    for crash_at in range(n_appends):
        for fraction in (0.0, 0.5):  # killed before writing, or halfway through a line
            def dying_append(path, rows, calls={"n": 0}, crash_at=crash_at, fraction=fraction):
                if calls["n"] == crash_at:
                    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(text[: int(len(text) * fraction)])
                    raise Crash
                calls["n"] += 1
                real_append(path, rows)

            out = str(tmp_path / f"run{crash_at}_{fraction}")
            monkeypatch.setattr(records_lib, "append_rows", dying_append)
            with pytest.raises(Crash):
                synthesize(cfg, out, generator=FakeTeacher(), progress=False)
            monkeypatch.setattr(records_lib, "append_rows", real_append)
            summary = synthesize(cfg, out, generator=FakeTeacher(), progress=False)
            assert _files(out) == expected, (crash_at, fraction)
            assert {k: summary[k] for k in ("kept", "drops", "unused", "prompts")} == \
                {k: reference[k] for k in ("kept", "drops", "unused", "prompts")}


_KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_synthesis import FakeTeacher, _cfg
from montessori_jax.stages.synthesis import synthesize

class Slow(FakeTeacher):
    def __call__(self, *args, **kw):
        time.sleep(0.5)
        return super().__call__(*args, **kw)

synthesize(_cfg(num_instructions=14, splits={{"warmup": 6, "probe": 8}}), {out!r}, generator=Slow(), progress=False)
"""


def test_resume_after_sigkill(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cfg = _cfg(num_instructions=14, splits={"warmup": 6, "probe": 8})
    reference = str(tmp_path / "ref")
    synthesize(cfg, reference, generator=FakeTeacher(), progress=False)
    out = str(tmp_path / "killed")
    code = _KILLED_RUN.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out)
    proc = subprocess.Popen([sys.executable, "-c", code])
    progress = os.path.join(out, "progress.jsonl")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(progress) and open(progress).read().count("\n") >= 2:  # one round committed
            break
        time.sleep(0.02)
    time.sleep(0.3)  # into the next round's generation
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = open(os.path.join(out, "records.jsonl")).read().count("\n")
    assert 0 < killed_rows < 14
    synthesize(cfg, out, generator=FakeTeacher(), progress=False)
    assert _files(out) == _files(reference)


def test_resume_repairs_truncated_last_lines_and_skips_finished_work(tmp_path):
    cfg = _cfg(num_instructions=12)
    out = str(tmp_path / "o")
    synthesize(cfg, out, generator=FakeTeacher(), progress=False)
    expected = open(os.path.join(out, "records.jsonl"), "rb").read()
    # an uncommitted round's rows (one whole, one cut mid-line), a truncated commit line
    with open(os.path.join(out, "records.jsonl"), "ab") as f:
        f.write(expected.splitlines(keepends=True)[0] + expected[:40])
    with open(os.path.join(out, "progress.jsonl"), "ab") as f:
        f.write(b'{"round": 99, "prompt_st')
    teacher = FakeTeacher()
    summary = synthesize(cfg, out, generator=teacher, progress=False)
    assert teacher.calls == []  # finished: nothing generated again
    assert open(os.path.join(out, "records.jsonl"), "rb").read() == expected
    assert summary["kept"] == 12
    # a larger target continues the same run
    bigger = synthesize(_cfg(num_instructions=20), out, generator=teacher, progress=False)
    records = [json.loads(line) for line in open(os.path.join(out, "records.jsonl"))]
    assert bigger["kept"] == len(records) == 20
    assert open(os.path.join(out, "records.jsonl"), "rb").read().startswith(expected)


def test_resume_refuses_other_settings_and_damaged_files(tmp_path):
    out = str(tmp_path / "o")
    synthesize(_cfg(num_instructions=8), out, generator=FakeTeacher(), progress=False)
    with pytest.raises(UserError, match=r"progress\.jsonl: .*other settings \(instruction_sampling\)"):
        synthesize(_cfg(num_instructions=8, instruction_sampling=GenerationConfig(temperature=0.5)), out,
                   generator=FakeTeacher(), progress=False)
    with pytest.raises(UserError, match=r"other settings \(seed\)"):
        synthesize(_cfg(num_instructions=8), out, generator=FakeTeacher(), seed=1, progress=False)
    lines = open(os.path.join(out, "records.jsonl")).read().splitlines(keepends=True)
    with open(os.path.join(out, "records.jsonl"), "w") as f:
        f.write("".join(lines[:2]) + "{oops\n" + "".join(lines[3:]))
    with pytest.raises(UserError, match=r"records\.jsonl, line 3: not a JSON object"):
        synthesize(_cfg(num_instructions=8), out, generator=FakeTeacher(), progress=False)
    with open(os.path.join(out, "records.jsonl"), "w") as f:
        f.write("".join(lines[:2]))
    with pytest.raises(UserError, match=r"records\.jsonl: has 2 complete rows"):
        synthesize(_cfg(num_instructions=8), out, generator=FakeTeacher(), progress=False)


# ---------------------------------------------------------------------------------------------
# end to end with real models


TINY_SEEDS = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "name a red fruit",
              "count to ten", "sing a song"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random tiny Llama (context 1024) and its tokenizer, through the real sampler."""
    from conftest import make_tiny_tokenizer, tiny_torch_llama

    from montessori_jax.stages.synthesis import TeacherGenerator

    folder = tmp_path_factory.mktemp("tiny_teacher")
    tok = make_tiny_tokenizer(folder)
    tiny_torch_llama(vocab_size=len(tok) + 20, max_position_embeddings=1024).save_pretrained(folder)
    return str(folder), TeacherGenerator.load(str(folder), batch_size=4)


def test_end_to_end_tiny_random_model(tmp_path, tiny_teacher):
    """The real tokenizer, chat template and sampler on a random model. Its text is gibberish,
    so the answer is forced to start with ``<instruction>Write `` (``instruction_prefix``) and
    every other sample gets a closing tag appended, giving the filters something to keep."""
    folder, teacher = tiny_teacher
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in TINY_SEEDS])
    calls = []

    def generator(prompts, params, *, n, seed, row_ids, prefix=""):
        out = teacher(prompts, params, n=n, seed=seed, row_ids=row_ids, prefix=prefix)
        calls.append((n, prefix, out))
        return [[Completion(c.text + "</instruction>" if n > 1 and j % 2 == 0 else c.text, c.finish_reason,
                            c.num_tokens) for j, c in enumerate(row)] for row in out]

    cfg = SynthesisConfig(
        seed_pool=seeds, num_instructions=None, max_prompts=6, prompts_per_round=3, shots=3, generated_shots=1,
        batch_size=4, preamble="Write one new instruction.\n", instruction_prefix="<instruction>Write ",
        instruction_sampling=GenerationConfig(temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=12),
        response_sampling=GenerationConfig(temperature=0.6, max_new_tokens=8), splits={"warmup": 0.5, "probe": 0.5},
    )
    out = str(tmp_path / "out")
    summary = synthesize(cfg, out, teacher=folder, generator=generator, progress=False)
    records, dropped = _check_run(out, summary, cfg)
    assert summary["samples"] == 24 and summary["unused"] == 0 and summary["kept"] >= 1
    assert summary["drops"]["no_instruction_tag"] >= 12 - sum(  # odd samples: no closing tag unless sampled
        "</instruction>" in c.text for n, _, o in calls if n == 4 for row in o for c in row[1::2])
    assert [p for n, p, _ in calls if n == 4] == ["<instruction>Write "] * 2  # two rounds
    assert {p for n, p, _ in calls if n == 1} == {""}  # responses: no prefix
    for row in records + dropped:
        assert row["raw_output"].startswith("<instruction>Write ")
    for r in records:
        assert r["teacher"] == folder and r["response_sampling"]["max_new_tokens"] == 8
        assert r["finish_reason"] in ("stop", "length") and r["response_finish_reason"] in ("stop", "length")
    responses = [c for n, _, o in calls if n == 1 for row in o for c in row]
    assert [c.text for c in responses] == [r["response"] for r in records]
    assert all(c.num_tokens <= 8 for c in responses)
    # the same seed gives the same prompts and, with the same sampler, the same samples
    again = str(tmp_path / "again")
    synthesize(cfg, again, teacher=folder, generator=generator, progress=False)
    assert open(os.path.join(again, "records.jsonl")).read() == open(os.path.join(out, "records.jsonl")).read()
    warm = open(os.path.join(out, "warmup.jsonl")).read().splitlines()
    probe = open(os.path.join(out, "probe.jsonl")).read().splitlines()
    assert len(warm) + len(probe) == len(records)
    assert teacher.sampler.num_compiled <= 8


@pytest.mark.slow
def test_end_to_end_smollm2_two_prompts(tmp_path):
    cfg = SynthesisConfig(num_instructions=None, max_prompts=2, prompts_per_round=2, instruction_prefix="<instruction>",
                          instruction_sampling=GenerationConfig(temperature=1.0, max_new_tokens=256),
                          response_sampling=GenerationConfig(temperature=0.6, max_new_tokens=256))
    out = str(tmp_path / "out")
    summary = synthesize(cfg, out, teacher="smollm2", progress=False)
    records, dropped = _check_run(out, summary, cfg)
    assert summary["samples"] == 8 and summary["prompts"] == 2
    assert all(r["teacher"] == "smollm2" for r in records)
    assert all(r["response"].strip() for r in records)
    assert all(row["raw_output"].startswith("<instruction>") for row in records + dropped)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_synthesize_reports_a_bad_seed_pool(tmp_path, capsys):
    from montessori_jax.cli import main

    pool = write_jsonl(tmp_path / "pool.jsonl", ['{"instruction": "ok"}', '{"text": "no instruction"}'])
    code = main(["synthesize", "--out", str(tmp_path / "o"), f"synthesis.seed_pool={pool}"])
    assert code == 2
    assert "pool.jsonl, line 2: no 'instruction' field" in capsys.readouterr().err
    assert main(["synthesize", "--out", str(tmp_path / "o"), "synthesis.shots=0"]) == 2
    assert "shots=0 must be >= 1" in capsys.readouterr().err


def test_cli_bench_dedup(tmp_path, capsys):
    from montessori_jax.cli import main

    out = str(tmp_path / "dedup.json")
    assert main(["bench", "dedup", "--candidates", "150", "--rouge-pairs", "200", "--json", out]) == 0
    assert "ours (RougeLIndex)" in capsys.readouterr().out
    result = json.load(open(out))
    assert result["kept"] + result["dropped"] == 150 and result["kept"] > 0 and result["dropped"] > 0
    assert result["score_mismatches"] == 0 and result["decision_mismatches"] == 0
    n_seeds = result["settings"]["seed_pool"]
    assert n_seeds * 150 < result["pairs"] < (n_seeds + 150) * 150  # every candidate met the growing pool
    assert result["ours_s"] > 0 and result["rouge_score_s"] > 0 and "cpu_count" in result["machine"]


# ---------------------------------------------------------------------------------------------
# switches that reproduce the original method (docs/fidelity.md)


def test_rouge_against_shown_compares_with_the_rounds_examples_only():
    seeds = ["Write a short poem about the sea.", "List three primary colors."]
    pool = InstructionFilter(seeds)
    shown = InstructionFilter(seeds, rouge_against="shown")
    near = _tag("Write a short poem about the sea and the sky.")
    assert pool.check(near).reason == "too_similar"
    with pytest.raises(RuntimeError, match="set_shown"):
        shown.check(near)
    shown.set_shown(["List three primary colors."])  # the poem seed is in the pool, not in the round
    assert shown.check(near).kept
    shown.set_shown(["List three primary colors.", "Write a short poem about the sea."])
    v = shown.check(near)
    assert v.reason == "too_similar" and v.similar_to == "Write a short poem about the sea."
    # instructions kept earlier in the run count in both modes, whatever the round shows
    shown.set_shown([])
    assert shown(_tag("Name five famous bridges in Europe and their lengths.")).kept
    v = shown.check(_tag("Name five famous bridges in Asia and their lengths."))
    assert v.reason == "too_similar" and v.similar_to == "Name five famous bridges in Europe and their lengths."
    with pytest.raises(ValueError, match="rouge_against"):
        InstructionFilter(seeds, rouge_against="prompt")


class EchoTeacher:
    """For each round: sample 0 of each prompt is a seed that no prompt of the round shows (and
    was not written before), sample 1 is the first example its own prompt shows; prompt 3
    repeats the instruction written for prompt 0."""

    def __init__(self, seeds):
        self.seeds, self.used, self.first = list(seeds), set(), None

    def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
        if n == 1:
            return [[Completion(f"Answer to: {p}", "stop", 3)] for p in prompts]
        round_shots = {s for p in prompts for s in shots_of(p)}
        out = []
        for prompt, row in zip(prompts, row_ids):
            unseen = next(s for s in self.seeds if s not in round_shots and s not in self.used)
            self.used.add(unseen)
            self.first = self.first or unseen
            sample0 = self.first if row == 3 else unseen
            out.append([Completion(f"<instruction>{sample0}</instruction>"),
                        Completion(f"<instruction>{shots_of(prompt)[0]}</instruction>")])
        return out


def test_stage_rouge_against_shown_reproduces_the_originals_comparison_set(tmp_path):
    # seeds with no token in common, so only an exact repeat is similar
    seeds = [f"alpha{i} beta{i} gamma{i} delta{i}" for i in range(40)]
    pool = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in seeds])
    runs = {}
    for against in ("pool", "shown"):
        cfg = _cfg(seed_pool=pool, num_instructions=None, max_prompts=4, prompts_per_round=2, samples_per_prompt=2,
                   shots=3, generated_shots=0, rouge_against=against)
        out = str(tmp_path / against)
        summary = synthesize(cfg, out, generator=EchoTeacher(seeds), progress=False)
        records = [json.loads(line) for line in open(os.path.join(out, "records.jsonl"))]
        dropped = [json.loads(line) for line in open(os.path.join(out, "dropped.jsonl"))]
        runs[against] = summary, records, dropped
    summary, records, dropped = runs["pool"]  # every seed is in the comparison set: nothing new
    assert summary["kept"] == 0 and summary["drops"]["too_similar"] == 8
    summary, records, dropped = runs["shown"]
    # unshown seeds are kept, the prompt's own example and the repeat of a kept one are not
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (1, 0), (2, 0)]
    assert [(d["prompt_index"], d["sample_index"], d["reason"]) for d in dropped] == [
        (0, 1, "too_similar"), (1, 1, "too_similar"), (2, 1, "too_similar"), (3, 0, "too_similar"),
        (3, 1, "too_similar")]
    assert dropped[3]["similar_to"] == records[0]["instruction"] and dropped[3]["score"] == 1.0
    for d in dropped:
        if d["sample_index"] == 1:
            prompt = build_prompt([t for t in seeds], [], seed=0, iteration=0, index=d["prompt_index"], shots=3,
                                  generated_shots=0)
            assert d["similar_to"] == shots_of(prompt)[0]
    # a folder written with one comparison set does not resume with the other
    with pytest.raises(UserError, match=r"other settings \(rouge_against\)"):
        synthesize(_cfg(seed_pool=pool, num_instructions=None, max_prompts=4, prompts_per_round=2,
                        samples_per_prompt=2, shots=3, generated_shots=0), str(tmp_path / "shown"),
                   generator=EchoTeacher(seeds), progress=False)


def test_lowercase_instructions_as_the_original():
    raw = _tag("  Summarize   the REPORT on NASA's budget.  ")
    assert InstructionFilter([]).check(raw).instruction == "Summarize the REPORT on NASA's budget."
    lower = InstructionFilter([], lowercase=True)
    assert lower.check(raw).instruction == "Summarize the report on nasa's budget."
    assert lower.check(_tag("write a haiku about Paris")).instruction == "Write a haiku about paris"


def test_stage_lowercase_instructions(tmp_path):
    def teacher(prompts, params, *, n, seed, row_ids, prefix=""):
        return [[Completion("<instruction>Name the CAPITAL of France</instruction>")] * n for _ in prompts]

    assert not SynthesisConfig().lowercase_instructions
    cfg = SynthesisConfig(num_instructions=1, prompts_per_round=1, samples_per_prompt=1, lowercase_instructions=True)
    summary = synthesize(cfg, str(tmp_path / "o"), generator=teacher, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "records.jsonl")]
    assert summary["kept"] == 1 and rows[0]["instruction"] == "Name the capital of france"
    assert rows[0]["raw_output"] == "<instruction>Name the CAPITAL of France</instruction>"
    # the switch is part of the folder's settings
    with pytest.raises(UserError, match=r"other settings \(lowercase_instructions\)"):
        synthesize(SynthesisConfig(num_instructions=1, prompts_per_round=1, samples_per_prompt=1),
                   str(tmp_path / "o"), generator=teacher, progress=False)


def test_prompt_file_gives_the_preamble(tmp_path):
    from montessori_jax.config import Config, ConfigError, load_config

    text_ = "Write one new task for an assistant, in <instruction> tags. \u00c9xamples:\n"
    path = tmp_path / "preamble.txt"
    path.write_text(text_, encoding="utf-8")
    cfg = _cfg(num_instructions=4, prompt_file=str(path))
    out = str(tmp_path / "o")
    synthesize(cfg, out, generator=FakeTeacher(), progress=False)
    rows = [json.loads(line) for line in open(os.path.join(out, "records.jsonl"))]
    assert rows and all(r["seed_prompt"].startswith(text_ + "<instruction>") for r in rows)
    assert len(shots_of(rows[0]["seed_prompt"], text_)) == 8
    # other wording in the file: the folder does not resume
    path.write_text("Another preamble.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"other settings \(preamble_sha256\)"):
        synthesize(cfg, out, generator=FakeTeacher(), progress=False)
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=rf"^synthesis\.prompt_file: {missing}: no such file$"):
        synthesize(_cfg(prompt_file=str(missing)), str(tmp_path / "m"), generator=FakeTeacher(), progress=False)
    assert not os.path.exists(tmp_path / "m")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"synthesis\.prompt_file: .*preamble\.txt: not UTF-8"):
        synthesize(cfg, str(tmp_path / "u"), generator=FakeTeacher(), progress=False)
    with pytest.raises(ConfigError, match=r"^override '.*': synthesis: preamble and prompt_file are both set"):
        load_config(Config, None, [f"synthesis.prompt_file={path}", "synthesis.preamble=Hi"])
    for bad in ("synthesis.rouge_against=prompt", "synthesis.lowercase_instructions=yes"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(Config, None, [bad])


def test_teacher_generator_loads_the_teachers_chat_template(tmp_path, tiny_teacher):
    from montessori_jax.config import ModelConfig
    from montessori_jax.core import text
    from montessori_jax.stages.synthesis import TeacherGenerator

    folder, _ = tiny_teacher
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<bot>{% endif %}", encoding="utf-8")
    gen = TeacherGenerator.load(ModelConfig(path=folder, chat_template=str(path)), batch_size=2)
    assert gen.tokenizer.decode(text.encode_prompt(gen.tokenizer, "the dog sat")) == "<user>the dog sat<bot>"
    with pytest.raises(UserError, match=r"^teacher\.chat_template: .*nope\.jinja: no such template file$"):
        TeacherGenerator.load(ModelConfig(path=folder, chat_template=str(tmp_path / "nope.jinja")))
