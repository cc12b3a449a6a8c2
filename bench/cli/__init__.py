"""The command line, `python -m bench`: the parser (parser.py) and the commands (commands.py)."""

from bench.cli.commands import main, sweep_of
from bench.cli.parser import build_parser

__all__ = ["main", "build_parser", "sweep_of"]
