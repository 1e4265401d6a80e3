//! Short runs (`inner <` [`SHORT_RUN`]: the 7 x 7 to 11 x 11 layers of a convolutional
//! network): a tile of consecutive channels is, in each image, one contiguous span of
//! `channels * inner` values, so every pass goes image by image over whole spans with
//! per-lane parameters (each lane repeats its channel's), never run by run.
//!
//! - statistics: one pass; per lane, the sums of the deviations from the channel's pilot (the
//!   mean of its run in the first image) and of their squares, in `f32` over blocks of
//!   [`BLOCK_IMAGES`] images, then per channel in `f64`, blocks merged in order (Chan); a
//!   channel whose pilot turns out far from its mean is taken again around that mean;
//! - the backward's two sums likewise (around the mean), in one pass;
//! - the normalize and `dx` passes: one vector walk over each span.
//!
//! Every lane's arithmetic depends only on its own values, and the per-channel sums run in a fixed
//! order, so a channel's results do not depend on the tile it is in: tiles (and the tasks that
//! own them) may be cut differently for any thread count and give the same bits. The fused and
//! the split schedules of short runs both use these sums.

use core::ops::Range;

use crate::kernels::epilogue::{masked, Apply, FusedRelu, ADD_RELU, NONE};
use crate::kernels::loops::{map_params, Split};
use crate::kernels::parallel::{Grad, SharedMut};
use crate::kernels::simd::Isa;
use crate::kernels::stats::{Affine32, DxCoefficients, Moments};
use crate::kernels::vector::{affine, dx_train};
use crate::Canonical;

/// Runs shorter than this many values take the span schedule in training and the backward (runs
/// of this length and more are long enough for the run-by-run loops). Inference goes run by run
/// at any length: one pass with each run's parameters in registers costs less than per-lane
/// parameters loaded beside every vector.
///
/// Measured on a Zen 4 VM (bn-bench --quick, 1 and 2 threads, medians of 3 interleaved rounds,
/// the spans' time over the run-by-run loops'): runs of 49 take 0.5-0.87x (ResNet-50's
/// (50, 512, 7, 7) and (50, 2048, 7, 7), (32, 960, 7, 7)), 64 0.82-1.03x, 81 0.6-0.92x, 121
/// 0.88-1.03x; runs of 144 take 1.05-1.27x and 196 1.04-1.78x in 23 of 24 measurements
/// ((50, 1024, 14, 14) 1.5-1.8x, (50, 256, 14, 14) 1.04-1.19x; (32, 256, 14, 14)'s training at
/// 2 threads 0.79x): from 12 x 12 on, a channel's runs are long enough for the
/// prefetchers, and the spans' tiles (a few channels, each image's span a whole image apart)
/// are not.
pub(super) const SHORT_RUN: usize = 128;
/// Most values of one span (a tile's values in one image): per-lane sums and parameters of a
/// span stay in L1.
const SPAN: usize = 1024;
/// Most channels per tile.
pub(super) const MAX_TILE: usize = 64;
/// Images per block of the `f32` per-lane sums (each lane adds at most this many terms before
/// the sums move to `f64`).
const BLOCK_IMAGES: usize = 128;
/// Bytes of the tensors a tile re-reads (`x`, and `dy` in the backward) over all images: the
/// tile stays in a 1 MiB L2 between its sums and its elementwise pass.
const TILE_BYTES: usize = 512 << 10;

/// Least images for the span schedule: a tile's per-lane parameters and sums cost a few scalar
/// operations per lane and call, which the images must amortize (with one image, S6's
/// (1, 64, 8, 8), the run-by-run loops are 4x faster).
const MIN_IMAGES: usize = 16;

/// Whether `dims` (planes) takes the span schedule: runs shorter than [`SHORT_RUN`] and at
/// least [`MIN_IMAGES`] images. A function of the shape alone.
#[inline(always)]
pub(super) fn is_short(dims: Canonical) -> bool {
    dims.inner < SHORT_RUN && dims.outer >= MIN_IMAGES
}

/// Channels per tile for a pass that re-reads `tensors` tensors: a function of the shape alone.
#[inline(always)]
fn tile_channels(dims: Canonical, tensors: usize) -> usize {
    let slab = (dims.outer * dims.inner * 4).max(1);
    (TILE_BYTES / tensors / slab).min(SPAN / dims.inner.max(1)).clamp(1, MAX_TILE)
}

