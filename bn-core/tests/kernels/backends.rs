//! Every fast backend against the `f64` reference kernels, on shapes that exercise every tail
//! of both families; accuracy when `|mean| >> std`; bit-identical results across thread counts;
//! `normalize_inplace` bit-identical to `normalize`.
//!
//! Backends this machine lacks are skipped with a printed line.

use bn_core::kernels::{self, reference, Backend, Epilogue};
use bn_core::spec::{Dynamic, Spec};
use bn_core::Canonical;

use crate::common;
use common::{fast_backends, Rng};

/// Extents that exercise every tail: 1, below/at/above one and two vectors, odd, and large.
const EXTENTS: [usize; 10] = [1, 2, 7, 8, 15, 16, 17, 49, 70, 3136];

/// Shapes: rows (`inner == 1`) for every `C`, planes for every `inner` with several `C`, and a
/// few with many rows or runs (several blocks, chunks and a partial virtual row).
fn shapes() -> Vec<Canonical> {
    let mut out = Vec::new();
    for &c in &EXTENTS {
        for &inner in &EXTENTS {
            for outer in 1..=3 {
                let dims = Canonical { outer, channels: c, inner };
                let small_c = matches!(c, 1 | 2 | 7 | 17 | 70);
                let keep = dims.len() <= 40_000 && (inner == 1 || small_c || matches!(inner, 2 | 7 | 17));
                if keep {
                    out.push(dims);
                }
            }
        }
    }
    for (outer, channels, inner) in
        [(1000, 7, 1), (333, 3, 1), (70, 70, 1), (9, 1000, 1), (65, 16, 1), (40, 3, 49)]
    {
        out.push(Canonical { outer, channels, inner });
    }
    out.extend(short_run_shapes());
    out
}

/// Every branch of the planes family's short-run rule (runs shorter than 128 values and at least
/// 16 images take spans of channel tiles): tiles of many channels with a partial last tile, of
/// one channel, runs of 2, 49 and 196 (a long run), more than one block of 128 images, 15 and
/// 16 images, runs of 127 and 128 (the first long run), and slabs too large to fuse (the split
/// schedule).
fn short_run_shapes() -> Vec<Canonical> {
    [
        (50, 40, 196),
        (16, 70, 127),
        (16, 70, 128),
        (5, 33, 129),
        (50, 37, 49),
        (15, 37, 49),
        (16, 37, 49),
        (300, 21, 2),
        (1500, 2, 49),
        (6000, 3, 49),
        (2, 513, 7),
    ]
    .into_iter()
    .map(|(outer, channels, inner)| Canonical { outer, channels, inner })
    .collect()
}

fn tolerance_check(
    what: &str,
    dims: Canonical,
    b: Backend,
    got: &[f64],
    want: &[f64],
    scale: &[f64],
    tol: f64,
) {
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * s.max(1e-30) || err <= 1e-12,
            "{b} {dims:?} {what}[{i}]: got {g}, want {w} (error {err:e}, scale {s:e})"
        );
    }
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&v| v as f64).collect()
}

/// The reference's per-channel statistics and normalized output for `x`.
struct Expected {
    mean: Vec<f64>,
    var: Vec<f64>,
    y: Vec<f32>,
}

fn expected_train(x: &[f32], dims: Canonical, gamma: &[f32], beta: &[f32], eps: f64) -> Expected {
    let c = dims.channels;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    reference::batch_stats(x, dims, &mut mean, &mut var);
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let mut y = vec![0.0; x.len()];
    reference::normalize(x, &mut y, dims, reference::Affine { mean: &mean, inv_std: &inv_std, gamma, beta });
    Expected { mean, var, y }
}

