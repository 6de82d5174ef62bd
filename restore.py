"""One restoration: a sampler call from its inputs through sampling to its outputs.

restore() runs the configured sampler on one problem.Problem and writes the documented run
folder, in three parts: restore_inputs (the operator the sampler sees, the folder's config,
problem files and pictures), sample (the sampler with a progress bar, stop requests turned into
checkpoints, out-of-memory turned into a hint) and write_outputs (the restoration, posterior
statistics, the classical baselines beside it, metrics and figures). batch.py calls the same
three parts for a batch of images.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

import baselines
import checkpoint
import config
import device as device_setup
import dps
import physics
import plots
import priors
import problem
import tiling
import timing
import utils

log = logging.getLogger("eigenpsf_dps")


@dataclass
class RunView:
    """What the three parts of restore share: the reconstruction operator, the window of x that
    y measures, the output folders, and the metrics and progress so far."""
    op: object
    x_size: tuple
    crop: object                   # x-space (…, C_x, Hx, Wx) -> y's channels and window
    images_dir: str
    inter_dir: str
    metrics: dict
    state: dict                    # steps_done, runtime, and the intermediates kept for progress.png
    timing: dict = field(default_factory=dict)  # when this session's first log_every steps ended


def restore(p: problem.Problem, run_dir, cfg, device, dtype, gen, pipe, multiple, extra_config, resume=None) -> tuple:
    """The configured sampler on one problem, writing the documented run folder, in three parts:
    inputs (restore_inputs), sampling (sample) and outputs (write_outputs).
    Returns (exit_code, metrics). resume: a checkpoint dict (see save_checkpoint) to continue from.
    """
    with timing.RUN("outputs"):   # the folder's config, problem files and pictures of the input
        view = restore_inputs(p, run_dir, cfg, device, pipe, multiple, extra_config, resume and resume["progress"])
    pipe.operator = view.op
    ckpt = lambda x_t, nxt: checkpoint.save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), p, x_t, nxt, gen,  # noqa: E731
                                            view.state)
    start = (resume["x_t"], resume["next_index"]) if resume else None
    out, exit_code, error, partial = sample([p], [view], cfg, device, dtype, gen, pipe, start, ckpt, run_dir)
    with timing.RUN("outputs"):
        write_outputs(p, view, run_dir, cfg, device, out, None if partial is None else partial[:1])
    if view.metrics["status"] == "complete" and resume:
        os.remove(os.path.join(run_dir, "checkpoint.pt"))
    finish(view, run_dir, error)
    return exit_code, view.metrics


def finish(view: RunView, run_dir, error) -> None:
    """metrics.json and metrics.txt, last, so that their presence means the folder is whole."""
    if error:
        view.metrics["error"] = error
    view.metrics["timings"] = timing.RUN.report()
    utils.write_json(os.path.join(run_dir, "metrics.json"), view.metrics)
    utils.write_metrics_txt(os.path.join(run_dir, "metrics.txt"), view.metrics)


def plot_decomposition(images_dir, d) -> None:
    """eigenpsfs.png, or for a colour grid one figure per channel's decomposition (eigenpsfs_R.png ..)."""
    if not d.colour:
        plots.plot_eigenpsfs(os.path.join(images_dir, "eigenpsfs.png"), d.basis_kernels, d.coefficient_maps,
                             d.explained_variance_ratio)
        return
    C = d.basis_kernels.shape[0]
    for c, name in enumerate("RGB" if C == 3 else [f"c{c}" for c in range(C)]):
        plots.plot_eigenpsfs(os.path.join(images_dir, f"eigenpsfs_{name}.png"), d.basis_kernels[c],
                             d.coefficient_maps[c], d.explained_variance_ratio[c])


