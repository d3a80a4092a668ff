"""MLproject entry point `study`: see `fgvc study --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("study")
