//! The kernels of synchronized statistics (`batch_stats`, `backward_sums`, `backward_dx`) on
//! every backend against the `f64` reference, bit-identical across thread counts, the same bits
//! as the fused `forward_train` / `backward` give, and empty tensors.
//!
//! Backends this machine lacks are skipped with a printed line.

use bn_core::kernels::{self, reference, Backend};
use bn_core::spec::Dynamic;
use bn_core::Canonical;

use crate::common;
use common::{fast_backends, Rng};

/// Both families, tails, several blocks and chunks, and enough values for the pool.
fn shapes() -> Vec<Canonical> {
    let mut out = Vec::new();
    for (outer, channels, inner) in [
        (3, 1, 7),
        (2, 5, 49),
        (4, 3, 3136),
        (2, 2, 20_000),
        (64, 17, 70),
        (50, 37, 49),
        (300, 9, 196),
        (1, 7, 1),
        (1000, 7, 1),
        (333, 3, 1),
        (70, 70, 1),
        (9, 1000, 1),
        (65, 16, 1),
        (4096, 64, 1),
    ] {
        out.push(Canonical { outer, channels, inner });
    }
    out
}

fn close(what: &str, got: &[f64], want: &[f64], scale: &[f64], tol: f64) {
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g - w).abs();
        assert!(err <= tol * s.max(1e-30) || err <= 1e-12, "{what}[{i}]: got {g}, want {w} (error {err:e})");
    }
}

fn bits<T: Into<f64> + Copy>(v: &[T]) -> Vec<u64> {
    v.iter().map(|&x| x.into().to_bits()).collect()
}

fn pools() -> [rayon::ThreadPool; 2] {
    [1, 4].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap())
}

#[test]
fn batch_stats_match_reference_and_forward_train() {
    let pools = pools();
    for (k, dims) in shapes().into_iter().enumerate() {
        let c = dims.channels;
        let x = Rng::new(k as u64 + 1).vec(dims.len(), 100.0, 104.0); // |mean| >> std
        let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
        reference::batch_stats(&x, dims, &mut mean, &mut var);
        let std: Vec<f64> = var.iter().map(|v| v.sqrt()).collect();
        for b in fast_backends() {
            let what = format!("{b} {dims:?}");
            let mut runs = Vec::new();
            for pool in &pools {
                let (mut m, mut v) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                pool.install(|| kernels::batch_stats::<Dynamic>(b, &x, dims, &mut m, &mut v));
                close(&format!("{what} mean"), &m, &mean, &std, 1e-5);
                close(&format!("{what} var"), &v, &var, &var, 1e-4);
                runs.push((bits(&m), bits(&v)));
                // The same bits as the statistics of the fused training forward.
                let (mut fm, mut fv) = (vec![0.0; c], vec![0.0; c]);
                let (gamma, beta, mut y) = (vec![1.0; c], vec![0.0; c], vec![0.0; dims.len()]);
                pool.install(|| {
                    kernels::forward_train::<Dynamic>(
                        b, &x, &mut y, dims, &gamma, &beta, 1e-5, &mut fm, &mut fv,
                    )
                });
                assert_eq!(
                    (bits(&fm), bits(&fv)),
                    runs[runs.len() - 1],
                    "{what}: forward_train's statistics"
                );
            }
            assert_eq!(runs[0], runs[1], "{what}: 1 vs 4 threads");
        }
    }
}