#[test]
fn backend_names_and_detection() {
    for b in Backend::ALL {
        assert_eq!(b.name().parse::<Backend>().unwrap(), b);
        assert_eq!(b.to_string(), b.name());
        assert_eq!(format!(" {} ", b.name().to_uppercase()).parse::<Backend>().unwrap(), b);
    }
    assert!("sse9".parse::<Backend>().is_err());
    let available = Backend::available();
    assert_eq!(available[0], Backend::Scalar);
    assert!(available.contains(&Backend::Wide));
    assert!(Backend::detect().is_available());
    assert!(available.contains(&Backend::best()));
    println!("available backends: {available:?}, detected: {}", Backend::detect());
}

#[test]
fn forward_train_matches_reference() {
    for (k, dims) in shapes().into_iter().enumerate() {
        if dims.per_channel() >= 2 {
            check_forward_train(k as u64 + 1, dims);
        }
    }
}

/// Shapes of 8 MiB and more whose rows make one tile (the rows family's column sums then go row
/// by row; rows of 1024 columns from 12 MiB): the training forward and the backward against
/// the reference on every backend.
#[test]
fn whole_row_tiles_match_reference() {
    let shapes = [
        Canonical { outer: 8192, channels: 256, inner: 1 },
        Canonical { outer: 3072, channels: 1024, inner: 1 },
    ];
    for (k, dims) in shapes.into_iter().enumerate() {
        check_forward_train(100 + k as u64, dims);
        check_backward(200 + k as u64, dims);
    }
}

/// [`kernels::forward_train`] on every fast backend against the `f64` reference, on inputs drawn
/// from `seed`.
fn check_forward_train(seed: u64, dims: Canonical) {
    let backends = fast_backends();
    let eps = 1e-5;
    let mut rng = Rng::new(seed);
    let c = dims.channels;
    let x = rng.vec(dims.len(), -3.0, 5.0);
    let gamma = rng.vec(c, 0.5, 2.0);
    let beta = rng.vec(c, -1.0, 1.0);
    let want = expected_train(&x, dims, &gamma, &beta, eps);
    let y_scale: Vec<f64> = want.y.iter().map(|&v| 1.0 + v.abs() as f64).collect();
    for &b in &backends {
        let (mut mean, mut var) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        let mut y = vec![f32::NAN; dims.len()];
        kernels::forward_train::<Dynamic>(b, &x, &mut y, dims, &gamma, &beta, eps, &mut mean, &mut var);
        let std: Vec<f64> = want.var.iter().map(|v| v.sqrt() + 1e-3).collect();
        tolerance_check("mean", dims, b, &mean, &want.mean, &std, 1e-5);
        tolerance_check("var", dims, b, &var, &want.var, &want.var, 2e-5);
        tolerance_check("y", dims, b, &to_f64(&y), &to_f64(&want.y), &y_scale, 2e-5);
    }
}

#[test]
fn normalize_matches_reference_and_inplace_is_bit_identical() {
    let backends = fast_backends();
    for (k, dims) in shapes().into_iter().enumerate() {
        let mut rng = Rng::new(1000 + k as u64);
        let c = dims.channels;
        let x = rng.vec(dims.len(), -3.0, 5.0);
        let mean = rng.vec(c, -1.0, 1.0);
        let scale = rng.vec(c, 0.2, 3.0);
        let shift = rng.vec(c, -1.0, 1.0);
        let mut want = vec![0.0; dims.len()];
        kernels::normalize::<Dynamic>(Backend::Scalar, &x, &mut want, dims, &mean, &scale, &shift);
        // The scalar backend is the reference's formula with inv_std = scale and gamma = 1.
        let inv_std = to_f64(&scale);
        let ones = vec![1.0f32; c];
        let affine = reference::Affine { mean: &mean, inv_std: &inv_std, gamma: &ones, beta: &shift };
        let mut oracle = vec![0.0; dims.len()];
        reference::normalize(&x, &mut oracle, dims, affine);
        assert_eq!(want, oracle, "{dims:?}: scalar normalize is the reference");
        let y_scale: Vec<f64> = want.iter().map(|&v| 1.0 + v.abs() as f64).collect();
        for &b in Backend::available().iter() {
            let mut y = vec![f32::NAN; dims.len()];
            kernels::normalize::<Dynamic>(b, &x, &mut y, dims, &mean, &scale, &shift);
            tolerance_check("y", dims, b, &to_f64(&y), &to_f64(&want), &y_scale, 1e-6);
            let mut xy = x.clone();
            kernels::normalize_inplace::<Dynamic>(b, &mut xy, dims, &mean, &scale, &shift);
            assert_bits(&xy, &y, &format!("{b} {dims:?}: normalize_inplace vs normalize"));
        }
        let _ = &backends;
    }
}

