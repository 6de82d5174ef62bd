"""Mutation testing of the numerical core: does the suite catch a small, realistic bug?

    python bench/mutants.py                 # every mutant (about 10 min on 2 CPU cores)
    python bench/mutants.py --only cg_alpha,dps_sign

Each mutant below replaces one exact piece of source text (a flipped sign, a dropped factor, a
swapped order) in a scratch copy of the checkout, then runs the tests that should catch it. It
prints one row per mutant, caught or survived, and exits 1 if any survived. Run it before
resolving an issue that touches the numerical core; it is too slow for CI.

Named mutants run against chosen tests, rather than a generator such as mutmut: mutmut 3.8
makes about 2,800 mutants of dps.py alone, each needing the slow sampler tests, which is days on
this CPU; most of those mutants (a changed message, a default) say nothing about the maths. A
mutant that must be added here is one that a reviewer would fear.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, exact text, its mutant, pytest selection). Each text must occur exactly once.
MUTANTS = {
    "tweedie_sign": ("dps.py", "return (x_t - (1 - alpha_bar_t).sqrt() * eps)", "return (x_t + (1 - alpha_bar_t).sqrt() * eps)",
                     "tests/test_dps.py -k tweedie"),
    "dps_sign": ("dps.py", "            x_prev = out.prev_sample.detach() - zeta *",
                 "            x_prev = out.prev_sample.detach() + zeta *",
                 "tests/test_dps.py -k 'guidance_lowers or finite_difference'"),
    "residual_range": ("dps.py", "return torch.linalg.vector_norm((y - operator((x0_hat + 1) / 2)).flatten(1), dim=1)",
                       "return torch.linalg.vector_norm((y - operator(x0_hat)).flatten(1), dim=1)",
                       "tests/test_dps.py -k 'finite_difference or guidance_lowers'"),
    "clip_ratio": ("dps.py", "return g * (max_norm / norms).clamp(max=1)", "return g * (norms / max_norm).clamp(max=1)",
                   "tests/test_dps.py -k gradient_clip"),
    "cg_alpha": ("dps.py", "alpha = torch.where(active, rz / dot(p, Mp).clamp_min(1e-30)",
                 "alpha = torch.where(active, rz / dot(p, p).clamp_min(1e-30)", "tests/test_dps.py -k conjugate_gradient"),
    "prox_tolerance_rho": ("dps.py", "converged = _per_image_norm(r) <= rho * tol * _per_image_norm(d)",
                           "converged = _per_image_norm(r) <= tol * _per_image_norm(d)", "tests/test_data_step.py"),
    "prox_data_residual": ("dps.py", "s.addcmul_(alpha, Ap, value=-1)", "s.addcmul_(alpha, Ap, value=1)",
                           "tests/test_data_step.py"),
    "diffpir_rho": ("dps.py", "rho = opt[\"lambda\"] * floored ** 2 * a_t / (1 - a_t)",
                    "rho = opt[\"lambda\"] * floored ** 2 * (1 - a_t) / a_t", "tests/test_data_step.py -k rho_follows"),
    "diffpir_mix": ("dps.py", "mix = (1 - opt[\"zeta\"]) ** 0.5 * eps_hat + opt[\"zeta\"] ** 0.5 * noise",
                    "mix = opt[\"zeta\"] ** 0.5 * eps_hat + (1 - opt[\"zeta\"]) ** 0.5 * noise",
                    "tests/test_dps.py -k 'deterministic_ddim or near_exact_posterior_mean_and_beats'"),
    "diffpir_last_step_discrepancy": ("dps.py", "if opt[\"discrepancy\"] > 0 and t_prev >= 0 else None",
                                      "if opt[\"discrepancy\"] > 0 else None", "tests/test_data_step.py -k final_step"),
    "rule_path_follows_the_setting": ("dps.py", "pcg = gains is not None and noise_norm is None and opt[\"precondition\"]",
                                      "pcg = gains is not None and opt[\"precondition\"]",
                                      "tests/test_data_step.py -k speed_setting"),
    "sigma_order": ("dps.py", "return s.repeat_interleave(num_samples).view(-1, 1, 1, 1)",
                    "return s.repeat(num_samples).view(-1, 1, 1, 1)", "tests/test_dps.py -k per_image_sigma"),
    "preconditioner_one_side": ("dps.py", "out += torch.fft.irfft2(u, s=v.shape[-2:]) * root[:, r]",
                                "out += torch.fft.irfft2(u, s=v.shape[-2:])",
                                "tests/test_data_step.py -k preconditioner"),
    "posterior_noise_factor": ("dps.py", "lambda w: w + half(operator.adjoint(operator(half(w, g))), g) / (4 * s ** 2)",
                               "lambda w: w + half(operator.adjoint(operator(half(w, g))), g) / (2 * s ** 2)",
                               "tests/test_dps.py -k exact_covariance"),
    "daps_draw_without_prior_noise": ("dps.py", "y_pert, u_pert = ctx.y + sigma * e1, u_hat + r * e2",
                                      "y_pert, u_pert = ctx.y + sigma * e1, u_hat",
                                      "tests/test_daps.py -k dense"),
    "daps_langevin_data_sign": ("dps.py", "ctx.operator.adjoint(ctx.y - ctx.operator(u)) * inv_s2",
                                "ctx.operator.adjoint(ctx.operator(u) - ctx.y) * inv_s2", "tests/test_daps.py -k langevin"),
    "eigen_adjoint_no_flip": ("physics.py", "spec_t = spec.conj().resolve_conj()", "spec_t = spec",
                              "tests/test_physics.py -k adjoint"),
    "grid_adjoint_no_flip": ("physics.py", "return pad.adjoint(_sv_scatter(y, self._psfs(rows, cols), k, True, mb))",
                             "return pad.adjoint(_sv_scatter(y, self._psfs(rows, cols), k, False, mb))",
                             "tests/test_physics.py -k adjoint"),
    "reflect_repeats_edge": ("physics.py", "return torch.where(i > n - 1, 2 * (n - 1) - i, i)",
                             "return torch.where(i > n - 1, 2 * n - 1 - i, i)", "tests/test_physics.py"),
    "rl_no_normalisation": ("baselines.py", "update = x * operator.adjoint(y / Ax.clamp_min(eps)) / norm",
                            "update = x * operator.adjoint(y / Ax.clamp_min(eps))", "tests/test_baselines.py"),
    "tikhonov_laplacian_sign": ("baselines.py", "out[..., :, :-1] -= dx", "out[..., :, :-1] += dx",
                                "tests/test_baselines.py"),
    "calibration_max_normalised": ("calibration.py", "    return box / box.sum(), float(box.sum())",
                                   "    return box / box.max(), float(box.sum())",
                                   "tests/test_calibration.py -k registered_cutout_sums"),
    "centroid_pixel_window": ("calibration.py", "        dy, dx = v[:, None] + (ry - cy), v[None, :] + (rx - cx)\n        w = box",
                              "        dy, dx = v[:, None] + 0 * (ry - cy), v[None, :] + 0 * (rx - cx)\n        w = box",
                              "tests/test_calibration.py -k 'weighted_centroid or high_background'"),
    "band_halo_short": ("physics.py", "            xb = xp[..., a:b + 2 * r, :]", "            xb = xp[..., a:b + r, :]",
                        "tests/test_physics.py -k 'bands_of_rows or component_chunks'"),
    "band_adjoint_overwrites": ("physics.py", "            res[..., a:b + 2 * r, :] += xb", "            res[..., a:b + 2 * r, :] = xb",
                                "tests/test_physics.py -k 'bands_of_rows or component_chunks'"),
    "node_variance_unsquared": ("calibration.py", "(L ** 2) @ V[near]", "np.abs(L) @ V[near]",
                                "tests/test_calibration.py -k noise_variance"),
    "seed_from_index": ("batch.py", "gen = image_generator(cfg[\"run\"][\"seed\"], os.path.basename(path), device)",
                        "gen = image_generator(cfg[\"run\"][\"seed\"], str(i), device)",
                        "tests/test_batch.py -k depend_on_the_folder"),
    "operators_cache_ignores_size": ("problem.py", "if measured is not None and built is not None and (H, W, channels) in built:\n"
                                     "        return built[(H, W, channels)]",
                                     "if measured is not None and built:\n        return next(iter(built.values()))",
                                     "tests/test_problem.py -k built_once"),
    "config_imports_torch": ("config.py", "import yaml\n", "import torch  # noqa: F401\nimport yaml\n",
                             "tests/test_config.py -k without_torch"),
    "resume_off_by_one": ("dps.py", "for i in range(start_index, len(timesteps)):",
                          "for i in range(start_index + 1, len(timesteps)):", "tests/test_dps.py -k resume"),
    "adm_qkv_swap_k_v": ("priors.py", "return tuple(per_head[:, i].reshape(channels, *qkv.shape[1:]) for i in range(3))",
                         "return tuple(per_head[:, i].reshape(channels, *qkv.shape[1:]) for i in (0, 2, 1))",
                         "tests/test_priors.py -k ffhq_conversion"),
    "adm_fixed_variance": ("priors.py", 'variance_type="learned_range", clip_sample=True',
                           'variance_type="fixed_small", clip_sample=True', "tests/test_priors.py -k learned"),
    "lpips_range": ("utils.py", "to_model = lambda x: (2 * torch.as_tensor(x).float().clamp(0, 1) - 1)",
                    "to_model = lambda x: (torch.as_tensor(x).float().clamp(0, 1))", "tests/test_lpips.py"),
    "train_resume_no_generator": ("training.py", "        self.generator.set_state(state[\"generator\"])\n", "",
                                  "tests/test_training.py -k resume_is_bit"),
    "train_ddp_same_slice": ("training.py", "mine = slice(self.rank * b, (self.rank + 1) * b)", "mine = slice(0, b)",
                             "tests/test_training.py -k ddp"),
    "vb_variance_swapped": ("training.py", "model_log_var = frac * lb + (1 - frac) * lp",
                            "model_log_var = frac * lp + (1 - frac) * lb", "tests/test_training.py -k variational"),
    "vb_decoder_at_every_t": ("training.py", "return torch.where(t.to(kl.device) == 0, nll, kl)", "return nll",
                              "tests/test_training.py -k variational"),
    "tile_vjp_unweighted": ("tiling.py", "cot = torch.cat([weights[k].to(v.dtype) * v_pad", "cot = torch.cat([v_pad",
                            "tests/test_tiling.py -k vjp"),
    "psnr_rescaled": ("utils.py", "return float(peak_signal_noise_ratio(ref, np.clip(est, 0, 1), data_range=1.0))",
                      "return float(peak_signal_noise_ratio(ref, np.clip(est, 0, 1), data_range=float(ref.max() - ref.min())))",
                      "tests/test_utils.py -k fixed_range"),
    "optics_scale_doubled": ("optics.py", "scale = pitch_um / (lam * f_number)", "scale = 2 * pitch_um / (lam * f_number)",
                             "tests/test_optics.py -k airy"),
    "optics_phase_in_radians": ("optics.py", "torch.exp(2j * math.pi * W * (ref / lam)", "torch.exp(1j * W * (ref / lam)",
                                "tests/test_optics.py -k marechal"),
    "optics_path_in_waves_of_each_wavelength": ("optics.py", "W * (ref / lam).view(-1, 1, 1)", "W * (lam / lam).view(-1, 1, 1)",
                                                "tests/test_optics.py -k tilt"),
    "colour_channels_reversed": ("physics.py", "P = (P.movedim(2, 0) if kernel_grid.ndim == 5 else P[None])",
                                 "P = (P.movedim(2, 0).flip(0) if kernel_grid.ndim == 5 else P[None])",
                                 "tests/test_colour.py -k brute_force"),
    "colour_grid_unflatten_order": ("physics.py", "return h.unflatten(-1, (self.channels, -1)) if self.channels else h",
                                    "return h.unflatten(-1, (-1, self.channels)).transpose(-1, -2) if self.channels else h",
                                    "tests/test_colour.py -k brute_force"),
    "preconditioner_first_channel_only": ("dps.py", "gains = [torch.fft.rfft2(p[:, :1] if one else p).abs() ** 2 for p in psfs]",
                                          "gains = [torch.fft.rfft2(p[:, :1]).abs() ** 2 for p in psfs]",
                                          "tests/test_colour.py -k preconditioner"),
    "calibration_channel_own_centroid": ("calibration.py", "parts = [(_registered_cutout(p, cy, cx, k), n) for p, n in planes]",
                                         "parts = [(_registered_cutout(p, *_centroid(p, round(cy), round(cx), k), k), n) for p, n in planes]",
                                         "tests/test_calibration.py -k lateral_colour"),
    "fit_check_noise_norm": ("restore.py", "noise_norm = sigma * p.y.numel() ** 0.5", "noise_norm = sigma * p.y.numel()",
                             "tests/test_real_data.py -k fit_check"),
    "frame_band_double_width": ("restore.py", "band[r:res2.shape[0] - r, r:res2.shape[1] - r] = False",
                                "band[2 * r:res2.shape[0] - 2 * r, 2 * r:res2.shape[1] - 2 * r] = False",
                                "tests/test_real_data.py -k fit_check"),
    "auto_rank_one_short": ("physics.py", "K = min(n + 1, cap, N, cum.shape[1])", "K = min(n, cap, N, cum.shape[1])",
                            "tests/test_physics.py -k auto_rank"),
    "auto_rank_best_channel": ("physics.py", "n = int((cum < share).sum(-1).max())", "n = int((cum < share).sum(-1).min())",
                               "tests/test_physics.py -k auto_rank"),
    "threads_whole_machine": ("device.py", "return len(os.sched_getaffinity(0)), \"the CPUs this process may use\"",
                              "return os.cpu_count() or 1, \"the CPUs this process may use\"",
                              "tests/test_new_user.py -k threads"),
    "daps_final_mean_ignored": ("dps.py", "u = daps_conditional_cg(ctx, u_hat, r, sigma, draw=not final_mean)",
                                "u = daps_conditional_cg(ctx, u_hat, r, sigma)", "tests/test_daps.py -k final_mean"),
    "exact_one_sigma_for_all": ("dps.py", "    sig = sig.expand(B).reshape(B, 1, 1, 1)\n",
                                "    sig = sig[:1].expand(B).reshape(B, 1, 1, 1)\n",
                                "tests/test_dps.py -k exact_method_gives_each_image"),
    "exact_preconditioner_sigma_squared": ("dps.py", "prior.prior_variance(*shape[-2:])[None] * gain / (4 * sig ** 2))",
                                           "prior.prior_variance(*shape[-2:])[None] * gain / (4 * sig))",
                                           "tests/test_dps.py -k 'exact_method_gives_each_image or exact_covariance or "
                                           "preconditioner_cuts'"),
    "evidence_without_quarter": ("dps.py", "return prior.prior_variance(H, W)[None] * gain / 4, power, w",
                                 "return prior.prior_variance(H, W)[None] * gain, power, w",
                                 "tests/test_dps.py -k evidence_gives_back"),
    "exact_ignores_prior_scale": ("dps.py", "half = lambda v, g: prior.apply_covariance(v, 0.5) * g.sqrt()",
                                  "half = lambda v, g: prior.apply_covariance(v, 0.5)",
                                  "tests/test_dps.py -k exact_method_gives_each_image"),
    "exact_draws_as_mean": ("dps.py", '"mean": mean, "std": samples.clamp(0, 1).float().std(1)}',
                            '"mean": samples.clamp(0, 1).float().mean(1), "std": samples.clamp(0, 1).float().std(1)}',
                            "tests/test_dps.py -k exact_method_draws"),
    "exact_despite_samples_asked": ("config.py", "    if analytic and not sampler_chosen(explicit):",
                                    "    if analytic and \"sampler.method\" not in explicit:",
                                    "tests/test_config.py -k exact_posterior_mean"),
    "channels_equal_exactly": ("dps.py", "<= CHANNELS_EQUAL_RTOL * p.abs().max()", "<= 0 * p.abs().max()",
                               "tests/test_dps.py -k region_gains_of_a_mono"),
    "dtype_auto_for_analytic": ("device.py", 'if device.type == "cpu" and model_id != "analytic" and cpu_has_native_bf16():',
                                'if device.type == "cpu" and cpu_has_native_bf16():',
                                "tests/test_new_user.py -k dtype_auto_is_bf16"),
    "preconditioned_under_the_rule": ("dps.py", 'pcg = gains is not None and noise_norm is None and opt["precondition"]',
                                      'pcg = gains is not None and (noise_norm is not None or opt["precondition"])',
                                      "tests/test_data_step.py -k path_does_not_follow"),
    "stopwatch_parent_counts_children": ("timing.py", "            self.seconds[parent] = self.seconds.get(parent, 0.0) + now - since\n",
                                         "            pass\n", "tests/test_timing.py -k nested_stages"),
    "photo_split_leaks": ("bench/bench_photos.py", "return [s for s in stems if s not in held], held",
                          "return stems, held", "tests/test_bench_photos.py -k held_out"),
    "rl_oracle_without_norm": ("bench/bench_photos.py", "est = est * op.adjoint(y / op(est).clamp_min(eps)) / norm",
                               "est = est * op.adjoint(y / op(est).clamp_min(eps))", "tests/test_bench_photos.py -k oracle"),
}


def scratch_copy(dest):
    """The tracked and untracked-but-not-ignored files of the checkout, copied to dest."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_mutant(name, work):
    """(outcome, seconds): 'caught', 'SURVIVED', or why it could not run."""
    path, text, mutant, selection = MUTANTS[name]
    target = os.path.join(work, path)
    original = open(target).read()
    if original.count(text) != 1:
        return f"text found {original.count(text)} times in {path}", 0.0
    open(target, "w").write(original.replace(text, mutant))
    try:
        t0 = time.time()
        r = subprocess.run(f"{sys.executable} -m pytest -x -q -p no:cacheprovider {selection}", shell=True, cwd=work,
                           capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        seconds = time.time() - t0
    finally:
        open(target, "w").write(original)
    if r.returncode == 5:
        return "no test selected", seconds
    if r.returncode not in (0, 1):
        return f"pytest exit {r.returncode}", seconds
    return ("caught" if r.returncode == 1 else "SURVIVED"), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        sys.exit(f"error: unknown mutant(s) {', '.join(unknown)}; known: {', '.join(MUTANTS)}")
    with tempfile.TemporaryDirectory() as work:
        scratch_copy(work)
        print("| mutant | file | tests | outcome | s |\n|---|---|---|---|---|")
        outcomes = {}
        for name in names:
            outcome, seconds = run_mutant(name, work)
            outcomes[name] = outcome
            print(f"| {name} | {MUTANTS[name][0]} | `{MUTANTS[name][3]}` | {outcome} | {seconds:.0f} |", flush=True)
    caught = sum(o == "caught" for o in outcomes.values())
    print(f"\n{caught} caught, {len(outcomes) - caught} not caught, of {len(outcomes)}")
    sys.exit(0 if caught == len(outcomes) else 1)


if __name__ == "__main__":
    main()
