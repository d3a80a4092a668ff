"""fgvc.masking: segmenters, background removal and the crash-safe, parallel dataset pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import ShardError, load_shard, read_label_map, read_meta, read_shard, shards_of
from fgvc.distributed import World
from fgvc.masking import (
    MaskError,
    Segmenter,
    SegmenterWeightsError,
    TorchvisionSegmenter,
    build_segmenter,
    mask_dataset,
    preprocess,
    remove_background,
)
from fgvc.masking.segmenters import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cached_weights_path,
    person_mask_from_logits,
    resized_size,
)

TINY = DemoConfig(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24,
                  shard_size=10)
MOBILENET = dict(segmenter="deeplabv3_mobilenet_v3_large", seg_weights="random", seg_size=64,
                 batch_size=4, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    # Shared CI cores: one intra-op thread is faster and keeps the suite short.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("masking") / "src"
    generate_demo(root, TINY)
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """An uninterrupted, single-process run of a randomly initialised DeepLabV3-MobileNetV3."""
    dst = tmp_path_factory.mktemp("reference") / "dst"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mask_dataset(src, dst, **MOBILENET)
    finally:
        torch.set_num_threads(before)
    return dst


def files_of(root: Path) -> dict[str, bytes]:
    """Every file of a root except the progress sidecars, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".progress" not in p.parts}


class PrefixSegmenter(Segmenter):
    """Controlled masks: the source's true mask for even rows of each batch, one pixel for odd
    rows (a person far below the fallback threshold)."""

    name, weights, needs_source_masks = "prefix", "none", True

    def __call__(self, images, source_masks=None):
        masks = source_masks.clone()
        masks[1::2] = 0
        masks[1::2, 0, 0] = 1
        return masks


