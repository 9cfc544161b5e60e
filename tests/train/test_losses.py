"""Dice + CE as two named terms (deep supervision included) and Def. 4's adaptive loss balancing."""

import math

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from crossmodalnet.data.spec import DataSpec, LabelClass, Region
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms


def _logits_and_target(seed=0, shape=(2, 8, 6, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    return logits, target


def test_terms_add_up_to_monai_dice_ce():
    logits, target = _logits_and_target()
    terms = DiceCETerms()(logits, target)
    assert set(terms) == {"dice", "ce"}
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(terms["dice"] + terms["ce"], expected, atol=1e-6)
    assert torch.allclose(terms["ce"], torch.nn.functional.cross_entropy(logits, target[:, 0]), atol=1e-6)


def test_perfect_prediction_has_small_terms():
    _, target = _logits_and_target()
    logits = 50.0 * torch.nn.functional.one_hot(target[:, 0], 8).permute(0, 4, 1, 2, 3).float()
    terms = DiceCETerms()(logits, target)
    assert terms["dice"] < 1e-3 and terms["ce"] < 1e-3


def test_deep_supervision_levels_are_normalised_and_downsampled():
    logits, target = _logits_and_target(shape=(1, 8, 8, 8, 8))
    single = DiceCETerms()(logits, target)
    same = DiceCETerms()([logits, logits], target)  # weights 1 and 1/2, normalised: equals one level
    for key in single:
        assert torch.allclose(single[key], same[key], atol=1e-6)
    coarse = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    terms = DiceCETerms()([logits, coarse], target)
    (terms["dice"] + terms["ce"]).backward()
    assert coarse.grad is not None and coarse.grad.abs().sum() > 0  # the coarse level is supervised
    low = torch.nn.functional.interpolate(target.float(), size=(4, 4, 4), mode="nearest-exact")
    ce_coarse = torch.nn.functional.cross_entropy(coarse.detach(), low[:, 0].long())
    ce_full = torch.nn.functional.cross_entropy(logits, target[:, 0])
    assert torch.allclose(terms["ce"], (ce_full + 0.5 * ce_coarse) / 1.5, atol=1e-5)


def _region_target(seed=0, shape=(2, 6, 6, 6)):
    """Region masks (B, R, *S) of nested MyoPS-like regions, from a map of class indices."""
    spec = DataSpec(channels=("LGE",), classes=(LabelClass("MYO", 200), LabelClass("edema", 1220),
                                                   LabelClass("scar", 2221)),
                    regions=(Region("myocardium", (200, 1220, 2221)), Region("edema+scar", (1220, 2221)),
                             Region("scar", (2221,))), train_regions=True, region_order=(200, 1220, 2221))
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, spec.num_classes, shape, generator=g)
    masks = torch.stack([torch.from_numpy(spec.region_masks(i.numpy())) for i in indices]).float()
    return spec, masks


def test_region_terms_are_sigmoid_dice_and_binary_cross_entropy():
    spec, masks = _region_target()
    assert masks.shape == (2, 3, 6, 6, 6) and spec.num_outputs == 3
    assert (masks[:, 2] <= masks[:, 1]).all() and (masks[:, 1] <= masks[:, 0]).all()  # nested: overlapping targets
    logits = torch.randn(masks.shape, generator=torch.Generator().manual_seed(1))
    terms = DiceCETerms(regions=True)(logits, masks)
    assert set(terms) == {"dice", "ce"}
    assert torch.allclose(terms["dice"], DiceLoss(sigmoid=True)(logits, masks), atol=1e-6)
    assert torch.allclose(terms["ce"], torch.nn.functional.binary_cross_entropy_with_logits(logits, masks), atol=1e-6)
    # Not the softmax terms: those would treat the three overlapping regions as exclusive classes.
    assert not torch.allclose(terms["ce"], DiceCETerms()(logits, masks.argmax(1, keepdim=True))["ce"])
    perfect = DiceCETerms(regions=True)(50.0 * (2 * masks - 1), masks)
    assert perfect["dice"] < 1e-3 and perfect["ce"] < 1e-3


def test_region_terms_with_deep_supervision():
    _, masks = _region_target(shape=(1, 8, 8, 8))
    logits = torch.randn(masks.shape, generator=torch.Generator().manual_seed(2))
    single = DiceCETerms(regions=True)(logits, masks)
    same = DiceCETerms(regions=True)([logits, logits], masks)
    for key in single:
        assert torch.allclose(single[key], same[key], atol=1e-6)
    coarse = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    terms = DiceCETerms(regions=True)([logits, coarse], masks)
    (terms["dice"] + terms["ce"]).backward()
    assert coarse.grad is not None and coarse.grad.abs().sum() > 0
    low = torch.nn.functional.interpolate(masks, size=(4, 4, 4), mode="nearest-exact")
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(terms["ce"], (bce(logits, masks) + 0.5 * bce(coarse.detach(), low)) / 1.5, atol=1e-5)


def _values(*v):
    return {"dice": torch.tensor(v[0]), "ce": torch.tensor(v[1])}


def test_first_step_is_uniform_and_later_steps_follow_the_formula():
    bal = AdaptiveLossBalancing(["dice", "ce"], alpha=2.0)
    total, w = bal(_values(0.8, 2.0))
    assert w == {"dice": 0.5, "ce": 0.5}
    assert math.isclose(float(total), 0.5 * 0.8 + 0.5 * 2.0, rel_tol=1e-6)
    # Step 2 is weighted by step 1's values, not by its own.
    total, w = bal(_values(0.1, 0.1))
    e1, e2 = math.exp(-2.0 * 0.8), math.exp(-2.0 * 2.0)
    assert math.isclose(w["dice"], e1 / (e1 + e2), rel_tol=1e-6)
    assert math.isclose(w["ce"], e2 / (e1 + e2), rel_tol=1e-6)
    assert math.isclose(w["dice"] + w["ce"], 1.0, rel_tol=1e-12)
    assert math.isclose(float(total), 0.1, rel_tol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0, -1.0, -4.0])
