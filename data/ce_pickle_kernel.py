"""The numba kernel under data.ce_pickle: a pickle machine that knows only a scores pickle's opcodes.

A stack cell is (kind, a, b, n) ints plus a float: INT a; FLOAT the float; STR a = index in KNOWN, b = up to 8
latin-1 code points packed (protocol 2 bytes), n = their number; BYTES b, n; GLOBAL a = G_*; DTYPE a = row of the
dtype table (itemsize, byte order); DICT a = its row of the output. numba does not check bounds: every index
written here is checked first.
"""

import numba
import numpy as np

from data.readers import MAX_ID

STACK_SIZE = 1 << 16  # the pickler's SETITEMS batches hold 1000 pairs: ~2000 cells
MEMO_SIZE = 256  # memo entries kept: globals, dtypes, known strings (a real file has about 8)

# Cell kinds on the walker's stack; the names are the Python types they stand for, for error messages.
INT, FLOAT, BOOL, NONE, STR, BYTES, GLOBAL, DTYPE, OUTER, DICT, DTYPE_ARGS, DTYPE_STATE, SCALAR_ARGS, ENC_ARGS = range(
    1, 15
)
KIND_NAMES = {INT: "int", FLOAT: "float", BOOL: "bool", NONE: "None", STR: "str", BYTES: "bytes", GLOBAL: "global",
              DTYPE: "numpy.dtype", OUTER: "dict", DICT: "dict", DTYPE_ARGS: "tuple", DTYPE_STATE: "tuple",
              SCALAR_ARGS: "tuple", ENC_ARGS: "tuple"}  # fmt: skip

# The strings the allowed globals and dtypes are spelled with; a STR cell holds the index here, or -1.
KNOWN = ["numpy._core.multiarray", "numpy.core.multiarray", "scalar", "numpy", "dtype", "_codecs", "encode",
         "f2", "f4", "f8", "<", ">", "latin1"]  # fmt: skip
S_NP2, S_NP1, S_SCALAR, S_NUMPY, S_DTYPE, S_CODECS, S_ENCODE, S_F2, S_F4, S_F8, S_LT, S_GT, S_LATIN1 = range(13)
G_SCALAR, G_DTYPE, G_ENCODE = 1, 2, 3

# Walk status (st[STATUS]) and error codes (st[ERR]).
MORE, DONE, FULL = 0, 1, 2
(E_OPCODE, E_GLOBAL, E_TUPLE, E_REDUCE, E_BUILD, E_KEY, E_VALUE, E_QID, E_ROW, E_RANGE, E_MEMO, E_STACK, E_LAYOUT,
 E_TOP, E_LONG, E_STRING) = range(1, 17)  # fmt: skip
# Slots of the int64 state vector that persists between calls (one per decompressed chunk).
SP, NMARK, NSCORE, NROW, NDTYPE, NMEMO, MEMO_NEXT, MEMO_STYLE, STATUS, ERR, ERR_AT, ERR_A, ERR_B = range(13)
STATE_SIZE = 13

# Bytes of fixed argument (or of the length before a variable one) that follow each opcode this walker reads.
ARG_BYTES = np.zeros(256, dtype=np.int64)
for _ops, _n in [(b"Kqh\x80\x8cC\x8a", 1), (b"M", 2), (b"JrjXB", 4), (b"G\x95", 8)]:
    ARG_BYTES[list(_ops)] = _n


def known_table():
    """KNOWN as a padded uint8 matrix plus lengths, for byte comparisons inside the kernel."""
    table = np.zeros((len(KNOWN), 32), dtype=np.uint8)
    for i, s in enumerate(KNOWN):
        table[i, : len(s)] = np.frombuffer(s.encode(), dtype=np.uint8)
    return table, np.array([len(s) for s in KNOWN], dtype=np.int64)


@numba.njit(cache=True)
def _le(buf, at, n):
    """Unsigned little-endian integer of n bytes."""
    v = 0
    for i in range(n):
        v |= np.int64(buf[at + i]) << (8 * i)
    return v


@numba.njit(cache=True)
def _half_to_float(bits):
    # numba has no float16 on the CPU: decode IEEE half precision by hand (exact in float64).
    sign = -1.0 if bits & 0x8000 else 1.0
    exp, frac = (bits >> 10) & 0x1F, bits & 0x3FF
    if exp == 0:
        return sign * frac * 2.0**-24
    if exp == 31:
        return sign * np.inf if frac == 0 else np.nan
    return sign * (1.0 + frac / 1024.0) * 2.0 ** (exp - 15)


