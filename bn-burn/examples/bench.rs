//! burn-nn's `BatchNorm` and bn-burn's side by side, in one process, on the standard shapes and
//! the batch-norm shapes of ResNet-50 (f32, NdArray + Autodiff, NCHW / NC / NCL):
//!
//! - `train`: the training forward (`forward(x)` on the autodiff device, x, gamma and beta not
//!   tracked);
//! - `eval`: the inference forward (`valid()` module, plain NdArray device);
//! - `step`: a training step, the forward and `backward()` of `(y * r).sum()` for a fixed
//!   random `r`, with x, gamma and beta tracked;
//! - `floor`: the same step on `y = x` (what burn spends around any op: the loss, its backward,
//!   the gradient buffers), so that `step - floor` is what batch norm adds;
//! - `kernels`: the kernels alone on slices (`batchnorm::ops` forward_train + backward, buffers
//!   allocated once), which `step - floor` is compared with;
//! - `copy op`: the step through a custom op that only copies (`y = x` into a fresh buffer, as
//!   the batch norm writes `y`; its backward hands the output gradient back as `dx`): what burn
//!   charges for any op of that shape with a fresh output, its graph node and the gradient's
//!   way through it.
//!
//! Times are medians.
//!
//! ```text
//! cargo run --release -p bn-burn --example bench -- [--quick] [--threads N] [--shapes S2,R1,...]
//! ```
#![allow(deprecated)] // burn 0.22 deprecates NdArray; it is the backend we accelerate.

use std::time::{Duration, Instant};

use batchnorm::ops::BatchNormOps;
use batchnorm::{Config, Layout, Preset};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

/// The copy op: a backend extension with an Autodiff node, built the way bn-burn's batch norm
/// is, whose forward and backward only copy.
mod copy_op {
    use batchnorm::ops::output_buffer;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::autodiff::Autodiff;
    use burn::backend::backend_extension;
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Dispatch, NdArray};
    use burn::tensor::Tensor;
    use ndarray::{ArcArray, IxDyn};

    /// `y = x` into a fresh buffer (the backward passes the gradient through).
    #[backend_extension(NdArray, Autodiff)]
    pub trait CopyBackend: burn::backend::Backend {
        fn copy_op(x: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    impl CopyBackend for NdArray {
        fn copy_op(x: NdArrayTensor) -> NdArrayTensor {
            let NdArrayTensor::F32(storage) = &x else { panic!("the copy op takes f32") };
            let view = storage.view();
            let values = view.as_slice().expect("a contiguous tensor");
            let mut y = output_buffer::<f32>(values.len());
            y.copy_from_slice(values);
            NdArrayTensor::from(ArcArray::from_shape_vec(IxDyn(view.shape()), y).expect("same shape"))
        }
    }

    #[derive(Debug)]
    struct CopyNode;

    impl<B: CopyBackend> Backward<B, 1> for CopyNode {
        type State = ();

        fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [parent] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }

    impl<B: CopyBackend, C: CheckpointStrategy> CopyBackend for Autodiff<B, C> {
        fn copy_op(x: FloatTensor<Self>) -> FloatTensor<Self> {
            CopyNode.prepare::<C>([x.node()]).compute_bound().stateless(B::copy_op(x.into_primitive()))
        }
    }

    pub fn copy<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        Tensor::from_dispatch(Dispatch::copy_op(x.into_dispatch()))
    }
}

const SHAPES: &[(&str, &[usize])] = &[
    ("S1", &[256, 1024]),
    ("S2", &[32, 64, 56, 56]),
    ("S4", &[32, 2048, 7, 7]),
    ("S5", &[64, 128, 1000]),
    ("S6", &[1, 64, 8, 8]),
    ("R1", &[50, 64, 112, 112]),
    ("R2", &[50, 256, 56, 56]),
    ("R3", &[50, 64, 56, 56]),
    ("R4", &[50, 512, 28, 28]),
    ("R5", &[50, 128, 28, 28]),
    ("R6", &[50, 1024, 14, 14]),
    ("R7", &[50, 256, 14, 14]),
    ("R8", &[50, 2048, 7, 7]),
    ("R9", &[50, 512, 7, 7]),
];

struct Options {
    min_reps: usize,
    max_reps: usize,
    budget: Duration,
    shapes: Option<Vec<String>>,
    threads: Option<usize>,
}

impl Options {
    fn from_args() -> Result<Options, String> {
        let mut options = Options {
            min_reps: 5,
            max_reps: 50,
            budget: Duration::from_secs(2),
            shapes: None,
            threads: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    options.min_reps = 3;
                    options.max_reps = 20;
                    options.budget = Duration::from_millis(300);
                }
                "--threads" => {
                    let n = args.next().ok_or("--threads takes a number")?;
                    options.threads = Some(n.parse().map_err(|_| format!("--threads {n:?}: not a number"))?);
                }
                "--shapes" => {
                    let list = args.next().ok_or("--shapes takes a list such as S2,R1")?;
                    options.shapes = Some(list.split(',').map(|s| s.trim().to_uppercase()).collect());
                }
                other => {
                    return Err(format!(
                        "unknown argument {other:?} (expected --quick, --threads N, --shapes S2,R1,...)"
                    ))
                }
            }
        }
        Ok(options)
    }

    /// The median time of `f`, after one warm-up call.
    fn median(&self, mut f: impl FnMut()) -> f64 {
        f();
        let start = Instant::now();
        let mut times = Vec::new();
        while times.len() < self.min_reps || (start.elapsed() < self.budget && times.len() < self.max_reps) {
            let t = Instant::now();
            f();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    }
}

