"""HPC: preemption-safe resume, sweep make/collect, and a real single-node Slurm cluster."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import checkpoint
import utils
from helpers import (cli, ROOT, run_cli, run_dirs, run_in_process, save_tiny_model, sigterm_then_resume,
                     stop_at, wait_for, wait_for_first_step, write_images)

SWEEP_ARGS = ("--model_id analytic --img_size 32 --kernel_size 7 --grid_size 4 --n_eigen_psfs 4 "
              "--num_inference_steps 5 --set physics.motion.max_length=6 --no_intermediates")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dps", "diffpir", "daps"])
def test_sigterm_then_resume_is_bit_identical(tmp_path, tiny_model, sampler, capsys, monkeypatch, caplog):
    """The stop is a real signal to a real process; the resume and the uninterrupted reference
    run in this process (same code, same thread count)."""
    def as_an_older_run(run):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        del saved["run"]["save_figures"]         # as a run written before that key existed
        (run / "config.yaml").write_text(yaml.safe_dump(saved))

    args = ["--model_id", tiny_model, "--img_size", "48", "--num_inference_steps", "50", "--sampler", sampler]
    run, full = sigterm_then_resume(args, 50, tmp_path, capsys, monkeypatch, caplog, as_an_older_run)
    assert np.array_equal(np.load(run / "restored.npy"), np.load(full / "restored.npy"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_like_sigterm_and_exits_130(tmp_path, tiny_model):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--model_id", tiny_model, "--img_size", "48",
                             "--num_inference_steps", "50", "--save_dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_step(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    run = tmp_path / run_dirs(tmp_path)[0]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and 0 < m["steps_completed"] < 50
    assert "--resume" in err and checkpoint.load_checkpoint(str(run / "checkpoint.pt"))["next_index"] == m["steps_completed"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys, monkeypatch, caplog):
    r = cli(["--resume", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 2 and "no checkpoint.pt" in r.stderr and "Traceback" not in r.stderr


def make_sweep(tmp_path, grid="sampler.dps.step_size: [0.5, 2.0]", seeds=None, extra=""):
    """sweep.py make on a spec of SWEEP_ARGS, the grid, optional seeds and extra spec lines."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"sweep_dir: {tmp_path / 'sweep'}\nargs: \"{SWEEP_ARGS}\"\ngrid:\n  {grid}\n"
                    + (f"seeds: {seeds}\n" if seeds else "") + extra)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "make", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tmp_path / "sweep", r.stdout


@pytest.mark.slow
def test_sweep_make_and_collect_without_slurm(tmp_path):
    sweep, out = make_sweep(tmp_path, seeds="[0, 1]")
    lines = (sweep / "tasks.txt").read_text().splitlines()
    assert len(lines) == 4 and "sbatch --array=0-3" in out
    assert "--set sampler.dps.step_size=0.5 --set run.seed=1" in lines[1]
    # Run tasks 0 and 3 (both step sizes, both seeds) through the job script itself, as Slurm
    # would; leave tasks 1 and 2 unrun.
    for task in (0, 3):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "EIGENPSF_DIR": ROOT, "PYTHON": sys.executable}
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_array.sh"), str(sweep)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "collect", str(sweep)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [row["status"] for row in rows] == ["complete", "missing", "missing", "complete"]
    assert "task 1: missing" in r.stdout and "task 2: missing" in r.stdout
    assert rows[0]["sampler.dps.step_size"] == "0.5" and float(rows[0]["psnr_restored"]) > 0
    assert (sweep / "plot_sampler_dps_step_size.png").is_file() and (sweep / "plot_run_seed.png").is_file()


def test_sweep_folder_tasks_pass_the_batch_size_and_resume_a_stopped_batch(tmp_path, capsys, monkeypatch):
    """A sweep over folder runs: the batch size reaches main.py, a task stopped in the middle of
    a batch is resumed by the job script from its batch_*/checkpoint.pt, and collect reads the
    folder's summary."""
    src = write_images(tmp_path / "imgs", [(40, 40, 3)] * 3)
    make_sweep(tmp_path, grid="sampler.dps.step_size: [1.0]", extra=f"image_dir: {src}\nbatch_size: 2\n")
    line = (tmp_path / "sweep" / "tasks.txt").read_text().splitlines()[0]
    assert f"--image_dir {src} --batch_size 2" in line
    # Task 0 as the job script would start it, stopped after step 2 of its first batch.
    stop_at(monkeypatch, batch_number=1, step=2)
    code, err = run_in_process([*line.split(), "--save_dir", str(tmp_path / "sweep" / "task_0000")], capsys,
                               monkeypatch)
    assert code == utils.EXIT_PREEMPTED, err[-2000:]
    monkeypatch.undo()
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "EIGENPSF_DIR": ROOT, "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_array.sh"), str(tmp_path / "sweep")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "task 0: resuming" in r.stdout and "/batch_" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "collect", str(tmp_path / "sweep")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (row,) = csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))
    assert row["status"] == "complete" and row["images"] == "3" and float(row["psnr_restored"]) > 0


