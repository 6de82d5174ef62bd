"""Physics benchmark: EigenPSF operator vs DeepInverse's SpaceVaryingBlur, same filters and multipliers.

    python bench/bench_physics.py [--device cpu|cuda] [--repeats 10]
    python bench/bench_physics.py --sizes 256,1024 --Ks 10 --only_table

Prints the median forward+adjoint time (of --repeats calls, after a warm-up) at 256x256 RGB with 21x21 kernels for K=5, 10 and 25,
beside the bare FFT floor measured in the same run (2(K+1) batched FFTs of the padded shape) and the ratio against
the peer measured in the same run, the peer/ours agreement away from the borders, the simulator
time for a 64x64 random_iid grid, the grid's full-rank operator's peak memory at 61x61 PSFs, and
the per-pixel ground truth's time and peak memory at 21x21 and 61x61 PSFs (CPU).
Needs requirements-bench.txt for the peer.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import physics  # noqa: E402


def timeit(fn, repeats, device):
    fn()  # warm-up (caches, FFT plans)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)  # the median of N: robust to a few calls disturbed by other load


def peak_rss_grid_operator(k=61, size=256):
    """Peak RSS increase (MB) of the exact operator's forward+adjoint, in a fresh process."""
    code = (f"import resource, torch, physics\n"
            f"sim = physics.SVBlurSimulator({size}, {size}, {k}, 4)\n"
            f"g = sim.simulate_sv_kernel_grid('defocus', seed=0, max_radius={k // 2})\n"
            f"op = physics.GridSVBlurOperator(g, {size}, {size})\n"
            f"x = torch.rand(1, 3, {size}, {size})\n"
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"import time; t0 = time.time(); y = op(x); z = op.adjoint(y); dt = time.time() - t0\n"
            f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, dt)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    mb, dt = out.stdout.split()
    return float(mb), float(dt)


def peak_rss_ground_truth(k, size=256, mode="motion"):
    """(peak RSS increase MB, seconds) of one per-pixel ground-truth blur of a size² RGB scene
    (gather and scatter each), in a fresh process so that the peak is this operator's alone."""
    code = (f"import resource, time, torch, physics, device\n"
            f"device.tune_cpu_allocator()\n"
            f"sim = physics.SVBlurSimulator({size}, {size}, {k}, 8)\n"
            f"f = sim.simulate_field('{mode}', seed=0, max_length={k - 1}.0)\n"
            f"x = torch.rand(1, 3, {size + k - 1}, {size + k - 1})\n"
            f"ops = [physics.GroundTruthBlur(f, form) for form in ('gather', 'scatter')]\n"
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"dts = []\n"
            f"for op in ops:\n"
            f"    t0 = time.perf_counter(); y = op(x); dts.append(time.perf_counter() - t0)\n"
            f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, *dts)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    mb, t_gather, t_scatter = out.stdout.split()
    return float(mb), float(t_gather), float(t_scatter)


def operator_table(H, k, Ks, device, repeats, SpaceVaryingBlur):
    """The operator pair's time beside the FFT floor (and the peer) at H×H RGB, one row per form and K."""
    W = H
    x = torch.rand(1, 3, H, W, device=device, generator=torch.Generator(device).manual_seed(0))
    sim = physics.SVBlurSimulator(H, W, k, 8, device=device)
    grid = sim.simulate_sv_kernel_grid("correlated", seed=0)
    print(f"\n{H}x{W} RGB, {k}x{k} PSFs. FFT floor: 2(K+1) real FFTs of the padded {H + k - 1}x{W + k - 1} image per "
          f"forward+adjoint, batched (K+1 forward and K+1 inverse over the channels), the least any FFT implementation "
          f"of the pair does")
    print(f"{'form':8s} {'K':>3s} {'ours fwd+adj':>13s} {'FFT floor':>10s} {'/floor':>7s} {'peer fwd+adj':>13s} "
          f"{'speed-up':>9s} {'max rel diff (interior)':>24s}")
    for form in ("gather", "scatter"):
        for K in Ks:
            dec = physics.compute_eigen_decomposition(grid, K, H, W)
            op = physics.SVBlurOperator(dec, form, "reflect").to(device)
            ours = timeit(lambda op=op: op.adjoint(op(x)), repeats, device)
            z = torch.rand(1, 3 * (K + 1), H + k - 1, W + k - 1, device=device)
            floor = timeit(lambda z=z: torch.fft.irfft2(torch.fft.rfft2(z), s=z.shape[-2:]), repeats, device)
            line = f"{form:8s} {K:3d} {ours * 1e3:11.1f}ms {floor * 1e3:8.1f}ms {ours / floor:6.2f}x"
            if SpaceVaryingBlur is not None:
                peer = SpaceVaryingBlur(filters=dec.basis_kernels[None, None].to(device),
                                        multipliers=dec.coefficient_maps[None, None].to(device),
                                        padding="reflect", use_fft=True, mask_first=form == "scatter", device=device)
                t_peer = timeit(lambda peer=peer: peer.A_adjoint(peer.A(x)), repeats, device)
                a, b = op(x), peer.A(x)
                m = k  # compare away from the borders, where padding conventions differ
                diff = float((a - b)[..., m:-m, m:-m].abs().max() / b[..., m:-m, m:-m].abs().max())
                line += f" {t_peer * 1e3:11.1f}ms {t_peer / ours:8.2f}x {diff:24.2e}"
            print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--default_allocator", action="store_true", help="skip device.tune_cpu_allocator()")
    ap.add_argument("--sizes", default="256", help="image sides of the operator table (RGB, square)")
    ap.add_argument("--Ks", default="5,10,25", help="EigenPSF counts of the operator table")
    ap.add_argument("--only_table", action="store_true", help="the operator table only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.default_allocator:
        import device as device_setup
        print(f"glibc: large blocks kept on the heap, as main.py does on CPU: {device_setup.tune_cpu_allocator()}")
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _peer import import_space_varying_blur
        SpaceVaryingBlur, note = import_space_varying_blur()
    except ImportError as e:
        SpaceVaryingBlur, note = None, f"peer unavailable ({e}); pip install -r requirements-bench.txt"
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"peer: DeepInverse SpaceVaryingBlur(use_fft=True); {note}")
    k = 21
    for H in [int(v) for v in args.sizes.split(",")]:
        operator_table(H, k, [int(v) for v in args.Ks.split(",")], device, args.repeats, SpaceVaryingBlur)
    if args.only_table:
        return
    H = W = 256
    sim64 = physics.SVBlurSimulator(H, W, k, 64, device=device)
    t_sim = timeit(lambda: sim64.simulate_sv_kernel_grid("random_iid", seed=0), 3, device)
    print(f"\nsimulator: 64x64 random_iid grid of {k}x{k} PSFs in {t_sim * 1e3:.1f} ms")
    if device.type == "cpu":
        mb, dt = peak_rss_grid_operator()
        print(f"grid full-rank operator, 256x256 RGB, 61x61 PSFs: forward+adjoint {dt:.2f} s, peak RSS increase {mb:.0f} MB")
        for kk in (21, 61):
            mb, tg, ts = peak_rss_ground_truth(kk)
            print(f"ground truth (per-pixel motion field), 256x256 RGB, {kk}x{kk} PSFs: gather {tg:.2f} s, "
                  f"scatter {ts:.2f} s, peak RSS increase {mb:.0f} MB")


if __name__ == "__main__":
    main()
