"""Checkpoints of replicated arrays on 8 CPU devices: written from one replica, restored bit for bit on any mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scalax.train.checkpoint import Checkpointer


def test_replicated_arrays_are_written_by_one_replica_and_restore_on_any_mesh(tmp_path):
    devices = np.array(jax.devices()[:8])
    replicated = NamedSharding(Mesh(devices, ("data",)), PartitionSpec())
    rng = np.random.default_rng(0)
    state = {"w": jax.device_put(jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), replicated),
             "b": jax.device_put(jnp.asarray(rng.standard_normal(48)), replicated)}
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    try:
        # one process on CPU devices: no replica-parallel slicing (a dispatched cut per replica and array)
        assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
        checkpointer.save(5, state, {"position": 1}, {"tokens": 10})
        checkpointer.manager.wait_until_finished()
        for sharding in (replicated, NamedSharding(Mesh(devices[:1], ("data",)), PartitionSpec()),
                         NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))):
            abstract = jax.tree.map(lambda x, s=sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state)
            step, restored, data, meta = checkpointer.restore_latest(abstract)
            assert (step, data, meta) == (5, {"position": 1}, {"tokens": 10})
            for name in state:
                np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))
                assert restored[name].sharding == sharding
    finally:
        checkpointer.close()
