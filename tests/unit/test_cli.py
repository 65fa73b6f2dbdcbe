"""The `clipscale` command line: options anywhere, help of every verb, no torch where no model is needed."""
import os
import subprocess
import sys

import pytest

from clipscale.cli import build_parser, main
from clipscale.data_tools.cli import build_parser as build_data_parser
from tests.helpers import REPO


def verb_parsers():
    """(name, parser) of every `clipscale` verb and every `clipscale data` verb."""
    for parser, prefix in ((build_parser(), ""), (build_data_parser(), "data ")):
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        for name, verb in sub.choices.items():
            if name != "data":
                yield prefix + name, verb


@pytest.mark.parametrize("name, verb", list(verb_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_help_shows_one_line_with_its_default_per_option(name, verb, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that nothing wraps: one line per argument
    lines = verb.format_help().splitlines()
    for action in verb._actions:
        if not action.option_strings or action.dest == "help":
            continue
        line = next(line for line in lines if line.split()[:1] == [action.option_strings[0]])
        assert action.help, f"clipscale {name} {action.option_strings[0]} has no help"
        if action.default not in (None, False, "", []):
            assert "default" in line, f"clipscale {name} {action.option_strings[0]}: no default shown: {line}"


def test_options_after_the_recipe_leave_the_overrides_intact(capsys):
    recipe = str(REPO / "recipes" / "tiny_cpu.toml")
    assert main(["train", recipe, "--print-run-dir", "run.name=x", "run.output_dir=elsewhere"]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("elsewhere", "x"))


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", [
    ["train", "--print-run-dir", "run.name=x"],
    ["sweep", "scaling_tiny", "--dry-run"],
    ["results", "--help"],
    ["plan", "--help"],
])
def test_commands_that_need_no_model_import_no_torch(argv, tmp_path):
    proc = run_python("import sys; from clipscale.cli import main\n"
                      f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                      "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


def tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("local", [False, True])
def test_sweep_dry_run_writes_nothing(local, tmp_path):
    before = tree(tmp_path)
    argv = ["sweep", "scaling_tiny", "--dry-run", f"run.output_dir={str(tmp_path / 'runs')!r}"] + (["--local"] if local else [])
    proc = run_python(f"from clipscale.cli import main; raise SystemExit(main({argv!r}))", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path) == before
    command = "torch.distributed.run" if local else "array_job=$(sbatch"
    assert command in proc.stdout and "run.name=" in proc.stdout
