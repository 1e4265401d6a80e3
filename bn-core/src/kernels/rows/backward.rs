//! The backward of the rows family: the sums per tile (with the gradient of a fused ReLU
//! recomputed from `x`), their ordered merge, the `dx` pass; with frozen statistics, one pass.
//! The two reductions and the `dx` pass on their own serve the synchronized backward.

use core::marker::PhantomData;
use core::ops::Range;

use super::elementwise::{next_col, pattern};
use super::geometry::{column_sums, virtual_width, Geometry, TileBuf};
use super::statistics::run_tasks;
use crate::kernels::epilogue::{masked, residual_of, FusedRelu, ADD_RELU, NONE, RELU};
use crate::kernels::loops::{for_each_chunk3, map2, map2_periodic};
use crate::kernels::parallel::{streaming, task_count, use_pool, SharedMut, TASK_ELEMS};
use crate::kernels::simd::{Isa, Kernel, Serial};
use crate::kernels::stats::{sum_dy_xhat, DxCoefficients};
use crate::kernels::vector::{dx_train, load_at, Pos};
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// The forward's transform behind a fused ReLU (per-channel `mask.mean, scale, shift`) as per-virtual-column
/// patterns of `len` values (whole periods), built in `buf`; the residual is kept. Nothing for a
/// [`NONE`] kernel.
fn mask_patterns<'a, const MASK: u8>(
    mask: FusedRelu<'a>,
    c: usize,
    len: usize,
    buf: &'a mut Vec<f32>,
) -> FusedRelu<'a> {
    if MASK == NONE {
        return FusedRelu::default();
    }
    buf.resize(3 * len, 0.0);
    let (m, rest) = buf.split_at_mut(len);
    let (s, t) = rest.split_at_mut(len);
    for (out, per_channel) in [(&mut *m, mask.mean), (&mut *s, mask.scale), (&mut *t, mask.shift)] {
        pattern(len, c, out, |j| per_channel[j]);
    }
    FusedRelu { mean: m, scale: s, shift: t, residual: mask.residual }
}

/// The patterns' columns `cols` (the tile's parameters).
#[inline(always)]
fn mask_cols<'a>(mask: &FusedRelu<'a>, cols: Range<usize>) -> [&'a [f32]; 3] {
    if mask.mean.is_empty() {
        [&[]; 3]
    } else {
        [&mask.mean[cols.clone()], &mask.scale[cols.clone()], &mask.shift[cols]]
    }
}

/// The forward's transform at `pos` of patterns `f` as vectors (zeros for a [`NONE`] kernel).
#[inline(always)]
fn mask_at<I: Isa, const MASK: u8>(isa: I, f: [&[f32]; 3], pos: Pos) -> [I::V; 3] {
    if MASK == NONE {
        [isa.zero(); 3]
    } else {
        [load_at(isa, f[0], pos), load_at(isa, f[1], pos), load_at(isa, f[2], pos)]
    }
}

