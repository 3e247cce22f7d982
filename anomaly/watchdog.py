"""When one rank of a run stops, every rank stops: a small thread per rank on a store the ranks share.

Without it a rank that fails alone leaves the others waiting in their next collective (gloo notices a
closed connection, NCCL and a rank still computing do not), and srun or a second torchrun node keeps them
until the job's time limit. Each rank's thread beats (a counter in the store, every :data:`BEAT_SECONDS`)
and watches: a rank that failed sets the ``failed`` key (the first one to set it prints its error, the
others print nothing); a rank that sees it prints one line and exits with status 1; a rank whose beat
stopped for :data:`SILENT_SECONDS` (kill -9, the out-of-memory killer), or that never connected within
:data:`CONNECT_SECONDS`, is named in one line and every other rank exits. Installed by the CLI
(:func:`anomaly.cli.train.main`), never by library code: it ends the process with ``os._exit``.
"""

import os
import socket
import sys
import threading
import time

from torch.distributed import Store

BEAT_SECONDS = 1.0
SILENT_SECONDS = 15.0  # a rank whose beat has not moved for this long is dead
CONNECT_SECONDS = 90.0  # a rank that has not beaten once by then never started (or failed before the store)
GRACE_SECONDS = 5 * BEAT_SECONDS  # how long a failed rank waits for the others to see it (each beat)


class Watchdog:
    """One rank's side: :meth:`start` it, then :meth:`fail` on an error or :meth:`finish` at the end."""

    def __init__(self, store: Store, rank: int, world_size: int, hosts_store: bool) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.hosts_store = hosts_store  # the store lives in this process: it leaves last
        self._stop = threading.Event()
        self._finishing = threading.Event()  # this rank's work is done: a store that goes is no news
        self._thread = threading.Thread(target=self._watch, name="anomaly-watchdog", daemon=True)

    def start(self) -> None:
        self.store.set(f"who/{self.rank}", f"pid {os.getpid()} on {socket.gethostname()}")
        self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()

    def fail(self) -> bool:
        """Tells the other ranks that this one failed; True when this rank is the first (it prints the
        error; a later one prints nothing). The store's host waits until the others have seen it (at most
        :data:`GRACE_SECONDS`)."""
        self._stop.set()
        try:
            first = self.store.compare_set("failed", "", str(self.rank)).decode() == str(self.rank)
            if self.hosts_store:
                self._await_count("seen", self.world_size - 1)
        except RuntimeError:  # the store went with its host: the others learn it from that
            return True
        return first

    def finish(self) -> None:
        """This rank ended well; waits until every rank has (or one failed). The store's host then waits
        for the others to leave (at most :data:`GRACE_SECONDS`), so that none finds its store gone."""
        self._finishing.set()
        done = self.store.add("done", 1)
        while done < self.world_size:
            time.sleep(0.2)
            done = self.store.add("done", 0)
        self._stop.set()
        if self.hosts_store:
            self._await_count("left", self.world_size - 1)
        else:
            self._thread.join()  # its last look at the store is over before the host may leave
            self.store.add("left", 1)

    def _await_count(self, key: str, count: int) -> None:
        """Until the counter ``key`` reaches ``count``, at most :data:`GRACE_SECONDS`."""
        deadline = time.monotonic() + GRACE_SECONDS
        while self.store.add(key, 0) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def explain_peer_end(self) -> None:
        """Called when a collective failed because another rank's connection closed: gives this thread the
        time to name that rank (it exits the process), then says it more vaguely."""
        self._thread.join(SILENT_SECONDS + 5 * BEAT_SECONDS)
        self._end("another rank's connection closed: see its output")

    def _watch(self) -> None:
        started = time.monotonic()
        last_beat = {rank: (0, started) for rank in range(self.world_size) if rank != self.rank}
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check(["failed"]) and not self._stop.is_set():
                    rank = int(self.store.get("failed"))
                    self.store.add("seen", 1)
                    self._end(f"rank {rank} failed: its error is above")
                for rank, (beats, since) in last_beat.items():
                    now, count = time.monotonic(), self.store.add(f"beat/{rank}", 0)
                    if count != beats:
                        last_beat[rank] = (count, now)
                    elif count == 0 and now - started > CONNECT_SECONDS:
                        self._end(f"rank {rank} did not start within {CONNECT_SECONDS:.0f} s: see its output")
                    elif count and now - since > SILENT_SECONDS and not self._stop.is_set():
                        self._end(self._silent(rank))
            except RuntimeError:  # the store's host (rank 0 under SLURM, torchrun's agent) went
                if not self._stop.is_set() and not self._finishing.is_set():
                    self._end("rank 0 ended without a word (kill -9, out of memory?): its store went")
                return

    def _silent(self, rank: int) -> str:
        who = self.store.get(f"who/{rank}").decode()
        return (
            f"rank {rank} ({who}) stopped without a word for {SILENT_SECONDS:.0f} s: killed (kill -9, or out "
            "of memory: see dmesg or sacct for its signal)"
        )

    def _end(self, reason: str) -> None:
        print(f"Error: rank {self.rank} stops because {reason}", file=sys.stderr, flush=True)
        os._exit(1)
