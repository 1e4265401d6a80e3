//! The backward passes on 16-bit data: of the training forward (by blocks widened for the `f32`
//! kernels of [`kernels::backward`](crate::kernels::backward), by the direct kernels, or channel
//! by channel where channels fit in L2) and of the inference forward.

use super::blocks::{
    for_blocks, reduce, streaming_half, Blocks, BLOCK, FUSE_BYTES, PREFETCH_VALUES, REDUCE_BLOCK,
};
use super::convert::{narrow, widen};
use super::direct::{direct, run_kernel, BlockDx, BlockSums, ChannelDx, DIRECT_MIN_RUN};
use crate::kernels::backward;
use crate::kernels::parallel::{for_each_task, part, task_count, use_pool, SharedMut, TASK_ELEMS};
use crate::kernels::simd::bits::HalfFormat;
use crate::kernels::stats::{sum_dy_xhat, DxCoefficients};
use crate::kernels::Backend;
use crate::spec::{specialize, Dynamic, Spec};
use crate::Canonical;

/// [`backward`](super::backward) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
#[allow(clippy::too_many_arguments)]
pub fn backward_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean.len() == c && inv_std.len() == c && gamma.len() == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    // The two reductions per block (the f32 kernels' `backward_sums`, nothing written), added
    // per channel in block order.
    let g = Blocks::new(dims, REDUCE_BLOCK);
    if fuse_backward(dims) {
        return backward_channels(
            backend,
            format,
            x,
            dy,
            dx,
            dims,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    if direct(dims) {
        return backward_direct(
            backend,
            format,
            x,
            dy,
            dx,
            dims,
            &g,
            mean,
            inv_std,
            gamma,
            sum_dy_out,
            sum_dy_xhat_out,
        );
    }
    reduce(
        &g,
        2,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            s.sized(len, bc);
            let r = blk.range();
            widen(backend, format, &x[r.clone()], &mut s.a[..len]);
            widen(backend, format, &dy[r], &mut s.b[..len]);
            let ch = blk.channels();
            backward::backward_sums::<Dynamic>(
                backend,
                &s.a[..len],
                &s.b[..len],
                blk.dims,
                &mean[ch.clone()],
                &inv_std[ch],
                &mut s.p[..bc],
                &mut s.q[..bc],
            );
            for (k, (sdy, sdxh)) in partial.iter_mut().enumerate() {
                *sdy += s.p[k];
                *sdxh += s.q[k];
            }
        },
        |c, parts| {
            let (sdy, sdxh) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sdxh;
        },
    );
    // dx per block: widened, `dx = k1 * dy + k2 * (x - m) + k3` with the whole tensor's sums and
    // count, rounded back. Runs of one channel: a loop the compiler vectorizes; rows of
    // per-column coefficients: the f32 kernels' dx pass.
    let n = dims.per_channel() as f64;
    let (sum_dy, sum_dy_xhat) = (&*sum_dy_out, &*sum_dy_xhat_out);
    let coefficients: Vec<DxCoefficients> = (0..c)
        .map(|k| DxCoefficients::train(mean[k], inv_std[k], gamma[k], n, sum_dy[k], sum_dy_xhat[k]))
        .collect();
    let g = Blocks::new(dims, BLOCK);
    let dx = SharedMut::new(dx);
    for_blocks(&g, 3, false, |blk| {
        let (mut xb, mut dyb, mut dxb) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
        let len = blk.len();
        let (xb, dyb, dxb) = (&mut xb[..len], &mut dyb[..len], &mut dxb[..len]);
        widen(backend, format, &x[blk.range()], xb);
        widen(backend, format, &dy[blk.range()], dyb);
        let ch = blk.channels();
        if blk.dims.inner > 1 {
            dx_block(xb, dyb, blk.dims, &coefficients[ch]);
            // SAFETY: blocks are disjoint and each is written by one task.
            narrow(backend, format, xb, unsafe { dx.slice(blk.start, len) });
            return;
        }
        backward::backward_dx::<Dynamic>(
            backend,
            xb,
            dyb,
            dxb,
            blk.dims,
            n,
            &mean[ch.clone()],
            &inv_std[ch.clone()],
            &gamma[ch.clone()],
            &sum_dy[ch.clone()],
            &sum_dy_xhat[ch],
        );
        // SAFETY: blocks are disjoint and each is written by one task.
        narrow(backend, format, dxb, unsafe { dx.slice(blk.start, len) });
    });
}

/// Whether the training backward runs channel by channel ([`backward_channels`]): as
/// [`fuse_train`], with the channel's `x` and `dy` together within [`FUSE_BYTES`].
#[inline]
fn fuse_backward(dims: Canonical) -> bool {
    let Canonical { outer, channels, inner } = dims;
    (DIRECT_MIN_RUN..=REDUCE_BLOCK).contains(&inner) && 2 * outer * inner * 2 <= FUSE_BYTES && channels >= 4
}

