"""Runs of two processes as the outside launchers start them: torchrun, and SLURM's srun and Hydra's
submitit launcher on a one-node cluster on this machine (scripts/slurm_cluster.sh; the SLURM tests skip,
saying why, when it is not up). A first-use data folder is generated once; the fit is the one-process fit;
an error on one rank, or a rank killed, ends every rank with one block (the others one line at most)
within the times that anomaly/watchdog.py states."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anomaly
from anomaly.data.synthetic import ensure_dataset

pytestmark = pytest.mark.slow  # two processes per test: 30 s to a minute and a half each on 2 cores

PYTHON = Path(sys.executable)
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "paths.results_db=null",
         "trainer.accelerator=cpu", "dataset.image_size=64", "dataset.num_workers=0",
         "dataset.batch_size=8"]  # fmt: skip
SMALL = [*QUIET, "dataset.n_train=16", "dataset.n_calibration=0", "dataset.n_test_good=8",
         "dataset.n_test_defect=12", "dataset.generated_size=128"]  # fmt: skip
GENERATION = {"n_train": 16, "n_test_good": 8, "n_test_defect": 12, "image_size": 128}
TIMEOUT = 400
STOP_SECONDS = 30  # the bound once the ranks have connected (the watchdog's: 15 s silent + beats)


def environment() -> dict[str, str]:
    """The test's environment without what would make a child think it is a rank already; one torch thread
    per process, so that a batch's features are the same bits whichever rank computes them."""
    ranks = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"}
    skip = {*ranks, "HYDRA_FULL_ERROR"}
    return {key: value for key, value in os.environ.items()
            if key not in skip and not key.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The generated data every run here reads (``paths.data_dir``), made once."""
    folder = tmp_path_factory.mktemp("launchers-data")
    ensure_dataset(folder / "synthetic", ["fabric"], **GENERATION)
    return folder


def torchrun_nodes(tmp_path: Path, per_node: list[list[str]], common: list[str]) -> list[subprocess.Popen]:
    """One torchrun agent per entry of ``per_node`` (its own overrides), each a "node" of one process on
    localhost: each agent watches only its own worker, as on two machines. Output in node<N>.txt."""
    torchrun = [str(PYTHON), "-m", "torch.distributed.run", f"--nnodes={len(per_node)}", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}"]  # fmt: skip
    nodes = []
    for node, extra in enumerate(per_node):
        output = open(tmp_path / f"node{node}.txt", "w")  # noqa: SIM115 (the child writes it)
        command = [*torchrun, f"--node-rank={node}", "-m", "anomaly.cli.train", *common, *extra]
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=output,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    return nodes


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_node_overrides(data_dir: Path, run_dir: Path) -> list[str]:
    return [*SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "method=padim", "trainer=ddp",
            "trainer.devices=1", "trainer.num_nodes=2"]  # fmt: skip


def end_times(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[float]:
    """When each process ended (time.monotonic()), polling."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(processes) and time.monotonic() < deadline:
        for index, process in enumerate(processes):
            if index not in ended and process.poll() is not None:
                ended[index] = time.monotonic()
        time.sleep(0.1)
    for process in processes:
        process.kill() if process.poll() is None else None
    assert len(ended) == len(processes), "a process was still running at the time limit"
    return [ended[index] for index in range(len(processes))]


def assert_one_block(outputs: str, message: str) -> None:
    """The error block once, no traceback of ours (torchrun's agent prints its own ChildFailedError)."""
    assert outputs.count(message) == 1, outputs[-6000:]
    assert "anomaly/" not in "".join(line for line in outputs.splitlines() if line.startswith("  File ")), (
        outputs[-6000:]
    )
    assert "gloo" not in outputs.lower().replace("distributed_backend=gloo", ""), outputs[-6000:]


def test_torchrun_of_two_processes_on_a_fresh_data_folder_generates_it_once(tmp_path):
    """Before: both ranks generated into one folder and one stopped on 'Training images not found'."""
    fresh, run_dir = tmp_path / "fresh-data", tmp_path / "run"
    command = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", "-m", "anomaly.cli.train", *SMALL, f"paths.data_dir={fresh}",
               f"hydra.run.dir={run_dir}", "method=padim", "trainer=ddp", "trainer.devices=2"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["image_auroc"] > 0.5
    assert len(list((fresh / "synthetic" / "fabric" / "train" / "good").glob("*.png"))) == 16


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_on_one_rank_ends_both_under_torchrun(failing, data_dir, tmp_path):
    """Rank 0 fails before the process group connects (a bad batch size, found when the data module is
    built), rank 1 before any work (an AUPRO limit above 1): the other rank prints one line and every
    process exits non-zero, within STOP_SECONDS of the failing one."""
    errors = {0: ("dataset.batch_size=0", "Error: dataset.batch_size must be a positive int, got 0"),
              1: ("evaluation.aupro_fpr_limit=1.5",
                  "Error: evaluation.aupro_fpr_limit must be a number in (0, 1], got 1.5")}  # fmt: skip
    override, message = errors[failing]
    per_node = [[override] if node == failing else [] for node in (0, 1)]
    nodes = torchrun_nodes(tmp_path, per_node, two_node_overrides(data_dir, tmp_path / "run"))
    ended = end_times(nodes)
    assert all(node.returncode != 0 for node in nodes)
    outputs = [(tmp_path / f"node{node}.txt").read_text() for node in (0, 1)]
    assert_one_block("".join(outputs), message)
    assert message in outputs[failing]
    other = 1 - failing
    assert f"Error: rank {other} stops because rank {failing} failed: its error is above" in outputs[other]
    assert abs(ended[0] - ended[1]) < STOP_SECONDS, ended


def test_an_error_on_rank_1_during_the_fit_ends_rank_0_waiting_in_a_collective(data_dir, tmp_path):
    """Rank 1 alone cannot write PatchCore's spill file (an immutable folder) once the ranks have connected,
    while rank 0 collects and then waits in the coreset's collective: rank 0 stops within STOP_SECONDS with
    one line, rank 1 prints its one block."""
    blocked = tmp_path / "no-room"
    blocked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(blocked)]).returncode != 0:
        pytest.skip("chattr +i is not available here: no folder that every user (root too) cannot write")
    try:
        common = [o for o in two_node_overrides(data_dir, tmp_path / "run") if o != "method=padim"]
        nodes = torchrun_nodes(tmp_path, [[], [f"paths.spill_dir={blocked}"]], [*common, "method=patchcore"])
        ended = end_times(nodes)
    finally:
        subprocess.run(["chattr", "-i", str(blocked)], check=True)
    outputs = [(tmp_path / f"node{node}.txt").read_text() for node in (0, 1)]
    assert all(node.returncode != 0 for node in nodes), outputs
    message = ("Error: Cannot write PatchCore's temporary file of training patches (rows x D x 4 bytes) in "
               f"{blocked}")  # fmt: skip
    assert_one_block("".join(outputs), message)
    assert message in outputs[1] and "Initializing distributed: GLOBAL_RANK: 1" in outputs[1]
    assert "Error: rank 0 stops because rank 1 failed: its error is above" in outputs[0]
    assert abs(ended[0] - ended[1]) < STOP_SECONDS, ended


