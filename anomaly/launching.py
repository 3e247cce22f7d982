"""Who started this process: the ranks that torchrun or SLURM start exist before any process group.

:func:`external_ranks` reads the launcher's environment (this rank, how many); :func:`check_slurm_layout`
refuses a SLURM task layout that Lightning would not run as one run, before any data is read;
:func:`watchdog_store` opens the small key-value store that the ranks' watchdogs share
(:mod:`anomaly.watchdog`). Lightning's own launcher starts its further ranks only when fitting starts, so
it is not one of these (its ranks see each other go through the process group's connections).
"""

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from lightning_fabric.plugins.environments import SLURMEnvironment
from torch.distributed import PrefixStore, Store, TCPStore

from anomaly.errors import ConfigError

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning does not treat these jobs as SLURM
SLURM_STORE_PORTS = 25000  # + the job id's last 4 digits: Lightning's own ports are 15000 + the same


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run that an outside launcher started."""

    rank: int
    world_size: int
    launcher: str  # "torchrun" or "slurm"

    @property
    def hosts_store(self) -> bool:
        """Whether :func:`watchdog_store` serves the store from this process (rank 0 under SLURM)."""
        return self.launcher == "slurm" and self.rank == 0


def external_ranks(environ: Mapping[str, str] = os.environ) -> Ranks | None:
    """This process's rank when torchrun or SLURM started several; None for one process (or Lightning's
    own launcher, whose further ranks do not exist yet)."""
    if "TORCHELASTIC_RUN_ID" in environ and int(environ.get("WORLD_SIZE") or 1) > 1:
        return Ranks(int(environ["RANK"]), int(environ["WORLD_SIZE"]), "torchrun")
    if int(environ.get("SLURM_NTASKS") or 1) > 1 and "TORCHELASTIC_RUN_ID" not in environ:
        return Ranks(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), "slurm")
    return None


def check_slurm_layout(
    devices: object, num_nodes: object, run_dir_given: bool, environ: Mapping[str, str] = os.environ
) -> None:
    """Refuses SLURM tasks that would not make one run of ``devices`` × ``num_nodes`` processes (a
    ConfigError with the fix): every rank raises it, rank 0 prints it, before any data is read."""
    tasks = int(environ.get("SLURM_NTASKS") or 1)
    if tasks == 1 or "TORCHELASTIC_RUN_ID" in environ:
        return
    if "SLURM_NTASKS_PER_NODE" not in environ:
        raise ConfigError(
            f"SLURM started {tasks} tasks with --ntasks (-n) alone, which Lightning refuses: give "
            f"--ntasks-per-node instead (srun -N <nodes> --ntasks-per-node=<trainer.devices> ...)."
        )
    if environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        raise ConfigError(
            f"this SLURM job is named {environ['SLURM_JOB_NAME']!r}, which Lightning takes for no SLURM job: "
            f"each of its {tasks} tasks would start a run of its own in one run dir. Name the job: "
            "srun --job-name=anomaly ... (or sbatch --job-name)."
        )
    expected = devices * num_nodes if isinstance(devices, int) and isinstance(num_nodes, int) else None
    if expected != tasks:
        raise ConfigError(
            f"SLURM started {tasks} tasks, but trainer.devices={devices} × trainer.num_nodes={num_nodes} "
            f"processes make the run: pass trainer=ddp trainer.devices=<tasks per node> "
            f"trainer.num_nodes=<nodes> (here {tasks} tasks in all), or srun that many tasks."
        )
    if int(environ.get("SLURM_NNODES") or 1) > 1 and not run_dir_given:
        raise ConfigError(
            "several SLURM nodes start this run, and each would name its own run dir from its clock: pass "
            "hydra.run.dir=<a folder on a shared file system>."
        )


def watchdog_store(ranks: Ranks, connect_seconds: float, environ: Mapping[str, str] = os.environ) -> Store:
    """The store the watchdogs share, made before any process group: torchrun's agent store (it outlives
    the workers), or under SLURM one that rank 0 hosts on rank 0's node. A rank that cannot reach it within
    ``connect_seconds`` raises (rank 0 never got that far)."""
    timeout = timedelta(seconds=connect_seconds)
    if ranks.launcher == "torchrun":
        address, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
        store = TCPStore(address, port, is_master=False, timeout=timeout)
        attempt = f"{environ['TORCHELASTIC_RUN_ID']}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return PrefixStore(f"anomaly-watchdog/{attempt}/", store)
    host = SLURMEnvironment.resolve_root_node_address(environ["SLURM_NODELIST"])
    port = SLURM_STORE_PORTS + int(environ["SLURM_JOB_ID"][-4:])
    if not ranks.hosts_store:  # TCPStore's own connect retries past its timeout: wait for the port here
        _await_listening(host, port, connect_seconds)
    store = TCPStore(host, port, ranks.world_size, is_master=ranks.rank == 0, timeout=timeout,
                     wait_for_workers=False)  # fmt: skip
    return PrefixStore(f"anomaly-watchdog/{environ.get('SLURM_STEP_ID', '0')}/", store)


def _await_listening(host: str, port: int, seconds: float) -> None:
    """Until ``host:port`` accepts a connection; TimeoutError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {seconds:.0f} s") from error
            time.sleep(0.5)
