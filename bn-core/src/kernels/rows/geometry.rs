//! The shape of the rows family's work: virtual rows, blocks, column tiles and chunks
//! ([`Geometry`]), fixed by the shape alone, and the register-blocked column sums
//! ([`column_sums`]) that the statistics and the backward sums run over a block of a tile.

use core::ops::Range;

use crate::kernels::simd::Isa;
use crate::kernels::vector::{load_at, Pos};
use crate::Canonical;

/// Most values in a virtual row built from a small or odd `C`.
pub(crate) const MAX_PERIOD: usize = 1024;
/// Least bytes per tensor for which the column sums of a tile that holds whole rows go row by
/// row ([`column_sums`]).
const ROW_ORDER_MIN_BYTES: usize = 8 << 20;
/// Least bytes per tensor for which rows wider than [`NARROW_TILE`] columns (up to
/// [`TILE_COLS`]) make one tile of whole rows, in blocks of [`MIN_BLOCK_ROWS`] rows (up to 128
/// KiB, in L2), whose column sums go row by row: (50, 14, 14, 1024) NHWC trains in 0.91-0.99x
/// the time and differentiates in 0.80-0.87x, (50, 28, 28, 512) 0.76-0.79x and 0.75-0.81x,
/// (3072, 1024) (12 MiB) 0.99-1.12x and 0.74-0.81x; at 8 MiB, (2048, 1024) trained in 1.1-1.34x
/// as long (Zen 4, 1 and 2 threads, bn-bench `--quick`, medians of 3 interleaved rounds).
const WIDE_TILE_MIN_BYTES: usize = 12 << 20;
/// Most vectors per tile the row-by-row column sums keep accumulators for: a tile of
/// [`TILE_COLS`] columns with 8 lanes.
const ROW_VECTORS: usize = TILE_COLS / 8;
/// Most columns per tile.
const TILE_COLS: usize = 1024;
/// Values per block of a tile (32 KiB): the block is re-read from L1 by its second pass.
const TILE_ELEMS: usize = 1 << 13;
/// Most columns per tile in blocks of [`MIN_BLOCK_ROWS`] rows or more of [`TILE_ELEMS`] values;
/// wider rows are cut into tiles this wide, unless [`WIDE_TILE_MIN_BYTES`].
const NARROW_TILE: usize = TILE_ELEMS / MIN_BLOCK_ROWS;
/// Most rows per block (bounds the `f32` accumulation).
const MAX_BLOCK_ROWS: usize = 256;
/// Least rows per block a tile is narrowed for: every block ends in an `f64` merge per
/// column, which costs about as much as summing eight rows.
const MIN_BLOCK_ROWS: usize = 32;
/// Rows whose mean is the pilot shift of a chunk's first block.
pub(super) const PILOT_ROWS: usize = 8;
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
pub(super) struct Geometry {
    pub(super) c: usize,
    pub(super) w: usize,
    pub(super) len: usize,
    /// Whole virtual rows.
    pub(super) vrows: usize,
    pub(super) tile: usize,
    pub(super) tiles: usize,
    pub(super) block_rows: usize,
    pub(super) chunk_rows: usize,
    pub(super) chunks: usize,
    /// Whether the column sums go row by row ([`ROW_ORDER_MIN_BYTES`]).
    pub(super) row_order: bool,
}

impl Geometry {
    #[inline(always)]
    pub(super) fn new(dims: Canonical) -> Geometry {
        let c = dims.channels;
        let w = virtual_width(c);
        let len = dims.len();
        let vrows = len / w;
        let wide = w > NARROW_TILE && w <= TILE_COLS && len * 4 >= WIDE_TILE_MIN_BYTES;
        let tile = if wide { w } else { w.min(NARROW_TILE) };
        let tiles = w.div_ceil(tile);
        let block_rows = if wide { MIN_BLOCK_ROWS } else { (TILE_ELEMS / tile).clamp(4, MAX_BLOCK_ROWS) };
        let blocks = vrows.div_ceil(block_rows);
        let chunk_blocks = (CHUNK_ELEMS / (block_rows * w)).max(blocks.div_ceil(MAX_CHUNKS)).max(1);
        let chunks = blocks.div_ceil(chunk_blocks);
        let row_order = tiles == 1 && len * 4 >= ROW_ORDER_MIN_BYTES;
        let chunk_rows = chunk_blocks * block_rows;
        Geometry { c, w, len, vrows, tile, tiles, block_rows, chunk_rows, chunks, row_order }
    }

    #[inline(always)]
    pub(super) fn chunk(&self, p: usize) -> Range<usize> {
        p * self.chunk_rows..((p + 1) * self.chunk_rows).min(self.vrows)
    }

    #[inline(always)]
    pub(super) fn cols(&self, t: usize) -> Range<usize> {
        t * self.tile..((t + 1) * self.tile).min(self.w)
    }

    #[inline(always)]
    pub(super) fn tail_start(&self) -> usize {
        self.vrows * self.w
    }
}

