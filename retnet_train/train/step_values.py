"""A step's loss and gradient norm on their way to the host (trainer.defer_step_values).

Reading a GPU value on the host (float(), .item()) waits for everything queued before it; at the
end of a step that drains the GPU's queue, and the GPU then idles until the host has fetched the
next batch and launched its first kernels. Copied here into pinned host memory without waiting,
with an event behind the copy, the values can be read after the next step has been queued: the
wait is then for this step's work only, which by then is done.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StepValues:
    """loss_sum: the step's summed micro-batch losses (a 0-dim tensor); grad_norm: a tensor, a
    float, or None (no norm computed). read() -> (loss_sum, grad_norm) as Python floats."""

    def __init__(self, loss_sum: Tensor, grad_norm: Tensor | float | None):
        on_device = [loss_sum.detach().double().reshape(1)]
        self._norm = None
        if isinstance(grad_norm, Tensor):
            on_device.append(grad_norm.detach().double().reshape(1).to(loss_sum.device))
        elif grad_norm is not None:
            self._norm = float(grad_norm)
        values = torch.cat(on_device)  # [1] or [2] float64: one copy for both
        self._ready = None
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values

    def read(self) -> tuple[float, float | None]:
        if self._ready is not None:
            self._ready.synchronize()  # this step's work only, not what was queued after it
        values = self._host.tolist()
        return values[0], (values[1] if len(values) > 1 else self._norm)
