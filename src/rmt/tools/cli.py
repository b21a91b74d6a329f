"""`rmt` subcommands of rmt.tools (registered by rmt.cli)."""


def add_commands(subparsers) -> None:
    """Add this package's subcommands to the `rmt` parser."""
