//! The forward passes on 16-bit data: inference, the batch statistics and the training
//! forward, by blocks widened for the `f32` kernels of [`kernels::forward`](crate::kernels::forward)
//! or by the direct kernels, channel by channel where channels fit in L2.

use super::blocks::{
    for_blocks, reduce, streaming_half, Block, Blocks, BLOCK, FUSE_BYTES, PREFETCH_VALUES, REDUCE_BLOCK,
};
use super::convert::{affine, affine_inplace, affine_stream, has_affine, narrow, widen, Params};
use super::direct::{direct, run_kernel, BlockMoments, ChannelAffine, DIRECT_MIN_RUN};
use crate::kernels::forward;
use crate::kernels::parallel::{
    for_each_task, part, task_count, use_pool, without_alloc, SharedMut, TASK_ELEMS,
};
use crate::kernels::simd::bits::HalfFormat;
use crate::kernels::stats::{Affine32, Moments};
use crate::kernels::Backend;
use crate::spec::{specialize, Dynamic, Spec};
use crate::Canonical;

/// [`normalize`](super::normalize) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
#[allow(clippy::too_many_arguments)]
pub fn normalize_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let dims = specialize::<S>(dims);
    without_alloc(2 * dims.len(), || normalize_helped(backend, format, x, y, dims, mean, scale, shift));
}

/// [`normalize`] for a training step: helped from outside the pool like the training kernels,
/// never handed to a worker.
#[allow(clippy::too_many_arguments)]
fn normalize_helped(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    assert!(x.len() == dims.len() && y.len() == dims.len(), "x and y must hold dims.len() values");
    let c = dims.channels;
    assert!(mean.len() == c && scale.len() == c && shift.len() == c);
    if dims.is_empty() {
        return;
    }
    let g = Blocks::new(dims, BLOCK);
    let stream = streaming_half(dims);
    let y = SharedMut::new(y);
    for_blocks(&g, 2, stream, |blk| {
        // SAFETY: blocks are disjoint and each is written by one task.
        let out = unsafe { y.slice(blk.start, blk.len()) };
        normalize_block(backend, format, Some(&x[blk.range()]), out, blk, mean, scale, shift, stream);
    });
}

/// One block of inference: `out = normalize(x)`, or in place when `x` is `None` (the same
/// arithmetic either way). Runs of one channel of at least 16 values, and rows of at least 16
/// channels, take the fused one-pass kernel where the backend has one; other blocks are widened
/// into a buffer and run by the `f32` kernel. `stream`: runs written by the fused kernel use
/// non-temporal stores (out of place only).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_block(
    backend: Backend,
    format: HalfFormat,
    x: Option<&[u16]>,
    out: &mut [u16],
    blk: Block,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    stream: bool,
) {
    let Canonical { channels: bc, inner, .. } = blk.dims;
    let ch = blk.channels();
    let run = |x: Option<&[u16]>, out: &mut [u16], p: Params<'_>| match x {
        Some(x) if stream => affine_stream(backend, format, x, out, p),
        Some(x) => affine(backend, format, x, out, p),
        None => affine_inplace(backend, format, out, p),
    };
    if inner >= 16 && has_affine(backend, format) {
        // The block's runs in one kernel call, run `r` of channel `c0 + r % bc`.
        let p = Params::Runs { inner, m: &mean[ch.clone()], s: &scale[ch.clone()], t: &shift[ch.clone()] };
        run(x, out, p);
    } else if inner == 1 && bc >= 16 && has_affine(backend, format) {
        let p = Params::Lanes(&mean[ch.clone()], &scale[ch.clone()], &shift[ch]);
        if bc % 16 == 0 {
            // Rows of whole vectors: the block in one call, the parameters repeating per row.
            run(x, out, p);
        } else {
            for start in (0..out.len()).step_by(bc) {
                run(x.map(|x| &x[start..start + bc]), &mut out[start..start + bc], p);
            }
        }
    } else {
        let mut buf = [0.0f32; BLOCK];
        let buf = &mut buf[..blk.len()];
        widen(backend, format, x.unwrap_or(out), buf);
        let (m, s, t) = (&mean[ch.clone()], &scale[ch.clone()], &shift[ch]);
        forward::normalize_inplace::<Dynamic>(backend, buf, blk.dims, m, s, t);
        narrow(backend, format, buf, out);
    }
}

