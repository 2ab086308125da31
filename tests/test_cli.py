"""The console script: a complete, lazy command table; help that imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distilflow.cli import COMMANDS, build_parser, main
from distilflow.tasks.core.config import CommandSpec


def test_every_command_has_a_spec_whose_runner_exists():
    import importlib

    for name, cmd in COMMANDS.items():
        module, _, attr = cmd.spec.partition(":")
        spec = getattr(importlib.import_module(module), attr)
        assert isinstance(spec, CommandSpec), name
        run_module, _, run_attr = spec.run.partition(":")
        assert callable(getattr(importlib.import_module(run_module), run_attr)), name


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('MODULES', *sys.modules)"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.rsplit("MODULES", 1)[1].split())


HEAVY = {"torch", "prefect", "transformers", "pyarrow", "tokenizers"}


def test_top_level_help_imports_no_job_code():
    mods = _modules_after("from distilflow.cli import build_parser\n"
                          "try:\n    build_parser(['--help']).parse_args(['--help'])\nexcept SystemExit:\n    pass")
    assert not HEAVY & mods
    assert not any(m.startswith("distilflow.tasks.") and m != "distilflow.tasks" for m in mods)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_imports_only_its_config(command):
    mods = _modules_after(f"from distilflow.cli import build_parser\n"
                          f"try:\n    build_parser([{command!r}, '--help']).parse_args([{command!r}, '--help'])\n"
                          "except SystemExit:\n    pass")
    assert not HEAVY & mods, sorted(HEAVY & mods)


def test_config_errors_are_one_line_exit_2(capsys):
    assert main(["prepare", "--input", "x.txt", "--output", "/tmp/o", "--tokenizer", "t",
                 "--max-seq-len", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_seq_len" in err and err.startswith("distilflow prepare: error:")


def test_unknown_option_is_argparse_usage_error():
    with pytest.raises(SystemExit) as e:
        build_parser(["qa"]).parse_args(["qa", "--no-such-flag"])
    assert e.value.code == 2


def test_prepare_does_not_import_torch():
    """Neither the prepare flow's process (flow module, preflight, tokenizer copy, hash and info) nor its
    workers import torch (~1.2 s and ~250 MB a process): the tokenizer folder check shares a module with
    the model loaders, which import torch only where they need it."""
    mods = _modules_after("from distilflow.cli import build_parser; build_parser(['prepare'])\n"
                          "import distilflow.flows.prepare\n"
                          "from distilflow.tasks.core.hf import check_tokenizer_folder\n"
                          "from distilflow.tasks.prepare.job import tokenizer_info\n"
                          "from distilflow.tasks.prepare.pairs import tokenizer_sha256\n"
                          "from tests.conftest import BERT_TOKENIZER\n"
                          "check_tokenizer_folder(str(BERT_TOKENIZER)); tokenizer_info(str(BERT_TOKENIZER))\n"
                          "tokenizer_sha256(str(BERT_TOKENIZER))")
    assert "torch" not in mods


def test_console_script_exits_with_mains_code_after_threads_and_atexit(tmp_path):
    """``console`` skips only CPython's final teardown: non-daemon threads still finish, atexit handlers still
    run, buffered output still comes out, and the exit code is main's."""
    code = ("import atexit, sys, threading, time\n"
            "from pathlib import Path\n"
            "from distilflow import cli\n"
            "d = Path(sys.argv[1])\n"
            "def late():\n    time.sleep(0.3); (d / 'thread').write_text('done')\n"
            "def main():\n"
            "    threading.Thread(target=late).start()\n"
            "    atexit.register(lambda: (d / 'atexit').write_text('ran'))\n"
            "    print('buffered, no newline', end='')\n"
            "    return 3\n"
            "cli.main = main\n"
            "cli.console()\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