@numba.njit(cache=True)
def _decode_float(packed, n, byteorder, scratch):
    """A float from n (2, 4, 8) raw bytes packed little-end-first into an int64, in the dtype's byte order."""
    for i in range(n):
        scratch[i if byteorder != S_GT else n - 1 - i] = (packed >> (8 * i)) & 0xFF
    if n == 2:
        return _half_to_float(np.int64(scratch[0]) | (np.int64(scratch[1]) << 8))
    if n == 4:
        return np.float64(scratch[:4].view(np.float32)[0])
    return scratch.view(np.float64)[0]


@numba.njit(cache=True)
def _string(buf, at, n, known, known_len):
    """(index in KNOWN or -1, latin-1 code points packed into an int64, their number or -1 if not <= 8 of them)."""
    code = -1
    for k in range(known.shape[0]):
        if known_len[k] == n:
            same = True
            for i in range(n):
                if known[k, i] != buf[at + i]:
                    same = False
                    break
            if same:
                code = k
    # Protocol 2 stores bytes as a latin-1 str (UTF-8 in the pickle): decode up to 8 code points below 256.
    packed, chars, i = 0, 0, 0
    while i < n and chars <= 8:
        c = np.int64(buf[at + i])
        if c >= 0x80:
            if c not in (0xC2, 0xC3) or i + 1 >= n:
                return code, 0, -1
            c = ((c & 0x1F) << 6) | (np.int64(buf[at + i + 1]) & 0x3F)
            i += 1
        if chars < 8:
            packed |= c << (8 * chars)
        chars += 1
        i += 1
    return code, packed, (chars if chars <= 8 else -1)


@numba.njit(cache=True)
def _tuple_of(cells, first, count):
    """What an allowed tuple stands for, as a (kind, a, b, n) cell; kind 0 when it is not one we accept."""
    kinds = cells[first : first + count, 0]
    vals = cells[first : first + count, 1]
    if count == 3 and kinds[0] == STR and S_F2 <= vals[0] <= S_F8:  # numpy.dtype args ('f4', False, True)
        if kinds[1] in (BOOL, INT) and vals[1] == 0 and kinds[2] in (BOOL, INT) and vals[2] == 1:
            return DTYPE_ARGS, 2 ** (1 + vals[0] - S_F2), 0, 0
    if count == 8 and kinds[0] == INT and vals[0] == 3 and kinds[1] == STR and vals[1] in (S_LT, S_GT):
        # numpy.dtype state (3, '<', None, None, None, -1, -1, 0): no subarray, no fields, default size and flags
        if kinds[2] == NONE and kinds[3] == NONE and kinds[4] == NONE and kinds[5] == INT and kinds[6] == INT:
            if kinds[7] == INT and vals[5] == -1 and vals[6] == -1 and vals[7] == 0:
                return DTYPE_STATE, vals[1], 0, 0
    if count == 2 and kinds[0] == DTYPE and kinds[1] == BYTES:  # scalar(dtype, raw bytes)
        return SCALAR_ARGS, vals[0], cells[first + 1, 2], cells[first + 1, 3]
    if count == 2 and kinds[0] == STR and cells[first, 3] >= 0 and kinds[1] == STR and vals[1] == S_LATIN1:
        return ENC_ARGS, 0, cells[first, 2], cells[first, 3]  # protocol 2 bytes: _codecs.encode(str, 'latin1')
    return 0, 0, 0, 0


@numba.njit(cache=True)
def _reduce(cells, cellf, sp, dtypes, st, scratch):
    """REDUCE of an allowed global on its arguments, in place of the two cells; False when not allowed."""
    fn, args = cells[sp - 2], cells[sp - 1]
    if fn[0] != GLOBAL:
        return False
    if fn[1] == G_DTYPE and args[0] == DTYPE_ARGS and st[NDTYPE] < dtypes.shape[0]:
        dtypes[st[NDTYPE], 0], dtypes[st[NDTYPE], 1] = args[1], -1  # byte order comes with BUILD
        cells[sp - 2, 0], cells[sp - 2, 1] = DTYPE, st[NDTYPE]
        st[NDTYPE] += 1
    elif fn[1] == G_SCALAR and args[0] == SCALAR_ARGS and dtypes[args[1], 1] >= 0 and dtypes[args[1], 0] == args[3]:
        cellf[sp - 2] = _decode_float(args[2], args[3], dtypes[args[1], 1], scratch)
        cells[sp - 2, 0] = FLOAT
    elif fn[1] == G_ENCODE and args[0] == ENC_ARGS:
        cells[sp - 2, 0], cells[sp - 2, 2], cells[sp - 2, 3] = BYTES, args[2], args[3]
    else:
        return False
    st[SP] -= 1
    return True