def test_weights_by_sign_of_alpha(alpha):
    bal = AdaptiveLossBalancing(["a", "b", "c"], alpha=alpha)
    bal({"a": torch.tensor(0.2), "b": torch.tensor(1.0), "c": torch.tensor(3.0)})
    w = bal.current_weights()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12) and bool((w > 0).all())
    if alpha == 0:
        assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=w.dtype))
    elif alpha > 0:  # more weight on the smaller loss (the formula as written)
        assert w[0] > w[1] > w[2]
    else:  # negative alpha favours the larger, "harder" loss
        assert w[0] < w[1] < w[2]


def test_weights_are_constants_for_the_gradient():
    bal = AdaptiveLossBalancing(["dice", "ce"], alpha=1.0)
    bal(_values(1.0, 3.0))
    a, b = torch.tensor(0.5, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    total, w = bal({"dice": a, "ce": b})
    total.backward()
    assert math.isclose(float(a.grad), w["dice"], rel_tol=1e-6)
    assert math.isclose(float(b.grad), w["ce"], rel_tol=1e-6)


def test_state_dict_carries_the_previous_values():
    bal = AdaptiveLossBalancing(["dice", "ce"], alpha=1.5)
    bal(_values(0.3, 1.7))
    fresh = AdaptiveLossBalancing(["dice", "ce"], alpha=1.5)
    fresh.load_state_dict(bal.state_dict())
    assert torch.equal(fresh.current_weights(), bal.current_weights())
    assert not torch.allclose(fresh.current_weights(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_update_false_leaves_state_for_the_caller():
    bal = AdaptiveLossBalancing(["dice", "ce"], alpha=1.0)
    bal(_values(0.3, 1.7), update=False)
    assert torch.equal(bal.current_weights(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    bal.update({"dice": 0.3, "ce": 1.7})
    assert bal.current_weights()[0] > 0.5


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        AdaptiveLossBalancing(["a", "a"])
    with pytest.raises(ValueError, match="expected losses"):
        AdaptiveLossBalancing(["dice", "ce"])({"dice": torch.tensor(1.0)})
