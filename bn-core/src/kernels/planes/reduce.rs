//! The reductions of the planes family over the runs of a channel: the two-pass moments of a
//! block (alone, or a group's together with one transposing horizontal reduction) and of a
//! chunk, the backward sums of a chunk (with the gradient of a fused ReLU recomputed from
//! `x`), and the masked `dx` of one vector.

use core::ops::Range;

use super::geometry::{Block, Geometry, MAX_GROUP};
use crate::kernels::epilogue::{masked, residual_of, FusedRelu, ADD_RELU, NONE};
use crate::kernels::parallel::{Grad, SharedMut};
use crate::kernels::simd::Isa;
use crate::kernels::stats::Moments;
use crate::kernels::vector::{dx_train, load_at, Pos};

/// Sum of four accumulators in `f32` (for partial sums that each add at most a block).
#[inline(always)]
pub(super) fn reduce32<I: Isa>(isa: I, a: [I::V; 4]) -> f64 {
    isa.sum(combine(isa, a)) as f64
}

/// Calls `f(state, k, values)` for each full vector of `s` (four at a time, `k` = accumulator)
/// and `tail(state, values)` for the rest.
#[inline(always)]
fn for_vectors<I: Isa, T>(
    s: &[f32],
    state: &mut T,
    mut f: impl FnMut(&mut T, usize, &[f32]),
    tail: impl FnOnce(&mut T, &[f32]),
) {
    let l = I::LANES;
    let n = s.len();
    let mut i = 0;
    while i + 4 * l <= n {
        f(state, 0, &s[i..i + l]);
        f(state, 1, &s[i + l..i + 2 * l]);
        f(state, 2, &s[i + 2 * l..i + 3 * l]);
        f(state, 3, &s[i + 3 * l..i + 4 * l]);
        i += 4 * l;
    }
    // At most three whole vectors remain: a constant-bound loop keeps `k` a constant after
    // unrolling (so the accumulators stay in registers).
    for k in 0..3 {
        if i + l <= n {
            f(state, k, &s[i..i + l]);
            i += l;
        }
    }
    if i < n {
        tail(state, &s[i..]);
    }
}

/// `acc += x * w` (the block mean without overflow: `w = 1 / n`), prefetching the values
/// `ahead` positions further (the same place in the channel's next run; nothing when 0).
#[inline(always)]
fn accumulate_mean<I: Isa>(isa: I, x: &[f32], w: I::V, acc: &mut [I::V; 4], ahead: usize) {
    for_vectors::<I, _>(
        x,
        acc,
        #[inline(always)]
        |acc, k, v| {
            if ahead != 0 {
                isa.prefetch(v.as_ptr().wrapping_add(ahead));
            }
            acc[k] = isa.mul_add(isa.load(v), w, acc[k])
        },
        #[inline(always)]
        |acc, t| acc[3] = isa.mul_add(isa.load_tail(t), w, acc[3]),
    );
}

/// `ds += x - m`, `qs += (x - m)^2`.
#[inline(always)]
fn accumulate_deviations<I: Isa>(isa: I, x: &[f32], m: I::V, ds: &mut [I::V; 4], qs: &mut [I::V; 4]) {
    for_vectors::<I, _>(
        x,
        &mut (ds, qs),
        #[inline(always)]
        |(ds, qs), k, v| {
            let d = isa.sub(isa.load(v), m);
            ds[k] = isa.add(ds[k], d);
            qs[k] = isa.mul_add(d, d, qs[k]);
        },
        #[inline(always)]
        |(ds, qs), t| {
            let d = isa.zero_from(isa.sub(isa.load_tail(t), m), t.len());
            ds[3] = isa.add(ds[3], d);
            qs[3] = isa.mul_add(d, d, qs[3]);
        },
    );
}

