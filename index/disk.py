"""DiskStorage: a KnnStore's keys and values in files appended window by window, read back by candidate.

A store directory holds, for each batch row ``b``, ``keys.{b}`` and ``values.{b}`` (token-major ``[n, H, d]``, the
raw bytes of the store dtype) and one ``journal``: a header (format, B, H, d, dtype) then one fixed-size record per
append with every row's start, count and the CRC-32 of the key and value bytes appended, closed by the record's own
CRC-32. RAM holds none of it: appends go through ``os.pwrite`` and sequential reads through ``os.pread`` (page cache,
not the process's resident set); candidate rows are gathered from read-only maps of the files, ``ram_budget`` bytes
of pages at a time (counting ``PAGE_COST`` per row), each batch's pages dropped again with ``madvise(MADV_DONTNEED)``, so the resident set stays
bounded while the kernel's page cache keeps what it can.

Crash safety: an append writes the data files first and its journal record last (one write), so a killed process
leaves a journal that ends at its last complete append; opening the directory drops a torn last record and cuts the
data files back to what the journal records. A record that fails its CRC before the last one, a record that does not
continue its row, or a data file shorter than the journal says are refused with ValueError. ``verify=True`` (the
default when opening) also checks every append's data CRC, reading every byte once; ``flush()`` fsyncs data, then
journal, then the directory (``Document.save`` does, ``close`` does), so after a power loss only appends since the
last flush can be lost, and those are caught by their CRCs.

Disk space: every append checks ``shutil.disk_usage`` first and raises OSError (ENOSPC) rather than fill the disk
(``DISK_HEADROOM`` is left free); ``reserve(n)`` checks at once for n tokens per row.
"""

import errno
import mmap
import os
import shutil
import struct
import tempfile
import weakref
import zlib

import numpy as np
import torch

MAGIC, VERSION = b"KNNSTOR1", 1
HEADER = struct.Struct("<8sIIIII16s")  # magic, version, batch, heads, head_dim, itemsize, dtype name
ROW = struct.Struct("<qqII")  # start, count, crc32 of key bytes, crc32 of value bytes
RECORD_MAGIC = 0x4B4E4E52
DISK_HEADROOM = 64 << 20  # bytes an append leaves free on the disk at least
PAGE_COST = 64 << 10  # resident bytes one gathered row may cost: a page plus the kernel's fault-around
NP_TYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # raw element bytes, reinterpreted by torch