/// Deterministic values of mean `mean` and spread about `std` (an LCG; no rand dependency).
fn random(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            mean + std * 3.4641 * (u - 0.5)
        })
        .collect()
}

/// The module under test, either kind, behind one interface.
trait Bn {
    fn forward4(&self, x: Tensor<4>) -> Tensor<4>;
    fn forward3(&self, x: Tensor<3>) -> Tensor<3>;
    fn forward2(&self, x: Tensor<2>) -> Tensor<2>;
    fn valid_box(&self) -> Box<dyn Bn>;
    fn no_grad_box(&self) -> Box<dyn Bn>;
    fn gamma(&self) -> Tensor<1>;
}

macro_rules! bn_impl {
    ($ty:ty) => {
        impl Bn for $ty {
            fn forward4(&self, x: Tensor<4>) -> Tensor<4> {
                self.forward(x)
            }
            fn forward3(&self, x: Tensor<3>) -> Tensor<3> {
                self.forward(x)
            }
            fn forward2(&self, x: Tensor<2>) -> Tensor<2> {
                self.forward(x)
            }
            fn valid_box(&self) -> Box<dyn Bn> {
                Box::new(self.valid())
            }
            fn no_grad_box(&self) -> Box<dyn Bn> {
                Box::new(self.clone().no_grad())
            }
            fn gamma(&self) -> Tensor<1> {
                self.gamma.val()
            }
        }
    };
}

bn_impl!(burn::nn::BatchNorm);
bn_impl!(bn_burn::BatchNorm);

/// The three module times and the floor for one rank.
fn time_rank<const D: usize>(
    options: &Options,
    module: &dyn Bn,
    forward: fn(&dyn Bn, Tensor<D>) -> Tensor<D>,
    x: &Tensor<D>,
    x_plain: &Tensor<D>,
    r: &Tensor<D>,
) -> [f64; 3] {
    // A training forward whose output is dropped without a backward leaves its node in burn's
    // autodiff graph when gamma and beta are tracked, and that slows every later backward in
    // the process (burn-nn's and ours alike; a training loop never does it): the forward alone
    // is timed with the parameters untracked.
    let x_tracked = x.clone().require_grad();
    let step = options.median(|| {
        let y = forward(module, x_tracked.clone());
        let grads = y.mul(r.clone()).sum().backward();
        assert!(module.gamma().grad(&grads).is_some() && x_tracked.grad(&grads).is_some());
    });
    let untracked = module.no_grad_box();
    let train = options.median(|| drop(forward(untracked.as_ref(), x.clone())));
    let valid = module.valid_box();
    let eval = options.median(|| drop(forward(valid.as_ref(), x_plain.clone())));
    [train, eval, step]
}

/// The floor (`y = x`) and the copy op's step.
fn floor<const D: usize>(options: &Options, x: &Tensor<D>, r: &Tensor<D>) -> [f64; 2] {
    let x_tracked = x.clone().require_grad();
    let floor = options.median(|| {
        let grads = x_tracked.clone().mul(r.clone()).sum().backward();
        assert!(x_tracked.grad(&grads).is_some());
    });
    let copy = options.median(|| {
        let grads = copy_op::copy(x_tracked.clone()).mul(r.clone()).sum().backward();
        assert!(x_tracked.grad(&grads).is_some());
    });
    [floor, copy]
}

/// The kernels alone: forward_train and backward on slices.
fn time_kernels(options: &Options, shape: &[usize], x: &[f32], r: &[f32]) -> f64 {
    let axes: Vec<usize> = std::iter::once(0).chain(2..shape.len()).collect();
    let c = shape[1];
    let ops = BatchNormOps::<f32>::new(
        Layout::from_axes(&[c], &axes).expect("a valid layout"),
        Config::preset(Preset::Pytorch).torch_momentum(0.1),
    )
    .expect("a valid configuration");
    let (gamma, beta) = (vec![1.0f32; c], vec![0.0f32; c]);
    let (mut y, mut dx) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    options.median(|| {
        let stats = ops.forward_train(x, shape, &gamma, &beta, &mut y).expect("forward_train");
        ops.backward(x, r, shape, &stats, &gamma, &beta, &mut dx, &mut dgamma, &mut dbeta).expect("backward");
    })
}

