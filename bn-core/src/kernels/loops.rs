//! The shared loops of the kernel bodies: inputs and outputs read and written in step
//! ([`Io`]: two slices, or one in place), and the vector walks over them.

use super::epilogue::{Apply, Identity};
use super::parallel::for_each_chunk_mut;
use super::simd::Isa;
use super::vector::{load_params, Pos};

/// Reads `x` and writes `y` in step, the same positions: either two slices or one in place.
///
/// One loop body serves both, which is what makes `normalize_inplace` bit-identical to
/// `normalize`.
pub(crate) trait Io: Send + Sized {
    /// Whether the output is apart from the input (not in place): streaming stores may be used
    /// (in place the line was just read), and a value may be computed and stored twice.
    const STREAM: bool;
    /// A sub-range of the same kind.
    type Part<'b>: Io
    where
        Self: 'b;
    /// Number of values.
    fn len(&self) -> usize;
    /// Input value `i`.
    fn get(&self, i: usize) -> f32;
    /// Writes output value `i`.
    fn set(&mut self, i: usize, v: f32);
    /// The values `start..end`.
    fn part(&mut self, start: usize, end: usize) -> Self::Part<'_>;
    /// Calls `f(k, chunk)` for the consecutive chunks of `chunk` values (the last may be
    /// shorter), on the current Rayon pool when `parallel`.
    fn for_each_chunk(self, parallel: bool, chunk: usize, f: impl Fn(usize, Self) + Sync + Send);
    /// `out = f(pos, in)` for the whole vectors from `start` (`(end - start) % LANES == 0`),
    /// with streaming stores when `stream` (the output at `start` must then be aligned).
    fn map_full<I: Isa>(
        &mut self,
        isa: I,
        start: usize,
        end: usize,
        stream: bool,
        f: &mut impl FnMut(Pos, I::V) -> I::V,
    );
    /// `out = f(p, in)` for the whole vectors of `0..full` (`full % LANES == 0`), `p` the vectors
    /// of `params` at the same offsets (each holds at least `full` values): the bounds of every
    /// slice are known to the loop, which then checks nothing. With `stream` (the output must
    /// then start on a `4 * LANES`-byte boundary) the stores are non-temporal.
    fn map_full_params<I: Isa, const P: usize>(
        &mut self,
        isa: I,
        full: usize,
        params: [&[f32]; P],
        stream: bool,
        f: &mut impl FnMut([I::V; P], I::V) -> I::V,
    );
    /// `out = f(pos, in)` for the fewer than `LANES` values `start..end` (masked), with
    /// non-temporal stores when `stream` (see [`Isa::stream_tail`]).
    #[inline(always)]
    fn map_partial<I: Isa>(
        &mut self,
        isa: I,
        start: usize,
        end: usize,
        stream: bool,
        f: &mut impl FnMut(Pos, I::V) -> I::V,
    ) {
        let mut part = self.part(start, end);
        let v = f(Pos { i: start, n: end - start }, part.load_tail(isa));
        if stream {
            part.stream_tail(isa, v);
        } else {
            part.store_tail(isa, v);
        }
    }
    /// All the input values (fewer than `LANES`), zeros above.
    fn load_tail<I: Isa>(&self, isa: I) -> I::V;
    /// Writes all the output values (fewer than `LANES`) from the low lanes of `v`.
    fn store_tail<I: Isa>(&mut self, isa: I, v: I::V);
    /// [`Io::store_tail`] with non-temporal stores where the output may be streamed.
    #[inline(always)]
    fn stream_tail<I: Isa>(&mut self, isa: I, v: I::V) {
        self.store_tail(isa, v)
    }
    /// The output's offset, in values, from the previous `4 * LANES`-byte boundary.
    fn misalignment<I: Isa>(&self) -> usize;
}

/// Separate input and output slices of the same length, and the output's epilogue.
pub(crate) struct Split<'a, A = Identity> {
    pub x: &'a [f32],
    pub y: &'a mut [f32],
    pub act: A,
}

