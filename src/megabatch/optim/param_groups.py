"""Split a model's parameters into weight-decayed and not-decayed groups."""

from torch import nn

# Normalization layers: their scale and shift are never decayed. Subclasses count
# (isinstance), e.g. a BatchNorm2d variant that keeps last-batch statistics.
_NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool,
                 no_decay_options: dict | None = None) -> list[dict]:
    """Parameter groups for an optimizer, with or without decay on norms and biases.

    With ``no_decay_bn_bias``, the parameters of normalization layers, every
    parameter named ``...bias`` and every parameter with at most one dimension
    go in a group with ``weight_decay=0.0``; the rest (conv and linear weights)
    in a group with ``weight_decay``. Without it, one group holds everything.

    ``no_decay_options`` are further settings of the no-decay group (e.g.
    ``{"lars_adaptation": False}``: LARS also skips its trust ratio there).

    Only parameters with ``requires_grad`` are included, a shared parameter
    only once (where ``model.modules()`` first meets it), and
    empty groups are left out.
    """
    decay, no_decay = [], []
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = isinstance(module, _NORM_LAYERS) or name.endswith("bias") or p.ndim <= 1
            (no_decay if no_decay_bn_bias and exempt else decay).append(p)

    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, **(no_decay_options or {})},
    ]
    return [g for g in groups if g["params"]]