/// `channels` cut into consecutive tiles.
#[inline(always)]
fn tiles(dims: Canonical, channels: Range<usize>, tensors: usize) -> impl Iterator<Item = Range<usize>> {
    let size = tile_channels(dims, tensors);
    let end = channels.end;
    channels.step_by(size).map(move |c| c..(c + size).min(end))
}

/// Per-lane scratch of one task, made once per task (not per tile: zeroing it is not free).
pub(super) struct Scratch {
    a: [f32; SPAN],
    b: [f32; SPAN],
    c: [f32; SPAN],
    params: [[f32; SPAN]; 4],
    mask: [[f32; SPAN]; 3],
}

impl Scratch {
    #[inline(always)]
    pub(super) fn new() -> Scratch {
        let z = [0.0; SPAN];
        Scratch { a: z, b: z, c: z, params: [z; 4], mask: [z; 3] }
    }
}

/// Offset of tile `c0..`'s span in image `o`.
#[inline(always)]
fn span_start(dims: Canonical, o: usize, c0: usize) -> usize {
    (o * dims.channels + c0) * dims.inner
}

/// Distance (values) from a span to the same tile's span [`PREFETCH_IMAGES`] images further: how
/// far ahead the passes that read from memory prefetch.
#[inline(always)]
fn stride(dims: Canonical) -> usize {
    PREFETCH_IMAGES * dims.channels * dims.inner
}

/// Images ahead that the passes prefetch (further showed no gain on a Zen 4 VM).
const PREFETCH_IMAGES: usize = 1;

/// Prefetches the `l` values at `p` (one per cache line of 64 bytes).
#[inline(always)]
fn prefetch_span<I: Isa>(isa: I, p: *const f32, l: usize) {
    let mut i = 0;
    while i < l {
        isa.prefetch(p.wrapping_add(i));
        i += 16;
    }
}

/// Per-lane values of a span, each channel's repeated over its `inner` lanes.
#[inline(always)]
fn fill_lanes(lanes: &mut [f32; SPAN], inner: usize, j: usize, v: f32) {
    lanes[j * inner..(j + 1) * inner].fill(v);
}

/// The `f64` sum of the lanes of channel `j`.
#[inline(always)]
fn lane_sum(lanes: &[f32; SPAN], inner: usize, j: usize) -> f64 {
    lanes[j * inner..(j + 1) * inner].iter().map(|&v| v as f64).sum()
}

/// `ds += x - shift`, `qs += (x - shift)^2`, lane by lane over one span, prefetching the
/// values `ahead` positions further (the span of the next image: the hardware prefetchers do
/// not follow the jump between spans).
#[inline(always)]
fn deviations<I: Isa>(isa: I, x: &[f32], shift: &[f32], ds: &mut [f32], qs: &mut [f32], ahead: usize) {
    let l = x.len();
    let (shift, ds, qs) = (&shift[..l], &mut ds[..l], &mut qs[..l]);
    let mut i = 0;
    while i + I::LANES <= l {
        let r = i..i + I::LANES;
        isa.prefetch(x[i..].as_ptr().wrapping_add(ahead));
        let d = isa.sub(isa.load(&x[r.clone()]), isa.load(&shift[r.clone()]));
        let (s, q) = (isa.load(&ds[r.clone()]), isa.load(&qs[r.clone()]));
        isa.store(&mut ds[r.clone()], isa.add(s, d));
        isa.store(&mut qs[r], isa.mul_add(d, d, q));
        i += I::LANES;
    }
    if i < l {
        let d = isa.sub(isa.load_tail(&x[i..]), isa.load_tail(&shift[i..]));
        let (s, q) = (isa.load_tail(&ds[i..]), isa.load_tail(&qs[i..]));
        isa.store_tail(&mut ds[i..], isa.add(s, d));
        isa.store_tail(&mut qs[i..], isa.mul_add(d, d, q));
    }
}