/// One slice read and overwritten, and the output's epilogue.
pub(crate) struct InPlace<'a, A = Identity>(pub &'a mut [f32], pub A);

impl<'a, A: Apply> Io for Split<'a, A> {
    const STREAM: bool = true;
    type Part<'b>
        = Split<'b, A>
    where
        Self: 'b;
    #[inline(always)]
    fn len(&self) -> usize {
        self.x.len()
    }
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        self.x[i]
    }
    #[inline(always)]
    fn set(&mut self, i: usize, v: f32) {
        self.y[i] = self.act.apply1(i, v);
    }
    #[inline(always)]
    fn part(&mut self, start: usize, end: usize) -> Split<'_, A> {
        Split { x: &self.x[start..end], y: &mut self.y[start..end], act: self.act.part(start, end) }
    }
    fn for_each_chunk(self, parallel: bool, chunk: usize, f: impl Fn(usize, Self) + Sync + Send) {
        assert_eq!(self.x.len(), self.y.len());
        let (x, act) = (self.x, self.act);
        for_each_chunk_mut(parallel, self.y, chunk, |k, r, y| {
            f(k, Split { x: &x[r.clone()], y, act: act.part(r.start, r.end) })
        });
    }
    #[inline(always)]
    fn map_full<I: Isa>(
        &mut self,
        isa: I,
        start: usize,
        end: usize,
        stream: bool,
        f: &mut impl FnMut(Pos, I::V) -> I::V,
    ) {
        let l = I::LANES;
        let (x, y) = (&self.x[start..end], &mut self.y[start..end]);
        let n = x.len();
        assert_eq!(y.len(), n);
        let mut i = 0;
        let act = self.act;
        if stream {
            while i + l <= n {
                let pos = Pos { i: start + i, n: l };
                isa.stream(&mut y[i..i + l], act.apply(isa, pos, f(pos, isa.load(&x[i..i + l]))));
                i += l;
            }
        } else {
            while i + l <= n {
                let pos = Pos { i: start + i, n: l };
                isa.store(&mut y[i..i + l], act.apply(isa, pos, f(pos, isa.load(&x[i..i + l]))));
                i += l;
            }
        }
    }
    #[inline(always)]
    fn map_full_params<I: Isa, const P: usize>(
        &mut self,
        isa: I,
        full: usize,
        params: [&[f32]; P],
        stream: bool,
        f: &mut impl FnMut([I::V; P], I::V) -> I::V,
    ) {
        let l = I::LANES;
        let (x, y) = (&self.x[..full], &mut self.y[..full]);
        let mut p: [&[f32]; P] = [&[]; P];
        for k in 0..P {
            p[k] = &params[k][..full];
        }
        let act = self.act;
        let mut i = 0;
        if stream {
            while i + l <= full {
                // SAFETY: every `p[k]` holds `full` values (cut above) and `i + l <= full`.
                let v = unsafe { load_params(isa, &p, i) };
                isa.stream(&mut y[i..i + l], act.apply(isa, Pos { i, n: l }, f(v, isa.load(&x[i..i + l]))));
                i += l;
            }
        } else {
            while i + l <= full {
                // SAFETY: every `p[k]` holds `full` values (cut above) and `i + l <= full`.
                let v = unsafe { load_params(isa, &p, i) };
                isa.store(&mut y[i..i + l], act.apply(isa, Pos { i, n: l }, f(v, isa.load(&x[i..i + l]))));
                i += l;
            }
        }
    }
    #[inline(always)]
    fn load_tail<I: Isa>(&self, isa: I) -> I::V {
        isa.load_tail(self.x)
    }
    #[inline(always)]
    fn store_tail<I: Isa>(&mut self, isa: I, v: I::V) {
        let n = self.x.len();
        isa.store_tail(&mut self.y[..n], self.act.apply(isa, Pos { i: 0, n }, v))
    }
    #[inline(always)]
    fn stream_tail<I: Isa>(&mut self, isa: I, v: I::V) {
        let n = self.x.len();
        isa.stream_tail(&mut self.y[..n], self.act.apply(isa, Pos { i: 0, n }, v))
    }
    #[inline(always)]
    fn misalignment<I: Isa>(&self) -> usize {
        (self.y.as_ptr() as usize / 4) % I::LANES
    }
}

