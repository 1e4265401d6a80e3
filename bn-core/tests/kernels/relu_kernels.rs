//! The backward kernels behind a fused ReLU (`backward_relu`, `backward_eval_relu`), which
//! recompute the forward's mask as they read `dy`, against the two-step composition they replace
//! (`relu_grad`, then the plain `backward` / `backward_eval`): the same bits on every fast backend,
//! with and without a residual and its gradient, for both families and both training schedules,
//! tails, streaming stores forced on and off, and pools of 1 and 3 threads.
//!
//! Backends this machine lacks are skipped with a printed line.

use bn_core::kernels::{self, reference, Backend, FusedRelu};
use bn_core::spec::Dynamic;
use bn_core::Canonical;

use crate::common;
use common::{fast_backends, Rng};

/// Planes with the fused schedule (many small channels), the split one (few or large channels),
/// runs longer than a block; rows with whole virtual rows and a tail, a tail only, a period of
/// `C` itself, and enough values to stream.
fn shapes() -> Vec<Canonical> {
    [
        (3, 7, 5),
        (2, 5, 49),
        (4, 3, 3136),
        (2, 2, 20_000),
        (64, 17, 70),
        (50, 37, 49),
        (20, 9, 196),
        (3000, 2, 49),
        (8, 64, 300),
        (5, 7, 1),
        (100, 70, 1),
        (37, 1030, 1),
        (4096, 64, 1),
        (3001, 48, 1),
    ]
    .into_iter()
    .map(|(outer, channels, inner)| Canonical { outer, channels, inner })
    .collect()
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `dx`, the two sums and the masked gradient.
#[derive(Debug, PartialEq)]
struct Out {
    dx: Vec<u32>,
    sum_dy: Vec<u64>,
    sum_dy_xhat: Vec<u64>,
    g: Vec<u32>,
}

struct Case {
    dims: Canonical,
    x: Vec<f32>,
    dy: Vec<f32>,
    residual: Vec<f32>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    gamma: Vec<f32>,
    /// The training forward's transform (`train_coefficients`).
    train: [Vec<f32>; 3],
    /// The inference transform and statistics.
    eval: [Vec<f32>; 3],
    eval_inv_std: Vec<f32>,
}

impl Case {
    fn new(dims: Canonical, seed: u64) -> Case {
        let (n, c) = (dims.len(), dims.channels);
        let mut rng = Rng::new(seed);
        // Pre-activations straddle zero; a few values repeat the mean exactly.
        let x: Vec<f32> =
            (0..n).map(|i| if i % 97 == 0 { 3.0 } else { rng.normal() as f32 * 2.0 + 3.0 }).collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let residual: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.5).collect();
        let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
        reference::batch_stats(&x, dims, &mut mean, &mut var);
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let gamma: Vec<f32> = (0..c).map(|j| 0.5 + (j % 5) as f32 * 0.3).collect();
        let beta: Vec<f32> = (0..c).map(|j| (j % 3) as f32 * 0.4 - 0.4).collect();
        let mut train = [vec![0.0; c], vec![0.0; c], vec![0.0; c]];
        for j in 0..c {
            (train[0][j], train[1][j], train[2][j]) =
                kernels::train_coefficients(mean[j], inv_std[j], gamma[j], beta[j]);
        }
        let eval_mean: Vec<f32> = mean.iter().map(|&m| m as f32 + 0.25).collect();
        let eval_inv_std: Vec<f32> = inv_std.iter().map(|&s| s as f32 * 0.9).collect();
        let scale: Vec<f32> = (0..c).map(|j| (gamma[j] as f64 * eval_inv_std[j] as f64) as f32).collect();
        Case {
            dims,
            x,
            dy,
            residual,
            mean,
            inv_std,
            gamma,
            train,
            eval: [eval_mean, scale, beta],
            eval_inv_std,
        }
    }

    fn relu<'a>(&'a self, t: &'a [Vec<f32>; 3], residual: bool) -> FusedRelu<'a> {
        FusedRelu {
            mean: &t[0],
            scale: &t[1],
            shift: &t[2],
            residual: residual.then_some(&self.residual[..]),
        }
    }

    /// The fused kernel (`fused`) or the composition, training (`eval == false`) or frozen.
    fn run(&self, b: Backend, eval: bool, residual: bool, want_g: bool, fused: bool) -> Out {
        let (n, c, dims) = (self.dims.len(), self.dims.channels, self.dims);
        let (mut dx, mut g) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        let (mut s1, mut s2) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        let t = if eval { &self.eval } else { &self.train };
        let relu = self.relu(t, residual);
        let (x, dy) = (&self.x[..], &self.dy[..]);
        if fused {
            let dg = want_g.then_some(&mut g[..]);
            if eval {
                let (m, s) = (&self.eval[0], &self.eval_inv_std);
                kernels::backward_eval_relu::<Dynamic>(
                    b,
                    x,
                    dy,
                    relu,
                    dg,
                    &mut dx,
                    dims,
                    m,
                    s,
                    &self.gamma,
                    &mut s1,
                    &mut s2,
                );
            } else {
                let (m, s) = (&self.mean, &self.inv_std);
                kernels::backward_relu::<Dynamic>(
                    b,
                    x,
                    dy,
                    relu,
                    dg,
                    &mut dx,
                    dims,
                    m,
                    s,
                    &self.gamma,
                    &mut s1,
                    &mut s2,
                );
            }
        } else {
            let r = relu.residual;
            kernels::relu_grad::<Dynamic>(b, x, dy, r, &mut g, dims, relu.mean, relu.scale, relu.shift);
            if eval {
                let (m, s) = (&self.eval[0], &self.eval_inv_std);
                kernels::backward_eval::<Dynamic>(
                    b,
                    x,
                    &g,
                    &mut dx,
                    dims,
                    m,
                    s,
                    &self.gamma,
                    &mut s1,
                    &mut s2,
                );
            } else {
                let (m, s) = (&self.mean, &self.inv_std);
                kernels::backward::<Dynamic>(b, x, &g, &mut dx, dims, m, s, &self.gamma, &mut s1, &mut s2);
            }
        }
        let g = if want_g { bits32(&g) } else { Vec::new() };
        Out { dx: bits32(&dx), sum_dy: bits64(&s1), sum_dy_xhat: bits64(&s2), g }
    }
}

