"""With 8 simulated devices: a pmap step and a mesh step give the same update as one device."""

import faulthandler
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import parallel, train  # noqa: E402
from test_train import denoiser_setup  # noqa: E402


def main():
    # A CI run once hung here past the test's timeout; dump every thread's stack before that, to see where.
    faulthandler.dump_traceback_later(1080, exit=True)
    assert jax.device_count() == 8
    params, frozen, batch, loss_fn = denoiser_setup(batch_size=16)

    optimizer = train.adamw(1e-3, warmup_steps=1)
    one = train.make_train_step(loss_fn, optimizer, devices=jax.devices()[:1])
    state = train.init_state(params, optimizer)
    single, metrics = one(state, frozen, batch, jax.random.PRNGKey(0))

    mesh_step = train.make_train_step(loss_fn, optimizer)
    mesh = mesh_step.parallel
    assert mesh.num_devices == 8 and mesh.mode == "mesh"
    meshed, mesh_metrics = mesh_step(mesh.place_params(train.init_state(params, optimizer)), mesh.place_params(frozen),
                                     mesh.place_batch(batch), jax.random.PRNGKey(0))
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                            single.params, meshed.params)))
    print(f"mesh vs single max param diff {diff:.2e}, loss {float(metrics['loss']):.5f} vs {float(mesh_metrics['loss']):.5f}")
    assert diff < 1e-5

    # pmap's cross-device mean on two of the simulated devices: with all eight, XLA:CPU's in-process
    # collective rendezvous hung once in CI on a 2-core machine (eight replica threads); the mesh leg above
    # already covers eight devices.
    pmap = parallel.DataParallel(jax.devices()[:2], "pmap")
    pmap_step = train.make_train_step(loss_fn, optimizer, parallel=pmap)
    replicated = pmap.place_params(train.init_state(params, optimizer))
    pmapped, pmap_metrics = pmap_step(replicated, pmap.place_params(frozen), pmap.place_batch(batch),
                                      jax.random.PRNGKey(0))
    pmapped = pmap.unreplicate(pmapped)
    loss = float(np.mean(pmap_metrics["loss"]))
    print(f"pmap loss {loss:.5f}, step {int(pmapped.step)}")
    assert int(pmapped.step) == 1 and np.isfinite(loss)
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                            single.params, pmapped.params)))
    print(f"pmap vs single max param diff {diff:.2e}")
    assert diff < 1e-5
    print("TRAIN MULTIDEVICE OK")


if __name__ == "__main__":
    main()
