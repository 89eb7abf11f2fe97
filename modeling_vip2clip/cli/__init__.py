"""The `vip2clip` command line: one module per command (options → a call of its job), the shared options and the
error boundary. `main` is the dispatcher (`vip2clip = modeling_vip2clip.cli:main`)."""

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