def restore_inputs(p: problem.Problem, run_dir, cfg, device, pipe, multiple, extra_config, progress) -> RunView:
    """1. Inputs: the operator the sampler sees, the run folder's config, problem files and
    pictures of the input, and the metrics known before sampling. progress: a checkpoint's
    progress to continue from (the folder exists then), or None."""
    sc, rc = cfg["sampler"], cfg["run"]
    op, x_size, (top, left) = problem.reconstruction_operator(p, cfg, multiple, device)
    # A gray y with an RGB prior: sample RGB, compare y with the luminance of A(x), write luminance.
    gray_from_rgb = p.y.shape[1] == 1 and pipe.unet.config.in_channels == 3
    if gray_from_rgb:
        op = physics.LuminanceOperator(op)
    to_y = physics.luminance if gray_from_rgb else (lambda z: z)
    H, W = p.y.shape[-2:]
    crop = lambda z: to_y(z)[..., top:top + H, left:left + W]  # noqa: E731
    images_dir, inter_dir = os.path.join(run_dir, "images"), os.path.join(run_dir, "intermediates")
    os.makedirs(images_dir, exist_ok=progress is not None)
    if rc["save_intermediates"] and sc["intermediate_freq"]:
        os.makedirs(inter_dir, exist_ok=progress is not None)
    config.save_yaml(os.path.join(run_dir, "config.yaml"), {**cfg, "resolved": extra_config})
    utils.save_psf_grid(os.path.join(run_dir, "psf_grid.npz"), p.grid, p.coords)
    # The exact problem, for others to reuse: y as the sampler sees it (unclipped) and the clean image.
    np.save(os.path.join(run_dir, "measurement.npy"), p.y[0].permute(1, 2, 0).cpu().numpy().astype(np.float32))
    if p.clean is not None:
        np.save(os.path.join(run_dir, "clean.npy"), p.clean.astype(np.float32))
        utils.save_image(os.path.join(images_dir, "clean.png"), p.clean)
    utils.save_image(os.path.join(images_dir, "blurred.png"), p.y)
    if rc["save_figures"]:
        plots.plot_psf_grid(os.path.join(images_dir, "psf_grid.png"), p.grid)
        plot_decomposition(images_dir, p.decomp)
    method = sc["method"]
    metrics = {"status": "running", "image": p.name, "model_id": cfg["model"]["model_id"], "device": str(device),
               **p.info, "n_eigen_psfs": p.decomp.n_components, "sampler": method,
               "num_inference_steps": sc["num_inference_steps"], **{f"{method}.{k}": v for k, v in sc[method].items()},
               "sigma_y": problem.sigma_y(p, cfg), "num_samples": sc["num_samples"], "seed": rc["seed"]}
    if p.clean is not None:
        y_np = utils.to_numpy(p.y)
        metrics.update(psnr_blurred=utils.psnr(p.clean, y_np), ssim_blurred=utils.ssim(p.clean, y_np),
                       ssim_definition=utils.SSIM_DEFINITION)
    else:
        metrics["note"] = "real measurement: no clean image, so PSNR/SSIM are omitted"
    state = progress or {"steps_done": 0, "runtime": 0.0, "steps": [], "x0_hat": [], "residual": []}
    state.setdefault("curve_steps", []), state.setdefault("curve", [])  # older checkpoints have no curve
    return RunView(op, x_size, crop, images_dir, inter_dir, metrics, state)


def progress_callback(views, cfg, device, bar, name, y_norms):
    """The sampler's callback for a batch of images (one view each, num_samples rows each):
    progress bar, each image's intermediates and residual curve, the CPU time estimate, and stop
    requests (raised as Preempted after a completed step, so the checkpoint is consistent).
    y_norms: ‖y‖ of each row (B·S,), so that the residual shown is ‖y − A(x̂₀)‖/‖y‖ everywhere."""
    sc, S = cfg["sampler"], cfg["sampler"]["num_samples"]
    n, first_step = sc["num_inference_steps"], views[0].state["steps_done"]
    marks = {}   # step -> time, at the first two log_every marks of this session

    def callback(i, t, x_t, x0_hat, res):
        bar.update(1)
        record_intermediates(views, cfg, i, x0_hat, res)
        if (i + 1) % sc["log_every"] == 0 or i + 1 == n:
            rel = (res / y_norms).cpu()                       # the only host sync, every log_every steps
            bar.set_postfix_str(f"‖y−A(x̂₀)‖/‖y‖ {float(rel.mean()):.4g}")
            for b, view in enumerate(views):
                view.state["curve_steps"].append(i)
                view.state["curve"].append(float(rel[b * S]))
                if i + 1 - first_step == sc["log_every"]:  # warm-up (compile, CUDA graphs, allocator) is behind us
                    view.timing.update(t=time.time(), step=i + 1)
            cpu_estimate(marks, i + 1 - first_step, n - i - 1, sc["log_every"], device, bar, name)
        if checkpoint.STOP["signal"] is not None:  # checked after a finished step, its curve point kept: the state is consistent
            raise checkpoint.Preempted(i, x_t)
    return callback


