//! The direct 16-bit kernels: vectors of 16-bit values widened in registers
//! ([`Isa::load_half`]) and `dx` rounded in registers ([`Isa::store_half`]), never through a
//! buffer and with no `f32` kernel call per block. Each is a [`Kernel`] entered on the
//! instruction set of the backend ([`run_kernel`]).

use super::convert::{affine_run, put_half, put_half2};
use crate::kernels::parallel::SharedMut;
use crate::kernels::simd::bits::{half_to_f32, HalfFormat};
use crate::kernels::simd::{with_isa, Isa, Kernel};
use crate::kernels::stats::Moments;
use crate::kernels::Backend;
use crate::Canonical;

/// Whether the reductions and the training `dx` pass run the direct kernels on `dims`: runs of
/// at least [`DIRECT_MIN_RUN`] values (planes), or rows of at least 16 channels (rows). Shorter
/// runs or rows would be mostly masked tails.
#[inline]
pub(super) fn direct(dims: Canonical) -> bool {
    dims.inner >= DIRECT_MIN_RUN || (dims.inner == 1 && dims.channels >= 16)
}

/// Least run for the direct kernels.
pub(super) const DIRECT_MIN_RUN: usize = 32;

/// Runs `kernel` on the instruction set of `backend` (for `bf16` on AVX-512, with AVX512-BF16's
/// conversions where the CPU has them: the same bits), `Wide` where the backend's is missing.
#[inline]
pub(super) fn run_kernel<K: Kernel>(backend: Backend, format: HalfFormat, kernel: K) -> K::Output {
    match format {
        HalfFormat::Bf16 => with_isa!(backend.usable(), bf16, |isa| isa.vectorize(kernel), else {
            crate::kernels::simd::portable::Wide.vectorize(kernel)
        }),
        HalfFormat::F16 => with_isa!(backend.usable(), |isa| isa.vectorize(kernel)),
    }
}

/// Calls `f(state, k, i)` for the whole vectors of a run of `n` values (`i` the offset, `k` one
/// of four accumulators), then `tail(state, i)` for the rest (fewer than `LANES`).
#[inline(always)]
fn for_vectors<I: Isa, T>(
    n: usize,
    state: &mut T,
    mut f: impl FnMut(&mut T, usize, usize),
    tail: impl FnOnce(&mut T, usize),
) {
    let l = I::LANES;
    let mut i = 0;
    while i + 4 * l <= n {
        f(state, 0, i);
        f(state, 1, i + l);
        f(state, 2, i + 2 * l);
        f(state, 3, i + 3 * l);
        i += 4 * l;
    }
    // At most three whole vectors remain: a constant-bound loop keeps `k` a constant after
    // unrolling (so the accumulators stay in registers).
    for k in 0..3 {
        if i + l <= n {
            f(state, k, i);
            i += l;
        }
    }
    if i < n {
        tail(state, i);
    }
}

/// The four accumulators summed into one `f32`: pairwise, then across lanes.
#[inline(always)]
fn sum4<I: Isa>(isa: I, a: [I::V; 4]) -> f32 {
    isa.sum(isa.add(isa.add(a[0], a[1]), isa.add(a[2], a[3])))
}

/// Vectors of columns per tile of the rows kernels (accumulators kept in registers).
const TILE: usize = 4;

/// The lanes of `TILE` vectors, in order.
#[inline(always)]
fn lanes<I: Isa>(isa: I, v: &[I::V; TILE]) -> [f32; TILE * 16] {
    let mut out = [0.0f32; TILE * 16];
    for (t, &v) in v.iter().enumerate() {
        isa.store(&mut out[t * I::LANES..], v);
    }
    out
}

/// Vector `t` of one row of a tile (`r` holds at most `TILE * LANES` values), widened; the last
/// vector may be partial (zeros above); `None` past the row.
#[inline(always)]
fn tile_vector<I: Isa, const BF16: bool>(isa: I, r: &[u16], t: usize) -> Option<I::V> {
    let l = I::LANES;
    if (t + 1) * l <= r.len() {
        Some(isa.load_half::<BF16>(&r[t * l..]))
    } else if t * l < r.len() {
        Some(isa.load_half_tail::<BF16>(&r[t * l..]))
    } else {
        None
    }
}

