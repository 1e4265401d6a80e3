//! The rows family (`inner == 1`): `outer` contiguous rows of all `C` channels. Parameters are
//! per lane, loaded from arrays indexed by column.
//!
//! A small or odd `C` is widened to a *virtual row* of `W = lcm(C, 16)` values (at most
//! [`MAX_PERIOD`]): `W / C` real rows side by side, so that a row is whole vectors and `C = 1`
//! or `C = 7` run at full vector width; parameters repeat with period `C` along it. The values
//! after the last whole virtual row (fewer than `W`) are the *tail*.
//!
//! Statistics (training forward and backward): the virtual rows are cut into blocks of
//! `block_rows` rows and tiles of at most [`TILE_COLS`] columns (a tile is at most
//! [`TILE_ELEMS`] values, so it stays in cache between its two passes); consecutive blocks form
//! chunks, all fixed by the shape. A task computes one chunk of one column tile: per block the
//! column means, then the deviations from them (both with register accumulators,
//! [`column_sums`]), merged into the chunk's moments (Chan). The chunks are then merged in
//! order, the virtual columns folded into channels, and the tail added. A second, streaming
//! pass applies the per-column transform (with non-temporal stores for large outputs). The
//! backward works the same way: fused sums per tile, an ordered merge, the `dx` pass; with
//! frozen statistics, `dx` is written by the first pass while the tile is in L1.

use core::marker::PhantomData;
use core::ops::Range;

use super::epilogue::{masked, residual_of, Apply, FusedRelu, ADD_RELU, NONE, RELU};
use super::loops::{for_each_chunk3, map, map2, map2_periodic, map_params, map_periodic, Io, Split};
use super::parallel::{for_each_task, streaming, task_count, use_pool, SharedMut, TASK_ELEMS};
use super::simd::{Isa, Kernel, Serial};
use super::stats::{sum_dy_xhat, Affine32, DxCoefficients, Moments};
use super::vector::{affine, dx_train, load_at, Pos};
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// Most values in a virtual row built from a small or odd `C`.
pub(crate) const MAX_PERIOD: usize = 1024;
/// Most columns per tile.
const TILE_COLS: usize = 1024;
/// Values per tile (32 KiB): the tile is re-read from L1 by its second pass.
const TILE_ELEMS: usize = 1 << 13;
/// Most rows per block (bounds the `f32` accumulation).
const MAX_BLOCK_ROWS: usize = 256;
/// Least rows per block a tile is narrowed for: every block ends in an `f64` merge per
/// column, which costs about as much as summing eight rows.
const MIN_BLOCK_ROWS: usize = 32;
/// Rows whose mean is the pilot shift of a chunk's first block.
const PILOT_ROWS: usize = 8;
/// Least values per chunk.
const CHUNK_ELEMS: usize = 1 << 16;
/// Most chunks (bounds the scratch: `2 * MAX_CHUNKS * W` values).
const MAX_CHUNKS: usize = 64;

const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The virtual row width for `c` channels: `c` when it is a multiple of 16 or when
/// `lcm(c, 16)` exceeds [`MAX_PERIOD`], else `lcm(c, 16)`.
#[inline(always)]
pub(crate) const fn virtual_width(c: usize) -> usize {
    if c.is_multiple_of(16) {
        return c;
    }
    let l = c / gcd(c, 16) * 16;
    if l <= MAX_PERIOD {
        l
    } else {
        c
    }
}

/// How the tensor is cut into virtual rows, tiles, blocks and chunks; a function of the shape.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    w: usize,
    len: usize,
    /// Whole virtual rows.
    vrows: usize,
    tile: usize,
    tiles: usize,
    block_rows: usize,
    chunk_rows: usize,
    chunks: usize,
}

impl Geometry {
    #[inline(always)]
    fn new(dims: Canonical) -> Geometry {
        let c = dims.channels;
        let w = virtual_width(c);
        let len = dims.len();
        let vrows = len / w;
        let tile = w.min(TILE_COLS).min(TILE_ELEMS / MIN_BLOCK_ROWS);
        let tiles = w.div_ceil(tile);
        let block_rows = (TILE_ELEMS / tile).clamp(4, MAX_BLOCK_ROWS);
        let blocks = vrows.div_ceil(block_rows);
        let chunk_blocks = (CHUNK_ELEMS / (block_rows * w)).max(blocks.div_ceil(MAX_CHUNKS)).max(1);
        let chunks = blocks.div_ceil(chunk_blocks);
        Geometry { c, w, len, vrows, tile, tiles, block_rows, chunk_rows: chunk_blocks * block_rows, chunks }
    }

