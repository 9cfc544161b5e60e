"""Segmentation loss with named terms, and the adaptive loss balancing of Def. 4.

`DiceCETerms` is MONAI's Dice + cross-entropy (softmax, one-hot target) with its two terms
returned separately, so that they can be balanced; with `regions=True` it is Dice + binary
cross-entropy of one sigmoid per region against region masks (nnU-Net's region-based training):

    terms = DiceCETerms()(logits, target)   # logits (B, C, D, H, W) or a deep-supervision list
    terms["dice"], terms["ce"]              # scalar tensors, differentiable

`AdaptiveLossBalancing` weights any named losses by the previous step's detached values:

    w_i^(t) = softmax(-alpha * L^(t-1))_i          (uniform at the first step)
    total, weights = balancing({"dice": l1, "ce": l2})

With alpha > 0 the *smaller* loss gets the larger weight (the formula as written; the paper's
prose says the opposite), alpha < 0 favours the larger loss, alpha = 0 is uniform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss
from torch import nn

__all__ = ["DiceCETerms", "AdaptiveLossBalancing"]


class DiceCETerms(nn.Module):
    """Dice and cross-entropy of logits against a label map, as two named scalar terms.

    forward(logits, target): logits (B, C, D, H, W), or a list of them for deep supervision
    (full resolution first, then coarser); target (B, 1, D, H, W) class indices, or with
    `regions` (B, R, D, H, W) region masks (0/1, R = C). Returns {"dice": tensor, "ce": tensor}.

    Deep supervision weights each level like MONAI's `DeepSupervisionLoss` ("exp": 1, 1/2,
    1/4, ...) but normalised to sum to 1, so that the loss scale (and the learning rate that
    suits it) does not change with the number of levels; the target is downsampled by nearest
    neighbour to each level's size.
    """

    names: tuple[str, str] = ("dice", "ce")

    def __init__(self, weight_mode: str = "exp", regions: bool = False) -> None:
        super().__init__()
        self.regions = regions
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        # Regions overlap (nested): one sigmoid each, Dice and BCE on the masks, as nnU-Net does.
        self.region_dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()
        self._levels = DeepSupervisionLoss(self.dice_ce, weight_mode=weight_mode)

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = list(logits) if isinstance(logits, list | tuple) else [logits]
        weights = self._levels.get_weights(len(outputs))
        norm = sum(weights)
        dice = ce = torch.zeros((), device=target.device)
        for w, out in zip(weights, outputs, strict=False):
            t = target
            if out.shape[2:] != target.shape[2:]:
                t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest-exact")
            out = out.float()  # losses in fp32 even under autocast: softmax of fp16 logits underflows
            if self.regions:
                t = t.float()
                dice = dice + (w / norm) * self.region_dice(out, t)
                ce = ce + (w / norm) * self.bce(out, t)
                continue
            dice = dice + (w / norm) * self.dice_ce.dice(out, t)
            ce = ce + (w / norm) * self.dice_ce.ce(out, t)
        return {"dice": dice, "ce": ce}


class AdaptiveLossBalancing(nn.Module):
    """Def. 4: weight M named losses by softmax(-alpha * their previous detached values).

    names: the losses, in a fixed order. alpha: temperature; any real number.
    The previous values live in buffers, so `state_dict()` carries them into checkpoints and a
    resumed run weights its first step exactly as the uninterrupted run did.
    """

    def __init__(self, names: Sequence[str], alpha: float = 1.0) -> None:
        super().__init__()
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"loss names must be distinct and non-empty, got {list(names)}")
        self.names = tuple(names)
        self.alpha = float(alpha)
        self.register_buffer("previous", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))

    def current_weights(self) -> torch.Tensor:
        """(M,) weights for this step: uniform before any update, else softmax(-alpha * L^(t-1))."""
        if not bool(self.has_previous):
            return torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64)
        return torch.softmax(-self.alpha * self.previous, dim=0)

    def update(self, values: Mapping[str, torch.Tensor | float]) -> None:
        """Remember this step's loss values (detached) for the next step's weights."""
        vec = torch.tensor([float(values[n]) for n in self.names], dtype=torch.float64)
        self.previous.copy_(vec)
        self.has_previous.fill_(True)

    def forward(
        self, losses: Mapping[str, torch.Tensor], update: bool = True
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of `losses` (dict name -> scalar tensor) and the weights used.

        update=False leaves the stored values alone, for a caller that averages the losses over
        processes first (DDP) and then calls `update` itself.
        """
        missing = set(self.names) ^ set(losses)
        if missing:
            raise ValueError(f"expected losses {list(self.names)}, got {list(losses)}")
        weights = self.current_weights()
        total = sum(weights[i].item() * losses[n] for i, n in enumerate(self.names))
        if update:
            self.update({n: losses[n].detach() for n in self.names})
        return total, {n: float(weights[i]) for i, n in enumerate(self.names)}
