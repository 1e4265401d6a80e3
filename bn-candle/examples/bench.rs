//! candle-nn's `BatchNorm` and bn-candle's side by side, in one process, on the standard shapes
//! and the batch-norm shapes of ResNet-50 (f32, NCHW / NC / NCL):
//!
//! - `train`: the training forward (`forward_t(x, true)`, x not tracked);
//! - `eval`: the inference forward (`forward_t(x, false)`);
//! - `step`: a training step, the forward and `backward()` of `(y * r).sum_all()` for a fixed
//!   random `r`, with x, weight and bias tracked;
//! - `floor`: the same step on `y = x` (what candle spends around any op: the loss, its
//!   backward, the gradient buffers), so that `step - floor` is what batch norm adds;
//! - `copy op`: the same step through a custom op that only copies (x to y forward, the output
//!   gradient to x's backward): what candle spends on any op of this shape, so that
//!   `copy op - floor` is the part of `step - floor` no op can avoid;
//! - `kernels`: the kernels alone on slices (`batchnorm::ops` forward_train + backward, buffers
//!   allocated once), which `step - floor` is compared with.
//!
//! Times are medians. Run with the thread count in the environment:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p bn-candle --example bench -- [--quick] [--shapes S2,R1,...]
//! ```

use std::time::{Duration, Instant};

use batchnorm::ops::BatchNormOps;
use batchnorm::{Config, Layout, Preset};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout as CandleLayout, Result, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, ModuleT, VarBuilder, VarMap};

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
}