/// `acc += x * w` over one row of a tile.
#[inline(always)]
fn tile_mean<I: Isa, const BF16: bool>(isa: I, r: &[u16], w: I::V, acc: &mut [I::V; TILE]) {
    for (t, a) in acc.iter_mut().enumerate() {
        if let Some(v) = tile_vector::<I, BF16>(isa, r, t) {
            *a = isa.mul_add(v, w, *a);
        }
    }
}

/// `(sum(x - shift), sum((x - shift)^2))` per column of `columns` (at most `TILE` vectors) over
/// the rows of `bc` channels of `x`, as lanes.
#[inline(always)]
fn tile_pass<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    bc: usize,
    columns: core::ops::Range<usize>,
    shift: &[I::V; TILE],
) -> ([f32; TILE * 16], [f32; TILE * 16]) {
    let (mut ds, mut qs) = ([isa.zero(); TILE], [isa.zero(); TILE]);
    for row in x.chunks_exact(bc) {
        // Lanes past the columns load zero and have a zero shift: they add nothing.
        tile_deviations::<I, BF16>(isa, &row[columns.clone()], shift, &mut ds, &mut qs);
    }
    (lanes(isa, &ds), lanes(isa, &qs))
}

/// `ds += x - m`, `qs += (x - m)^2` over one row of a tile. Lanes past the row load zero and
/// have a zero `m`: they add nothing.
#[inline(always)]
fn tile_deviations<I: Isa, const BF16: bool>(
    isa: I,
    r: &[u16],
    m: &[I::V; TILE],
    ds: &mut [I::V; TILE],
    qs: &mut [I::V; TILE],
) {
    for t in 0..TILE {
        if let Some(v) = tile_vector::<I, BF16>(isa, r, t) {
            let d = isa.sub(v, m[t]);
            ds[t] = isa.add(ds[t], d);
            qs[t] = isa.mul_add(d, d, qs[t]);
        }
    }
}

/// `sdy += dy`, `sxm += dy * (x - m)` over one row of a tile (lanes past the row: `dy` is zero).
#[inline(always)]
fn tile_sums<I: Isa, const BF16: bool>(
    isa: I,
    xr: &[u16],
    dyr: &[u16],
    m: &[I::V; TILE],
    sdy: &mut [I::V; TILE],
    sxm: &mut [I::V; TILE],
) {
    for t in 0..TILE {
        if let (Some(x), Some(g)) = (tile_vector::<I, BF16>(isa, xr, t), tile_vector::<I, BF16>(isa, dyr, t))
        {
            sdy[t] = isa.add(sdy[t], g);
            sxm[t] = isa.mul_add(g, isa.sub(x, m[t]), sxm[t]);
        }
    }
}

/// `(sum(x - shift), sum((x - shift)^2))` over the runs of channel `k` of a planes block
/// (`f32` lanes, added up in `f64`), prefetching `ahead` values ahead when not 0.
#[inline(always)]
fn block_deviations<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    dims: Canonical,
    k: usize,
    shift: f32,
    ahead: usize,
) -> (f64, f64) {
    let Canonical { outer, channels: bc, inner } = dims;
    let l = I::LANES;
    let mv = isa.splat(shift);
    let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
    for o in 0..outer {
        let r = &x[(o * bc + k) * inner..(o * bc + k + 1) * inner];
        // Pairs of vectors (in the instruction set's order), two pairs at a time, then the
        // rest vector by vector.
        let mut i = 0;
        while i + 4 * l <= inner {
            if ahead != 0 {
                isa.prefetch(r.as_ptr().wrapping_add(i + ahead) as *const f32);
                isa.prefetch(r.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
            }
            for (p, j) in [(0, 0), (2 * l, 2)] {
                let (v0, v1) = isa.load_half2::<BF16>(&r[i + p..]);
                let (d0, d1) = (isa.sub(v0, mv), isa.sub(v1, mv));
                ds[j] = isa.add(ds[j], d0);
                qs[j] = isa.mul_add(d0, d0, qs[j]);
                ds[j + 1] = isa.add(ds[j + 1], d1);
                qs[j + 1] = isa.mul_add(d1, d1, qs[j + 1]);
            }
            i += 4 * l;
        }
        let r = &r[i..];
        for_vectors::<I, _>(
            inner - i,
            &mut (&mut ds, &mut qs),
            #[inline(always)]
            |(ds, qs), j, i| {
                if ahead != 0 && j % 2 == 0 {
                    isa.prefetch(r.as_ptr().wrapping_add(i + ahead) as *const f32);
                }
                let d = isa.sub(isa.load_half::<BF16>(&r[i..]), mv);
                ds[j] = isa.add(ds[j], d);
                qs[j] = isa.mul_add(d, d, qs[j]);
            },
            #[inline(always)]
            |(ds, qs), i| {
                let t = &r[i..];
                let d = isa.zero_from(isa.sub(isa.load_half_tail::<BF16>(t), mv), t.len());
                ds[3] = isa.add(ds[3], d);
                qs[3] = isa.mul_add(d, d, qs[3]);
            },
        );
    }
    (sum4(isa, ds) as f64, sum4(isa, qs) as f64)
}

/// Two-pass moments of every channel of one block (the block's own mean, then the deviations
/// from it) into `out` (one per channel of the block).
pub(super) struct BlockMoments<'a, const BF16: bool> {
    pub(super) x: &'a [u16],
    pub(super) dims: Canonical,
    /// Planes blocks: how far ahead (values) the first pass prefetches; 0 for nothing.
    pub(super) ahead: usize,
    pub(super) out: &'a mut [Moments],
}

