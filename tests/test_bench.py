"""Every benchmark script runs end to end in its smoke mode.

Speed is never asserted here (that is what the benchmarks measure); this only checks that each
script still works against the current code and prints its targets, so a change to an API a
benchmark uses is caught by the suite rather than on the day someone needs the figures.
(`bench/gpu.py --dry-run` is run by tests/test_loop.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from stores import new_store

ROOT = Path(__file__).resolve().parents[1]

SMOKE = [
    ("analysis.py", ["--quick"], "target: cosine_topk time / faiss time"),
    ("train_throughput.py", ["--quick"], "target: [resnet18"),
    ("data_loading.py", ["--quick"], "target: our loader's RssAnon growth"),
    ("scale.py", ["--quick"], "target: ingest on 2 cores"),
    ("mask_throughput.py", ["--quick"], "target: masking pipeline / raw"),
    ("cli_latency.py", ["--quick"], "target: fgvc train --arch nonsense seconds <= 1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expected", SMOKE, ids=[s for s, _, _ in SMOKE])
def test_benchmark_smoke_run(script, args, expected, tmp_path, store_template):
    extra = ["--dir", str(tmp_path / "scale")] if script == "scale.py" else []
    env = {**os.environ, "FGVC_OFFLINE": "1", "MLFLOW_TRACKING_URI": new_store(store_template, tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert expected in output, output[-3000:]
