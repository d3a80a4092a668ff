"""One module per command (`fgvc train`, `analyze`, `study`, `prepare`, `predict`, `mask`,
`register`, `promote`): what the command does, step by step, recorded in MLflow through
fgvc.tracking. The CLI (fgvc/cli.py) parses a command's options into its typed config and calls
its `run_*` function here. Importing this package imports nothing heavy."""