class LeftHalfPerson(nn.Module):
    """Logits whose argmax is VOC 'person' (15) on the left half of the input, 'background' (0)
    elsewhere."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 21, h, w)
        logits[:, 0] = 1.0
        logits[:, 15, :, : w // 2] = 2.0
        return {"out": logits}


# --------------------------------------------------------------------------- segmenter pieces


def test_preprocess_resizes_shorter_side_and_normalises():
    images = torch.randint(0, 256, (2, 3, 32, 24), dtype=torch.uint8)
    x = preprocess(images, 48)
    assert x.shape == (2, 3, 64, 48)
    # The size rule of torchvision's Resize(int), which the original applied through PIL.
    assert list(TF.resize(images[0], 48, antialias=True).shape[1:]) == [64, 48]
    assert resized_size(100, 70, 52) == (int(52 * 100 / 70), 52)
    # At the native size only ToTensor + Normalize remain.
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(preprocess(images, 24), expected, atol=1e-5, rtol=1e-5)


def test_label_map_person_class_is_upsampled_nearest_to_image_size():
    segmenter = TorchvisionSegmenter(LeftHalfPerson(), seg_size=48)
    images = torch.randint(0, 256, (3, 3, 32, 24), dtype=torch.uint8)
    mask = segmenter(images)
    assert mask.dtype == torch.uint8 and mask.shape == (3, 32, 24)
    assert (mask[:, :, :12] == 1).all() and (mask[:, :, 12:] == 0).all()


def test_person_mask_equals_argmax_including_ties():
    logits = torch.randn(2, 21, 9, 7)
    logits[:, 15, :3] = logits[:, 4, :3]  # tie with an earlier class: argmax says 4
    logits[:, 15, 3:6] = logits[:, 20, 3:6] + 5  # person wins
    logits[:, 20, 6:] = logits[:, 15, 6:]  # tie with a later class: argmax says 15
    expected = (logits.argmax(dim=1) == 15).to(torch.uint8)
    assert torch.equal(person_mask_from_logits(logits, (9, 7)), expected)


def test_remove_background_zeroes_outside_and_falls_back_below_ratio():
    images = torch.randint(1, 256, (2, 3, 10, 10), dtype=torch.uint8)
    mask = torch.zeros(2, 10, 10, dtype=torch.uint8)
    mask[0, 2:6, 3:8] = 1  # 20 % of the image
    mask[1, 0, 0] = 1  # 1 %: below the threshold below
    masked, removed, ratios = remove_background(images, mask, min_person_ratio=0.05)
    assert removed.tolist() == [True, False]
    torch.testing.assert_close(ratios, torch.tensor([0.2, 0.01], dtype=torch.float64))
    inside = mask[0].bool()
    assert (masked[0][:, ~inside] == 0).all()
    assert torch.equal(masked[0][:, inside], images[0][:, inside])
    assert torch.equal(masked[1], images[1])  # fallback: original kept


def test_missing_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    with pytest.raises(SegmenterWeightsError) as err:
        build_segmenter("deeplabv3_resnet101")
    assert str(expected) in str(err.value) and "seg_weights=" in str(err.value)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(SegmenterWeightsError, match="nowhere.pth"):
        build_segmenter("deeplabv3_mobilenet_v3_large", seg_weights=missing)


def test_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build_segmenter("deeplabv3_mobilenet_v3_large", "random", seg_size=32).model
    path = cached_weights_path("deeplabv3_mobilenet_v3_large")
    path.parent.mkdir(parents=True)
    torch.save({k: v + 0.01 for k, v in model.state_dict().items()}, path)
    loaded = build_segmenter("deeplabv3_mobilenet_v3_large", seg_size=32)
    assert loaded.weights == str(path.resolve())
    first = next(iter(model.state_dict()))
    torch.testing.assert_close(loaded.model.state_dict()[first], model.state_dict()[first] + 0.01)


# ------------------------------------------------------------------------------- the pipeline


def test_output_keeps_format_order_and_extra_keys(src, tmp_path):
    dst = tmp_path / "gt"
    report = mask_dataset(src, dst, segmenter="groundtruth", batch_size=4, progress=False)
    for split in ("train", "val"):
        names = [p.name for p in shards_of(src, split)]
        assert [p.name for p in shards_of(dst, split)] == names
        for name in names:
            before, after = read_shard(src / split / name), read_shard(dst / split / name)
            for key in ("labels", "one_hot", "venues", "masks"):
                assert torch.equal(before[key], after[key]), key
            inside = after["masks"].bool().unsqueeze(1).expand_as(after["images"])
            assert (after["images"][~inside] == 0).all()
            assert torch.equal(after["images"][inside], before["images"][inside])
            assert after["bg_removed"].all()
            assert list(after)[: len(before)] == list(before)
    assert read_label_map(dst) == read_label_map(src)
    meta = read_meta(dst)
    assert meta == report.meta
    assert meta["source_root"] == str(src.resolve())
    assert meta["masking"]["segmenter"] == "groundtruth"
    assert meta["masking"]["statistics"]["train"]["images"] == 24
    assert meta["masking"]["statistics"]["val"]["fallbacks"] == 0


def test_fallback_rule_with_controlled_masks(src, tmp_path):
    dst = tmp_path / "fb"
    report = mask_dataset(src, dst, segmenter=PrefixSegmenter(), batch_size=4, progress=False)
    for path in shards_of(dst, "train"):
        before, after = read_shard(src / "train" / path.name), read_shard(path)
        odd = torch.arange(len(after["labels"])) % 2 == 1
        assert after["bg_removed"].tolist() == (~odd).tolist()
        assert torch.equal(after["images"][odd], before["images"][odd])  # kept as they were
        assert (after["masks"][odd].sum(dim=(1, 2)) == 1).all()  # the predicted mask is stored
        assert torch.equal(after["masks"][~odd], before["masks"][~odd])
    stats = report.meta["masking"]["statistics"]
    assert stats["train"]["fallbacks"] == 12 and stats["train"]["fallback_rate"] == 0.5
    assert stats["val"]["fallbacks"] == 6


def test_random_mobilenet_runs_the_real_path(src, reference):
    meta = read_meta(reference)
    assert meta["masking"]["weights"] == "random"
    assert meta["masking"]["seg_size"] == 64
    segmenter = build_segmenter("deeplabv3_mobilenet_v3_large", "random", seg_size=64)
    source, out = read_shard(src / "val" / "shard_000.pt"), read_shard(reference / "val" / "shard_000.pt")
    assert torch.equal(out["masks"], segmenter(source["images"]))
    assert out["images"].shape == source["images"].shape


def test_refuses_destination_equal_to_or_inside_source(src):
    for dst in (src, src / "masked", src / "train"):
        with pytest.raises(MaskError, match="src_root"):
            mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    assert not (src / "masked").exists()


def test_refuses_complete_destination_unless_overwrite(src, tmp_path):
    dst = tmp_path / "done"
    mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    first = files_of(dst)
    with pytest.raises(MaskError, match="overwrite=true"):
        mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    report = mask_dataset(src, dst, segmenter="groundtruth", overwrite=True, progress=False)
    assert report.skipped_shards == 0 and files_of(dst) == first


def test_refuses_unfinished_run_with_other_settings(src, tmp_path):
    dst = tmp_path / "half"
    mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    (dst / "meta.json").unlink()  # as if it had stopped before finishing
    with pytest.raises(MaskError, match="min_person_ratio"):
        mask_dataset(src, dst, segmenter="groundtruth", min_person_ratio=0.3, progress=False)
    report = mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    assert report.skipped_shards == 5


def test_a_job_begun_on_the_cpu_is_not_finished_on_a_gpu(src, tmp_path, monkeypatch):
    """The GPU resizes on float and convolves with its own kernels: other masks at the edges,
    so its shards never join a CPU job's (nor the other way round)."""
    dst = tmp_path / "half"
    mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    assert read_meta(dst)["masking"]["resize_effective"] == "uint8-cpu"
    (dst / "meta.json").unlink()  # as if it had stopped before finishing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MaskError, match=r"different settings \(resize_effective\)"):
        mask_dataset(src, dst, segmenter="groundtruth", device="cuda", progress=False)


