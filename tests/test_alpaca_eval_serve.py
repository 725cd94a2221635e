"""alpaca_eval 0.6.6's own `evaluate` (its CLI, in a subprocess) with an annotator of ours pointed at
`montessori serve`: the embedded SmolLM2 as a weak but real pairwise judge on loopback.

alpaca_eval's `openai_completions` passes its `completions_kwargs` on to the OpenAI client helper,
whose `client_config_path` names a YAML of `openai.OpenAI(...)` keyword sets (`default:` for any
model): ours gives `base_url` (the server) and a dummy `api_key`, so no environment variable is
needed and nothing reaches api.openai.com."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("alpaca_eval")
pytest.importorskip("openai")

pytestmark = pytest.mark.slow

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "alpaca_sample.json")

# our own wording; alpaca_eval turns the <|im_start|> blocks into chat messages
TEMPLATE = """<|im_start|>system
You compare two answers to the same request and name the better one.
<|im_end|>
<|im_start|>user
Request: {instruction}

Answer (a): {output_1}

Answer (b): {output_2}

Which answer serves the request better? Reply with only "(a)" or "(b)".
<|im_end|>"""


def _outputs(path, generator, answers):
    rows = [{"instruction": r["instruction"], "output": a, "generator": generator}
            for r, a in zip(json.load(open(SAMPLE)), answers)]
    with open(path, "w") as f:
        json.dump(rows, f)
    return str(path)


def test_alpaca_eval_against_montessori_serve(served_smollm2, tmp_path):
    instructions = [r["instruction"] for r in json.load(open(SAMPLE))]
    assert len(instructions) == 3
    model = _outputs(tmp_path / "model_outputs.json", "student",
                     ["Napping in a warm patch of sun, chasing shadows, and watching birds from the window.",
                      "Sunlight carries energy that our skin absorbs as heat.",
                      "Hello! Would you like to walk our dogs together in the park on Saturday morning?"])
    reference = _outputs(tmp_path / "reference_outputs.json", "reference", ["no", "no", "no"])

    client = tmp_path / "client.yaml"
    client.write_text(f"default:\n  - api_key: not-needed\n    base_url: {served_smollm2}\n"
                      f"    timeout: 120\n    max_retries: 0\n")
    folder = tmp_path / "annotators" / "montessori_judge"
    folder.mkdir(parents=True)
    (folder / "prompt.txt").write_text(TEMPLATE)
    # prompt_template is read relative to the config folder's parent (alpaca_eval's base_dir)
    (folder / "configs.yaml").write_text(
        "montessori_judge:\n"
        "  prompt_template: montessori_judge/prompt.txt\n"
        "  fn_completions: openai_completions\n"
        "  completions_kwargs:\n"
        "    model_name: judge\n"
        "    max_tokens: 8\n"
        "    temperature: 0\n"
        "    num_procs: 2\n"
        f"    client_config_path: {client}\n"
        "  fn_completion_parser: regex_parser\n"
        "  completion_parser_kwargs:\n"
        "    outputs_to_match:\n"
        "      1: '\\(a\\)'\n"
        "      2: '\\(b\\)'\n"
        "  batch_size: 1\n")
    out = tmp_path / "results"
    env = {**os.environ, "OPENAI_API_KEY": "not-needed", "IS_ALPACA_EVAL_2": "True"}
    proc = subprocess.run(
        [sys.executable, "-m", "alpaca_eval.main", "evaluate", "--model_outputs", model,
         "--reference_outputs", reference, "--annotators_config", str(folder), "--output_path", str(out),
         "--fn_metric", "get_winrate", "--sort_by", "win_rate", "--precomputed_leaderboard", "None",
         "--is_cache_leaderboard", "False", "--caching_path", "None"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    annotations = json.load(open(out / "annotations.json"))
    assert sorted(a["instruction"] for a in annotations) == sorted(instructions)
    for a in annotations:
        assert a["generator_2"] == "student" and a["generator_1"] == "reference"
        # 1: the reference won, 2: the student won; None where our weak judge's reply did not parse
        assert a["preference"] is None or a["preference"] in (1, 2, 1.0, 2.0), a
        assert a["annotator"] == "montessori_judge"
    import pandas as pd

    board = pd.read_csv(out / "leaderboard.csv", index_col=0)
    assert "win_rate" in board.columns and "student" in board.index
    parsed = [a["preference"] for a in annotations if a["preference"] is not None]
    if parsed:
        assert int(board.loc["student", "n_total"]) == len(parsed)
        assert 0.0 <= board.loc["student", "win_rate"] <= 100.0