/// `(sum(g), sum(g * (x - m_j)))` of one block × tile, added (in `f64`) to the chunk's sums, `g`
/// the gradient of kind `MASK` (`mask`: patterns of at least `W` values and the whole residual).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_backward_sums<I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: &FusedRelu<'_>,
    g: &Geometry,
    rows: Range<usize>,
    cols: Range<usize>,
    m: &[f32],
    buf: &mut TileBuf,
    sum_dy: &mut [f64],
    sum_xm: &mut [f64],
) {
    let f = mask_cols(mask, cols.clone());
    let m = &m[cols.clone()];
    let (sdy, sxm) = (&mut buf.a, &mut buf.b);
    // Masked lanes of `dy` (and of a masked gradient) are zero, so their products vanish.
    if MASK == NONE {
        column_sums!(
            isa,
            2,
            1,
            2,
            [x, dy],
            g,
            rows,
            cols.clone(),
            [m],
            #[inline(always)]
            |_, [x, g], [m], [a, b]| [isa.add(a, g), isa.mul_add(g, isa.sub(x, m), b)],
            #[inline(always)]
            |pos, [s, q]| {
                isa.store(&mut sdy[pos.i..], s);
                isa.store(&mut sxm[pos.i..], q);
            }
        );
    } else if MASK == RELU {
        column_sums!(
            isa,
            2,
            4,
            2,
            [x, dy],
            g,
            rows,
            cols.clone(),
            [m, f[0], f[1], f[2]],
            #[inline(always)]
            |_, [x, g], [m, fm, fs, ft], [a, b]| {
                let g = masked::<I, RELU>(
                    isa,
                    x,
                    g,
                    [fm, fs, ft],
                    #[inline(always)]
                    || isa.zero(),
                );
                [isa.add(a, g), isa.mul_add(g, isa.sub(x, m), b)]
            },
            #[inline(always)]
            |pos, [s, q]| {
                isa.store(&mut sdy[pos.i..], s);
                isa.store(&mut sxm[pos.i..], q);
            }
        );
    } else {
        column_sums!(
            isa,
            3,
            4,
            2,
            [x, dy, mask.residual.unwrap_or(&[])],
            g,
            rows,
            cols.clone(),
            [m, f[0], f[1], f[2]],
            #[inline(always)]
            |_, [x, g, r], [m, fm, fs, ft], [a, b]| {
                let g = masked::<I, ADD_RELU>(
                    isa,
                    x,
                    g,
                    [fm, fs, ft],
                    #[inline(always)]
                    || r,
                );
                [isa.add(a, g), isa.mul_add(g, isa.sub(x, m), b)]
            },
            #[inline(always)]
            |pos, [s, q]| {
                isa.store(&mut sdy[pos.i..], s);
                isa.store(&mut sxm[pos.i..], q);
            }
        );
    }
    for j in 0..cols.len() {
        sum_dy[j] += buf.a[j] as f64;
        sum_xm[j] += buf.b[j] as f64;
    }
}

/// `out = ` the gradient of kind `MASK` over a segment whose column at position `p` is `p` of
/// the patterns `f` (`res`: the residual's values of the segment, when `ADD_RELU`).
#[inline(always)]
fn write_masked<I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    res: &[f32],
    f: [&[f32]; 3],
    out: &mut [f32],
) {
    map2(
        isa,
        x,
        Some(dy),
        out,
        false,
        false,
        #[inline(always)]
        |p, x, g| {
            masked::<I, MASK>(
                isa,
                x,
                g,
                mask_at::<I, MASK>(isa, f, p),
                #[inline(always)]
                || load_at(isa, res, p),
            )
        },
    );
}

