"""The `vla-prune` subcommands (cli.py builds the parser and dispatches to them)."""
