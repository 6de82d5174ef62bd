"""The photo benchmark's protocol (bench/bench_photos.py): which photos are held out, and the order in
which a time-limited restoration run does its jobs. Its numbers are in docs/benchmarks.md."""

import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_photos  # noqa: E402


def test_the_held_out_photos_are_other_scenes_fixed_by_rule():
    train, held = bench_photos.split()
    assert set(held) == {"Bridge_by_Sander_Klootwijk", "EveningGlow", "Kite", "Picture_0B_by_freespace"}
    assert not set(train) & set(held) and not set(train) & set(bench_photos.SKIMAGE_PHOTOS)
    assert len(train) == 22 and len(set(train)) == 22


def test_the_headline_jobs_come_first():
    """A run stopped by its deadline has the baselines, then the last mark's DiffPIR at the first σ,
    then the learning curve there, before anything at the other σ."""
    todo = bench_photos.jobs(["a", "b"], ["tiny"], [5.0, 60.0], [0.01, 0.003], ["diffpir", "dps"], [0.01])
    methods = [(s, m, model) for _, s, m, model in todo]
    first_sampler = next(i for i, (_, m, _) in enumerate(methods) if m in ("diffpir", "dps"))
    assert {m for _, m, _ in methods[:first_sampler]} == {"blurred", "exact", *bench_photos.BASELINES}
    assert methods[first_sampler:first_sampler + 4] == [(0.01, "diffpir", "tiny/model_60min")] * 2 + \
        [(0.01, "diffpir", "tiny/model_5min")] * 2
    assert all(s == 0.003 for s, _, _ in methods[methods.index((0.01, "dps", "tiny/model_60min")) + 2:])
    assert (0.003, "diffpir", "tiny/model_5min") not in methods       # the curve only at curve_sigmas
    assert len(todo) == len(set(todo))


def test_the_oracle_baselines_are_upper_bounds_of_their_rules():
    """The oracle stop and α (chosen against the truth) score at least what the discrepancy principle's
    do, and Richardson-Lucy's oracle follows baselines' own iterates (its 1-iteration bound is theirs)."""
    import torch

    import baselines
    from helpers import face_under_defocus
    x, op, _ = face_under_defocus(32, 7, 2.0)
    y = op(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    found = baselines.restore_baselines(op, y, 0.01)
    for rule, oracle in (("richardson_lucy", "richardson_lucy_oracle"), ("tikhonov", "tikhonov_oracle")):
        best = bench_photos.ORACLES[oracle](op, y, x)
        assert bench_photos.psnr_torch(x, best) >= bench_photos.psnr_torch(x, found[rule][0]) - 1e-6, rule
    one = bench_photos.richardson_lucy_oracle(op, y, x, max_iter=1)
    assert torch.allclose(one, baselines.richardson_lucy(op, y, 0.01, tau=0.0, max_iter=1)[0])


def test_bad_steps_are_refused():
    assert bench_photos.parse_steps("dps=200")["dps"] == 200
    with pytest.raises(SystemExit, match="sampler=N"):
        bench_photos.parse_steps("ddim=20")


def test_mark_steps_are_one_increasing_count_per_mark():
    assert bench_photos.parse_marks("5,15", "") == ([5.0, 15.0], None)
    assert bench_photos.parse_marks("5,15", "352,1263") == ([5.0, 15.0], [352, 1263])
    for bad in ("352", "352,1263,2597", "1263,352", "352,x"):
        with pytest.raises(SystemExit, match="--mark_steps"):
            bench_photos.parse_marks("5,15", bad)
