//! `BatchNorm<bf16>` and `BatchNorm<f16>` on every backend against the `f64` reference (the
//! same widened data in a `BatchNorm<f64>`), within the format's precision; bit-identical results
//! across thread counts; in-place inference bit-identical to out-of-place.
//!
//! Backends this machine lacks are skipped with a printed line.

use bn_core::half::{bf16, f16};
use bn_core::kernels::Backend;
use bn_core::{BatchNorm, Config, Element, Layout};

use crate::common;
use common::{backends, Rng};

/// `(outer, C, inner)` shapes of both families with odd tails, and the three block kinds of the
/// 16-bit drivers (whole rows, channel ranges of a row, pieces of a long run); rows of 32 and 64
/// channels take the paired-vector normalize and `dx` paths, 96 the vector-by-vector ones.
const SHAPES: [(usize, usize, usize); 13] = [
    (40, 64, 1),
    (50, 32, 1),
    (33, 96, 1),
    (3, 7, 49),
    (2, 1, 70),
    (5, 70, 1),
    (64, 7, 1),
    (2, 3, 5000),
    (2, 9000, 1),
    (3, 100, 100),
    (1, 1, 2),
    (9, 17, 15),
    (300, 1, 1),
];

/// The relative precision the tests allow: a few units in the last place of the format.
trait Precision: Element<Param = f32> {
    const TOL: f64;
}
impl Precision for bf16 {
    const TOL: f64 = 1.0 / 128.0;
}
impl Precision for f16 {
    const TOL: f64 = 1.0 / 1024.0;
}

fn layout(outer: usize, c: usize, inner: usize) -> (Layout, Vec<usize>) {
    (Layout::new(3, 1, &[c]).unwrap(), vec![outer, c, inner])
}

fn close(got: f64, want: f64, tol: f64, scale: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (want.abs() + scale),
        "{what}: got {got}, want {want} (tolerance {tol} x (|want| + {scale}))"
    );
}

/// Everything a layer computes on one batch.
#[derive(Debug, PartialEq)]
struct Outputs {
    y: Vec<f64>,
    y_eval: Vec<f64>,
    dx: Vec<f64>,
    dx_eval: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    gamma_grad: Vec<f64>,
    beta_grad: Vec<f64>,
    gamma_grad_eval: Vec<f64>,
    beta_grad_eval: Vec<f64>,
}

/// Runs training forward, backward, inference (out of place and in place) and backward_eval.
fn run<E: Element>(
    bn: &mut BatchNorm<E>,
    x: &[E],
    dy: &[E],
    shape: &[usize],
    gamma: &[E::Param],
    beta: &[E::Param],
) -> Outputs {
    let w = |v: &[E]| v.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    let p = |v: &[E::Param]| v.iter().map(|e| bn_core::Param::to_f64(*e)).collect::<Vec<f64>>();
    bn.update_params(gamma, beta).unwrap();
    let mut y = vec![E::default(); x.len()];
    bn.forward_train(x, shape, &mut y).unwrap();
    let mut dx = vec![E::default(); x.len()];
    bn.backward(x, dy, shape, &mut dx).unwrap();
    let (gamma_grad, beta_grad) = (p(bn.gamma_grad()), p(bn.beta_grad()));
    let mut y_eval = vec![E::default(); x.len()];
    bn.forward_eval(x, shape, &mut y_eval).unwrap();
    let mut inplace = x.to_vec();
    bn.forward_eval_inplace(&mut inplace, shape).unwrap();
    assert_eq!(w(&inplace), w(&y_eval), "forward_eval_inplace differs from forward_eval");
    let mut dx_eval = vec![E::default(); x.len()];
    bn.backward_eval(x, dy, shape, &mut dx_eval).unwrap();
    Outputs {
        y: w(&y),
        y_eval: w(&y_eval),
        dx: w(&dx),
        dx_eval: w(&dx_eval),
        running_mean: p(bn.running_mean()),
        running_var: p(bn.running_var()),
        gamma_grad,
        beta_grad,
        gamma_grad_eval: p(bn.gamma_grad()),
        beta_grad_eval: p(bn.beta_grad()),
    }
}

/// Data of `E` (offset mean, so that the statistics are not trivial), its widened `f64` copy,
/// and parameters.
#[allow(clippy::type_complexity)]
fn data<E: Element<Param = f32>>(n: usize, c: usize, seed: u64) -> (Vec<E>, Vec<E>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let x = (0..n).map(|_| E::from_f64(3.0 + rng.uniform_f64(-2.0, 2.0))).collect();
    let dy = (0..n).map(|_| E::from_f64(rng.uniform_f64(-1.0, 1.0))).collect();
    let gamma = (0..c).map(|_| rng.uniform_f64(0.5, 1.5) as f32).collect();
    let beta = (0..c).map(|_| rng.uniform_f64(-0.5, 0.5) as f32).collect();
    (x, dy, gamma, beta)
}

