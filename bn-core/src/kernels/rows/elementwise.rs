//! The elementwise passes of the rows family: inference and the normalize of the training
//! forward, row by row or as one flat stream with non-temporal stores.

use core::marker::PhantomData;

use super::geometry::{virtual_width, MAX_PERIOD};
use super::statistics::statistics;
use crate::kernels::epilogue::Apply;
use crate::kernels::loops::{map, map_params, map_periodic, Io, Split};
use crate::kernels::parallel::{streaming, task_count, use_pool, TASK_ELEMS};
use crate::kernels::simd::{Isa, Kernel, Serial};
use crate::kernels::stats::Affine32;
use crate::kernels::vector::{affine, load_at, Pos};
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// Column `j` of a vector at `pos` in flat mode (parameters repeated twice, so that a vector
/// that wraps around the end of a row reads them contiguously); advances `col` past it.
#[inline(always)]
pub(super) fn next_col(col: &mut usize, w: usize, pos: Pos) -> Pos {
    let p = Pos { i: *col, n: pos.n };
    *col += pos.n;
    if *col >= w {
        *col -= w;
    }
    p
}

/// `y = (x - m_j) * s_j + t_j` over the whole virtual rows `io` covers (and the tail).
///
/// Row by row, or, in *flat* mode (streaming stores, parameters of length `2 W`), as one
/// contiguous stream whose only partial vectors are its first and last: a row is then not a
/// whole number of aligned vectors.
struct NormalizeRows<'a, S, T> {
    pub(super) io: T,
    pub(super) dims: Canonical,
    pub(super) params: [&'a [f32]; 3],
    pub(super) flat: bool,
    pub(super) stream: bool,
    pub(super) _spec: PhantomData<S>,
}

impl<S: Spec, T: Io> Kernel for NormalizeRows<'_, S, T> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(mut self, isa: I) {
        let w = virtual_width(specialize::<S>(self.dims).channels);
        let [m, s, t] = self.params;
        if self.flat && w.is_multiple_of(I::LANES) {
            map_periodic(
                isa,
                &mut self.io,
                true,
                w,
                [m, s, t],
                #[inline(always)]
                |[m, s, t], v| affine(isa, v, m, s, t),
            );
        } else if self.flat {
            let mut col = 0;
            map(
                isa,
                &mut self.io,
                true,
                false,
                #[inline(always)]
                |pos, v| {
                    let p = next_col(&mut col, w, pos);
                    affine(isa, v, load_at(isa, m, p), load_at(isa, s, p), load_at(isa, t, p))
                },
            );
        } else {
            let len = self.io.len();
            let mut start = 0;
            while start < len {
                let end = (start + w).min(len);
                let mut row = self.io.part(start, end);
                if self.stream {
                    map(
                        isa,
                        &mut row,
                        true,
                        false,
                        #[inline(always)]
                        |p, v| affine(isa, v, load_at(isa, m, p), load_at(isa, s, p), load_at(isa, t, p)),
                    );
                } else {
                    map_params(
                        isa,
                        &mut row,
                        [m, s, t],
                        #[inline(always)]
                        |[m, s, t], v| affine(isa, v, m, s, t),
                    );
                }
                start = end;
            }
        }
        if self.stream {
            isa.fence();
        }
    }
}

/// The streaming normalize with per-virtual-column parameters (each of length `W`).
fn normalize_rows<S: Spec, I: Isa, T: Io>(isa: I, io: T, dims: Canonical, params: [&[f32]; 3]) {
    let w = virtual_width(dims.channels);
    let parallel = use_pool(2 * dims.len());
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS);
    let rows_per_task = (dims.len() / w).div_ceil(tasks).max(1);
    let stream = T::STREAM && streaming(dims.len(), w.max(rows_per_task * w));
    let mut doubled = [[0.0f32; 2 * MAX_PERIOD]; 3];
    let flat = stream && w <= MAX_PERIOD;
    let params = if flat {
        for (d, p) in doubled.iter_mut().zip(params) {
            d[..w].copy_from_slice(&p[..w]);
            d[w..2 * w].copy_from_slice(&p[..w]);
        }
        [&doubled[0][..2 * w], &doubled[1][..2 * w], &doubled[2][..2 * w]]
    } else {
        params
    };
    io.for_each_chunk(parallel, rows_per_task * w, |_, io| {
        isa.vectorize(NormalizeRows::<S, T> { io, dims, params, flat, stream, _spec: PhantomData });
    });
}

/// Repeats `f(c)` for the `W` virtual columns into `out` (`out.len() >= W`).
#[inline]
pub(super) fn pattern(w: usize, c: usize, out: &mut [f32], f: impl Fn(usize) -> f32) {
    for period in out[..w].chunks_mut(c) {
        for (j, o) in period.iter_mut().enumerate() {
            *o = f(j);
        }
    }
}

/// Inference: `y = (x - mean) * scale + shift` per channel, one pass, no allocation.
pub(crate) fn normalize<S: Spec, I: Isa, T: Io>(
    isa: I,
    io: T,
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let (c, w) = (dims.channels, virtual_width(dims.channels));
    if w == c {
        return normalize_rows::<S, I, T>(isa, io, dims, [mean, scale, shift]);
    }
    let mut p = [[0.0f32; MAX_PERIOD]; 3];
    pattern(w, c, &mut p[0], |c| mean[c]);
    pattern(w, c, &mut p[1], |c| scale[c]);
    pattern(w, c, &mut p[2], |c| shift[c]);
    normalize_rows::<S, I, T>(isa, io, dims, [&p[0], &p[1], &p[2]]);
}

/// Training forward of the rows family.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_train<S: Spec, I: Isa, A: Apply>(
    isa: I,
    x: &[f32],
    y: &mut [f32],
    act: A,
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let parallel = use_pool(2 * dims.len());
    statistics::<S, I>(isa, x, dims, parallel, mean_out, var_out);
    let (c, w) = (dims.channels, virtual_width(dims.channels));
    let mut p = vec![0.0f32; 3 * w];
    let (m, rest) = p.split_at_mut(w);
    let (s, t) = rest.split_at_mut(w);
    isa.vectorize(Serial(
        #[inline(always)]
        || {
            for c in 0..c {
                let a = Affine32::train(mean_out[c], var_out[c], eps, gamma[c], beta[c]);
                (m[c], s[c], t[c]) = (a.m, a.s, a.t);
            }
            for p in [&mut *m, &mut *s, &mut *t] {
                let (first, rest) = p.split_at_mut(c);
                for period in rest.chunks_mut(c) {
                    period.copy_from_slice(&first[..period.len()]);
                }
            }
        },
    ));
    normalize_rows::<S, I, _>(isa, Split { x, y, act }, dims, [m, s, t]);
}