/// Moments of the channels of `tile` from their deviations from `shift` (per lane); `far[j]`
/// is set where a block's sums say the shift was far from the mean (or are not finite).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn moments_around<I: Isa>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    tile: Range<usize>,
    shift: &[f32; SPAN],
    (ds, qs): (&mut [f32; SPAN], &mut [f32; SPAN]),
    out: &mut [Moments; MAX_TILE],
    far: &mut [bool; MAX_TILE],
) {
    let (inner, g) = (dims.inner, tile.len());
    let l = g * inner;
    let mut o0 = 0;
    while o0 < dims.outer {
        let o1 = (o0 + BLOCK_IMAGES).min(dims.outer);
        ds[..l].fill(0.0);
        qs[..l].fill(0.0);
        for o in o0..o1 {
            let s = span_start(dims, o, tile.start);
            let ahead = stride(dims);
            deviations(isa, &x[s..s + l], &shift[..l], &mut ds[..l], &mut qs[..l], ahead);
        }
        let n = ((o1 - o0) * inner) as f64;
        for j in 0..g {
            let (d, q) = (lane_sum(ds, inner, j), lane_sum(qs, inner, j));
            far[j] |= Moments::pilot_is_far(n, d, q) || !q.is_finite();
            out[j] = out[j].merge(Moments::from_deviations(n, 1.0 / n, shift[j * inner], d, q));
        }
        o0 = o1;
    }
}

/// Moments of the channels of `tile` (at most [`MAX_TILE`], `tile.len() * inner <= SPAN`) over
/// all images, into `out[..tile.len()]`.
#[inline(always)]
fn tile_moments<I: Isa>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    tile: Range<usize>,
    scratch: &mut Scratch,
    out: &mut [Moments; MAX_TILE],
) {
    let inner = dims.inner;
    let Scratch { a: shift, b: ds, c: qs, .. } = scratch;
    for (j, c) in tile.clone().enumerate() {
        // The pilot: the mean of the channel's run in the first image.
        let run = &x[c * inner..(c + 1) * inner];
        let pilot = run.iter().map(|&v| v as f64).sum::<f64>() / inner as f64;
        fill_lanes(shift, inner, j, pilot as f32);
    }
    let mut far = [false; MAX_TILE];
    *out = [Moments::EMPTY; MAX_TILE];
    moments_around(isa, dims, x, tile.clone(), shift, (&mut *ds, &mut *qs), out, &mut far);
    if far[..tile.len()].contains(&true) {
        // Again around the mean, for those channels only (the others' lanes give the same
        // bits again, and are kept).
        for j in 0..tile.len() {
            if far[j] {
                fill_lanes(shift, inner, j, out[j].mean as f32);
            }
        }
        let mut again = [Moments::EMPTY; MAX_TILE];
        moments_around(isa, dims, x, tile.clone(), shift, (ds, qs), &mut again, &mut [false; MAX_TILE]);
        for j in 0..tile.len() {
            if far[j] {
                out[j] = again[j];
            }
        }
    }
}

/// Batch mean and biased variance of the channels `channels` (into `mean[..]`, `var[..]`,
/// indexed from `channels.start`).
#[inline(always)]
pub(super) fn statistics<I: Isa>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    channels: Range<usize>,
    mean: &mut [f64],
    var: &mut [f64],
) {
    let first = channels.start;
    let mut mom = [Moments::EMPTY; MAX_TILE];
    let mut scratch = Scratch::new();
    for tile in tiles(dims, channels, 1) {
        tile_moments(isa, dims, x, tile.clone(), &mut scratch, &mut mom);
        for (j, c) in tile.enumerate() {
            mean[c - first] = mom[j].mean;
            var[c - first] = mom[j].m2 / mom[j].n;
        }
    }
}