def test_sweep_rejects_unknown_keys(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("grid:\n  sampler.stepsize: [1, 2]\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "make", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a config key" in r.stderr


# --- a real single-node Slurm cluster ----------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on localhost, torn down afterwards."""
    if not all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        if os.environ.get("EIGENPSF_REQUIRE_SLURM"):
            pytest.fail("Slurm/munge are not installed but EIGENPSF_REQUIRE_SLURM is set")
        pytest.skip("slurm-wlm and munge are not installed (.ci/run installs them)")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = d / "munge.sock"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
                    f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"], check=True)
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=eigenpsf
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([b, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for b in ("slurmctld", "slurmd")]
    try:
        def idle():
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            return r.stdout.strip() == "idle"
        wait_for(idle, 60, "the Slurm node to become idle")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        pid = (d / "munged.pid").read_text().strip() if (d / "munged.pid").exists() else ""
        if pid:
            os.kill(int(pid), signal.SIGTERM)


def sbatch(env, sweep, array, extra=()):
    """Submits the real script; the test node has no GPU and 2 CPUs, so those headers are overridden."""
    r = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", "--mem=0", f"--array={array}",
                        f"--output={sweep}/slurm-%A_%a.out", *extra, os.path.join(ROOT, "scripts", "slurm_array.sh"),
                        str(sweep)], capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(env, job):
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env)
    return r.stdout.strip()


def run_status(task_dir):
    """metrics.json's status of the task's one run folder, or None while it is absent or being written."""
    try:
        (metrics,) = task_dir.glob("run_*/metrics.json")
        return json.loads(metrics.read_text())["status"]
    except (ValueError, KeyError, OSError):
        return None


def queue_empty(env, job):
    r = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
    return r.returncode == 0 and r.stdout.strip() == "" or "Invalid job id" in r.stderr


@pytest.mark.slurm
def test_slurm_array_runs_sweep_and_collects(slurm, tmp_path):
    sweep, _ = make_sweep(tmp_path)
    job = sbatch(slurm, sweep, "0-1")
    wait_for(lambda: queue_empty(slurm, job), 300, "the array job to finish")
    for task in (0, 1):
        (run,) = (sweep / f"task_{task:04d}").glob("run_*")
        assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
        assert (run / "images" / "restored.png").is_file()
        log = (sweep / f"slurm-{job}_{task}.out").read_text()
        assert f"task {task}:" in log
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "collect", str(sweep)],
                       capture_output=True, text=True)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [row["status"] for row in rows] == ["complete", "complete"], r.stdout
    assert {row["sampler.dps.step_size"] for row in rows} == {"0.5", "2.0"}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_requeues_and_resumes_bit_identically(slurm, tmp_path, tiny_model):
    args = f"--model_id {tiny_model} --img_size 48 --num_inference_steps 50"
    spec = tmp_path / "p.yaml"
    spec.write_text(f"sweep_dir: {tmp_path / 'sweep'}\nargs: \"{args}\"\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "make", str(spec)], check=True,
                   capture_output=True)
    sweep = tmp_path / "sweep"
    job = sbatch(slurm, sweep, "0-0")
    wait_for_first_step(sweep / "task_0000")
    # What Slurm does before a time limit with --signal=B:USR1@120: signal the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], env=slurm, check=True)
    wait_for(lambda: list((sweep / "task_0000").glob("run_*/checkpoint.pt")), 120, "the checkpoint")
    wait_for(lambda: "requeueing" in (sweep / f"slurm-{job}_0.out").read_text(), 60, "the requeue")
    # Slurm holds a requeued job for a while (BeginTime). Release it once it is pending again (an
    # update sent while the old run is still completing is lost, and the test then waits minutes),
    # and not within the second of the requeue: slurmd refuses a start whose credential is no newer
    # than the revoked one ("Job credential revoked"), and the task is then lost.
    wait_for(lambda: job_state(slurm, f"{job}_0") == "PENDING", 120, "the requeued task to be pending")
    time.sleep(2)
    wait_for(lambda: subprocess.run(["scontrol", "update", f"jobid={job}_0", "StartTime=now"], env=slurm,
                                    capture_output=True).returncode == 0, 60, "the requeued task's release")
    # Wait for the run's own record, not for an empty queue: a task that Slurm drops leaves the
    # queue too, and the timeout then reports the status, the queue and the job log.
    def state():
        log = (sweep / f"slurm-{job}_0.out").read_text()[-3000:]
        return f"run status {run_status(sweep / 'task_0000')}, queue: {job_state(slurm, f'{job}_0')!r}\n{log}"
    wait_for(lambda: run_status(sweep / "task_0000") == "complete", 300, "the resumed task to finish", state)
    wait_for(lambda: queue_empty(slurm, job), 60, "the job to leave the queue")
    (run,) = (sweep / "task_0000").glob("run_*")
    assert "resuming" in (sweep / f"slurm-{job}_0.out").read_text()
    ref = run_cli(args.split() + ["--save_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0
    full = tmp_path / "ref" / run_dirs(tmp_path / "ref")[0]
    assert np.array_equal(np.load(run / "restored.npy"), np.load(full / "restored.npy"))