def record_intermediates(views, cfg, i, x0_hat, res) -> None:
    """Every intermediate_freq-th step and the last: each image's x̂₀ (and its PNG) and residual."""
    sc, S = cfg["sampler"], cfg["sampler"]["num_samples"]
    freq, n = sc["intermediate_freq"], sc["num_inference_steps"]
    for b, view in enumerate(views):   # x0_hat (B·S, C, H, W), res (B·S,): image b holds rows b·S … b·S+S−1
        view.state["steps_done"] = i + 1
        if freq and (i % freq == 0 or i + 1 == n):
            x0_img = view.crop((x0_hat[b * S:b * S + 1] + 1) / 2).clamp(0, 1)   # (1, C_y, H, W) in [0, 1]
            view.state["steps"].append(i)
            view.state["x0_hat"].append(x0_img.cpu())
            view.state["residual"].append(res[b * S:(b + 1) * S].cpu())
            if cfg["run"]["save_intermediates"]:  # every freq-th step and the final one
                utils.save_image(os.path.join(view.inter_dir, f"step_{i:04d}.png"), x0_img)


def cpu_estimate(marks, done_here, left, every, device, bar, name) -> None:
    """On the CPU, once: the time left, from the steady rate between the first two log_every marks
    of this session (the first steps pay for warm-up: allocator, caches), when steps are left."""
    if device.type != "cpu" or done_here not in (every, 2 * every):
        return
    marks[done_here] = time.time()
    if done_here == 2 * every and left > 0:
        rate = (marks[2 * every] - marks[every]) / every
        bar.write(f"INFO CPU run: about {utils.format_duration(rate * left)} left for {left} more steps ({name})",
                  file=sys.stderr)


def y_norms(ps, sc):
    """‖y‖ of each sampler row (B·S,): each measurement's, once per sample."""
    norms = torch.stack([torch.linalg.vector_norm(p.y) for p in ps]).clamp_min(1e-12)
    return norms.repeat_interleave(sc["num_samples"])


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def out_of_memory_hint(ps, cfg, device, tiles=None) -> str:
    """The one-line error for a batch that does not fit, with the settings that would shrink it."""
    B, S = len(ps), cfg["sampler"]["num_samples"]
    H, W = ps[0].y.shape[-2:]
    if B > 1:
        fix = f"try --batch_size {max(1, B // 2)}"
    elif tiles is not None and tiles.batch > 1:
        fix = f"try --set sampler.tile_batch={tiles.batch // 2} (tiles per UNet call)"
    elif tiles is not None:
        fix = f"try a smaller --tile (now {tiles.tile}) or --set run.gradient_checkpointing=true"
    elif max(H, W) > 256:
        fix = "try --tile 256 (the UNet on overlapping tiles, in memory that does not grow with the image)"
    else:
        fix = "try a smaller --num_samples or --img_size, or --set run.gradient_checkpointing=true"
    return (f"out of {device.type.upper()} memory sampling {B} image(s) x {S} sample(s) of {H}x{W} "
            f"({B * S} in one call); {fix}")


