"""MLproject entry point `promote`: see `fgvc promote --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("promote")
