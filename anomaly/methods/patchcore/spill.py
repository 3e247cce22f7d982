"""PatchCore's training patches kept on disk while they are collected, read back in blocks of rows.

A fit needs the full-width features ``[N, D]`` only twice: once to project them for the greedy coreset and
once to take the selected rows into the memory bank. Held in memory until then they cost N·D·4 bytes
(2.6 M WideResNet-50 patches at D = 1024: 10.6 GB); in a file they cost page cache, which the kernel writes
back and drops when memory runs short. Plain reads and writes, no memory map: the pages of a mapping count
as the process's resident memory, and written through the map they stay dirty until written back.
"""

import errno
import os
import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor

from anomaly.errors import FILE_SYSTEM_FIXES, FileSystemError
from anomaly.methods.patchcore.rows import column_sums

_BYTES_PER_VALUE = 4  # float32
_TAKE_BLOCK_ROWS = 8192  # rows read at a time by take(): 32 MB at D = 1024


class PatchSpill:
    """Rows ``[N, D]`` (float32) appended to a temporary file, with their float64 column sums.

    The file has no name (``tempfile.TemporaryFile``): it is gone once closed and when the process ends,
    after an error or a kill too. ``directory`` None: the system temp dir (``TMPDIR``). ``device``: the
    model's, where the projected points and the bank are made; a spill that never gets a row knows it too,
    so that a rank without training images can take part in the fit's collectives. A
    :class:`~anomaly.methods.patchcore.rows.PatchRows`.
    """

    def __init__(self, directory: str | None = None, device: torch.device | str = "cpu") -> None:
        self.directory = directory
        self.device = torch.device(device)
        self._file = None  # opened by the first append
        self._num_rows = 0
        self._sum = torch.zeros(0, dtype=torch.float64)  # [D]

    def __len__(self) -> int:
        return self._num_rows

    def __enter__(self) -> "PatchSpill":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def append(self, rows: Tensor) -> None:
        """Writes ``rows [n, D]`` after the rows so far (every append has the same D)."""
        rows = rows.detach().to("cpu", torch.float32).contiguous()
        if self._file is not None and rows.shape[1] != len(self._sum):
            raise ValueError(f"rows of width {rows.shape[1]} appended to a spill of width {len(self._sum)}")
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115 (closed by close())
                self._sum = torch.zeros(rows.shape[1], dtype=torch.float64)
            self._file.seek(0, os.SEEK_END)
            self._file.write(rows.numpy().data)
            self._file.flush()  # a full disk fails here, naming the spill, not at a later read
        except OSError as error:
            raise self._spill_error(error) from error
        self._sum += column_sums(rows)
        self._num_rows += len(rows)

    def _spill_error(self, error: OSError) -> OSError:
        """A folder the user can fix (missing, a file, no permission, full) as an error naming the spill
        folder and the setting that moves it; any other OS error as it is."""
        if error.errno not in {*FILE_SYSTEM_FIXES, errno.ENOENT, errno.ENOTDIR}:
            return error
        folder = self.directory or f"{tempfile.gettempdir()} (the system temp dir)"
        return FileSystemError(
            f"Cannot write PatchCore's temporary file of training patches (rows x D x 4 bytes) in {folder}: "
            f"{error.strerror or error}. Choose a folder with room that this user can write: "
            "paths.spill_dir=<folder> (anomaly-train), or TMPDIR=<folder> for the system temp dir."
        )

    def feature_sum(self) -> Tensor:
        """Column sums ``[D]`` (float64) of all rows; ``[0]`` while there are none."""
        return self._sum

    def blocks(self, rows: int) -> Iterator[Tensor]:
        """The rows in order, ``[<= rows, D]`` at a time (float32, on the CPU)."""
        dim = len(self._sum)
        for start in range(0, self._num_rows, rows):
            block = torch.empty(min(rows, self._num_rows - start), dim)
            self._file.seek(start * dim * _BYTES_PER_VALUE)
            if self._file.readinto(block.numpy().data) != block.numel() * _BYTES_PER_VALUE:
                raise OSError("the PatchCore spill file is shorter than what was written to it")
            yield block

    def take(self, indices: Tensor) -> Tensor:
        """The rows at ``indices [M]`` (int64, any order) as ``[M, D]``, in one pass over the file."""
        indices = indices.cpu()
        taken = torch.empty(len(indices), len(self._sum))
        if not len(indices):
            return taken
        if indices.min() < 0 or indices.max() >= self._num_rows:
            raise IndexError(
                f"row indices must be in [0, {self._num_rows}), got {indices.min()}..{indices.max()}"
            )
        starts = range(0, self._num_rows, _TAKE_BLOCK_ROWS)
        for start, block in zip(starts, self.blocks(_TAKE_BLOCK_ROWS), strict=True):
            inside = ((indices >= start) & (indices < start + len(block))).nonzero().squeeze(1)
            taken[inside] = block[indices[inside] - start]
        return taken

    def close(self) -> None:
        """Deletes the file (a closed spill holds no rows)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._num_rows = 0
        self._sum = torch.zeros(0, dtype=torch.float64)