/// [`normalize_inplace`](super::normalize_inplace) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
pub fn normalize_inplace_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    xy: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let dims = specialize::<S>(dims);
    assert!(xy.len() == dims.len(), "xy must hold dims.len() values");
    let c = dims.channels;
    assert!(mean.len() == c && scale.len() == c && shift.len() == c);
    if dims.is_empty() {
        return;
    }
    let g = Blocks::new(dims, BLOCK);
    let xy = SharedMut::new(xy);
    without_alloc(2 * dims.len(), || {
        for_blocks(&g, 2, false, |blk| {
            // SAFETY: blocks are disjoint and each is read and written by one task.
            let io = unsafe { xy.slice(blk.start, blk.len()) };
            normalize_block(backend, format, None, io, blk, mean, scale, shift, false);
        })
    });
}

/// [`batch_stats`](super::batch_stats) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
pub fn batch_stats_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dims: Canonical,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len(), "x must hold dims.len() values");
    assert!(mean_out.len() == c && var_out.len() == c);
    if dims.per_channel() == 0 {
        mean_out.fill(f64::NAN);
        var_out.fill(f64::NAN);
        return;
    }
    if c == 0 {
        return;
    }
    let g = Blocks::new(dims, REDUCE_BLOCK);
    let is_direct = direct(dims);
    reduce(
        &g,
        1,
        Moments::EMPTY,
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            if is_direct {
                s.sized_direct(bc);
                let (x, dims, ahead) = (&x[blk.range()], blk.dims, 0);
                let out = &mut s.moments[..bc];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockMoments::<true> { x, dims, ahead, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockMoments::<false> { x, dims, ahead, out })
                    }
                }
                for (m, &b) in partial.iter_mut().zip(&s.moments[..bc]) {
                    *m = m.merge(b);
                }
                return;
            }
            s.sized(len, bc);
            widen(backend, format, &x[blk.range()], &mut s.a[..len]);
            forward::batch_stats::<Dynamic>(backend, &s.a[..len], blk.dims, &mut s.p[..bc], &mut s.q[..bc]);
            let n = blk.dims.per_channel() as f64;
            for (k, m) in partial.iter_mut().enumerate() {
                *m = m.merge(Moments { n, mean: s.p[k], m2: s.q[k] * n });
            }
        },
        |c, parts| {
            let m = parts.fold(Moments::EMPTY, Moments::merge);
            mean_out[c] = m.mean;
            var_out[c] = m.m2 / m.n;
        },
    );
}

/// [`forward_train`](super::forward_train) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
#[allow(clippy::too_many_arguments)]
pub fn forward_train_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(y.len() == dims.len(), "y must hold dims.len() values");
    assert!(gamma.len() == c && beta.len() == c);
    if fuse_train(backend, format, dims) {
        return forward_train_channels(backend, format, x, y, dims, gamma, beta, eps, mean_out, var_out);
    }
    batch_stats_spec::<S>(backend, format, x, dims, mean_out, var_out);
    if mean_out.iter().chain(var_out.iter()).any(|v| !v.is_finite()) {
        return;
    }
    let (mut m, mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
    for k in 0..c {
        let a = Affine32::train(mean_out[k], var_out[k], eps, gamma[k], beta[k]);
        (m[k], s[k], t[k]) = (a.m, a.s, a.t);
    }
    normalize_helped(backend, format, x, y, dims, &m, &s, &t);
}

/// Whether the training forward runs channel by channel ([`forward_train_channels`]): runs long
/// enough for the direct kernels and no longer than a reduction block, channels that fit
/// [`FUSE_BYTES`], enough of them to share out, and a fused affine kernel. Fixed by the shape
/// (and backend).
#[inline]
fn fuse_train(backend: Backend, format: HalfFormat, dims: Canonical) -> bool {
    let Canonical { outer, channels, inner } = dims;
    (DIRECT_MIN_RUN..=REDUCE_BLOCK).contains(&inner)
        && outer * inner * 2 <= FUSE_BYTES
        && channels >= 4
        && has_affine(backend, format)
        && outer * inner > 0
}