/// The training backward one channel at a time (channels shared out among tasks): the sums of
/// blocks of whole runs of the channel ([`BlockSums`]) added in order, then the channel's `dx`
/// ([`BlockDx`] run by run) while its `x` and `dy` are in cache, so that both are read from
/// memory once. Each channel's results depend on the shape alone.
#[allow(clippy::too_many_arguments)]
fn backward_channels(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let Canonical { outer, channels: c, inner } = dims;
    let runs = (REDUCE_BLOCK / inner).max(1);
    // The sums prefetch ahead as [`forward_train_channels`] does.
    let ahead = c * inner * PREFETCH_VALUES.div_ceil(inner);
    let count = dims.per_channel() as f64;
    let parallel = use_pool(3 * dims.len());
    let tasks = task_count(parallel, dims.len(), TASK_ELEMS).min(c);
    let stream = streaming_half(dims);
    let (dx, sum_dy_out, sum_dy_xhat_out) =
        (SharedMut::new(dx), SharedMut::new(sum_dy_out), SharedMut::new(sum_dy_xhat_out));
    for_each_task(parallel, tasks, |t| {
        for ch in part(c, tasks, t) {
            let (mut sdy, mut sxm) = (0.0f64, 0.0f64);
            for o0 in (0..outer).step_by(runs) {
                let n = runs.min(outer - o0);
                let r = (o0 * c + ch) * inner..(o0 * c + ch) * inner + ((n - 1) * c + 1) * inner;
                let (x, dy) = (&x[r.clone()], &dy[r]);
                let dims = Canonical { outer: n, channels: c, inner };
                let mean = &mean[ch..ch + 1];
                let mut out = [(0.0, 0.0)];
                let out = &mut out[..];
                match format {
                    HalfFormat::Bf16 => {
                        run_kernel(backend, format, BlockSums::<true> { x, dy, dims, ahead, mean, out })
                    }
                    HalfFormat::F16 => {
                        run_kernel(backend, format, BlockSums::<false> { x, dy, dims, ahead, mean, out })
                    }
                }
                sdy += out[0].0;
                sxm += out[0].1;
            }
            let sdxh = sum_dy_xhat(mean[ch], mean[ch] as f32, inv_std[ch], sdy, sxm);
            // SAFETY: channel `ch` belongs to this task alone.
            unsafe {
                sum_dy_out.slice(ch, 1)[0] = sdy;
                sum_dy_xhat_out.slice(ch, 1)[0] = sdxh;
            }
            let d = DxCoefficients::train(mean[ch], inv_std[ch], gamma[ch], count, sdy, sdxh);
            let (k, dx) = ([d.m, d.k1, d.k2, d.k3], &dx);
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, ChannelDx::<true> { x, dy, dx, dims, ch, k, stream })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, ChannelDx::<false> { x, dy, dx, dims, ch, k, stream })
                }
            }
        }
    });
}

/// [`backward`] by the direct kernels: the sums of each block ([`BlockSums`], accumulated with
/// the shift `f32(mean)`), added per channel in block order and finished in `f64`; then `dx` per
/// block ([`BlockDx`]), one pass that reads `x` and `dy` and writes `dx` in 16 bits.
#[allow(clippy::too_many_arguments)]
fn backward_direct(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    g: &Blocks,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    reduce(
        g,
        2,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let bc = blk.dims.channels;
            s.sized_direct(bc);
            let r = blk.range();
            let (x, dy, dims, mean) = (&x[r.clone()], &dy[r], blk.dims, &mean[blk.channels()]);
            let ahead = 0;
            let out = &mut s.sums[..bc];
            match format {
                HalfFormat::Bf16 => {
                    run_kernel(backend, format, BlockSums::<true> { x, dy, dims, ahead, mean, out })
                }
                HalfFormat::F16 => {
                    run_kernel(backend, format, BlockSums::<false> { x, dy, dims, ahead, mean, out })
                }
            }
            for ((sdy, sxm), &(p, q)) in partial.iter_mut().zip(&s.sums[..bc]) {
                *sdy += p;
                *sxm += q;
            }
        },
        |c, parts| {
            let (sdy, sxm) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sum_dy_xhat(mean[c], mean[c] as f32, inv_std[c], sdy, sxm);
        },
    );
    let c = dims.channels;
    let n = dims.per_channel() as f64;
    let mut k = vec![0.0f32; 4 * c];
    {
        let (km, rest) = k.split_at_mut(c);
        let (k1, rest) = rest.split_at_mut(c);
        let (k2, k3) = rest.split_at_mut(c);
        for ch in 0..c {
            let d = DxCoefficients::train(
                mean[ch],
                inv_std[ch],
                gamma[ch],
                n,
                sum_dy_out[ch],
                sum_dy_xhat_out[ch],
            );
            (km[ch], k1[ch], k2[ch], k3[ch]) = (d.m, d.k1, d.k2, d.k3);
        }
    }
    let g = Blocks::new(dims, BLOCK);
    let stream = streaming_half(dims);
    let dx = SharedMut::new(dx);
    let k = &k;
    for_blocks(&g, 3, stream, |blk| {
        let r = blk.range();
        let (x, dy, dims) = (&x[r.clone()], &dy[r], blk.dims);
        // SAFETY: blocks are disjoint and each is written by one task.
        let dx = unsafe { dx.slice(blk.start, blk.len()) };
        let ch = blk.channels();
        let part = |i: usize| &k[i * c + ch.start..i * c + ch.end];
        let k = [part(0), part(1), part(2), part(3)];
        match format {
            HalfFormat::Bf16 => run_kernel(backend, format, BlockDx::<true> { x, dy, dx, dims, k, stream }),
            HalfFormat::F16 => run_kernel(backend, format, BlockDx::<false> { x, dy, dx, dims, k, stream }),
        }
    });
}

