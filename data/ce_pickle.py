"""Read a `{qid: {pid: score}}` pickle without unpickling it: a numba walk over its opcodes into CSR arrays.

Unpickling builds ~100 bytes of Python objects per score, ~235 when scores are NumPy scalars (the unpickler's memo
keeps each one's bytes, tuple and scalar): 16-38 GB for the real file's ~160M. This walker keeps 8 bytes a score. It
understands only what CPython's pickler writes (protocols 2-5) for a dict of dicts of ints -> floats, where a
float is a Python float or a NumPy float16/32/64 scalar (`numpy._core.multiarray.scalar` in NumPy 2,
`numpy.core.multiarray.scalar` in NumPy 1, with `numpy.dtype`, and `_codecs.encode` for its bytes under
protocol 2). Nothing is ever imported or called: each allowed global is a tag, a dtype is an (itemsize,
byte order) pair, and a scalar's bytes are decoded here. Any other opcode, global, tuple shape or dtype stops
the walk with an error code and the byte offset; `read_scores_pickle` turns it into an UnsafePickleError.
"""

import pickletools

import numpy as np

from data import ce_pickle_kernel as k
from data.readers import MAX_ID, DataError


class _Walk:
    """The walker's buffers, which persist from one decompressed chunk to the next."""

    def __init__(self, capacity):
        self.st = np.zeros(k.STATE_SIZE, dtype=np.int64)
        self.cells, self.cellf = np.zeros((k.STACK_SIZE, 4), dtype=np.int64), np.zeros(k.STACK_SIZE)
        self.text = np.zeros((k.STACK_SIZE, 64), dtype=np.uint8)
        self.marks, self.memo = np.zeros(k.STACK_SIZE, dtype=np.int64), np.zeros((k.MEMO_SIZE, 5), dtype=np.int64)
        self.dtypes = np.zeros((16, 2), dtype=np.int64)
        self.rows = np.zeros((max(1024, capacity // 64), 2), dtype=np.int64)  # (start, qid); ~300 scores a query
        self.pids, self.scores = np.empty(capacity, dtype=np.int32), np.empty(capacity, dtype=np.float32)
        self.known, self.known_len = k.known_table()

    def run(self, buf, base):
        args = (self.st, self.cells, self.cellf, self.text, self.marks, self.memo, self.dtypes, self.rows)
        return k.walk(buf, base, *args, self.pids, self.scores, self.known, self.known_len)

    def grow(self):
        """Room for more rows or scores (x1.5): the k.walk stopped with k.FULL."""
        if self.st[k.NROW] == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows[: len(self.rows) // 2 + 1])])
        else:
            n = len(self.pids) + len(self.pids) // 2 + 4096
            self.pids, self.scores = np.resize(self.pids, n), np.resize(self.scores, n)


def read_scores_pickle(stream, path, capacity, progress=lambda: None, chunk=1 << 24):
    """(qids, ptr, pids, scores) CSR arrays from the decompressed pickle stream `stream`.

    capacity: expected number of scores (the arrays grow if it is short). progress() is called per chunk.
    """
    w, tail, base = _Walk(capacity), b"", 0
    while w.st[k.STATUS] != k.DONE:
        data = stream.read(chunk)
        if not data:
            raise DataError(f"{path}: the pickle ends at byte {base + len(tail)} before its STOP opcode (truncated?)")
        buf, pos = np.frombuffer(tail + data, dtype=np.uint8), 0
        while True:
            pos += w.run(buf[pos:], base + pos)
            if w.st[k.STATUS] == k.FULL:
                w.grow()
            elif w.st[k.STATUS] < 0:
                raise _error(w, buf, base, path)
            else:  # MORE: read on; k.DONE: what follows STOP is ignored, as pickle.load does
                break
        tail, base = buf[pos:].tobytes(), base + pos
        progress()
    nrow, nscore = w.st[k.NROW], w.st[k.NSCORE]
    dup_qid, dup_pid, ptr, pids, scores = k.to_csr(w.rows[:nrow], w.pids[:nscore], w.scores[:nscore])
    if dup_qid >= 0:
        where = f"query {dup_qid}" if dup_pid < 0 else f"passage {dup_pid} in scores[{dup_qid}]"
        raise DataError(f"{path}: {where} appears twice (a dict pickle cannot hold a key twice): a damaged file")
    return np.sort(w.rows[:nrow, 1]), ptr, pids, scores


OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
ONLY = "a CE scores pickle holds only {qid: {pid: score}} with int ids and float scores (NumPy float16/32/64 too)"


class UnsafePickleError(DataError):
    """The pickle asks for something other than dicts of dicts of ints -> floats (and NumPy float scalars)."""


def _error(w, buf, base, path):
    """The walker's error code as an exception that names the file, the byte offset and the problem."""
    code, at, a, b = (int(v) for v in w.st[[k.ERR, k.ERR_AT, k.ERR_A, k.ERR_B]])
    op = OPCODE_NAMES.get(int(buf[at - base]), hex(buf[at - base]))
    kind = k.KIND_NAMES.get(a, "?")
    where = f"{path}: byte {at}: "
    if code == k.E_GLOBAL:
        return UnsafePickleError(where + f"refusing to load global {_global_name(w, buf, at - base)}: {ONLY}")
    if code == k.E_RANGE:
        return DataError(where + f"id {a} is outside [0, {MAX_ID}]")
    messages = {
        k.E_OPCODE: f"opcode {op} is not part of a scores pickle ({ONLY}; protocols 2-5)",
        k.E_TUPLE: f"a tuple of {a} items that is not a NumPy float dtype or scalar's arguments: {ONLY}",
        k.E_REDUCE: f"REDUCE calls a {kind} with arguments that are not a NumPy float dtype or scalar's: {ONLY}",
        k.E_BUILD: f"BUILD on something other than a NumPy float dtype: {ONLY}",
        k.E_KEY: f"scores[{b}] has a {kind} key, not an int",
        k.E_VALUE: f"scores[{b}] holds a {kind}, not a float",
        k.E_QID: f"a query id is a {kind}, not an int",
        k.E_ROW: f"scores[{b}] is a {kind}, not a dict",
        k.E_MEMO: f"{op} {a} refers back to something other than a NumPy global, dtype or name (or to nothing)",
        k.E_STACK: f"{op} finds the stack in a state no scores pickle leaves it (MARK missing or stack too deep)",
        k.E_LAYOUT: f"SETITEM(S) on a {kind} that is not the outer dict nor the newest inner one",
        k.E_TOP: f"the pickle's top object is a {kind} (or several objects), expected a dict {{qid: {{pid: score}}}}",
        k.E_LONG: f"an integer of {a} bytes: ids fit in 8",
        k.E_STRING: f"a string or bytes of {a} bytes, longer than anything a scores pickle holds",
    }
    return UnsafePickleError(where + messages[code])


def _global_name(w, buf, at):
    """'module.name' of the refused GLOBAL (its text follows the opcode) or STACK_GLOBAL (the two strings below)."""
    if buf[at] == 0x63:
        module, name = bytes(buf[at + 1 : at + 400]).split(b"\n")[:2]
    else:
        sp = w.st[k.SP]
        module, name = (bytes(w.text[i, 1 : 1 + w.text[i, 0]]) if sp > i >= 0 else b"?" for i in (sp - 2, sp - 1))
    return f"{module.decode('utf-8', 'replace')}.{name.decode('utf-8', 'replace')}"
