"""Step 1 of the search (groups.py): exact copies.

A clip whose float16 vector and temporal signature are byte for byte another's (the same file
posted again: normal on the web, a hundred copies of a clip are common) is in that clip's class,
found by a 128-bit key of both (`row_keys`). Only a class's first row, its representative,
takes part in steps 2 and 3. The members of a class all match one another at the class's own
score (its signature against itself, matched once) and match a member of another class at the
score of the two classes' signatures, so every decision is the one the clips would get one by
one, at the cost of the distinct clips.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.dedup.budget import Budget, Progress
from curation.dedup.spill import Parts, RowFile, mix_part


KEY = np.dtype([("k0", "<u8"), ("k1", "<u8")])
_LANES = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))


def vector_digests(vecs: np.ndarray) -> np.ndarray:
    """A 128-bit hash (KEY records) of each row's bytes, vectorised over 64-bit words
    (multiply-xorshift in two lanes of other constants): equal rows, equal digests."""
    raw = np.ascontiguousarray(vecs).view(np.uint8).reshape(len(vecs), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(vecs), pad), np.uint8)], axis=1)
    words = raw.view("<u8")
    out = np.empty(len(vecs), KEY)
    with np.errstate(over="ignore"):
        for name, mult in zip(("k0", "k1"), _LANES):
            h = np.full(len(vecs), np.uint64(words.shape[1]) * mult, np.uint64)
            for j in range(words.shape[1]):
                h = (h ^ words[:, j]) * mult
                h ^= h >> np.uint64(29)
            out[name] = h
    return out


def row_keys(vecs: np.ndarray, signatures: list[bytes | None], first_row: int) -> np.ndarray:
    """The class key of each row: its vector's digest mixed with its signature's (blake2b); a
    row without a signature gets a key of its own (never a copy: it cannot be matched)."""
    keys = vector_digests(vecs)
    for i, sig in enumerate(signatures):
        if sig:
            d = np.frombuffer(hashlib.blake2b(sig, digest_size=16).digest(), "<u8")
            keys["k0"][i] ^= d[0]
            keys["k1"][i] ^= d[1]
        else:  # unique: the row number, in a part of the key space no digest mix is kept in
            keys["k0"][i] = np.uint64(first_row + i)
            keys["k1"][i] = np.uint64(0)
    return keys


@dataclass
class Classes:
    rep: RowFile  # int64 per row: its class's representative (its first row)
    copies: RowFile  # int64 per row: at a representative, its class's size; 0 elsewhere
    last: RowFile  # int64 per row: at a representative, its class's last row
    representatives: RowFile  # int64: the representatives, ascending
    multi: int  # classes of two or more rows


def exact_classes(keys: RowFile, work: Path, budget: Budget) -> Classes:
    """Classes of rows with equal keys (`row_keys`), sorted one partition of the key space at a time."""
    n = len(keys)
    rec = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("row", "<i8")])
    parts = Parts(work, "keys", rec, budget.parts(n * rec.itemsize * 4), budget)
    progress = Progress("exact copies")
    for start, block in keys.blocks():
        r = np.empty(len(block), rec)
        r["k0"], r["k1"], r["row"] = block["k0"], block["k1"], np.arange(start, start + len(block))
        parts.add(r, mix_part(block["k0"], parts.count))
        progress("keyed %d/%d rows", start + len(block), n)
    rep = RowFile(work / "rep.i8", np.int64, n, budget)
    copies = RowFile(work / "copies.i8", np.int64, n, budget)
    last = RowFile(work / "last.i8", np.int64, n, budget)
    multi = 0
    for p in range(parts.count):
        r = parts.read(p)
        if not len(r):
            continue
        r = r[np.lexsort((r["row"], r["k1"], r["k0"]))]
        new = np.ones(len(r), bool)
        new[1:] = (r["k0"][1:] != r["k0"][:-1]) | (r["k1"][1:] != r["k1"][:-1])
        starts = np.flatnonzero(new)
        first = r["row"][starts]
        rep.put(r["row"], first[np.cumsum(new) - 1])
        ends = np.append(starts[1:], len(r))
        sizes = ends - starts
        copies.put(first, sizes)
        last.put(first, r["row"][ends - 1])
        multi += int((sizes > 1).sum())
        progress("classes of %d/%d partitions", p + 1, parts.count)
    parts.remove()
    reps = RowFile(work / "representatives.i8", np.int64, 0, budget)
    for start, block in rep.blocks():
        reps.append(np.flatnonzero(block == np.arange(start, start + len(block))) + start)
    progress("%d rows, %d distinct, %d classes of copies", n, len(reps), multi, force=True)
    return Classes(rep, copies, last, reps, multi)
