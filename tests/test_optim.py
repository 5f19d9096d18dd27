"""Parameter groups, gradient clipping and gradient accumulation against torch: torchvision's
reference ``set_weight_decay`` (written out in classification_reference.py)
with ``torch.optim.SGD``, ``torch.nn.utils.clip_grad_norm_``, and ``(loss / k).backward()``
over k micro-batches before each ``optimizer.step()``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from classification_reference import set_weight_decay
from flax import nnx
from torch_reference import relative_error, to_nchw, torch_model

import resnext_flax
from resnext_flax import optim, training


def _reference_groups(model, weight_decay, norm, bias):
    custom = [("bias", bias)] if bias is not None else None
    return set_weight_decay(model, weight_decay, norm, custom)


def _torch_names(tree) -> dict[str, object]:
    """The library's parameter paths as torch state-dict names."""
    rename = {"kernel": "weight", "scale": "weight"}
    return {".".join(str(getattr(k, "key", k)) for k in path[:-1]) + "."
            + rename.get(path[-1].key, path[-1].key): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


GROUPS = [(None, None), (0.0, None), (0.0, 0.0), (0.5, 0.25), (None, 0.0)]


@pytest.mark.parametrize("norm, bias", GROUPS)
def test_weight_decay_groups_are_the_references_on_resnet50(norm, bias):
    """Every parameter of resnet50 gets the rate torchvision's set_weight_decay gives the
    parameter of the same name."""
    reference = torch_model("resnet50", num_classes=10)
    names = {id(p): name for name, p in reference.named_parameters()}
    expected = {names[id(p)]: group["weight_decay"]
                for group in _reference_groups(reference, 1e-4, norm, bias)
                for p in group["params"]}
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet50", num_classes=10))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = _torch_names(training.weight_decay_tree(params, 1e-4, norm_weight_decay=norm,
                                                  bias_weight_decay=bias))
    assert got == expected


def test_decay_mask_is_the_zero_norm_and_bias_groups():
    model = nnx.eval_shape(lambda: resnext_flax.create_model("resnet18", num_classes=10))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = _torch_names(training.decay_mask(params))
    assert {name for name, decays in mask.items() if decays} == {
        name for name in mask if name.endswith("weight") and ("conv" in name or name.startswith(
            "fc") or "downsample.0" in name)}


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=True)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)


def _tiny_tree(model: _Tiny) -> dict:
    """The same tensors under the library's names (norm layers hold a ``scale``)."""
    sd = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    return {"conv": {"kernel": sd["conv.weight"], "bias": sd["conv.bias"]},
            "bn": {"scale": sd["bn.weight"], "bias": sd["bn.bias"]},
            "fc": {"kernel": sd["fc.weight"], "bias": sd["fc.bias"]}}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("norm, bias", GROUPS)
def test_sgd_with_groups_matches_torch_sgd(norm, bias, nesterov):
    """A few steps of torch.optim.SGD over the reference's parameter groups, same gradients."""
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # no parameter near 0: every decay shows
    opt = torch.optim.SGD(_reference_groups(model, 0.05, norm, bias), lr=0.1, momentum=0.9,
                          weight_decay=0.05, nesterov=nesterov)
    params = jax.tree.map(jnp.asarray, _tiny_tree(model))
    tx = training.sgd(0.1, momentum=0.9, weight_decay=0.05, nesterov=nesterov,
                      **({"decay_bn_and_bias": True} if (norm, bias) == (None, None) else
                         {"norm_weight_decay": norm, "bias_weight_decay": bias}))
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = {n: rng.standard_normal(p.shape).astype(np.float32)
                 for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[n])
        opt.step()
        tree = jax.tree.map(jnp.asarray, _tiny_tree_from(grads))
        updates, opt_state = tx.update(tree, opt_state, params)
        params = optax.apply_updates(params, updates)
    for name, value in _torch_names(params).items():
        np.testing.assert_allclose(value, dict(model.named_parameters())[name].detach().numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=name)


def _tiny_tree_from(flat: dict) -> dict:
    return {"conv": {"kernel": flat["conv.weight"], "bias": flat["conv.bias"]},
            "bn": {"scale": flat["bn.weight"], "bias": flat["bn.bias"]},
            "fc": {"kernel": flat["fc.weight"], "bias": flat["fc.bias"]}}


