"""``python -m della_cli`` and the ``della`` console script.

The signal handlers are installed before anything else is imported (typer, numpy and della's
modules take a few hundred milliseconds to load), so that SIGINT or SIGTERM at any instant ends
della with exit 130 rather than killing it by the signal (``io.interrupts``).
"""

from della_cli.io import interrupts

interrupts.install()


def main() -> None:
    from della_cli.cli import main as run

    run()


if __name__ == "__main__":
    main()