impl<'a, A: Apply> Io for InPlace<'a, A> {
    const STREAM: bool = false;
    type Part<'b>
        = InPlace<'b, A>
    where
        Self: 'b;
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        self.0[i]
    }
    #[inline(always)]
    fn set(&mut self, i: usize, v: f32) {
        self.0[i] = self.1.apply1(i, v);
    }
    #[inline(always)]
    fn part(&mut self, start: usize, end: usize) -> InPlace<'_, A> {
        InPlace(&mut self.0[start..end], self.1.part(start, end))
    }
    fn for_each_chunk(self, parallel: bool, chunk: usize, f: impl Fn(usize, Self) + Sync + Send) {
        let act = self.1;
        for_each_chunk_mut(parallel, self.0, chunk, |k, r, xy| f(k, InPlace(xy, act.part(r.start, r.end))));
    }
    #[inline(always)]
    fn map_full<I: Isa>(
        &mut self,
        isa: I,
        start: usize,
        end: usize,
        _stream: bool,
        f: &mut impl FnMut(Pos, I::V) -> I::V,
    ) {
        let l = I::LANES;
        let act = self.1;
        let xy = &mut self.0[start..end];
        let n = xy.len();
        let mut i = 0;
        while i + l <= n {
            let pos = Pos { i: start + i, n: l };
            let v = act.apply(isa, pos, f(pos, isa.load(&xy[i..i + l])));
            isa.store(&mut xy[i..i + l], v);
            i += l;
        }
    }
    #[inline(always)]
    fn map_full_params<I: Isa, const P: usize>(
        &mut self,
        isa: I,
        full: usize,
        params: [&[f32]; P],
        _stream: bool,
        f: &mut impl FnMut([I::V; P], I::V) -> I::V,
    ) {
        let l = I::LANES;
        let act = self.1;
        let xy = &mut self.0[..full];
        let mut p: [&[f32]; P] = [&[]; P];
        for k in 0..P {
            p[k] = &params[k][..full];
        }
        let mut i = 0;
        while i + l <= full {
            // SAFETY: every `p[k]` holds `full` values (cut above) and `i + l <= full`.
            let v = unsafe { load_params(isa, &p, i) };
            let r = act.apply(isa, Pos { i, n: l }, f(v, isa.load(&xy[i..i + l])));
            isa.store(&mut xy[i..i + l], r);
            i += l;
        }
    }
    #[inline(always)]
    fn load_tail<I: Isa>(&self, isa: I) -> I::V {
        isa.load_tail(self.0)
    }
    #[inline(always)]
    fn store_tail<I: Isa>(&mut self, isa: I, v: I::V) {
        let n = self.0.len();
        isa.store_tail(self.0, self.1.apply(isa, Pos { i: 0, n }, v))
    }
    #[inline(always)]
    fn misalignment<I: Isa>(&self) -> usize {
        (self.0.as_ptr() as usize / 4) % I::LANES
    }
}

