"""The progress display of :class:`fastvae.trainer.Trainer`: a per-step bar on a terminal, a line per epoch.

The bar (tqdm, on stderr) shows steps done of the epoch, steps/s and a postfix with the negative ELBO,
its two terms per sample and samples/s.  The per-step losses stay on the device
(``terms[step] = [objective, recon, kl]``); the bar reads them only when it refreshes, every
``min(16, steps // 8)`` steps: on CUDA that is the only host sync inside an epoch.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

__all__ = ["EpochBar", "progress_bar", "postfix", "print_epoch"]


class EpochBar:
    """The per-step tqdm bar of an epoch (see :func:`progress_bar`), fed from the device-side ``terms``."""

    def __init__(self, terms: torch.Tensor, desc: str, enabled: bool, world: int) -> None:
        self.terms, self.world = terms, world
        self.bar = progress_bar(terms.shape[0], desc, enabled)
        self.refresh = max(1, min(16, terms.shape[0] // 8 or 1))
        self.rows, self.t0 = 0, time.perf_counter()

    def update(self, steps: int, rows: int) -> bool:
        """Count a step of ``rows`` local rows; True when the bar refreshed (it read ``terms``: host sync)."""
        self.rows += rows
        if self.bar is None:
            return False
        self.bar.update(1)
        if steps % self.refresh and steps != 1:
            return False
        rate = self.rows * self.world / max(time.perf_counter() - self.t0, 1e-9)
        sums = self.terms[:steps].double().sum(0).tolist()
        self.bar.set_postfix_str(postfix(sums, self.rows, rate), refresh=False)
        return True

    def close(self, sums: list[float], n: int) -> None:
        """The epoch's final postfix from its ``sums`` over ``n`` samples; the bar is then cleared."""
        if self.bar is not None:
            elapsed = time.perf_counter() - self.t0
            self.bar.set_postfix_str(
                postfix(sums, n, n / elapsed if elapsed > 0 else float("nan")), refresh=False
            )
            self.bar.close()


def progress_bar(total: int, desc: str, enabled: bool):
    """A per-step tqdm bar on stderr (steps done/total, steps/s, then the postfix: loss and samples/s).

    ``disable=None``: no bar when stderr is not a terminal (logs, CI), where the one line per epoch of
    :func:`print_epoch` is the record; ``leave=False`` clears the bar when that line is printed.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr, disable=None
    )
    return None if bar.disable else bar


def postfix(sums: list[float], n: float, rate: float) -> str:
    """The bar's postfix from ``sums = [objective, recon, kl]`` summed over ``n`` samples so far.

    ``loss = (recon + kl) / n`` is the negative ELBO per sample whatever ``beta`` (the objective
    ``recon + beta * kl`` is not shown), then the two terms per sample and ``rate`` in samples/s.
    """
    n = max(n, 1)
    loss, recon, kl = (sums[1] + sums[2]) / n, sums[1] / n, sums[2] / n
    return f"loss={loss:.2f} recon={recon:.2f} kl={kl:.2f} samples/s={rate:,.0f}"


def print_epoch(record: dict[str, Any], epochs: int) -> None:
    """One line per epoch on stderr (terminal or log): train and held-out negative ELBO, time, samples/s."""
    val = "" if record["val_loss"] is None else f"  val {record['val_loss']:.2f}"
    rate = record["samples_per_s"] or float("nan")
    print(
        f"epoch {record['epoch']}/{epochs}  train {record['train_loss']:.2f} "
        f"(recon {record['train_recon']:.2f}, kl {record['train_kl']:.2f}){val}  "
        f"{record['seconds']:.2f}s, {rate:,.0f} samples/s",
        file=sys.stderr,
        flush=True,
    )