#[test]
fn fused_relu_backward_is_the_composition_bit_for_bit() {
    let pools = [1, 3].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
    for (k, dims) in shapes().into_iter().enumerate() {
        let case = Case::new(dims, 40 + k as u64);
        for b in fast_backends() {
            for eval in [false, true] {
                for residual in [false, true] {
                    let expected = case.run(b, eval, residual, true, false);
                    let masked = expected.g.iter().filter(|&&v| v == 0).count();
                    assert!(masked > 0 && masked < dims.len(), "{dims:?}: the mask must cut some values");
                    for (pool, stream) in pools.iter().zip([false, true]) {
                        kernels::__force_streaming(Some(stream));
                        let what = format!(
                            "{b} {dims:?} eval {eval} residual {residual}, {} threads, streaming {stream}",
                            pool.current_num_threads()
                        );
                        let got = pool.install(|| case.run(b, eval, residual, true, true));
                        assert_eq!(got, expected, "{what}");
                        let mut without_g = pool.install(|| case.run(b, eval, residual, false, true));
                        without_g.g = expected.g.clone();
                        assert_eq!(without_g, expected, "{what}, no dg");
                        kernels::__force_streaming(None);
                    }
                }
            }
        }
    }
}

#[test]
fn scalar_backend_runs_the_composition() {
    let case = Case::new(Canonical { outer: 6, channels: 5, inner: 9 }, 7);
    for eval in [false, true] {
        for residual in [false, true] {
            let expected = case.run(Backend::Scalar, eval, residual, true, false);
            assert_eq!(case.run(Backend::Scalar, eval, residual, true, true), expected);
        }
    }
}

#[test]
fn empty_tensor_gives_zero_sums() {
    let dims = Canonical { outer: 0, channels: 3, inner: 4 };
    let t = [vec![0.0f32; 3], vec![1.0; 3], vec![0.0; 3]];
    for b in Backend::available() {
        let relu = FusedRelu { mean: &t[0], scale: &t[1], shift: &t[2], residual: Some(&[]) };
        let (mut s1, mut s2) = (vec![f64::NAN; 3], vec![f64::NAN; 3]);
        let (m, s, g) = (&[0.0; 3], &[1.0; 3], &[1.0f32; 3]);
        kernels::backward_relu::<Dynamic>(
            b,
            &[],
            &[],
            relu,
            Some(&mut []),
            &mut [],
            dims,
            m,
            s,
            g,
            &mut s1,
            &mut s2,
        );
        assert_eq!((s1.clone(), s2.clone()), (vec![0.0; 3], vec![0.0; 3]), "{b}");
    }
}
