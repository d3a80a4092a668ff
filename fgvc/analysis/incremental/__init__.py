"""Exact incremental inference for occlusion (Krypton: Nakandala, Kumar and Papakonstantinou,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
SIGMOD 2019).

An occluding window changes only a small block of the input. Through a conv or pool layer
with kernel ``k``, stride ``s`` and padding ``p`` the block of changed outputs is the set of
outputs whose receptive field meets the changed inputs: it grows by about ``k - 1`` and
shrinks by ``s`` at each layer, clipped to the map. So the unoccluded images are run once,
every intermediate activation is kept, and each occluded copy recomputes only its changed
block of each layer: the layer's input block, with its halo, is read from the kept
activation with the previous layer's recomputed block pasted in. Once a layer's changed
block covers (nearly) its whole map, the layer and everything after it run on whole maps.

The network is first lowered to a short list of steps on numbered tensors
(:func:`lower`): convolutions with eval-mode BatchNorm folded in and ReLU fused, max
pools, per-pixel affine maps and activations, residual sums, a global average pool and
the vector layers after it. Lowering knows ``nn.Sequential``, ``Conv2d``, ``BatchNorm2d``
(eval), ``ReLU`` and a few other pointwise activations, ``MaxPool2d``, ``AdaptiveAvgPool2d(1)``,
``Flatten``, ``Linear``, ``Dropout``, ``Identity``, torchvision ``ResNet`` / ``BasicBlock`` /
``Bottleneck``, FashionNet and the :class:`~fgvc.models.FGVCNet` wrapper; any other module
(or one with hooks, or an overridden ``forward``) raises :class:`UnsupportedModel`, and the
caller falls back to evaluating every occluded copy in full.

Block computations are batched: one conv call computes the same-sized block of many
(image, window) pairs. Every pair's block has the size of the largest one at that layer
(shifted inwards at the borders), so the values computed outside a pair's own changed
region are recomputed copies of the kept activation: the result is exact up to float
rounding (folded BatchNorm and a different summation order, ~1e-6 relative).

Two approximations are available for approximate occlusion: Krypton's projective-field
threshold (``field_limit``: a changed region is cut to that fraction of the map side, the
rest taken as unchanged), and ``low_precision``: each conv block is computed as the kept
output plus the conv of the input's change in bfloat16, so the rounding error scales with
the change rather than with the activation.
"""

from fgvc.analysis.incremental.engine import IncrementalOcclusion, KeptActivations, flop_estimate, window_boxes
from fgvc.analysis.incremental.lowering import Lowered, LoweringCache, UnsupportedModel, lower, model_state

__all__ = [
    "IncrementalOcclusion",
    "KeptActivations",
    "Lowered",
    "LoweringCache",
    "UnsupportedModel",
    "flop_estimate",
    "lower",
    "model_state",
    "window_boxes",
]