/// Backward sums of chunk `p`, column tile `t` (flat task index `q = p * tiles + t`) of the
/// gradient of kind `MASK`; with `dx_scale`, also `dx = g * dx_scale_j` (the frozen-statistics
/// backward, one pass). With `dr`, the tasks are whole chunks `p` (all their tiles): the
/// gradient of each block of rows is written to `dr` first and the tiles' sums (and `dx`) read
/// it back from cache, in the same order, so the same bits.
struct ChunkBackward<'a, 's, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: &'a [f32],
    pub(super) mask: FusedRelu<'a>,
    pub(super) dims: Canonical,
    pub(super) m: &'a [f32],
    pub(super) tasks: Range<usize>,
    pub(super) sum_dy: &'a SharedMut<'s, f64>,
    pub(super) sum_xm: &'a SharedMut<'s, f64>,
    pub(super) dx: Option<(&'a SharedMut<'s, f32>, &'a [f32])>,
    pub(super) dr: Option<&'a SharedMut<'s, f32>>,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for ChunkBackward<'_, '_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        let mut buf = TileBuf::new();
        if let (false, Some(dr)) = (MASK == NONE, self.dr) {
            let f = mask_cols(&self.mask, 0..g.w);
            for p in self.tasks.clone() {
                let rows = g.chunk(p);
                let base = rows.start * g.w;
                let span = base..base + rows.len() * g.w;
                // SAFETY: the rows of chunk `p` belong to this task only (tasks are chunks).
                let gr = unsafe { dr.slice(base, span.len()) };
                let (x, dy) = (&self.x[span.clone()], &self.dy[span.clone()]);
                let res = residual_of::<MASK>(&self.mask, span.clone());
                let mut r = rows.start;
                while r < rows.end {
                    let block = r..(r + g.block_rows).min(rows.end);
                    let local = block.start - rows.start..block.end - rows.start;
                    for row in local.clone() {
                        let row = row * g.w..(row + 1) * g.w;
                        let res = if MASK == ADD_RELU { &res[row.clone()] } else { res };
                        write_masked::<I, MASK>(isa, &x[row.clone()], &dy[row.clone()], res, f, &mut gr[row]);
                    }
                    for t in 0..g.tiles {
                        let cols = g.cols(t);
                        let at = p * g.w + cols.start;
                        // SAFETY: task `(p, t)`'s sums: chunk `p` is this task's only.
                        let (sum_dy, sum_xm) =
                            unsafe { (self.sum_dy.slice(at, cols.len()), self.sum_xm.slice(at, cols.len())) };
                        let no_mask = FusedRelu::default();
                        let (rows, m) = (local.clone(), self.m);
                        tile_backward_sums::<I, NONE>(
                            isa, x, gr, &no_mask, &g, rows, cols, m, &mut buf, sum_dy, sum_xm,
                        );
                    }
                    if let Some((dx, scale)) = self.dx {
                        for row in block.clone() {
                            let local = (row - rows.start) * g.w..(row - rows.start + 1) * g.w;
                            // SAFETY: row `row` lies in chunk `p`, which only this task writes;
                            // the slice is released at the end of the loop.
                            let dx = unsafe { dx.slice(row * g.w, g.w) };
                            map2(
                                isa,
                                &x[local.clone()],
                                Some(&gr[local]),
                                dx,
                                false,
                                false,
                                #[inline(always)]
                                |pos, _, g| isa.mul(g, load_at(isa, scale, pos)),
                            );
                        }
                    }
                    r = block.end;
                }
            }
            return;
        }
        for q in self.tasks.clone() {
            let (p, t) = (q / g.tiles, q % g.tiles);
            let (rows, cols) = (g.chunk(p), g.cols(t));
            let at = p * g.w + cols.start;
            // SAFETY: task `(p, t)` owns the sums of chunk `p`, columns `cols`; distinct tasks
            // own disjoint ranges, and `q` is processed by this kernel only.
            let (sum_dy, sum_xm) =
                unsafe { (self.sum_dy.slice(at, cols.len()), self.sum_xm.slice(at, cols.len())) };
            let f = mask_cols(&self.mask, cols.clone());
            let mut r = rows.start;
            while r < rows.end {
                let block = r..(r + g.block_rows).min(rows.end);
                tile_backward_sums::<I, MASK>(
                    isa,
                    self.x,
                    self.dy,
                    &self.mask,
                    &g,
                    block.clone(),
                    cols.clone(),
                    self.m,
                    &mut buf,
                    sum_dy,
                    sum_xm,
                );
                if let Some((dx, scale)) = self.dx {
                    let scale = &scale[cols.clone()];
                    for row in block.clone() {
                        let span = row * g.w + cols.start..row * g.w + cols.end;
                        // SAFETY: row `row`, columns `cols` lie in chunk `p`, tile `t`, which
                        // only this task writes; the slice is released at the end of the loop.
                        let dx = unsafe { dx.slice(span.start, span.len()) };
                        let (x, dy) = (&self.x[span.clone()], &self.dy[span.clone()]);
                        let res = residual_of::<MASK>(&self.mask, span.clone());
                        map2(
                            isa,
                            x,
                            Some(dy),
                            dx,
                            false,
                            false,
                            #[inline(always)]
                            |pos, x, g| {
                                let a = mask_at::<I, MASK>(isa, f, pos);
                                let g = masked::<I, MASK>(
                                    isa,
                                    x,
                                    g,
                                    a,
                                    #[inline(always)]
                                    || load_at(isa, res, pos),
                                );
                                isa.mul(g, load_at(isa, scale, pos))
                            },
                        );
                    }
                }
                r = block.end;
            }
        }
    }
}