/// Inference of short runs (every branch of [`short_run_shapes`], runs of 127 and 128 values
/// around the streaming threshold, and one large enough for the pool) on the backends with a
/// fused multiply-add: exactly `fma(x - m, s, t)` in `f32` per value, through the fused ReLU and
/// the residual too, in place, with streaming stores forced on and off and by the size rule, on
/// 1, 2 and 3 threads.
#[test]
fn short_run_inference_is_the_fused_formula() {
    let shapes = short_run_shapes().into_iter().chain([
        Canonical { outer: 20, channels: 40, inner: 127 },
        Canonical { outer: 20, channels: 40, inner: 128 },
        Canonical { outer: 50, channels: 96, inner: 196 },
        // 8.4 MiB out: streamed by the inference rule, not by the training passes'.
        Canonical { outer: 44, channels: 256, inner: 196 },
    ]);
    let backends: Vec<Backend> =
        fast_backends().into_iter().filter(|b| matches!(b, Backend::Avx2 | Backend::Avx512)).collect();
    if backends.is_empty() {
        println!("skipped: no backend with a fused multiply-add on this machine");
    }
    for (k, dims) in shapes.enumerate() {
        let mut rng = Rng::new(7000 + k as u64);
        let c = dims.channels;
        let x = rng.vec(dims.len(), -3.0, 5.0);
        let residual = rng.vec(dims.len(), -2.0, 2.0);
        let mean = rng.vec(c, -1.0, 1.0);
        let scale = rng.vec(c, 0.2, 3.0);
        let shift = rng.vec(c, -1.0, 1.0);
        let relu = |v: f32| if v < 0.0 { 0.0 } else { v };
        let plain: Vec<f32> = (0..dims.len())
            .map(|i| {
                let ch = (i / dims.inner) % c;
                (x[i] - mean[ch]).mul_add(scale[ch], shift[ch])
            })
            .collect();
        let with_relu: Vec<f32> = plain.iter().map(|&v| relu(v)).collect();
        let with_residual: Vec<f32> = plain.iter().zip(&residual).map(|(&v, &r)| relu(v + r)).collect();
        for &b in &backends {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for stream in [None, Some(false), Some(true)] {
                    let what = format!("{b} {dims:?}, {threads} threads, streaming {stream:?}");
                    kernels::__force_streaming(stream);
                    pool.install(|| {
                        let mut y = vec![f32::NAN; dims.len()];
                        kernels::normalize::<Dynamic>(b, &x, &mut y, dims, &mean, &scale, &shift);
                        assert_bits(&y, &plain, &format!("{what}: normalize"));
                        let mut xy = x.clone();
                        kernels::normalize_inplace::<Dynamic>(b, &mut xy, dims, &mean, &scale, &shift);
                        assert_bits(&xy, &plain, &format!("{what}: normalize_inplace"));
                        for (epilogue, want, name) in [
                            (Epilogue::Relu, &with_relu, "relu"),
                            (Epilogue::AddRelu(&residual), &with_residual, "add-relu"),
                        ] {
                            let mut y = vec![f32::NAN; dims.len()];
                            kernels::normalize_fused::<Dynamic>(
                                b, &x, &mut y, epilogue, dims, &mean, &scale, &shift,
                            );
                            assert_bits(&y, want, &format!("{what}: normalize_fused {name}"));
                        }
                    });
                    kernels::__force_streaming(None);
                }
            }
        }
    }
}