impl Options {
    fn from_args() -> std::result::Result<Options, String> {
        let mut options = Options { min_reps: 5, max_reps: 50, budget: Duration::from_secs(2), shapes: None };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    options.min_reps = 3;
                    options.max_reps = 20;
                    options.budget = Duration::from_millis(300);
                }
                "--shapes" => {
                    let list = args.next().ok_or("--shapes takes a list such as S2,R1")?;
                    options.shapes = Some(list.split(',').map(|s| s.trim().to_uppercase()).collect());
                }
                other => {
                    return Err(format!("unknown argument {other:?} (expected --quick, --shapes S2,R1,...)"))
                }
            }
        }
        Ok(options)
    }

    /// The median time of `f`, after one warm-up call.
    fn median(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let start = Instant::now();
        let mut times = Vec::new();
        while times.len() < self.min_reps || (start.elapsed() < self.budget && times.len() < self.max_reps) {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// The median times of one module on one shape: train forward, eval, step.
fn time_module(
    options: &Options,
    module: &dyn ModuleT,
    vars: &[Var],
    x: &Tensor,
    r: &Tensor,
) -> Result<[f64; 3]> {
    let train = options.median(|| module.forward_t(x, true).map(drop))?;
    let eval = options.median(|| module.forward_t(x, false).map(drop))?;
    let x_var = Var::from_tensor(x)?;
    let step = options.median(|| {
        let y = module.forward_t(x_var.as_tensor(), true)?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        for var in vars {
            assert!(grads.get(var).is_some());
        }
        Ok(())
    })?;
    Ok([train, eval, step])
}

/// A custom op that copies its input forward and its output gradient backward: the cost of any
/// op in a candle step, without batch norm's arithmetic.
struct CopyOp;

impl CustomOp1 for CopyOp {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &CandleLayout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("copy: the input must be contiguous")
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        Ok((CpuStorage::F32(x.to_vec()), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.copy()?))
    }
}

/// The kernels alone: forward_train and backward on slices.
fn time_kernels(options: &Options, shape: &[usize], x: &[f32], r: &[f32]) -> Result<f64> {
    let axes: Vec<usize> = std::iter::once(0).chain(2..shape.len()).collect();
    let c = shape[1];
    let wrap = |e: batchnorm::BnError| candle_core::Error::msg(e);
    let ops = BatchNormOps::<f32>::new(
        Layout::from_axes(&[c], &axes).map_err(wrap)?,
        Config::preset(Preset::Pytorch).torch_momentum(0.1),
    )
    .map_err(wrap)?;
    let (gamma, beta) = (vec![1.0f32; c], vec![0.0f32; c]);
    let (mut y, mut dx) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    options.median(|| {
        let stats = ops.forward_train(x, shape, &gamma, &beta, &mut y).map_err(wrap)?;
        ops.backward(x, r, shape, &stats, &gamma, &beta, &mut dx, &mut dgamma, &mut dbeta).map_err(wrap)
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

fn main() -> Result<()> {
    let options = Options::from_args().map_err(candle_core::Error::msg)?;
    let device = Device::Cpu;
    println!(
        "f32, {} rayon threads, times in ms (median); x = candle-nn time / ours; load average at start {}\n",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        load(),
    );
    println!(
        "| shape | train: candle-nn / ours | x | eval: candle-nn / ours | x | step: candle-nn / ours | x | floor | copy op | kernels | (step - floor) / kernels |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut train_x, mut eval_x, mut step_x, mut overhead, mut any_op) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut added_total, mut kernels_total) = (0.0, 0.0);
    for (name, shape) in SHAPES {
        if options.shapes.as_ref().is_some_and(|list| !list.iter().any(|s| s == name)) {
            continue;
        }
        let c = shape[1];
        let x = Tensor::randn(0.5f32, 2.0, *shape, &device)?;
        let r = Tensor::randn(0f32, 1.0, *shape, &device)?;
        let mut times = Vec::new();
        for ours in [false, true] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
            let module: Box<dyn ModuleT> = if ours {
                Box::new(bn_candle::batch_norm(c, BatchNormConfig::default(), vb)?)
            } else {
                Box::new(candle_nn::batch_norm(c, BatchNormConfig::default(), vb)?)
            };
            let data = map.data().lock().map_err(|_| candle_core::Error::msg("poisoned VarMap"))?;
            let vars = [data["weight"].clone(), data["bias"].clone()];
            drop(data);
            times.push(time_module(&options, module.as_ref(), &vars, &x, &r)?);
        }
        let x_var = Var::from_tensor(&x)?;
        let floor = options.median(|| (x_var.as_tensor() * &r)?.sum_all()?.backward().map(drop))?;
        let copy_op = options.median(|| {
            let y = x_var.as_tensor().apply_op1(CopyOp)?;
            (y * &r)?.sum_all()?.backward().map(drop)
        })?;
        let (xs, rs) = (x.flatten_all()?.to_vec1::<f32>()?, r.flatten_all()?.to_vec1::<f32>()?);
        let kernels = time_kernels(&options, shape, &xs, &rs)?;
        let [theirs, ours] = [times[0], times[1]];
        let ratio = |i: usize| theirs[i] / ours[i];
        let added = (ours[2] - floor) / kernels;
        println!(
            "| {name} {shape:?} | {} / {} | {:.1} | {} / {} | {:.1} | {} / {} | {:.1} | {} | {} | {} | {:.2} |",
            ms(theirs[0]),
            ms(ours[0]),
            ratio(0),
            ms(theirs[1]),
            ms(ours[1]),
            ratio(1),
            ms(theirs[2]),
            ms(ours[2]),
            ratio(2),
            ms(floor),
            ms(copy_op),
            ms(kernels),
            added,
        );
        train_x.push(ratio(0));
        eval_x.push(ratio(1));
        step_x.push(ratio(2));
        overhead.push(added);
        any_op.push((copy_op - floor) / kernels);
        added_total += ours[2] - floor;
        kernels_total += kernels;
    }
    if !train_x.is_empty() {
        println!(
            "\ngeo-mean over {} shapes: train forward {:.1}x, eval {:.1}x, training step {:.1}x faster than candle-nn; \
             (step - floor) / kernels: median {:.2}, summed over the shapes {:.2}, of which a copy op's \
             (copy op - floor) / kernels: median {:.2}; load average at the end {}",
            train_x.len(),
            geo_mean(&train_x),
            geo_mean(&eval_x),
            geo_mean(&step_x),
            median(&overhead),
            added_total / kernels_total,
            median(&any_op),
            load(),
        );
    }
    Ok(())
}
