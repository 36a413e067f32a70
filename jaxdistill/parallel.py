"""Device mesh, sharding rules and multi-host start: one code path from one CPU to a pod.

`jax.jit` with `in_shardings` / `out_shardings` over a `Mesh` is today's pjit. The mesh has the
named axes ('data', 'fsdp'); batches are split over both. Parameters, optimizer states, EMAs and
the frozen teacher follow one rule on shapes (`leaf_spec`): the largest axis divisible by the
`fsdp` size is split over `fsdp`, tensors smaller than `min_shard_size` are replicated. With
fsdp = 1 everything is replicated (pure data parallelism). The mesh uses Auto axis types (classic
GSPMD propagation) because `jax.make_mesh` defaults to Explicit axes in jax 0.10
(shared/research/jax_apis.md section a); the rule follows maxtext's / big_vision's FSDP presets.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp); one size may be -1 meaning all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [mesh_cfg.data, mesh_cfg.fsdp]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data / fsdp may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise ValueError(f"config.mesh (data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}) does not divide "
                         f"the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}) needs "
                         f"{math.prod(sizes)} devices, {len(devices)} are present")
    return Mesh(np.array(devices).reshape(sizes), AXES, axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh):
    if batch_size % mesh.size:
        raise ValueError(f"config.train.batch_size={batch_size} must be divisible by the "
                         f"{mesh.size} devices of the mesh")


def leaf_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> P:
    """PartitionSpec of one array under the FSDP rule (see module docstring)."""
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_shard_size: int = 2**14):
    """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp,
                                                                min_shard_size)), tree)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying their target shardings (for jit outputs and Orbax restores)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
    """Starts `jax.distributed` when running on several hosts; a no-op for one process.

    Cloud TPU pod slices detect their coordinator (`auto=True`); GPU clusters pass the coordinator
    address, the number of processes and this process's id (flags or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). Must run before any other JAX call.
    """
    import os

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if auto:
        jax.distributed.initialize()
    elif num_processes is not None and num_processes > 1:
        if coordinator_address is None or process_id is None:
            raise ValueError("multi-process runs need --coordinator_address, --num_processes and "
                             "--process_id (or the JAX_* environment variables)")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's slice) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