fn check_format<E: Precision>() {
    for backend in backends() {
        for (i, &(outer, c, inner)) in SHAPES.iter().enumerate() {
            let (layout, shape) = layout(outer, c, inner);
            let n = outer * c * inner;
            let (x, dy, gamma, beta) = data::<E>(n, c, 17 + i as u64);
            let mut bn = BatchNorm::<E>::with_layout(layout.clone(), Config::new()).unwrap();
            bn.set_backend(Some(backend)).unwrap();
            let got = run(&mut bn, &x, &dy, &shape, &gamma, &beta);

            // The reference: the same (exactly widened) data in an f64 layer.
            let x64: Vec<f64> = x.iter().map(|e| e.to_f64()).collect();
            let dy64: Vec<f64> = dy.iter().map(|e| e.to_f64()).collect();
            let g64: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
            let b64: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
            let mut reference = BatchNorm::<f64>::with_layout(layout, Config::new()).unwrap();
            let want = run(&mut reference, &x64, &dy64, &shape, &g64, &b64);

            let what = |s: &str| format!("{} {backend} {:?}: {s}", E::NAME, (outer, c, inner));
            let tol = E::TOL;
            for (k, (&g, &w)) in got.y.iter().zip(&want.y).enumerate() {
                close(g, w, tol, 1e-2, &what(&format!("y[{k}]")));
            }
            for (k, (&g, &w)) in got.y_eval.iter().zip(&want.y_eval).enumerate() {
                close(g, w, tol, 1e-2, &what(&format!("y_eval[{k}]")));
            }
            // dx cancels (exactly 0 for two values per channel): errors scale with dy, not dx.
            let dx_scale = 1e-2;
            for (k, (&g, &w)) in got.dx.iter().zip(&want.dx).enumerate() {
                close(g, w, tol, dx_scale, &what(&format!("dx[{k}]")));
            }
            for (k, (&g, &w)) in got.dx_eval.iter().zip(&want.dx_eval).enumerate() {
                close(g, w, tol, 1e-2, &what(&format!("dx_eval[{k}]")));
            }
            // Statistics and gradients are f32 sums of the same data: far tighter than the format.
            let per = (n / c) as f64;
            for k in 0..c {
                close(got.running_mean[k], want.running_mean[k], 1e-5, 1e-3, &what("running_mean"));
                close(got.running_var[k], want.running_var[k], 1e-4, 1e-3, &what("running_var"));
                close(got.beta_grad[k], want.beta_grad[k], 1e-4, per * 1e-3, &what("beta_grad"));
                close(got.gamma_grad[k], want.gamma_grad[k], 1e-4, per * 1e-3, &what("gamma_grad"));
                close(
                    got.beta_grad_eval[k],
                    want.beta_grad_eval[k],
                    1e-4,
                    per * 1e-3,
                    &what("beta_grad_eval"),
                );
                close(
                    got.gamma_grad_eval[k],
                    want.gamma_grad_eval[k],
                    1e-4,
                    per * 1e-3,
                    &what("gamma_grad_eval"),
                );
            }
        }
    }
}

#[test]
fn bf16_layers_match_the_f64_reference_on_every_backend() {
    check_format::<bf16>();
}

#[test]
fn f16_layers_match_the_f64_reference_on_every_backend() {
    check_format::<f16>();
}

/// The 16-bit path rounds the `f32` path's results: on the same (widened) data, `y` is within
/// half a unit of the format of the `f32` layer's `y`, give or take the `f32` rounding.
#[test]
fn bf16_inference_rounds_the_f32_path() {
    let (layout, shape) = layout(4, 70, 49);
    let n = 4 * 70 * 49;
    let (x, _, gamma, beta) = data::<bf16>(n, 70, 5);
    let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    for backend in backends() {
        let mut a = BatchNorm::<bf16>::with_layout(layout.clone(), Config::new()).unwrap();
        let mut b = BatchNorm::<f32>::with_layout(layout.clone(), Config::new()).unwrap();
        a.set_backend(Some(backend)).unwrap();
        b.set_backend(Some(backend)).unwrap();
        a.update_params(&gamma, &beta).unwrap();
        b.update_params(&gamma, &beta).unwrap();
        let mut y16 = vec![bf16::ZERO; n];
        let mut y32 = vec![0.0f32; n];
        a.forward_eval(&x, &shape, &mut y16).unwrap();
        b.forward_eval(&x32, &shape, &mut y32).unwrap();
        let mut exact = 0;
        for (k, (&h, &f)) in y16.iter().zip(&y32).enumerate() {
            let rounded = bf16::from_f32(f);
            let h = h.to_f32();
            // Within one bf16 step of the rounded f32 result (backends differ in f32 rounding).
            let step = (rounded.to_f32().abs() / 128.0).max(1e-30);
            assert!((h - rounded.to_f32()).abs() <= step, "{backend} y[{k}]: {h} vs {f}");
            exact += usize::from(h == rounded.to_f32());
        }
        assert!(exact * 100 >= n * 99, "{backend}: only {exact} of {n} values equal the rounded f32 result");
    }
}