@numba.njit(cache=True)
def _setitems(cells, cellf, target, npairs, rows, pids, scores, st):
    """SETITEM(S) of the npairs (key, value) cells above `target`; an error code, FULL, or 0."""
    first = target + 1
    if cells[target, 0] == OUTER:
        for i in range(npairs):
            key, value = cells[first + 2 * i], cells[first + 2 * i + 1]
            if key[0] != INT or value[0] != DICT:
                st[ERR_A], st[ERR_B] = key[0] if key[0] != INT else value[0], key[1]
                return E_QID if key[0] != INT else E_ROW
            if not 0 <= key[1] <= MAX_ID:
                st[ERR_A], st[ERR_B] = key[1], key[1]
                return E_RANGE
            rows[value[1], 1] = key[1]
        return 0
    if cells[target, 0] != DICT:
        st[ERR_A] = cells[target, 0]
        return E_LAYOUT
    st[ERR_B] = cells[target - 1, 1] if cells[target - 1, 0] == INT else -1  # the qid, for messages
    for i in range(npairs):
        key, value = cells[first + 2 * i], cells[first + 2 * i + 1]
        if key[0] != INT or (value[0] != FLOAT and value[0] != INT):
            st[ERR_A] = key[0] if key[0] != INT else value[0]
            return E_KEY if key[0] != INT else E_VALUE
        if not 0 <= key[1] <= MAX_ID:
            st[ERR_A] = key[1]
            return E_RANGE
    if cells[target, 1] != st[NROW] - 1:
        # Only the newest inner dict may grow: rows are then contiguous runs of the output arrays.
        st[ERR_A] = cells[target, 0]
        return E_LAYOUT
    if st[NSCORE] + npairs > len(pids):
        return FULL
    n = st[NSCORE]
    for i in range(npairs):
        key, value = cells[first + 2 * i], cells[first + 2 * i + 1]
        pids[n] = key[1]
        # int -> float64 -> float32, as np.fromiter(float64) then a float32 array would round it
        scores[n] = np.float32(cellf[first + 2 * i + 1] if value[0] == FLOAT else np.float64(value[1]))
        n += 1
    st[NSCORE] = n
    return 0


@numba.njit(cache=True)
def _push(cells, st, kind, a, b, n):
    if st[SP] >= cells.shape[0]:
        return False
    cells[st[SP], 0], cells[st[SP], 1], cells[st[SP], 2], cells[st[SP], 3] = kind, a, b, n
    st[SP] += 1
    return True


@numba.njit(cache=True)
def _fail(st, code, at, a):
    st[STATUS], st[ERR], st[ERR_AT], st[ERR_A] = -1, code, at, a