#[test]
fn normalize_empty_is_a_no_op() {
    for b in Backend::available() {
        for dims in
            [Canonical { outer: 0, channels: 3, inner: 4 }, Canonical { outer: 0, channels: 5, inner: 1 }]
        {
            let p = [1.0f32; 5];
            kernels::normalize::<Dynamic>(
                b,
                &[],
                &mut [],
                dims,
                &p[..dims.channels],
                &p[..dims.channels],
                &p[..dims.channels],
            );
            kernels::normalize_inplace::<Dynamic>(
                b,
                &mut [],
                dims,
                &p[..dims.channels],
                &p[..dims.channels],
                &p[..dims.channels],
            );
        }
    }
}

/// The training backward's reference: sums and dx.
fn expected_backward(
    x: &[f32],
    dy: &[f32],
    dims: Canonical,
    mean: &[f64],
    inv_std: &[f64],
    gamma: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
    let c = dims.channels;
    let (mut sdy, mut sdxh) = (vec![0.0; c], vec![0.0; c]);
    reference::backward_sums(x, dy, dims, mean, inv_std, &mut sdy, &mut sdxh);
    let mut dx = vec![0.0; x.len()];
    reference::backward_train_dx(x, dy, &mut dx, dims, mean, inv_std, gamma, &sdy, &sdxh);
    (sdy, sdxh, dx)
}

/// Per-channel scale of a sum: the sum of absolute values of its terms.
fn abs_sums(dims: Canonical, f: impl Fn(usize) -> f64) -> Vec<f64> {
    let mut s = vec![0.0; dims.channels];
    for i in 0..dims.len() {
        s[(i / dims.inner) % dims.channels] += f(i).abs();
    }
    s
}

#[test]
fn backward_matches_reference() {
    for (k, dims) in shapes().into_iter().enumerate() {
        if dims.per_channel() >= 2 {
            check_backward(2000 + k as u64, dims);
        }
    }
}

/// [`kernels::backward`] on every fast backend against the `f64` reference, on inputs drawn from
/// `seed`.
fn check_backward(seed: u64, dims: Canonical) {
    let backends = fast_backends();
    let mut rng = Rng::new(seed);
    let c = dims.channels;
    let x = rng.vec(dims.len(), -3.0, 5.0);
    let dy = rng.vec(dims.len(), -1.0, 1.0);
    let gamma = rng.vec(c, 0.5, 2.0);
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    reference::batch_stats(&x, dims, &mut mean, &mut var);
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    let (want_sdy, want_sdxh, want_dx) = expected_backward(&x, &dy, dims, &mean, &inv_std, &gamma);
    let scale_dy = abs_sums(dims, |i| dy[i] as f64);
    let scale_dxh = abs_sums(dims, |i| {
        let c = (i / dims.inner) % dims.channels;
        dy[i] as f64 * (x[i] as f64 - mean[c]) * inv_std[c]
    });
    // |dx| is bounded by gamma * inv_std * (|dy| + mean|dy| + |xhat| mean|dy xhat|).
    let dx_scale: Vec<f64> = (0..dims.len())
        .map(|i| {
            let c = (i / dims.inner) % dims.channels;
            let n = dims.per_channel() as f64;
            let xhat = (x[i] as f64 - mean[c]) * inv_std[c];
            gamma[c] as f64
                * inv_std[c]
                * (1.0 + dy[i].abs() as f64 + (1.0 + xhat.abs()) * (scale_dy[c] + scale_dxh[c]) / n)
        })
        .collect();
    for &b in &backends {
        let (mut sdy, mut sdxh) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        let mut dx = vec![f32::NAN; dims.len()];
        kernels::backward::<Dynamic>(b, &x, &dy, &mut dx, dims, &mean, &inv_std, &gamma, &mut sdy, &mut sdxh);
        tolerance_check("sum_dy", dims, b, &sdy, &want_sdy, &scale_dy, 1e-6);
        tolerance_check("sum_dy_xhat", dims, b, &sdxh, &want_sdxh, &scale_dxh, 1e-6);
        tolerance_check("dx", dims, b, &to_f64(&dx), &to_f64(&want_dx), &dx_scale, 1e-6);
    }
}

