//! The shape of the rows family's work: virtual rows, blocks, column tiles and chunks
//! ([`Geometry`]), fixed by the shape alone, and the register-blocked column sums
//! ([`column_sums`]) that the statistics and the backward sums run over a block of a tile.

use core::ops::Range;

use crate::kernels::simd::Isa;
use crate::kernels::vector::{load_at, Pos};
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
}

impl Geometry {
    #[inline(always)]
    pub(super) fn new(dims: Canonical) -> Geometry {
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
/// `A` sums over the rows (an empty parameter loads as zeros). Accumulators stay in registers: `G` vectors of columns
/// at a time (a row's `G` vectors are contiguous), each with `P` accumulators (rows `P q + k`)
/// so that at least eight independent chains hide the latency of the additions; the phases are
/// added pairwise at the end. Whole groups run a loop without per-vector checks; the last,
/// partial group and the masked tail vector run a generic one. Lanes past the last column load
/// as zero.
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

/// [`column_sums`] with the register blocking suited to the tile: `8 / A` vectors of columns per
/// row (eight accumulator chains) when the tile is that wide, else two with four row phases.
/// A tile that holds a row whole is then read row by row in memory order: with two sums (`A =
/// 2`) a tile of 64 columns (`NHWC` with 64 channels, AVX-512) takes its four vectors at once.
/// Read two vectors at a time, in two sweeps of half rows, the same tiles take 1.25-1.35x as
/// long (bn-bench `--case S3`, 1 and 2 threads, Zen 4).
macro_rules! column_sums {
    ($isa:expr, $k:literal, $q:literal, $a:literal, $tensors:expr, $w:expr, $rows:expr, $cols:expr, $params:expr, $term:expr, $emit:expr) => {{
        let (rows, cols) = ($rows, $cols);
        if cols.len() >= (8 / $a) * I::LANES {
            column_sums::<I, $k, $q, $a, { 8 / $a }, 1>($isa, $tensors, $w, rows, cols, $params, $term, $emit)
        } else {
            column_sums::<I, $k, $q, $a, 2, 4>($isa, $tensors, $w, rows, cols, $params, $term, $emit)
        }
    }};
}
