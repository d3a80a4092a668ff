"""MLproject entry point `register`: see `fgvc register --help`."""

from fgvc.cli import run

if __name__ == "__main__":
    run("register")
