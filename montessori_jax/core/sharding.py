"""Sharding by name: a mesh of (data, fsdp, tensor), a rules table from logical axis names
to mesh axes, and placement of a model's state (or a batch) onto the mesh.

The model only names its axes (``embed``, ``heads``, ``mlp``, ...). This table decides where
they go, so one code path runs on 1 CPU, 8 fake CPU devices, a GPU node or a TPU pod.
"""

from __future__ import annotations

import logging
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from montessori_jax.core.compat import logical_axes_of
from montessori_jax.core.compat import make_mesh as _make_mesh
from montessori_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None: replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
}


def mesh_sizes(data: int, fsdp: int, tensor: int, n_devices: int) -> dict[str, int]:
    """{axis: size} of the (data, fsdp, tensor) mesh over ``n_devices``; one size may be -1 to
    take the devices the others leave over."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices do not divide by data*tensor={known}")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} != {n_devices} devices"
        )
    return dict(zip(MESH_AXES, sizes))


def mesh_from_config(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return _make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices)


def parse_mesh(value: str, key: str = "--mesh"):
    """``"DATA,FSDP,TENSOR"`` (one may be -1: the rest of the devices) as a ``MeshConfig``."""
    from montessori_jax.config import MeshConfig

    parts = value.split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{key}={value!r}: expected DATA,FSDP,TENSOR, three sizes >= 1 (one may be -1), e.g. -1,1,1")
    return MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def merge_rules(overrides: Mapping[str, str | None] | None) -> dict:
    rules = dict(DEFAULT_RULES)
    for name, axis in (overrides or {}).items():
        if axis is not None and axis not in MESH_AXES:
            raise ConfigError(f"mesh.rules.{name}: {axis!r} is not a mesh axis; valid: {', '.join(MESH_AXES)}")
        rules[name] = axis
    return rules


def mesh_and_rules(mesh_cfg) -> tuple[jax.sharding.Mesh, dict]:
    """The mesh and the rules table of a ``MeshConfig`` (``cfg.mesh``): what every stage runs on."""
    return (mesh_from_config(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), merge_rules(mesh_cfg.rules))


def spec_for(
    logical_axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    rules: Mapping = DEFAULT_RULES,
    what: str = "array",
) -> P:
    """PartitionSpec for an array with these logical axes.

    A mesh axis whose size does not divide the dimension is dropped (that dimension is then
    replicated over it), so e.g. SmolLM2's 9 heads still run on tensor=2. A mesh axis used
    twice in one spec is an error naming the array.
    """
    used: set[str] = set()
    entries = []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise ConfigError(f"{what}: logical axis {name!r} has no sharding rule; known: {', '.join(sorted(rules))}")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            if axis in used:
                raise ConfigError(f"{what}: mesh axis {axis!r} is used by two dimensions {logical_axes}")
            size = mesh.shape[axis]
            if size > 1 and dim % (size * int(np.prod([mesh.shape[a] for a in kept] or [1]))) == 0:
                kept.append(axis)
            elif size > 1:
                log.debug("%s: dim %s=%d not divisible by mesh axis %s=%d; replicated", what, name, dim, axis, size)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


class _MeshShape:
    """A stand-in for a mesh where only its axis sizes matter (planning without devices)."""

    def __init__(self, shape: Mapping[str, int]):
        self.shape = dict(shape)


def per_device_elements(logical_axes: tuple[str | None, ...] | None, shape: tuple[int, ...],
                        mesh_shape: Mapping[str, int], rules: Mapping = DEFAULT_RULES) -> int:
    """How many elements of an array one device holds on a mesh of these axis sizes, by the same
    rules as ``spec_for`` (an axis that does not divide its dimension replicates it)."""
    n = int(np.prod(shape, dtype=np.int64))
    if logical_axes is None:
        return n
    spec = spec_for(logical_axes, shape, _MeshShape(mesh_shape), rules)
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n //= mesh_shape[axis]
    return n


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Mapping = DEFAULT_RULES):
    """A pytree like ``state`` (an nnx.State) with a NamedSharding in place of each value."""

    def one(path, var):
        axes = logical_axes_of(var)
        shape = var.shape
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = P() if axes is None else spec_for(axes, shape, mesh, rules, what=name)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def dict_shardings(params: Mapping, axes: Mapping[str, tuple], mesh: jax.sharding.Mesh,
                   rules: Mapping = DEFAULT_RULES) -> dict:
    """{name: NamedSharding} for a plain dict of arrays whose logical axes are ``axes[name]``."""
    return {name: NamedSharding(mesh, spec_for(axes[name], tuple(v.shape), mesh, rules, what=name))
            for name, v in params.items()}


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh the arrays of ``tree`` are placed on (the first NamedSharding), or None."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def data_size(mesh: jax.sharding.Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["data"])


def round_rows(n: int, mesh: jax.sharding.Mesh | None) -> int:
    """``n`` rounded up to a multiple of the mesh's ``data`` size (a batch's row count)."""
    d = data_size(mesh)
    return -(-n // d) * d


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The whole value on every device of the mesh."""
    return NamedSharding(mesh, P())


def rows_sharding(mesh: jax.sharding.Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """An array whose dimension ``axis`` (its rows) is split over ``data``; scalars replicated."""
    spec = [None] * ndim
    if ndim:
        spec[axis] = "data"
    return NamedSharding(mesh, P(*spec))


def put_rows(tree, mesh: jax.sharding.Mesh | None, axis: int = 0):
    """Place host arrays with dimension ``axis`` split over the mesh's ``data`` axis (through
    ``put``, so across processes too); without a mesh, the tree as it is. The row count must be
    a multiple of the data size (``round_rows``)."""
    if mesh is None:
        return tree
    d = data_size(mesh)
    for x in jax.tree.leaves(tree):
        if np.ndim(x) and np.shape(x)[axis] % d:
            raise ValueError(f"{np.shape(x)[axis]} rows do not split over data={d}: round with round_rows")
    return put(tree, jax.tree.map(lambda x: rows_sharding(mesh, np.ndim(x), axis), tree))


def put(tree, shardings):
    """Place host arrays onto their shardings (a matching pytree of ``jax.sharding.Sharding``).

    Every process holds the same global value; across processes each one fills only the shards
    of its own devices, so this is the one placement path for 1 device, 8 devices or a cluster.
    """

    def one(x, s):
        if isinstance(x, jax.Array) or s.is_fully_addressable:
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """numpy copies of (global) arrays, the whole value in every process: a fully replicated
    array is read from this process's own copy, a sharded one gathered from every process."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