/// `out[i] = f(pos, in[i])` over `io`, one vector at a time (masked tail); `f` gets the position
/// of the vector so that per-column parameters can be loaded there ([`load_at`](super::vector::load_at)).
///
/// With `stream` (ignored for in-place outputs) the full vectors are written with non-temporal
/// stores: a partial vector first, up to the output's first `4 * LANES`-byte boundary. The values
/// are the same either way; only the stores differ.
///
/// With `overlap` (for an `f` that depends on nothing but its arguments), an output of at least
/// one vector that is not streamed and not in place ends with the whole vector of its last
/// `LANES` values instead of a masked one: the lanes it shares with the vector before are
/// computed again from the same inputs, to the same bits. Masked stores are slow on some CPUs
/// (AMD Zen 3: runs of 49 values, one masked store per seven vectors).
#[inline(always)]
pub(crate) fn map<I: Isa, T: Io>(
    isa: I,
    io: &mut T,
    stream: bool,
    overlap: bool,
    mut f: impl FnMut(Pos, I::V) -> I::V,
) {
    let n = io.len();
    let stream = stream && T::STREAM;
    let head = if stream { ((I::LANES - io.misalignment::<I>()) % I::LANES).min(n) } else { 0 };
    if head > 0 {
        io.map_partial(isa, 0, head, stream, &mut f);
    }
    let full = head + (n - head) / I::LANES * I::LANES;
    io.map_full(isa, head, full, stream, &mut f);
    if full < n {
        if overlap && T::STREAM && !stream && n >= I::LANES {
            io.map_full(isa, n - I::LANES, n, false, &mut f);
        } else {
            io.map_partial(isa, full, n, stream, &mut f);
        }
    }
}

/// `out = f(p, in)` over `io`, `p` the vectors of `params` at the same offsets (per-column
/// parameters of a row: each holds at least `io.len()` values); masked tail. No streaming.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) fn map_params<I: Isa, T: Io, const P: usize>(
    isa: I,
    io: &mut T,
    params: [&[f32]; P],
    mut f: impl FnMut([I::V; P], I::V) -> I::V,
) {
    let n = io.len();
    let full = n - n % I::LANES;
    io.map_full_params(isa, full, params, false, &mut f);
    if full < n {
        let mut v = [isa.zero(); P];
        for k in 0..P {
            v[k] = isa.load_tail(&params[k][full..n]);
        }
        io.map_partial(isa, full, n, false, &mut |_, x| f(v, x));
    }
}

/// `out = f(p, in)` over `io`, a stream of whole periods of `w` values (a multiple of `LANES`)
/// from column 0 and a shorter remainder, `p` the vectors of per-column parameters at each
/// value's column: each of `params` holds the period twice (`2 w` values), so that the columns
/// of any `w` consecutive values are contiguous in it. With `stream`, the output is written with
/// non-temporal stores from its first `4 * LANES`-byte boundary on (as [`map`]), and the loop
/// runs period by period with the parameters' offsets fixed: no per-vector column arithmetic
/// or bounds checks.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) fn map_periodic<I: Isa, T: Io, const P: usize>(
    isa: I,
    io: &mut T,
    stream: bool,
    w: usize,
    params: [&[f32]; P],
    mut f: impl FnMut([I::V; P], I::V) -> I::V,
) {
    let l = I::LANES;
    assert!(w > 0 && w.is_multiple_of(l));
    for p in params {
        assert!(p.len() >= 2 * w);
    }
    let n = io.len();
    let stream = stream && T::STREAM;
    // Before the first aligned vector: columns `0..head`.
    let head = if stream { ((l - io.misalignment::<I>()) % l).min(n) } else { 0 };
    if head > 0 {
        let mut v = [isa.zero(); P];
        for k in 0..P {
            v[k] = isa.load_tail(&params[k][..head]);
        }
        io.map_partial(isa, 0, head, stream, &mut |_, x| f(v, x));
    }
    // Every later period starts at column `head`.
    let mut shifted: [&[f32]; P] = [&[]; P];
    for k in 0..P {
        shifted[k] = &params[k][head..head + w];
    }
    let mut start = head;
    while start + w <= n {
        io.part(start, start + w).map_full_params(isa, w, shifted, stream, &mut f);
        start += w;
    }
    let rest = n - start;
    let full = rest - rest % l;
    if full > 0 {
        io.part(start, start + full).map_full_params(isa, full, shifted, stream, &mut f);
    }
    if full < rest {
        let mut v = [isa.zero(); P];
        for k in 0..P {
            v[k] = isa.load_tail(&shifted[k][full..rest]);
        }
        io.map_partial(isa, start + full, n, stream, &mut |_, x| f(v, x));
    }
}

