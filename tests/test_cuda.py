"""The CUDA paths, on CUDA. Skipped where no GPU is present (CI); bench/gpu_session.sh runs them."""


import pytest
import torch

import device as device_setup
import checkpoint
import dps
import physics
import problem
from helpers import full_and_resumed, tiny_scheduler, tiny_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def small_system(device, H=32, W=32):
    pc = dict(blur_mode="motion", kernel_size=7, grid_size=3, n_eigen_psfs=4, form="gather", boundary="reflect",
              motion=dict(max_length=6))
    return physics.create_sv_blur_system(H, W, pc, device=device, seed=0)


def test_operators_on_cuda_equal_cpu_and_stay_adjoint():
    eig_cpu, grid_cpu, _ = small_system("cpu")
    eig_gpu, grid_gpu, _ = small_system(CUDA)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for cpu, gpu in ((eig_cpu, eig_gpu), (grid_cpu, grid_gpu)):
        torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu.adjoint(y.to(CUDA)).cpu(), cpu.adjoint(y), rtol=1e-5, atol=1e-5)
        lhs = (gpu(x.to(CUDA)) * y.to(CUDA)).sum()
        rhs = (x.to(CUDA) * gpu.adjoint(y.to(CUDA))).sum()
        assert abs(float(lhs - rhs)) < 1e-4 * abs(float(lhs))


@pytest.mark.parametrize("method", ["dps", "diffpir"])
def test_resume_on_cuda_is_bit_identical(method):
    """A CUDA generator's state, saved after a step and restored, continues the same run."""
    unet, sched = tiny_unet().to(CUDA), tiny_scheduler()
    eig, _, _ = small_system(CUDA)
    pipe = dps.EigenPSFDPSPipeline(unet, sched, eig)
    y = torch.rand(1, 3, 32, 32, device=CUDA)
    full, resumed = full_and_resumed(pipe, y, CUDA, num_inference_steps=12, method=method, sigma_y=0.01)
    assert torch.equal(full, resumed)


def test_checkpoint_round_trip_with_a_cuda_generator(tmp_path):
    eig, grid, decomp = small_system(CUDA)
    gen = torch.Generator(CUDA).manual_seed(7)
    torch.randn(3, generator=gen, device=CUDA)
    p = problem.Problem("x", torch.rand(1, 3, 32, 32, device=CUDA), None, grid.kernel_grid, (torch.arange(3.), torch.arange(3.)),
                     eig, grid, decomp, {})
    state = {"steps_done": 4, "runtime": 1.0, "steps": [0], "x0_hat": [torch.rand(1, 3, 32, 32)], "residual": [torch.rand(1)]}
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, p, torch.randn(1, 3, 32, 32, device=CUDA), 4, gen, state)
    ckpt = checkpoint.load_checkpoint(path)
    gen2 = torch.Generator(CUDA)
    gen2.set_state(ckpt["generator_state"])
    assert torch.equal(torch.randn(5, generator=gen, device=CUDA), torch.randn(5, generator=gen2, device=CUDA))


def test_bf16_autocast_on_cuda_keeps_x0_close_and_the_output_float32():
    unet, sched = tiny_unet().to(CUDA), tiny_scheduler()
    x_t = torch.randn(2, 3, 32, 32, device=CUDA)
    t = torch.tensor(400, device=CUDA)
    with torch.no_grad():
        eps32 = unet(x_t, t).sample
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eps16 = unet(x_t, t).sample.float()
    a = sched.alphas_cumprod[400]
    x0_32, x0_16 = dps.tweedie_estimate(x_t, eps32, a), dps.tweedie_estimate(x_t, eps16, a)
    assert float((x0_16 - x0_32).norm() / x0_32.norm()) < 0.02
    eig, _, _ = small_system(CUDA)
    for method in dps.SAMPLERS:
        out, _ = dps.EigenPSFDPSPipeline(unet, sched, eig)(torch.rand(1, 3, 32, 32, device=CUDA), num_inference_steps=5,
                                                           method=method, dtype=torch.bfloat16,
                                                           generator=torch.Generator(CUDA).manual_seed(0))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_unet_matches_eager(mode):
    """device.setup_accelerators' torch.compile path, against the eager model on the same steps."""
    cfg = {"run": {"compile": mode, "channels_last": False}}
    eager = tiny_unet().to(CUDA)
    compiled = device_setup.setup_accelerators(cfg, CUDA, tiny_unet().to(CUDA))
    eig, _, _ = small_system(CUDA)
    y = torch.rand(1, 3, 32, 32, device=CUDA)
    runs = [dps.EigenPSFDPSPipeline(u, tiny_scheduler(), eig)(y, num_inference_steps=4,
                                                              generator=torch.Generator(CUDA).manual_seed(0))[0]
            for u in (eager, compiled)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["dps", "diffpir"])
def test_batched_images_with_own_generators_equal_one_at_a_time_on_cuda(method):
    """The folder-run batch: a stacked operator and per-image CUDA generators give each image
    its batch-of-one result (cuFFT may batch differently: to 1e-4)."""
    unet, sched = tiny_unet().to(CUDA), tiny_scheduler()
    pc = dict(blur_mode="motion", kernel_size=7, grid_size=3, n_eigen_psfs=4, form="gather", boundary="reflect",
              motion=dict(max_length=6))
    ops = [physics.create_sv_blur_system(32, 32, pc, device=CUDA, seed=s)[0] for s in range(3)]
    y = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(CUDA)
    gens = lambda idx: [torch.Generator(CUDA).manual_seed(10 + b) for b in idx for _ in range(2)]  # noqa: E731
    kw = dict(num_inference_steps=8, method=method, sigma_y=0.05, num_samples=2)
    both = dps.EigenPSFDPSPipeline(unet, sched, physics.stack_operators(ops))(y, generator=gens(range(3)), **kw)[0]
    for b, op in enumerate(ops):
        one = dps.EigenPSFDPSPipeline(unet, sched, op)(y[b:b + 1], generator=gens([b]), **kw)[0]
        torch.testing.assert_close(both["samples"][b:b + 1], one["samples"], rtol=1e-4, atol=1e-4)