#[test]
fn backward_eval_matches_reference() {
    let backends = fast_backends();
    for (k, dims) in shapes().into_iter().enumerate() {
        let mut rng = Rng::new(3000 + k as u64);
        let c = dims.channels;
        let x = rng.vec(dims.len(), -3.0, 5.0);
        let dy = rng.vec(dims.len(), -1.0, 1.0);
        let gamma = rng.vec(c, 0.5, 2.0);
        let mean = rng.vec(c, -1.0, 2.0);
        let inv_std = rng.vec(c, 0.3, 2.0);
        let inv64 = to_f64(&inv_std);
        let (mut want_sdy, mut want_sdxh) = (vec![0.0; c], vec![0.0; c]);
        reference::backward_sums(&x, &dy, dims, &mean, &inv64, &mut want_sdy, &mut want_sdxh);
        let mut want_dx = vec![0.0; dims.len()];
        reference::backward_eval_dx(&dy, &mut want_dx, dims, &inv64, &gamma);
        let scale_dy = abs_sums(dims, |i| dy[i] as f64);
        let scale_dxh = abs_sums(dims, |i| {
            let c = (i / dims.inner) % dims.channels;
            dy[i] as f64 * (x[i] as f64 - mean[c] as f64) * inv64[c]
        });
        let dx_scale: Vec<f64> = want_dx.iter().map(|&v| v.abs() as f64).collect();
        for &b in &backends {
            let (mut sdy, mut sdxh) = (vec![f64::NAN; c], vec![f64::NAN; c]);
            let mut dx = vec![f32::NAN; dims.len()];
            kernels::backward_eval::<Dynamic>(
                b, &x, &dy, &mut dx, dims, &mean, &inv_std, &gamma, &mut sdy, &mut sdxh,
            );
            tolerance_check("sum_dy", dims, b, &sdy, &want_sdy, &scale_dy, 1e-6);
            tolerance_check("sum_dy_xhat", dims, b, &sdxh, &want_sdxh, &scale_dxh, 1e-6);
            tolerance_check("dx", dims, b, &to_f64(&dx), &to_f64(&want_dx), &dx_scale, 3e-7);
        }
    }
}

#[test]
fn large_offset_stays_accurate() {
    // x = 1000 + 0.5 N(0, 1): normalized outputs within 2e-3 of the f64 reference, variance
    // within 1e-3 relative, on every backend and both families.
    let shapes = [
        Canonical { outer: 16, channels: 3, inner: 3136 },
        Canonical { outer: 8, channels: 5, inner: 49 },
        Canonical { outer: 20_000, channels: 7, inner: 1 },
        Canonical { outer: 256, channels: 64, inner: 1 },
    ];
    for (k, dims) in shapes.into_iter().enumerate() {
        let mut rng = Rng::new(4000 + k as u64);
        let x: Vec<f32> = (0..dims.len()).map(|_| (1000.0 + 0.5 * rng.normal()) as f32).collect();
        let c = dims.channels;
        let (gamma, beta) = (vec![1.0f32; c], vec![0.0f32; c]);
        let want = expected_train(&x, dims, &gamma, &beta, 1e-5);
        for b in Backend::available() {
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            let mut y = vec![0.0; dims.len()];
            kernels::forward_train::<Dynamic>(b, &x, &mut y, dims, &gamma, &beta, 1e-5, &mut mean, &mut var);
            for (ch, (&v, &w)) in var.iter().zip(&want.var).enumerate() {
                let rel = (v - w).abs() / w;
                assert!(rel <= 1e-3, "{b} {dims:?}: variance of channel {ch} off by {rel:e} relative");
            }
            let worst = y.iter().zip(&want.y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 2e-3, "{b} {dims:?}: normalized output off by {worst}");
        }
    }
}

