"""Fine-tuning with optax: a train state over ``nnx.split`` state and jit-compiled pure steps.

The steps are plain functions of (state, images, labels) compiled with ``jax.jit``, not
``nnx.jit``: ``nnx.jit`` walks the module graph in Python on every call (docs/training.md has
its cost); a pure function over split state pays the graph walk once, at trace time. The
model is rebuilt inside the trace with ``nnx.merge``, so everything the library's modules do
(torch-semantics BatchNorm included) applies unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from resnext_flax import optim
from resnext_flax.mixing import MixConfig
from resnext_flax.mixing import mix as mix_batch
from resnext_flax.models import functional
from resnext_flax.nn.layers import BatchNorm

Params = dict[str, Any]
Metrics = dict[str, jax.Array]

#: The classifier's attribute name; with ``freeze_backbone=True`` only it trains.
HEAD = "fc"


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as one pytree.

    ``params`` and ``batch_stats`` are pure nested dicts (``nnx.to_pure_dict``), so optax
    masks, orbax checkpoints and sharding treat them as ordinary pytrees. ``graphdef`` (the
    architecture, including the compute dtype), ``tx`` and ``freeze_backbone`` are static.
    """

    params: Params
    batch_stats: Params
    opt_state: optax.OptState
    step: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    freeze_backbone: bool = struct.field(pytree_node=False, default=False)

    def trainable(self) -> Params:
        """The parameters the optimizer updates: all of them, or only the head."""
        return {HEAD: self.params[HEAD]} if self.freeze_backbone else self.params

    def model(self) -> nnx.Module:
        """The current weights as an NNX module (eval mode), e.g. for export."""
        model = nnx.merge(self.graphdef, self.params, self.batch_stats)
        model.eval()
        return model


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, freeze_backbone: bool = False
) -> TrainState:
    """Split `model` into a :class:`TrainState` and initialize the optimizer.

    With ``freeze_backbone=True`` only the head (``fc``) trains: the optimizer state covers
    only it and the backbone runs with its running BatchNorm statistics, which stay fixed
    (a linear probe; the backbone's backward pass is never computed).
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = nnx.to_pure_dict(params)
    state = TrainState(
        params=params,
        batch_stats=nnx.to_pure_dict(batch_stats),
        opt_state=None,
        step=jnp.zeros((), jnp.int32),
        graphdef=graphdef,
        tx=tx,
        freeze_backbone=freeze_backbone,
    )
    return state.replace(opt_state=tx.init(state.trainable()))


def weight_decay_tree(
    params: Params,
    weight_decay: float,
    *,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
) -> Params:
    """Each parameter's weight-decay rate, by torchvision's reference ``set_weight_decay``:
    a parameter named ``bias`` gets `bias_weight_decay` when given (norm layers' biases
    included), else a norm layer's parameter gets `norm_weight_decay` when given, else
    `weight_decay`. Norm layers are the modules with a ``scale`` (torch's norm ``weight``).

    The recipe's ``--norm-weight-decay 0`` is ``norm_weight_decay=0.0``: it keeps the decay
    on the classifier's bias, unlike :func:`decay_mask`.
    """
    check_hyperparameters(weight_decay=weight_decay)
    _check_group_rates(norm_weight_decay=norm_weight_decay, bias_weight_decay=bias_weight_decay)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    norm_layers = {_keys(path[:-1]) for path, _ in leaves if _keys(path[-1:]) == ("scale",)}

    def rate(path: tuple, _: Any) -> float:
        if bias_weight_decay is not None and _keys(path[-1:]) == ("bias",):
            return bias_weight_decay
        if norm_weight_decay is not None and _keys(path[:-1]) in norm_layers:
            return norm_weight_decay
        return weight_decay

    return jax.tree_util.tree_map_with_path(rate, params)


def decay_mask(params: Params) -> Params:
    """True for conv and linear kernels, False for norm layers' parameters and biases.

    The usual fine-tuning recipe: weight decay on BN affine parameters and biases only
    fights the normalization and rarely helps.
    """
    rates = weight_decay_tree(params, 1.0, norm_weight_decay=0.0, bias_weight_decay=0.0)
    return jax.tree.map(bool, rates)


def _check_group_rates(**rates: float | None) -> None:
    """The rates given (None: that group is not set apart) are weight decays."""
    check_hyperparameters(**{name: rate for name, rate in rates.items() if rate is not None})


def _keys(path: tuple) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def sgd(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decay_bn_and_bias: bool | None = None,
    nesterov: bool = False,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
) -> optax.GradientTransformation:
    """torch.optim.SGD's update: coupled L2 (``grad + wd * param``) *before* momentum.

    Which parameters decay, either as a switch or as torchvision's parameter groups:
    ``decay_bn_and_bias=True`` decays every parameter (torch's default); False (the default)
    masks norm layers and biases out (:func:`decay_mask`); `norm_weight_decay` and
    `bias_weight_decay` give those groups their own rates (:func:`weight_decay_tree`, the
    reference's ``--norm-weight-decay`` and ``--bias-weight-decay``), the others keeping
    `weight_decay`.
    """
    check_hyperparameters(learning_rate=learning_rate, momentum=momentum,
                          weight_decay=weight_decay)
    groups = norm_weight_decay is not None or bias_weight_decay is not None
    if groups and decay_bn_and_bias is not None:
        raise ValueError("give either decay_bn_and_bias or norm_weight_decay/bias_weight_decay"
                         ", not both")
    if not groups and not decay_bn_and_bias:
        norm_weight_decay = bias_weight_decay = 0.0
    _check_group_rates(norm_weight_decay=norm_weight_decay, bias_weight_decay=bias_weight_decay)
    rates = functools.partial(weight_decay_tree, weight_decay=weight_decay,
                              norm_weight_decay=norm_weight_decay,
                              bias_weight_decay=bias_weight_decay)
    return optax.chain(
        optim.add_weight_decay(rates),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The finite numbers a hyperparameter may take: from `low` to `high` (None: unbounded),
    each end included unless marked open."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = self.high is None or (value < self.high if self.open_high else
                                      value <= self.high)
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")


#: A learning rate (optimizer argument): 0 is a valid "no update" building block.
LEARNING_RATE_BOUNDS = Bounds(0.0)
#: A fine-tuning run's peak learning rate: at 0 the run would train nothing.
PEAK_LR_BOUNDS = Bounds(0.0, open_low=True)
#: Weight decay and warm-up length (epochs): any finite amount, none below 0.
NON_NEGATIVE_BOUNDS = Bounds(0.0)
#: SGD momentum: at 1 and above the velocity never decays (the update diverges).
MOMENTUM_BOUNDS = Bounds(0.0, 1.0, open_high=True)
#: Label smoothing: at 1 the targets are uniform and carry no label.
LABEL_SMOOTHING_BOUNDS = Bounds(0.0, 1.0, open_high=True)

#: Each hyperparameter's bounds, by the name its callers use for it.
HYPERPARAMETER_BOUNDS: dict[str, Bounds] = {
    "learning_rate": LEARNING_RATE_BOUNDS,
    "lr": PEAK_LR_BOUNDS,
    "weight_decay": NON_NEGATIVE_BOUNDS,
    "norm_weight_decay": NON_NEGATIVE_BOUNDS,
    "bias_weight_decay": NON_NEGATIVE_BOUNDS,
    "warmup_epochs": NON_NEGATIVE_BOUNDS,
    "momentum": MOMENTUM_BOUNDS,
    "label_smoothing": LABEL_SMOOTHING_BOUNDS,
}


def check_hyperparameters(**values: Any) -> None:
    """The one check every entry point (optimizers, loss, train steps, fine-tuning, the
    command line) runs on its hyperparameters, by name (:data:`HYPERPARAMETER_BOUNDS`): a NaN,
    infinite or out-of-range value trains silently wrong, so it is a ``ValueError`` naming
    the field, the value and the bounds. Schedules (callables) and traced values pass
    through; a concrete scalar array is checked as its number."""
    for name, value in values.items():
        if callable(value) or isinstance(value, jax.core.Tracer):
            continue  # a schedule, or a value only known when the program runs
        if isinstance(value, jax.Array | np.ndarray) and value.ndim == 0:
            value = value.item()
        bounds = HYPERPARAMETER_BOUNDS[name]
        number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
        if not number or not bounds.holds(float(value)):
            raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy in float32 (float64 for float64 logits); smoothing as torch's
    ``CrossEntropyLoss`` (``(1 - eps) * target + eps / num_classes``).

    `labels` are class indices ``(N,)`` or, as torch also accepts, class probabilities
    ``(N, num_classes)`` of a float dtype (the soft targets of :mod:`resnext_flax.mixing`),
    smoothed the same way."""
    check_hyperparameters(label_smoothing=label_smoothing)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(f"probability targets must have the logits' shape {logits.shape}, "
                             f"got {labels.shape}")
        targets = labels.astype(logits.dtype)
    else:
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if isinstance(label_smoothing, jax.core.Tracer) or label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def check_labels(images: jax.Array, labels: jax.Array) -> None:
    """Trace-time check (free under jit): integer class indices, one per image.

    torch's cross-entropy raises for float labels and for (N, 1) labels; here both would
    broadcast into a wrong loss, so they are rejected."""
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {dtype}")
    if tuple(labels.shape) != tuple(images.shape[:1]):
        raise ValueError(f"labels must have shape (N,) = {tuple(images.shape[:1])}, one class "
                         f"index per image, got {tuple(labels.shape)}")


def validate_labels(labels: Any, num_classes: int) -> np.ndarray:
    """Host-side check where a batch comes from: integer labels in [0, num_classes).
    Returns them as a numpy array; raises a ValueError naming the offending values."""
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(f"labels must be in [0, {num_classes}); got {np.unique(bad)[:10]} "
                         "(class indices start at 0)")
    return array


def _invalid_labels(labels: jax.Array, num_classes: int, axis_name: str | None) -> jax.Array:
    """How many labels of the (global) batch are outside [0, num_classes)."""
    count = jnp.sum((labels < 0) | (labels >= num_classes))
    return count if axis_name is None else jax.lax.psum(count, axis_name)


def _forward_train(
    state: TrainState, trainable: Params, images: jax.Array
) -> tuple[jax.Array, Params]:
    """Train-mode logits and the updated BatchNorm statistics."""
    params = {**state.params, **trainable} if state.freeze_backbone else trainable
    model = nnx.merge(state.graphdef, params, state.batch_stats)
    if getattr(model, "num_classes", None) == 0:
        raise ValueError("a headless model (num_classes=0) has no classifier to train; give it "
                         "one with model.reset_classifier(num_classes)")
    if state.freeze_backbone:
        model.eval()
        features = model.forward_features(images)["pre_logits"]
        return model.forward_head(jax.lax.stop_gradient(features)), state.batch_stats
    model.train()
    logits = model(images)
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def train_step_fn(
    *, label_smoothing: float = 0.0, axis_name: str | None = None,
    mix: MixConfig | None = None, mix_seed: int = 0,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """The un-jitted step: forward (train mode), loss, gradients, optax update, BN statistics.

    With `axis_name` it is a per-device program for ``shard_map``: loss and gradients are
    those of the global batch (BatchNorm needs the same `axis_name`, see
    :func:`resnext_flax.parallel.with_batchnorm_axis`).

    `mix` applies MixUp or CutMix (:mod:`resnext_flax.mixing`) to the batch first (to each
    device's part under `axis_name`, as torchvision's reference mixes each GPU's batch), with
    a key from (`mix_seed`, the step, the device): a resumed run draws the same. The
    accuracy is then against the mixed targets' top class, as the reference counts it.
    """
    check_hyperparameters(label_smoothing=label_smoothing)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        check_labels(images, labels)
        targets = labels
        if mix is not None:
            key = jax.random.fold_in(jax.random.key(mix_seed), state.step)
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            images, targets = mix_batch(mix, key, images, labels)

        def loss_fn(trainable):
            logits, batch_stats = _forward_train(state, trainable, images)
            loss = cross_entropy(logits, targets, label_smoothing=label_smoothing)
            if axis_name is not None:
                # The global batch's mean loss. shard_map transposes the implicit broadcast
                # of the replicated parameters into a psum, so the gradient of this
                # device-invariant loss is already the global one (no pmean of grads).
                loss = jax.lax.pmean(loss, axis_name)
            return loss, (logits, batch_stats)

        trainable = state.trainable()
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        top = labels if mix is None else jnp.argmax(targets, -1)
        correct = jnp.sum(jnp.argmax(logits, -1) == top)
        if axis_name is not None:
            correct = jax.lax.psum(correct, axis_name)
        updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        params = {**state.params, **trainable} if state.freeze_backbone else trainable
        new_state = state.replace(
            params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1
        )
        # A label outside [0, num_classes) would train on a wrong loss (one_hot gives a zero
        # row): such a batch leaves the state as it was and reports a NaN loss, without a
        # host round trip (validate_labels checks on the host where batches come from).
        invalid = _invalid_labels(labels, logits.shape[-1], axis_name)
        new_state = jax.tree.map(lambda new, old: jnp.where(invalid == 0, new, old),
                                 new_state, state)
        loss = jnp.where(invalid == 0, loss, jnp.nan)
        return new_state, {"loss": loss, "correct": correct, "invalid_labels": invalid}

    return step


def eval_step_fn(
    *, axis_name: str | None = None
) -> Callable[[TrainState, jax.Array, jax.Array], Metrics]:
    """The un-jitted eval step: eval-mode logits, summed loss and correct count."""

    def step(state: TrainState, images: jax.Array, labels: jax.Array) -> Metrics:
        check_labels(images, labels)
        logits = predict_fn(state, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels
        )
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        invalid = jnp.sum((labels < 0) | (labels >= logits.shape[-1]))
        metrics = {"loss_sum": jnp.sum(losses), "correct": correct, "invalid_labels": invalid}
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    return step


def predict_fn(state: TrainState, images: jax.Array) -> jax.Array:
    """Eval-mode logits (running BatchNorm statistics); pure, for jit or shard_map."""
    return functional.apply(state.graphdef, (state.params, state.batch_stats), images)


@functools.cache
def make_train_step(
    *, label_smoothing: float = 0.0, donate: bool = False
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """A jit-compiled train step ``(state, images, labels) -> (state, metrics)``.

    ``donate=True`` lets XLA reuse the old state's buffers (saves memory on accelerators;
    the state passed in must not be used again). Cached: the same options give the same
    jitted function, so its compilations are reused.
    """
    step = train_step_fn(label_smoothing=label_smoothing)
    return jax.jit(step, donate_argnums=(0,) if donate else ())


#: Jit-compiled defaults: ``train_step(state, images, labels) -> (state, {'loss', 'correct'})``.
train_step = make_train_step()
#: ``eval_step(state, images, labels) -> {'loss_sum', 'correct'}`` with running BN statistics.
eval_step = jax.jit(eval_step_fn())
#: ``predict(state, images) -> logits`` in eval mode.
predict = jax.jit(predict_fn)


def batchnorm_modules(model: nnx.Module) -> list[BatchNorm]:
    """Every BatchNorm of `model` (for switching modes or setting ``axis_name``)."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm)]