def sample(ps, views, cfg, device, dtype, generator, pipe, start, save_state, run_dir) -> tuple:
    """2. The sampler over a batch (one problem and view per image; pipe.operator set for them all),
    with a progress bar, under signal handlers that turn SIGTERM/SIGUSR1 and a first Ctrl-C into a
    checkpoint. generator: a torch.Generator, or one per sample (B·S). start: (x_t, next index) to
    continue from, or None. save_state(x_t, next_index) saves the stopped state; run_dir is the
    folder --resume continues. Returns (output or None, exit code, error or None, partial x̂₀ of a
    diverged run or None), the metrics of every view updated."""

    sc, rc, state = cfg["sampler"], cfg["run"], views[0].state
    name = ps[0].name if len(ps) == 1 else f"{len(ps)} images: {ps[0].name}…{ps[-1].name}"
    tiles = tile_plan(cfg, pipe, views, len(ps), dtype)
    bar = tqdm(total=sc["num_inference_steps"], desc=f"{sc['method']} {name}", unit="step", dynamic_ncols=True)
    bar.update(state["steps_done"])
    t0 = time.time() - state["runtime"]
    exit_code, error, out, partial, status, cg, exact = 0, None, None, None, None, None, None
    with checkpoint.stop_requests(), timing.RUN("sampler"):  # also while the checkpoint is written
        try:
            out, inter = pipe(torch.cat([p.y for p in ps]), num_inference_steps=sc["num_inference_steps"],
                              method=sc["method"], options=sc[sc["method"]], sigma_y=problem.batch_sigma_y(ps, cfg),
                              generator=generator,
                              callback=progress_callback(views, cfg, device, bar, sc["method"], y_norms(ps, sc)),
                              num_samples=sc["num_samples"],
                              clip_denoised=None if sc["clip_denoised"] == "auto" else sc["clip_denoised"],
                              dtype=dtype, gradient_checkpointing=rc["gradient_checkpointing"],
                              check_every=sc["log_every"], x_size=views[0].x_size,
                              x_T=start[0].to(device) if start else None, start_index=start[1] if start else 0,
                              tiles=tiles, stopwatch=timing.RUN)
            status, cg = "complete", (inter.get("cg_iterations_per_image"), inter.get("cg_stop_rule_per_image"))
            exact = inter.get("exact")
        except dps.DivergenceError as e:
            exit_code, error, status, partial = utils.EXIT_DIVERGED, str(e), "diverged", e.partial
        except checkpoint.Preempted as e:
            for view in views:
                view.state["runtime"] = time.time() - t0
            save_state(e.x_t, e.step + 1)
            exit_code, status, why = checkpoint.stop_outcome()
            error = (f"{why} after step {e.step + 1}/{sc['num_inference_steps']}; "
                     f"checkpoint saved, continue with --resume {run_dir}")
        except KeyboardInterrupt:
            exit_code, error, status = utils.EXIT_INTERRUPTED, "interrupted by the user (second Ctrl-C: no checkpoint)", "interrupted"
        except (RuntimeError, MemoryError) as e:
            if not (is_out_of_memory(e) or isinstance(e, MemoryError)):
                raise
            exit_code, error, status = utils.EXIT_BAD_INPUT, out_of_memory_hint(ps, cfg, device, tiles), "error"
        finally:
            bar.close()
    record_sampling(views, cfg, status, time.time() - t0, cg)
    if exact is not None:
        record_exact(views, exact)
    return out, exit_code, error, partial


def tile_plan(cfg, pipe, views, n_images, dtype):
    """The tiling.TilePlan for this sampler call (None: the UNet sees whole images), said in the log
    with the planned peak memory, and recorded in each image's metrics."""
    sc = cfg["sampler"]
    H, W = views[0].x_size
    sample_size = getattr(pipe.unet.config, "sample_size", None)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    plan = tiling.resolve(sc["tile"], sc["tile_overlap"], sc["tile_batch"], H, W, sample_size, 1)
    if sc["method"] == config.EXACT:   # no network to tile
        plan = None
    if plan is not None and tiling.n_tiles(H, W, plan) == 1:
        plan = None
    if sc["tile"] == "auto" and plan is not None:
        log.info("%dx%d exceeds 2× the model's training size %d: running the UNet on tiles (--tile off to "
                 "run it on the whole image)", H, W, sample_size)
    images = n_images * sc["num_samples"]
    peak = tiling.estimate_peak_bytes(pipe.unet, plan, images, H, W, sc["method"], dtype)
    said = ("peak memory not estimated for this model" if not peak else
            f"estimated peak memory {peak / 2 ** 30:.1f} GB" if peak >= 2 ** 28 else
            f"estimated peak memory {peak / 2 ** 20:.0f} MB")
    if plan is not None:
        n = tiling.n_tiles(H, W, plan)
        log.info("tiles of %d px, overlap %d: up to %d per step, %d per UNet call; %s", plan.tile, plan.overlap, n,
                 plan.batch, said)
    elif peak:
        log.info("UNet on the whole %dx%d image; %s", H, W, said)
    for view in views:
        view.metrics["tiles"] = None if plan is None else {
            "tile": plan.tile, "overlap": plan.overlap, "tiles_per_call": plan.batch,
            "tiles_per_step": tiling.n_tiles(H, W, plan)}
        view.metrics["estimated_peak_memory_gb"] = None if peak is None else round(peak / 2 ** 30, 3)
    return plan


def record_sampling(views, cfg, status, runtime, cg) -> None:
    """Each image's metrics after a sampler call: status, time (its share of the batch), speed,
    and its own CG iterations (DiffPIR: cg (steps, B·S), per sample)."""
    S = cfg["sampler"]["num_samples"]
    for b, view in enumerate(views):
        m, state = view.metrics, view.state
        m.update(status=status, runtime_s=runtime / len(views), batch_size=len(views), batch_runtime_s=runtime,
                 steps_completed=state["steps_done"], steps_per_s=state["steps_done"] / runtime if runtime > 0 else 0.0)
        if view.timing and state["steps_done"] > view.timing["step"]:  # steady state, without the first steps
            m["s_per_step_after_warmup"] = (time.time() - view.timing["t"]) / (state["steps_done"] - view.timing["step"])
        if cg is not None and cg[0] is not None:
            record_data_steps(m, cg[0][:, b * S:(b + 1) * S], cg[1][:, b * S:(b + 1) * S])


