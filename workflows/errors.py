"""Errors a user can act on: the CLI prints their message alone (tracebacks with --debug)."""


class CnnflowError(Exception):
    """Something the user can fix: a wrong path, an unknown model, an unreachable server."""
