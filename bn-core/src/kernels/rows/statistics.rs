//! The statistics of the rows family: per block of a tile the column means, then the
//! deviations from them, merged into the chunk's moments (Chan); the chunks merged in order,
//! the virtual columns folded into channels and the tail added.

use core::marker::PhantomData;
use core::ops::Range;

use super::geometry::{column_sums, Geometry, TileBuf, PILOT_ROWS};
use crate::kernels::parallel::{for_each_task, task_count, use_pool, SharedMut, TASK_ELEMS};
use crate::kernels::simd::{Isa, Kernel, Serial};
use crate::kernels::stats::Moments;
use crate::spec::{specialize, Spec};
use crate::Canonical;

/// `sum(x - m)` and `sum((x - m)^2)` per column of one block × tile into `buf.a` and `buf.b`,
/// `m` the shifts in `buf.m`.
#[inline(always)]
fn tile_deviations<I: Isa>(
    isa: I,
    x: &[f32],
    g: &Geometry,
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
        g,
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
    g: &Geometry,
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
            g,
            first,
            cols.clone(),
            [],
            #[inline(always)]
            |_, [v], [], [a]| [isa.mul_add(v, inv, a)],
            #[inline(always)]
            |pos, [s]| isa.store(&mut m[pos.i..], s)
        );
    }
    tile_deviations(isa, x, g, rows.clone(), cols.clone(), buf);
    // Every column tested (no early exit), so that the test vectorizes.
    let mut far = false;
    for j in 0..nc {
        far |= Moments::pilot_is_far(n, buf.a[j] as f64, buf.b[j] as f64);
    }
    if far {
        for j in 0..nc {
            buf.m[j] = (buf.m[j] as f64 + buf.a[j] as f64 / n) as f32;
        }
        tile_deviations(isa, x, g, rows, cols, buf);
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
    pub(super) x: &'a [f32],
    pub(super) dims: Canonical,
    pub(super) tasks: Range<usize>,
    pub(super) mean: &'a SharedMut<'s, f64>,
    pub(super) m2: &'a SharedMut<'s, f64>,
    pub(super) _spec: PhantomData<S>,
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
                    &g,
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
pub(super) fn run_tasks(
    parallel: bool,
    total: usize,
    work: usize,
    per_task: impl Fn(Range<usize>) + Sync + Send,
) {
    let tasks = task_count(parallel, work, TASK_ELEMS).min(total).max(1);
    for_each_task(parallel, tasks, |k| per_task(crate::kernels::parallel::part(total, tasks, k)));
}

/// Per-channel moments of the rows family into `mean_out` and `var_out` (biased).
pub(super) fn statistics<S: Spec, I: Isa>(
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
