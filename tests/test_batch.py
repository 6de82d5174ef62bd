"""Folder runs in batches (--batch_size): the same answers as one image at a time, a resume in the
middle of a batch, and the errors a too-large batch gives."""

import csv
import glob
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import batch
import checkpoint
import dps
import utils
from helpers import FAST, run_in_process, save_tiny_model, stop_at, write_images

# Columns of summary.csv that describe how the run was scheduled, not what it computed.
SCHEDULING = {"folder", "runtime_s", "batch_size"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def folder_run(args, save_dir, capsys, monkeypatch):
    """(exit code, stderr, batch folder) of one in-process folder run."""
    code, err = run_in_process([*args, "--save_dir", str(save_dir)], capsys, monkeypatch)
    (batch,) = glob.glob(os.path.join(save_dir, "batch_*"))
    return code, err, batch


def results(batch):
    """{file: (summary row without scheduling columns, restored.npy, mean_posterior_std or None)}."""
    out = {}
    for row in csv.DictReader(open(os.path.join(batch, "summary.csv"))):
        sub = os.path.join(batch, row["folder"])
        out[row["file"]] = ({k: v for k, v in row.items() if k not in SCHEDULING}, np.load(os.path.join(sub, "restored.npy")))
    return out


def assert_same_results(a, b, atol=1e-5):
    assert list(a) == list(b)
    for f in a:
        row_a, row_b = a[f][0], b[f][0]
        assert row_a["status"] == row_b["status"] == "complete", (f, row_a, row_b)
        for key in row_a:
            if key not in ("file", "status"):
                assert float(row_a[key]) == pytest.approx(float(row_b[key]), abs=1e-5 if atol <= 1e-5 else 10 * atol), (f, key)  # metrics follow the images
        np.testing.assert_allclose(a[f][1], b[f][1], atol=atol, rtol=0, err_msg=f)


SIM = ["--model_id", "analytic", "--device", "cpu", *FAST, "--num_inference_steps", "6"]


@pytest.mark.parametrize("sampler,samples", [("dps", "1"), ("diffpir", "2")])
def test_batched_folder_equals_one_at_a_time(tmp_path, capsys, monkeypatch, sampler, samples):
    """Simulation: every image has its own PSF field (a stacked operator); 5 images at batch 2 run
    as 2 + 2 + 1 and give each image's batch-1 result and summary row."""
    src = write_images(tmp_path / "imgs", [(40, 40, 3), (50, 36, 3), (40, 40, 3), (44, 52, 3), (33, 33, 3)])
    args = [*SIM, "--image_dir", src, "--sampler", sampler, "--num_samples", samples]
    one = folder_run([*args, "--batch_size", "1"], tmp_path / "b1", capsys, monkeypatch)
    two = folder_run([*args, "--batch_size", "2"], tmp_path / "b2", capsys, monkeypatch)
    assert one[0] == 0 and two[0] == 0, two[1][-2000:]
    assert "2 images: im0…im1" in two[1] and "2 images" not in one[1]
    assert_same_results(results(one[2]), results(two[2]))
    if samples == "2":
        for f in ("im0", "im4"):
            (a,), (b,) = (glob.glob(os.path.join(d, f"{f}_*", "images", "std.png")) for d in (one[2], two[2]))
            np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("tiles", [[], ["--tile", "16", "--tile_overlap", "4"]], ids=["whole", "tiled"])
@pytest.mark.parametrize("sampler", sorted(dps.SAMPLERS))
def test_batched_real_folder_groups_mixed_shapes(tmp_path, capsys, monkeypatch, tiny_model, sampler, tiles):
    """Real data with one shared PSF grid: sizes that need padding for the UNet, and a gray
    measurement under an RGB prior, are grouped by shape; each equals its batch-1 result, with
    the noise σ estimated per measurement (DiffPIR's ρ_t is then per image). With tiles too: every
    image of a batch sees the same tile grids."""
    src = write_images(tmp_path / "ys", [(32, 32, 3), (30, 37, 3), (32, 32, 1), (30, 37, 3), (32, 32, 3)], seed=1)
    psfs = np.zeros((3, 3, 5, 5))
    psfs[..., 2, 2], psfs[..., 2, 3] = 1.0, 0.5
    np.save(tmp_path / "g.npy", psfs)
    args = ["--model_id", tiny_model, "--device", "cpu", "--blurred_dir", src, "--psf_grid", str(tmp_path / "g.npy"),
            "--sigma_noise", "auto", "--n_eigen_psfs", "3", "--num_inference_steps", "4", "--sampler", sampler, *tiles,
            "--dtype", "float32"]   # the float32 path: in bf16 (auto on a native-bf16 CPU) a batch moves results by ~2e-3
    one = folder_run([*args, "--batch_size", "1"], tmp_path / "b1", capsys, monkeypatch)
    two = folder_run([*args, "--batch_size", "2"], tmp_path / "b2", capsys, monkeypatch)
    assert one[0] == 0 and two[0] == 0, two[1][-2000:]
    # im0 + im4 (32x32 RGB) and im1 + im3 (30x37, padded) share calls; the gray im2 runs alone.
    assert "2 images: im0…im4" in two[1] and "2 images: im1…im3" in two[1] and f"{sampler} im2" in two[1]
    # DAPS's draws are CG solves at ρ = σ_y²/r_t², near-unregularised at the first levels (ρ ~ 1e-7) and,
    # with these clean measurements' small estimated σ_y, at the last: CG amplifies the float32
    # rounding by which a batched FFT differs from a single one (measured: up to 1.5e-3 on the padded
    # pair, 0 elsewhere). DPS and DiffPIR stay at 1e-5.
    assert_same_results(results(one[2]), results(two[2]), atol=2e-3 if sampler == "daps" else 1e-5)
    sigmas = {float(r["sigma_noise_estimated"]) for r in csv.DictReader(open(os.path.join(two[2], "summary.csv")))}
    assert len(sigmas) == 5  # every measurement has its own σ
    assert [r["file"] for r in csv.DictReader(open(os.path.join(two[2], "summary.csv")))] == \
        [f"im{i}.png" for i in range(5)]


@pytest.mark.parametrize("sampler", sorted(dps.SAMPLERS))
def test_resume_in_the_middle_of_a_batched_folder_run_is_bit_identical(tmp_path, capsys, monkeypatch, sampler):
    src = write_images(tmp_path / "imgs", [(40, 40, 3)] * 5, seed=2)
    args = [*SIM, "--image_dir", src, "--batch_size", "2", "--sampler", sampler, "--num_samples", "2"]
    full = folder_run(args, tmp_path / "full", capsys, monkeypatch)
    assert full[0] == 0, full[1][-2000:]
    stop_at(monkeypatch, batch_number=2, step=2)
    code, err, batch = folder_run(args, tmp_path / "cut", capsys, monkeypatch)
    assert code == utils.EXIT_PREEMPTED and f"continue with --resume {batch}" in err, err[-2000:]
    rows = list(csv.DictReader(open(os.path.join(batch, "summary.csv"))))
    assert [r["status"] for r in rows] == ["complete", "complete", "preempted", "preempted"]
    assert os.path.isfile(os.path.join(batch, "checkpoint.pt"))
    monkeypatch.undo()
    code, err = run_in_process(["--resume", batch], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert not os.path.exists(os.path.join(batch, "checkpoint.pt"))
    a, b = results(full[2]), results(batch)
    assert list(a) == list(b)
    for f in a:
        assert a[f][0] == b[f][0], f
        np.testing.assert_array_equal(a[f][1], b[f][1], err_msg=f)
    # The stopped batch's images kept their folders; none was made twice.
    assert len(glob.glob(os.path.join(batch, "im*_*"))) == 5


def test_a_diverging_batch_is_rerun_one_image_at_a_time(tmp_path, capsys, monkeypatch, caplog):
    """If one image of a batch diverges, the others must not fail with it: the batch is redone
    image by image from its start, which gives exactly the batch-1 results."""
    src = write_images(tmp_path / "imgs", [(40, 40, 3)] * 3, seed=3)
    args = [*SIM, "--image_dir", src, "--num_samples", "2"]
    one = folder_run([*args, "--batch_size", "1"], tmp_path / "b1", capsys, monkeypatch)
    original = dps.EigenPSFDPSPipeline.__call__

    def diverge_when_batched(self, y, *a, **kw):
        if y.shape[0] > 1:  # stands in for one image of the batch blowing up
            raise dps.DivergenceError(3, 6, None, {}, method="dps")
        return original(self, y, *a, **kw)
    monkeypatch.setattr(dps.EigenPSFDPSPipeline, "__call__", diverge_when_batched)
    code, err, batch = folder_run([*args, "--batch_size", "3"], tmp_path / "b3", capsys, monkeypatch)
    assert code == 0 and "restoring these 3 images one at a time" in caplog.text, err[-2000:]
    assert_same_results(results(one[2]), results(batch), atol=0)


def test_a_batch_too_large_for_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    src = write_images(tmp_path / "imgs", [(40, 40, 3)] * 4, seed=4)

    def out_of_memory(self, y, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(dps.EigenPSFDPSPipeline, "__call__", out_of_memory)
    code, err, batch = folder_run([*SIM, "--image_dir", src, "--batch_size", "4"], tmp_path / "out", capsys,
                                  monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == utils.EXIT_BAD_INPUT and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "out of CPU memory" in lines[0] and "try --batch_size 2" in lines[0]
    rows = list(csv.DictReader(open(os.path.join(batch, "summary.csv"))))
    assert [r["status"] for r in rows] == ["error"] * 4


def test_batched_checkpoint_damage_is_named(tmp_path):
    """A folder checkpoint is validated entry by entry, like a single run's."""
    ckpt = {"format": checkpoint.CHECKPOINT_FORMAT, "version": checkpoint.CHECKPOINT_VERSION, "kind": "folder",
            "x_t": torch.zeros(1), "next_index": 3, "inputs": ["a.png"], "rows": {}, "images": [{"index": 0}]}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(utils.UserError, match=r"damaged: images\[0\]\.generator_state should be a tensor"):
        checkpoint.load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_a_stop_between_batches_checkpoints_the_images_done(tmp_path, capsys, monkeypatch):
    """A signal that arrives while no batch is sampling (writing outputs, preparing the next) is
    honoured at the next batch boundary: checkpoint, exit 75, and the resumed run equals an
    uninterrupted one."""
    src = write_images(tmp_path / "imgs", [(40, 40, 3)] * 3, seed=5)
    args = [*SIM, "--image_dir", src, "--batch_size", "2"]
    full = folder_run(args, tmp_path / "full", capsys, monkeypatch)
    original = batch.restore_group

    def then_stop(*a, **kw):  # the signal lands after the first batch, outside the sampler
        code = original(*a, **kw)
        checkpoint.STOP["signal"] = signal.SIGTERM
        return code
    monkeypatch.setattr(batch, "restore_group", then_stop)
    code, err, cut = folder_run(args, tmp_path / "cut", capsys, monkeypatch)
    assert code == utils.EXIT_PREEMPTED and "between batches, 2/3 images done" in err, err[-2000:]
    monkeypatch.undo()
    code, err = run_in_process(["--resume", cut], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    a, b = results(full[2]), results(cut)
    assert list(a) == list(b) == ["im0.png", "im1.png", "im2.png"]
    for f in a:
        np.testing.assert_array_equal(a[f][1], b[f][1], err_msg=f)


def test_an_images_result_does_not_depend_on_the_folder_around_it(tmp_path, capsys, monkeypatch):
    """Each image is seeded from its file name: the same file gives a bit-identical restored.npy
    in a subset of its folder and beside a new file that sorts first (its index shifts)."""
    src = write_images(tmp_path / "all", [(40, 40, 3)] * 3)
    args = [*SIM, "--no_figures", "--no_baseline", "--batch_size", "2"]
    full = folder_run([*args, "--image_dir", src], tmp_path / "full", capsys, monkeypatch)
    subset = tmp_path / "subset"
    os.makedirs(subset)
    os.link(os.path.join(src, "im2.png"), subset / "im2.png")
    more = tmp_path / "more"
    write_images(more, [(40, 40, 3)], seed=9)
    os.rename(more / "im0.png", more / "a_first.png")
    for f in ("im0.png", "im1.png", "im2.png"):
        os.link(os.path.join(src, f), more / f)
    part = folder_run([*args, "--image_dir", str(subset)], tmp_path / "part", capsys, monkeypatch)
    grown = folder_run([*args, "--image_dir", str(more)], tmp_path / "grown", capsys, monkeypatch)
    assert full[0] == part[0] == grown[0] == 0
    a, b, c = results(full[2]), results(part[2]), results(grown[2])
    assert np.array_equal(a["im2.png"][1], b["im2.png"][1])
    for f in ("im0.png", "im1.png", "im2.png"):
        assert np.array_equal(a[f][1], c[f][1]), f


def test_exact_folder_in_batches_with_draws_equals_batch_one(tmp_path, capsys, monkeypatch):
    """--sampler exact on a folder of measurements (each σ estimated), 2 images per call, with exact
    posterior draws: it runs (the progress rows are per sample), and each image's mean, draws' std
    and metrics equal its batch-1 run's (each image draws from its own generator)."""
    src = write_images(tmp_path / "ys", [(24, 24, 3), (24, 24, 3), (24, 24, 3)], seed=2)
    psfs = np.zeros((3, 3, 5, 5))
    psfs[..., 2, 2], psfs[..., 2, 3] = 1.0, 0.5
    np.save(tmp_path / "g.npy", psfs)
    args = ["--model_id", "analytic", "--device", "cpu", "--blurred_dir", src, "--psf_grid", str(tmp_path / "g.npy"),
            "--sigma_noise", "auto", "--sampler", "exact", "--num_samples", "3", "--no_figures"]
    one = folder_run([*args, "--batch_size", "1"], tmp_path / "b1", capsys, monkeypatch)
    two = folder_run([*args, "--batch_size", "2"], tmp_path / "b2", capsys, monkeypatch)
    assert one[0] == 0 and two[0] == 0, two[1][-2000:]
    assert_same_results(results(one[2]), results(two[2]))
    for f in ("im0", "im1"):
        (a,), (b,) = (glob.glob(os.path.join(d, f"{f}_*", "images", "sample_02.png")) for d in (one[2], two[2]))
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