def record_exact(views, exact) -> None:
    """The exact posterior's solve, per image: CG iterations and the relative residual reached, and
    the prior's scale and noise level it used (metrics.json `exact_posterior`; an info line where
    the evidence chose them), with a warning where the cap stopped it short of cg_tol."""
    for b, view in enumerate(views):
        its, res = exact["cg_iterations"][b], exact["relative_residual"][b]
        gamma, sigma = exact["prior_scale"][b], exact["sigma_y"][b]
        view.metrics["exact_posterior"] = {"cg_iterations": its, "relative_residual": res, "cg_tol": exact["cg_tol"],
                                           "converged": res <= exact["cg_tol"], "evidence": exact["evidence"],
                                           "prior_scale": gamma, "sigma_effective": sigma}
        if exact["evidence"]:
            log.info("%s: by maximum evidence, the prior's scale %.3g and the noise level %.4g (%.2f x sigma_y: the "
                     "model's own error counts as noise; --set sampler.exact.evidence=false keeps both as given)",
                     view.metrics["image"], gamma, sigma, sigma / max(view.metrics["sigma_y"], dps.SIGMA_Y_FLOOR))
        if res > exact["cg_tol"]:
            why = (f"stopped at its cap ({its} iterations; --set sampler.exact.cg_max_iter=N)"
                   if its >= exact["cg_max_iter"] else f"ended after {its} iterations (float rounding)")
            log.warning("%s: the exact posterior's CG %s with a relative residual of %.2g, above cg_tol %g",
                        view.metrics["image"], why, res, exact["cg_tol"])


def record_data_steps(m, iters, rules) -> None:
    """DiffPIR's data steps for one image, (steps, S) each: the iterations and stopping rule of each
    step (of its sample that took the most iterations), and how often each rule stopped a solve."""
    worst = iters.argmax(1, keepdim=True)
    per_step = iters.gather(1, worst)[:, 0]
    m.update(cg_iterations_mean=float(per_step.double().mean()), cg_iterations_max=int(per_step.max()),
             cg_stop_rules={name: int((rules == k).sum()) for k, name in enumerate(dps.STOP_RULES)},
             cg_iterations_per_step=per_step.tolist(),
             cg_stop_rule_per_step=[dps.STOP_RULES[k] for k in rules.gather(1, worst)[:, 0].tolist()])


# A sample that fits y this many times worse than the median of the other samples is a misfit.
SAMPLE_MISFIT_FACTOR = 2.0


def sample_misfits(y, op, samples, factor=SAMPLE_MISFIT_FACTOR):
    """Each posterior sample's ‖y − A(x_s)‖/‖y‖ (samples: (S, C, H, W) in [0, 1]) and the indices of
    those more than `factor` times the median of the *other* samples' fits (so that two samples
    compare too). A DPS sample caught in a wrong mode (on a dark background, where the clamp of x̂₀
    to [−1, 1] zeroes the data gradient of most pixels) ends far off the data and drags the mean;
    the others' median is the yardstick because σ_y may be unknown."""

    with torch.no_grad():
        fits = torch.linalg.vector_norm((y - op(samples)).flatten(1), dim=1) / torch.linalg.vector_norm(y)
    fits = fits.tolist()
    others = [float(np.median(fits[:s] + fits[s + 1:])) if len(fits) > 1 else f for s, f in enumerate(fits)]
    return fits, [s for s, (f, o) in enumerate(zip(fits, others)) if f > factor * o]


def report_misfits(m, y, op, samples, device, where) -> None:
    """The per-sample data fit into the metrics, and a warning naming the samples that miss y."""
    fits, bad = sample_misfits(y, op, samples.to(device))
    m.update(sample_residual_relative=fits, samples_misfit=bad)
    if bad:
        log.warning("%s: %d of %d samples fit y more than %g times worse than the other samples' median "
                    "(‖y − A(x)‖/‖y‖ %s; median of all %.4f): they pull the posterior mean toward them (see "
                    "images/sample_*.png). With DPS on a dark background try --gradient_clip 1 --set "
                    "sampler.clip_denoised=false (docs/troubleshooting.md)", where, len(bad), len(fits),
                    SAMPLE_MISFIT_FACTOR, ", ".join(f"{fits[s]:.4f}" for s in bad), float(np.median(fits)))