class DiskStorage:
    """Append-only keys and values per batch row in the files of ``directory`` (see the module docstring).

    ``directory=None``: a fresh temporary directory, removed on ``close()`` or when the storage is collected. An
    existing store directory is opened (checked; ``verify`` also checks every data CRC) and continued; a directory
    holding anything else is refused.
    """

    def __init__(self, directory, batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype, device,
                 ram_budget_mib: int, verify: bool = True):
        self.shape = (batch_size, num_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.token_bytes = num_heads * head_dim * self.itemsize  # one token of one row, keys or values
        self.budget_rows = max(1, ram_budget_mib * 2**20 // PAGE_COST)
        self.temporary = directory is None
        if self.temporary:
            directory = tempfile.mkdtemp(prefix="knn_store-")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"directory {directory!r} is not a folder")
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise ValueError(f"directory {directory!r} is not writable")
        self.directory = directory
        self._fds, self._maps = {}, {}
        self._finalizer = weakref.finalize(self, _release, self._fds, self._maps,
                                           directory if self.temporary else None)
        if os.path.exists(self._path("journal")):
            self._open(verify)
        else:
            stray = [n for n in os.listdir(directory) if n == "journal" or n.split(".")[0] in ("keys", "values")]
            if stray:
                raise ValueError(f"directory {directory!r} holds store files {sorted(stray)} but no journal")
            self._create()

    # ---------------------------------------------------------------- files
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o666)
        return self._fds[name]

    def _data_names(self) -> list[str]:
        return [f"{kind}.{b}" for b in range(self.shape[0]) for kind in ("keys", "values")]

    def _header(self) -> bytes:
        B, H, d = self.shape
        return HEADER.pack(MAGIC, VERSION, B, H, d, self.itemsize, str(self.dtype).encode())

    def _create(self) -> None:
        self._unmap()
        for name in self._data_names():
            os.ftruncate(self._fd(name), 0)
        fd = self._fd("journal")
        os.ftruncate(fd, 0)
        _write_all(fd, self._header(), 0)
        self.sizes = [0] * self.shape[0]
        self._journal_end = HEADER.size

    def _open(self, verify: bool) -> None:
        journal = self._path("journal")
        with open(journal, "rb") as f:
            data = f.read()
        header = data[:HEADER.size]
        if len(header) < HEADER.size or HEADER.unpack(header)[:2] != (MAGIC, VERSION):
            raise ValueError(f"{journal!r} is not a knn_index store journal (format {VERSION})")
        B, H, d = self.shape
        if header != self._header():
            _, _, b, h, dd, _, name = HEADER.unpack(header)
            raise ValueError(f"{self.directory!r} holds a store of batch {b}, heads {h}, head_dim {dd}, dtype "
                             f"{name.rstrip(bytes(1)).decode(errors='replace')}; this store is batch {B}, heads {H}, "
                             f"head_dim {d}, dtype {self.dtype}")
        size = 4 + B * ROW.size + 4
        count, torn = divmod(len(data) - HEADER.size, size)
        sizes, records = [0] * B, []
        for i in range(count):
            rec = data[HEADER.size + i * size: HEADER.size + (i + 1) * size]
            ok = struct.unpack_from("<I", rec)[0] == RECORD_MAGIC and \
                struct.unpack_from("<I", rec, size - 4)[0] == zlib.crc32(rec[:-4])
            if not ok:
                if i == count - 1 and not torn:  # the last append's record was torn: drop that append
                    count -= 1
                    break
                raise ValueError(f"{journal!r}: record {i} of {count} is corrupted (checksum mismatch); the store "
                                 "cannot be trusted past it")
            rows = [ROW.unpack_from(rec, 4 + b * ROW.size) for b in range(B)]
            for b, (start, n, _, _) in enumerate(rows):
                if start != sizes[b] or n < 0:
                    raise ValueError(f"{journal!r}: record {i} appends row {b} at {start} (count {n}), but the row "
                                     f"holds {sizes[b]} tokens")
                sizes[b] += n
            records.append(rows)
        for b in range(B):
            for kind in ("keys", "values"):
                have = os.path.getsize(self._path(f"{kind}.{b}")) if os.path.exists(self._path(f"{kind}.{b}")) else 0
                if have < sizes[b] * self.token_bytes:
                    raise ValueError(f"{self._path(f'{kind}.{b}')!r} holds {have} bytes, but the journal records "
                                     f"{sizes[b]} tokens ({sizes[b] * self.token_bytes} bytes): data was lost")
        if verify:
            for i, rows in enumerate(records):
                for b, (start, n, crc_k, crc_v) in enumerate(rows):
                    for kind, crc in (("keys", crc_k), ("values", crc_v)):
                        if _crc_file(self._fd(f"{kind}.{b}"), start * self.token_bytes, n * self.token_bytes) != crc:
                            raise ValueError(f"{self._path(f'{kind}.{b}')!r}: tokens [{start}, {start + n}) of row "
                                             f"{b} fail their checksum (append {i}): corrupted")
        self.sizes = sizes
        self._journal_end = HEADER.size + count * size
        # a crash mid-append leaves bytes past what the journal records: cut them
        os.ftruncate(self._fd("journal"), self._journal_end)
        for b in range(B):
            for kind in ("keys", "values"):
                os.ftruncate(self._fd(f"{kind}.{b}"), sizes[b] * self.token_bytes)

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        self._create()

    def nbytes(self) -> int:
        """RAM held: none (the files and the page cache are not this process's)."""
        return 0

    def disk_nbytes(self) -> int:
        """Bytes of this storage's files."""
        return sum(os.fstat(self._fd(name)).st_size for name in self._data_names() + ["journal"])

    def journal_sha256(self) -> str:
        """SHA-256 of the journal, which records the CRC of every byte appended."""
        import hashlib

        return hashlib.sha256(os.pread(self._fd("journal"), self._journal_end, 0)).hexdigest()

    def flush(self) -> None:
        """fsync the data files, then the journal, then the directory."""
        for name in self._data_names() + ["journal"]:
            os.fsync(self._fd(name))
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Flush, close the files and, for a temporary directory, remove it. The storage is unusable afterwards."""
        if self._fds and not self.temporary:
            self.flush()
        self._finalizer()

    # ---------------------------------------------------------------- append
    def check_space(self, nbytes: int) -> None:
        """Raise OSError (ENOSPC) unless ``nbytes`` can be written leaving DISK_HEADROOM free."""
        free = shutil.disk_usage(self.directory).free
        if nbytes + DISK_HEADROOM > free:
            raise OSError(errno.ENOSPC, f"the kNN memory needs {nbytes / 2**20:.1f} MiB more on disk and "
                                        f"{DISK_HEADROOM >> 20} MiB must stay free, but {free / 2**20:.1f} MiB are "
                                        f"free; free space or choose another directory", self.directory)

    def reserve(self, needed: int) -> None:
        """Check the disk has room for every row to grow to ``needed`` tokens."""
        more = sum(max(0, needed - n) for n in self.sizes) * 2 * self.token_bytes
        if more:
            self.check_space(more)

    def append_all(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [B, H, T, d] to every row."""
        self.append_rows([(keys[b], values[b]) for b in range(self.shape[0])])

    def append_row(self, b: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [H, n, d] to row ``b``."""
        rows = [None] * self.shape[0]
        rows[b] = (keys, values)
        self.append_rows(rows)

    def append_rows(self, rows: list) -> None:
        """Append (keys, values) [H, n_b, d] (or None) to each row b, as one journal record."""
        blobs = [None if r is None else tuple(_token_major(t) for t in r) for r in rows]
        self.check_space(sum(len(k) + len(v) for k, v in filter(None, blobs)))
        entries = []
        for b, blob in enumerate(blobs):
            start, n = self.sizes[b], 0 if blob is None else len(blob[0]) // self.token_bytes
            crcs = [0, 0]
            if n:
                for j, (kind, data) in enumerate(zip(("keys", "values"), blob)):
                    _write_all(self._fd(f"{kind}.{b}"), data, start * self.token_bytes)
                    crcs[j] = zlib.crc32(data)
            entries.append(ROW.pack(start, n, *crcs))
        record = struct.pack("<I", RECORD_MAGIC) + b"".join(entries)
        record += struct.pack("<I", zlib.crc32(record))
        _write_all(self._fd("journal"), record, self._journal_end)
        self._journal_end += len(record)
        self.sizes = [s + (0 if blob is None else len(blob[0]) // self.token_bytes) for s, blob in zip(self.sizes, blobs)]

    # ---------------------------------------------------------------- read
    def read(self, name: str, b: int, start: int, stop: int) -> torch.Tensor:
        """Row ``b``'s ``name`` ("keys" or "values"), positions [start, stop), as [H, n, d] on the CPU."""
        B, H, d = self.shape
        n = max(0, stop - start)
        data = bytearray(n * self.token_bytes)
        if n:
            got = os.preadv(self._fd(f"{name}.{b}"), [data], start * self.token_bytes)
            if got != len(data):
                raise OSError(errno.EIO, f"short read of tokens [{start}, {stop}) of row {b}", self._path(name))
        return torch.frombuffer(data, dtype=self.dtype).view(n, H, d).transpose(0, 1) if n else \
            torch.empty(H, 0, d, dtype=self.dtype)

    def float_keys(self, b: int, start: int, stop: int) -> np.ndarray:
        """Stored keys of row ``b``, positions [start, stop), as float32 numpy [H, n, d]."""
        return self.read("keys", b, start, stop).to(torch.float32).contiguous().numpy()

    def entries(self, heads, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, h, n, d] of ``heads`` read from the files (zeros past a shorter row's end)."""
        out = []
        for name in ("keys", "values"):
            rows = [self.read(name, b, 0, self.sizes[b])[heads] for b in range(self.shape[0])]
            full = torch.zeros(len(rows), rows[0].shape[0], n, self.shape[2], dtype=self.dtype)
            for b, r in enumerate(rows):
                full[b, :, :r.shape[1]] = r
            out.append(full.to(self.device))
        return out[0], out[1]

    def scan_keys(self, rows: list[int], heads, n: int) -> "_ScanView":
        """Keys of ``rows`` and ``heads`` up to ``n`` for ``exact_topk``: sliced on the token axis, read chunk by
        chunk."""
        return _ScanView(self, rows, heads)

    def take(self, name: str, ids: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """Rows of ``name`` at ids [B, h, Q, K] (>= 0) for storage heads ``heads``: [B, h, Q, K, d].

        Reads them from a read-only map of the file, ``ram_budget`` worth of rows at a time, dropping the mapped
        pages after each batch (a repeated id is read again, from the page cache)."""
        B, H, d = self.shape
        ids_np = ids.cpu().numpy()
        out = np.empty((*ids_np.shape, d), dtype=NP_TYPES[self.itemsize])
        for b in range(B):
            if self.sizes[b] == 0:
                out[b] = 0
                continue
            flat = (ids_np[b] * H + np.asarray(heads, dtype=np.int64)[:, None, None]).reshape(-1)
            dst = out[b].reshape(-1, d)
            mm = self._map(f"{name}.{b}", self.sizes[b])
            table = np.frombuffer(mm, dtype=out.dtype, count=self.sizes[b] * H * d).reshape(-1, d)
            try:
                for s in range(0, len(flat), self.budget_rows):
                    np.take(table, flat[s:s + self.budget_rows], axis=0, out=dst[s:s + self.budget_rows])
                    mm.madvise(mmap.MADV_DONTNEED)
            finally:
                del table
        return torch.from_numpy(out).view(self.dtype).to(self.device)

    def _map(self, name: str, tokens: int) -> mmap.mmap:
        """A read-only map of ``name`` covering at least ``tokens`` tokens (remapped as the file grows)."""
        length = tokens * self.token_bytes
        mm = self._maps.get(name)
        if mm is None or len(mm) < length:
            if mm is not None:
                mm.close()
            mm = mmap.mmap(self._fd(name), length, mmap.MAP_SHARED, mmap.PROT_READ)
            mm.madvise(mmap.MADV_RANDOM)
            self._maps[name] = mm
        return mm

    def _unmap(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()


class _ScanView:
    """``keys[:, :, start:stop]`` of a DiskStorage for ``exact_topk``: [rows, h, stop - start, d], read on demand."""

    def __init__(self, storage: DiskStorage, rows: list[int], heads):
        self.storage, self.rows, self.heads = storage, rows, heads

    def __getitem__(self, index) -> torch.Tensor:
        tokens = index[2]
        st, d = self.storage, self.storage.shape[2]
        parts = []
        for b in self.rows:
            stop = min(tokens.stop, st.sizes[b])
            part = st.read("keys", b, tokens.start, stop)[self.heads]
            if part.shape[1] < tokens.stop - tokens.start:  # past a shorter row's end: zeros (masked by sizes)
                part = torch.cat([part, part.new_zeros(part.shape[0], tokens.stop - tokens.start - part.shape[1], d)], 1)
            parts.append(part)
        return torch.stack(parts).to(st.device)


def _token_major(t: torch.Tensor) -> bytes:
    """[H, n, d] -> the bytes of [n, H, d]."""
    t = t.detach().to("cpu").transpose(0, 1).contiguous()
    return t.view(-1).view(torch.uint8).numpy().tobytes()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _crc_file(fd: int, offset: int, length: int, piece: int = 16 << 20) -> int:
    crc = 0
    for start in range(offset, offset + length, piece):
        data = os.pread(fd, min(piece, offset + length - start), start)
        if not data:
            break
        crc = zlib.crc32(data, crc)
    return crc


def _release(fds: dict, maps: dict, temporary: str | None) -> None:
    for mm in maps.values():
        mm.close()
    maps.clear()
    for fd in fds.values():
        os.close(fd)
    fds.clear()
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)