/// The training forward one channel at a time (channels shared out among tasks): the moments
/// of blocks of whole runs of the channel ([`BlockMoments`]) merged in order, then the
/// channel's runs normalized by the fused affine kernel while they are in cache. `x` is read
/// from memory once. Each channel's results depend on the shape alone.
#[allow(clippy::too_many_arguments)]
fn forward_train_channels(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    y: &mut [u16],
    dims: Canonical,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    mean_out: &mut [f64],
    var_out: &mut [f64],
) {
    let Canonical { outer, channels: c, inner } = dims;
    let runs = (REDUCE_BLOCK / inner).max(1);
    // The first pass over a run prefetches the channel's run [`PREFETCH_VALUES`] or more
    // values further (the hardware prefetchers do not follow the stride between runs).
    let ahead = c * inner * PREFETCH_VALUES.div_ceil(inner);
    let parallel = use_pool(2 * dims.len());
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(c);
    let stream = streaming_half(dims);
    let (y, mean_out, var_out) = (SharedMut::new(y), SharedMut::new(mean_out), SharedMut::new(var_out));
    for_each_task(parallel, tasks, |t| {
        for ch in part(c, tasks, t) {
            let mut moments = Moments::EMPTY;
            for o0 in (0..outer).step_by(runs) {
                let n = runs.min(outer - o0);
                let start = (o0 * c + ch) * inner;
                let x = &x[start..start + ((n - 1) * c + 1) * inner];
                let dims = Canonical { outer: n, channels: c, inner };
                let mut out = [Moments::EMPTY];
                let out = &mut out[..];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockMoments::<true> { x, dims, ahead, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockMoments::<false> { x, dims, ahead, out })
                    }
                }
                moments = moments.merge(out[0]);
            }
            let (mean, var) = (moments.mean, moments.m2 / moments.n);
            // SAFETY: channel `ch` belongs to this task alone.
            unsafe {
                mean_out.slice(ch, 1)[0] = mean;
                var_out.slice(ch, 1)[0] = var;
            }
            if !(mean.is_finite() && var.is_finite()) {
                continue;
            }
            let a = Affine32::train(mean, var, eps, gamma[ch], beta[ch]);
            let (k, y) = ([a.m, a.s, a.t], &y);
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, ChannelAffine::<true> { x, y, dims, ch, k, stream })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, ChannelAffine::<false> { x, y, dims, ch, k, stream })
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Backend;

    /// The one-pass statistics around a pilot shift stay accurate when the pilot (the first
    /// values of a channel) is far from the mean: 16 values of 1000 then 16368 values in
    /// {-1, 0, 1}. Without the second pass around the mean the variance is off by about 1%.
    #[test]
    fn statistics_stay_accurate_with_a_far_pilot() {
        // Planes: two channels of one run; rows: 16 channels whose first 16 rows are the pilot.
        let inner = 16384;
        let planes: Vec<f32> = (0..2 * inner)
            .map(|i| if i % inner < 16 { 1000.0 } else { ((i * 7919) % 3) as f32 - 1.0 })
            .collect();
        let rows: Vec<f32> = (0..16 * 1024)
            .map(|i| if i < 16 * 16 { 8192.0 } else { ((i * 7919) % 3) as f32 - 1.0 })
            .collect();
        for (values, dims) in [
            (planes, Canonical { outer: 1, channels: 2, inner }),
            (rows, Canonical { outer: 1024, channels: 16, inner: 1 }),
        ] {
            check_statistics(&values, dims);
        }
    }

    /// [`batch_stats`] of `values` in both formats on every backend against the `f64` mean and
    /// variance (the values are exact in both formats).
    fn check_statistics(values: &[f32], dims: Canonical) {
        let c = dims.channels;
        let channel = |k: usize| -> Vec<f64> {
            (0..dims.outer)
                .flat_map(|o| (0..dims.inner).map(move |i| (o * c + k) * dims.inner + i))
                .map(|i| values[i] as f64)
                .collect()
        };
        for backend in Backend::available() {
            for format in [HalfFormat::Bf16, HalfFormat::F16] {
                let bits: Vec<u16> = values
                    .iter()
                    .map(|&v| match format {
                        HalfFormat::Bf16 => half::bf16::from_f32(v).to_bits(),
                        HalfFormat::F16 => half::f16::from_f32(v).to_bits(),
                    })
                    .collect();
                let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
                super::super::batch_stats(backend, format, &bits, dims, &mut mean, &mut var);
                for k in 0..c {
                    let v = channel(k);
                    let m = v.iter().sum::<f64>() / v.len() as f64;
                    let q = v.iter().map(|&x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
                    let at = format!("{backend} {format:?} {dims:?} channel {k}");
                    assert!((mean[k] - m).abs() <= 1e-6 * q.sqrt(), "{at}: mean {} vs {m}", mean[k]);
                    assert!((var[k] - q).abs() <= 1e-4 * q, "{at}: var {} vs {q}", var[k]);
                }
            }
        }
    }
}
