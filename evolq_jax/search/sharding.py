"""The population axis across devices: a 1-D mesh named "pop" and shard_map.

Every device scores its slice of the population (in chunks, as on one device)
against a replicated copy of the params, the cached prefix tokens and the FP
logits; the fitness vector comes back replicated, so every process of a
multi-host run sees all of it and runs the same strategy step.

Multi-host (TPU pods, GPU clusters, or several processes on one machine):
call `initialize_distributed()` (JAX's distributed runtime) in every process
before anything else touches JAX; `jax.devices()` then lists the devices of
all processes and the mesh spans them. Each process must pass the same
calibration images and seed (the search is deterministic given both).
tests/test_multiprocess.py runs two CPU processes on localhost, with two
devices each, and checks that their result equals one process's on one device.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "pop"
ENV = ("EVOLQ_COORDINATOR", "EVOLQ_NUM_PROCESSES", "EVOLQ_PROCESS_ID")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> int:
  """jax.distributed.initialize, before any other JAX call. -> this process's index.

  Arguments left None come from EVOLQ_COORDINATOR (host:port of process 0),
  EVOLQ_NUM_PROCESSES and EVOLQ_PROCESS_ID, else from JAX's cluster detection
  (SLURM, Open MPI, TPU pods: nothing to set there). On CPU the processes
  talk through gloo collectives."""
  env = [os.environ.get(k) for k in ENV]
  coordinator = coordinator or env[0]
  num_processes = num_processes if num_processes is not None else (
      int(env[1]) if env[1] else None)
  process_id = process_id if process_id is not None else (int(env[2]) if env[2] else None)
  if jax.config.jax_platforms in (None, "", "cpu") and (num_processes or 0) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)
  return jax.process_index()


def population_mesh(devices: int = 0) -> Mesh | None:
  """A 1-D mesh over the first `devices` of `jax.devices()` (0 = all of them).

  Returns None when that is one device: the caller then runs unsharded.
  """
  available = jax.devices()
  if devices < 0 or devices > len(available):
    raise ValueError(f"search.devices={devices} but {len(available)} device(s) are visible "
                     f"({available[0].platform}): use 0 (all), 1 (no sharding) or a count "
                     "up to the number of devices.")
  chosen = available[:devices or len(available)]
  if len(chosen) == 1:
    return None
  return Mesh(np.asarray(chosen), (AXIS,))


def replicate(tree, mesh: Mesh | None):
  """Put every leaf of `tree` on every device of `mesh` (once, not per call)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P())
  # Multi-host: device_put from host memory, the same values in every process.
  local = (lambda a: np.asarray(a)) if jax.process_count() > 1 else (lambda a: a)
  return jax.tree.map(lambda a: jax.device_put(local(a), sharding), tree)


def sharded_over_population(fn, mesh: Mesh | None):
  """fn(population (P, D), *replicated) -> (P,) run with P split over `mesh`.

  P is padded up to a multiple of the mesh size with copies of the last
  candidate (their losses are dropped), so any population size works.
  Call it inside jit.
  """
  if mesh is None:
    return fn
  n = mesh.size

  def run(population, *rest):
    p = population.shape[0]
    pad = -p % n
    if pad:
      population = jnp.concatenate([population, jnp.repeat(population[-1:], pad, 0)])
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS),) + (P(),) * len(rest),
                               out_specs=P(AXIS))
    out = per_device(population, *rest)[:p]
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))

  return run
