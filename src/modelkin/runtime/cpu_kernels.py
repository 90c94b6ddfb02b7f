"""CPU threading policy for the decoder maths: one-row products split over the intra-op threads
(``Linear``, ``split_gemv``), tiny ops kept off the thread team (``one_cpu_thread``), and the weight
layout batch-1 GEMV reads fastest (``prefer_gemv_layout``). Timings: bench/README.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU products take the fastest measured kernel.

    - One row (decoding at batch 1): PyTorch's CPU GEMV stays on one core, whose memory bandwidth
      caps it well below the machine's. With more than one intra-op thread, a weight of at least
      ``SPLIT_MIN_NUMEL`` elements is cut into one block per thread and the blocks run as one
      batched matmul, which the CPU kernels spread over the threads. The blocks are views; nothing
      is copied. On cores busy with other processes, each split waits for a descheduled thread: run
      with one intra-op thread there (``torch.set_num_threads(1)``).
    - Several float32 rows, no gradient: oneDNN's matmul (``onednn_linear``) instead of the BLAS
      ``F.linear`` calls, 1.2-1.5x faster on the 2-core AMD EPYC VMs (bench/README.md).
    - Everything else: ``F.linear``.
    """

    SPLIT_MIN_NUMEL = 1 << 18  # smaller matrices finish before a thread team pays off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if x.numel() == self.in_features:
            threads = torch.get_num_threads()
            if threads > 1 and self.in_features * self.out_features >= self.SPLIT_MIN_NUMEL:
                return split_gemv(x, self.weight, self.bias, threads)
            return F.linear(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)


ONEDNN_ENV = "MODELKIN_CPU_LINEAR"  # "blas": every multi-row float32 product through F.linear
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and os.environ.get(ONEDNN_ENV, "onednn") != "blas")


def onednn_linear(x: torch.Tensor, w_OI: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of a float32 batch through oneDNN on the CPU where no gradient is wanted.

    The BLAS PyTorch links (MKL) runs float32 GEMMs at 81 GFLOPS for 24 rows and 120 for 128 on the
    2-core AMD EPYC VMs; oneDNN's matmul runs the same shapes at 110 and 169 (SmolLM2-135M's layers,
    bench/README.md). Results agree to float32 rounding, not bit for bit. bfloat16 already goes
    through oneDNN; other dtypes, gradients and builds without oneDNN take ``F.linear``;
    ``MODELKIN_CPU_LINEAR=blas`` forces it.
    """
    global _ONEDNN
    if (
        not _ONEDNN
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or w_OI.dtype != torch.float32
        or (torch.is_grad_enabled() and (x.requires_grad or w_OI.requires_grad))
    ):
        return F.linear(x, w_OI, bias)
    try:
        return _onednn_op(x, w_OI, bias, "none", [], "")
    except RuntimeError:  # a build whose oneDNN refuses this CPU or shape: the BLAS path from now on
        _ONEDNN = False
        return F.linear(x, w_OI, bias)


def _onednn_op(*args: object) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


def split_gemv(x: torch.Tensor, w_OI: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """``F.linear`` of one row ``x`` as ``parts`` block products in one ``bmm`` (see ``Linear``).

    A row-major weight splits along its outputs (each block a run of whole rows); a column-major
    one (``prefer_gemv_layout``) along its inputs, and the partial products are summed.
    """
    O, I = w_OI.shape
    if w_OI.stride() == (I, 1) and O % parts == 0:
        w_PIo = w_OI.view(parts, O // parts, I).transpose(1, 2)
        y = torch.bmm(x.reshape(1, 1, I).expand(parts, 1, I), w_PIo).reshape(O)
    elif w_OI.stride() == (1, O) and I % parts == 0:
        w_PiO = w_OI.t().view(parts, I // parts, O)
        y = torch.bmm(x.reshape(parts, 1, I // parts), w_PiO).sum(dim=0)
    else:
        return F.linear(x, w_OI, bias)
    y = y.view(*x.shape[:-1], O)
    return y if bias is None else y + bias


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run tiny CPU ops without an OpenMP team: splitting a few heads' work across threads costs
    more than the work, and when other processes hold the cores every team waits a scheduler tick
    for its late thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prefer_gemv_layout(model: nn.Module) -> None:
    """Store the weight of every Linear with more outputs than inputs column-major (same values,
    same [out, in] shape, transposed strides), so a batch-1 ``x @ W.T`` reads it as a contiguous
    [in, out] matrix.

    On CPU, float32 GEMV over gate/up and a tied lm_head runs faster this way; thin matrices
    (down_proj, k/v) are faster row-major and stay so. Tied embeddings keep sharing one tensor.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            old = module.weight
            new = nn.Parameter(old.detach().t().contiguous().t(), requires_grad=old.requires_grad)
            for other in model.modules():  # re-point every module sharing it (tied embeddings)
                for name, param in list(other.named_parameters(recurse=False)):
                    if param is old:
                        setattr(other, name, new)
