"""MLproject entry point `mask`: see `fgvc mask --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("mask")
