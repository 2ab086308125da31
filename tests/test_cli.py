"""The console script: every sub-command has --help, and the lazy command table is complete."""

from __future__ import annotations

import subprocess
import sys

from distilflow.cli import COMMAND_MODULES, COMMANDS, build_parser


def test_command_table_matches_registered_commands():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert registered == set(COMMANDS)
    assert set(COMMANDS.values()) == set(COMMAND_MODULES)


def test_every_subcommand_has_help():
    for cmd in COMMANDS:
        parser = build_parser([cmd])
        sub = parser._subparsers._group_actions[0].choices[cmd]  # type: ignore[union-attr]
        text = sub.format_help()
        assert "usage: distilflow" in text and "--help" in text, cmd


def test_prepare_does_not_import_torch():
    code = ("import sys; from distilflow.cli import build_parser; build_parser(['prepare']); "
            "from distilflow.tasks.prepare.pairs import load_tokenizer; "
            "from tests.conftest import BERT_TOKENIZER; load_tokenizer(str(BERT_TOKENIZER)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
