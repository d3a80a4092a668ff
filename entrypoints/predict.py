"""MLproject entry point `predict`: see `fgvc predict --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("predict")