#[test]
fn backward_sums_and_dx_match_reference() {
    let pools = pools();
    for (k, dims) in shapes().into_iter().enumerate() {
        let c = dims.channels;
        let mut rng = Rng::new(100 + k as u64);
        let x = rng.vec(dims.len(), -2.0, 3.0);
        let dy = rng.vec(dims.len(), -1.0, 1.0);
        let gamma = rng.vec(c, 0.5, 2.0);
        let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
        reference::batch_stats(&x, dims, &mut mean, &mut var);
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let (mut sdy, mut sdxh) = (vec![0.0; c], vec![0.0; c]);
        reference::backward_sums(&x, &dy, dims, &mean, &inv_std, &mut sdy, &mut sdxh);
        // dx of a shard of a batch three times as large, with other sums.
        let n = 3.0 * dims.per_channel() as f64;
        let (gdy, gdxh): (Vec<f64>, Vec<f64>) =
            sdy.iter().zip(&sdxh).map(|(a, b)| (2.0 * a + 1.0, b - 0.5)).unzip();
        let mut want = vec![0.0f32; dims.len()];
        reference::backward_train_dx_with_count(
            &x, &dy, &mut want, dims, n, &mean, &inv_std, &gamma, &gdy, &gdxh,
        );
        let scale: Vec<f64> = (0..c).map(|_| (dims.per_channel() as f64).sqrt()).collect();
        let dx_scale: Vec<f64> = want.iter().map(|&v| 1.0 + v.abs() as f64).collect();
        for b in fast_backends() {
            let what = format!("{b} {dims:?}");
            let mut runs = Vec::new();
            for pool in &pools {
                let (mut s1, mut s2) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                pool.install(|| {
                    kernels::backward_sums::<Dynamic>(b, &x, &dy, dims, &mean, &inv_std, &mut s1, &mut s2)
                });
                close(&format!("{what} sum_dy"), &s1, &sdy, &scale, 1e-5);
                close(&format!("{what} sum_dy_xhat"), &s2, &sdxh, &scale, 1e-5);
                let mut dx = vec![f32::NAN; dims.len()];
                pool.install(|| {
                    kernels::backward_dx::<Dynamic>(
                        b, &x, &dy, &mut dx, dims, n, &mean, &inv_std, &gamma, &gdy, &gdxh,
                    )
                });
                let dx64: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
                let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
                close(&format!("{what} dx"), &dx64, &want64, &dx_scale, 1e-5);
                // With the local count and sums: the fused backward's bits.
                let (mut f1, mut f2, mut fdx) = (vec![0.0; c], vec![0.0; c], vec![0.0f32; dims.len()]);
                pool.install(|| {
                    kernels::backward::<Dynamic>(
                        b, &x, &dy, &mut fdx, dims, &mean, &inv_std, &gamma, &mut f1, &mut f2,
                    )
                });
                assert_eq!((bits(&f1), bits(&f2)), (bits(&s1), bits(&s2)), "{what}: backward's sums");
                let mut ldx = vec![0.0f32; dims.len()];
                let local_n = dims.per_channel() as f64;
                pool.install(|| {
                    kernels::backward_dx::<Dynamic>(
                        b, &x, &dy, &mut ldx, dims, local_n, &mean, &inv_std, &gamma, &s1, &s2,
                    )
                });
                assert_eq!(bits(&ldx), bits(&fdx), "{what}: backward's dx");
                runs.push((bits(&s1), bits(&s2), bits(&dx)));
            }
            assert_eq!(runs[0], runs[1], "{what}: 1 vs 4 threads");
        }
    }
}

#[test]
fn empty_tensors() {
    for b in Backend::available() {
        for dims in
            [Canonical { outer: 0, channels: 3, inner: 4 }, Canonical { outer: 0, channels: 5, inner: 1 }]
        {
            let c = dims.channels;
            let (mut m, mut v) = (vec![0.0; c], vec![0.0; c]);
            kernels::batch_stats::<Dynamic>(b, &[], dims, &mut m, &mut v);
            assert!(m.iter().chain(&v).all(|s| s.is_nan()), "{b} {dims:?}: no values give NaN");
            let (mut s1, mut s2) = (vec![1.0; c], vec![1.0; c]);
            let p = vec![1.0; c];
            kernels::backward_sums::<Dynamic>(b, &[], &[], dims, &p, &p, &mut s1, &mut s2);
            assert!(s1.iter().chain(&s2).all(|&s| s == 0.0), "{b} {dims:?}: sums of nothing are 0");
            kernels::backward_dx::<Dynamic>(b, &[], &[], &mut [], dims, 4.0, &p, &p, &[1.0; 5][..c], &p, &p);
        }
    }
}
