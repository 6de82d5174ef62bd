"""The configuration (config.py): precedence, the schema against config.yaml, the registries, --help without torch."""

import subprocess
import sys

import pytest

import config
import physics
import utils
from helpers import ROOT


def test_flags_override_set_override_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampler:\n  dps:\n    step_size: 3.0\n  num_samples: 2\n")
    args = config.build_parser(config.load_config(config.DEFAULT_CONFIG)).parse_args(
        ["--config", str(cfg), "--set", "sampler.dps.step_size=4.0", "--set", "sampler.num_samples=3", "--num_samples", "5"])
    schema = config.load_config(config.DEFAULT_CONFIG)
    r, explicit = config.resolve_config(args, ["num_samples"], schema)
    assert r["sampler"]["dps"]["step_size"] == 4.0 and r["sampler"]["num_samples"] == 5
    assert r["physics"]["blur_mode"] == "motion"  # untouched keys keep config.yaml's value
    cfg.write_text("sampler:\n  stepsize: 3.0\n")
    with pytest.raises(utils.UserError, match="unknown config key 'sampler.stepsize'"):
        config.resolve_config(config.build_parser({}).parse_args(["--config", str(cfg)]), [], schema)


def test_config_yaml_is_the_one_source_of_physics_and_sampler_defaults():
    """physics.MODE_DEFAULTS and dps.SAMPLERS take their defaults from config.yaml (mixed reads
    motion and defocus); the registries' names are config's."""
    import dps
    schema = config.load_config(config.DEFAULT_CONFIG)
    for mode in physics.BLUR_MODES:
        if mode != "mixed":
            assert schema["physics"][mode] == physics.MODE_DEFAULTS[mode], mode
    assert physics.MODE_DEFAULTS["mixed"] == {**schema["physics"]["motion"], **schema["physics"]["defocus"]}
    assert set(physics.MODE_DEFAULTS) == set(config.BLUR_MODES)
    for method in config.SAMPLER_METHODS:
        assert dps.SAMPLERS[method][1] == schema["sampler"][method], method
    allowed = config.choices()
    assert allowed["physics.blur_mode"] == physics.BLUR_MODES
    assert set(allowed["physics.form"]) == {"auto", *physics.FORMS}
    assert allowed["physics.boundary"] == physics.BOUNDARIES
    assert allowed["physics.interpolation"] == physics.INTERPOLATIONS
    for key in ("blur_mode", "form", "boundary", "interpolation"):
        assert schema["physics"][key] in allowed[f"physics.{key}"]
    assert physics.resolve_grid_size({"blur_mode": "random_iid"}) == 64


