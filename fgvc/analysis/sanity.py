"""A sanity check for attribution maps: the model-parameter randomisation test of Adebayo et
al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (arXiv:1810.03292), cascading version.

The network's weights are re-initialised block by block from the head down (the linear head,
then each stage from the deepest to the shallowest, then everything left: the stem), and after
every step each image's map is computed again for the same target class. The Spearman rank
correlation between the map of the trained network and the map after the step, per image and
averaged over images, is the curve "blocks randomised vs correlation". A map that explains
the model must change when the model does: the curve falls towards 0. A map that stays
correlated once every weight is random describes the image (its edges, its bright parts),
not what the network learned; such a method is flagged.

Flag rule: the mean rank correlation after full randomisation is at least
``FLAG_THRESHOLD`` = 0.5. Adebayo et al. report Grad-CAM near 0 after full randomisation
and an input-only edge detector at 1 by construction; 0.5 sits halfway, so a flagged map
keeps most of its ranking with no trained weight left.

Conventions: a randomised map that is constant (e.g. a Grad-CAM map that the ReLU zeroes
everywhere) shares no ranking with the trained one and counts as correlation 0; an image
whose trained map is constant has no ranking to compare and is left out (NaN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fgvc.analysis.stats import Interval, bootstrap_mean

FLAG_THRESHOLD = 0.5
FULL = "(all randomised)"

# model, images [N, 3, H, W] in [0, 1], targets [N] -> maps [N, H, W]
MapFunction = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cascade(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The randomisation steps, head first: ``(name, modules re-initialised at this step)``.
    The head, then each stage of ``model.stages()`` from deep to shallow, then every module
    not yet covered (the stem), so after the last step no trained weight is left."""
    steps: list[tuple[str, list[nn.Module]]] = []
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        steps.append(("head", [head]))
    stages: list[tuple[str, nn.Module]] = getattr(model, "stages", list)()
    steps += [(name, [module]) for name, module in reversed(stages)]
    covered = {id(m) for _, modules in steps for top in modules for m in top.modules()}
    rest = [m for m in model.modules() if id(m) not in covered and _has_own_parameters(m)]
    if rest or not steps:
        steps.append(("remaining layers", rest))
    steps[-1] = (f"{steps[-1][0]} {FULL}", steps[-1][1])
    return steps


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def randomise_(modules: list[nn.Module], seed: int) -> None:
    """Re-initialise, in place, every submodule of ``modules`` that knows how
    (``reset_parameters``: PyTorch's default initialisation; BatchNorm also forgets its running
    statistics), from the torch generator seeded with ``seed``."""
    cuda = sorted({p.device.index or 0 for top in modules for p in top.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for top in modules:
            for module in top.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``0..P-1`` of each row of ``values`` ``[B, P]``, ties sharing their mean rank."""
    out = torch.empty_like(values, dtype=torch.float64)
    for i, row in enumerate(values):
        unique, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        last = torch.cumsum(counts, 0).to(torch.float64) - 1
        out[i] = (last - (counts.to(torch.float64) - 1) / 2)[inverse]
    return out


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation, per image, of two stacks of maps ``[B, H, W]`` -> ``[B]``
    (the Pearson correlation of average ranks); see the module doc for constant maps."""
    a = average_ranks(first.detach().reshape(len(first), -1).double().cpu())
    b = average_ranks(second.detach().reshape(len(second), -1).double().cpu())
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    out = (a * b).sum(1) / (norm_a * norm_b).clamp_min(1e-12)
    out = torch.where(norm_b == 0, torch.zeros_like(out), out)
    return torch.where(norm_a == 0, torch.full_like(out, float("nan")), out)


@dataclass
class SanityCurve:
    """One method's curve: ``steps[k]`` names what is randomised after step ``k`` (step 0:
    nothing), ``per_image[k]`` ``[N]`` the rank correlations, ``intervals[k]`` their mean with
    a bootstrap 95% interval over images."""

    steps: list[str]
    per_image: list[Tensor]
    intervals: list[Interval]

    @property
    def after_full_randomisation(self) -> Interval:
        return self.intervals[-1]

    @property
    def flagged(self) -> bool:
        return self.after_full_randomisation.estimate >= FLAG_THRESHOLD


def _interval(values: Tensor, seed: int) -> Interval:
    finite = values[torch.isfinite(values)]
    if not len(finite):
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    return bootstrap_mean(finite, seed=seed)


def cascading_randomisation(model: nn.Module, images: Tensor, targets: Tensor, maps_of: dict[str, MapFunction],
                            *, seed: int = 0) -> dict[str, SanityCurve]:
    """Each method's curve (see the module doc) for ``images`` ``[N, 3, H, W]`` in ``[0, 1]``
    and the classes ``targets`` ``[N]`` explained at every step. The model itself is left
    untouched: the steps randomise a copy, step ``k`` with seed ``seed + k``."""
    reference = {name: fn(model, images, targets) for name, fn in maps_of.items()}
    randomised = copy.deepcopy(model)
    steps = cascade(randomised)
    names = ["none", *(f"+ {name}" for name, _ in steps)]
    per_image = {name: [torch.ones(len(images), dtype=torch.float64)] for name in maps_of}
    for k, (_, modules) in enumerate(steps, start=1):
        randomise_(modules, seed + k)
        for name, fn in maps_of.items():
            per_image[name].append(spearman(reference[name], fn(randomised, images, targets)))
    return {name: SanityCurve(names, values, [_interval(v, seed) for v in values])
            for name, values in per_image.items()}


def edge_map(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` -> ``[N, H, W]``: the gradient magnitude of the grey image (Sobel), a
    map that depends on the image only: the negative control of the test."""
    grey = images.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(grey, kx, padding=1)
    gy = torch.nn.functional.conv2d(grey, kx.transpose(2, 3), padding=1)
    return torch.hypot(gx, gy)[:, 0]