def test_kill_9_of_one_rank_ends_the_other_within_30_s_naming_it(data_dir, tmp_path):
    """Rank 1's process killed once it connects: rank 0 names it in one line, without a gloo traceback."""
    nodes = torchrun_nodes(tmp_path, [[], []], two_node_overrides(data_dir, tmp_path / "run"))
    # Lightning's banner on rank 0 comes once both ranks' gloo connections are made (rank 1's own
    # "Initializing distributed" line comes before: a kill then makes gloo print its connection errors).
    log, deadline = tmp_path / "node0.txt", time.monotonic() + TIMEOUT
    while "All distributed processes registered" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1, worker
    os.kill(int(worker[0]), signal.SIGKILL)
    killed = time.monotonic()
    ended = end_times(nodes)
    output = (tmp_path / "node0.txt").read_text()
    assert nodes[0].returncode != 0 and ended[0] - killed < STOP_SECONDS, (ended[0] - killed, output[-3000:])
    assert f"Error: rank 0 stops because rank 1 (pid {worker[0]} on" in output, output[-3000:]
    assert_one_block(output, "Error: rank 0 stops because")


# SLURM: a one-node cluster on this machine (.ci/run starts it with scripts/slurm_cluster.sh)


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skips, saying why, unless a SLURM node on this machine is idle."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        pytest.skip("SLURM is not installed (sinfo/srun missing): run scripts/slurm_cluster.sh as root")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or "idle" not in state.stdout.split():
        pytest.skip(f"no idle SLURM node (sinfo: {(state.stdout + state.stderr).strip()!r}): run "
                    "scripts/slurm_cluster.sh as root")  # fmt: skip