@numba.njit(cache=True)
def walk(buf, base, st, cells, cellf, text, marks, memo, dtypes, rows, pids, scores, known, known_len):  # noqa: C901
    """Run the opcodes in buf (stream offset `base`) until it ends mid-opcode (MORE), STOP (DONE), the output
    arrays are full (FULL) or an error (st[ERR]); returns the offset of the first opcode not run."""
    pos, end = 0, len(buf)
    st[STATUS] = MORE
    scratch = np.zeros(8, dtype=np.uint8)  # bytes of one float being decoded
    while pos < end:
        op, sp, ok = buf[pos], st[SP], True
        need = ARG_BYTES[op] + 1
        if pos + need > end:
            return pos
        if op in (0x8C, 0x43, 0x8A):
            need += buf[pos + 1]
        elif op in (0x58, 0x42):
            if _le(buf, pos + 1, 4) > 4096:  # no string or bytes in a scores pickle is near this long
                _fail(st, E_STRING, base + pos, _le(buf, pos + 1, 4))
                return pos
            need += _le(buf, pos + 1, 4)
        elif op == 0x63:  # GLOBAL "module\nname\n"
            nl = 0
            while pos + need < end and nl < 2 and need < 200:
                nl += buf[pos + need] == 0x0A
                need += 1
            if nl < 2 and need < 200:
                return pos
        if pos + need > end:
            return pos
        if op == 0x4A:  # BININT (signed)
            v = _le(buf, pos + 1, 4)
            ok = _push(cells, st, INT, v - (v >> 31) * 2**32, 0, 0)
        elif op in (0x94, 0x71, 0x72):  # MEMOIZE, BINPUT, LONG_BINPUT
            ok = sp > 0 and st[MEMO_STYLE] in (0, 1 + (op == 0x94))  # never both styles: indices would differ
            st[MEMO_STYLE] = 1 + (op == 0x94)
            idx = st[MEMO_NEXT] if op == 0x94 else _le(buf, pos + 1, need - 1)
            st[MEMO_NEXT] += 1
            kind = cells[sp - 1, 0]
            # Only what a pickle refers back to is kept: globals, dtypes, known strings (not 160M scores).
            if ok and (kind == GLOBAL or kind == DTYPE or (kind == STR and cells[sp - 1, 1] >= 0)):
                if st[NMEMO] < memo.shape[0]:
                    memo[st[NMEMO], 0] = idx
                    memo[st[NMEMO], 1:] = cells[sp - 1]
                    st[NMEMO] += 1
        elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
            idx, hit = _le(buf, pos + 1, need - 1), -1
            for m in range(st[NMEMO]):
                if memo[m, 0] == idx:
                    hit = m
            if hit < 0:
                _fail(st, E_MEMO, base + pos, idx)
                return pos
            ok = _push(cells, st, memo[hit, 1], memo[hit, 2], memo[hit, 3], memo[hit, 4])
        elif op in (0x43, 0x42):  # SHORT_BINBYTES, BINBYTES: a scalar's raw bytes
            at = pos + (2 if op == 0x43 else 5)
            if pos + need - at > 8:
                _fail(st, E_STRING, base + pos, pos + need - at)
                return pos
            ok = _push(cells, st, BYTES, 0, _le(buf, at, pos + need - at), pos + need - at)
        elif op in (0x74, 0x85, 0x86, 0x87):  # TUPLE (to MARK), TUPLE1..3
            first = sp - (op - 0x84) if op != 0x74 else (marks[st[NMARK] - 1] if st[NMARK] > 0 else -1)
            if first < 1 or first > sp:
                _fail(st, E_STACK, base + pos, op)
                return pos
            kind, a, b, n = _tuple_of(cells, first, sp - first)
            if kind == 0:
                _fail(st, E_TUPLE, base + pos, sp - first)
                return pos
            st[NMARK] -= op == 0x74
            st[SP] = first
            ok = _push(cells, st, kind, a, b, n)
        elif op == 0x52:  # REDUCE
            if sp < 2 or not _reduce(cells, cellf, sp, dtypes, st, scratch):
                _fail(st, E_REDUCE, base + pos, cells[sp - 2, 0] if sp >= 2 else 0)
                return pos
        elif op == 0x47:  # BINFLOAT, big-endian
            ok = _push(cells, st, FLOAT, 0, 0, 0)
            if ok:
                cellf[sp] = _decode_float(_le(buf, pos + 1, 8), 8, S_GT, scratch)
        elif op == 0x4B:  # BININT1
            ok = _push(cells, st, INT, buf[pos + 1], 0, 0)
        elif op in (0x73, 0x75):  # SETITEM, SETITEMS
            first = sp - 2 if op == 0x73 else (marks[st[NMARK] - 1] if st[NMARK] > 0 else -1)
            if first < 1 or first > sp or (sp - first) % 2:
                _fail(st, E_STACK, base + pos, op)
                return pos
            code = _setitems(cells, cellf, first - 1, (sp - first) // 2, rows, pids, scores, st)
            if code == FULL:
                st[STATUS] = FULL
                return pos
            if code:
                st[STATUS], st[ERR], st[ERR_AT] = -1, code, base + pos
                return pos
            st[NMARK] -= op == 0x75
            st[SP] = first
        elif op == 0x80:  # PROTO
            ok = 2 <= buf[pos + 1] <= 5
        elif op == 0x95:  # FRAME: a read-ahead hint; frames hold whole opcodes, so it can be skipped
            pass
        elif op == 0x7D:  # EMPTY_DICT: the outer dict, or a new row
            if sp == 0:
                ok = _push(cells, st, OUTER, 0, 0, 0)
            elif st[NROW] == rows.shape[0]:
                st[STATUS] = FULL
                return pos
            else:
                rows[st[NROW], 0], rows[st[NROW], 1] = st[NSCORE], -1
                ok = _push(cells, st, DICT, st[NROW], 0, 0)
                st[NROW] += 1
        elif op == 0x28:  # MARK
            ok = st[NMARK] < len(marks)
            if ok:
                marks[st[NMARK]] = sp
                st[NMARK] += 1
        elif op == 0x4D:  # BININT2
            ok = _push(cells, st, INT, _le(buf, pos + 1, 2), 0, 0)
        elif op == 0x8A:  # LONG1: n-byte two's complement; ids fit in 8 bytes
            n = buf[pos + 1]
            if n > 8:
                _fail(st, E_LONG, base + pos, n)
                return pos
            v = _le(buf, pos + 2, n)
            if 0 < n < 8 and buf[pos + 1 + n] >= 0x80:
                v -= np.int64(1) << (8 * n)
            ok = _push(cells, st, INT, v, 0, 0)
        elif op in (0x4E, 0x88, 0x89):  # NONE, NEWTRUE, NEWFALSE
            ok = _push(cells, st, NONE if op == 0x4E else BOOL, 1 if op == 0x88 else 0, 0, 0)
        elif op in (0x8C, 0x58):  # SHORT_BINUNICODE, BINUNICODE
            at = pos + (2 if op == 0x8C else 5)
            code, packed, chars = _string(buf, at, pos + need - at, known, known_len)
            ok = _push(cells, st, STR, code, packed, chars)
            if ok:  # kept for the message should it name a refused global
                text[sp, 0] = min(pos + need - at, text.shape[1] - 1)
                text[sp, 1 : 1 + text[sp, 0]] = buf[at : at + text[sp, 0]]
        elif op in (0x63, 0x93):  # GLOBAL, STACK_GLOBAL: only the three allowed ones, as tags
            if op == 0x63:
                mod = _string(buf, pos + 1, _find_nl(buf, pos + 1) - pos - 1, known, known_len)[0]
                nm_at = _find_nl(buf, pos + 1) + 1
                name = _string(buf, nm_at, _find_nl(buf, nm_at) - nm_at, known, known_len)[0]
            else:
                ok = sp >= 2 and cells[sp - 2, 0] == STR and cells[sp - 1, 0] == STR
                mod, name = (cells[sp - 2, 1], cells[sp - 1, 1]) if ok else (-1, -1)
            g = 0
            if (mod == S_NP2 or mod == S_NP1) and name == S_SCALAR:
                g = G_SCALAR
            elif mod == S_NUMPY and name == S_DTYPE:
                g = G_DTYPE
            elif mod == S_CODECS and name == S_ENCODE:
                g = G_ENCODE
            if g == 0:
                _fail(st, E_GLOBAL, base + pos, op)
                return pos
            if op == 0x93:
                st[SP] -= 2
            ok = _push(cells, st, GLOBAL, g, 0, 0)
        elif op == 0x62:  # BUILD: only a dtype's state, which gives its byte order
            if sp < 2 or cells[sp - 1, 0] != DTYPE_STATE or cells[sp - 2, 0] != DTYPE:
                _fail(st, E_BUILD, base + pos, 0)
                return pos
            dtypes[cells[sp - 2, 1], 1] = cells[sp - 1, 1]
            st[SP] -= 1
        elif op == 0x2E:  # STOP
            if sp != 1 or cells[0, 0] != OUTER or st[NMARK] != 0:
                _fail(st, E_TOP, base + pos, cells[sp - 1, 0] if sp > 0 else 0)
                return pos
            st[STATUS] = DONE
            return pos + 1
        else:
            _fail(st, E_OPCODE, base + pos, op)
            return pos
        if not ok:
            _fail(st, E_STACK, base + pos, op)
            return pos
        pos += need
    return pos


@numba.njit(cache=True)
def _find_nl(buf, at):
    while at < len(buf) and buf[at] != 0x0A:
        at += 1
    return at


@numba.njit(cache=True)
def to_csr(rows, pids, scores):
    """Rows sorted by qid, pids sorted within a row (as CEScores keeps them); a repeated id is an error."""
    order = np.argsort(rows[:, 1], kind="mergesort")
    ends = np.append(rows[1:, 0], len(pids))  # a row is the run up to the next row's start
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    out_pids, out_scores = np.empty(len(pids), dtype=np.int32), np.empty(len(pids), dtype=np.float32)
    for r in range(len(order)):
        src = order[r]
        a, b, at = rows[src, 0], ends[src], ptr[r]
        if r and rows[order[r - 1], 1] == rows[src, 1]:
            return rows[src, 1], -1, ptr, out_pids, out_scores
        inner = np.argsort(pids[a:b], kind="mergesort")
        for i in range(b - a):
            out_pids[at + i], out_scores[at + i] = pids[a + inner[i]], scores[a + inner[i]]
            if i and out_pids[at + i] == out_pids[at + i - 1]:
                return rows[src, 1], out_pids[at + i], ptr, out_pids, out_scores
        ptr[r + 1] = at + b - a
    return -1, -1, ptr, out_pids, out_scores
