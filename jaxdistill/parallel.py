"""Device mesh and shardings: one code path from one CPU to a pod.

`jax.jit` with `in_shardings` / `out_shardings` over a `Mesh` is today's pjit. The mesh has the
named axes ('data', 'fsdp'); batches are split over both. The mesh is built with Auto axis types
(classic GSPMD propagation) because `jax.make_mesh` defaults to Explicit axes in jax 0.10
(shared/research/jax_apis.md section a).
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


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's slice) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