/// The training forward of the channels `channels`, tile by tile: the statistics (into
/// `mean[..]`, `var[..]`, indexed from `channels.start`), then the normalize while the tile
/// is in L2.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn train<I: Isa, A: Apply>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    y: &SharedMut<'_, f32>,
    act: A,
    channels: Range<usize>,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean: &mut [f64],
    var: &mut [f64],
) {
    let (inner, first) = (dims.inner, channels.start);
    let mut mom = [Moments::EMPTY; MAX_TILE];
    let mut scratch = Scratch::new();
    for tile in tiles(dims, channels, 1) {
        tile_moments(isa, dims, x, tile.clone(), &mut scratch, &mut mom);
        let [ms, ss, ts, _] = &mut scratch.params;
        for (j, c) in tile.clone().enumerate() {
            let (m, v) = (mom[j].mean, mom[j].m2 / mom[j].n);
            (mean[c - first], var[c - first]) = (m, v);
            let a = Affine32::train(m, v, eps, gamma[c], beta[c]);
            fill_lanes(ms, inner, j, a.m);
            fill_lanes(ss, inner, j, a.s);
            fill_lanes(ts, inner, j, a.t);
        }
        let l = tile.len() * inner;
        for o in 0..dims.outer {
            let s = span_start(dims, o, tile.start);
            // SAFETY: the span of `tile` in image `o` holds runs of the tile's channels only,
            // which only this task processes; it is released before the next is taken.
            let y = unsafe { y.slice(s, l) };
            prefetch_span(isa, y.as_ptr().wrapping_add(stride(dims)), l);
            let mut io = Split { x: &x[s..s + l], y, act: act.part(s, s + l) };
            map_params(
                isa,
                &mut io,
                [&ms[..l], &ss[..l], &ts[..l]],
                #[inline(always)]
                |[m, s, t], v| affine(isa, v, m, s, t),
            );
        }
    }
}

/// The forward's transform of the tile's channels as lanes (for a [`NONE`] kernel, nothing).
#[inline(always)]
fn mask_lanes<const MASK: u8>(
    mask: &FusedRelu<'_>,
    inner: usize,
    tile: Range<usize>,
    a: &mut [[f32; SPAN]; 3],
) {
    if MASK != NONE {
        for (j, c) in tile.enumerate() {
            fill_lanes(&mut a[0], inner, j, mask.mean[c]);
            fill_lanes(&mut a[1], inner, j, mask.scale[c]);
            fill_lanes(&mut a[2], inner, j, mask.shift[c]);
        }
    }
}

/// The vectors of `a` at `r` (zeros for a [`NONE`] kernel).
#[inline(always)]
fn mask_at<I: Isa, const MASK: u8>(isa: I, a: &[[f32; SPAN]; 3], r: Range<usize>, full: bool) -> [I::V; 3] {
    if MASK == NONE {
        [isa.zero(); 3]
    } else if full {
        [isa.load(&a[0][r.clone()]), isa.load(&a[1][r.clone()]), isa.load(&a[2][r])]
    } else {
        [isa.load_tail(&a[0][r.clone()]), isa.load_tail(&a[1][r.clone()]), isa.load_tail(&a[2][r])]
    }
}

/// Loads `s[r]`: a whole vector when `full`, else the tail (zeros above).
#[inline(always)]
fn load_r<I: Isa>(isa: I, s: &[f32], r: Range<usize>, full: bool) -> I::V {
    if full {
        isa.load(&s[r])
    } else {
        isa.load_tail(&s[r])
    }
}

/// Stores `v` to `s[r]`: a whole vector when `full`, else the low lanes.
#[inline(always)]
fn store_r<I: Isa>(isa: I, s: &mut [f32], r: Range<usize>, full: bool, v: I::V) {
    if full {
        isa.store(&mut s[r], v)
    } else {
        isa.store_tail(&mut s[r], v)
    }
}

/// Calls `f(range, full)` for the vectors of `0..l`: whole vectors, then the tail.
#[inline(always)]
fn for_vectors<I: Isa>(l: usize, mut f: impl FnMut(Range<usize>, bool)) {
    let mut i = 0;
    while i + I::LANES <= l {
        f(i..i + I::LANES, true);
        i += I::LANES;
    }
    if i < l {
        f(i..l, false);
    }
}

/// `(sum(g), sum(g * (x - m)))` of the channels `channels` (into `out[..]`, indexed from
/// `channels.start`; `m` the mean in `f32`), `g` the gradient of kind `MASK`, stored to `dr`
/// when given. With `dy` in `dx`, no slice of `dx` in these channels may be alive meanwhile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_sums<I: Isa, const MASK: u8>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    dy: Grad<'_, '_>,
    mask: &FusedRelu<'_>,
    dr: Option<&SharedMut<'_, f32>>,
    channels: Range<usize>,
    mean: &[f64],
    scratch: &mut Scratch,
    out: &mut [(f64, f64)],
) {
    let first = channels.start;
    let mut sums = [(0.0, 0.0); MAX_TILE];
    for tile in tiles(dims, channels, 2) {
        tile_backward_sums::<I, MASK>(isa, dims, x, dy, mask, dr, tile.clone(), mean, scratch, &mut sums);
        for (j, c) in tile.enumerate() {
            out[c - first] = sums[j];
        }
    }
}