fn ms(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms < 1.0 {
        format!("{ms:.3}")
    } else if ms < 100.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn geo_mean(values: &[f64]) -> f64 {
    (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The 1-minute load average, where the system tells it (other processes skew every figure).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Ratios of one group of shapes (standard or ResNet-50).
#[derive(Default)]
struct Group {
    train: Vec<f64>,
    eval: Vec<f64>,
    step: Vec<f64>,
    overhead: Vec<f64>,
    copy: Vec<f64>,
    added: f64,
    kernels: f64,
}

impl Group {
    fn summary(&self, what: &str) {
        if self.train.is_empty() {
            return;
        }
        println!(
            "geo-mean over {} {what} shapes: train forward {:.1}x, eval {:.1}x, training step {:.1}x faster than burn-nn; \
             (step - floor) / kernels: median {:.2}, summed over the shapes {:.2}; \
             (copy op - floor) / kernels: median {:.2}",
            self.train.len(),
            geo_mean(&self.train),
            geo_mean(&self.eval),
            geo_mean(&self.step),
            median(&self.overhead),
            self.added / self.kernels,
            median(&self.copy),
        );
    }
}

fn main() -> Result<(), String> {
    let options = Options::from_args()?;
    if let Some(n) = options.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| e.to_string())?;
    }
    let plain = Device::ndarray();
    let device = plain.clone().autodiff();
    println!(
        "f32, NdArray + Autodiff, {} rayon threads, times in ms (median); x = burn-nn time / ours; load average at start {}\n",
        rayon::current_num_threads(),
        load(),
    );
    println!(
        "| shape | train: burn-nn / ours | x | eval: burn-nn / ours | x | step: burn-nn / ours | x | floor | kernels | (step - floor) / kernels | copy op | (copy op - floor) / kernels |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut standard, mut resnet) = (Group::default(), Group::default());
    for (name, shape) in SHAPES {
        if options.shapes.as_ref().is_some_and(|list| !list.iter().any(|s| s == name)) {
            continue;
        }
        let c = shape[1];
        let n: usize = shape.iter().product();
        let (xs, rs) = (random(n, 1, 0.5, 2.0), random(n, 2, 0.0, 1.0));
        let make = |values: &Vec<f32>, _device: &Device| TensorData::new(values.clone(), shape.to_vec());
        let mut times = Vec::new();
        let mut floor_time = [0.0; 2];
        for ours in [false, true] {
            let module: Box<dyn Bn> = if ours {
                Box::new(bn_burn::BatchNormConfig::new(c).init(&device))
            } else {
                Box::new(burn::nn::BatchNormConfig::new(c).init(&device))
            };
            let m = module.as_ref();
            let t = match shape.len() {
                4 => {
                    let (x, xp, r) = (
                        Tensor::<4>::from_data(make(&xs, &device), &device),
                        Tensor::<4>::from_data(make(&xs, &plain), &plain),
                        Tensor::<4>::from_data(make(&rs, &device), &device),
                    );
                    if ours {
                        floor_time = floor(&options, &x, &r);
                    }
                    time_rank(&options, m, |m, x| m.forward4(x), &x, &xp, &r)
                }
                3 => {
                    let (x, xp, r) = (
                        Tensor::<3>::from_data(make(&xs, &device), &device),
                        Tensor::<3>::from_data(make(&xs, &plain), &plain),
                        Tensor::<3>::from_data(make(&rs, &device), &device),
                    );
                    if ours {
                        floor_time = floor(&options, &x, &r);
                    }
                    time_rank(&options, m, |m, x| m.forward3(x), &x, &xp, &r)
                }
                _ => {
                    let (x, xp, r) = (
                        Tensor::<2>::from_data(make(&xs, &device), &device),
                        Tensor::<2>::from_data(make(&xs, &plain), &plain),
                        Tensor::<2>::from_data(make(&rs, &device), &device),
                    );
                    if ours {
                        floor_time = floor(&options, &x, &r);
                    }
                    time_rank(&options, m, |m, x| m.forward2(x), &x, &xp, &r)
                }
            };
            times.push(t);
        }
        let kernels = time_kernels(&options, shape, &xs, &rs);
        let [theirs, ours] = [times[0], times[1]];
        let ratio = |i: usize| theirs[i] / ours[i];
        let [floor_time, copy_time] = floor_time;
        let added = (ours[2] - floor_time) / kernels;
        let copy_added = (copy_time - floor_time) / kernels;
        println!(
            "| {name} {shape:?} | {} / {} | {:.1} | {} / {} | {:.1} | {} / {} | {:.1} | {} | {} | {:.2} | {} | {:.2} |",
            ms(theirs[0]),
            ms(ours[0]),
            ratio(0),
            ms(theirs[1]),
            ms(ours[1]),
            ratio(1),
            ms(theirs[2]),
            ms(ours[2]),
            ratio(2),
            ms(floor_time),
            ms(kernels),
            added,
            ms(copy_time),
            copy_added,
        );
        let group = if name.starts_with('S') { &mut standard } else { &mut resnet };
        group.train.push(ratio(0));
        group.eval.push(ratio(1));
        group.step.push(ratio(2));
        group.overhead.push(added);
        group.copy.push(copy_added);
        group.added += ours[2] - floor_time;
        group.kernels += kernels;
    }
    println!();
    standard.summary("standard (NCHW/NC/NCL)");
    resnet.summary("ResNet-50");
    println!("load average at the end {}", load());
    Ok(())
}
