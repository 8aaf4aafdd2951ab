"""Point-to-point communication between pipeline stages.

torch.distributed (NCCL on GPU, gloo on CPU) by default; `cupy_nccl` uses CuPy's NCCL
bindings (imported only when chosen). World size 1 needs no communication at all.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

BACKENDS = ("nccl", "gloo", "cupy_nccl")


class SingleProcessComm:
    """World size 1: nothing to send; broadcasts and barriers are no-ops."""

    rank, world_size = 0, 1

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise RuntimeError("send() with world size 1")

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        raise RuntimeError("recv() with world size 1")

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchDistComm:
    def __init__(self, backend: str, dist_url: str, rank: int, world_size: int):
        dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
        self.rank, self.world_size = rank, world_size

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, src)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        dist.broadcast(tensor, src)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.destroy_process_group()


class CupyNcclComm(TorchDistComm):
    """NCCL through CuPy; torch.distributed (gloo) only exchanges the NCCL id and serves barriers."""

    def __init__(self, dist_url: str, rank: int, world_size: int, device: torch.device):
        try:
            from cupy.cuda import nccl
        except ImportError as e:
            raise ImportError("--dist-backend cupy_nccl needs CuPy for your CUDA (pip install cupy-cuda12x)") from e
        super().__init__("gloo", dist_url, rank, world_size)
        uid = [nccl.get_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(uid, src=0)
        self.nccl = nccl
        self.comm = nccl.NcclCommunicator(world_size, uid[0], rank)
        self.device = device

    def _args(self, tensor: torch.Tensor):
        if not tensor.is_cuda or not tensor.is_contiguous():
            raise ValueError("cupy_nccl sends contiguous CUDA tensors only")
        nccl_types = {torch.float16: self.nccl.NCCL_FLOAT16, torch.float32: self.nccl.NCCL_FLOAT32,
                      torch.bfloat16: self.nccl.NCCL_BFLOAT16, torch.int64: self.nccl.NCCL_INT64}
        return tensor.data_ptr(), tensor.numel(), nccl_types[tensor.dtype], torch.cuda.current_stream().cuda_stream

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        ptr, n, dtype, stream = self._args(tensor.contiguous())
        self.comm.send(ptr, n, dtype, dst, stream)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        ptr, n, dtype, stream = self._args(tensor)
        self.comm.recv(ptr, n, dtype, src, stream)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        ptr, n, dtype, stream = self._args(tensor)
        self.comm.bcast(ptr, n, dtype, src, stream)


def init_comm(backend: str, dist_url: str, rank: int, world_size: int, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {BACKENDS}, got {backend!r}")
    if world_size == 1:
        return SingleProcessComm()
    if backend in ("nccl", "cupy_nccl") and device.type != "cuda":
        raise ValueError(f"--dist-backend {backend} needs --use-cuda true; use gloo on the CPU")
    if backend == "cupy_nccl":
        return CupyNcclComm(dist_url, rank, world_size, device)
    return TorchDistComm(backend, dist_url, rank, world_size)
