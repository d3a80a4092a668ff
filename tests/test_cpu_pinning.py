"""The suite runs on the CPU even on a GPU host (tests/conftest.py), subprocesses included;
only `pytest -m gpu` sees the GPUs."""

import os
import subprocess
import sys


def test_the_suite_and_its_subprocesses_see_no_gpu():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    seen = subprocess.run([sys.executable, "-c", "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']),"
                           " torch.cuda.is_available())"], capture_output=True, text=True, timeout=120)
    assert seen.stdout.split() == ["''", "False"]