# A result whose residual ‖y − A(x)‖ exceeds this many times the noise's expected norm σ_y√m fits y
# worse than the noise can explain (a converged fit sits near 1×).
FIT_CHECK_FACTOR = 2.0


def fit_cause(m, cfg) -> str:
    """The likeliest reason for a poor fit, from what the run recorded, and its fix."""
    method = cfg["sampler"]["method"]
    if m.get("cg_stop_rule_per_step", [])[-1:] == ["cap"]:
        return f"the last data step hit its CG cap (raise --set sampler.{method}.cg_max_iter)"
    if method == "dps":
        return ("DPS has not reached the data (more --num_inference_steps, a larger --step_size, or "
                "--sampler diffpir)")
    return ("the noise is larger than σ_y (try --sigma_noise auto), or the PSFs do not match the blur "
            "(check images/psf_grid.png, a larger --n_eigen_psfs)")


def check_fit(m, p: problem.Problem, cfg, residual_norm: float, where) -> None:
    """metrics.json's fit_check: ‖y − A(x)‖ over σ_y√m (Morozov's yardstick: about 1 for a result that
    fits y to the noise), and a warning naming the likely cause when it exceeds FIT_CHECK_FACTOR.
    σ_y = 0 (a noise-free simulation) has no yardstick: the ratio is null."""
    sigma = problem.sigma_y(p, cfg)
    noise_norm = sigma * p.y.numel() ** 0.5
    ratio = residual_norm / noise_norm if noise_norm > 0 else None
    passed = ratio is None or ratio <= FIT_CHECK_FACTOR
    m["fit_check"] = {"residual_over_noise": ratio, "sigma_y": sigma, "threshold": FIT_CHECK_FACTOR,
                      "passed": passed}
    if not passed:
        log.warning("%s: the result fits y worse than the noise explains: ‖y − A(x)‖ = %.1f × σ_y√m (σ_y %.4g; "
                    "above %g× is a poor fit); likely %s. metrics.json: fit_check", where, ratio, sigma,
                    FIT_CHECK_FACTOR, fit_cause(m, cfg))


def model_error_parts(m, p: problem.Problem, restored, residual) -> None:
    """What real data lets us measure of the model error, under names that say what each is:
    - pca_truncation_error_on_restoration: ‖A_K x − A_grid x‖/‖A_grid x‖, the EigenPSF truncation
      against the grid's own operator on the restoration (not the error against the optics: PSFs
      measured wrongly, or between the nodes, are invisible to it);
    - residual_share_near_frame: the share of ‖y − A(x)‖² in the band of one PSF radius along the
      frame, beside frame_band_pixel_share, the band's share of pixels. The boundary rule (reflect)
      guesses the scene beyond the frame; where the share is well above the pixels', that guess is
      a large part of the misfit (docs/outputs.md). residual: y − A(x), as write_outputs has it."""
    m["pca_truncation_error_on_restoration"] = physics.operator_relative_error(p.eig_op, p.grid_op, restored)
    r = p.grid.shape[-1] // 2
    res2 = residual.pow(2).sum(1)[0]                             # (H, W)
    band = torch.ones_like(res2, dtype=torch.bool)
    band[r:res2.shape[0] - r, r:res2.shape[1] - r] = False
    m["residual_share_near_frame"] = float(res2[band].sum() / res2.sum().clamp_min(1e-30))
    m["frame_band_pixel_share"] = float(band.float().mean())


