"""The study's data: per shortcut strength and split, the source root (the preset's demo,
generated when missing, or the root given, dealt again by show or at random) and the
background-removed root a masked regime trains on (built once when missing), with the digests
that identify what a training sees. Claimed by the source's path, so studies (or array tasks)
started together build each root once."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from fgvc.config import digest
from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import DemoConfig
from fgvc.data.resplit import resplit_root
from fgvc.data.roots import DEFAULT_DATA_ROOT, demo_config_of, ensure_demo, resolve_root
from fgvc.data.shards import dataset_digest, pixels_digest, read_meta, validate_root
from fgvc.errors import ConfigError
from fgvc.masking import MaskConfig
from fgvc.study.config import PRESETS, StudyPlan
from fgvc.study.records import Roots
from fgvc.tasks.mask import run_mask
from fgvc.tracking.claims import claimed

log = logging.getLogger("fgvc")

DEFAULT_SEGMENTER = "deeplabv3_resnet101"


def demo_root_for(demo: DemoConfig) -> Path:
    """`data/demo` for the default demo, `data/demo-<preset>` for a preset's, else
    `data/demo-<digest of the config>`: one root per distinct demo configuration."""
    if demo == DemoConfig():
        return Path(DEFAULT_DATA_ROOT)
    for name, preset in PRESETS.items():
        if preset["demo"] == demo:
            return Path(f"{DEFAULT_DATA_ROOT}-{name}")
    return Path(f"{DEFAULT_DATA_ROOT}-{digest({k: repr(v) for k, v in asdict(demo).items()})[:8]}")


def prepare_roots(plan: StudyPlan, bg_correlation: float | None, progress: bool, split: str | None = None,
                  collect: bool = False) -> Roots:
    """Resolve (and if needed generate) the source root, split by `split` when given (the same
    images dealt again: fgvc.data.resplit); build the masked root when a masked regime needs
    it, or when the source has no person masks for the shortcut test (`collect`: never; the
    cells' own tasks built it, and masking could need the GPU a collecting node lacks).
    Claimed by the source's path: studies (or array tasks) started together build each root once."""
    where = Path(plan.data_root) if plan.data_root is not None else \
        demo_root_for(plan.demo_for(bg_correlation, split))
    with claimed(f"roots.{digest({'path': str(where.resolve())})}", f"study data {where}"):
        return _prepare_roots(plan, bg_correlation, split, progress, collect)


def _prepare_roots(plan: StudyPlan, bg_correlation: float | None, split: str | None, progress: bool,
                   collect: bool = False) -> Roots:
    source, demo, given = _source_root(plan, bg_correlation, split, progress)
    info = validate_root(source)
    has_masks = info.has_masks or "masks" in ShardDataset(source, "val").keys
    roots = Roots(source.resolve(), dataset_digest(source), has_masks, None, None, None, demo, pixels_digest(source),
                  None)
    if not any(c.spec.masked for c in plan.cells()) and has_masks:
        return roots
    mine = bg_correlation is None and given in (None, source)  # the plan's --masked-root is this root's
    masked = Path(plan.masked_root) if plan.masked_root and mine else source.parent / f"{source.name}-masked"
    return _with_masked_root(roots, source, masked, plan, progress, collect)


def _source_root(plan: StudyPlan, bg_correlation: float | None, split: str | None,
                 progress: bool) -> tuple[Path, DemoConfig | None, Path | None]:
    """(source root, its demo config when it is demo data, the root given): the preset's demo
    (generated when missing), or the root given, dealt again by ``split`` when given."""
    if plan.data_root is None:
        demo = plan.demo_for(bg_correlation, split)
        return ensure_demo(demo_root_for(demo), demo), demo, None
    given = resolve_root(plan.data_root)
    source = given if split is None else resplit_root(given, split, progress)
    return source, demo_config_of(source), given  # a demo root given by path: its planted strength is known


def _with_masked_root(roots: Roots, source: Path, masked: Path, plan: StudyPlan, progress: bool,
                      collect: bool) -> Roots:
    """``roots`` with the background-removed root ``masked`` of ``source``, masked when missing
    (`collect`: never; the cells that need it are named later)."""
    segmenter = plan.segmenter or ("groundtruth" if roots.source_has_masks else DEFAULT_SEGMENTER)
    if not (masked / "meta.json").exists() and collect:
        # --collect builds no data: no cell was trained on a root that is not there, and the
        # cells say so, each in the order of the grid
        log.warning("study: %s is missing; the cells that need it have not run yet", masked)
        return replace(roots, segmenter=segmenter)
    if not (masked / "meta.json").exists():
        log.info("study: masking %s into %s (segmenter %s)", source, masked, segmenter)
        run_mask(MaskConfig(src_root=str(source), dst_root=str(masked), segmenter=segmenter, device=plan.device),
                 progress=progress)
    meta = read_meta(masked)
    if meta.get("source_digest") not in (None, roots.source_digest):
        raise ConfigError(f"{masked} was masked from a dataset with digest {meta['source_digest']}, not "
                          f"{source} ({roots.source_digest}); pass --masked-root <a new folder>")
    return replace(roots, masked=masked.resolve(), masked_digest=dataset_digest(masked),
                   segmenter=(meta.get("masking") or {}).get("segmenter") or segmenter,
                   masked_pixels=pixels_digest(masked))
