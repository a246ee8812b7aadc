"""With 8 simulated devices: the Executor gives one device's results, bit for bit, in both modes and for
batches that do not divide by the device count; the placements split and replicate as they should."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from sdjax import parallel  # noqa: E402
from test_parallel import PARAMS, SCHEDULE, Static, make_batch, toy_generate  # noqa: E402


def main():
    assert jax.device_count() == 8
    one, eight = parallel.Executor(jax.devices()[:1]), parallel.Executor()
    for count in (8, 5, 11):
        batch = make_batch(count)
        # one example per call on one device: the per-device shapes of 8 devices x 1 example
        singles = np.concatenate([
            one.run(toy_generate, PARAMS, jax.tree.map(lambda x, i=i: x[i : i + 1], batch), SCHEDULE,
                    static=Static(5, 1.0))["x"]
            for i in range(count)
        ])
        for mode in ("mesh", "pmap"):
            out = eight.run(toy_generate, PARAMS, batch, SCHEDULE, static=Static(5, 1.0), mode=mode)["x"]
            assert out.shape == (count, 8)
            if count % 8 == 0:
                np.testing.assert_array_equal(out, singles)
            np.testing.assert_allclose(out, singles, rtol=0, atol=1e-5)
            print(f"batch {count} {mode}: max |diff| vs one device {np.abs(out - singles).max():.1e}")

    mesh, pmap = parallel.DataParallel(), parallel.DataParallel(mode="pmap")
    batch = parallel.pad_batch(make_batch(5), 8)[0]
    placed = mesh.place_batch(batch)
    assert placed.x.sharding.spec == PartitionSpec("data") and len(placed.x.addressable_shards) == 8
    assert placed.x.addressable_shards[0].data.shape == (1, 8)
    assert mesh.place_params(PARAMS)["w"].sharding.is_fully_replicated
    assert pmap.place_batch(batch).condition.pixels.shape == (8, 1, 4, 4, 3)
    stacked = pmap.place_params(PARAMS)["w"]
    assert stacked.shape == (8, 8, 8) and len(stacked.addressable_shards) == 8
    np.testing.assert_array_equal(pmap.unreplicate(stacked), PARAMS["w"])
    np.testing.assert_array_equal(pmap.unshard_batch(pmap.place_batch(batch)).x, batch.x)
    for data_parallel in (mesh, pmap):
        try:
            data_parallel.place_batch(make_batch(5))
            raise AssertionError("an uneven batch was placed")
        except ValueError as error:
            assert str(error) == "batch size 5 is not divisible by the 8 devices", error
    print("PARALLEL MULTIDEVICE OK")


if __name__ == "__main__":
    main()