def test_sgd_refuses_a_switch_and_groups_together():
    with pytest.raises(ValueError, match="either decay_bn_and_bias or"):
        training.sgd(0.1, decay_bn_and_bias=True, norm_weight_decay=0.0)
    with pytest.raises(ValueError, match="norm_weight_decay must be a finite number >= 0"):
        training.sgd(0.1, norm_weight_decay=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        training.weight_decay_tree({"fc": {"kernel": jnp.ones(2)}}, None)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_clip_grad_norm_matches_torch(max_norm: float):
    """Below, near and far above the gradients' norm (~6)."""
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)).astype(np.float32),
             "b": {"c": rng.standard_normal(17).astype(np.float32)}}
    tensors = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(17))]
    tensors[0].grad = torch.from_numpy(grads["a"].copy())
    tensors[1].grad = torch.from_numpy(grads["b"]["c"].copy())
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    clip = optim.clip_grad_norm(max_norm)
    out, _ = clip.update(jax.tree.map(jnp.asarray, grads), clip.init(grads))
    assert abs(float(optim.global_norm(grads)) - total.item()) <= 1e-6 * total.item()
    np.testing.assert_allclose(out["a"], tensors[0].grad.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out["b"]["c"], tensors[1].grad.numpy(), rtol=1e-6, atol=1e-8)
    if max_norm < total.item():
        assert abs(float(optim.global_norm(out)) - max_norm) < 1e-5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_clip_grad_norm_refuses_bad_norms(bad):
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        optim.clip_grad_norm(bad)


def test_accumulate_gradients_refuses_bad_counts():
    tx = optax.sgd(0.1)
    assert optim.accumulate_gradients(tx, 1) is tx
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            optim.accumulate_gradients(tx, bad)


@pytest.mark.parametrize("x64", [False, True])
def test_accumulation_averages_in_the_parameters_precision(x64: bool):
    """One update per 3 micro-steps, zero in between, the mean gradient accumulated in the
    parameters' dtype (optax's default accumulator is float32: float64 runs lost precision)."""
    grads = [np.random.default_rng(i).standard_normal(5) for i in range(6)]
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        tx = optim.accumulate_gradients(optax.sgd(1.0), 3)
        params = {"w": jnp.zeros(5, dtype)}
        state = tx.init(params)
        for i, g in enumerate(grads):
            updates, state = tx.update({"w": jnp.asarray(g, dtype)}, state, params)
            assert updates["w"].dtype == dtype
            if i % 3 < 2:
                assert not np.any(np.asarray(updates["w"]))
        expected = -np.mean(grads[3:], axis=0)
        assert np.abs(np.asarray(updates["w"]) - expected).max() < (1e-15 if x64 else 1e-6)


# resnet18 with the recipe's optimizer (SGD, momentum, no decay on norm layers), gradients
# clipped, 3 micro-batches per optimizer step: float64, where the math must agree to rounding
# (a chaotic float32 run would only bound it; tests/test_training.py explains).
ACCUMULATE, OPTIMIZER_STEPS, MAX_NORM, LR = 3, 2, 1.0, 1e-3
FLOAT64_BOUND = 1e-10  # measured 4e-15


def _micro_batches():
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((4, 32, 32, 3)), rng.integers(0, 10, 4))
            for _ in range(ACCUMULATE * OPTIMIZER_STEPS)]


def test_accumulated_clipped_grouped_sgd_equals_torch_in_float64():
    reference = torch_model("resnet18", num_classes=10).double().train()
    opt = torch.optim.SGD(_reference_groups(reference, 1e-4, 0.0, None), lr=LR, momentum=0.9,
                          weight_decay=1e-4)
    norms = []
    for i, (x, y) in enumerate(_micro_batches()):
        loss = torch.nn.functional.cross_entropy(reference(to_nchw(x)), torch.from_numpy(y))
        (loss / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM))
            opt.step()
            opt.zero_grad()
    assert min(norms) > MAX_NORM  # the clipping really acted
    expected = {k: v.detach().numpy() for k, v in reference.state_dict().items()
                if "num_batches" not in k}

    start = torch_model("resnet18", num_classes=10)
    with jax.enable_x64(True):
        abstract = nnx.eval_shape(lambda: resnext_flax.create_model(
            "resnet18", num_classes=10, dtype=jnp.float64, param_dtype=jnp.float64))
        model = resnext_flax.load_torch_state_dict(abstract, start.state_dict())
        tx = optim.accumulate_gradients(optax.chain(
            optim.clip_grad_norm(MAX_NORM),
            training.sgd(LR, momentum=0.9, weight_decay=1e-4, norm_weight_decay=0.0)),
            ACCUMULATE)
        state = training.create_train_state(model, tx)
        step = jax.jit(training.train_step_fn())
        for x, y in _micro_batches():
            state, _ = step(state, jnp.asarray(x), jnp.asarray(y))
        got = resnext_flax.to_torch_state_dict(state.model())
    moved = relative_error(start.state_dict()["bn1.running_mean"].numpy(),
                           expected["bn1.running_mean"])
    assert moved > 1e-3  # statistics updated on every micro-batch
    for name, value in expected.items():
        assert relative_error(np.asarray(got[name]), value) <= FLOAT64_BOUND, (
            name, relative_error(np.asarray(got[name]), value))
