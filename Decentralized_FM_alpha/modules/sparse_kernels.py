"""The two gathered matrix products of DejaVu's sparse decode step (SPEC section 8), in Triton and in plain torch.

    rows_times(x, W, sel)      y[b, j] = act(x[b] . W[index[j]] + bias[index[j]]) (* x[b] . U[index[j]]) * keep[b, j]
    columns_times(a, W, sel)   out[b]  = sum_j a[b, j] * W[:, index[j]]

Only the selected rows of W (q, k, v, fc1, gate, up: one row per output unit) and the selected columns (o_proj,
out_proj, fc2, down: one column per input unit) are read. A column gather of a row-major (d, N) matrix reads 2 bytes
out of every 32-byte sector, so the Triton path reads the columns as rows of the transposed copy W^T (N, d), made once
per weight (`transposed`), as DejaVu's kernels do. A selection holds a fixed number C of entries whose first `count`
(a device scalar) are real: a step has the same shapes whatever the union of a batch's masks, so it can be captured in
a CUDA graph, and the Triton programs past `count` read nothing.

Backends: "triton" on CUDA tensors (an error if Triton is missing), "torch" elsewhere; either can be forced
(`backend=`), and TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (float32) for checking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU machines run the torch backend
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Selection:
    """The units one decode step computes: `index` (C,) unit ids, of which the first `count` are real (the rest is
    padding that reads unit 0 and is multiplied by 0); `keep` (B, C), 1 where a row's own mask keeps the entry
    (None: every row keeps every real entry; then C == count)."""
    index: torch.Tensor  # (C,) int64
    count: torch.Tensor  # (1,) int32, on the device of index
    keep: Optional[torch.Tensor] = None  # (B, C) in the compute dtype
    _rows: dict = field(default_factory=dict, repr=False, compare=False)

    def rows(self, width: int) -> "Selection":
        """The same selection over rows of `width` per unit (a head's head_dim rows of q or columns of o); made once
        per selection and width."""
        if width not in self._rows:
            index = (self.index[:, None] * width + torch.arange(width, device=self.index.device)).flatten()
            keep = None if self.keep is None else self.keep.repeat_interleave(width, dim=1)
            self._rows[width] = Selection(index, self.count * width, keep)
        return self._rows[width]


def pick_backend(t: torch.Tensor, backend: Optional[str]) -> str:
    """`backend` if given, else triton for CUDA tensors and torch otherwise; triton without Triton is an error."""
    backend = backend or ("triton" if t.is_cuda else "torch")
    if backend not in ("triton", "torch"):
        raise ValueError(f"kernel backend must be triton or torch, got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("the Triton sparse decode kernels need Triton (CUDA builds of torch ship it); "
                           "on a machine without it pass backend='torch'")
    return backend


def transposed(linear: torch.nn.Module) -> torch.Tensor:
    """linear.weight.T as a contiguous copy (N, d), kept on the module and remade when the weight moves or changes."""
    w = linear.weight
    stamp = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = linear.__dict__.get("_sparse_decode_transposed")
    if cached is None or cached[0] != stamp:
        cached = (stamp, w.detach().t().contiguous())
        linear.__dict__["_sparse_decode_transposed"] = cached
    return cached[1]


# ------------------------------------------------------------------------------------------- the torch backend
def rows_times_torch(x, weight, sel, bias=None, up=None, act=None):
    y = F.linear(x, weight.index_select(0, sel.index), None if bias is None else bias.index_select(0, sel.index))
    if act == "relu":
        y = F.relu(y)
    elif act == "silu":
        y = F.silu(y)
    if up is not None:
        y = y * F.linear(x, up.index_select(0, sel.index))
    return y if sel.keep is None else y * sel.keep


def columns_times_torch(a, weight, sel):
    return F.linear(a, weight.index_select(1, sel.index))


# ------------------------------------------------------------------------------------------ the Triton backend
if triton is not None:
    def _configs(names, *shapes):
        """Autotuning candidates: `names` set to shape[:-2], then num_warps and num_stages."""
        configs = [triton.Config(dict(zip(names, s[:-2])), num_warps=s[-2], num_stages=s[-1]) for s in shapes]
        return configs[:1] if INTERPRET else configs  # the interpreter cannot time configurations

    @triton.jit
    def _activate(acc, acc_up, ACT: tl.constexpr, HAS_UP: tl.constexpr):
        """The rows kernels' epilogue: ReLU (ACT 1) or SiLU (ACT 2), then times the up rows' product (SwiGLU)."""
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        if ACT == 2:
            acc = acc * tl.sigmoid(acc)
        if HAS_UP:
            acc = acc * acc_up
        return acc

    @triton.autotune(configs=_configs(("BLOCK_C", "BLOCK_D"), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3),
                                      (32, 128, 4, 4), (16, 128, 2, 4), (64, 128, 4, 3)),
                     key=["C", "D", "HAS_UP"])
    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, u_ptr, bias_ptr, index_ptr, count_ptr, keep_ptr, y_ptr,
                     B, C, stride_x, stride_w, stride_keep, stride_y, D: tl.constexpr,
                     HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, ACT: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_C selected rows x BLOCK_B batch rows, streaming the rows' D weights.
        pid_c, pid_b = tl.program_id(0), tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        count = tl.load(count_ptr)
        live = (offs_c < C) & (offs_c < count)
        rows = tl.load(index_ptr + offs_c, mask=live, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # rows past the count are masked off: their loads move no bytes
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            xt = tl.load(x_ptr + offs_b[None, :] * stride_x + offs_d[:, None],
                         mask=(offs_b < B)[None, :] & in_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_B)
            w_mask = live[:, None] & in_d[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
            if IEEE:
                acc += tl.dot(w, xt, input_precision="ieee")
            else:
                acc += tl.dot(w, xt)
            if HAS_UP:
                u = tl.load(u_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
                if IEEE:
                    acc_up += tl.dot(u, xt, input_precision="ieee")
                else:
                    acc_up += tl.dot(u, xt)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
        acc = _activate(acc, acc_up, ACT, HAS_UP)
        out_mask = (offs_c < C)[:, None] & (offs_b < B)[None, :]
        if HAS_KEEP:
            acc *= tl.load(keep_ptr + offs_b[None, :] * stride_keep + offs_c[:, None], mask=out_mask, other=0.0)
        acc = tl.where(live[:, None], acc, 0.0)
        tl.store(y_ptr + offs_b[None, :] * stride_y + offs_c[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.autotune(configs=_configs(("BLOCK_C", "BLOCK_D"), (4, 512, 4, 3), (8, 512, 4, 3), (4, 1024, 4, 2),
                                      (8, 256, 4, 4), (16, 256, 8, 3), (2, 1024, 4, 3)),
                     key=["C", "D", "HAS_UP"])
    @triton.jit
    def _rows_gemv_kernel(x_ptr, w_ptr, u_ptr, bias_ptr, index_ptr, count_ptr, keep_ptr, y_ptr, C, stride_w,
                          D: tl.constexpr, HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
                          ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        # Batch 1: one program per BLOCK_C selected rows, a multiply and a row sum (no tl.dot, whose 16-row minimum
        # tile leaves few programs, and most of the chip's memory parallelism idle, when few rows are selected).
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        live = (offs_c < C) & (offs_c < tl.load(count_ptr))
        rows = tl.load(index_ptr + offs_c, mask=live, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # rows past the count are masked off: their loads move no bytes
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            x = tl.load(x_ptr + offs_d, mask=in_d, other=0.0).to(tl.float32)[None, :]
            w_mask = live[:, None] & in_d[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x, axis=1)
            if HAS_UP:
                u = tl.load(u_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
                acc_up += tl.sum(u.to(tl.float32) * x, axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)
        acc = _activate(acc, acc_up, ACT, HAS_UP)
        if HAS_KEEP:
            acc *= tl.load(keep_ptr + offs_c, mask=offs_c < C, other=0.0)
        acc = tl.where(live, acc, 0.0)
        tl.store(y_ptr + offs_c, acc.to(y_ptr.dtype.element_ty), mask=offs_c < C)

    @triton.autotune(configs=_configs(("BLOCK_C",), (32, 4, 3), (64, 4, 3), (32, 4, 4), (64, 8, 3), (16, 4, 4)),
                     key=["C", "D", "ROWS_PER_SPLIT"])
    @triton.jit
    def _columns_kernel(a_ptr, wt_ptr, index_ptr, count_ptr, out_ptr, B, C, stride_a, stride_wt, stride_split,
                        stride_out, D: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_D output columns x BLOCK_B batch rows over its ROWS_PER_SPLIT of the selected rows of
        # W^T; the partial sums (splits, B, D) float32 are added by the caller. Loop bounds are compile-time
        # constants (Triton's interpreter cannot loop to a run-time value with numpy >= 2.4).
        pid_d, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        in_d, in_b = offs_d < D, offs_b < B
        start = pid_s * ROWS_PER_SPLIT
        stop = tl.minimum(start + ROWS_PER_SPLIT, tl.minimum(tl.load(count_ptr), C))
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        for c in range(0, ROWS_PER_SPLIT, BLOCK_C):  # rows past the count are masked off: they move no bytes
            offs_c = start + c + tl.arange(0, BLOCK_C)
            live = offs_c < stop
            rows = tl.load(index_ptr + offs_c, mask=live, other=0).to(tl.int64)
            a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_c[None, :], mask=in_b[:, None] & live[None, :],
                        other=0.0)  # (BLOCK_B, BLOCK_C)
            w = tl.load(wt_ptr + rows[:, None] * stride_wt + offs_d[None, :], mask=live[:, None] & in_d[None, :],
                        other=0.0)  # (BLOCK_C, BLOCK_D)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        tl.store(out_ptr + pid_s * stride_split + offs_b[:, None] * stride_out + offs_d[None, :], acc,
                 mask=in_b[:, None] & in_d[None, :])


BLOCK_B = 16  # batch rows per program: the smallest tile of tl.dot; decode batches are small
COLUMNS_BLOCK_D = 128  # 256 bytes of a bf16 row per load


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def rows_times_triton(x, weight, sel, bias=None, up=None, act=None):
    b, d = x.shape
    c = sel.index.numel()
    for w in (weight, up):
        if w is not None and (w.stride(1) != 1 or w.shape[1] != d):
            raise ValueError(f"rows_times: weight must be row-major (N, {d}), got shape {tuple(w.shape)}")
    x = x.contiguous()
    y = torch.empty(b, c, dtype=x.dtype, device=x.device)
    keep = sel.keep
    if b == 1:
        _rows_gemv_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]),)](
            x, weight, up if up is not None else weight, bias if bias is not None else weight, sel.index, sel.count,
            keep if keep is not None else y, y, c, weight.stride(0), D=d, HAS_UP=up is not None, HAS_BIAS=bias is not None,
            HAS_KEEP=keep is not None, ACT=ACTIVATIONS[act])
        return y
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(b, BLOCK_B))  # noqa: E731
    _rows_kernel[grid](x, weight, up if up is not None else weight, bias if bias is not None else weight, sel.index,
                       sel.count, keep if keep is not None else y, y, b, c, x.stride(0), weight.stride(0),
                       keep.stride(0) if keep is not None else 0, y.stride(0), D=d, HAS_UP=up is not None,
                       HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, ACT=ACTIVATIONS[act],
                       IEEE=x.dtype == torch.float32, BLOCK_B=BLOCK_B)
    return y


def columns_times_triton(a, weight_t, sel):
    b, c = a.shape
    d = weight_t.shape[1]
    if weight_t.stride(1) != 1:
        raise ValueError("columns_times: the transposed weight must be contiguous (N, d)")
    a = a.contiguous()
    # Enough programs to fill the chip: output column blocks x splits of the selected rows x batch blocks.
    column_blocks, batch_blocks = triton.cdiv(d, COLUMNS_BLOCK_D), triton.cdiv(b, BLOCK_B)
    wanted = max(1, triton.cdiv(4 * _multiprocessors(a.device), column_blocks * batch_blocks))
    rows_per_split = max(64, triton.next_power_of_2(triton.cdiv(c, wanted)))  # powers of two: few compilations
    split = triton.cdiv(c, rows_per_split)
    partial = torch.empty(split, b, d, dtype=torch.float32, device=a.device)
    _columns_kernel[(column_blocks, split, batch_blocks)](
        a, weight_t, sel.index, sel.count, partial, b, c, a.stride(0), weight_t.stride(0), partial.stride(0),
        partial.stride(1), D=d, ROWS_PER_SPLIT=rows_per_split, IEEE=a.dtype == torch.float32, BLOCK_B=BLOCK_B,
        BLOCK_D=COLUMNS_BLOCK_D)
    return partial.sum(0).to(a.dtype)


# ----------------------------------------------------------------------------------------------- entry points
def rows_times(x: torch.Tensor, weight: torch.Tensor, sel: Selection, bias: Optional[torch.Tensor] = None,
               up: Optional[torch.Tensor] = None, act: Optional[str] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """(B, C): the selected rows of `weight` (N, d) times x (B, d), plus their bias, through `act`, times the same
    rows of `up` if given (SwiGLU), times `sel.keep`; padding entries are 0."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r}: the kernels implement {sorted(a for a in ACTIVATIONS if a)} or none")
    if pick_backend(x, backend) == "triton":
        return rows_times_triton(x, weight, sel, bias, up, act)
    return rows_times_torch(x, weight, sel, bias, up, act)


def columns_times(a: torch.Tensor, linear: torch.nn.Module, sel: Selection, backend: Optional[str] = None
                  ) -> torch.Tensor:
    """(B, d): `linear`'s weight (d, N) on the selected input units only, a (B, C) holding their values (0 on
    padding); no bias."""
    if pick_backend(a, backend) == "triton":
        return columns_times_triton(a, transposed(linear), sel)
    return columns_times_torch(a, linear.weight, sel)