    #[inline(always)]
    fn chunk(&self, p: usize) -> Range<usize> {
        p * self.chunk_rows..((p + 1) * self.chunk_rows).min(self.vrows)
    }

    #[inline(always)]
    fn cols(&self, t: usize) -> Range<usize> {
        t * self.tile..((t + 1) * self.tile).min(self.w)
    }

    #[inline(always)]
    fn tail_start(&self) -> usize {
        self.vrows * self.w
    }
}

/// Per-column accumulators of one tile (padded to whole vectors).
struct TileBuf {
    a: [f32; TILE_COLS],
    b: [f32; TILE_COLS],
    m: [f32; TILE_COLS],
}

impl TileBuf {
    #[inline(always)]
    fn new() -> TileBuf {
        TileBuf { a: [0.0; TILE_COLS], b: [0.0; TILE_COLS], m: [0.0; TILE_COLS] }
    }
}

/// Column sums over the rows `rows` (width `w`) of the columns `cols` of `K` tensors: `term`
/// adds one vector of each tensor (with the vectors of `params`, `Q` per-column parameters of
/// the tile, at the same columns) into `A` accumulators and returns them (so that a product can
/// be added with one fused multiply-add), and `emit` receives, for each vector of columns, the
/// `A` sums over the rows (an empty parameter loads as zeros). Accumulators stay in registers: `G` vectors of columns
/// at a time (a row's `G` vectors are contiguous), each with `P` accumulators (rows `P q + k`)
/// so that at least eight independent chains hide the latency of the additions; the phases are
/// added pairwise at the end. Whole groups run a loop without per-vector checks; the last,
/// partial group and the masked tail vector run a generic one. Lanes past the last column load
/// as zero.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn column_sums<I: Isa, const K: usize, const Q: usize, const A: usize, const G: usize, const P: usize>(
    isa: I,
    tensors: [&[f32]; K],
    w: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    params: [&[f32]; Q],
    mut term: impl FnMut(Pos, [I::V; K], [I::V; Q], [I::V; A]) -> [I::V; A],
    mut emit: impl FnMut(Pos, [I::V; A]),
) {
    let l = I::LANES;
    let nc = cols.len();
    let vectors = nc.div_ceil(l);
    let whole = nc / l;
    let mut v0 = 0;
    while v0 < vectors {
        let group = (vectors - v0).min(G);
        let fast = v0 + G <= whole;
        let mut pv = [[isa.zero(); Q]; G];
        for q in 0..Q {
            if !params[q].is_empty() {
                for g in 0..group {
                    let i = (v0 + g) * l;
                    pv[g][q] = load_at(isa, params[q], Pos { i, n: (nc - i).min(l) });
                }
            }
        }
        let mut acc = [[[isa.zero(); A]; P]; G];
        let mut r = rows.start;
        while r < rows.end {
            let phases = (rows.end - r).min(P);
            for k in 0..P {
                if k < phases {
                    let start = (r + k) * w + cols.start + v0 * l;
                    if fast {
                        let mut s: [&[f32]; K] = [&[]; K];
                        for t in 0..K {
                            s[t] = &tensors[t][start..start + G * l];
                        }
                        for g in 0..G {
                            let mut v = [isa.zero(); K];
                            for t in 0..K {
                                v[t] = isa.load(&s[t][g * l..(g + 1) * l]);
                            }
                            acc[g][k] = term(Pos { i: (v0 + g) * l, n: l }, v, pv[g], acc[g][k]);
                        }
                    } else {
                        for g in 0..G {
                            if g < group {
                                let i = (v0 + g) * l;
                                let pos = Pos { i, n: (nc - i).min(l) };
                                let mut v = [isa.zero(); K];
                                for t in 0..K {
                                    let s = &tensors[t][start + g * l..start + g * l + pos.n];
                                    v[t] = if pos.n == l { isa.load(s) } else { isa.load_tail(s) };
                                }
                                acc[g][k] = term(pos, v, pv[g], acc[g][k]);
                            }
                        }
                    }
                }
            }
            r += phases;
        }
        for g in 0..group {
            let i = (v0 + g) * l;
            let mut out = [isa.zero(); A];
            for a in 0..A {
                out[a] = match P {
                    1 => acc[g][0][a],
                    2 => isa.add(acc[g][0][a], acc[g][1][a]),
                    _ => {
                        let mut s = [isa.zero(); P];
                        for k in 0..P {
                            s[k] = acc[g][k][a];
                        }
                        let mut width = P;
                        while width > 1 {
                            width /= 2;
                            for k in 0..width {
                                s[k] = isa.add(s[k], s[k + width]);
                            }
                        }
                        s[0]
                    }
                };
            }
            emit(Pos { i, n: (nc - i).min(l) }, out);
        }
        v0 += group;
    }
}