/// [`Isa::stream_tail`] when `stream`, else [`Isa::store_tail`].
#[inline(always)]
fn store_partial<I: Isa>(isa: I, s: &mut [f32], v: I::V, stream: bool) {
    if stream {
        isa.stream_tail(s, v)
    } else {
        isa.store_tail(s, v)
    }
}

/// The whole vectors of [`map2_periodic`] in `start..start + len` (`len <= w`, a multiple of
/// `LANES`), `params` starting at the columns of `start`; `dy` as in [`map2`].
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn map2_whole<I: Isa, const P: usize>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    dx: &mut [f32],
    start: usize,
    len: usize,
    params: [&[f32]; P],
    stream: bool,
    f: &mut impl FnMut(Pos, [I::V; P], I::V, I::V) -> I::V,
) {
    let l = I::LANES;
    let (xs, ds) = (&x[start..start + len], &mut dx[start..start + len]);
    let gs = dy.map(|dy| &dy[start..start + len]);
    let mut ps: [&[f32]; P] = [&[]; P];
    for k in 0..P {
        ps[k] = &params[k][..len];
    }
    let mut i = 0;
    while i + l <= len {
        // SAFETY: every `ps[k]` holds `len` values (cut above) and `i + l <= len`.
        let v = unsafe { load_params(isa, &ps, i) };
        let g = isa.load(&gs.unwrap_or(&*ds)[i..i + l]);
        let g = f(Pos { i: start + i, n: l }, v, isa.load(&xs[i..i + l]), g);
        if stream {
            isa.stream(&mut ds[i..i + l], g);
        } else {
            isa.store(&mut ds[i..i + l], g);
        }
        i += l;
    }
}

/// `dx[i] = f(pos, p, x[i], dy[i])` over slices of one length, a stream of whole periods of `w`
/// values (a multiple of `LANES`) from column 0 and a shorter remainder, `p` the vectors of
/// per-column parameters (each of `params` holds the period twice, as in [`map_periodic`]);
/// `pos` is the data position (for tensors aligned with `dx`). `dy` as in [`map2`]; with
/// `stream` (ignored in place), non-temporal stores as in [`map2`].
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
pub(crate) fn map2_periodic<I: Isa, const P: usize>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    dx: &mut [f32],
    stream: bool,
    w: usize,
    params: [&[f32]; P],
    mut f: impl FnMut(Pos, [I::V; P], I::V, I::V) -> I::V,
) {
    let l = I::LANES;
    let n = dx.len();
    assert!(x.len() == n && dy.is_none_or(|dy| dy.len() == n) && w > 0 && w.is_multiple_of(l));
    for p in params {
        assert!(p.len() >= 2 * w);
    }
    let stream = stream && dy.is_some();
    let head = if stream { ((l - (dx.as_ptr() as usize / 4) % l) % l).min(n) } else { 0 };
    if head > 0 {
        let mut v = [isa.zero(); P];
        for k in 0..P {
            v[k] = isa.load_tail(&params[k][..head]);
        }
        let g = isa.load_tail(&dy.unwrap_or(&*dx)[..head]);
        let g = f(Pos { i: 0, n: head }, v, isa.load_tail(&x[..head]), g);
        store_partial(isa, &mut dx[..head], g, stream);
    }
    let mut shifted: [&[f32]; P] = [&[]; P];
    for k in 0..P {
        shifted[k] = &params[k][head..head + w];
    }
    // Whole vectors of `start..start + len` (`len <= w`, a multiple of `LANES`), columns from
    // `head`.
    let mut start = head;
    while start + w <= n {
        map2_whole(isa, x, dy, dx, start, w, shifted, stream, &mut f);
        start += w;
    }
    let rest = n - start;
    let full = rest - rest % l;
    if full > 0 {
        map2_whole(isa, x, dy, dx, start, full, shifted, stream, &mut f);
    }
    if full < rest {
        let mut v = [isa.zero(); P];
        for k in 0..P {
            v[k] = isa.load_tail(&shifted[k][full..rest]);
        }
        let (a, b) = (start + full, n);
        let g = isa.load_tail(&dy.unwrap_or(&*dx)[a..b]);
        let g = f(Pos { i: a, n: b - a }, v, isa.load_tail(&x[a..b]), g);
        store_partial(isa, &mut dx[a..b], g, stream);
    }
}