#[test]
fn far_pilot_stays_accurate() {
    // Rows statistics shift each block by a pilot (the mean of its first rows, or of the blocks
    // before it): here the first 8 rows of every channel sit at 4096 over values within 1 of 0,
    // far from the mean, which takes the second pass around the block's mean.
    let dims = Canonical { outer: 4096, channels: 32, inner: 1 };
    let mut rng = Rng::new(77);
    let x: Vec<f32> =
        (0..dims.len()).map(|i| if i < 8 * 32 { 4096.0 } else { (rng.normal() * 0.3) as f32 }).collect();
    let c = dims.channels;
    let (gamma, beta) = (vec![1.0f32; c], vec![0.0f32; c]);
    let want = expected_train(&x, dims, &gamma, &beta, 1e-5);
    for b in Backend::available() {
        let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
        let mut y = vec![0.0; dims.len()];
        kernels::forward_train::<Dynamic>(b, &x, &mut y, dims, &gamma, &beta, 1e-5, &mut mean, &mut var);
        for (ch, (&v, &w)) in var.iter().zip(&want.var).enumerate() {
            let rel = (v - w).abs() / w;
            // About 2e-7 here; 1e-5 without the second pass.
            assert!(rel <= 2e-6, "{b}: variance of channel {ch} off by {rel:e} relative");
        }
    }
}

fn assert_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        panic!("{what}: differ at {i}: {} vs {}", a[i], b[i]);
    }
}

fn assert_bits64(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        panic!("{what}: differ at {i}: {} vs {}", a[i], b[i]);
    }
}

/// Everything every entry point outputs for one input.
#[derive(PartialEq)]
struct Outputs {
    f32s: Vec<Vec<f32>>,
    f64s: Vec<Vec<f64>>,
}

fn run_all<S: Spec>(b: Backend, dims: Canonical, seed: u64) -> Outputs {
    run_all_at::<S>(b, dims, seed, 0)
}

/// [`run_all`] with every output written `offset` values into its buffer (another alignment).
fn run_all_at<S: Spec>(b: Backend, dims: Canonical, seed: u64, offset: usize) -> Outputs {
    let n = dims.len();
    let mut buffers = vec![vec![0.0f32; n + offset]; 4];
    let [y, dx, ye, dx2] = &mut buffers[..] else { unreachable!() };
    let (y, dx, ye, dx2) = (&mut y[offset..], &mut dx[offset..], &mut ye[offset..], &mut dx2[offset..]);
    let mut rng = Rng::new(seed);
    let c = dims.channels;
    let x = rng.vec(dims.len(), 2.0, 6.0);
    let dy = rng.vec(dims.len(), -1.0, 1.0);
    let gamma = rng.vec(c, 0.5, 2.0);
    let beta = rng.vec(c, -1.0, 1.0);
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    kernels::forward_train::<S>(b, &x, y, dims, &gamma, &beta, 1e-5, &mut mean, &mut var);
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    let (mut sdy, mut sdxh) = (vec![0.0; c], vec![0.0; c]);
    kernels::backward::<S>(b, &x, &dy, dx, dims, &mean, &inv_std, &gamma, &mut sdy, &mut sdxh);
    let (m32, s32): (Vec<f32>, Vec<f32>) =
        mean.iter().zip(&inv_std).map(|(&m, &s)| (m as f32, s as f32)).unzip();
    kernels::normalize::<S>(b, &x, ye, dims, &m32, &s32, &beta);
    let mut xy = x.clone();
    kernels::normalize_inplace::<S>(b, &mut xy, dims, &m32, &s32, &beta);
    let (mut sdy2, mut sdxh2) = (vec![0.0; c], vec![0.0; c]);
    kernels::backward_eval::<S>(b, &x, &dy, dx2, dims, &m32, &s32, &gamma, &mut sdy2, &mut sdxh2);
    let (mut dydx, mut sdy3, mut sdxh3) = (dy.clone(), vec![0.0; c], vec![0.0; c]);
    kernels::backward_in_place::<S>(b, &x, &mut dydx, dims, &mean, &inv_std, &gamma, &mut sdy3, &mut sdxh3);
    let f32s = vec![y.to_vec(), dx.to_vec(), ye.to_vec(), xy, dx2.to_vec(), dydx];
    Outputs { f32s, f64s: vec![mean, var, sdy, sdxh, sdy2, sdxh2, sdy3, sdxh3] }
}

