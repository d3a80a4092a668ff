"""MLproject entry point `train`: see `fgvc train --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("train")
