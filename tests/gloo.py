"""Run a function in several CPU processes joined by a gloo process group, as torchrun does on GPUs with NCCL."""

import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, function, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(function(rank, world, *args), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(function, *args, world: int = 2) -> list:
    """function(rank, world, *args) in `world` processes (a module-level function, so that spawn finds it);
    the list of what each rank returned."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), out, function, args), nprocs=world, join=True)
        return [torch.load(f"{out}/{rank}.pt", weights_only=False) for rank in range(world)]