/// [`column_sums`] with the register blocking suited to the tile: eight vectors of columns per
/// row when the tile is that wide, else two with four row phases.
macro_rules! column_sums {
    ($isa:expr, $k:literal, $q:literal, $a:literal, $tensors:expr, $w:expr, $rows:expr, $cols:expr, $params:expr, $term:expr, $emit:expr) => {{
        let (rows, cols) = ($rows, $cols);
        if cols.len() >= 8 * I::LANES {
            column_sums::<I, $k, $q, $a, { 8 / $a }, 1>($isa, $tensors, $w, rows, cols, $params, $term, $emit)
        } else {
            column_sums::<I, $k, $q, $a, 2, 4>($isa, $tensors, $w, rows, cols, $params, $term, $emit)
        }
    }};
}

/// `sum(x - m)` and `sum((x - m)^2)` per column of one block × tile into `buf.a` and `buf.b`,
/// `m` the shifts in `buf.m`.
#[inline(always)]
fn tile_deviations<I: Isa>(
    isa: I,
    x: &[f32],
    w: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    buf: &mut TileBuf,
) {
    let nc = cols.len();
    let (m, ds, qs) = (&buf.m[..nc], &mut buf.a, &mut buf.b);
    column_sums!(
        isa,
        1,
        1,
        2,
        [x],
        w,
        rows,
        cols,
        [m],
        #[inline(always)]
        |pos, [v], [m], [a, b]| {
            let d = isa.zero_from(isa.sub(v, m), pos.n);
            [isa.add(a, d), isa.mul_add(d, d, b)]
        },
        #[inline(always)]
        |pos, [d, q]| {
            isa.store(&mut ds[pos.i..], d);
            isa.store(&mut qs[pos.i..], q);
        }
    );
}

/// Moments of one block × tile, merged into the chunk's moments of those columns
/// (`n_before` values each so far).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_moments<I: Isa>(
    isa: I,
    x: &[f32],
    w: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    buf: &mut TileBuf,
    n_before: f64,
    mean: &mut [f64],
    m2: &mut [f64],
) {
    let nc = cols.len();
    let nr = rows.len();
    let n = nr as f64;
    // A pilot shift per column: the chunk's mean so far, or for its first block the mean of the
    // block's first rows. One pass of deviations from it; the correction of the merge below
    // (`ds^2 / n`) makes that the corrected two-pass algorithm, exact to rounding while the
    // pilot is near the block's mean. Where it is far (the correction would remove over half of
    // a column's sum of squares, amplifying rounding), a second pass around the block's means.
    if n_before > 0.0 {
        for (m, &mean) in buf.m[..nc].iter_mut().zip(&mean[..nc]) {
            *m = mean as f32;
        }
    } else {
        let first = rows.start..rows.start + nr.min(PILOT_ROWS);
        let inv = isa.splat(1.0 / first.len() as f32);
        let m = &mut buf.m;
        column_sums!(
            isa,
            1,
            0,
            1,
            [x],
            w,
            first,
            cols.clone(),
            [],
            #[inline(always)]
            |_, [v], [], [a]| [isa.mul_add(v, inv, a)],
            #[inline(always)]
            |pos, [s]| isa.store(&mut m[pos.i..], s)
        );
    }
    tile_deviations(isa, x, w, rows.clone(), cols.clone(), buf);
    // Every column tested (no early exit), so that the test vectorizes.
    let mut far = false;
    for j in 0..nc {
        far |= Moments::pilot_is_far(n, buf.a[j] as f64, buf.b[j] as f64);
    }
    if far {
        for j in 0..nc {
            buf.m[j] = (buf.m[j] as f64 + buf.a[j] as f64 / n) as f32;
        }
        tile_deviations(isa, x, w, rows, cols, buf);
    }
    // Chan's merge of this block into the chunk so far, column by column; the ratios are the
    // same for every column (no division in the loop). With `n_before == 0` it copies.
    let n = nr as f64;
    let inv = 1.0 / n;
    let total = n_before + n;
    let (ratio, factor) = (n / total, n_before * n / total);
    for j in 0..nc {
        let ds = buf.a[j] as f64;
        let mean_b = buf.m[j] as f64 + ds * inv;
        let q = buf.b[j] as f64 - ds * ds * inv;
        let m2_b = if q < 0.0 { 0.0 } else { q };
        let delta = mean_b - mean[j];
        mean[j] += delta * ratio;
        m2[j] += m2_b + delta * delta * factor;
    }
}

