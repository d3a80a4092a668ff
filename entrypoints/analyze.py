"""MLproject entry point `analyze`: see `fgvc analyze --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("analyze")
