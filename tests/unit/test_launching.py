"""The SLURM task layout check, the launcher's ranks read from the environment, and the watchdog's rules
(two watchdogs on one in-memory store, in threads; their exit replaced by a record)."""

import threading
import time

import pytest
from omegaconf import OmegaConf
from torch.distributed import HashStore

from anomaly import watchdog as watchdog_module
from anomaly.cli import train as train_cli
from anomaly.errors import ConfigError
from anomaly.launching import Ranks, check_slurm_layout, external_ranks
from anomaly.watchdog import Watchdog

TWO_TASKS = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "anomaly",
             "SLURM_JOB_ID": "12", "SLURM_NNODES": "1", "SLURM_PROCID": "1",
             "SLURM_NODELIST": "vm"}  # fmt: skip


def test_a_matching_slurm_layout_passes_and_one_task_is_not_checked():
    check_slurm_layout(2, 1, run_dir_given=False, environ=TWO_TASKS)
    check_slurm_layout(1, 1, run_dir_given=False, environ={"SLURM_NTASKS": "1"})


@pytest.mark.parametrize(
    ("change", "devices", "message"),
    [
        ({"SLURM_NTASKS_PER_NODE": None}, 2, "give --ntasks-per-node"),
        ({"SLURM_JOB_NAME": "bash"}, 2, "srun --job-name=anomaly"),
        ({"SLURM_JOB_NAME": "interactive"}, 2, "srun --job-name=anomaly"),
        ({}, 1, "trainer.devices=1 × trainer.num_nodes=1"),
        ({"SLURM_NNODES": "2", "SLURM_NTASKS": "4"}, 2, None),  # 2 × 2 tasks, no run dir: refused below
    ],
)
def test_a_slurm_layout_that_is_not_one_run_is_refused_with_the_fix(change, devices, message):
    environ = {key: value for key, value in {**TWO_TASKS, **change}.items() if value is not None}
    num_nodes = int(environ["SLURM_NNODES"])
    with pytest.raises(ConfigError, match=message or "hydra.run.dir=<a folder on a shared file system>"):
        check_slurm_layout(devices, num_nodes, run_dir_given=False, environ=environ)
    if message is None:  # with the run dir given, the same layout is fine
        check_slurm_layout(devices, num_nodes, run_dir_given=True, environ=environ)


def test_the_ranks_come_from_torchrun_or_slurm_and_not_from_one_process():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", **TWO_TASKS}
    assert external_ranks(torchrun) == Ranks(1, 2, "torchrun")  # torchrun inside a SLURM job: torchrun's
    assert external_ranks(TWO_TASKS) == Ranks(1, 2, "slurm")
    assert external_ranks({"SLURM_NTASKS": "1", "LOCAL_RANK": "1"}) is None  # Lightning's own launcher
    assert Ranks(0, 2, "slurm").hosts_store and not Ranks(0, 2, "torchrun").hosts_store


@pytest.fixture
def fast_watchdogs(monkeypatch):
    """``make(world_size)``: one Watchdog per rank on one HashStore, beating every 50 ms; a watchdog that
    would end its process records its line (the first one per rank) in the returned dict and stops."""
    monkeypatch.setattr(watchdog_module, "BEAT_SECONDS", 0.05)
    monkeypatch.setattr(watchdog_module, "SILENT_SECONDS", 0.5)
    monkeypatch.setattr(watchdog_module, "GRACE_SECONDS", 0.5)
    ended: dict[int, str] = {}

    def end(self, reason: str) -> None:
        ended.setdefault(self.rank, reason)
        self._stop.set()  # its thread ends, as os._exit would end the process

    monkeypatch.setattr(Watchdog, "_end", end)

    def make(world_size: int) -> tuple[list[Watchdog], dict[int, str]]:
        store = HashStore()
        dogs = [Watchdog(store, rank, world_size, hosts_store=rank == 0) for rank in range(world_size)]
        for dog in dogs:
            dog.start()
        return dogs, ended

    return make


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_failed_rank_stops_the_others_and_only_the_first_failure_prints(fast_watchdogs):
    (_, one, two), ended = fast_watchdogs(3)
    assert one.fail() is True  # the first: it prints its error
    wait_for(lambda: len(ended) == 2)
    assert ended == {0: "rank 1 failed: its error is above", 2: "rank 1 failed: its error is above"}
    assert two.fail() is False  # a rank that fails later prints nothing


def test_a_silent_rank_is_named_and_ranks_that_finish_wait_for_each_other(fast_watchdogs):
    (_, one), ended = fast_watchdogs(2)
    one._stop.set()  # rank 1's beat stops, as after kill -9
    wait_for(lambda: ended)
    assert list(ended) == [0] and "rank 1 (pid" in ended[0] and "kill -9" in ended[0]

    (zero, one), ended = fast_watchdogs(2)
    ended.clear()
    finished = threading.Thread(target=zero.finish)
    finished.start()
    time.sleep(0.3)
    assert finished.is_alive()  # rank 0 (the store's host) waits for rank 1
    one.finish()
    finished.join(2)
    assert not finished.is_alive() and not ended


def test_a_second_run_in_one_launch_of_several_ranks_is_refused(monkeypatch):
    """A sweep's next job in the same torchrun/srun process would share the first run's watchdog store (its
    "failed" and "done" keys): refused with the fix; watchdog=false or one process runs it as before."""
    monkeypatch.setattr(train_cli, "_WATCHED_RUNS", [])
    monkeypatch.setattr(train_cli, "external_ranks", lambda: Ranks(0, 1, "torchrun"))
    monkeypatch.setattr(train_cli, "watchdog_store", lambda ranks, seconds: HashStore())
    cfg = OmegaConf.create({"trainer": {"devices": 1, "num_nodes": 1}, "watchdog": True})
    first = train_cli.start_watchdog(cfg, run_dir_given=True)
    first.finish()
    with pytest.raises(ConfigError, match=r"hydra/launcher=submitit_slurm .* or add watchdog=false"):
        train_cli.start_watchdog(cfg, run_dir_given=True)
    assert train_cli.start_watchdog(OmegaConf.merge(cfg, {"watchdog": False}), run_dir_given=True) is None
    monkeypatch.setattr(train_cli, "external_ranks", lambda: None)
    assert train_cli.start_watchdog(cfg, run_dir_given=True) is None