def test_bad_source_shard_is_refused_before_writing(tmp_path):
    src = tmp_path / "bad"
    generate_demo(src, TINY)
    shard = load_shard(src / "val" / "shard_001.pt", mmap=False)
    shard["labels"] = shard["labels"] + 7
    torch.save(shard, src / "val" / "shard_001.pt")
    dst = tmp_path / "out"
    with pytest.raises(ShardError, match=r"shard_001\.pt.*labels outside"):
        mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    assert not dst.exists()


CRASHING_RUN = textwrap.dedent("""
    import sys, time
    import torch
    from fgvc.masking import mask_dataset

    def stall(stats):
        print("written", stats.split, stats.shard, flush=True)
        time.sleep(120)  # the test kills the process here

    torch.set_num_threads(1)
    mask_dataset(sys.argv[1], sys.argv[2], segmenter="deeplabv3_mobilenet_v3_large",
                 seg_weights="random", seg_size=64, batch_size=4, progress=False,
                 on_shard_done=stall)
""")


@pytest.mark.slow
def test_rerun_after_sigkill_is_byte_identical(src, reference, tmp_path):
    dst = tmp_path / "crashed"
    script = tmp_path / "crashing_run.py"
    script.write_text(CRASHING_RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(dst)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("written train shard_000.pt"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (dst / "train" / "shard_000.pt").exists() and not (dst / "meta.json").exists()
    assert not (dst / "val" / "shard_001.pt").exists()

    report = mask_dataset(src, dst, **MOBILENET)
    assert report.skipped_shards >= 1
    assert files_of(dst) == files_of(reference)


def test_lost_statistics_sidecar_is_rebuilt_from_the_shard(src, reference, tmp_path):
    dst = tmp_path / "sidecar"
    mask_dataset(src, dst, **MOBILENET)
    (dst / "meta.json").unlink()
    (dst / ".progress" / "train" / "shard_001.json").unlink()
    report = mask_dataset(src, dst, **MOBILENET)
    assert report.skipped_shards == 5
    assert files_of(dst) == files_of(reference)


@pytest.mark.slow
def test_two_workers_write_the_same_bytes(src, reference, tmp_path):
    """`fgvc mask --workers 2` relaunches under torchrun: two ranks deal out the shards."""
    dst = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "fgvc.cli", "mask", "--src-root", str(src), "--dst-root", str(dst),
                           "--segmenter", "deeplabv3_mobilenet_v3_large", "--seg-weights", "random", "--seg-size",
                           "64", "--batch-size", "4", "--workers", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2" in done.stderr
    assert files_of(dst) == files_of(reference)


def test_ranks_share_shards_and_rank0_writes_meta(src, reference, tmp_path):
    dst = tmp_path / "ranks"
    rank1 = mask_dataset(src, dst, world=World(rank=1, world_size=2), **MOBILENET)
    assert rank1.meta is None and not (dst / "meta.json").exists()
    # Shards are dealt over all splits in order: train 0,1,2 then val 0,1 -> rank 1 has 1 and 3.
    assert sorted(str(p.relative_to(dst)) for p in dst.glob("*/*.pt")) == ["train/shard_001.pt", "val/shard_000.pt"]
    rank0 = mask_dataset(src, dst, world=World(rank=0, world_size=2), **MOBILENET)
    assert rank0.meta is not None
    assert files_of(dst) == files_of(reference)
    with pytest.raises(MaskError, match=r"2 shard\(s\) of other ranks are not written yet"):
        mask_dataset(src, tmp_path / "alone", world=World(rank=0, world_size=2), **MOBILENET)


def test_splits_option_masks_only_those_splits(src, tmp_path):
    dst = tmp_path / "val-only"
    report = mask_dataset(src, dst, segmenter="groundtruth", splits=("val",), progress=False)
    assert report.meta["splits"] == ["val"] and not (dst / "train").exists()
    assert [p.name for p in shards_of(dst, "val")] == [p.name for p in shards_of(src, "val")]
    with pytest.raises(ShardError, match="has no split test"):
        mask_dataset(src, tmp_path / "t", segmenter="groundtruth", splits=("test",), progress=False)


def test_overwrite_removes_only_what_mask_wrote(src, tmp_path):
    dst = tmp_path / "keep"
    mask_dataset(src, dst, segmenter="groundtruth", progress=False)
    (dst / "notes.txt").write_text("mine")
    (dst / "train" / "backup_copy.pt").write_bytes(b"mine too")
    mask_dataset(src, dst, segmenter="groundtruth", overwrite=True, progress=False)
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "train" / "backup_copy.pt").exists()
    assert (dst / "meta.json").exists()


def test_groundtruth_needs_masks_in_the_source(tmp_path):
    src = tmp_path / "nomasks"
    generate_demo(src, TINY)
    for path in src.glob("*/*.pt"):
        shard = load_shard(path, mmap=False)
        del shard["masks"]
        torch.save(shard, path)
    with pytest.raises(ShardError, match="masks"):
        mask_dataset(src, tmp_path / "out", segmenter="groundtruth", progress=False)
