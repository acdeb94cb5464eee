"""qcow2 disk images (versions 2 and 3), per QEMU's docs/interop/qcow2.txt.

What is implemented, by the spec's section names:

* Header and header extensions: the v2 and v3 headers, incompatible /
  compatible / autoclear feature bits, the backing file format name and
  the feature name table (used to name an unknown incompatible bit in the
  error).  Unsupported: encryption, external data files, extended L2
  entries (subclusters), zstd compression; an image using one is refused.
* Cluster mapping: the L1 table (in memory, capped) and L2 tables (an LRU
  cache, capped); standard, zero (v3, plain and preallocated) and
  compressed clusters (zlib raw deflate, read only: a write to one copies it
  into a new standard cluster).  Unallocated clusters read from the backing
  file, or as zeros past its end or without one.
* Host cluster management: refcount table (in memory, capped) and refcount
  blocks (LRU cache), every refcount_order from 0 (1 bit) to 6 (64 bits);
  allocation reuses freed clusters before growing the file; the refcount
  table grows by writing a new refcount structure and switching the header.
* Internal snapshots: an image with some is read (the active L1) but not
  written.  The dirty bit: a read-only open ignores it; a writable open
  rebuilds the refcounts from the L1/L2 tables, then clears it.  The
  corrupt bit: read-only opens only.  Unknown autoclear bits are cleared
  by a writable open, as the spec requires.

Write ordering, so that the image is consistent whenever the process dies.
Guest data goes straight to the file; metadata changes collect in memory
and reach the file at ``flush()`` (or when a cache entry is evicted) in
the order QEMU uses (its cache dependencies in block/qcow2-cache.c):

1. refcount blocks (increments), then refcount table entries; fsync;
2. L2 tables; fsync; L1 entries; fsync;
3. refcount decrements of clusters the L2/L1 writes stopped using; fsync.
   Only then may a freed cluster be allocated again.

A reference is therefore never on disk before the cluster's refcount and
its data, and a refcount never drops before the last reference to it is
gone: a crash at any point leaves at worst leaked clusters (refcount 1,
unused), which ``qemu-img check`` reports as harmless and ``repair()``
frees.

Every offset read from the file is checked against the file before use;
every table lives in a cache whose size is capped by ``Limits``.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import DEFAULT_LIMITS, QCOW2_MAGIC, SECTOR, BlockImage, ImageError, Limits, open_image

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x1FF

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21             # QEMU's implementation limit, 2 MiB
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes
_V3_FIELDS = struct.Struct(">QQQII")               # bytes 72..103
V3_HEADER_LENGTH = 112                             # with compression_type and padding, as QEMU writes
_MAX_PENDING_FREES = 4096
_MAX_SCAN_CLUSTERS = 1 << 24
_BIG = sys.byteorder == "little"

_FEATURE_NAMES = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
)
_UNSUPPORTED = {INCOMPAT_DATA_FILE: "an external data file", INCOMPAT_COMPRESSION: "zstd compression",
                INCOMPAT_EXTL2: "extended L2 entries (subclusters)"}


def _be_array(typecode: str, raw: bytes) -> array:
    a = array(typecode)
    a.frombytes(raw)
    if _BIG and a.itemsize > 1:
        a.byteswap()
    return a


def _be_bytes(a: array) -> bytes:
    if _BIG and a.itemsize > 1:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


_ORDER_TYPECODE = {3: "B", 4: "H", 5: "I", 6: "Q"}


class _RefBlock:
    """One refcount block: ``entries`` counts of ``1 << order`` bits each.

    Widths of a byte or more live in an array of that width; narrower ones
    in a bytearray, entry 0 in the least significant bits of byte 0."""

    __slots__ = ("data", "order")

    def __init__(self, order: int, raw: bytes):
        self.order = order
        tc = _ORDER_TYPECODE.get(order)
        self.data: array | bytearray = _be_array(tc, raw) if tc else bytearray(raw)

    def get(self, i: int) -> int:
        if self.order >= 3:
            return self.data[i]
        bits = 1 << self.order
        pos = i * bits
        return (self.data[pos >> 3] >> (pos & 7)) & ((1 << bits) - 1)

    def set(self, i: int, value: int) -> None:
        if self.order >= 3:
            self.data[i] = value
            return
        bits = 1 << self.order
        pos = i * bits
        mask = ((1 << bits) - 1) << (pos & 7)
        b = self.data[pos >> 3]
        self.data[pos >> 3] = (b & ~mask) | ((value << (pos & 7)) & mask)

    def find_zero(self, start: int, entries: int) -> int:
        if self.order >= 3:
            try:
                return self.data.index(0, start)
            except ValueError:
                return -1
        for i in range(start, entries):
            if self.get(i) == 0:
                return i
        return -1

    def to_bytes(self) -> bytes:
        return _be_bytes(self.data) if self.order >= 3 else bytes(self.data)


@dataclass
class Header:
    """The fixed part of a qcow2 header, v2 fields first, v3 fields after."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_name: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        out = _V2_HEADER.pack(QCOW2_MAGIC, self.version, self.backing_file_offset,
                              self.backing_file_size, self.cluster_bits, self.size, self.crypt_method,
                              self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                              self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            out += _V3_FIELDS.pack(self.incompatible_features, self.compatible_features,
                                   self.autoclear_features, self.refcount_order, self.header_length)
            out += bytes([self.compression_type]) + bytes(self.header_length - len(out) - 1)
        return out