fn assert_same(a: &Outputs, b: &Outputs, what: &str) {
    for (k, (u, v)) in a.f32s.iter().zip(&b.f32s).enumerate() {
        assert_bits(u, v, &format!("{what}: f32 output {k}"));
    }
    for (k, (u, v)) in a.f64s.iter().zip(&b.f64s).enumerate() {
        assert_bits64(u, v, &format!("{what}: f64 output {k}"));
    }
}

/// Large enough to run in parallel and to take the fused and the split schedules of planes,
/// several row chunks, a virtual-row tail and a column tail.
const PARALLEL_SHAPES: [Canonical; 7] = [
    Canonical { outer: 8, channels: 24, inner: 784 },
    Canonical { outer: 8, channels: 3, inner: 4096 },
    Canonical { outer: 16, channels: 12, inner: 512 },
    Canonical { outer: 3, channels: 2, inner: 70_000 },
    Canonical { outer: 12_001, channels: 7, inner: 1 },
    Canonical { outer: 200, channels: 700, inner: 1 },
    Canonical { outer: 1500, channels: 64, inner: 1 },
];

#[test]
fn bit_identical_across_thread_counts() {
    let shapes = PARALLEL_SHAPES.into_iter().chain(short_run_shapes());
    for b in Backend::available().into_iter().filter(|&b| b != Backend::Scalar) {
        for (k, dims) in shapes.clone().enumerate() {
            let mut first: Option<Outputs> = None;
            for threads in [1, 2, 3, 4, 7] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let out = pool.install(|| run_all::<Dynamic>(b, dims, 5000 + k as u64));
                match &first {
                    None => first = Some(out),
                    Some(f) => assert_same(f, &out, &format!("{b} {dims:?}: {threads} threads vs 1")),
                }
            }
        }
    }
}

/// `backward_in_place` leaves in the gradient's buffer the bits `backward` writes to a separate
/// `dx`, with the same sums, on every backend (the scalar one included), on every tail of both
/// families and on shapes that take every schedule in parallel.
#[test]
fn backward_in_place_is_backward_bit_for_bit() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let shapes: Vec<Canonical> = shapes().into_iter().chain(PARALLEL_SHAPES).collect();
    for b in Backend::available() {
        for (k, &dims) in shapes.iter().enumerate() {
            let mut rng = Rng::new(7000 + k as u64);
            let c = dims.channels;
            let x = rng.vec(dims.len(), -3.0, 5.0);
            let dy = rng.vec(dims.len(), -1.0, 1.0);
            let gamma = rng.vec(c, 0.5, 2.0);
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            reference::batch_stats(&x, dims, &mut mean, &mut var);
            let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let (mut dx, mut sdy, mut sdxh) =
                (vec![f32::NAN; dims.len()], vec![f64::NAN; c], vec![f64::NAN; c]);
            let (mut dydx, mut sdy2, mut sdxh2) = (dy.clone(), vec![f64::NAN; c], vec![f64::NAN; c]);
            pool.install(|| {
                kernels::backward::<Dynamic>(
                    b, &x, &dy, &mut dx, dims, &mean, &inv_std, &gamma, &mut sdy, &mut sdxh,
                );
                kernels::backward_in_place::<Dynamic>(
                    b, &x, &mut dydx, dims, &mean, &inv_std, &gamma, &mut sdy2, &mut sdxh2,
                );
            });
            let what = format!("{b} {dims:?}");
            assert_bits(&dx, &dydx, &format!("{what}: dx"));
            assert_bits64(&sdy, &sdy2, &format!("{what}: sum_dy"));
            assert_bits64(&sdxh, &sdxh2, &format!("{what}: sum_dy_xhat"));
        }
    }
}

