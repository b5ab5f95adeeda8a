"""The exact argmin of the L_p quantization error over a set of candidate grids, row by row, without brute force.

Brute force evaluates every element under every candidate: TaQ-DiT's 4-bit 2-D grid (100 widths x 16 zero
points) on a 1536 x 6144 weight is 1600 passes over 9.4M elements, its 8-bit grid 25,600. `lp_argmin` finds
the same minimum from far less work, by four facts about one row x and one candidate (scale s, zero point z,
levels qmin..qmax); a pair is one (row, width), all of whose candidates share s:

1. round(x / s) and the in-lattice error |x - s * round(x / s)|^p do not depend on z: their sum over the row,
   the pair's *total*, is computed once per pair, not per zero point.
2. A candidate's error is that total plus, for each element it clips, (clipped error - in-lattice error) >= 0
   (a clipped element's nearest lattice point lies beyond the end level). Clipped elements are a row's smallest
   and largest values: from its t smallest and largest plus one more each (the sentinels), this sum is exact
   when no sentinel is clipped, and a lower bound otherwise. t = 1, then 32, 1024, ... (up to a quarter of the
   row) for the candidates still undecided.
3. Any candidate's error is at least its error on those 2 (t + 1) extreme values alone.
4. Clipping the row's min (or max) by d costs at least d^p - (s/2)^p. Given an exact error U of some candidate
   (from the widest ones, whose windows hold the whole row), a candidate with its window more than
   (U + 2 (s/2)^p)^(1/p) inside the min or max cannot win: the zero points still in play form an interval per
   pair, so most narrow windows go before any per-candidate work.

4 drops pairs first; then 3 and 2 with growing tails and the totals, in the order of their cost per pair, drop
candidates whose bound exceeds the best exact error; what is left undecided is evaluated densely. Only candidates
with a lower bound above an exact error are dropped, so the argmin is brute force's up to the float32 rounding
of the sums.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from taq.quant.grid import fake_quant_affine

_CHUNK = 1 << 21  # elements per MLX temporary: bounds memory
_TABLE = 1 << 23  # candidates per chunk of rows (one float32 and one bool each)
_MIN_FAST_N = 16  # rows shorter than this are searched densely
_TAIL_GROWTH = 32  # each tail this many times the last: 1, 32, 1024, ... up to a quarter of the row
_SUM_BLOCK = 256


def sum_last(a: mx.array) -> mx.array:
    """Sum over the last axis, blockwise: MLX's CPU reductions accumulate float32 in one running sum, whose
    relative error grows with the length (about 1e-2 at 1e6 terms, 4e-1 at 3e7); block sums keep it near 1e-6."""
    n = a.shape[-1]
    while n > _SUM_BLOCK:
        pad = -n % _SUM_BLOCK
        if pad:
            a = mx.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        a = a.reshape(*a.shape[:-1], -1, _SUM_BLOCK).sum(axis=-1)
        n = a.shape[-1]
    return a.sum(axis=-1)


def lp_argmin(rows: mx.array, scales: mx.array, zero_points: mx.array, qmin: int, qmax: int,
              p: float) -> mx.array:
    """Per row of rows (R, N), the flat index into (num, Zc) of the candidate with the least sum |x_hat - x|^p.

    Candidates: scales (R, num), the widest last, and zero points (R or 1, num, Zc) (a first axis of 1 is shared
    by all rows). Ties go to the lowest flat index (width first, then zero point), as brute force's first
    minimum.
    """
    r, n = rows.shape
    num, zc = scales.shape[1], zero_points.shape[-1]
    cap = max(1, n // 8 - 1)  # 2 (tail + 1) <= n / 4: the two ends never overlap
    tails = [1]
    while tails[-1] < cap:
        tails.append(min(cap, tails[-1] * _TAIL_GROWTH))
    chunk = max(1, min(r, _CHUNK // n, _TABLE // (num * zc)))
    out = []
    for start in range(0, r, chunk):
        x = rows[start:start + chunk]
        s = scales[start:start + chunk]
        z = zero_points[start:start + chunk] if zero_points.shape[0] > 1 else zero_points
        if n < _MIN_FAST_N:
            table = np.array(error_table(x, s, z, qmin, qmax, p))
        else:
            table = _pruned_table(x, s, z, qmin, qmax, p, tails)
        out.append(np.argmin(table.reshape(x.shape[0], num * zc), axis=1))
    return mx.array(np.concatenate(out).astype(np.int32))


def error_table(rows: mx.array, scales: mx.array, zero_points: mx.array, qmin: int, qmax: int,
                p: float) -> mx.array:
    """Brute force: sum |x_hat - x|^p of every row under every candidate, (R, num, Zc)."""
    cols = []
    for i in range(scales.shape[1]):
        s, z = scales[:, i, None, None], zero_points[:, i, :, None]  # (R, 1, 1), (R or 1, Zc, 1)
        cols.append(_errors(rows[:, None, :], s, z, qmin, qmax, p))  # (R, Zc)
    return mx.stack(cols, axis=1)


def _errors(x: mx.array, s: mx.array, z: mx.array, qmin: int, qmax: int, p: float) -> mx.array:
    """Sum over the last axis of |fake_quant(x) - x|^p; x (..., N), s and z broadcastable to (..., 1)."""
    return sum_last(mx.abs(fake_quant_affine(x, s, z, qmin, qmax) - x) ** p)


def _lattice_error(x: mx.array, s: mx.array, p: float) -> mx.array:
    """|x - s * round(x / s)|^p elementwise: the error on the unclipped lattice s * Z (same float ops as _errors)."""
    return mx.abs(mx.round(x / s) * s - x) ** p


def _pruned_table(x: mx.array, s: mx.array, z: mx.array, qmin: int, qmax: int, p: float,
                  tails: list[int]) -> np.ndarray:
    """`error_table`'s values (R, num, Zc) where they can be the minimum, +inf where they provably cannot.

    tails: increasing; the first is applied to every pair left by 4, each later one only to pairs with
    candidates still undecided.
    """
    n, zc = x.shape[1], z.shape[-1]
    k = tails[-1] + 1
    low = mx.sort(-mx.topk(-x, k, axis=1), axis=1)  # (R, k) ascending: low[:, -1] is the sentinel
    high = mx.sort(mx.topk(x, k, axis=1), axis=1)  # (R, k) ascending: high[:, 0] is the sentinel
    search = _Pruning(x, s, z, low, high, qmin, qmax, p)
    # The filters, cheapest per pair first (a clip term costs about twice a total's term): 3 and 2 with the
    # outermost two values, then longer tails, and the totals where their cost fits in.
    steps = sorted([(4 * (t + 1) * zc + i, "tail", t) for i, t in enumerate(tails)] + [(n, "totals", None)])
    for _, step, t in steps:
        if step == "tail":
            search.tail(t)
        else:
            search.totals()
    return search.table()


class _Pruning:
    """The candidates of one chunk of rows still in play, and what is known about them (module docstring).

    Pairs are (row, width) = row * num + width index; per pair, `is_open` (P, Zc) marks the zero points in play.
    `fix`/`exact` come from the longest tail evaluated for the pair, `total` once computed (NaN before).
    """

    def __init__(self, x, s, z, low, high, qmin, qmax, p):
        self.x, self.low, self.high, self.qmin, self.qmax, self.p = x, low, high, qmin, qmax, p
        rows, self.num = s.shape
        self.rows, self.zc = rows, z.shape[-1]
        self.z_of = _pair_zero_points(z, self.num)
        self.s_flat, self.s_np = s.reshape(-1), np.array(s).reshape(-1)  # (R * num,)
        self.x_min, self.x_max = np.array(low[:, 0]), np.array(high[:, -1])  # (R,)

        # An exact error per row: its best widest candidate (whose windows hold the row; inf if none is exact).
        widest = np.arange(rows) * self.num + self.num - 1
        fix, exact, _ = _clip_terms(low[:, :2], high[:, -2:], s[:, -1], self.z_of(widest), qmin, qmax, p)
        total = sum_last(_lattice_error(x, s[:, -1:], p))
        self.best = np.array(mx.min(mx.where(exact, total[:, None] + fix, mx.inf), axis=1))  # (R,)

        # 4: zero points that clip the min and max by at most what `best` allows, an interval per pair.
        self.pairs = np.arange(rows * self.num)
        z_lo = np.broadcast_to(np.array(z.min(axis=-1)), (rows, self.num)).reshape(-1)
        z_hi = np.broadcast_to(np.array(z.max(axis=-1)), (rows, self.num)).reshape(-1)
        self.z_lo, self.z_hi = z_lo, z_hi
        self.total = np.full(self.pairs.size, np.nan, np.float32)
        self.fix = self.exact = self.is_open = None  # from the first tail on
        self._reach(np.zeros(self.pairs.size, np.float32))

    def _reach(self, total: np.ndarray) -> None:
        """Keep the pairs with a zero point that clips min and max by at most (best - total + 2 (s/2)^p)^(1/p)."""
        pairs, s = self.pairs, self.s_np[self.pairs]
        room = self.best[pairs // self.num] - total
        reach = (np.maximum(room, 0) + 2 * (s / 2) ** self.p) ** (1.0 / self.p)
        z_from = self.qmin - (self.x_min[pairs // self.num] + reach) / s - 1e-3  # widened: keeping more is safe
        z_to = self.qmax - (self.x_max[pairs // self.num] - reach) / s + 1e-3
        some_z = np.ceil(np.maximum(z_from, self.z_lo[pairs])) <= np.floor(np.minimum(z_to, self.z_hi[pairs]))
        keep = (room >= 0) & some_z
        self._compact(keep)
        self.z_from, self.z_to = z_from[keep], z_to[keep]
        if self.is_open is not None:  # zero points are tested once their array exists
            zs = np.array(self.z_of(self.pairs)) if self.pairs.size else np.zeros((0, self.zc), np.float32)
            self.is_open &= (zs >= self.z_from[:, None]) & (zs <= self.z_to[:, None])
            self._compact(self.is_open.any(axis=1))

    def _compact(self, keep: np.ndarray) -> None:
        for name in ("pairs", "total", "fix", "exact", "is_open", "z_from", "z_to"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name)[keep])

    def tail(self, t: int) -> None:
        """3 and 2 from the t + 1 smallest and largest values: prune by the error on them, keep the clip terms.

        The first tail looks at every pair; a later one only at pairs with candidates still only bounded.
        """
        k, zc, num = self.low.shape[1], self.zc, self.num
        if self.is_open is None:
            self.fix = np.empty((self.pairs.size, zc), np.float32)
            self.exact = np.zeros((self.pairs.size, zc), bool)
            self.is_open = np.ones((self.pairs.size, zc), bool)
            todo = np.arange(self.pairs.size)
        else:
            todo = np.nonzero((self.is_open & ~self.exact).any(axis=1))[0]
        batch = max(1, _CHUNK // (2 * zc * (t + 1)))
        for start in range(0, todo.size, batch):
            part = todo[start:start + batch]
            sel = self.pairs[part]
            z_sel, r_i = self.z_of(sel), mx.array(sel // num)  # (B, Zc), (B,)
            low, high, s = self.low[r_i, :t + 1], self.high[r_i, k - t - 1:], self.s_flat[mx.array(sel)]
            f, e, extremes = _clip_terms(low, high, s, z_sel, self.qmin, self.qmax, self.p)
            mx.eval(f, e, extremes)
            zs = np.array(z_sel)
            self.fix[part], self.exact[part] = np.array(f), np.array(e)
            self.is_open[part] &= ((zs >= self.z_from[part, None]) & (zs <= self.z_to[part, None])
                                   & (np.array(extremes) <= self.best[sel // num][:, None]))
        self._settle()

    def totals(self) -> None:
        """2: the pairs' in-lattice totals, which also shrink the reach of 4."""
        self.total = _pair_totals(self.x, self.s_flat, self.pairs, self.num, self.p)
        self._reach(self.total)
        if self.is_open is not None:
            self._settle()

    def _settle(self) -> None:
        """With totals and clip terms known: exact errors lower `best`, bounds above it close; drop empty pairs."""
        if not np.isnan(self.total).any():
            values = self.total[:, None] + self.fix  # exact where `exact`, a lower bound elsewhere
            row_of = self.pairs // self.num
            exact_values = np.where(self.exact & self.is_open, values, np.inf)
            np.minimum.at(self.best, row_of, exact_values.min(axis=1, initial=np.inf))
            self.is_open &= values <= self.best[row_of][:, None]
        self._compact(self.is_open.any(axis=1))

    def table(self) -> np.ndarray:
        """The candidates in play as exact errors (densely evaluated where only bounded), +inf elsewhere."""
        values = self.total[:, None] + self.fix
        exact = self.exact & self.is_open
        idx = np.nonzero(self.is_open & ~self.exact)  # bounds no better than the best exact error
        batch = max(1, _CHUNK // self.x.shape[1])
        for start in range(0, idx[0].size, batch):
            sel, zi = idx[0][start:start + batch], idx[1][start:start + batch]
            pairs = self.pairs[sel]
            z_i = mx.take_along_axis(self.z_of(pairs), mx.array(zi)[:, None], axis=1)  # (B, 1)
            s_i = self.s_flat[mx.array(pairs)][:, None]
            x_i = self.x[mx.array(pairs // self.num)]
            values[sel, zi] = np.array(_errors(x_i, s_i, z_i, self.qmin, self.qmax, self.p))
            exact[sel, zi] = True
        table = np.full((self.rows * self.num, self.zc), np.inf, np.float32)
        table[self.pairs] = np.where(exact, values, np.inf)
        return table.reshape(self.rows, self.num, self.zc)


def _pair_zero_points(z: mx.array, num: int):
    """pairs (row * num + width index) -> their zero points (P, Zc), z being (R or 1, num, Zc)."""
    def z_of(pairs: np.ndarray) -> mx.array:
        rows = mx.array(pairs // num) if z.shape[0] > 1 else mx.zeros(pairs.size, dtype=mx.int32)
        return z[rows, mx.array(pairs % num)]
    return z_of


def _pair_totals(x: mx.array, s_flat: mx.array, pairs: np.ndarray, num: int, p: float) -> np.ndarray:
    """The in-lattice totals (P,) of pairs, s_flat being the scales (R * num,)."""
    n = x.shape[1]
    out = np.empty(pairs.size, np.float32)
    batch = max(1, _CHUNK // n)
    for start in range(0, pairs.size, batch):
        sel = pairs[start:start + batch]
        t = sum_last(_lattice_error(x[mx.array(sel // num)], s_flat[mx.array(sel)][:, None], p))
        out[start:start + batch] = np.array(t)
    return out


def _clip_terms(low: mx.array, high: mx.array, s: mx.array, z: mx.array, qmin: int, qmax: int, p: float):
    """From a row's extremes low, high (P, k) (ascending; sentinels low[:, -1], high[:, 0]), scale s (P,) and
    zero points z (P, Zc): per candidate (P, Zc) the sum of (clipped - in-lattice error) over the extremes it
    clips, whether that is exact (no sentinel clipped), and its error on the extremes alone.

    Clipping below is looked for only among the smallest values, above only among the largest: a small value
    clipped above means the top sentinel is clipped too, so the candidate is not exact either way.
    """
    s2 = s[:, None]
    lat_lo, lat_hi = _lattice_error(low, s2, p), _lattice_error(high, s2, p)  # (P, k)
    below = (mx.round(low / s2)[:, None, :] + z[:, :, None]) < qmin  # (P, Zc, k)
    above = (mx.round(high / s2)[:, None, :] + z[:, :, None]) > qmax
    bottom = ((qmin - z) * s2)[:, :, None]  # (P, Zc, 1): the end levels' values
    top = ((qmax - z) * s2)[:, :, None]
    fix_lo = mx.where(below, mx.abs(bottom - low[:, None, :]) ** p - lat_lo[:, None, :], 0.0).sum(axis=-1)
    fix_hi = mx.where(above, mx.abs(top - high[:, None, :]) ** p - lat_hi[:, None, :], 0.0).sum(axis=-1)
    fix = fix_lo + fix_hi
    extremes = (lat_lo.sum(axis=1) + lat_hi.sum(axis=1))[:, None] + fix
    return fix, ~below[..., -1] & ~above[..., 0], extremes