/// Per-column accumulators of one tile (padded to whole vectors).
pub(super) struct TileBuf {
    pub(super) a: [f32; TILE_COLS],
    pub(super) b: [f32; TILE_COLS],
    pub(super) m: [f32; TILE_COLS],
}

impl TileBuf {
    #[inline(always)]
    pub(super) fn new() -> TileBuf {
        TileBuf { a: [0.0; TILE_COLS], b: [0.0; TILE_COLS], m: [0.0; TILE_COLS] }
    }
}

/// Column sums over the rows `rows` (width `w`) of the columns `cols` of `K` tensors: `term`
/// adds one vector of each tensor (with the vectors of `params`, `Q` per-column parameters of
/// the tile, at the same columns) into `A` accumulators and returns them (so that a product can
/// be added with one fused multiply-add), and `emit` receives, for each vector of columns, the
/// `A` sums over the rows (an empty parameter loads as zeros). Accumulators stay in registers:
/// `G` vectors of columns at a time (a row's `G` vectors are contiguous), each with `P`
/// accumulators (rows `P q + k`) so that at least eight independent chains hide the latency of
/// the additions; the phases are added pairwise at the end. Whole groups run a loop without
/// per-vector checks; the last, partial group and the masked tail vector run a generic one.
/// Lanes past the last column load as zero.
///
/// With `row_order`, a tile of whole rows wider than `G` vectors (`P = 1`) is read row by row
/// instead, every vector's accumulators in memory: the same additions in the same order (the
/// same bits), with the tensors read in memory order. Taken `G` vectors at a time the tile is
/// read in sweeps of part rows, which the hardware prefetchers follow badly from DRAM; row by
/// row, the accumulators' loads and stores cost more than that saves in cache
/// ([`ROW_ORDER_MIN_BYTES`]).
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) fn column_sums<
    I: Isa,
    const K: usize,
    const Q: usize,
    const A: usize,
    const G: usize,
    const P: usize,
>(
    isa: I,
    tensors: [&[f32]; K],
    w: usize,
    row_order: bool,
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
    if row_order && P == 1 && vectors > G && vectors <= ROW_VECTORS && cols.start == 0 && nc == w {
        // Accumulators for the vectors there are (zeroed per block).
        return if vectors <= ROW_VECTORS / 4 {
            row_sums::<I, K, Q, A, { ROW_VECTORS / 4 }>(isa, tensors, w, rows, params, term, emit)
        } else {
            row_sums::<I, K, Q, A, ROW_VECTORS>(isa, tensors, w, rows, params, term, emit)
        };
    }
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

/// [`column_sums`] of a tile of whole rows (`w` columns, at most `N` vectors) row by row: one
/// accumulator per vector of columns, the rows in order.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn row_sums<I: Isa, const K: usize, const Q: usize, const A: usize, const N: usize>(
    isa: I,
    tensors: [&[f32]; K],
    w: usize,
    rows: Range<usize>,
    params: [&[f32]; Q],
    mut term: impl FnMut(Pos, [I::V; K], [I::V; Q], [I::V; A]) -> [I::V; A],
    mut emit: impl FnMut(Pos, [I::V; A]),
) {
    let l = I::LANES;
    let (vectors, whole) = (w.div_ceil(l), w / l);
    let mut acc = [[isa.zero(); A]; N];
    for r in rows {
        let start = r * w;
        let mut s: [&[f32]; K] = [&[]; K];
        for t in 0..K {
            s[t] = &tensors[t][start..start + w];
        }
        for (v, acc) in acc[..vectors].iter_mut().enumerate() {
            let i = v * l;
            let pos = Pos { i, n: (w - i).min(l) };
            let mut x = [isa.zero(); K];
            for t in 0..K {
                x[t] = if v < whole { isa.load(&s[t][i..i + l]) } else { isa.load_tail(&s[t][i..]) };
            }
            let mut pv = [isa.zero(); Q];
            for q in 0..Q {
                if !params[q].is_empty() {
                    pv[q] = load_at(isa, params[q], pos);
                }
            }
            *acc = term(pos, x, pv, *acc);
        }
    }
    for (v, &acc) in acc[..vectors].iter().enumerate() {
        let i = v * l;
        emit(Pos { i, n: (w - i).min(l) }, acc);
    }
}

