"""Checkpoints (checkpoint.py): the format round trip, and files that are not ours refused before any code in them runs."""

import numpy as np
import pytest
import torch

import checkpoint
import problem
import utils
from helpers import Payload, one_error_line, planted_run, run_cli


def test_planted_pickle_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = planted_run(tmp_path, {"x_t": torch.zeros(1), "evil": Payload(marker)})
    # The payload is live: a full pickle load runs it (so the assertion below can fail).
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    line = one_error_line(run_cli(["--resume", str(run)]))
    assert "not a checkpoint this tool wrote" in line
    assert not marker.exists()


@pytest.mark.parametrize("content,pattern", [
    ({"x_t": torch.zeros(1), "next_index": 3}, "start the run again"),        # an older or foreign dict
    ({"format": checkpoint.CHECKPOINT_FORMAT, "version": 1}, "format 1"),
    ({"format": checkpoint.CHECKPOINT_FORMAT, "version": checkpoint.CHECKPOINT_VERSION, "x_t": torch.zeros(1),
      "next_index": "3"}, "next_index should be int"),
    (b"truncated", "truncated or corrupt"),
    (b"just some text\n", "not a checkpoint this tool wrote: it is not a torch checkpoint archive"),
])
def test_foreign_or_damaged_checkpoints_name_what_is_wrong(tmp_path, content, pattern):
    run = planted_run(tmp_path, {})
    if isinstance(content, bytes):
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[:40] if content == b"truncated" else content)
    else:
        torch.save(content, run / "checkpoint.pt")
    with pytest.raises(utils.UserError, match=pattern):
        checkpoint.load_checkpoint(str(run / "checkpoint.pt"))


def test_checkpoint_round_trip_is_exact_and_plain(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.randn(5, generator=gen)
    clean = np.random.default_rng(0).random((8, 8, 3))
    p = problem.Problem("img", torch.rand(1, 3, 8, 8), clean, torch.rand(2, 2, 3, 3),
                     (np.array([1.5, 5.5]), np.array([2.0, 6.0])), None, None, None,
                     {"operator_relative_error": 0.01, "psf_sums_before_normalisation": (0.9, 1.1)})
    state = {"steps_done": 4, "runtime": 1.5, "steps": [0, 2], "x0_hat": [torch.rand(1, 3, 8, 8)] * 2,
             "residual": [torch.rand(1)] * 2}
    x_t = torch.randn(1, 3, 8, 8)
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, p, x_t, 4, gen, state)
    ck = checkpoint.load_checkpoint(path)
    assert torch.equal(ck["x_t"], x_t) and ck["next_index"] == 4
    assert np.array_equal(ck["problem"]["clean"].numpy(), clean) and ck["problem"]["clean"].dtype == torch.float64
    assert ck["problem"]["info"]["psf_sums_before_normalisation"] == [0.9, 1.1]
    g2 = torch.Generator()
    g2.set_state(ck["generator_state"])
    assert torch.equal(torch.randn(5, generator=g2), torch.randn(5, generator=gen))