/// A spec with compile-time extents, as a `#[batch_norm]` layer passes them.
struct Nchw16x49;
impl Spec for Nchw16x49 {
    const CHANNELS: usize = 16;
    const INNER: usize = 49;
}
struct Nc7;
impl Spec for Nc7 {
    const CHANNELS: usize = 7;
    const INNER: usize = 1;
}

#[test]
fn specialized_spec_gives_the_same_bits() {
    for b in Backend::available() {
        let dims = Canonical { outer: 3, channels: 16, inner: 49 };
        assert_same(
            &run_all::<Dynamic>(b, dims, 7),
            &run_all::<Nchw16x49>(b, dims, 7),
            &format!("{b} {dims:?}"),
        );
        let dims = Canonical { outer: 37, channels: 7, inner: 1 };
        assert_same(&run_all::<Dynamic>(b, dims, 8), &run_all::<Nc7>(b, dims, 8), &format!("{b} {dims:?}"));
    }
}

/// Every entry point with streaming stores forced on, into outputs at every alignment, gives the
/// bits it gives with them off (only the kind of store differs).
#[test]
fn streaming_stores_give_the_same_bits() {
    let shapes = [
        Canonical { outer: 3, channels: 5, inner: 1000 },
        Canonical { outer: 2, channels: 3, inner: 20_000 },
        Canonical { outer: 700, channels: 48, inner: 1 },
        Canonical { outer: 301, channels: 7, inner: 1 },
        Canonical { outer: 20, channels: 1100, inner: 1 },
    ];
    for b in Backend::available().into_iter().filter(|&b| b != Backend::Scalar) {
        for (k, dims) in shapes.into_iter().enumerate() {
            let run = |stream: bool, offset: usize| {
                kernels::__force_streaming(Some(stream));
                let out = run_all_at::<Dynamic>(b, dims, 9000 + k as u64, offset);
                kernels::__force_streaming(None);
                out
            };
            let plain = run(false, 0);
            for offset in [0, 1, 3, 7] {
                assert_same(
                    &plain,
                    &run(true, offset),
                    &format!("{b} {dims:?}: streaming, output offset {offset}"),
                );
            }
        }
    }
}

#[test]
fn non_finite_input_gives_non_finite_statistics() {
    for b in Backend::available() {
        for dims in
            [Canonical { outer: 4, channels: 3, inner: 20 }, Canonical { outer: 40, channels: 3, inner: 1 }]
        {
            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = vec![1.0f32; dims.len()];
                // A value of channel 1 (the first run of channel 1 starts at `inner`).
                x[dims.inner + 3 % dims.inner] = bad;
                let c = dims.channels;
                let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
                let mut y = vec![0.0; dims.len()];
                kernels::forward_train::<Dynamic>(
                    b, &x, &mut y, dims, &[1.0; 3], &[0.0; 3], 1e-5, &mut mean, &mut var,
                );
                assert!(
                    !(mean[1].is_finite() && var[1].is_finite()),
                    "{b} {dims:?} {bad}: {} {}",
                    mean[1],
                    var[1]
                );
                assert!(mean[0].is_finite() && var[0].is_finite() && mean[2].is_finite());
            }
        }
    }
}
