"""Timestep feature caching: forecast a block's features at a skipped denoising step from the steps
that were computed (the TaylorSeer family), instead of computing them.

A :class:`Forecaster` keeps, per key (a block id), only what its policy needs: the last computed
value (``reuse``), TaylorSeer's finite-difference derivatives up to ``order`` (``taylor``), or the
last ``order + 1`` values with their noise levels (``newton``). Entries go when their block leaves
the queue (:meth:`Forecaster.drop`), so what it holds is bounded by the queue's length (at most
``steps`` blocks), never by the video's.

Who forecasts what is the caller's: rank 0's state forecasts a block's noise prediction
(``cache.level=model``, :mod:`engine`), each rank's stage its own layers' residual
(``cache.level=stage``, :mod:`stage`); the serial reference does both its own way
(:mod:`reference`). Every policy is linear in the recorded values, so forecasting each stage's
residual and summing equals forecasting the whole model's: the layer split does not change the result.
"""

from __future__ import annotations

import math

import torch

from .config import CacheConfig


class Forecaster:
    def __init__(self, policy: str, order: int = 1):
        if policy not in ("reuse", "taylor", "newton"):
            raise ValueError(f"no forecaster for policy {policy!r}")
        self.policy, self.order = policy, order if policy != "reuse" else 0
        # key -> (step, sigma, tensors): the steps and noise levels of the computed values (newest last)
        # and the tensors the policy keeps (reuse: [value]; taylor: derivatives 0..order; newton: values)
        self._entries: dict[int, tuple[list[int], list[float], list[torch.Tensor]]] = {}

    @classmethod
    def for_config(cls, cfg: CacheConfig) -> "Forecaster | None":
        return None if cfg.policy == "none" else cls(cfg.policy, cfg.order)

    def record(self, key: int, step: int, sigma: float, value: torch.Tensor) -> None:
        """The value computed for ``key`` at denoising ``step`` (noise level ``sigma``)."""
        steps, sigmas, kept = self._entries.get(key, ([], [], []))
        if self.policy == "reuse":
            kept = [value.detach().clone()]  # a copy: the caller's tensor may be a reused buffer
            value = None
        else:
            value = value.detach().to(torch.float32, copy=True)
        if self.policy == "taylor":
            # TaylorSeer's recursion: derivative i+1 at this step is the change of derivative i since
            # the last computed step over the steps between them
            new = [value]
            for i in range(min(self.order, len(kept))):
                new.append((new[i] - kept[i]) / (step - steps[-1]))
            kept = new
        elif self.policy == "newton":
            kept = (kept + [value])[-(self.order + 1):]
        steps, sigmas = (steps + [step])[-(self.order + 1):], (sigmas + [float(sigma)])[-(self.order + 1):]
        self._entries[key] = (steps, sigmas, kept)

    def predict(self, key: int, step: int, sigma: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The forecast for ``key`` at ``step`` (noise level ``sigma``), in ``dtype`` (default: float32,
        ``reuse``: the recorded dtype)."""
        if key not in self._entries:
            raise RuntimeError(f"no computed step of block {key} to forecast step {step} from")
        steps, sigmas, kept = self._entries[key]
        if self.policy == "reuse":
            out = kept[0]
        elif self.policy == "taylor":
            d = step - steps[-1]
            out = kept[0].clone()
            for i in range(1, len(kept)):
                out.add_(kept[i], alpha=d ** i / math.factorial(i))
        else:
            out = _newton(sigmas, kept, float(sigma))
        return out if dtype is None else out.to(dtype)

    def drop(self, key: int) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, kept in self._entries.values() for t in kept)

    # -- checkpoints -------------------------------------------------------------

    def state(self) -> dict:
        """Everything recorded, as plain lists and tensors (for :func:`checkpoint.pack`)."""
        return {str(k): {"steps": steps, "sigmas": sigmas, "kept": kept}
                for k, (steps, sigmas, kept) in self._entries.items()}

    def load(self, state: dict, device=None) -> None:
        """Continue from a :meth:`state` (tensors moved to ``device``)."""
        self._entries = {int(k): (list(e["steps"]), [float(x) for x in e["sigmas"]],
                                  [t.to(device) if device is not None else t for t in e["kept"]])
                         for k, e in state.items()}


def _newton(xs: list[float], ys: list[torch.Tensor], x: float) -> torch.Tensor:
    """The polynomial through the points ``(xs[i], ys[i])`` evaluated at ``x`` (Newton's divided
    differences; distinct ``xs``)."""
    coef = [y.clone() for y in ys]
    n = len(xs)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (xs[i] - xs[i - j])
    out = coef[n - 1].clone()
    for i in range(n - 2, -1, -1):
        out = out * (x - xs[i]) + coef[i]
    return out