def write_outputs(p: problem.Problem, view: RunView, run_dir, cfg, device, out, partial) -> None:
    """3. Outputs: the restoration cropped back to the measured window (or a diverged run's last
    good x̂₀), posterior mean/std/samples, the data residual, metrics and plots."""

    sc, m, images_dir, crop = cfg["sampler"], view.metrics, view.images_dir, view.crop
    figures = cfg["run"]["save_figures"]
    full = partial
    if out is not None and sc["num_samples"] > 1:
        full = out["mean"]
        samples = crop(out["samples"])                           # (1, S, C_y, H, W): std in y's channels
        std = samples.std(1)[0]
        utils.save_image(os.path.join(images_dir, "mean.png"), crop(out["mean"]))
        if figures:
            plots.plot_std(os.path.join(images_dir, "std.png"), utils.to_numpy(std[None]))
        for s in range(sc["num_samples"]):
            utils.save_image(os.path.join(images_dir, f"sample_{s:02d}.png"), samples[:, s])
        m["mean_posterior_std"] = float(std.mean())
        report_misfits(m, p.y, view.op, out["samples"][0], device, os.path.basename(run_dir))
    elif out is not None:
        full = out
    if full is not None:
        restored = crop(full)
        r = utils.to_numpy(restored)
        utils.save_image(os.path.join(images_dir, "restored.png"), restored)
        np.save(os.path.join(run_dir, "restored.npy"), r.astype(np.float32))  # lossless, for analysis
        if p.info.get("input_bit_depth") == 16:
            utils.save_tiff16(os.path.join(images_dir, "restored.tif"), r)
        with torch.no_grad():
            residual = p.y - view.op(full[:1].to(device))                # y − A(x): the fit and its share near the frame
        fit = torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(p.y)
        m["data_residual_relative"] = float(fit)
        check_fit(m, p, cfg, float(torch.linalg.vector_norm(residual)), os.path.basename(run_dir))
        title = "restored" if sc["num_samples"] == 1 else f"posterior mean of {sc['num_samples']}"
        y_np = utils.to_numpy(p.y)
        panels = [("blurred (measurement)", y_np), (f"{title} ({sc['method']})", r)]
        if p.clean is not None:
            m.update(psnr_restored=utils.psnr(p.clean, r), ssim_restored=utils.ssim(p.clean, r))
            panels = [("clean", p.clean),
                      (f"blurred  PSNR {m['psnr_blurred']:.2f} dB  SSIM {m['ssim_blurred']:.3f}", y_np),
                      (f"{title} ({sc['method']})  PSNR {m['psnr_restored']:.2f} dB  SSIM {m['ssim_restored']:.3f}", r)]
        baseline_images = classical_baselines(p, images_dir, cfg, m) if cfg["run"]["baseline"] else {}
        panels += [(title, img) for title, img in baseline_images.values()]
        if p.clean is not None:
            add_lpips(m, p.clean, {"blurred": y_np, "restored": r, **{k: v[1] for k, v in baseline_images.items()}},
                      cfg, device)
        if p.clean is None:
            model_error_parts(m, p, restored.to(device), residual)
        if figures:
            plots.plot_comparison(os.path.join(images_dir, "comparison.png"), panels)
    if view.state["curve"]:
        m["residual_relative_curve"] = {"steps": view.state["curve_steps"], "values": view.state["curve"]}
    if figures and view.state["steps"]:
        plots.plot_progress(os.path.join(images_dir, "progress.png"), view.state["steps"], view.state["x0_hat"],
                            view.state["curve_steps"], view.state["curve"])


BASELINE_TITLES = {"richardson_lucy": "Richardson-Lucy", "tikhonov": "Tikhonov"}


def classical_baselines(p: problem.Problem, images_dir, cfg, m) -> dict:
    """Richardson-Lucy and Tikhonov (baselines.py) on y with the same EigenPSF operator and σ_y as
    the sampler: their images and metrics beside the diffusion result's. Returns
    {name: (comparison panel title, (H, W, C) image)}."""
    t0 = time.time()
    with timing.RUN("baselines"):
        results = baselines.restore_baselines(p.eig_op, p.y, problem.sigma_y(p, cfg))
    m["baseline_runtime_s"] = time.time() - t0
    out = {}
    run_dir = os.path.dirname(images_dir)
    for name, (x, facts) in results.items():
        img = utils.to_numpy(x)
        utils.save_image(os.path.join(images_dir, f"baseline_{name}.png"), x)
        np.save(os.path.join(run_dir, f"baseline_{name}.npy"), img.astype(np.float32))  # lossless, as restored.npy
        if p.info.get("input_bit_depth") == 16:
            utils.save_tiff16(os.path.join(images_dir, f"baseline_{name}.tif"), img)
        with torch.no_grad():
            fit = torch.linalg.vector_norm(p.y - p.eig_op(x)) / torch.linalg.vector_norm(p.y)
        m[name] = {**facts, "data_residual_relative": float(fit)}
        title = BASELINE_TITLES[name]
        if p.clean is not None:
            m[f"psnr_{name}"], m[f"ssim_{name}"] = utils.psnr(p.clean, img), utils.ssim(p.clean, img)
            title += f"  PSNR {m[f'psnr_{name}']:.2f} dB  SSIM {m[f'ssim_{name}']:.3f}"
        out[name] = (f"{title} (baseline)", img)
    return out