/// [`backward_sums`] of one tile, into `out[..tile.len()]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_backward_sums<I: Isa, const MASK: u8>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    dy: Grad<'_, '_>,
    mask: &FusedRelu<'_>,
    dr: Option<&SharedMut<'_, f32>>,
    tile: Range<usize>,
    mean: &[f64],
    scratch: &mut Scratch,
    out: &mut [(f64, f64); MAX_TILE],
) {
    let (inner, g) = (dims.inner, tile.len());
    let l = g * inner;
    let Scratch { a: ms, b: sdy, c: sxm, mask: a, .. } = scratch;
    for (j, c) in tile.clone().enumerate() {
        fill_lanes(ms, inner, j, mean[c] as f32);
    }
    mask_lanes::<MASK>(mask, inner, tile.clone(), a);
    *out = [(0.0, 0.0); MAX_TILE];
    let ahead = stride(dims);
    let mut o0 = 0;
    while o0 < dims.outer {
        let o1 = (o0 + BLOCK_IMAGES).min(dims.outer);
        sdy[..l].fill(0.0);
        sxm[..l].fill(0.0);
        for o in o0..o1 {
            let s = span_start(dims, o, tile.start);
            // SAFETY: the span of `tile` in image `o` holds runs of the tile's channels only,
            // which only the caller processes (and, for `dy` in `dx`, writes after these sums);
            // it is released before the next is taken.
            let SpanIo { x: xs, dy: dys, res, dr: mut out } =
                unsafe { span_io::<MASK>(s, l, x, dy, mask, dr) };
            for_vectors::<I>(
                l,
                #[inline(always)]
                |r, full| {
                    isa.prefetch(xs[r.start..].as_ptr().wrapping_add(ahead));
                    isa.prefetch(dys[r.start..].as_ptr().wrapping_add(ahead));
                    let (xv, gv) = gradient_at::<I, MASK>(isa, xs, dys, res, a, r.clone(), full);
                    if let Some(o) = out.as_deref_mut() {
                        store_r(isa, o, r.clone(), full, gv);
                    }
                    let xm = isa.sub(xv, load_r(isa, &ms[..], r.clone(), full));
                    let (sd, sx) =
                        (load_r(isa, &sdy[..], r.clone(), full), load_r(isa, &sxm[..], r.clone(), full));
                    store_r(isa, &mut sdy[..], r.clone(), full, isa.add(sd, gv));
                    store_r(isa, &mut sxm[..], r, full, isa.mul_add(gv, xm, sx));
                },
            );
        }
        for (j, o) in out.iter_mut().enumerate().take(g) {
            o.0 += lane_sum(sdy, inner, j);
            o.1 += lane_sum(sxm, inner, j);
        }
        o0 = o1;
    }
}

/// What a backward pass reads and writes in the span of `l` lanes at `s` (a tile's channels in
/// one image): `x`, `dy`, the residual (for a gradient of kind `ADD_RELU`, else empty) and, for a
/// masked gradient, the span of its `dr` output when one is given.
///
/// # Safety
///
/// Only the caller may access that span of `dr` until it releases the returned slice, and, with
/// `dy` in `dx`, no slice of `dx` overlapping the span may be alive while `dy`'s is.
#[inline(always)]
unsafe fn span_io<'a, 'b, const MASK: u8>(
    s: usize,
    l: usize,
    x: &'b [f32],
    dy: Grad<'b, '_>,
    mask: &FusedRelu<'b>,
    dr: Option<&SharedMut<'a, f32>>,
) -> SpanIo<'a, 'b> {
    let res = if MASK == ADD_RELU { &mask.residual.unwrap_or(&[])[s..s + l] } else { &[] };
    // SAFETY: the caller's contract above.
    let dr = dr.filter(|_| MASK != NONE).map(|d| unsafe { d.slice(s, l) });
    // SAFETY: the caller's contract above.
    let dy = unsafe { dy.read(s, l) };
    SpanIo { x: &x[s..s + l], dy, res, dr }
}

