"""The README's two commands are the contract: CI runs the test one verbatim, and the files
and commands the main one names exist."""

import os
import re
import shlex

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.+?)\n```", readme)[:2]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = _readme_commands()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_cmd in ci.splitlines()


def test_main_command_names_existing_files_and_commands():
    from montessori_jax.cli import build_parser

    main_cmd, _ = _readme_commands()
    last = main_cmd.split("&&")[-1]
    argv = shlex.split(last)
    assert argv[0] == ".venv/bin/montessori"
    args = build_parser().parse_args(argv[1:])
    for flag in ("input", "config"):
        path = getattr(args, flag, None)
        if path:
            assert os.path.exists(os.path.join(ROOT, path)), path
