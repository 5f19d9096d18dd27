"""Fine-tune a ResNet on scikit-learn's handwritten digits, with checkpoints and resume.

    python examples/finetune.py                          # resnet18, random init, 5 epochs
    python examples/finetune.py --weights resnet18.pth   # start from a local torchvision file
    python examples/finetune.py --checkpoint-dir ckpt    # interrupt (Ctrl-C) and rerun: resumes

The 8x8 digits (1797 images, shipped with scikit-learn: nothing is downloaded) are upsampled
to 32x32 and repeated to 3 channels. The data order is a pure function of (seed, epoch), and
checkpoints hold the whole train state (parameters, BatchNorm statistics, optimizer, step),
so a resumed run ends in exactly the state of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import resnext_flax
from resnext_flax import training
from resnext_flax.weights.torch_port import StateDictMismatchWarning

MEAN, STD = 0.3, 0.4  # of the digits scaled to [0, 1]


def load_data(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as NHWC float32 (size x size x 3), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    images = np.asarray(jax.image.resize(images, (len(images), size, size), "bilinear"))
    images = np.repeat(((images - MEAN) / STD)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: deterministic, so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def build_model(args: argparse.Namespace) -> resnext_flax.ResNet:
    dtype = jnp.bfloat16 if args.bf16 else None
    model = resnext_flax.create_model(args.model, num_classes=10, dtype=dtype,
                                      rngs=nnx.Rngs(args.seed))
    if args.weights:
        state_dict = resnext_flax.read_state_dict(args.weights)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        report = resnext_flax.compare_state_dict(model, state_dict)
        if report.unexpected or report.mismatched or any(
            not k.startswith("fc.") for k in report.missing
        ):
            raise SystemExit(report.format(args.model))
        with warnings.catch_warnings():  # the head (fc) is missing on purpose
            warnings.simplefilter("ignore", StateDictMismatchWarning)
            model = resnext_flax.load_torch_state_dict(model, state_dict, strict=False)
    return model


@functools.cache
def optimizer(lr: float, weight_decay: float, total_steps: int) -> optax.GradientTransformation:
    """SGD with cosine decay; cached because the optimizer is static in the jitted step, so
    an equal-but-new one would compile the step again (runs in one process share it)."""
    schedule = optax.cosine_decay_schedule(lr, total_steps)
    return training.sgd(schedule, momentum=0.9, weight_decay=weight_decay)


def evaluate(state: training.TrainState, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> float:
    """Top-1 accuracy; the last batch is padded so one compiled shape serves every batch."""
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        logits = training.predict(state, jnp.asarray(x))
        correct += int(np.sum(np.argmax(np.asarray(logits)[:n], -1) == labels[start:start + n]))
    return correct / len(images)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=resnext_flax.list_models())
    p.add_argument("--weights", help="local torchvision state dict (.pth/.safetensors); "
                   "the head is replaced")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--size", type=int, default=32, help="image side after upsampling")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="finetune_checkpoints")
    p.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    p.add_argument("--train-limit", type=int, default=0, help="use only N training images")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop abruptly after N steps without saving (simulates a crash)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[training.TrainState, list[dict]]:
    """Train (resuming from the latest checkpoint if any); returns the state and history."""
    x_train, y_train, x_test, y_test = load_data(args.size, args.seed)
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    tx = optimizer(args.lr, args.weight_decay, total)
    state = training.create_train_state(build_model(args), tx,
                                        freeze_backbone=args.freeze_backbone)
    step_fn = training.make_train_step(label_smoothing=args.label_smoothing)

    manager = ocp.CheckpointManager(
        os.path.abspath(args.checkpoint_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    def checkpointed(state: training.TrainState) -> dict:
        return {"params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state, "step": state.step}

    if manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpointed(state))
        restored = manager.restore(manager.latest_step(),
                                   args=ocp.args.StandardRestore(abstract))
        state = state.replace(**restored)
        print(f"resumed from step {int(state.step)}", file=sys.stderr)

    def save() -> None:
        if manager.latest_step() == int(state.step):
            return  # already saved (an epoch end that is also a --save-every step)
        manager.save(int(state.step), args=ocp.args.StandardSave(checkpointed(state)),
                     force=True)

    history = []
    step = int(state.step)
    start_epoch, offset = divmod(step, steps_per_epoch)
    t0 = time.perf_counter()
    try:
        for epoch in range(start_epoch, args.epochs):
            order = epoch_order(len(x_train), args.seed, epoch)
            bar = tqdm(range(offset, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=args.no_progress, leave=False)
            offset = 0
            for i in bar:
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                state, metrics = step_fn(state, jnp.asarray(x_train[idx]),
                                         jnp.asarray(y_train[idx]))
                step += 1
                if not args.no_progress:  # reading the loss waits for the step to finish
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
                if args.stop_after_steps and step >= args.stop_after_steps:
                    manager.wait_until_finished()
                    return state, history
                if args.save_every and step % args.save_every == 0:
                    save()
            save()
            accuracy = evaluate(state, x_test, y_test, 128)
            history.append({"epoch": epoch + 1, "step": step, "accuracy": accuracy,
                            "seconds": time.perf_counter() - t0})
            print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    except KeyboardInterrupt:
        save()
        manager.wait_until_finished()
        print(f"interrupted: saved step {int(state.step)}; rerun to resume", file=sys.stderr)
        raise
    manager.wait_until_finished()
    return state, history


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