impl<const BF16: bool> Kernel for BlockMoments<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels: bc, inner } = self.dims;
        let (x, ahead) = (self.x, self.ahead);
        let n = (outer * inner) as f64;
        let inv_n = 1.0 / n;
        if inner > 1 {
            for (k, out) in self.out.iter_mut().enumerate() {
                // One pass of deviations from a pilot shift (the mean of the channel's first
                // values): with data near its mean the correction of `from_deviations` is
                // exact to rounding. Where the pilot is far from the mean (the correction
                // removes over half of `qs`, so rounding would be amplified), a second pass
                // around the mean found (the data is in cache).
                let first = &x[k * inner..k * inner + inner.min(16)];
                let pilot = first.iter().map(|&b| half_to_f32::<BF16>(b)).sum::<f32>() / first.len() as f32;
                let (ds, qs) = block_deviations::<I, BF16>(isa, x, self.dims, k, pilot, ahead);
                *out = if Moments::pilot_is_far(n, ds, qs) {
                    let mean = (pilot as f64 + ds * inv_n) as f32;
                    let (ds, qs) = block_deviations::<I, BF16>(isa, x, self.dims, k, mean, 0);
                    Moments::from_deviations(n, inv_n, mean, ds, qs)
                } else {
                    Moments::from_deviations(n, inv_n, pilot, ds, qs)
                };
            }
        } else {
            // Rows of `bc` channels, a tile of up to `TILE` vectors of columns at a time: lane
            // `j` of vector `t` accumulates channel `c0 + t * LANES + j`, in registers.
            let mut c0 = 0;
            while c0 < bc {
                let width = (bc - c0).min(TILE * I::LANES);
                // One pass of deviations from a pilot shift per column (the mean of the first
                // up to 16 rows), then, only if the correction would remove over half of a
                // column's sum of squares, a second pass around the means found (as for runs).
                let pilot_rows = outer.min(16);
                let wp = isa.splat(1.0 / pilot_rows as f32);
                let mut pilot = [isa.zero(); TILE];
                for row in x.chunks_exact(bc).take(pilot_rows) {
                    tile_mean::<I, BF16>(isa, &row[c0..c0 + width], wp, &mut pilot);
                }
                let columns = c0..c0 + width;
                let (mut shift, (mut ds, mut qs)) =
                    (lanes(isa, &pilot), tile_pass::<I, BF16>(isa, x, bc, columns.clone(), &pilot));
                if (0..width).any(|k| Moments::pilot_is_far(n, ds[k] as f64, qs[k] as f64)) {
                    for k in 0..width {
                        shift[k] = (shift[k] as f64 + ds[k] as f64 * inv_n) as f32;
                    }
                    let mut mean = [isa.zero(); TILE];
                    for (t, m) in mean.iter_mut().enumerate() {
                        *m = isa.load(&shift[t * I::LANES..]);
                    }
                    (ds, qs) = tile_pass::<I, BF16>(isa, x, bc, columns, &mean);
                }
                for (k, out) in self.out[c0..c0 + width].iter_mut().enumerate() {
                    *out = Moments::from_deviations(n, inv_n, shift[k], ds[k] as f64, qs[k] as f64);
                }
                c0 += width;
            }
        }
    }
}