def anomaly_train(*arguments: str) -> list[str]:
    return [str(PYTHON), "-m", "anomaly.cli.train", *arguments]


def srun(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", "-N1", "--time=10", *arguments], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> dict[str, dict]:
    """The one-process model file's tensors of PaDiM and PatchCore on the module's data: anomaly-train's job
    in this process (no interpreter to start), with one torch thread as each rank has (environment())."""
    models, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("padim", "patchcore"):
            run_dir = tmp_path_factory.mktemp(f"one-{method}") / "run"
            overrides = [*SMALL, f"paths.data_dir={data_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}",
                         f"method={method}"]  # fmt: skip
            anomaly.run(anomaly.compose(overrides, output_dir=run_dir))
            models[method] = load_file(str(run_dir / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    return models


def assert_one_process_model(method: str, one: dict, two: dict) -> None:
    if method == "padim":  # the same statistics up to float32 rounding (each rank sums its own images)
        for key in ("mean", "covariance"):
            scale = float(one[key].abs().max())
            torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-5 * scale)
        assert int(one["count"]) == int(two["count"])
    else:
        assert torch.equal(one["memory_bank"], two["memory_bank"])  # the same coreset, row for row


def test_srun_of_two_tasks_fits_what_one_process_fits(slurm, one_process, data_dir, tmp_path):
    """PaDiM; PatchCore's bank over two SLURM tasks is the submitit test's (as under torchrun and
    Lightning's own launcher: tests/end_to_end/test_distributed.py)."""
    run_dir = tmp_path / "run"
    result = srun(tmp_path, "--ntasks-per-node=2", "--job-name=anomaly",
                  *anomaly_train(*SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                                 "method=padim", "trainer=ddp", "trainer.devices=2"))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert_one_process_model("padim", one_process["padim"], load_file(str(run_dir / "model.safetensors")))


def test_submitit_jobs_of_two_tasks_fit_what_one_process_fits(slurm, one_process, data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
                "hydra.launcher.timeout_min=10"]  # fmt: skip
    result = subprocess.run(anomaly_train("-m", *launcher, *SMALL, f"paths.data_dir={data_dir}",
                                          f"hydra.sweep.dir={sweep}", "method=padim,patchcore", "trainer=ddp",
                                          "trainer.devices=2"),
                            cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for method in ("padim", "patchcore"):
        (run_dir,) = sweep.glob(f"*_{method}_fabric")
        task_logs = list((sweep / ".submitit").glob("*/*_log.err"))
        assert sum("MEMBER: 2/2" in log.read_text() for log in task_logs) >= 2  # two tasks per job
        assert_one_process_model(method, one_process[method], load_file(str(run_dir / "model.safetensors")))


def test_srun_with_a_missing_data_root_on_rank_0_alone_ends_both(slurm, data_dir, tmp_path):
    """The issue's case (before: rank 1 waited until the job's time limit)."""
    mvtec = ["dataset=mvtec", "dataset.crop_size=null", f"dataset.root={data_dir / 'synthetic'}",
             "dataset.category=fabric", "dataset.calibration_fraction=0.1"]  # fmt: skip
    train = " ".join(anomaly_train(*QUIET, *mvtec, f"hydra.run.dir={tmp_path / 'run'}", "method=padim",
                                   "trainer=ddp", "trainer.devices=2"))  # fmt: skip
    script = f'[ "$SLURM_PROCID" = 0 ] && extra=dataset.root=/nonexistent; exec {train} $extra'
    start = time.monotonic()
    result = srun(tmp_path, "--ntasks-per-node=2", "--job-name=anomaly", "bash", "-c", script)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and time.monotonic() - start < 120, output[-3000:]
    assert_one_block(output, "Error: Data root /nonexistent does not exist")
    assert "Error: rank 1 stops because rank 0 failed: its error is above" in output


def test_srun_n_2_gets_the_layout_block_from_one_rank(slurm, data_dir, tmp_path):
    result = srun(tmp_path, "-n2", *anomaly_train(*SMALL, f"paths.data_dir={data_dir}", "method=padim",
                                                  "trainer=ddp", "trainer.devices=2"))  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert_one_block(output, "Error: SLURM started 2 tasks with --ntasks (-n) alone")
    assert "Checking fabric" not in output  # refused before any data is read