def parse_header(buf: bytes, path: str, file_size: int, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and check a qcow2 header from the start of the file (its first
    cluster, or all of the file if shorter).  Every field that later code
    trusts is checked here, against the file size and the ``limits``."""
    def bad(why: str) -> ImageError:
        return ImageError(f"{path}: {why}")

    if len(buf) < _V2_HEADER.size:
        raise bad(f"truncated qcow2 header ({len(buf)} of {_V2_HEADER.size} bytes)")
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = _V2_HEADER.unpack_from(buf)
    if magic != QCOW2_MAGIC:
        raise bad("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise bad(f"unsupported qcow2 version {version} (2 and 3 are supported)")
    h = Header(version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
               nb_snap, snap_off)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"unsupported cluster size 2^{cluster_bits} (512 B to 2 MiB)")
    cs = 1 << cluster_bits
    if version >= 3:
        if len(buf) < _V2_HEADER.size + _V3_FIELDS.size:
            raise bad(f"truncated qcow2 v3 header ({len(buf)} of 104 bytes)")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _V3_FIELDS.unpack_from(buf, _V2_HEADER.size)
        if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
            raise bad(f"bad header length {h.header_length} (a multiple of 8, 104 to the cluster size)")
        if len(buf) < h.header_length:
            raise bad(f"truncated qcow2 header ({len(buf)} of {h.header_length} bytes)")
        if h.header_length > 104:
            h.compression_type = buf[104]
        if h.refcount_order > 6:
            raise bad(f"refcount order {h.refcount_order} is above 6 (64-bit refcounts)")
    ext_end = min(bfo if 0 < bfo < cs else cs, len(buf))
    _parse_extensions(h, buf, ext_end, bad)

    unknown = h.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                                          | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
    if unknown:
        names = [h.feature_names.get((0, b), f"bit {b}") for b in range(64) if unknown >> b & 1]
        raise bad(f"unsupported incompatible feature: {', '.join(names)}")
    for bit, what in _UNSUPPORTED.items():
        if h.incompatible_features & bit:
            raise bad(f"the image uses {what}, which is not supported")
    if h.compression_type != 0:
        raise bad(f"compression type {h.compression_type} without its incompatible bit")
    if crypt:
        raise bad(f"encrypted images are not supported (crypt_method {crypt})")
    if size > limits.max_size:
        raise bad(f"virtual size {size} is larger than the {limits.max_size}-byte cap on disk images")
    l2_coverage = cs * (cs // 8)
    if l1_size * 8 > limits.max_l1_bytes:
        raise bad(f"L1 table of {l1_size} entries is larger than the {limits.max_l1_bytes}-byte cap")
    if l1_size < _div_up(size, l2_coverage):
        raise bad(f"L1 table of {l1_size} entries is too small for the virtual size {size}")
    if l1_size and (l1_off % cs or l1_off == 0 or l1_off + l1_size * 8 > file_size):
        raise bad(f"L1 table at {l1_off:#x} (+{l1_size * 8:#x}) is misaligned or outside the "
                  f"{file_size:#x}-byte file")
    if rt_clusters == 0 or rt_clusters * cs > limits.max_refcount_table_bytes:
        raise bad(f"refcount table of {rt_clusters} clusters (1 to "
                  f"{limits.max_refcount_table_bytes // cs} allowed)")
    if rt_off % cs or rt_off == 0 or rt_off >= file_size:
        raise bad(f"refcount table at {rt_off:#x} is misaligned or outside the {file_size:#x}-byte file")
    if nb_snap > MAX_SNAPSHOTS:
        raise bad(f"{nb_snap} snapshots is more than {MAX_SNAPSHOTS}")
    if nb_snap and (snap_off % cs or snap_off >= file_size):
        raise bad(f"snapshot table at {snap_off:#x} is misaligned or outside the file")
    if bfo:
        if bfs == 0 or bfs > MAX_BACKING_NAME:
            raise bad(f"backing file name of {bfs} bytes (1 to {MAX_BACKING_NAME} allowed)")
        if bfo + bfs > cs or bfo + bfs > len(buf):
            raise bad(f"backing file name at {bfo:#x} (+{bfs}) is outside the first cluster or the file")
        h.backing_name = buf[bfo:bfo + bfs].decode("utf-8", "surrogateescape")
    return h


def _parse_extensions(h: Header, buf: bytes, end: int, bad: Callable[[str], ImageError]) -> None:
    pos = h.header_length if h.version >= 3 else _V2_HEADER.size
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", buf, pos)
        if kind == EXT_END:
            return
        data_end = pos + 8 + length
        if data_end > end:
            raise bad(f"header extension {kind:#x} at {pos:#x} (+{length}) overflows the header area")
        data = buf[pos + 8:data_end]
        h.extensions.append(kind)
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(data[i], data[i + 1])] = name
        pos = data_end + (-length % 8)


@dataclass
class CheckResult:
    """What ``Qcow2Image.check()`` found: like ``qemu-img check``, corruptions
    are errors that lose data; leaks only waste space."""

    corruptions: list[str] = field(default_factory=list)
    leaks: int = 0
    allocated_clusters: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


class Qcow2Image(BlockImage):
    format = "qcow2"

    def __init__(self, fd: int, path: str, writable: bool, limits: Limits = DEFAULT_LIMITS,
                 open_backing: Callable[[str, str | None], BlockImage] | None = None):
        self.path = path
        self.writable = writable
        self.limits = limits
        self._fd = fd
        self.backing: BlockImage | None = None
        self._file_size = os.fstat(fd).st_size
        head = os.pread(fd, 1 << MAX_CLUSTER_BITS, 0)
        if len(head) >= 24:
            cb = struct.unpack_from(">I", head, 20)[0]
            if MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
                head = head[:1 << cb]
        h = self.header = parse_header(head, path, self._file_size, limits)
        self.version = h.version
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self._cmask = cs - 1
        self.size = h.size
        self._l2_bits = cb - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self.refcount_order = h.refcount_order
        self._rb_bits = cb + 3 - h.refcount_order
        self._rb_entries = 1 << self._rb_bits
        self._refcount_max = (1 << (1 << h.refcount_order)) - 1
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._l1_offset = h.l1_table_offset
        self._rt_offset = h.refcount_table_offset
        self._rt_clusters = h.refcount_table_clusters

        if writable:
            if h.incompatible_features & INCOMPAT_CORRUPT:
                raise ImageError(f"{path}: the image is marked corrupt; open it read-only, or repair "
                                 f"it with qemu-img check -r all")
            if h.nb_snapshots:
                raise ImageError(f"{path}: images with internal snapshots can be opened read-only only")

        self._l1 = self._read_table(self._l1_offset, h.l1_size * 8)
        for i, e in enumerate(self._l1):
            if e:
                self._check_table_entry(e & OFFSET_MASK, e & L1E_RESERVED, f"L1 entry {i}")
        self._rt = self._read_table(self._rt_offset, self._rt_clusters * cs)
        for i, e in enumerate(self._rt):
            if e:
                self._check_table_entry(e & ~REFT_RESERVED, e & REFT_RESERVED, f"refcount table entry {i}")

        cache_tables = max(4, limits.cache_bytes // cs // 2)
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_cap = cache_tables
        self._rb_cache: OrderedDict[int, _RefBlock] = OrderedDict()
        self._rb_dirty: set[int] = set()
        self._rb_cap = cache_tables
        self._l1_dirty: set[int] = set()
        self._rt_dirty: set[int] = set()
        self._pending_free: list[tuple[int, int]] = []
        self._free_cursor = 1
        self._file_end = _div_up(self._file_size, cs) * cs
        self._unsynced = False
        self._compressed_cache: tuple[int, bytes] | None = None
        self._closed = False

        try:
            if h.backing_name is not None:
                self._open_backing(h, open_backing)
            if writable:
                self._prepare_for_writing()
        except BaseException:
            if self.backing is not None:
                self.backing.close()
            raise

    # -- opening -------------------------------------------------------------------

    def _open_backing(self, h: Header, open_backing: Callable[[str, str | None], BlockImage] | None) -> None:
        fmt = h.backing_format
        if fmt not in (None, "raw", "qcow2"):
            raise ImageError(f"{self.path}: backing file format {fmt!r} is not supported")
        name = h.backing_name or ""
        if not os.path.isabs(name):
            name = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        opener = open_backing or (lambda p, f: open_image(p, False, f, limits=self.limits))
        try:
            self.backing = opener(name, fmt)
        except ImageError as e:
            raise ImageError(f"{self.path}: backing file: {e}") from None

    def _prepare_for_writing(self) -> None:
        h = self.header
        if h.autoclear_features:
            # The spec lets a writer that does not know an autoclear feature
            # write only once it has cleared the bit (the bitmaps it guards
            # will then be seen as stale, which they would be).
            os.pwrite(self._fd, struct.pack(">Q", 0), 88)
            os.fsync(self._fd)
            h.autoclear_features = 0
        if h.incompatible_features & INCOMPAT_DIRTY:
            if EXT_BITMAPS in h.extensions:
                raise ImageError(f"{self.path}: dirty image with bitmaps: repair it with qemu-img check -r all")
            self._rebuild_refcounts(self._scan_references(count_refcount_structure=False))
            h.incompatible_features &= ~INCOMPAT_DIRTY
            os.pwrite(self._fd, struct.pack(">Q", h.incompatible_features), 72)
            os.fsync(self._fd)

    def _read_table(self, offset: int, nbytes: int) -> array:
        raw = self._pread(offset, nbytes)
        return _be_array("Q", raw)

    def _check_table_entry(self, off: int, reserved_bits: int, what: str) -> None:
        """A pointer to an L2 table or a refcount block must be a cluster
        that starts inside the file, with no reserved bits set."""
        if reserved_bits:
            raise ImageError(f"{self.path}: corrupt {what}: reserved bits {reserved_bits:#x} set")
        if off & self._cmask or off == 0 or off >= self._file_size:
            raise ImageError(f"{self.path}: corrupt {what}: table at {off:#x} is misaligned or outside "
                             f"the {self._file_size:#x}-byte file")

    # -- low-level file access -----------------------------------------------------

    def _pread(self, offset: int, n: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) < n:           # past the end of the file reads as zeros, as in QEMU
            data += bytes(n - len(data))
        return data

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
        self._file_size = max(self._file_size, offset)
        self._unsynced = True

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = False

    def _sync_if_written(self) -> None:
        if self._unsynced:
            self._sync()

    # -- L2 tables -------------------------------------------------------------------

    def _l2_table(self, l2_offset: int) -> array:
        t = self._l2_cache.get(l2_offset)
        if t is not None:
            self._l2_cache.move_to_end(l2_offset)
            return t
        t = self._read_table(l2_offset, self.cluster_size)
        self._cache_insert(self._l2_cache, l2_offset, t, self._l2_cap, self._evict_l2)
        return t

    def _cache_insert(self, cache: OrderedDict, key: int, value: object, cap: int,
                      evict: Callable[[int, object], None]) -> None:
        while len(cache) >= cap:
            old_key, old = cache.popitem(last=False)
            evict(old_key, old)
        cache[key] = value

    def _evict_l2(self, l2_offset: int, table: array) -> None:
        if l2_offset in self._l2_dirty:
            # The table may point at clusters whose refcounts and data are
            # still only in memory or the page cache: those first.
            self._writeback_refcounts()
            self._sync()
            self._pwrite(l2_offset, _be_bytes(table))
            self._l2_dirty.discard(l2_offset)

    def _l2_entry(self, gc: int) -> int:
        l2_offset = self._l1[gc >> self._l2_bits] & OFFSET_MASK
        if not l2_offset:
            return 0
        t = self._l2_cache.get(l2_offset)
        if t is None:
            t = self._l2_table(l2_offset)
        return t[gc & self._l2_mask]

    def _l2_for_write(self, gc: int) -> int:
        """The L2 table's offset for guest cluster ``gc``, made writable:
        allocated if missing, its COPIED flag checked against its refcount."""
        i = gc >> self._l2_bits
        e = self._l1[i]
        l2_offset = e & OFFSET_MASK
        if not l2_offset:
            l2_offset = self._alloc_cluster()
            t = array("Q", bytes(self.cluster_size))
            self._cache_insert(self._l2_cache, l2_offset, t, self._l2_cap, self._evict_l2)
            self._l2_dirty.add(l2_offset)
            self._set_l1(i, l2_offset | OFLAG_COPIED)
        elif not e & OFLAG_COPIED:
            rc = self._refcount(l2_offset >> self.cluster_bits)
            if rc != 1:
                raise ImageError(f"{self.path}: corrupt: L2 table at {l2_offset:#x} has refcount {rc}")
            self._set_l1(i, e | OFLAG_COPIED)
        return l2_offset

    def _set_l1(self, i: int, value: int) -> None:
        self._l1[i] = value
        self._l1_dirty.add(i)

    def _set_l2(self, l2_offset: int, gc: int, value: int) -> None:
        self._l2_table(l2_offset)[gc & self._l2_mask] = value
        self._l2_dirty.add(l2_offset)

    # -- refcounts -------------------------------------------------------------------

    def _refblock(self, bi: int) -> _RefBlock | None:
        b = self._rb_cache.get(bi)
        if b is not None:
            self._rb_cache.move_to_end(bi)
            return b
        if bi >= len(self._rt) or not self._rt[bi]:
            return None
        off = self._rt[bi] & ~REFT_RESERVED
        b = _RefBlock(self.refcount_order, self._pread(off, self.cluster_size))
        self._cache_insert(self._rb_cache, bi, b, self._rb_cap, self._evict_refblock)
        return b

    def _evict_refblock(self, bi: int, block: _RefBlock) -> None:
        if bi in self._rb_dirty:
            self._pwrite(self._rt[bi], block.to_bytes())
            self._rb_dirty.discard(bi)

    def _refcount(self, index: int) -> int:
        b = self._refblock(index >> self._rb_bits)
        return b.get(index & (self._rb_entries - 1)) if b is not None else 0

    def _add_refcount(self, index: int, delta: int) -> int:
        bi = index >> self._rb_bits
        b = self._refblock(bi)
        old = b.get(index & (self._rb_entries - 1)) if b is not None else 0
        new = old + delta
        if b is None or not 0 <= new <= self._refcount_max:
            raise ImageError(f"{self.path}: corrupt: refcount of cluster {index:#x} would go from "
                             f"{old} to {new}")
        b.set(index & (self._rb_entries - 1), new)
        self._rb_dirty.add(bi)
        return new

    def _find_free(self, index: int) -> int:
        mask = self._rb_entries - 1
        while True:
            bi = index >> self._rb_bits
            b = self._refblock(bi)
            if b is None:
                return index
            j = b.find_zero(index & mask, self._rb_entries)
            if j >= 0:
                return (bi << self._rb_bits) + j
            index = (bi + 1) << self._rb_bits

    def _metadata_clusters(self, index: int) -> bool:
        """True if ``index`` holds the header or an L1/refcount table: a
        refcount of zero there means a corrupt image, and allocating it would
        destroy the image (QEMU's overlap check, for the fixed structures)."""
        cb, off = self.cluster_bits, index << self.cluster_bits
        if index == 0:
            return True
        if self._l1_offset <= off < self._l1_offset + len(self._l1) * 8:
            return True
        return self._rt_offset <= off < self._rt_offset + (self._rt_clusters << cb)

    def _alloc_cluster(self) -> int:
        """A free host cluster, its refcount set to 1 (in memory); returns its offset."""
        while True:
            index = self._find_free(self._free_cursor)
            bi = index >> self._rb_bits
            if bi >= len(self._rt):
                self._grow_refcount_table()
                continue
            if self._metadata_clusters(index):
                raise ImageError(f"{self.path}: corrupt: metadata cluster {index:#x} has refcount 0")
            b = self._refblock(bi)
            if b is None:
                # No refcount block covers this cluster yet: the cluster
                # becomes that block, and counts itself.
                b = _RefBlock(self.refcount_order, bytes(self.cluster_size))
                b.set(index & (self._rb_entries - 1), 1)
                self._cache_insert(self._rb_cache, bi, b, self._rb_cap, self._evict_refblock)
                self._rb_dirty.add(bi)
                self._rt[bi] = index << self.cluster_bits
                self._rt_dirty.add(bi)
                self._note_allocated(index)
                continue
            b.set(index & (self._rb_entries - 1), 1)
            self._rb_dirty.add(bi)
            self._note_allocated(index)
            return index << self.cluster_bits

    def _note_allocated(self, index: int) -> None:
        self._free_cursor = index + 1
        end = (index + 1) << self.cluster_bits
        self._file_end = max(self._file_end, end)

    def _free_later(self, offset: int, length: int) -> None:
        """Drop one reference to the clusters under ``[offset, offset+length)``
        once the metadata that stopped using them is on disk."""
        self._pending_free.append((offset, length))
        if len(self._pending_free) >= _MAX_PENDING_FREES:
            self._sync_metadata()

    def _free_entry_later(self, e: int) -> None:
        if e & OFLAG_COMPRESSED:
            off, n = self._compressed_range(e)
            self._free_later(off, n)
        elif e & OFFSET_MASK:
            self._free_later(e & OFFSET_MASK, self.cluster_size)

    def _writeback_refcounts(self) -> None:
        """Write dirty refcount blocks, then the refcount table entries that
        point at new ones (with an fsync between, so a table entry never
        points at a block not yet on disk)."""
        for bi in sorted(self._rb_dirty):
            self._pwrite(self._rt[bi], self._rb_cache[bi].to_bytes())
        self._rb_dirty.clear()
        if self._rt_dirty:
            self._sync()
            self._write_entries(self._rt_offset, self._rt, self._rt_dirty)

    def _write_entries(self, base: int, table: array, dirty: set[int]) -> None:
        """Write the dirty 8-byte entries of an in-memory table, runs coalesced."""
        idx = sorted(dirty)
        dirty.clear()
        start = 0
        while start < len(idx):
            end = start + 1
            while end < len(idx) and idx[end] == idx[end - 1] + 1:
                end += 1
            first, last = idx[start], idx[end - 1]
            self._pwrite(base + first * 8, _be_bytes(table[first:last + 1]))
            start = end

    # -- flush -------------------------------------------------------------------------

    def _sync_metadata(self) -> None:
        """Bring the file up to date with memory, in the order that keeps it
        consistent at every step (see the module docstring)."""
        self._writeback_refcounts()
        self._sync_if_written()         # data and refcounts before anything points at them
        for l2_offset in sorted(self._l2_dirty):
            self._pwrite(l2_offset, _be_bytes(self._l2_cache[l2_offset]))
        self._l2_dirty.clear()
        if self._l1_dirty:
            self._sync_if_written()     # L2 tables (some written on eviction) before L1 entries
            self._write_entries(self._l1_offset, self._l1, self._l1_dirty)
        self._sync_if_written()         # references gone before their refcounts drop
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            cb = self.cluster_bits
            for offset, length in pending:
                for index in range(offset >> cb, (offset + length - 1 >> cb) + 1):
                    if self._add_refcount(index, -1) == 0:
                        self._free_cursor = min(self._free_cursor, index)
            self._writeback_refcounts()
            self._sync()

    def flush(self) -> None:
        if self.writable and not self._closed:
            self._sync_metadata()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            os.close(self._fd)
            if self.backing is not None:
                self.backing.close()

    # -- reading -----------------------------------------------------------------------

    def _data_offset(self, e: int, gc: int) -> int:
        off = e & OFFSET_MASK
        if e & L2E_STD_RESERVED or off & self._cmask or off == 0 or off >= self._file_end:
            raise ImageError(f"{self.path}: corrupt L2 entry {e:#x} for guest offset "
                             f"{gc << self.cluster_bits:#x}: reserved bits, misaligned or outside the file")
        return off

    def _compressed_range(self, e: int) -> tuple[int, int]:
        off = e & self._coffset_mask
        sectors = ((e >> self._csize_shift) & self._csize_mask) + 1
        return off, sectors * SECTOR - (off & (SECTOR - 1))

    def _decompress(self, e: int, gc: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == e:
            return cached[1]
        off, n = self._compressed_range(e)
        if off >= self._file_size:
            raise ImageError(f"{self.path}: corrupt compressed cluster at {off:#x} for guest offset "
                             f"{gc << self.cluster_bits:#x}: outside the file")
        raw = os.pread(self._fd, min(n, self._file_size - off), off)
        try:
            out = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise ImageError(f"{self.path}: corrupt compressed cluster at {off:#x}: {exc}") from None
        if len(out) != self.cluster_size:
            raise ImageError(f"{self.path}: corrupt compressed cluster at {off:#x}: inflates to "
                             f"{len(out)} bytes, not {self.cluster_size}")
        self._compressed_cache = (e, out)
        return out

    def _backing_read(self, offset: int, n: int) -> bytes:
        b = self.backing
        if b is None or offset >= b.size:
            return bytes(n)
        m = min(n, b.size - offset)
        data = b.read(offset, m)
        return data if m == n else data + bytes(n - m)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        inner = offset & self._cmask
        if 0 < length and inner + length <= self.cluster_size:
            # The common request, inside one standard cluster: one pread.
            e = self._l2_entry(offset >> self.cluster_bits)
            if e & OFFSET_MASK and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
                data = os.pread(self._fd, length, self._data_offset(e, offset >> self.cluster_bits) + inner)
                if len(data) == length:
                    return data
        parts: list[bytes] = []
        pos, end = offset, offset + length
        cb, cs, cmask = self.cluster_bits, self.cluster_size, self._cmask
        while pos < end:
            gc = pos >> cb
            inner = pos & cmask
            n = min(cs - inner, end - pos)
            e = self._l2_entry(gc)
            if e & OFLAG_COMPRESSED:
                parts.append(self._decompress(e, gc)[inner:inner + n])
            elif e & OFLAG_ZERO:
                parts.append(bytes(n))
            elif e & OFFSET_MASK:
                host = self._data_offset(e, gc)
                # One read for a run of clusters that are contiguous in the file.
                while pos + n < end:
                    e2 = self._l2_entry(gc + 1)
                    if (e2 & (OFLAG_COMPRESSED | OFLAG_ZERO) or not e2 & OFFSET_MASK
                            or self._data_offset(e2, gc + 1) != host + ((gc + 1 - (pos >> cb)) << cb)):
                        break
                    gc += 1
                    n += min(cs, end - pos - n)
                parts.append(self._pread(host + inner, n))
            else:
                while pos + n < end and self._l2_entry(gc + 1) == 0:
                    gc += 1
                    n += min(cs, end - pos - n)
                parts.append(self._backing_read(pos, n))
            pos += n
        return b"".join(parts)

    def zero_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        l1_span = self._l2_bits + self.cluster_bits
        while pos < end:
            gc = pos >> self.cluster_bits
            if self._l1[pos >> l1_span] & OFFSET_MASK:
                n = min(self.cluster_size - (pos & self._cmask), end - pos)
                e = self._l2_entry(gc)
            else:       # no L2 table: the whole range it would map is unallocated
                n = min(end, ((pos >> l1_span) + 1) << l1_span) - pos
                e = 0
            if e & OFLAG_ZERO and not e & OFLAG_COMPRESSED:
                got = [(pos, n, True)]
            elif e & (OFFSET_MASK | OFLAG_COMPRESSED):
                got = [(pos, n, False)]
            elif self.backing is None or pos >= self.backing.size:
                got = [(pos, n, True)]
            else:
                m = min(n, self.backing.size - pos)
                got = self.backing.zero_ranges(pos, m) + ([(pos + m, n - m, True)] if m < n else [])
            for r in got:
                if runs and runs[-1][2] == r[2] and runs[-1][0] + runs[-1][1] == r[0]:
                    runs[-1] = (runs[-1][0], runs[-1][1] + r[1], r[2])
                else:
                    runs.append(r)
            pos += n
        return runs

    def _cluster_content(self, gc: int, e: int) -> bytes:
        """What the guest now reads in the whole of guest cluster ``gc``."""
        start = gc << self.cluster_bits
        cs = self.cluster_size
        if e & OFLAG_COMPRESSED:
            return self._decompress(e, gc)
        if e & OFLAG_ZERO:
            return bytes(cs)
        if e & OFFSET_MASK:
            return self._pread(self._data_offset(e, gc), cs)
        visible = min(cs, self.size - start)
        return self._backing_read(start, visible) + bytes(cs - visible)

    def _reads_as_zero(self, gc: int, e: int) -> bool:
        if e & OFLAG_COMPRESSED:
            return False
        if e & OFLAG_ZERO:
            return True
        if e & OFFSET_MASK:
            return False
        return self.backing is None or (gc << self.cluster_bits) >= self.backing.size

    # -- writing -----------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        view = memoryview(data).cast("B")
        pos, end, src = offset, offset + len(view), 0
        cb, cs, cmask = self.cluster_bits, self.cluster_size, self._cmask
        while pos < end:
            gc = pos >> cb
            inner = pos & cmask
            n = min(cs - inner, end - pos)
            e = self._l2_entry(gc)
            if e & OFLAG_COPIED and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
                host = self._data_offset(e, gc)
                if self._metadata_clusters(host >> cb):
                    raise ImageError(f"{self.path}: corrupt: guest offset {pos:#x} maps onto metadata "
                                     f"at {host:#x}")
                # In place, and one write for a run contiguous in the file.
                while pos + n < end:
                    e2 = self._l2_entry(gc + 1)
                    if (not e2 & OFLAG_COPIED or e2 & (OFLAG_COMPRESSED | OFLAG_ZERO)
                            or self._data_offset(e2, gc + 1) != host + ((gc + 1 - (pos >> cb)) << cb)):
                        break
                    gc += 1
                    n += min(cs, end - pos - n)
                self._pwrite(host + inner, view[src:src + n])
            else:
                self._write_new_cluster(gc, e, inner, view[src:src + n])
            pos += n
            src += n

    def _write_new_cluster(self, gc: int, e: int, inner: int, chunk: memoryview) -> None:
        """Write to a guest cluster that cannot be written in place: give it a
        new host cluster holding its current content with ``chunk`` laid over."""
        cs = self.cluster_size
        if e & OFFSET_MASK and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
            # A standard cluster without COPIED: in place if its refcount is
            # really 1 (the flag was stale), else copy on write.
            host = self._data_offset(e, gc)
            if self._refcount(host >> self.cluster_bits) == 1:
                l2_offset = self._l2_for_write(gc)
                self._set_l2(l2_offset, gc, e | OFLAG_COPIED)
                self._pwrite(host + inner, chunk)
                return
        l2_offset = self._l2_for_write(gc)
        zero_base = self._reads_as_zero(gc, e)
        host = self._alloc_cluster()
        fresh = host >= self._file_size
        if len(chunk) == cs:
            self._pwrite(host, chunk)
        elif zero_base and fresh:
            # Beyond the end of the file: the rest of the cluster is a hole
            # that reads as zeros; only the new bytes are written.
            self._pwrite(host + inner, chunk)
            if self._file_size < host + cs:
                os.ftruncate(self._fd, host + cs)
                self._file_size = host + cs
        else:
            content = bytearray(bytes(cs) if zero_base else self._cluster_content(gc, e))
            content[inner:inner + len(chunk)] = chunk
            self._pwrite(host, content)
        self._set_l2(l2_offset, gc, host | OFLAG_COPIED)
        self._free_entry_later(e)

    def discard(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, freeing whole clusters."""
        self._check_writable()
        self._check_range(offset, length)
        pos, end = offset, offset + length
        cb, cs = self.cluster_bits, self.cluster_size
        while pos < end:
            gc = pos >> cb
            inner = pos & self._cmask
            n = min(cs - inner, end - pos)
            e = self._l2_entry(gc)
            whole = inner == 0 and (n == cs or pos + n == self.size)
            if self._reads_as_zero(gc, e) and not (whole and e & OFFSET_MASK):
                pass
            elif not whole:
                self.write(pos, bytes(n))
            else:
                self._discard_cluster(gc, e)
            pos += n

    def _discard_cluster(self, gc: int, e: int) -> None:
        backed = self.backing is not None and (gc << self.cluster_bits) < self.backing.size
        if backed and self.version < 3:
            # v2 has no zero flag: only data can hide the backing file.
            self.write(gc << self.cluster_bits, bytes(min(self.cluster_size, self.size - (gc << self.cluster_bits))))
            return
        target = OFLAG_ZERO if backed else 0
        if e == target:
            return
        l2_offset = self._l2_for_write(gc)
        self._set_l2(l2_offset, gc, target)
        self._free_entry_later(e)

    # -- refcount structure: growth, check, repair -------------------------------------

    def _current_refcounts(self) -> array:
        """Every refcount, as an array indexed by cluster (the structure's own
        clusters included), read through the cache."""
        n = self._file_end >> self.cluster_bits
        if n > _MAX_SCAN_CLUSTERS:
            raise ImageError(f"{self.path}: {n} clusters is too many to rebuild the refcounts")
        counts = array("Q", bytes(8 * n))
        for bi in range(min(len(self._rt), _div_up(n, self._rb_entries))):
            b = self._refblock(bi)
            if b is None:
                continue
            base = bi << self._rb_bits
            for j in range(min(self._rb_entries, n - base)):
                counts[base + j] = b.get(j)
        return counts

    def _grow_refcount_table(self) -> None:
        counts = self._current_refcounts()
        for index in self._refcount_structure_clusters():
            if index < len(counts) and counts[index]:
                counts[index] -= 1
        self._rebuild_refcounts(counts, min_table_clusters=2 * self._rt_clusters)

    def _refcount_structure_clusters(self) -> list[int]:
        cb = self.cluster_bits
        out = list(range(self._rt_offset >> cb, (self._rt_offset >> cb) + self._rt_clusters))
        out += [(e & ~REFT_RESERVED) >> cb for e in self._rt if e]
        return out

    def _scan_references(self, count_refcount_structure: bool,
                         result: CheckResult | None = None) -> array:
        """The refcount every cluster should have, from the header, L1 and L2
        tables (and, if asked, the refcount structure itself)."""
        h = self.header
        if h.nb_snapshots or EXT_BITMAPS in h.extensions:
            raise ImageError(f"{self.path}: images with internal snapshots or bitmaps cannot be "
                             f"checked here; use qemu-img check")
        cb, cs = self.cluster_bits, self.cluster_size
        n = self._file_end >> cb
        if n > _MAX_SCAN_CLUSTERS:
            raise ImageError(f"{self.path}: {n} clusters is too many to check")
        counts = array("Q", bytes(8 * n))

        def ref(offset: int, length: int, what: str) -> None:
            for index in range(offset >> cb, (offset + length - 1 >> cb) + 1):
                if index >= len(counts):
                    if result is not None:
                        result.corruptions.append(f"{what} at {offset:#x} is outside the file")
                    return
                counts[index] += 1

        ref(0, cs, "header")
        if self._l1:
            ref(self._l1_offset, len(self._l1) * 8, "L1 table")
        if count_refcount_structure:
            for index in self._refcount_structure_clusters():
                ref(index << cb, cs, "refcount structure")
        seen: set[int] = set()
        for l1e in self._l1:
            l2_offset = l1e & OFFSET_MASK
            if not l2_offset:
                continue
            ref(l2_offset, cs, "L2 table")
            if l2_offset in seen:       # shared: counted twice above, its entries once (a hostile L1
                continue                # pointing everywhere at one table costs one read)
            seen.add(l2_offset)
            table = self._l2_cache.get(l2_offset) or self._read_table(l2_offset, cs)
            for e in table:
                if e & OFLAG_COMPRESSED:
                    ref(*self._compressed_range(e), "compressed cluster")
                elif e & OFFSET_MASK:
                    ref(e & OFFSET_MASK, cs, "data cluster")
        return counts

    def check(self) -> CheckResult:
        """Compare every refcount with the references to its cluster (what
        ``qemu-img check`` does for the active L1; snapshots are not walked)."""
        if self.writable:
            self._sync_metadata()
        result = CheckResult()
        expected = self._scan_references(True, result)
        actual = self._current_refcounts()
        for index in range(max(len(expected), len(actual))):
            want = expected[index] if index < len(expected) else 0
            have = actual[index] if index < len(actual) else 0
            if want:
                result.allocated_clusters += 1
            if have < want:
                result.corruptions.append(f"cluster {index:#x}: refcount {have}, {want} references")
            elif have > want:
                result.leaks += 1
        return result

    def repair(self) -> CheckResult:
        """Rebuild the refcounts from the references if they disagree (leaks
        after a crash, or a dirty image); returns what was found before."""
        self._check_writable()
        found = self.check()
        if not found.clean:
            self._rebuild_refcounts(self._scan_references(False))
        return found

    def _rebuild_refcounts(self, counts: array, min_table_clusters: int = 1) -> None:
        """Write a whole new refcount structure for ``counts`` (refcounts of
        everything but the refcount structure) past the end of the file,
        then switch the header to it: the old structure stays valid until
        the one write that replaces it.  Its clusters are then free."""
        self._writeback_refcounts()
        cb, cs = self.cluster_bits, self.cluster_size
        start = max(len(counts), self._file_end >> cb)
        table_clusters, blocks = _layout_refcounts(start, self._rb_entries, cs, min_table_clusters)
        if table_clusters * cs > self.limits.max_refcount_table_bytes:
            raise ImageError(f"{self.path}: the refcount table would outgrow the "
                             f"{self.limits.max_refcount_table_bytes}-byte cap")
        end = start + table_clusters + blocks
        full = array("Q", counts)
        full.extend(array("Q", bytes(8 * (end - len(full)))))
        for index in range(start, end):
            full[index] = 1
        table = array("Q", bytes(table_clusters * cs))
        for k in range(blocks):
            block_index = start + table_clusters + k
            table[k] = block_index << cb
            self._pwrite(block_index << cb, _encode_refblock(full, k, self._rb_entries,
                                                             self.refcount_order, cs, self.path))
        self._pwrite(start << cb, _be_bytes(table))
        self._sync()
        self._pwrite(48, struct.pack(">QI", start << cb, table_clusters))
        self._sync()
        self._rt_offset, self._rt_clusters = start << cb, table_clusters
        self.header.refcount_table_offset, self.header.refcount_table_clusters = self._rt_offset, table_clusters
        self._rt = table
        self._rt_dirty.clear()
        self._rb_cache.clear()
        self._rb_dirty.clear()
        self._file_end = max(self._file_end, end << cb)
        self._free_cursor = 1

    # -- description ---------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        h = self.header
        return {
            "format": "qcow2", "version": h.version, "virtual_size": self.size,
            "cluster_size": self.cluster_size, "refcount_bits": 1 << h.refcount_order,
            "backing_file": h.backing_name, "backing_format": h.backing_format,
            "snapshots": h.nb_snapshots, "dirty": bool(h.incompatible_features & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "lazy_refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "file_size": self._file_size,
        }


def _layout_refcounts(start: int, rb_entries: int, cs: int, min_table_clusters: int) -> tuple[int, int]:
    """Sizes for a refcount table placed at cluster ``start`` followed by its
    blocks, such that the blocks cover every cluster up to their own end."""
    table_clusters, blocks = max(1, min_table_clusters), 0
    while True:
        need_blocks = _div_up(start + table_clusters + blocks, rb_entries)
        need_table = max(min_table_clusters, 1, _div_up(need_blocks * 8, cs))
        if (need_blocks, need_table) == (blocks, table_clusters):
            return table_clusters, blocks
        blocks, table_clusters = need_blocks, need_table


def _encode_refblock(counts: array, k: int, rb_entries: int, order: int, cs: int, path: str) -> bytes:
    part = counts[k * rb_entries:(k + 1) * rb_entries]
    top = max(part, default=0)
    if top >> (1 << order):
        raise ImageError(f"{path}: a refcount of {top} does not fit in {1 << order} bits")
    b = _RefBlock(order, bytes(cs))
    if order >= 3:
        b.data[:len(part)] = array(b.data.typecode, part)
    else:
        for j, v in enumerate(part):
            if v:
                b.set(j, v)
    return b.to_bytes()


def create(path: str | os.PathLike[str], size: int | None = None, *,
           backing: str | os.PathLike[str] | None = None, backing_fmt: str | None = None,
           cluster_size: int = 65536, version: int = 3, refcount_bits: int = 16,
           limits: Limits = DEFAULT_LIMITS, exist_ok: bool = False) -> None:
    """Make a new, empty qcow2 image (v3 with 64 KiB clusters by default).

    With ``backing`` it is a linked clone: unwritten clusters read from that
    image, which is never written.  A relative ``backing`` path is taken
    relative to the new image's folder (and stored as given), as QEMU does.
    ``size`` defaults to the backing image's size and is rounded up to a
    whole sector."""
    path = os.fspath(path)
    if version not in (2, 3):
        raise ImageError(f"{path}: qcow2 version {version} (2 or 3)")
    if cluster_size & (cluster_size - 1) or not 1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS:
        raise ImageError(f"{path}: cluster size {cluster_size} (a power of two, 512 B to 2 MiB)")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise ImageError(f"{path}: refcount width {refcount_bits} (a power of two, 1 to 64 bits)")
    if version == 2 and refcount_bits != 16:
        raise ImageError(f"{path}: qcow2 version 2 has 16-bit refcounts only")
    order = refcount_bits.bit_length() - 1
    cb = cluster_size.bit_length() - 1
    cs = cluster_size
    backing_name = None
    if backing is not None:
        backing_name = os.fspath(backing)
        resolved = backing_name if os.path.isabs(backing_name) else os.path.join(
            os.path.dirname(os.path.abspath(path)), backing_name)
        with open_image(resolved, False, backing_fmt, limits=limits) as base:
            backing_fmt = base.format
            if size is None:
                size = base.size
        if len(os.fsencode(backing_name)) > MAX_BACKING_NAME:
            raise ImageError(f"{path}: backing file name longer than {MAX_BACKING_NAME} bytes")
    if size is None or size < 0:
        raise ImageError(f"{path}: a size is needed (or a backing file to take it from)")
    size = _div_up(size, SECTOR) * SECTOR
    if size > limits.max_size:
        raise ImageError(f"{path}: virtual size {size} is larger than the {limits.max_size}-byte cap")
    l1_size = _div_up(size, cs * (cs // 8))
    if l1_size * 8 > limits.max_l1_bytes:
        raise ImageError(f"{path}: virtual size {size} needs an L1 table larger than the cap; "
                         f"use larger clusters")
    l1_clusters = _div_up(l1_size * 8, cs)

    h = Header(version, 0, 0, cb, size, 0, l1_size, cs if l1_size else 0, 0, 0, 0, 0, refcount_order=order,
               header_length=V3_HEADER_LENGTH if version >= 3 else _V2_HEADER.size)
    ext = b""
    if backing_name is not None:
        fmt = (backing_fmt or "raw").encode()
        ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    if version >= 3:
        table = b"".join(struct.pack(">BB46s", t, b, name.encode()) for t, b, name in _FEATURE_NAMES)
        features = struct.pack(">II", EXT_FEATURE_TABLE, len(table)) + table
        name_len = len(os.fsencode(backing_name)) if backing_name else 0
        if h.header_length + len(ext) + len(features) + 8 + name_len <= cs:
            ext += features     # only documentation: left out where it does not fit
    ext += struct.pack(">II", EXT_END, 0)
    name_bytes = os.fsencode(backing_name) if backing_name is not None else b""
    if name_bytes:
        h.backing_file_offset = h.header_length + len(ext)
        h.backing_file_size = len(name_bytes)
    head = h.pack() + ext + name_bytes
    if len(head) > cs:
        raise ImageError(f"{path}: the header and backing file name do not fit in one {cs}-byte cluster")

    used = 1 + l1_clusters
    counts = array("Q", [1] * used)
    rb_entries = cs * 8 >> order
    table_clusters, blocks = _layout_refcounts(used, rb_entries, cs, 1)
    end = used + table_clusters + blocks
    counts.extend(array("Q", [1] * (end - used)))
    h.refcount_table_offset = used * cs
    h.refcount_table_clusters = table_clusters

    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if exist_ok else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, end * cs)
        table = array("Q", bytes(table_clusters * cs))
        for k in range(blocks):
            table[k] = (used + table_clusters + k) * cs
            os.pwrite(fd, _encode_refblock(counts, k, rb_entries, order, cs, path), table[k])
        os.pwrite(fd, _be_bytes(table), used * cs)
        head = h.pack() + ext + name_bytes
        os.pwrite(fd, head, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