def summary_lines(m) -> list:
    """The end of a run in a few lines: the restoration beside the classical baselines (PSNR where
    the clean image is known; always the data residual), so a result that loses to them shows."""
    names = [n for n in BASELINE_TITLES if n in m]
    lines = []
    if "psnr_restored" in m:
        beside = "".join(f"; {BASELINE_TITLES[n]} {m[f'psnr_{n}']:.2f} dB" for n in names if f"psnr_{n}" in m)
        lines.append(f"PSNR blurred {m['psnr_blurred']:.2f} dB -> restored {m['psnr_restored']:.2f} dB (SSIM "
                     f"{m['ssim_blurred']:.3f} -> {m['ssim_restored']:.3f}){beside}")
    ratio = m.get("fit_check", {}).get("residual_over_noise")
    noise = f" (the noise's level σ_y√m/‖y‖: {m['data_residual_relative'] / ratio:.4f})" if ratio else ""
    beside = "".join(f"; {BASELINE_TITLES[n]} {m[n]['data_residual_relative']:.4f}" for n in names
                     if "data_residual_relative" in m[n])
    lines.append(f"data residual ‖y − A(x)‖/‖y‖: restored {m['data_residual_relative']:.4f}{beside}{noise}")
    return lines


def add_lpips(m, clean, images: dict, cfg, device) -> None:
    """m[lpips_<name>] for each (H, W, C) image against the clean one (run.lpips backbone), or
    m[lpips_note] saying why LPIPS was not computed: never a made-up value."""
    net = cfg["run"]["lpips"]
    why = utils.lpips_unavailable(net)
    if why:
        m["lpips_note"] = why
        return
    as_batch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # noqa: E731
    for name, img in images.items():
        m[f"lpips_{name}"] = utils.lpips_distance(as_batch(clean), as_batch(img), net, device)[0]
    m["lpips_definition"] = utils.LPIPS_DEFINITION.format(net=net)


def load_pipeline(cfg, device, channels=3, cache=None):
    """(pipeline without operator, size multiple the UNet needs) for measurements with `channels`
    channels. The analytic prior is built with that many; a diffusers model keeps its own, and a
    gray y is then compared with the luminance of A(x) (see restore). `cache`: a dict that keeps
    what was loaded across calls (a batch may hold gray and RGB images)."""
    mc, sc = cfg["model"], cfg["sampler"]
    key = channels if mc["model_id"] == "analytic" else "model"
    if cache is not None and key in cache:
        return cache[key]
    with timing.RUN("model"):
        if sc["method"] == config.EXACT:   # no sampler, so no scheduler: diffusers is never imported
            unet, scheduler = priors.analytic_prior(priors.linear_alphas_cumprod(), channels).to(device), None
        else:
            unet, scheduler = priors.load_model(mc["model_id"], mc["model_cache"] or None, device, channels=channels)
            dps.check_num_inference_steps(sc["num_inference_steps"], scheduler, sc["method"])  # before any run folder
    blocks = getattr(unet.config, "block_out_channels", None)
    multiple = 2 ** (len(blocks) - 1) if blocks else 1  # the UNet downsamples len-1 times
    if isinstance(sc["tile"], int):  # before any run folder too
        tiling.resolve(sc["tile"], sc["tile_overlap"], sc["tile_batch"], sc["tile"] + 1, sc["tile"] + 1, None,
                       multiple)
    unet = device_setup.setup_accelerators(cfg, device, unet)
    loaded = dps.EigenPSFDPSPipeline(unet, scheduler, None), multiple
    if cache is not None:
        cache[key] = loaded
    return loaded


def check_channels(pipe, p: problem.Problem) -> None:
    """A prior samples its own channels: equal to y's, or RGB for a gray y (compared by luminance)."""
    C_x, C_y = pipe.unet.config.in_channels, p.y.shape[1]
    if C_x != C_y and not (C_y == 1 and C_x == 3):
        raise utils.UserError(f"{p.name}: the model has {C_x} channel(s) but the measurement has {C_y}")
    if C_x != C_y:
        log.info("%s: gray measurement, RGB prior: sampling RGB and comparing y with the luminance of A(x) "
                 "(Rec. 709 weights); the outputs are that luminance", p.name)