/// `(sum(dy), sum(dy * (x - m)))` of every channel of one block, `m` the channel's mean in
/// `f32`, into `out`.
pub(super) struct BlockSums<'a, const BF16: bool> {
    pub(super) x: &'a [u16],
    pub(super) dy: &'a [u16],
    pub(super) dims: Canonical,
    /// Planes blocks: how far ahead (values) the pass prefetches; 0 for nothing.
    pub(super) ahead: usize,
    pub(super) mean: &'a [f64],
    pub(super) out: &'a mut [(f64, f64)],
}

impl<const BF16: bool> Kernel for BlockSums<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels: bc, inner } = self.dims;
        let (x, dy, ahead) = (self.x, self.dy, self.ahead);
        if inner > 1 {
            for (k, out) in self.out.iter_mut().enumerate() {
                let mv = isa.splat(self.mean[k] as f32);
                let (mut sdy, mut sxm) = ([isa.zero(); 4], [isa.zero(); 4]);
                for o in 0..outer {
                    let r = (o * bc + k) * inner..(o * bc + k + 1) * inner;
                    let (xr, dyr) = (&x[r.clone()], &dy[r]);
                    // Pairs of vectors (in the instruction set's order), two pairs at a time,
                    // then the rest vector by vector.
                    let l = I::LANES;
                    let mut i = 0;
                    while i + 4 * l <= inner {
                        if ahead != 0 {
                            isa.prefetch(xr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            isa.prefetch(dyr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            isa.prefetch(xr.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
                            isa.prefetch(dyr.as_ptr().wrapping_add(i + 2 * l + ahead) as *const f32);
                        }
                        for (p, j) in [(0, 0), (2 * l, 2)] {
                            let (x0, x1) = isa.load_half2::<BF16>(&xr[i + p..]);
                            let (g0, g1) = isa.load_half2::<BF16>(&dyr[i + p..]);
                            sdy[j] = isa.add(sdy[j], g0);
                            sxm[j] = isa.mul_add(g0, isa.sub(x0, mv), sxm[j]);
                            sdy[j + 1] = isa.add(sdy[j + 1], g1);
                            sxm[j + 1] = isa.mul_add(g1, isa.sub(x1, mv), sxm[j + 1]);
                        }
                        i += 4 * l;
                    }
                    let (xr, dyr) = (&xr[i..], &dyr[i..]);
                    for_vectors::<I, _>(
                        inner - i,
                        &mut (&mut sdy, &mut sxm),
                        #[inline(always)]
                        |(sdy, sxm), j, i| {
                            if ahead != 0 && j % 2 == 0 {
                                isa.prefetch(xr.as_ptr().wrapping_add(i + ahead) as *const f32);
                                isa.prefetch(dyr.as_ptr().wrapping_add(i + ahead) as *const f32);
                            }
                            let g = isa.load_half::<BF16>(&dyr[i..]);
                            sdy[j] = isa.add(sdy[j], g);
                            sxm[j] = isa.mul_add(g, isa.sub(isa.load_half::<BF16>(&xr[i..]), mv), sxm[j]);
                        },
                        #[inline(always)]
                        |(sdy, sxm), i| {
                            // Lanes above the tail are zero in `dy`, so their products vanish.
                            let g = isa.load_half_tail::<BF16>(&dyr[i..]);
                            sdy[3] = isa.add(sdy[3], g);
                            let d = isa.sub(isa.load_half_tail::<BF16>(&xr[i..]), mv);
                            sxm[3] = isa.mul_add(g, d, sxm[3]);
                        },
                    );
                }
                *out = (sum4(isa, sdy) as f64, sum4(isa, sxm) as f64);
            }
        } else {
            let mut c0 = 0;
            while c0 < bc {
                let width = (bc - c0).min(TILE * I::LANES);
                let mut mf = [0.0f32; TILE * 16];
                for (m, &mean) in mf.iter_mut().zip(&self.mean[c0..c0 + width]) {
                    *m = mean as f32;
                }
                let m: [I::V; TILE] = core::array::from_fn(|t| isa.load(&mf[t * I::LANES..]));
                let (mut sdy, mut sxm) = ([isa.zero(); TILE], [isa.zero(); TILE]);
                for (xr, dyr) in x.chunks_exact(bc).zip(dy.chunks_exact(bc)) {
                    tile_sums::<I, BF16>(
                        isa,
                        &xr[c0..c0 + width],
                        &dyr[c0..c0 + width],
                        &m,
                        &mut sdy,
                        &mut sxm,
                    );
                }
                let (sdy, sxm) = (lanes(isa, &sdy), lanes(isa, &sxm));
                for (k, out) in self.out[c0..c0 + width].iter_mut().enumerate() {
                    *out = (sdy[k] as f64, sxm[k] as f64);
                }
                c0 += width;
            }
        }
    }
}

/// The normalization of the runs of channel `ch` (`y = (x - m) * s + t`, `k = [m, s, t]`), in
/// one kernel call: the training forward's second pass, channel by channel.
pub(super) struct ChannelAffine<'a, const BF16: bool> {
    pub(super) x: &'a [u16],
    pub(super) y: &'a SharedMut<'a, u16>,
    pub(super) dims: Canonical,
    pub(super) ch: usize,
    pub(super) k: [f32; 3],
    /// Non-temporal stores.
    pub(super) stream: bool,
}

