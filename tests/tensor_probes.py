"""Dispatch modes that watch the tensors aten ops make: what a test asserts about memory without
measuring it (no copies of a weight, no T x T matrix)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CopiesOf(TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op makes from the given tensors' storage."""

    def __init__(self, *tensors):
        super().__init__()
        self.storages = {x.untyped_storage().data_ptr() for x in tensors}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in self.storages for x in inputs):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.largest = max(self.largest, o.numel() * o.element_size())
        return out


class LargestTensorSeen(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward); meta tensors, which
    hold no memory, do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                self.largest = max(self.largest, o.numel())
        return out