def test_help_does_not_import_torch():
    code = ("import sys; sys.argv = ['main.py', '--help']\n"
            "import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("NO TORCH") and "--n_eigen_psfs" in out.stdout


@pytest.mark.parametrize("argv,message", [
    (["--set", "sampler.stepsize=3"], "unknown config key 'sampler.stepsize'"),
    (["--blur_mode", "wobble"], "physics.blur_mode must be one of"),
    (["--sampler", "ddrm"], "sampler.method must be one of"),
    (["--num_samples", "0"], "sampler.num_samples must be in"),
])
def test_config_errors_are_answered_without_torch(argv, message):
    """config.py imports no torch: a bad key or value is one line and exit 2 before that import."""
    code = ("import sys\nimport main\n"
            f"rc = main.main({argv!r})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "NO TORCH 2", out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.parametrize("flag", ["--num_sample", "--step"])
def test_a_flag_prefix_is_an_error_not_another_flag(flag):
    """argparse's prefix matching would read --num_sample as --num_samples and --step as --step_size."""
    out = subprocess.run([sys.executable, "main.py", flag, "4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: unrecognized arguments: {flag} 4 (python main.py --help lists every flag)"], out.stderr


def test_late_resolution_of_form_and_steps():
    """auto values resolved once, from the whole run: measured grids are scatter, motion
    simulations gather, and the step count follows the sampler."""
    for mode, grid, method, form, steps in [("motion", "", "dps", "gather", 1000),
                                            ("motion", "g.npz", "diffpir", "scatter", 100),
                                            ("defocus", "", "diffpir", "scatter", 100)]:
        cfg = config.with_defaults({"physics": {"blur_mode": mode}, "data": {"psf_grid": grid},
                                    "sampler": {"method": method}}, config.defaults())
        config.resolve_late(cfg)
        assert (cfg["physics"]["form"], cfg["sampler"]["num_inference_steps"]) == (form, steps), mode


def resolved(argv):
    """main.run's resolution, up to the late defaults, without running anything."""
    schema = config.defaults()
    args = config.build_parser(schema).parse_args(argv)
    cfg, explicit = config.resolve_config(args, [n for n in config.FLAGS if getattr(args, n) is not None], schema)
    config.real_data_defaults(cfg, explicit)
    config.warn_other_sampler_settings(cfg, explicit)
    return cfg


REAL = ["--blurred", "y.png", "--psf_grid", "g.npz"]


@pytest.mark.parametrize("argv, method, samples", [
    (REAL + ["--model_id", "analytic"], "exact", 1),                        # nothing chosen: the exact mean
    (REAL + ["--model_id", "analytic", "--num_samples", "4"], "diffpir", 4),  # samples asked for
    (REAL + ["--model_id", "analytic", "--sampler", "diffpir"], "diffpir", 16),
    (REAL + ["--model_id", "analytic", "--num_inference_steps", "50"], "diffpir", 16),
    (REAL + ["--model_id", "analytic", "--set", "sampler.diffpir.zeta=0.5"], "diffpir", 16),
    (REAL + ["--model_id", "analytic", "--sampler", "exact", "--num_samples", "8"], "exact", 8),   # exact draws
    (REAL + ["--model_id", "analytic", "--set", "sampler.exact.cg_tol=1e-8"], "exact", 1),   # the solve's own setting
    (REAL + ["--model_id", "analytic", "--set", "sampler.exact.evidence=false"], "exact", 1),
    (REAL + ["--model_id", "some/model"], "diffpir", 1),                    # a learned prior has no closed form
    (["--image", "sample", "--model_id", "analytic"], "dps", 1),             # simulations keep config.yaml's
])
def test_real_data_with_the_analytic_prior_defaults_to_its_exact_posterior_mean(argv, method, samples):
    cfg = resolved(argv)
    config.resolve_late(cfg)
    assert (cfg["sampler"]["method"], cfg["sampler"]["num_samples"]) == (method, samples)
    if method == "exact":
        assert cfg["sampler"]["num_inference_steps"] == 1


def test_exact_takes_one_solve_whatever_steps_were_asked():
    cfg = resolved(["--image", "sample", "--model_id", "analytic", "--sampler", "exact", "--num_inference_steps", "50"])
    config.resolve_late(cfg)
    assert cfg["sampler"]["num_inference_steps"] == 1


def test_exact_needs_the_analytic_prior():
    cfg = resolved(["--image", "sample", "--sampler", "exact", "--model_id", "some/model"])
    with pytest.raises(utils.UserError, match="--sampler exact is the analytic prior's closed-form posterior"):
        config.check_conflicts(cfg, set())


@pytest.mark.parametrize("argv, warned", [
    (["--sampler", "diffpir", "--step_size", "2"], "--step_size is a dps setting; the diffpir sampler ignores it"),
    (["--set", "sampler.diffpir.zeta=0.5"], "--set sampler.diffpir.zeta is a diffpir setting; the dps sampler ignores it"),
    (["--sampler", "diffpir", "--set", "sampler.diffpir.zeta=0.5"], None),
    (["--step_size", "2"], None),
])
def test_a_setting_of_another_sampler_is_named(argv, warned, caplog):
    with caplog.at_level("INFO", logger="eigenpsf_dps"):
        resolved(argv)
    lines = [r.getMessage() for r in caplog.records if "sampler ignores it" in r.getMessage()]
    assert lines == ([warned] if warned else []), lines


def test_real_data_says_where_its_noise_level_comes_from(caplog):
    with caplog.at_level("INFO", logger="eigenpsf_dps"):
        resolved(["--blurred", "y.png", "--psf_grid", "g.npz"])
        said = [r.getMessage() for r in caplog.records if "noise sigma" in r.getMessage()]
        assert said == ["real data: noise sigma 0.01, config.yaml's default, not measured (--sigma_noise auto "
                        "estimates it from the measurement; --sigma_noise VALUE sets it)"]
        caplog.clear()
        for given in (["--sigma_noise", "0.02"], ["--sigma_noise", "auto"]):
            resolved(["--blurred", "y.png", "--psf_grid", "g.npz", *given])
        resolved(["--image", "sample"])                                       # a simulation knows its σ
    assert not [r for r in caplog.records if "noise sigma" in r.getMessage()]


@pytest.mark.parametrize("extra, named", [
    (["--set", "train.steps=35"], "--set train.steps=35"),
    (["--set", "sampler.dps.step_size=2"], "--set sampler.dps.step_size=2"),
    (["--num_samples", "4"], "--num_samples"),
    (["--no_baseline"], "--no_baseline"),
])
def test_resume_takes_no_other_setting(extra, named, tmp_path):
    """A resumed run uses the config saved in it; a setting beside --resume would be ignored (a
    training meant to go on to 35 steps stopped at its saved count), so it is refused, before torch."""
    code = ("import sys\nimport main\n"
            f"rc = main.main({['--resume', str(tmp_path), *extra]!r})\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "NO TORCH 2", out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"takes no other setting (got {named})" in errors[0], out.stderr


def test_sigma_zero_on_real_data_is_refused():
    """σ_y = 0 on a camera frame turns every data step into an unregularised deconvolution (before:
    pure noise, exit 0). A simulation may be noise-free."""
    with pytest.raises(utils.UserError, match="--sigma_noise 0 on a real measurement"):
        resolved(["--blurred", "y.png", "--psf_grid", "g.npz", "--sigma_noise", "0"])
    resolved(["--image", "sample", "--sigma_noise", "0"])
