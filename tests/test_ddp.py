"""Data-parallel training: two gloo processes under torchrun behave like one process with the
same global batch, log one MLflow run, resume, and stop together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from fgvc.data.dataset import ShardDataset
from fgvc.distributed import World
from fgvc.models import create_model
from fgvc.tasks.train import run_train
from fgvc.training.config import TrainConfig
from fgvc.training.ddp import EqualShareLoader, wrap_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/top5", "val/error", "val/balanced_acc",
           "lr/backbone", "lr/head", "time/epoch_s", "throughput/train_img_s"]

# No BatchNorm (GroupNorm): PyTorch's SyncBatchNorm needs CUDA, and without it each CPU rank
# would normalise over half the batch. 24 train images, global batch 8: 3 steps per epoch.
ARCH = "timm:test_efficientnet_gn"
OPTIONS = dict(arch=ARCH, pretrained=False, epochs=2, batch_size=8, num_workers=0, seed=0, val_count=11)


def cli_args(root: Path, **overrides) -> list[str]:
    params = TrainConfig(**{**OPTIONS, "data_root": str(root), **overrides}).params()
    return [arg for key in (*OPTIONS, "data_root") for arg in (f"--{key.replace('_', '-')}", params[key])]


def torchrun(cwd: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 <args>` on the CPU, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def last_checkpoint(run_id: str) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_ranks_get_equal_disjoint_shares_of_each_epoch(tiny_root):
    ds = ShardDataset(tiny_root, "train", count=23)  # 23 = 11 + 11 + one left over
    loaders = [EqualShareLoader(ds, 4, shuffle=True, seed=3, rank=r, world_size=2, prefetch=0) for r in (0, 1)]
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        shares = [loader.order() for loader in loaders]
        assert [len(s) for s in shares] == [11, 11] and [len(loader) for loader in loaders] == [3, 3]
        assert not set(shares[0].tolist()) & set(shares[1].tolist())
        full = EqualShareLoader(ds, 8, shuffle=True, seed=3, prefetch=0)
        full.set_epoch(epoch)
        assert sorted(torch.cat(shares).tolist()) == sorted(full.order()[:22].tolist())


@pytest.mark.slow
def test_two_processes_give_one_run_and_the_model_of_one_process(tiny_root, mlflow_store, tmp_path):
    single = run_train(TrainConfig(data_root=str(tiny_root), registered_model=False, **OPTIONS), progress=False)

    ddp = torchrun(tmp_path, "-m", "fgvc.cli", "train", *cli_args(tiny_root))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    runs = mlflow.search_runs(experiment_names=["fgvc-train"], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # the single-process reference and ONE run for both ranks
    run_id = runs.run_id.tolist()[1]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["world_size"] == "2" and p["batch_size"] == "8" and p["batch_size_per_rank"] == "4"
    assert p["val_images"] == "11" and p["train_images"] == "24"
    for key in METRICS:  # one value per epoch: only rank 0 logs
        assert [step for step, _ in history(run_id, key)] == [1, 2], key
    # validation covers the 11 images exactly once (6 on rank 0, 5 on rank 1): same numbers
    for key in ("val/loss", "val/acc", "val/top5", "train/loss", "train/acc"):
        assert [v for _, v in history(run_id, key)] == pytest.approx(
            [v for _, v in history(single.run_id, key)], rel=1e-4, abs=1e-6), key

    assert_same_model(last_checkpoint(run_id)["model"], last_checkpoint(single.run_id)["model"])
    version = MlflowClient().get_model_version_by_alias("fgvc-timm-test_efficientnet_gn", "candidate")
    assert version.run_id == run_id


@pytest.mark.slow
def test_two_processes_resume_a_run_interrupted_in_one(tiny_root, mlflow_store, tmp_path):
    full = run_train(TrainConfig(data_root=str(tiny_root), registered_model=False, **OPTIONS), progress=False)

    class InterruptAfterEpoch1:
        def on_epoch_end(self, record, session):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(TrainConfig(data_root=str(tiny_root), registered_model=False, **OPTIONS),
                  callbacks=[InterruptAfterEpoch1()], progress=False)
    interrupted = mlflow.search_runs(experiment_names=["fgvc-train"], filter_string="attributes.status = 'KILLED'")
    run_id = interrupted.run_id.item()

    # `fgvc train --nproc 2` relaunches itself under torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    resumed = subprocess.run([sys.executable, "-m", "fgvc.cli", "train", *cli_args(tiny_root), "--nproc", "2",
                              "--resume", "true", "--registered-model", "none"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "launching 2 training processes" in resumed.stderr
    assert len(mlflow.search_runs(experiment_names=["fgvc-train"])) == 2  # continued, not a new run
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["world_size_effective"] == "2"
    for key in ("train/loss", "val/loss", "val/acc", "lr/head"):
        assert [s for s, _ in history(run_id, key)] == [1, 2], key
        assert [v for _, v in history(run_id, key)] == pytest.approx(
            [v for _, v in history(full.run_id, key)], rel=1e-4, abs=1e-6), key
    assert_same_model(last_checkpoint(run_id)["model"], last_checkpoint(full.run_id)["model"])


COLLECTIVES = textwrap.dedent('''
    """Run by torchrun with 2 CPU processes; writes what each rank saw to <out>/rank<r>.json."""
    import json, sys
    import torch
    import torch.nn as nn
    from fgvc.data.dataset import BatchLoader, ShardDataset
    from fgvc.models import create_model
    from fgvc import distributed
    from fgvc.training import ddp
    from fgvc.training.loop import NonFiniteLoss, build_optimizer, evaluate, evaluate_sharded, train_one_epoch

    root, out = sys.argv[1], sys.argv[2]
    with distributed.process_group(torch.device("cpu")) as world:
        seen = {"backend": world.backend, "world_size": world.world_size}
        seen["all_true"] = distributed.all_ranks_true(torch.tensor(True))
        seen["one_false"] = distributed.all_ranks_true(torch.tensor(world.rank == 0))
        seen["from_main"] = distributed.from_main(lambda: "value of rank 0")

        def fail():
            raise ValueError("no such run")
        try:
            distributed.from_main(fail)
        except Exception as e:
            seen["from_main_error"] = f"{type(e).__name__}: {e}"

        val = ShardDataset(root, "val", count=11)
        torch.manual_seed(0)
        model = ddp.wrap_model(create_model("fn-small", val.num_classes, False), world)
        sharded = evaluate_sharded(model, BatchLoader(val, 4, rank=world.rank, world_size=2, prefetch=0),
                                   val.num_classes, world.device)
        whole = evaluate(ddp.unwrap(model), BatchLoader(val, 4, prefetch=0), val.num_classes, world.device)
        seen["eval_images"] = sharded.images
        seen["eval_matches_whole"] = bool(torch.equal(sharded.confusion, whole.confusion)
                                          and abs(sharded.loss - whole.loss) < 1e-5)

        train = ShardDataset(root, "train")
        optimizer = build_optimizer(ddp.unwrap(model), 1e-3, 1e-3, 0.0)
        if world.rank == 1:  # a NaN on one rank only must stop both
            with torch.no_grad():
                ddp.unwrap(model).head.bias.fill_(float("nan"))
        loader = ddp.EqualShareLoader(train, 4, shuffle=True, rank=world.rank, world_size=2, prefetch=0)
        try:
            train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), world.device)
        except NonFiniteLoss as e:
            seen["nan_error"] = str(e)
    with open(f"{out}/rank{world.rank}.json", "w") as f:
        json.dump(seen, f)
''')


@pytest.mark.slow
def test_collectives_agree_across_ranks_and_a_nan_on_one_rank_stops_both(tiny_root, tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    done = torchrun(tmp_path, str(script), str(tiny_root), str(tmp_path), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["backend"] == "gloo" and seen["world_size"] == 2
        assert seen["all_true"] is True and seen["one_false"] is False
        assert seen["from_main"] == "value of rank 0"
        assert seen["eval_images"] == 11 and seen["eval_matches_whole"]
        assert "at batch 0" in seen["nan_error"]
    assert ranks[0]["from_main_error"] == "ValueError: no such run"
    assert ranks[1]["from_main_error"] == "RuntimeError: rank 0 failed: ValueError: no such run"
    assert ranks[1]["nan_error"].startswith("training loss is nan")
    assert ranks[0]["nan_error"].startswith("training loss is not finite on another rank")


def test_sync_bn_on_the_cpu_is_refused_with_the_reason():
    model = create_model("fn-small", 3, False)
    with pytest.raises(ValueError, match="--sync-bn true needs CUDA"):
        wrap_model(model, World(rank=0, world_size=2, backend="gloo"), sync_bn=True)
    assert wrap_model(model, World(), sync_bn=True) is model  # one process: nothing to wrap