/// Moments of chunk `p`, column tile `t` (flat task index `q = p * tiles + t`).
struct ChunkMoments<'a, 's, S> {
    x: &'a [f32],
    dims: Canonical,
    tasks: Range<usize>,
    mean: &'a SharedMut<'s, f64>,
    m2: &'a SharedMut<'s, f64>,
    _spec: PhantomData<S>,
}

impl<S: Spec> Kernel for ChunkMoments<'_, '_, S> {
    type Output = ();
    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        let g = Geometry::new(specialize::<S>(self.dims));
        let mut buf = TileBuf::new();
        for q in self.tasks.clone() {
            let (p, t) = (q / g.tiles, q % g.tiles);
            let (rows, cols) = (g.chunk(p), g.cols(t));
            // SAFETY: task `(p, t)` owns the moments of chunk `p`, columns `cols`; distinct
            // tasks own disjoint ranges, and `q` is processed by this kernel only.
            let (mean, m2) = unsafe {
                (
                    self.mean.slice(p * g.w + cols.start, cols.len()),
                    self.m2.slice(p * g.w + cols.start, cols.len()),
                )
            };
            let mut r = rows.start;
            while r < rows.end {
                let block = r..(r + g.block_rows).min(rows.end);
                tile_moments(
                    isa,
                    self.x,
                    g.w,
                    block.clone(),
                    cols.clone(),
                    &mut buf,
                    (r - rows.start) as f64,
                    mean,
                    m2,
                );
                r = block.end;
            }
        }
    }
}

/// Runs `per_task(tasks)` over `0..total` cut into `tasks` ranges, in parallel when `parallel`.
fn run_tasks(parallel: bool, total: usize, work: usize, per_task: impl Fn(Range<usize>) + Sync + Send) {
    let tasks = task_count(parallel, work, TASK_ELEMS).min(total).max(1);
    for_each_task(parallel, tasks, |k| per_task(super::parallel::part(total, tasks, k)));
}

/// Per-channel moments of the rows family into `mean_out` and `var_out` (biased).
fn statistics<S: Spec, I: Isa>(
    isa: I,
    x: &[f32],
    dims: Canonical,
    parallel: bool,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let g = Geometry::new(dims);
    let mut partial = vec![0.0; 2 * g.chunks * g.w];
    let (pmean, pm2) = partial.split_at_mut(g.chunks * g.w);
    {
        let (mean, m2) = (SharedMut::new(&mut *pmean), SharedMut::new(&mut *pm2));
        run_tasks(parallel, g.chunks * g.tiles, dims.len(), |tasks| {
            let (mean, m2) = (&mean, &m2);
            isa.vectorize(ChunkMoments::<S> { x, dims, tasks, mean, m2, _spec: PhantomData });
        });
    }
    // Merge the chunks into chunk 0 (in order), fold the virtual columns into channels (in
    // order), add the tail, one value at a time. Serial, compiled for the instruction set.
    isa.vectorize(Serial(
        #[inline(always)]
        || {
            let (mean, m2) = (&mut pmean[..], &mut pm2[..]);
            let mut n = if g.chunks > 0 { g.chunk(0).len() as f64 } else { 0.0 };
            for p in 1..g.chunks {
                let nb = g.chunk(p).len() as f64;
                merge_columns(mean, m2, n, nb, p * g.w, g.w);
                n += nb;
            }
            if g.chunks > 0 {
                for k in 1..g.w / g.c {
                    merge_columns(mean, m2, k as f64 * n, n, k * g.c, g.c);
                }
            }
            let n_columns = n * (g.w / g.c) as f64;
            for c in 0..g.c {
                let mut mom = if g.chunks > 0 {
                    Moments { n: n_columns, mean: mean[c], m2: m2[c] }
                } else {
                    Moments::EMPTY
                };
                for i in (g.tail_start() + c..g.len).step_by(g.c) {
                    mom = mom.merge(Moments { n: 1.0, mean: x[i] as f64, m2: 0.0 });
                }
                mean_out[c] = mom.mean;
                var_out[c] = mom.m2 / mom.n;
            }
        },
    ));
}