/// `sdy += g`, `sxm += g * (x - m)` for the gradient `g` of kind `MASK` (`dy`, or `dy` masked
/// by the forward's ReLU: `a` its transform, `res` the residual's values when `ADD_RELU`;
/// stored to `out` when given), prefetching the inputs `ahead` positions further (nothing when
/// `ahead` is 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn accumulate_backward<I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    res: &[f32],
    m: I::V,
    a: [I::V; 3],
    sdy: &mut [I::V; 4],
    sxm: &mut [I::V; 4],
    ahead: usize,
    mut out: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), dy.len());
    if MASK == ADD_RELU {
        assert_eq!(x.len(), res.len());
    }
    if let Some(o) = &out {
        assert!(MASK != NONE && o.len() == x.len());
    }
    let l = I::LANES;
    let n = x.len();
    let mut i = 0;
    while i + 4 * l <= n {
        for k in 0..4 {
            let r = i + k * l..i + (k + 1) * l;
            prefetch_inputs::<I, MASK>(isa, [x, dy, res], r.start + ahead, ahead);
            let xv = isa.load(&x[r.clone()]);
            let g = masked::<I, MASK>(
                isa,
                xv,
                isa.load(&dy[r.clone()]),
                a,
                #[inline(always)]
                || isa.load(&res[r.clone()]),
            );
            if let (false, Some(o)) = (MASK == NONE, out.as_deref_mut()) {
                isa.store(&mut o[r], g);
            }
            sdy[k] = isa.add(sdy[k], g);
            sxm[k] = isa.mul_add(g, isa.sub(xv, m), sxm[k]);
        }
        i += 4 * l;
    }
    for k in 0..3 {
        if i + l <= n {
            prefetch_inputs::<I, MASK>(isa, [x, dy, res], i + ahead, ahead);
            let xv = isa.load(&x[i..i + l]);
            let g = masked::<I, MASK>(
                isa,
                xv,
                isa.load(&dy[i..i + l]),
                a,
                #[inline(always)]
                || isa.load(&res[i..i + l]),
            );
            if let (false, Some(o)) = (MASK == NONE, out.as_deref_mut()) {
                isa.store(&mut o[i..i + l], g);
            }
            sdy[k] = isa.add(sdy[k], g);
            sxm[k] = isa.mul_add(g, isa.sub(xv, m), sxm[k]);
            i += l;
        }
    }
    if i < n {
        // Masked lanes of `dy` are zero (and so are those of a masked gradient), so their
        // products vanish.
        let xv = isa.load_tail(&x[i..]);
        let g = masked::<I, MASK>(
            isa,
            xv,
            isa.load_tail(&dy[i..]),
            a,
            #[inline(always)]
            || isa.load_tail(&res[i..]),
        );
        if let (false, Some(o)) = (MASK == NONE, out) {
            isa.store_tail(&mut o[i..], g);
        }
        sdy[3] = isa.add(sdy[3], g);
        sxm[3] = isa.mul_add(g, isa.sub(xv, m), sxm[3]);
    }
}

/// Prefetches position `at` of the inputs a backward of kind `MASK` reads (the residual for
/// [`ADD_RELU`] only); nothing when `ahead` is 0.
#[inline(always)]
fn prefetch_inputs<I: Isa, const MASK: u8>(isa: I, inputs: [&[f32]; 3], at: usize, ahead: usize) {
    if ahead != 0 {
        isa.prefetch(inputs[0].as_ptr().wrapping_add(at));
        isa.prefetch(inputs[1].as_ptr().wrapping_add(at));
        if MASK == ADD_RELU {
            isa.prefetch(inputs[2].as_ptr().wrapping_add(at));
        }
    }
}

/// The forward's transform of channel `c` as vectors (zeros for a [`NONE`] kernel).
#[inline(always)]
pub(super) fn mask_of<I: Isa, const MASK: u8>(isa: I, mask: &FusedRelu<'_>, c: usize) -> [I::V; 3] {
    if MASK == NONE {
        [isa.zero(); 3]
    } else {
        [isa.splat(mask.mean[c]), isa.splat(mask.scale[c]), isa.splat(mask.shift[c])]
    }
}

/// Two-pass moments of one block of channel `c`.
#[inline(always)]
fn block_moments<I: Isa>(isa: I, g: &Geometry, x: &[f32], c: usize, blk: Block) -> Moments {
    let n = blk.len() as f64;
    let inv_n = 1.0 / n;
    let w = isa.splat(inv_n as f32);
    let mut acc = [isa.zero(); 4];
    for o in blk.o0..blk.o1 {
        accumulate_mean(isa, g.piece_of(x, o, c, blk), w, &mut acc, g.prefetch_ahead());
    }
    let m = reduce32(isa, acc) as f32;
    let mv = isa.splat(m);
    let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
    for o in blk.o0..blk.o1 {
        accumulate_deviations(isa, g.piece_of(x, o, c, blk), mv, &mut ds, &mut qs);
    }
    Moments::from_deviations(n, inv_n, m, reduce32(isa, ds), reduce32(isa, qs))
}

/// [`block_moments`] of the channels `channels` (at most [`MAX_GROUP`]) whose values form one
/// block each, computed together: the horizontal sums of all the channels are one transposing
/// reduction ([`Isa::sums`]), so the short per-channel dependency chains overlap. The same bits
/// as `block_moments` (and as [`chunk_moments`], one block being one chunk). `vectors` is
/// scratch (its contents on entry do not matter).
#[inline(always)]
pub(super) fn group_moments<I: Isa>(
    isa: I,
    g: &Geometry,
    x: &[f32],
    channels: Range<usize>,
    vectors: &mut [[I::V; MAX_GROUP]; 2],
    out: &mut [Moments; MAX_GROUP],
) {
    debug_assert!(g.blocks == 1 && channels.len() <= MAX_GROUP);
    let blk = g.block(0);
    let n = blk.len() as f64;
    let inv_n = 1.0 / n;
    let w = isa.splat(inv_n as f32);
    let len = channels.len();
    for (j, c) in channels.clone().enumerate() {
        let mut acc = [isa.zero(); 4];
        for o in blk.o0..blk.o1 {
            accumulate_mean(isa, g.piece_of(x, o, c, blk), w, &mut acc, g.prefetch_ahead());
        }
        vectors[0][j] = combine(isa, acc);
    }
    let mut shift = [0.0f32; MAX_GROUP];
    sums_of(isa, &vectors[0][..len], &mut shift[..len]);
    for (j, c) in channels.enumerate() {
        let mv = isa.splat(shift[j]);
        let (mut ds, mut qs) = ([isa.zero(); 4], [isa.zero(); 4]);
        for o in blk.o0..blk.o1 {
            accumulate_deviations(isa, g.piece_of(x, o, c, blk), mv, &mut ds, &mut qs);
        }
        vectors[0][j] = combine(isa, ds);
        vectors[1][j] = combine(isa, qs);
    }
    let mut sums = [[0.0f32; MAX_GROUP]; 2];
    sums_of(isa, &vectors[0][..len], &mut sums[0][..len]);
    sums_of(isa, &vectors[1][..len], &mut sums[1][..len]);
    for j in 0..len {
        out[j] = Moments::from_deviations(n, inv_n, shift[j], sums[0][j] as f64, sums[1][j] as f64);
    }
}

