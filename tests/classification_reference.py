"""Pieces of torchvision's classification reference (``references/classification``: not an
installed package, so written out here as it defines them) for the tests that compare the
library's recipe tools against it: ``set_weight_decay``, ``ExponentialMovingAverage``,
``get_mixup_cutmix``, and a way to replay a library's MixUp/CutMix decision through
torchvision's own random draws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from resnext_flax import mixing

NORM_CLASSES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)


def set_weight_decay(model, weight_decay, norm_weight_decay=None,
                     custom_keys_weight_decay=None):
    """torchvision's ``references/classification/utils.py:set_weight_decay``."""
    params = {"other": [], "norm": []}
    params_weight_decay = {"other": weight_decay, "norm": norm_weight_decay}
    custom_keys = []
    if custom_keys_weight_decay is not None:
        for key, weight_decay in custom_keys_weight_decay:
            params[key] = []
            params_weight_decay[key] = weight_decay
            custom_keys.append(key)

    def _add_params(module, prefix=""):
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_custom_key = False
            for key in custom_keys:
                target_name = f"{prefix}.{name}" if prefix != "" and "." in key else name
                if key == target_name:
                    params[key].append(p)
                    is_custom_key = True
                    break
            if not is_custom_key:
                if norm_weight_decay is not None and isinstance(module, NORM_CLASSES):
                    params["norm"].append(p)
                else:
                    params["other"].append(p)

        for child_name, child_module in module.named_children():
            child_prefix = f"{prefix}.{child_name}" if prefix != "" else child_name
            _add_params(child_module, prefix=child_prefix)

    _add_params(model)
    return [{"params": params[key], "weight_decay": params_weight_decay[key]}
            for key in params if len(params[key]) > 0]


class ExponentialMovingAverage(AveragedModel):
    """torchvision's ``references/classification/utils.py:ExponentialMovingAverage``."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def get_mixup_cutmix(*, mixup_alpha, cutmix_alpha, num_classes):
    """The reference's ``transforms.py:get_mixup_cutmix`` with ``use_v2=True``."""
    mixup_cutmix = []
    if mixup_alpha > 0:
        mixup_cutmix.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixup_cutmix.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixup_cutmix:
        return None
    return v2.RandomChoice(mixup_cutmix)


class _Replayed:
    """Stands in for torchvision's ``Beta`` distribution: returns the decision's lambda."""

    def __init__(self, lam: float):
        self.lam = lam

    def sample(self, shape=()):
        return torch.tensor([self.lam], dtype=torch.float32)


@contextlib.contextmanager
def replaying(choice: v2.RandomChoice, decision: mixing.MixDecision, height: int,
              width: int) -> Iterator[None]:
    """Within the block, `choice` (:func:`get_mixup_cutmix`'s) draws what `decision` holds:
    its Beta samples return the decision's lambda, ``torch.multinomial`` (RandomChoice) picks
    the decision's transform and ``torch.randint`` returns the box centre's x then y. For a
    CutMix decision it first checks that torchvision derives the decision's box and label
    weight from those draws, for images of `height` x `width`."""
    kind = v2.CutMix if bool(decision.cutmix) else v2.MixUp
    index = next(i for i, t in enumerate(choice.transforms) if isinstance(t, kind))
    centre = [int(decision.center[0]), int(decision.center[1])]
    draws = iter(centre)
    saved = [t._dist for t in choice.transforms]
    try:
        for transform in choice.transforms:
            transform._dist = _Replayed(float(decision.lam))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "randint", lambda high, size: torch.tensor([next(draws)]))
            patch.setattr(torch, "multinomial", lambda p, n: torch.tensor([index]))
            if bool(decision.cutmix):  # the box and label weight torchvision derives
                params = choice.transforms[index].make_params(
                    [torch.empty(1, 3, height, width)])
                assert params["box"] == tuple(int(v) for v in decision.box)
                assert abs(params["lam_adjusted"] - float(decision.label_lam)) <= 1.2e-7  # 2 ulp
                draws = iter(centre)
            yield
    finally:
        for transform, dist in zip(choice.transforms, saved, strict=True):
            transform._dist = dist