impl<const BF16: bool> Kernel for ChannelAffine<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels, inner } = self.dims;
        for o in 0..outer {
            let start = (o * channels + self.ch) * inner;
            // SAFETY: the runs of channel `ch` belong to the calling task alone.
            let out = unsafe { self.y.slice(start, inner) };
            affine_run::<I, BF16>(isa, Some(&self.x[start..start + inner]), out, self.k, self.stream);
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// `k1 * dy + (k2 * (x - m) + k3)`: the formula of the `f32` kernels' training `dx`.
#[inline(always)]
fn dx_value<I: Isa>(isa: I, x: I::V, dy: I::V, [m, k1, k2, k3]: [I::V; 4]) -> I::V {
    isa.mul_add(k1, dy, isa.mul_add(k2, isa.sub(x, m), k3))
}

/// `dx = k1 * dy + (k2 * (x - m) + k3)` over one block, rounded into `dx`: per run with the
/// run's channel coefficients, or per row with per-column coefficients (`m`, `k1`, `k2`, `k3`
/// of the block's channels, as slices). Runs use non-temporal stores when `stream` (the caller
/// fences).
pub(super) struct BlockDx<'a, const BF16: bool> {
    pub(super) x: &'a [u16],
    pub(super) dy: &'a [u16],
    pub(super) dx: &'a mut [u16],
    pub(super) dims: Canonical,
    pub(super) k: [&'a [f32]; 4],
    pub(super) stream: bool,
}

impl<const BF16: bool> Kernel for BlockDx<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { channels: bc, inner, .. } = self.dims;
        let [km, k1, k2, k3] = self.k;
        let l = I::LANES;
        let (x, dy, dx) = (self.x, self.dy, self.dx);
        if inner > 1 {
            for (r, ((xr, dyr), dxr)) in
                x.chunks_exact(inner).zip(dy.chunks_exact(inner)).zip(dx.chunks_exact_mut(inner)).enumerate()
            {
                let c = r % bc;
                let k = [isa.splat(km[c]), isa.splat(k1[c]), isa.splat(k2[c]), isa.splat(k3[c])];
                dx_run::<I, BF16>(isa, xr, dyr, dxr, k, self.stream);
            }
        } else if bc == 2 * l {
            dx_pair_rows::<I, BF16, 1>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else if bc == 4 * l {
            dx_pair_rows::<I, BF16, 2>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else if bc == 8 * l {
            dx_pair_rows::<I, BF16, 4>(isa, x, dy, dx, [km, k1, k2, k3]);
        } else {
            let (km, k1, k2, k3) = (&km[..bc], &k1[..bc], &k2[..bc], &k3[..bc]);

            for ((xr, dyr), dxr) in x.chunks_exact(bc).zip(dy.chunks_exact(bc)).zip(dx.chunks_exact_mut(bc)) {
                let mut c = 0;
                while c + l <= bc {
                    let v =
                        dx_whole::<I, BF16>(isa, xr, dyr, c, column_coefficients(isa, [km, k1, k2, k3], c));
                    isa.store_half::<BF16>(&mut dxr[c..], v);
                    c += l;
                }
                if c < bc && bc >= l {
                    // The row's last whole vector, overlapping (see the planes case).
                    let c = bc - l;
                    let v =
                        dx_whole::<I, BF16>(isa, xr, dyr, c, column_coefficients(isa, [km, k1, k2, k3], c));
                    isa.store_half::<BF16>(&mut dxr[c..], v);
                } else if c < bc {
                    let k = [
                        isa.load_tail(&km[c..]),
                        isa.load_tail(&k1[c..]),
                        isa.load_tail(&k2[c..]),
                        isa.load_tail(&k3[c..]),
                    ];
                    isa.store_half_tail::<BF16>(&mut dxr[c..], dx_tail::<I, BF16>(isa, xr, dyr, c, k));
                }
            }
        }
    }
}

/// `dx` of one run with the coefficients `k`: a head that aligns the output to the pairs'
/// `4 * LANES` bytes (a store across two cache lines costs two, and a streaming store needs
/// it), pairs of vectors in the instruction set's order, one more vector, a masked tail. With
/// `stream`, every store is non-temporal (the caller fences), to the same bits.
#[inline(always)]
fn dx_run<I: Isa, const BF16: bool>(
    isa: I,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    k: [I::V; 4],
    stream: bool,
) {
    let (n, l) = (dx.len(), I::LANES);
    let head = ((4 * l - (dx.as_ptr() as usize) % (4 * l)) % (4 * l) / 2).min(n);
    let mut i = 0;
    if head >= l {
        put_half::<I, BF16>(isa, &mut dx[..l], dx_whole::<I, BF16>(isa, x, dy, 0, k), stream);
        i = l;
    }
    if i < head {
        let v = dx_tail::<I, BF16>(isa, &x[..head], &dy[..head], i, k);
        put_half::<I, BF16>(isa, &mut dx[i..head], v, stream);
        i = head;
    }
    while i + 2 * l <= n {
        let (x0, x1) = isa.load_half2::<BF16>(&x[i..]);
        let (g0, g1) = isa.load_half2::<BF16>(&dy[i..]);
        let (v0, v1) = (dx_value(isa, x0, g0, k), dx_value(isa, x1, g1, k));
        put_half2::<I, BF16>(isa, &mut dx[i..], v0, v1, stream);
        i += 2 * l;
    }
    if i + l <= n {
        put_half::<I, BF16>(isa, &mut dx[i..i + l], dx_whole::<I, BF16>(isa, x, dy, i, k), stream);
        i += l;
    }
    if i < n {
        put_half::<I, BF16>(isa, &mut dx[i..], dx_tail::<I, BF16>(isa, x, dy, i, k), stream);
    }
}

/// The training `dx` of the runs of channel `ch` in one kernel call (the backward's second
/// pass, channel by channel), `k = [m, k1, k2, k3]` of the channel.
pub(super) struct ChannelDx<'a, const BF16: bool> {
    pub(super) x: &'a [u16],
    pub(super) dy: &'a [u16],
    pub(super) dx: &'a SharedMut<'a, u16>,
    pub(super) dims: Canonical,
    pub(super) ch: usize,
    pub(super) k: [f32; 4],
    /// Non-temporal stores.
    pub(super) stream: bool,
}

