"""The ``gaqprune`` command line (a LightningCLI): parsing, checks of what a command asks for, process launch."""


def main(args: list[str] | None = None) -> None:
    """Console entry point (``gaqprune``; ``python -m gaqprune.cli``)."""
    from gaqprune.cli.main import run

    run(args)