/// `dx[i] = f(pos, x[i], dy[i])` over slices of one length, one vector at a time.
///
/// `dy: None` reads the gradient from `dx` itself, which the walk overwrites (in place): each
/// vector is loaded before it is stored, and the options below that would store a value before
/// loading it, or store it twice, are off. With `stream` (ignored in place), non-temporal stores
/// as in [`map`]; with `overlap`, a whole last vector instead of a masked one where the output is
/// not streamed and not in place, as in [`map`].
#[inline(always)]
pub(crate) fn map2<I: Isa>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    dx: &mut [f32],
    stream: bool,
    overlap: bool,
    mut f: impl FnMut(Pos, I::V, I::V) -> I::V,
) {
    let n = dx.len();
    assert!(x.len() == n && dy.is_none_or(|dy| dy.len() == n));
    let (stream, overlap) = (stream && dy.is_some(), overlap && dy.is_some());
    let l = I::LANES;
    let head = if stream { ((l - (dx.as_ptr() as usize / 4) % l) % l).min(n) } else { 0 };
    if head > 0 {
        let g = isa.load_tail(&dy.unwrap_or(&*dx)[..head]);
        let v = f(Pos { i: 0, n: head }, isa.load_tail(&x[..head]), g);
        store_partial(isa, &mut dx[..head], v, stream);
    }
    let full = head + (n - head) / l * l;
    let (xb, db) = (&x[head..full], &mut dx[head..full]);
    let gb = dy.map(|dy| &dy[head..full]);
    let len = db.len();
    assert!(xb.len() == len);
    let mut i = 0;
    if stream {
        while i + l <= len {
            let g = isa.load(&gb.unwrap_or(&*db)[i..i + l]);
            let v = f(Pos { i: head + i, n: l }, isa.load(&xb[i..i + l]), g);
            isa.stream(&mut db[i..i + l], v);
            i += l;
        }
    } else {
        while i + l <= len {
            let g = isa.load(&gb.unwrap_or(&*db)[i..i + l]);
            let v = f(Pos { i: head + i, n: l }, isa.load(&xb[i..i + l]), g);
            isa.store(&mut db[i..i + l], v);
            i += l;
        }
    }
    if full < n && overlap && !stream && n >= l {
        let i = n - l;
        let g = isa.load(&dy.unwrap_or(&*dx)[i..]);
        let v = f(Pos { i, n: l }, isa.load(&x[i..]), g);
        isa.store(&mut dx[i..], v);
    } else if full < n {
        let pos = Pos { i: full, n: n - full };
        let g = isa.load_tail(&dy.unwrap_or(&*dx)[full..]);
        let v = f(pos, isa.load_tail(&x[full..]), g);
        store_partial(isa, &mut dx[full..], v, stream);
    }
}

/// Calls `f(k, x, dy, dx)` on the `k`-th chunks of `chunk` values of `x`, `dx` and, when given,
/// `dy` (`None`: the gradient is in `dx`, as in [`map2`]).
pub(crate) fn for_each_chunk3(
    parallel: bool,
    x: &[f32],
    dy: Option<&[f32]>,
    dx: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &[f32], Option<&[f32]>, &mut [f32]) + Sync + Send,
) {
    assert!(x.len() == dx.len() && dy.is_none_or(|dy| dy.len() == dx.len()));
    for_each_chunk_mut(parallel, dx, chunk, |k, r, dx| f(k, &x[r.clone()], dy.map(|dy| &dy[r]), dx));
}
