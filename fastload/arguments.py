"""A FastLoader's arguments, checked in one place: each wrong value is one ValueError that names
it and what is allowed, before anything is opened."""
from __future__ import annotations

import os

import torch

from .pipelines import registry
from .pipelines.orders import ORDER_CHOICES


def _is_int(v, lo: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def check_loader_arguments(*, batch_size, num_workers, seed, order, repeated_augmentation, batch_transform, backend,
                           epochs, check_samples, drop_last) -> None:
    if not _is_int(batch_size, 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid: allowed an int >= 1")
    if num_workers is not None and not _is_int(num_workers, 0):
        raise ValueError(f"num_workers={num_workers!r} is invalid: allowed an int >= 0 (0: in this process where "
                         "a backend can), or None for one per core")
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} is invalid: allowed an int")
    if order not in ORDER_CHOICES:
        raise ValueError(f"order={order!r} is invalid: allowed 'auto' (random, or shard-aware where a node's share "
                         f"of a remote dataset outgrows its cache), {', '.join(repr(o) for o in ORDER_CHOICES[1:])}")
    if not _is_int(repeated_augmentation, 1):
        raise ValueError(f"repeated_augmentation={repeated_augmentation!r} is invalid: allowed an int >= 1 "
                         "(1: off; timm and DeiT use 3)")
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError(f"batch_transform={batch_transform!r} is invalid: allowed a callable "
                        "f(images, labels) -> (images, labels), or None")
    if backend != "auto":
        registry.entry(backend)  # an unknown name fails before the dataset is opened
    if epochs is not None and not _is_int(epochs, 1):
        raise ValueError(f"epochs={epochs!r} is invalid: allowed an int >= 1 (the job's epoch count), or None")
    if not isinstance(check_samples, bool):
        raise ValueError(f"check_samples={check_samples!r} is invalid: allowed True or False")
    if drop_last is not None and not isinstance(drop_last, bool):
        raise ValueError(f"drop_last={drop_last!r} is invalid: allowed True, False, or None (the train split's "
                         "last partial batch only)")


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "allowed 'cpu', 'cuda', 'cuda:N' or 'auto'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # torch's own message lists every device type it knows
        raise ValueError(f"device={device!r} is invalid: {allowed}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for but CUDA is not available "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is invalid: {allowed}")
    return dev


def distributed_rank_world(distributed) -> tuple[int, int]:
    """(rank, world size) from an initialized process group, else torchrun's environment."""
    if distributed is False:
        return 0, 1
    if distributed not in (True, "auto"):
        raise ValueError(f"distributed={distributed!r} is invalid: allowed 'auto', True or False")
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        raw = os.environ["RANK"], os.environ["WORLD_SIZE"]
        try:
            rank, world = int(raw[0]), int(raw[1])
        except ValueError:
            rank = world = -1
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"RANK={raw[0]!r}, WORLD_SIZE={raw[1]!r} is invalid: allowed WORLD_SIZE >= 1 and "
                             "0 <= RANK < WORLD_SIZE (as torchrun sets them); unset both for one process")
        return rank, world
    if distributed is True:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized and "
                           "RANK/WORLD_SIZE are not set (run under torchrun)")
    return 0, 1


def call_batch_transform(fn, images, labels):
    """The user's ``batch_transform``, its result checked."""
    out = fn(images, labels)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"batch_transform {fn!r} returned {type(out).__name__}: it must return (images, labels)")
    return out
