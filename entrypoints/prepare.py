"""MLproject entry point `prepare`: see `fgvc prepare --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("prepare")