impl<const BF16: bool> Kernel for ChannelDx<'_, BF16> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let Canonical { outer, channels, inner } = self.dims;
        let k = [isa.splat(self.k[0]), isa.splat(self.k[1]), isa.splat(self.k[2]), isa.splat(self.k[3])];
        for o in 0..outer {
            let r = (o * channels + self.ch) * inner..(o * channels + self.ch + 1) * inner;
            // SAFETY: the runs of channel `ch` belong to the calling task alone.
            let dx = unsafe { self.dx.slice(r.start, inner) };
            dx_run::<I, BF16>(isa, &self.x[r.clone()], &self.dy[r], dx, k, self.stream);
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// `dx` of rows of `P` pairs of vectors of columns: the coefficients `[m, k1, k2, k3]` loaded
/// once in the order of [`Isa::load_half2`] ([`Isa::load_pair_order`]) and kept in registers,
/// each row's values in pairs.
#[inline(always)]
fn dx_pair_rows<I: Isa, const BF16: bool, const P: usize>(
    isa: I,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    k: [&[f32]; 4],
) {
    let l2 = 2 * I::LANES;
    let mut kv = [[[isa.zero(); 4]; 2]; P];
    for (p, kp) in kv.iter_mut().enumerate() {
        for (j, s) in k.iter().enumerate() {
            let (a, b) = isa.load_pair_order::<BF16>(&s[p * l2..]);
            kp[0][j] = a;
            kp[1][j] = b;
        }
    }
    let width = P * l2;
    for ((xr, dyr), dxr) in x.chunks_exact(width).zip(dy.chunks_exact(width)).zip(dx.chunks_exact_mut(width))
    {
        for (p, ((xv, gv), dv)) in
            xr.chunks_exact(l2).zip(dyr.chunks_exact(l2)).zip(dxr.chunks_exact_mut(l2)).enumerate()
        {
            let (x0, x1) = isa.load_half2::<BF16>(xv);
            let (g0, g1) = isa.load_half2::<BF16>(gv);
            isa.store_half2::<BF16>(dv, dx_value(isa, x0, g0, kv[p][0]), dx_value(isa, x1, g1, kv[p][1]));
        }
    }
}

/// The coefficients of the whole vector of columns at `c` (a function, not a closure: a closure
/// does not inherit the target features of the kernel it is written in, and left out of line
/// its loads become calls).
#[inline(always)]
fn column_coefficients<I: Isa>(isa: I, k: [&[f32]; 4], c: usize) -> [I::V; 4] {
    [isa.load(&k[0][c..]), isa.load(&k[1][c..]), isa.load(&k[2][c..]), isa.load(&k[3][c..])]
}

/// [`dx_value`] of the whole vector at `i` of a run or row of 16-bit values.
#[inline(always)]
fn dx_whole<I: Isa, const BF16: bool>(isa: I, x: &[u16], dy: &[u16], i: usize, k: [I::V; 4]) -> I::V {
    dx_value(isa, isa.load_half::<BF16>(&x[i..]), isa.load_half::<BF16>(&dy[i..]), k)
}

/// [`dx_value`] of the partial vector from `i` to the end of a run or row of 16-bit values.
#[inline(always)]
fn dx_tail<I: Isa, const BF16: bool>(isa: I, x: &[u16], dy: &[u16], i: usize, k: [I::V; 4]) -> I::V {
    dx_value(isa, isa.load_half_tail::<BF16>(&x[i..]), isa.load_half_tail::<BF16>(&dy[i..]), k)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct RoundTrip<'a, const BF16: bool> {
        values: &'a [f32],
        bits: &'a mut [u16],
        back: &'a mut [f32],
    }

    impl<const BF16: bool> Kernel for RoundTrip<'_, BF16> {
        type Output = ();
        fn run<I: Isa>(self, isa: I) {
            let l = I::LANES;
            let n = self.values.len();
            let mut i = 0;
            while i < n {
                if i + 2 * l <= n && (i / l) % 3 == 0 {
                    isa.store_half::<BF16>(&mut self.bits[i..], isa.load(&self.values[i..]));
                    isa.store_half::<BF16>(&mut self.bits[i + l..], isa.load(&self.values[i + l..]));
                    // A pair in the instruction set's order: stored as loaded, the same bits.
                    let (a, b) = isa.load_half2::<BF16>(&self.bits[i..]);
                    let mut again = [0u16; 32];
                    isa.store_half2::<BF16>(&mut again, a, b);
                    let back = [isa.load_half::<BF16>(&again), isa.load_half::<BF16>(&again[l..])];
                    isa.store(&mut self.back[i..], back[0]);
                    isa.store(&mut self.back[i + l..], back[1]);
                    assert_eq!(&again[..2 * l], &self.bits[i..i + 2 * l]);
                    // Values that need rounding, stored as a pair: loaded back as a pair, each
                    // vector equals the one `store_half` rounded.
                    let (a, b) = (isa.load(&self.values[i..]), isa.load(&self.values[i + l..]));
                    isa.store_half2::<BF16>(&mut again, a, b);
                    let (a, b) = isa.load_half2::<BF16>(&again);
                    let (mut a2, mut b2) = ([0.0f32; 16], [0.0f32; 16]);
                    isa.store(&mut a2, a);
                    isa.store(&mut b2, b);
                    for (k, (&a, &b)) in a2[..l].iter().zip(&b2[..l]).enumerate() {
                        let (want_a, want_b) = (self.back[i + k], self.back[i + l + k]);
                        assert!(a.to_bits() == want_a.to_bits() || (a.is_nan() && want_a.is_nan()));
                        assert!(b.to_bits() == want_b.to_bits() || (b.is_nan() && want_b.is_nan()));
                    }
                    i += 2 * l;
                    continue;
                }
                let end = (i + l).min(n);
                if end - i == l {
                    isa.store_half::<BF16>(&mut self.bits[i..], isa.load(&self.values[i..]));
                    isa.store(&mut self.back[i..], isa.load_half::<BF16>(&self.bits[i..]));
                } else {
                    isa.store_half_tail::<BF16>(&mut self.bits[i..end], isa.load_tail(&self.values[i..end]));
                    isa.store_tail(&mut self.back[i..end], isa.load_half_tail::<BF16>(&self.bits[i..end]));
                }
                i = end;
            }
        }
    }

    /// The in-register conversions give `half`'s bits: every 16-bit pattern round trips, and
    /// values next to the rounding boundaries (ties, subnormals, overflow, NaN) round to nearest
    /// even, on every backend.
    #[test]
    fn register_conversions_match_half_on_every_backend() {
        let mut values: Vec<f32> = Vec::new();
        for bits in 0..=u16::MAX {
            values.push(half::bf16::from_bits(bits).to_f32());
            values.push(half::f16::from_bits(bits).to_f32());
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let high = (state >> 32) as u32;
            for low in [0x7fffu32, 0x8000, 0x8001, 0x0fff, 0x1000, 0x1001] {
                values.push(f32::from_bits((high & !0xffff) | low));
                values.push(f32::from_bits((high & !0x1fff) | (low & 0x1fff)));
            }
        }
        values.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 65520.0, 1e-40, -0.0, 3.0]);
        // Every backend as the kernels pick it, then AVX-512 without AVX512-BF16's conversions
        // (the kernels pick those for bf16 where the CPU has them).
        let mut runs: Vec<(Backend, bool)> = Backend::available().into_iter().map(|b| (b, false)).collect();
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd::x86::Avx512::with_bf16().is_some() {
            runs.push((Backend::Avx512, true));
        } else {
            println!("no AVX512-BF16: the bf16 conversion instructions are not tested here");
        }
        for (backend, plain_avx512) in runs {
            let label = if plain_avx512 { "avx512 without BF16 instructions" } else { backend.name() };
            for format in [HalfFormat::Bf16, HalfFormat::F16] {
                let (mut bits, mut back) = (vec![0u16; values.len()], vec![0.0f32; values.len()]);
                let (b, k) = (&mut bits[..], &mut back[..]);
                match (format, plain_avx512) {
                    (HalfFormat::F16, true) => continue,
                    #[cfg(target_arch = "x86_64")]
                    (HalfFormat::Bf16, true) => crate::kernels::simd::x86::Avx512::new()
                        .expect("AVX-512F")
                        .vectorize(RoundTrip::<true> { values: &values, bits: b, back: k }),
                    (HalfFormat::Bf16, _) => {
                        run_kernel(backend, format, RoundTrip::<true> { values: &values, bits: b, back: k })
                    }
                    (HalfFormat::F16, _) => {
                        run_kernel(backend, format, RoundTrip::<false> { values: &values, bits: b, back: k })
                    }
                }
                for (i, &v) in values.iter().enumerate() {
                    let (want, wide) = match format {
                        HalfFormat::Bf16 => {
                            let h = half::bf16::from_f32(v);
                            (h.to_bits(), half::bf16::from_bits(bits[i]).to_f32())
                        }
                        HalfFormat::F16 => {
                            let h = half::f16::from_f32(v);
                            (h.to_bits(), half::f16::from_bits(bits[i]).to_f32())
                        }
                    };
                    if v.is_nan() {
                        assert!(wide.is_nan() && back[i].is_nan(), "{label} {format:?} [{i}]: NaN");
                    } else {
                        assert_eq!(bits[i], want, "{label} {format:?} [{i}]: {v:e}");
                        assert_eq!(back[i].to_bits(), wide.to_bits(), "{label} {format:?} [{i}]: widen");
                    }
                }
            }
        }
    }
}