/// [`Isa::sums`] of up to [`MAX_GROUP`] vectors, `LANES` at a time.
#[inline(always)]
fn sums_of<I: Isa>(isa: I, v: &[I::V], out: &mut [f32]) {
    let mut start = 0;
    while start < v.len() {
        let end = (start + I::LANES).min(v.len());
        isa.sums(&v[start..end], &mut out[start..end]);
        start = end;
    }
}

/// The four accumulators added pairwise into one vector (the first step of [`reduce32`]).
#[inline(always)]
fn combine<I: Isa>(isa: I, a: [I::V; 4]) -> I::V {
    isa.add(isa.add(a[0], a[1]), isa.add(a[2], a[3]))
}

/// Moments of chunk `k` of channel `c`: its blocks merged in order.
#[inline(always)]
pub(super) fn chunk_moments<I: Isa>(isa: I, g: &Geometry, x: &[f32], c: usize, k: usize) -> Moments {
    let mut acc = Moments::EMPTY;
    for b in g.chunk(k) {
        acc = acc.merge(block_moments(isa, g, x, c, g.block(b)));
    }
    acc
}

/// `(sum(g), sum(g * (x - m)))` of chunk `k` of channel `c`, `g` the gradient of kind `MASK`
/// (stored to its place in `dr` when given; the caller owns the chunk and, when `dy` is in `dx`,
/// writes the chunk's `dx` only after): per block in `f32`, then in `f64` in block order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn chunk_backward_sums<I: Isa, const MASK: u8>(
    isa: I,
    g: &Geometry,
    x: &[f32],
    dy: Grad<'_, '_>,
    mask: &FusedRelu<'_>,
    dr: Option<&SharedMut<'_, f32>>,
    c: usize,
    k: usize,
    m: f32,
) -> (f64, f64) {
    let mv = isa.splat(m);
    let a = mask_of::<I, MASK>(isa, mask, c);
    let (mut sum_dy, mut sum_xm) = (0.0, 0.0);
    for b in g.chunk(k) {
        let blk = g.block(b);
        let (mut sdy, mut sxm) = ([isa.zero(); 4], [isa.zero(); 4]);
        for o in blk.o0..blk.o1 {
            let s = g.run_start(o, c);
            let r = s + blk.i0..s + blk.i1;
            // SAFETY: no slice of `dx` overlaps this piece of run `(o, c)` while it is read: the
            // piece belongs to chunk `(c, k)`, which only the caller processes, and the caller
            // writes its `dx` only after these sums.
            let dy = unsafe { dy.read(r.start, r.len()) };
            let (x, res) = (&x[r.clone()], residual_of::<MASK>(mask, r.clone()));
            let out = match dr.filter(|_| MASK != NONE) {
                // SAFETY: this piece of run `(o, c)` belongs to chunk `(c, k)`, which only the
                // caller processes; it is released before the next piece is taken.
                Some(d) => Some(unsafe { d.slice(r.start, r.len()) }),
                None => None,
            };
            let ahead = g.prefetch_ahead();
            accumulate_backward::<I, MASK>(isa, x, dy, res, mv, a, &mut sdy, &mut sxm, ahead, out);
        }
        sum_dy += reduce32(isa, sdy);
        sum_xm += reduce32(isa, sxm);
    }
    (sum_dy, sum_xm)
}

/// [`dx_train`] of the gradient of kind `MASK` (see [`masked`]) for `dy` at position `p` of a
/// segment whose residual values are `res`; `k` holds `m, k1, k2, k3`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx_masked<I: Isa, const MASK: u8>(
    isa: I,
    p: Pos,
    x: I::V,
    dy: I::V,
    a: [I::V; 3],
    res: &[f32],
    k: [I::V; 4],
) -> I::V {
    let g = masked::<I, MASK>(
        isa,
        x,
        dy,
        a,
        #[inline(always)]
        || load_at(isa, res, p),
    );
    dx_train(isa, x, g, k[0], k[1], k[2], k[3])
}