/// Per-channel `(sum(g), sum(g * (x - m_c)))` of the rows family (`m` repeats per virtual
/// column), `g` the gradient of kind `MASK` (`mask`: patterns of at least `W` values), with
/// `dx = g * scale` (and `dr = g`) written on the way when `dx` is given.
#[allow(clippy::too_many_arguments)]
fn backward_sums<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dims: Canonical,
    parallel: bool,
    m: &[f32],
    dx: Option<(&mut [f32], &[f32])>,
    dr: Option<&mut [f32]>,
    sums: &mut [(f64, f64)],
) {
    let g = Geometry::new(dims);
    let tail = g.tail_start();
    let mut partial = vec![0.0; 2 * g.chunks * g.w];
    let (psdy, psxm) = partial.split_at_mut(g.chunks * g.w);
    let (mut dx_tail, mut dr_tail) = (None, None);
    {
        let (sdy, sxm) = (SharedMut::new(&mut *psdy), SharedMut::new(&mut *psxm));
        let dx = dx.map(|(dx, scale)| {
            let (body, rest) = dx.split_at_mut(tail);
            dx_tail = Some((rest, scale));
            (SharedMut::new(body), scale)
        });
        let dx = dx.as_ref().map(|(d, s)| (d, *s));
        let dr = dr.map(|dr| {
            let (body, rest) = dr.split_at_mut(tail);
            dr_tail = Some(rest);
            SharedMut::new(body)
        });
        let dr = dr.as_ref();
        let units = if dr.is_some() { g.chunks } else { g.chunks * g.tiles };
        run_tasks(parallel, units, dims.len(), |tasks| {
            let (sum_dy, sum_xm) = (&sdy, &sxm);
            isa.vectorize(ChunkBackward::<S, MASK> {
                x,
                dy,
                mask,
                dims,
                m,
                tasks,
                sum_dy,
                sum_xm,
                dx,
                dr,
                _spec: PhantomData,
            });
        });
    }
    // The tail's gradient (its columns start at 0), then its `dx` and `dr`.
    let mut masked_tail = Vec::new();
    let g_tail: &[f32] = if MASK == NONE {
        &dy[tail..]
    } else {
        masked_tail.resize(g.len - tail, 0.0);
        let f = mask_cols(&mask, 0..g.len - tail);
        let res = residual_of::<MASK>(&mask, tail..g.len);
        let out = &mut masked_tail[..];
        isa.vectorize(Serial(
            #[inline(always)]
            || write_masked::<I, MASK>(isa, &x[tail..], &dy[tail..], res, f, out),
        ));
        &masked_tail
    };
    if let Some((dx, scale)) = dx_tail {
        for (j, d) in dx.iter_mut().enumerate() {
            *d = g_tail[j] * scale[j];
        }
    }
    if let Some(dr) = dr_tail {
        dr.copy_from_slice(g_tail);
    }
    // Chunks summed into chunk 0 column by column, in order; then the virtual columns of each
    // channel, in order; then its tail values. Serial, compiled for the instruction set.
    isa.vectorize(Serial(
        #[inline(always)]
        || {
            for p in 1..g.chunks {
                let (first, rest) = psdy.split_at_mut(p * g.w);
                first[..g.w].iter_mut().zip(&rest[..g.w]).for_each(|(a, b)| *a += b);
                let (first, rest) = psxm.split_at_mut(p * g.w);
                first[..g.w].iter_mut().zip(&rest[..g.w]).for_each(|(a, b)| *a += b);
            }
            for (c, sum) in sums.iter_mut().enumerate() {
                let (mut sdy, mut sxm) = (0.0, 0.0);
                if g.chunks > 0 {
                    for v in (c..g.w).step_by(g.c) {
                        sdy += psdy[v];
                        sxm += psxm[v];
                    }
                }
                for i in (tail + c..g.len).step_by(g.c) {
                    let gi = g_tail[i - tail] as f64;
                    sdy += gi;
                    sxm += gi * (x[i] - m[c]) as f64;
                }
                *sum = (sdy, sxm);
            }
        },
    ));
}