/// The slices [`span_io`] returns.
struct SpanIo<'a, 'b> {
    x: &'b [f32],
    dy: &'b [f32],
    res: &'b [f32],
    dr: Option<&'a mut [f32]>,
}

/// The values `x` and the gradient of the normalize's output (`dy` through the fused ReLU of
/// kind `MASK`) at the lanes `r` of a span.
#[inline(always)]
fn gradient_at<I: Isa, const MASK: u8>(
    isa: I,
    xs: &[f32],
    dys: &[f32],
    res: &[f32],
    a: &[[f32; SPAN]; 3],
    r: Range<usize>,
    full: bool,
) -> (I::V, I::V) {
    let xv = load_r(isa, xs, r.clone(), full);
    let av = mask_at::<I, MASK>(isa, a, r.clone(), full);
    let gv = masked::<I, MASK>(
        isa,
        xv,
        load_r(isa, dys, r.clone(), full),
        av,
        #[inline(always)]
        || load_r(isa, res, r, full),
    );
    (xv, gv)
}

/// `dx` (and the masked gradient into `dr` when given) of the channels `channels`, tile by
/// tile, from per-channel coefficients (`coefficients[c - channels.start]`). With `dy` in `dx`,
/// each span's `dx` is written over its gradient, vector by vector after reading it (then `dr`
/// must be `None`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx<I: Isa, const MASK: u8>(
    isa: I,
    dims: Canonical,
    x: &[f32],
    dy: Grad<'_, '_>,
    mask: &FusedRelu<'_>,
    dx: &SharedMut<'_, f32>,
    dr: Option<&SharedMut<'_, f32>>,
    tile: Range<usize>,
    coefficients: &[DxCoefficients],
    scratch: &mut Scratch,
) {
    let (inner, l) = (dims.inner, tile.len() * dims.inner);
    let Scratch { params: k, mask: a, .. } = scratch;
    for (j, q) in coefficients.iter().enumerate() {
        fill_lanes(&mut k[0], inner, j, q.m);
        fill_lanes(&mut k[1], inner, j, q.k1);
        fill_lanes(&mut k[2], inner, j, q.k2);
        fill_lanes(&mut k[3], inner, j, q.k3);
    }
    mask_lanes::<MASK>(mask, inner, tile.clone(), a);
    for o in 0..dims.outer {
        let s = span_start(dims, o, tile.start);
        // SAFETY: the span of `tile` in image `o` holds runs of the tile's channels only, which
        // only this task processes; it is released before the next is taken.
        let out = unsafe { dx.slice(s, l) };
        let (xs, dys) = (&x[s..s + l], dy.apart(s, l));
        let res = if MASK == ADD_RELU { &mask.residual.unwrap_or(&[])[s..s + l] } else { &[] };
        assert!(dys.is_some() || dr.is_none(), "the masked gradient needs the gradient apart from dx");
        // SAFETY: as for `dx` (the same span of another output).
        let mut dr = dr.filter(|_| MASK != NONE).map(|d| unsafe { d.slice(s, l) });
        prefetch_span(isa, out.as_ptr().wrapping_add(stride(dims)), l);
        for_vectors::<I>(
            l,
            #[inline(always)]
            |r, full| {
                let g = dys.unwrap_or(&*out);
                let (xv, gv) = gradient_at::<I, MASK>(isa, xs, g, res, a, r.clone(), full);
                if let Some(d) = dr.as_deref_mut() {
                    store_r(isa, d, r.clone(), full, gv);
                }
                let kv = [
                    load_r(isa, &k[0], r.clone(), full),
                    load_r(isa, &k[1], r.clone(), full),
                    load_r(isa, &k[2], r.clone(), full),
                    load_r(isa, &k[3], r.clone(), full),
                ];
                store_r(isa, out, r, full, dx_train(isa, xv, gv, kv[0], kv[1], kv[2], kv[3]));
            },
        );
    }
}

/// Tiles of `channels` for the backward (which re-reads `x` and `dy`).
#[inline(always)]
pub(super) fn backward_tiles(dims: Canonical, channels: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    tiles(dims, channels, 2)
}