/// [`column_sums`] with the register blocking suited to the tile: `8 / A` vectors of columns per
/// row (eight accumulator chains) when the tile is that wide, else two with four row phases.
/// A tile that holds a row whole is then read row by row in memory order: with two sums (`A =
/// 2`) a tile of 64 columns (`NHWC` with 64 channels, AVX-512) takes its four vectors at once.
/// Read two vectors at a time, in two sweeps of half rows, the same tiles take 1.25-1.35x as
/// long (bn-bench `--case S3`, 1 and 2 threads, Zen 4). The row order of wider tiles is the
/// geometry's `row_order`.
macro_rules! column_sums {
    ($isa:expr, $k:literal, $q:literal, $a:literal, $tensors:expr, $g:expr, $rows:expr, $cols:expr, $params:expr, $term:expr, $emit:expr) => {{
        let (g, rows, cols): (&Geometry, _, _) = ($g, $rows, $cols);
        let (w, order) = (g.w, g.row_order);
        if cols.len() >= (8 / $a) * I::LANES {
            column_sums::<I, $k, $q, $a, { 8 / $a }, 1>(
                $isa, $tensors, w, order, rows, cols, $params, $term, $emit,
            )
        } else {
            column_sums::<I, $k, $q, $a, 2, 4>($isa, $tensors, w, order, rows, cols, $params, $term, $emit)
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::backend::Backend;
    use crate::kernels::simd::{with_isa, Kernel};

    /// The backward's two sums of `x` and `dy` over `rows` rows of a tile of whole rows of `w`
    /// columns, the rows in order (`row_order`) or `8 / A` vectors of columns at a time.
    struct Sums<'a> {
        x: &'a [f32],
        dy: &'a [f32],
        m: &'a [f32],
        w: usize,
        rows: usize,
        row_order: bool,
    }

    impl Kernel for Sums<'_> {
        type Output = (Vec<f32>, Vec<f32>);
        fn run<I: Isa>(self, isa: I) -> Self::Output {
            // Padded: `emit` stores whole vectors.
            let (mut a, mut b) = (vec![0.0; self.w + 16], vec![0.0; self.w + 16]);
            column_sums::<I, 2, 1, 2, 4, 1>(
                isa,
                [self.x, self.dy],
                self.w,
                self.row_order,
                0..self.rows,
                0..self.w,
                [self.m],
                |_, [x, g], [m], [s, q]| [isa.add(s, g), isa.mul_add(g, isa.sub(x, m), q)],
                |pos, [s, q]| {
                    isa.store(&mut a[pos.i..], s);
                    isa.store(&mut b[pos.i..], q);
                },
            );
            a.truncate(self.w);
            b.truncate(self.w);
            (a, b)
        }
    }

    /// Row by row, the column sums are the same bits as taken four vectors at a time, and
    /// both are the sums (against `f64`), on every backend, for whole vectors and a tail.
    #[test]
    fn row_order_is_the_same_sums() {
        let rows = 37;
        for w in [80, 128, 200, 256, 520, 1024] {
            let value = |i: usize, k: usize| ((i * k) % 101) as f32 / 50.0 - 1.0;
            let x: Vec<f32> = (0..rows * w).map(|i| value(i, 37)).collect();
            let dy: Vec<f32> = (0..rows * w).map(|i| value(i, 59)).collect();
            let m: Vec<f32> = (0..w).map(|j| j as f32 / w as f32 - 0.5).collect();
            for backend in Backend::available() {
                let sums = |row_order| {
                    let (x, dy, m) = (&x[..], &dy[..], &m[..]);
                    with_isa!(backend, |isa| isa.vectorize(Sums { x, dy, m, w, rows, row_order }))
                };
                let (by_rows, by_vectors) = (sums(true), sums(false));
                assert_eq!(by_rows, by_vectors, "{backend} w = {w}");
                for (j, &mj) in m.iter().enumerate() {
                    let col = (0..rows).map(|r| r * w + j);
                    let s: f64 = col.clone().map(|i| dy[i] as f64).sum();
                    let q: f64 = col.map(|i| dy[i] as f64 * (x[i] - mj) as f64).sum();
                    let (a, b) = (by_rows.0[j] as f64, by_rows.1[j] as f64);
                    assert!(
                        (a - s).abs() <= 1e-4 * (1.0 + s.abs()),
                        "{backend} w = {w} column {j}: {a} vs {s}"
                    );
                    assert!(
                        (b - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "{backend} w = {w} column {j}: {b} vs {q}"
                    );
                }
            }
        }
    }

    /// Row order is for tensors of whole-row tiles from [`ROW_ORDER_MIN_BYTES`] on; rows wider
    /// than [`NARROW_TILE`] make whole-row tiles from [`WIDE_TILE_MIN_BYTES`] on.
    #[test]
    fn row_order_rule() {
        let geometry = |outer, channels| Geometry::new(Canonical { outer, channels, inner: 1 });
        let order = |outer, channels| geometry(outer, channels).row_order;
        assert!(order(50 * 56 * 56, 256), "NHWC (50, 56, 56, 256): 160 MB, tiles of whole rows");
        assert!(order(8192, 256), "8 MiB");
        assert!(!order(8191, 256), "below 8 MiB");
        assert!(!order(256, 1024), "S1");
        let g = geometry(50 * 14 * 14, 1024);
        assert!(g.row_order && (g.tile, g.tiles, g.block_rows) == (1024, 1, MIN_BLOCK_ROWS), "{g:?}");
        assert!(order(3072, 1024), "12 MiB");
        let g = geometry(3071, 1024);
        assert!(!g.row_order && (g.tile, g.tiles) == (NARROW_TILE, 4), "below 12 MiB: {g:?}");
        assert!(!order(4096, 512), "8 MiB of rows of 512 columns");
        assert!(!order(2048, 2048), "wider than a tile");
    }
}