/// `dx` of the training backward over whole virtual rows (and the tail) for the gradient of
/// kind `MASK` (`mask`: patterns of `2 W` values and the residual of these rows; `dr = g` when
/// given; coefficients of length `2 W`): period by period ([`map2_periodic`], streamed or not)
/// when `W` is a whole number of vectors, else row by row or, streamed, flat with a wrapped
/// column index. `dy: None` when the gradient is in `dx` (in place, [`map2`]).
struct DxRows<'a, S, const MASK: u8> {
    pub(super) x: &'a [f32],
    pub(super) dy: Option<&'a [f32]>,
    pub(super) dx: &'a mut [f32],
    pub(super) mask: FusedRelu<'a>,
    pub(super) dims: Canonical,
    pub(super) coefficients: [&'a [f32]; 4],
    pub(super) flat: bool,
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, const MASK: u8> Kernel for DxRows<'_, S, MASK> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let w = virtual_width(specialize::<S>(self.dims).channels);
        let [m, k1, k2, k3] = self.coefficients;
        let f = [self.mask.mean, self.mask.scale, self.mask.shift];
        /// `dx` at pattern position `p` (data position `pos` of the segment whose residual is
        /// `res`).
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn dx<I: Isa, const MASK: u8>(
            isa: I,
            c: [&[f32]; 4],
            f: [&[f32]; 3],
            res: &[f32],
            p: Pos,
            pos: Pos,
            x: I::V,
            g: I::V,
        ) -> I::V {
            let g = masked::<I, MASK>(
                isa,
                x,
                g,
                mask_at::<I, MASK>(isa, f, p),
                #[inline(always)]
                || load_at(isa, res, pos),
            );
            let (m, k1) = (load_at(isa, c[0], p), load_at(isa, c[1], p));
            let (k2, k3) = (load_at(isa, c[2], p), load_at(isa, c[3], p));
            dx_train(isa, x, g, m, k1, k2, k3)
        }
        let c = [m, k1, k2, k3];
        let res = residual_of::<MASK>(&self.mask, 0..self.dx.len());
        if w.is_multiple_of(I::LANES) {
            // A plain gradient has no mask patterns (and `masked` does not read them): the
            // coefficients stand in for them, and their unused loads are dead code.
            let [m, k1, k2, k3] = c;
            let f = if MASK == NONE { [m, m, m] } else { f };
            map2_periodic(
                isa,
                self.x,
                self.dy,
                self.dx,
                self.stream,
                w,
                [m, k1, k2, k3, f[0], f[1], f[2]],
                #[inline(always)]
                |pos, [m, k1, k2, k3, fm, fs, ft], x, g| {
                    let g = masked::<I, MASK>(
                        isa,
                        x,
                        g,
                        [fm, fs, ft],
                        #[inline(always)]
                        || load_at(isa, res, pos),
                    );
                    dx_train(isa, x, g, m, k1, k2, k3)
                },
            );
        } else if self.flat {
            let mut col = 0;
            map2(
                isa,
                self.x,
                self.dy,
                self.dx,
                true,
                false,
                #[inline(always)]
                |pos, x, g| dx::<I, MASK>(isa, c, f, res, next_col(&mut col, w, pos), pos, x, g),
            );
        } else {
            let len = self.dx.len();
            let mut start = 0;
            while start < len {
                let span = start..(start + w).min(len);
                let (x, dy) = (&self.x[span.clone()], self.dy.map(|dy| &dy[span.clone()]));
                let res = residual_of::<MASK>(&self.mask, span.clone());
                map2(
                    isa,
                    x,
                    dy,
                    &mut self.dx[span.clone()],
                    self.stream,
                    false,
                    #[inline(always)]
                    |p, x, g| dx::<I, MASK>(isa, c, f, res, p, p, x, g),
                );
                start = span.end;
            }
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// Backward with frozen statistics of the rows family, one pass, of the gradient of kind `MASK`
/// (see [`backward`]). `scale[c] = f32(gamma * inv_std)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_eval<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dx: &mut [f32],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    scale: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let (c, w) = (dims.channels, virtual_width(dims.channels));
    let parallel = use_pool(3 * dims.len());
    let mut p = vec![0.0f32; 2 * w];
    let (m, k) = p.split_at_mut(w);
    pattern(w, c, m, |c| mean[c]);
    pattern(w, c, k, |c| scale[c]);
    let mut buf = Vec::new();
    let mask = mask_patterns::<MASK>(mask, c, w, &mut buf);
    let mut sums = vec![(0.0, 0.0); c];
    backward_sums::<S, I, MASK>(isa, x, dy, mask, dims, parallel, m, Some((dx, k)), dr, &mut sums);
    for (c, &(sdy, sxm)) in sums.iter().enumerate() {
        sum_dy_out[c] = sdy;
        sum_dy_xhat_out[c] = sxm * inv_std[c] as f64;
    }
}

/// The two reductions of the training backward only: `sum(g)` and `sum(g * xhat)` per channel,
/// `g` the gradient of kind `MASK` (per-channel `mask`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_sums<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
    mask: FusedRelu<'_>,
    dr: Option<&mut [f32]>,
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let (c, w) = (dims.channels, virtual_width(dims.channels));
    let mut m = vec![0.0f32; w];
    pattern(w, c, &mut m, |c| mean[c] as f32);
    let mut buf = Vec::new();
    let mask = mask_patterns::<MASK>(mask, c, w, &mut buf);
    let mut sums = vec![(0.0, 0.0); c];
    let parallel = use_pool(2 * dims.len());
    backward_sums::<S, I, MASK>(isa, x, dy, mask, dims, parallel, &m, None, dr, &mut sums);
    for (c, &(sdy, sxm)) in sums.iter().enumerate() {
        sum_dy_out[c] = sdy;
        sum_dy_xhat_out[c] = sum_dy_xhat(mean[c], mean[c] as f32, inv_std[c], sdy, sxm);
    }
}

