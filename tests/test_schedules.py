"""The learning-rate schedules against torch's schedulers, chained as torchvision's
classification reference chains them and stepped once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from resnext_flax.schedules import Schedule

torch = pytest.importorskip("torch")


def torch_rates(lr: float, epochs: int, warmup: int, method: str, decay: float,
                lr_min: float) -> list[float]:
    """The rate of each epoch under torchvision reference's scheduler, as its train.py
    builds it (``SequentialLR`` of the warm-up and ``CosineAnnealingLR``)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup,
                                                      eta_min=lr_min)
    if warmup > 0:
        kind = {"linear": torch.optim.lr_scheduler.LinearLR,
                "constant": torch.optim.lr_scheduler.ConstantLR}[method]
        keyword = "start_factor" if method == "linear" else "factor"
        first = kind(opt, total_iters=warmup, **{keyword: decay})
        scheduler = torch.optim.lr_scheduler.SequentialLR(opt, [first, main], [warmup])
    else:
        scheduler = main
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


CASES = [  # lr, epochs, warm-up epochs, method, decay, lr_min
    (0.5, 600, 5, "linear", 0.01, 0.0),   # torchvision's recipe for its V2 weights
    (0.1, 20, 3, "constant", 0.1, 0.0),
    (0.2, 12, 0, "linear", 0.01, 1e-3),
    (0.05, 7, 6, "linear", 0.01, 0.0),
]


@pytest.mark.parametrize("lr,epochs,warmup,method,decay,lr_min", CASES)
def test_per_epoch_rates_equal_torchvision_reference(lr, epochs, warmup, method, decay, lr_min):
    schedule = Schedule(lr, epochs, warmup, method, decay, lr_min, unit="epoch")
    expected = torch_rates(lr, epochs, warmup, method, decay, lr_min)
    ours = [schedule.rate(e) for e in range(epochs)]
    # torch's cosine is a recurrence in float64; the closed form differs by rounding only.
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lr,epochs,warmup,method,decay,lr_min", CASES)
def test_optax_form_holds_each_epochs_rate_over_its_steps(lr, epochs, warmup, method, decay,
                                                         lr_min):
    per_epoch = 3
    schedule = Schedule(lr, epochs, warmup, method, decay, lr_min, unit="epoch")
    steps = np.arange(epochs * per_epoch)
    rates = np.asarray([schedule.optax(per_epoch)(s) for s in steps])
    expected = np.repeat(torch_rates(lr, epochs, warmup, method, decay, lr_min), per_epoch)
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(rates, expected, rtol=8 * eps, atol=8 * eps * lr)


def test_per_step_form_rises_linearly_then_decays_to_lr_min():
    schedule = Schedule(1.0, 4, 1, "linear", 0.0, 0.1, unit="step")
    fn = schedule.optax(10)
    assert float(fn(0)) == 0.0
    assert float(fn(5)) == pytest.approx(0.5)
    assert float(fn(10)) == pytest.approx(1.0)
    assert float(fn(40)) == pytest.approx(0.1)
    assert float(fn(25)) == pytest.approx(0.1 + 0.9 * (1 + np.cos(np.pi * 0.5)) / 2)


@pytest.mark.parametrize("field,value,message", [
    ("warmup_method", "cosine", "warmup_method"),
    ("unit", "iteration", "unit"),
    ("warmup_decay", 1.5, "warmup_decay"),
    ("warmup_epochs", 11, "warmup_epochs"),
    ("lr_min", 2.0, "lr_min"),
])
def test_bad_settings_name_the_field(field, value, message):
    settings = dict(lr=1.0, epochs=10, warmup_epochs=1, unit="epoch")
    settings[field] = value
    with pytest.raises(ValueError, match=message):
        Schedule(**settings)


def test_fractional_warmup_needs_the_per_step_form():
    with pytest.raises(ValueError, match="whole number"):
        Schedule(1.0, 10, 0.5, unit="epoch")
    assert Schedule(1.0, 10, 0.5, unit="step").rate(0.25) == pytest.approx(0.5)
