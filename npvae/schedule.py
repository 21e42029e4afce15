"""Learning-rate schedules, by name, so that a run's checkpoint can record its schedule.

    constant        the learning rate given, every epoch (the default)
    burda           Burda et al. (2015, section 5): for i = 0 .. 7, 3^i epochs at
                    lr * 10^(-i/7); 3,280 epochs in all, with Adam's epsilon at 1e-4
    burda:P         the same eight stages compressed into P epochs, stage i lasting
                    about P * 3^i / 3280 epochs (at least one), for a shorter budget

The learning rate of an epoch depends only on the schedule, the base rate and the
epoch's index, so a resumed run uses exactly the rates it would have used (SCHED.1).
"""
from __future__ import annotations

BURDA_STAGES = 8  # i = 0 .. 7
BURDA_EPOCHS = sum(3**i for i in range(BURDA_STAGES))  # 3,280
BURDA_ADAM_EPS = 1e-4


def parse(spec: str) -> tuple[str, int | None]:
    """"constant" -> ("constant", None); "burda" -> ("burda", 3280); "burda:P" -> ("burda", P)."""
    text = str(spec).strip().lower()
    if text == "constant":
        return "constant", None
    if text == "burda":
        return "burda", BURDA_EPOCHS
    if text.startswith("burda:"):
        try:
            total = int(text.split(":", 1)[1])
        except ValueError:
            total = 0
        if total < BURDA_STAGES:
            raise ValueError(f"a compressed schedule needs at least {BURDA_STAGES} epochs, one "
                             f"per stage: 'burda:P' with P >= {BURDA_STAGES}, got {spec!r}")
        return "burda", total
    raise ValueError(f"schedule must be 'constant', 'burda' or 'burda:P' (P epochs), got {spec!r}")


def burda_stage_lengths(total: int) -> list[int]:
    """Epochs per stage: 3^i for the full 3,280; otherwise one each plus the rest shared in
    proportion to 3^i (largest remainders first), summing to ``total``."""
    weights = [3**i for i in range(BURDA_STAGES)]
    if total == BURDA_EPOCHS:
        return weights
    extra = total - BURDA_STAGES
    shares = [extra * w / BURDA_EPOCHS for w in weights]
    lengths = [1 + int(share) for share in shares]
    by_remainder = sorted(range(BURDA_STAGES), key=lambda i: (shares[i] - int(shares[i]), i),
                          reverse=True)
    for i in by_remainder[:total - sum(lengths)]:
        lengths[i] += 1
    return lengths


def epochs_of(spec: str) -> int | None:
    """The number of epochs a schedule defines, or None for 'constant' (any number)."""
    return parse(spec)[1]


def lr_at(spec: str, base_lr: float, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under schedule ``spec``  (SCHED.1).

    After the schedule's last stage the last rate continues.
    """
    name, total = parse(spec)
    if name == "constant":
        return float(base_lr)
    end = 0
    for i, length in enumerate(burda_stage_lengths(total)):
        end += length
        if epoch < end:
            return float(base_lr) * 10.0 ** (-i / 7.0)
    return float(base_lr) * 10.0 ** (-(BURDA_STAGES - 1) / 7.0)


def adam_eps(spec: str) -> float:
    """Adam's epsilon for a schedule: 1e-4 for Burda et al.'s, else the default 1e-8."""
    return BURDA_ADAM_EPS if parse(spec)[0] == "burda" else 1e-8