/// [`backward_eval`](super::backward_eval) with the compile-time shape of `S` (a generated layer's
/// [`Spec`]): its constants replace the run-time extents of `dims`; the same kernels and bits.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval_spec<S: Spec>(
    backend: Backend,
    format: HalfFormat,
    x: &[u16],
    dy: &[u16],
    dx: &mut [u16],
    dims: Canonical,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    sum_dy_out: &mut [f64],
    sum_dy_xhat_out: &mut [f64],
) {
    let dims = specialize::<S>(dims);
    let c = dims.channels;
    assert!(x.len() == dims.len() && dy.len() == dims.len() && dx.len() == dims.len());
    assert!(mean.len() == c && inv_std.len() == c && gamma.len() == c);
    assert!(sum_dy_out.len() == c && sum_dy_xhat_out.len() == c);
    if dims.is_empty() {
        sum_dy_out.fill(0.0);
        sum_dy_xhat_out.fill(0.0);
        return;
    }
    let g = Blocks::new(dims, REDUCE_BLOCK);
    let dx = SharedMut::new(dx);
    reduce(
        &g,
        3,
        (0.0f64, 0.0f64),
        |s, blk, partial| {
            let (len, bc) = (blk.len(), blk.dims.channels);
            s.sized(len, bc);
            let r = blk.range();
            widen(backend, format, &x[r.clone()], &mut s.a[..len]);
            widen(backend, format, &dy[r], &mut s.b[..len]);
            let ch = blk.channels();
            backward::backward_eval::<Dynamic>(
                backend,
                &s.a[..len],
                &s.b[..len],
                &mut s.c[..len],
                blk.dims,
                &mean[ch.clone()],
                &inv_std[ch.clone()],
                &gamma[ch],
                &mut s.p[..bc],
                &mut s.q[..bc],
            );
            // SAFETY: blocks are disjoint and each is written by one task.
            narrow(backend, format, &s.c[..len], unsafe { dx.slice(blk.start, len) });
            for (k, (sdy, sdyxh)) in partial.iter_mut().enumerate() {
                *sdy += s.p[k];
                *sdyxh += s.q[k];
            }
        },
        |c, parts| {
            let (sdy, sdyxh) = parts.fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q));
            sum_dy_out[c] = sdy;
            sum_dy_xhat_out[c] = sdyxh;
        },
    );
}

/// `x = k1 * dy + k2 * (x - m) + k3` over a block, with its channels' coefficients.
#[inline]
fn dx_block(x: &mut [f32], dy: &[f32], dims: Canonical, k: &[DxCoefficients]) {
    let (bc, inner) = (dims.channels, dims.inner);
    if inner == 1 {
        for (xr, dyr) in x.chunks_exact_mut(bc).zip(dy.chunks_exact(bc)) {
            for ((v, &d), k) in xr.iter_mut().zip(dyr).zip(k) {
                *v = k.k1 * d + (k.k2 * (*v - k.m) + k.k3);
            }
        }
    } else {
        for (r, (xr, dyr)) in x.chunks_exact_mut(inner).zip(dy.chunks_exact(inner)).enumerate() {
            let k = k[r % bc];
            for (v, &d) in xr.iter_mut().zip(dyr) {
                *v = k.k1 * d + (k.k2 * (*v - k.m) + k.k3);
            }
        }
    }
}
