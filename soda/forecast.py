"""Taylor forecasting of a module's output in sampler steps (TaylorSeer, Shenyi-Z/TaylorSeer).

After each full computation of a (layer, module) at step s, TaylorSeer's
`derivative_approximation` refreshes finite-difference factors from the previous ones:

    f_0 = D(s),   f_{i+1} = (f_i - f_i_old) / (s - s_old)    while f_i_old exists (up to the order),

where s_old is the previous full computation. A forecast at a later step s' is the Taylor
polynomial `taylor_formula`: sum_i f_i (s' - s)^i / i!. The official code counts steps down
(s = 49 .. 0) and both the distance and the offset change sign there; the signs cancel in every
term, so counting up as we do gives the same values (tests/reference/taylorseer_reference.py).
With evenly spaced full steps the factors are backward differences divided by the spacing^i.

A forecast is a fixed linear combination of the last order+1 full outputs, so
`forecast_weights` gives the profiler those weights by running the very same recursion on
unit vectors: what the profiler measures is exactly what the executor serves. The factors
live on the namespace of the outputs they come from (`soda.arrays`: numpy, CuPy or torch);
the step distances are Python scalars, which each library applies in the array's float type.
"""
from __future__ import annotations

import math

import numpy as np

from soda.arrays import copy, namespace


class TaylorState:
    """Factors f_0..f_order of one (layer, module), refreshed at each full computation."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self.step: int | None = None
        self.factors: list[np.ndarray] = []

    def update(self, s: int, D: np.ndarray) -> None:
        factors = [D]
        for i in range(self.max_order):
            if i >= len(self.factors):
                break
            factors.append((factors[i] - self.factors[i]) / (s - self.step))
        self.step, self.factors = s, factors

    def predict(self, s: int, order: int) -> np.ndarray:
        """The order-`order` forecast at step s (lower when fewer full computations exist yet)."""
        x = s - self.step
        out = copy(namespace(self.factors[0]), self.factors[0])
        for i in range(1, min(order, len(self.factors) - 1) + 1):
            out += (x**i / math.factorial(i)) * self.factors[i]
        return out

    def extra_bytes(self) -> int:
        """Memory held beyond the plain cache (f_0 is the last full output, which the cache holds)."""
        return sum(f.nbytes for f in self.factors[1:])


def forecast_weights(full_steps: list[int], s: int, order: int) -> np.ndarray:
    """Weights w over `full_steps` (oldest first) with forecast(s) = sum_j w_j D(full_steps[j]),
    for the TaylorState that saw exactly those full computations."""
    state = TaylorState(order)
    eye = np.eye(len(full_steps))
    for j, step in enumerate(full_steps):
        state.update(step, eye[j])
    return state.predict(s, order)


def forecast_cache(orders: list[list[int]], num_tokens: int, hidden: int, itemsize: int = 4) -> dict:
    """Extra memory forecasting holds beyond the plain cache, per (layer, module) and batch row:
    order x tokens x hidden x itemsize (float32 by default); `orders` is Schedule.forecast_orders()."""
    per = [[o * num_tokens * hidden * itemsize for o in row] for row in orders]
    return {"orders": orders, "bytes_per_row": per, "total_bytes_per_row": int(sum(map(sum, per)))}