/// Chan's merge of the moments at `from..from + len` (each of `nb` values) into those at
/// `0..len` (each of `na` values), column by column.
#[inline(always)]
fn merge_columns(mean: &mut [f64], m2: &mut [f64], na: f64, nb: f64, from: usize, len: usize) {
    let (mean, mean_b) = mean.split_at_mut(from);
    let (m2, m2_b) = m2.split_at_mut(from);
    merge_into(&mut mean[..len], &mut m2[..len], na, &mean_b[..len], &m2_b[..len], nb);
}

/// Chan's merge of moments of `nb` values each (`mean_b`, `m2_b`) into moments of `na` values
/// each (`mean`, `m2`), column by column: the one merge of the rows family.
#[inline(always)]
fn merge_into(mean: &mut [f64], m2: &mut [f64], na: f64, mean_b: &[f64], m2_b: &[f64], nb: f64) {
    let total = na + nb;
    let (ratio, factor) = (nb / total, na * nb / total);
    let len = mean.len();
    assert!(m2.len() == len && mean_b.len() == len && m2_b.len() == len);
    for j in 0..len {
        let delta = mean_b[j] - mean[j];
        mean[j] += delta * ratio;
        m2[j] += m2_b[j] + delta * delta * factor;
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes.

/// Column `j` of a vector at `pos` in flat mode (parameters repeated twice, so that a vector
/// that wraps around the end of a row reads them contiguously); advances `col` past it.
#[inline(always)]
fn next_col(col: &mut usize, w: usize, pos: Pos) -> Pos {
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
    io: T,
    dims: Canonical,
    params: [&'a [f32]; 3],
    flat: bool,
    stream: bool,
    _spec: PhantomData<S>,
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
fn pattern(w: usize, c: usize, out: &mut [f32], f: impl Fn(usize) -> f32) {
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

// ---------------------------------------------------------------------------------------------
// Backward.

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
    w: usize,
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
            w,
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
            w,
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
            w,
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
        dy,
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
    x: &'a [f32],
    dy: &'a [f32],
    mask: FusedRelu<'a>,
    dims: Canonical,
    m: &'a [f32],
    tasks: Range<usize>,
    sum_dy: &'a SharedMut<'s, f64>,
    sum_xm: &'a SharedMut<'s, f64>,
    dx: Option<(&'a SharedMut<'s, f32>, &'a [f32])>,
    dr: Option<&'a SharedMut<'s, f32>>,
    _spec: PhantomData<S>,
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
                            isa, x, gr, &no_mask, g.w, rows, cols, m, &mut buf, sum_dy, sum_xm,
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
                                &gr[local],
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
                    g.w,
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
                            dy,
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
/// column index.
struct DxRows<'a, S, const MASK: u8> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a mut [f32],
    mask: FusedRelu<'a>,
    dims: Canonical,
    coefficients: [&'a [f32]; 4],
    flat: bool,
    stream: bool,
    _spec: PhantomData<S>,
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
                let (x, dy) = (&self.x[span.clone()], &self.dy[span.clone()]);
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

// ---------------------------------------------------------------------------------------------
// The pieces of the schedules on their own, for statistics combined across processes
// (`crate::sync`): the same tiles, chunks and merge order as `forward_train` and `backward`.

/// Per-channel batch mean and biased variance only.
pub(crate) fn batch_stats<S: Spec, I: Isa>(
    isa: I,
    x: &[f32],
    dims: Canonical,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    statistics::<S, I>(isa, x, dims, use_pool(dims.len()), mean_out, var_out);
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
/// for the gradient of kind `MASK` (per-channel `mask`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_dx<S: Spec, I: Isa, const MASK: u8>(
    isa: I,
    x: &[f32],
    dy: &[f32],
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
    let stream = streaming(dims.len(), w.max(rows_per_task * w));
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