/// Large enough that every pass runs in parallel (at least 128 Ki values streamed).
const PARALLEL_SHAPES: [(usize, usize, usize); 3] = [(8, 32, 1000), (40_000, 7, 1), (2, 3, 50_000)];

fn outputs_with_threads<E: Precision>(
    backend: Backend,
    threads: usize,
    shape: (usize, usize, usize),
) -> Outputs {
    let (outer, c, inner) = shape;
    let (layout, shape) = layout(outer, c, inner);
    let (x, dy, gamma, beta) = data::<E>(outer * c * inner, c, 99);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut bn = BatchNorm::<E>::with_layout(layout, Config::new()).unwrap();
        bn.set_backend(Some(backend)).unwrap();
        run(&mut bn, &x, &dy, &shape, &gamma, &beta)
    })
}

#[test]
fn bit_identical_across_thread_counts() {
    for backend in backends().into_iter().filter(|&b| b != Backend::Scalar) {
        for shape in PARALLEL_SHAPES {
            let one = outputs_with_threads::<bf16>(backend, 1, shape);
            for threads in [2, 3] {
                let many = outputs_with_threads::<bf16>(backend, threads, shape);
                assert!(one == many, "bf16 {backend} {shape:?}: {threads} threads differ from 1");
            }
            let one = outputs_with_threads::<f16>(backend, 1, shape);
            let three = outputs_with_threads::<f16>(backend, 3, shape);
            assert!(one == three, "f16 {backend} {shape:?}: 3 threads differ from 1");
        }
    }
}

/// Training forward, backward and inference outputs (bits) with `y` and `dx` written `offset`
/// values into their buffers (misaligned for every odd offset).
fn outputs_at<E: Element>(
    bn: &mut BatchNorm<E>,
    x: &[E],
    dy: &[E],
    shape: &[usize],
    offset: usize,
) -> [Vec<f64>; 3] {
    let n = x.len();
    let w = |v: &[E]| v.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    let mut buf = vec![E::default(); n + offset];
    bn.forward_train(x, shape, &mut buf[offset..]).unwrap();
    let y = w(&buf[offset..]);
    bn.backward(x, dy, shape, &mut buf[offset..]).unwrap();
    let dx = w(&buf[offset..]);
    bn.forward_eval(x, shape, &mut buf[offset..]).unwrap();
    [y, dx, w(&buf[offset..])]
}

/// Outputs written with non-temporal stores (forced on, at output offsets 0, 1, 3, 7) hold the
/// bits of regular stores: the planes kernels' streamed pairs, whole vectors, partial vectors
/// at 16-byte, 4-byte and odd 2-byte positions, in the channel-by-channel, block and unfused
/// schedules.
#[test]
fn streamed_16_bit_outputs_give_the_same_bits() {
    fn check<E: Precision>() {
        // Channel by channel (train and backward), long runs cut into pieces, too few channels
        // to go channel by channel, short runs, rows (not streamed: the same either way).
        let shapes = [(3, 5, 1000), (2, 3, 20_000), (4, 2, 1000), (4, 6, 37), (300, 40, 1)];
        for backend in backends().into_iter().filter(|&b| b != Backend::Scalar) {
            for (i, &(outer, c, inner)) in shapes.iter().enumerate() {
                let (layout, shape) = layout(outer, c, inner);
                let (x, dy, gamma, beta) = data::<E>(outer * c * inner, c, 300 + i as u64);
                let outputs = |stream: bool, offset: usize| {
                    bn_core::kernels::__force_streaming(Some(stream));
                    let mut bn = BatchNorm::<E>::with_layout(layout.clone(), Config::new()).unwrap();
                    bn.set_backend(Some(backend)).unwrap();
                    bn.update_params(&gamma, &beta).unwrap();
                    let out = outputs_at(&mut bn, &x, &dy, &shape, offset);
                    bn_core::kernels::__force_streaming(None);
                    out
                };
                let plain = outputs(false, 0);
                for offset in [0, 1, 3, 7] {
                    let streamed = outputs(true, offset);
                    for (k, what) in ["y", "dx", "y_eval"].iter().enumerate() {
                        let same = plain[k].iter().zip(&streamed[k]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{} {backend} {:?}: {what} streamed at offset {offset}",
                            E::NAME,
                            (outer, c, inner)
                        );
                    }
                }
            }
        }
    }
    check::<bf16>();
    check::<f16>();
}