/// The `dx` pass of the training backward only, from given (e.g. global) sums over `n` values,
/// for the gradient of kind `MASK` (per-channel `mask`); `dy: None` when the gradient is in `dx`
/// (in place).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_dx<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: Option<&[f32]>,
    mask: FusedRelu<'_>,
    dx: &mut [f32],
    dims: Canonical,
    n: f64,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    let (c, w) = (dims.channels, virtual_width(dims.channels));
    let parallel = use_pool(3 * dims.len());
    // Each coefficient repeated over two virtual rows (for flat mode).
    let mut p = vec![0.0f32; 8 * w];
    let (m, rest) = p.split_at_mut(2 * w);
    let (k1, rest) = rest.split_at_mut(2 * w);
    let (k2, k3) = rest.split_at_mut(2 * w);
    for c in 0..c {
        let q = DxCoefficients::train(mean[c], inv_std[c], gamma[c], n, sum_dy[c], sum_dy_xhat[c]);
        (m[c], k1[c], k2[c], k3[c]) = (q.m, q.k1, q.k2, q.k3);
    }
    for p in [&mut *m, &mut *k1, &mut *k2, &mut *k3] {
        let (first, rest) = p.split_at_mut(c);
        for period in rest.chunks_mut(c) {
            period.copy_from_slice(&first[..period.len()]);
        }
    }
    let coefficients = [&*m, &*k1, &*k2, &*k3];
    let mut buf = Vec::new();
    let mask = mask_patterns::<MASK>(mask, c, 2 * w, &mut buf);
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS);
    let rows_per_task = (dims.len() / w).div_ceil(tasks).max(1);
    // In place the stores follow the loads of the same lines: nothing to stream.
    let stream = dy.is_some() && streaming(dims.len(), w.max(rows_per_task * w));
    let flat = stream;
    let chunk = rows_per_task * w;
    for_each_chunk3(parallel, x, dy, dx, chunk, |k, x, dy, dx| {
        let r = k * chunk..k * chunk + dx.len();
        let mask = FusedRelu { residual: Some(residual_of::<MASK>(&mask, r)), ..mask };
        isa.vectorize(DxRows::<S, MASK> {
            x,
            dy,
            dx,
            mask,
            dims,
            coefficients,
            flat,
            stream,
            _spec: PhantomData,
        });
    });
}
