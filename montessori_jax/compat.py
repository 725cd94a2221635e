"""Version shims for the fast-moving JAX / Flax NNX APIs. The only place that knows versions."""

from __future__ import annotations

import jax
from flax import nnx


def make_param(value, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names as metadata.

    Logical names are kept under our own key rather than NNX's ``out_sharding``: NNX would
    shard eagerly on creation and read the names as mesh axes, while ours go through the rules
    table in ``sharding.py`` first.
    """
    if len(logical_axes) != value.ndim:
        raise ValueError(f"logical axes {logical_axes} do not match shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def logical_axes_of(variable) -> tuple | None:
    """The logical axis names of a Variable (or None)."""
    try:
        return variable.get_metadata("logical_axes", None)
    except (AttributeError, TypeError):
        meta = getattr(variable, "metadata", None) or {}
        return meta.get("logical_axes")


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices=None) -> jax.sharding.Mesh:
    """A mesh whose axes are all ``Auto`` (the default became Explicit, under which ordinary
    sharded matmuls raise)."""
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=auto)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
