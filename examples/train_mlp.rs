//! A model that trains: a small multilayer perceptron whose batch-norm layers are
//! `#[batch_norm]` structs, trained with mini-batch SGD on two interleaved spirals.
//!
//! The network is
//!
//! ```text
//! x (batch, 2) -> Linear(2, H) -> HiddenBn -> ReLU -> Linear(H, H) -> HiddenBn -> ReLU
//!              -> Linear(H, 2) -> softmax cross-entropy
//! ```
//!
//! with `H = HiddenBn::FEATURES` and `HiddenBn` a `#[batch_norm(features = .., axes = [0])]`
//! layer on the (batch, features) activations. The linear layers are plain ndarray matrices with a
//! hand-written backward pass (two matrix products each); the batch-norm layers' gradients come
//! from their own `backward` (`dx`, `gamma_grad()`, `beta_grad()`), and their parameters are
//! updated through `update_params`. Training uses `forward_train` (batch statistics, which also
//! update the running statistics); evaluation switches to `forward_eval`, which normalizes with
//! the running statistics, so a prediction no longer depends on the rest of its batch.
//!
//! The data are generated here, from a seeded deterministic generator (SplitMix64), so a run is
//! reproducible and needs no extra crate: two spirals of points, one per class, winding around
//! each other. A separately generated test set measures the held-out accuracy.
//!
//! Run it with `cargo run --release --example train_mlp`. It prints the mean training loss and
//! the training accuracy of every epoch, then the inference-mode accuracy on the training set and
//! on the held-out test set. `tests/train_mlp.rs` runs the same code and checks that the loss
//! falls and that the held-out accuracy is at least 95%.

use std::error::Error;
use std::f32::consts::PI;

use batchnorm::{batch_norm, BnError};
use ndarray::{Array1, Array2, Axis};

/// Batch normalization of the hidden activations, shape (batch, features): statistics over the
/// batch axis, one gamma and beta per hidden unit, the seed's defaults (momentum 0.9, eps 1e-5).
/// Its `features` is the hidden width of the whole model.
#[batch_norm(features = 64, axes = [0])]
pub struct HiddenBn;

/// The hidden width, fixed at compile time by the batch-norm layer.
pub const HIDDEN: usize = HiddenBn::FEATURES;

/// Number of classes (the two spirals).
pub const CLASSES: usize = 2;

/// Everything a training run depends on.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Seed of the data, the initial weights and the shuffling.
    pub seed: u64,
    /// Training points per class.
    pub train_per_class: usize,
    /// Held-out test points per class (generated separately from the training points).
    pub test_per_class: usize,
    /// How many full turns each spiral makes.
    pub turns: f32,
    /// Standard deviation of the Gaussian noise added to every coordinate.
    pub noise: f32,
    /// Passes over the training set.
    pub epochs: usize,
    /// Mini-batch size (the last, incomplete mini-batch of an epoch is dropped; the data are
    /// reshuffled every epoch, so every point is still seen).
    pub batch_size: usize,
    /// Initial SGD learning rate; it decays along a cosine to `final_learning_rate`.
    pub learning_rate: f32,
    /// Learning rate of the last mini-batch.
    pub final_learning_rate: f32,
    /// SGD momentum (the weight of the previous velocity).
    pub momentum: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 2024,
            train_per_class: 500,
            test_per_class: 500,
            turns: 1.5,
            noise: 0.02,
            epochs: 40,
            batch_size: 64,
            learning_rate: 0.1,
            final_learning_rate: 0.002,
            momentum: 0.9,
        }
    }
}

/// Mean loss and accuracy of one epoch, measured on the training mini-batches as they were
/// trained on (training mode: batch statistics).
#[derive(Clone, Copy, Debug)]
pub struct EpochStats {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's mini-batches.
    pub loss: f32,
    /// Fraction of the epoch's points classified correctly.
    pub accuracy: f32,
}

/// The result of a training run.
#[derive(Clone, Debug)]
pub struct Report {
    /// One entry per epoch.
    pub epochs: Vec<EpochStats>,
    /// Accuracy on the whole training set in inference mode (running statistics).
    pub train_accuracy: f32,
    /// Cross-entropy on the held-out test set in inference mode.
    pub test_loss: f32,
    /// Accuracy on the held-out test set in inference mode.
    pub test_accuracy: f32,
}

/// Trains a model as `config` says and evaluates it; see [`train_with`].
pub fn train(config: &TrainConfig) -> Result<Report, BnError> {
    train_with(config, |_| {})
}

/// Trains a model as `config` says, calling `on_epoch` after every epoch, then evaluates it in
/// inference mode on the training set and on a separately generated test set.
///
/// The only errors are the batch-norm layers' (which a valid configuration does not produce: the
/// mini-batches have the layers' shape and at least two rows); a `batch_size` below 2 is one.
pub fn train_with(config: &TrainConfig, mut on_epoch: impl FnMut(&EpochStats)) -> Result<Report, BnError> {
    let mut rng = SplitMix64::new(config.seed);
    let train_set = Dataset::spirals(config.train_per_class, config.turns, config.noise, &mut rng);
    let test_set = Dataset::spirals(config.test_per_class, config.turns, config.noise, &mut rng);
    let mut model = Mlp::new(&mut rng);

    let n = train_set.len();
    let batches_per_epoch = n / config.batch_size.max(1);
    let total_steps = (config.epochs * batches_per_epoch).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0;
    let mut epochs = Vec::with_capacity(config.epochs);
    for epoch in 1..=config.epochs {
        rng.shuffle(&mut order);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for batch in order.chunks_exact(config.batch_size.max(1)) {
            let (x, labels) = train_set.gather(batch);
            let lr = cosine_rate(config.learning_rate, config.final_learning_rate, step, total_steps);
            let out = model.train_step(&x, &labels, lr, config.momentum)?;
            loss_sum += f64::from(out.loss);
            correct += out.correct;
            seen += batch.len();
            step += 1;
        }
        let stats = EpochStats {
            epoch,
            loss: (loss_sum / batches_per_epoch.max(1) as f64) as f32,
            accuracy: correct as f32 / seen.max(1) as f32,
        };
        on_epoch(&stats);
        epochs.push(stats);
    }

    // Inference: the running statistics replace the batch statistics.
    let train_eval = model.evaluate(&train_set)?;
    let test_eval = model.evaluate(&test_set)?;
    Ok(Report {
        epochs,
        train_accuracy: train_eval.accuracy,
        test_loss: test_eval.loss,
        test_accuracy: test_eval.accuracy,
    })
}

/// Cosine decay from `start` to `end` over `total` steps.
fn cosine_rate(start: f32, end: f32, step: usize, total: usize) -> f32 {
    let progress = step as f32 / total as f32;
    end + 0.5 * (start - end) * (1.0 + (PI * progress).cos())
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Points (n, 2) and their class labels.
pub struct Dataset {
    /// The points, one per row.
    pub x: Array2<f32>,
    /// The class of every point, 0 or 1.
    pub labels: Vec<usize>,
}

impl Dataset {
    /// `per_class` points on each of two interleaved spirals. Spiral `k` is
    /// `r (cos(a + k pi), sin(a + k pi))` with `a = 2 pi turns r` for r in [0.1, 1]: the second
    /// is the first rotated by half a turn, so neighbouring arms of the two classes are
    /// `1 / (2 turns)` apart along a radius. Every coordinate gets Gaussian noise of std `noise`.
    pub fn spirals(per_class: usize, turns: f32, noise: f32, rng: &mut SplitMix64) -> Dataset {
        let n = per_class * CLASSES;
        let mut x = Array2::zeros((n, 2));
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = i % CLASSES;
            let r = 0.1 + 0.9 * rng.uniform();
            let angle = 2.0 * PI * turns * r + PI * class as f32;
            x[[i, 0]] = r * angle.cos() + noise * rng.normal();
            x[[i, 1]] = r * angle.sin() + noise * rng.normal();
            labels.push(class);
        }
        Dataset { x, labels }
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no points.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows `indices`, as a new (indices.len(), 2) batch with its labels.
    fn gather(&self, indices: &[usize]) -> (Array2<f32>, Vec<usize>) {
        let x = self.x.select(Axis(0), indices);
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        (x, labels)
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny, well-mixed, seedable generator.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]: the logarithm is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }

    /// Uniform in 0..bound (bound > 0; the modulo bias is negligible for small bounds).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// A fully connected layer `y = x w (+ b)` with its SGD velocities.
struct Linear {
    /// Weights, (inputs, outputs).
    w: Array2<f32>,
    /// Bias; `None` before a batch norm, whose beta plays its part.
    b: Option<Array1<f32>>,
    w_velocity: Array2<f32>,
    b_velocity: Array1<f32>,
}

impl Linear {
    /// He initialization (normal with variance 2 / inputs), suited to ReLU networks.
    fn new(inputs: usize, outputs: usize, bias: bool, rng: &mut SplitMix64) -> Self {
        let std = (2.0 / inputs as f32).sqrt();
        Linear {
            w: Array2::from_shape_simple_fn((inputs, outputs), || std * rng.normal()),
            b: bias.then(|| Array1::zeros(outputs)),
            w_velocity: Array2::zeros((inputs, outputs)),
            b_velocity: Array1::zeros(outputs),
        }
    }

    fn forward(&self, x: &Array2<f32>) -> Array2<f32> {
        let y = x.dot(&self.w);
        match &self.b {
            Some(b) => y + b,
            None => y,
        }
    }

    /// Given the layer's input `x` and the gradient `dy` of its output, updates the weights (SGD
    /// with momentum) and returns the gradient of the input.
    fn backward_and_step(
        &mut self,
        x: &Array2<f32>,
        dy: &Array2<f32>,
        lr: f32,
        momentum: f32,
    ) -> Array2<f32> {
        let dx = dy.dot(&self.w.t()); // with the weights of the forward pass
        let dw = x.t().dot(dy);
        sgd(&mut self.w, &mut self.w_velocity, &dw, lr, momentum);
        if let Some(b) = &mut self.b {
            let db = dy.sum_axis(Axis(0));
            sgd(b, &mut self.b_velocity, &db, lr, momentum);
        }
        dx
    }
}

/// One SGD-with-momentum step: `v = momentum v + grad; p -= lr v`.
fn sgd<D: ndarray::Dimension>(
    param: &mut ndarray::Array<f32, D>,
    velocity: &mut ndarray::Array<f32, D>,
    grad: &ndarray::Array<f32, D>,
    lr: f32,
    momentum: f32,
) {
    velocity.zip_mut_with(grad, |v, &g| *v = momentum * *v + g);
    param.zip_mut_with(velocity, |p, &v| *p -= lr * v);
}

/// A batch-norm layer with the SGD velocities of its gamma and beta.
struct Norm {
    bn: HiddenBn,
    gamma_velocity: Vec<f32>,
    beta_velocity: Vec<f32>,
}

impl Norm {
    fn new() -> Self {
        Norm { bn: HiddenBn::new(), gamma_velocity: vec![0.0; HIDDEN], beta_velocity: vec![0.0; HIDDEN] }
    }

    /// Training forward: normalizes `z` with its own batch statistics (and updates the running
    /// statistics).
    fn forward_train(&mut self, z: &Array2<f32>) -> Result<Array2<f32>, BnError> {
        let mut y = Array2::zeros(z.raw_dim());
        self.bn.forward_train(as_slice(z), z.shape(), as_slice_mut(&mut y))?;
        Ok(y)
    }

    /// Inference forward: normalizes `z` with the running statistics.
    fn forward_eval(&self, z: &Array2<f32>) -> Result<Array2<f32>, BnError> {
        let mut y = Array2::zeros(z.raw_dim());
        self.bn.forward_eval(as_slice(z), z.shape(), as_slice_mut(&mut y))?;
        Ok(y)
    }

    /// Backward of the last training forward (whose input was `z`): returns `dz` and applies an
    /// SGD-with-momentum step to gamma and beta, from the layer's `gamma_grad()` and `beta_grad()`.
    fn backward_and_step(
        &mut self,
        z: &Array2<f32>,
        dy: &Array2<f32>,
        lr: f32,
        momentum: f32,
    ) -> Result<Array2<f32>, BnError> {
        let mut dz = Array2::zeros(z.raw_dim());
        self.bn.backward(as_slice(z), as_slice(dy), z.shape(), as_slice_mut(&mut dz))?;
        let step = |param: &[f32], grad: &[f32], velocity: &mut [f32]| -> Vec<f32> {
            param
                .iter()
                .zip(grad)
                .zip(velocity.iter_mut())
                .map(|((&p, &g), v)| {
                    *v = momentum * *v + g;
                    p - lr * *v
                })
                .collect()
        };
        let gamma = step(self.bn.gamma(), self.bn.gamma_grad(), &mut self.gamma_velocity);
        let beta = step(self.bn.beta(), self.bn.beta_grad(), &mut self.beta_velocity);
        self.bn.update_params(&gamma, &beta)?;
        Ok(dz)
    }
}

/// The elements of an array the model built itself (all are in standard row-major layout).
fn as_slice(a: &Array2<f32>) -> &[f32] {
    a.as_slice().expect("the model's activations are in standard layout")
}

fn as_slice_mut(a: &mut Array2<f32>) -> &mut [f32] {
    a.as_slice_mut().expect("the model's activations are in standard layout")
}

fn relu(x: &Array2<f32>) -> Array2<f32> {
    x.mapv(|v| v.max(0.0))
}

/// The gradient through a ReLU: `da` where its input `x` was positive, else 0.
fn relu_backward(x: &Array2<f32>, da: &Array2<f32>) -> Array2<f32> {
    let mut dx = da.clone();
    dx.zip_mut_with(x, |d, &v| {
        if v <= 0.0 {
            *d = 0.0;
        }
    });
    dx
}

/// Mean softmax cross-entropy of `logits` (batch, classes) against `labels`, the number of
/// correct argmax predictions, and the gradient of the mean loss with respect to the logits.
fn softmax_cross_entropy(logits: &Array2<f32>, labels: &[usize]) -> (f32, usize, Array2<f32>) {
    let n = logits.nrows();
    let mut grad = Array2::zeros(logits.raw_dim());
    let (mut loss, mut correct) = (0.0f64, 0);
    for ((row, mut g), &label) in logits.outer_iter().zip(grad.outer_iter_mut()).zip(labels) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let exp = row.mapv(|v| (v - max).exp());
        let sum = exp.sum();
        loss -= f64::from((row[label] - max) - sum.ln());
        let predicted = (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best });
        correct += usize::from(predicted == label);
        for (j, gj) in g.iter_mut().enumerate() {
            let target = if j == label { 1.0 } else { 0.0 };
            *gj = (exp[j] / sum - target) / n as f32;
        }
    }
    ((loss / n.max(1) as f64) as f32, correct, grad)
}

/// What a training step or an evaluation measured.
struct Outcome {
    loss: f32,
    correct: usize,
    accuracy: f32,
}

/// The multilayer perceptron.
struct Mlp {
    fc1: Linear,
    bn1: Norm,
    fc2: Linear,
    bn2: Norm,
    head: Linear,
}

impl Mlp {
    fn new(rng: &mut SplitMix64) -> Self {
        Mlp {
            fc1: Linear::new(2, HIDDEN, false, rng),
            bn1: Norm::new(),
            fc2: Linear::new(HIDDEN, HIDDEN, false, rng),
            bn2: Norm::new(),
            head: Linear::new(HIDDEN, CLASSES, true, rng),
        }
    }

    /// Forward in training mode, backward, and one SGD step on every parameter.
    fn train_step(
        &mut self,
        x: &Array2<f32>,
        labels: &[usize],
        lr: f32,
        momentum: f32,
    ) -> Result<Outcome, BnError> {
        // Forward, keeping what the backward pass needs.
        let z1 = self.fc1.forward(x);
        let h1 = self.bn1.forward_train(&z1)?;
        let a1 = relu(&h1);
        let z2 = self.fc2.forward(&a1);
        let h2 = self.bn2.forward_train(&z2)?;
        let a2 = relu(&h2);
        let logits = self.head.forward(&a2);
        let (loss, correct, dlogits) = softmax_cross_entropy(&logits, labels);

        // Backward, updating each layer once its input gradient is computed.
        let da2 = self.head.backward_and_step(&a2, &dlogits, lr, momentum);
        let dh2 = relu_backward(&h2, &da2);
        let dz2 = self.bn2.backward_and_step(&z2, &dh2, lr, momentum)?;
        let da1 = self.fc2.backward_and_step(&a1, &dz2, lr, momentum);
        let dh1 = relu_backward(&h1, &da1);
        let dz1 = self.bn1.backward_and_step(&z1, &dh1, lr, momentum)?;
        // The input needs no gradient, but fc1's weights do; its dx is discarded.
        let _ = self.fc1.backward_and_step(x, &dz1, lr, momentum);

        Ok(Outcome { loss, correct, accuracy: correct as f32 / labels.len().max(1) as f32 })
    }

    /// Logits in inference mode: the batch norms use their running statistics.
    fn predict(&self, x: &Array2<f32>) -> Result<Array2<f32>, BnError> {
        let a1 = relu(&self.bn1.forward_eval(&self.fc1.forward(x))?);
        let a2 = relu(&self.bn2.forward_eval(&self.fc2.forward(&a1))?);
        Ok(self.head.forward(&a2))
    }

    /// Loss and accuracy on a whole data set, in inference mode.
    fn evaluate(&self, data: &Dataset) -> Result<Outcome, BnError> {
        let logits = self.predict(&data.x)?;
        let (loss, correct, _) = softmax_cross_entropy(&logits, &data.labels);
        Ok(Outcome { loss, correct, accuracy: correct as f32 / data.len().max(1) as f32 })
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let config = TrainConfig::default();
    println!(
        "two spirals ({} turns, noise {}): {} training and {} test points; \
         MLP 2 -> {HIDDEN} -> {HIDDEN} -> {CLASSES} with #[batch_norm] after each hidden linear layer",
        config.turns,
        config.noise,
        config.train_per_class * CLASSES,
        config.test_per_class * CLASSES,
    );
    println!(
        "SGD: {} epochs, batch {}, learning rate {} -> {} (cosine), momentum {}, seed {}",
        config.epochs,
        config.batch_size,
        config.learning_rate,
        config.final_learning_rate,
        config.momentum,
        config.seed
    );
    println!("epoch  train loss  train acc (training mode)");
    let report = train_with(&config, |e| {
        println!("{:5}  {:10.4}  {:8.1}%", e.epoch, e.loss, 100.0 * e.accuracy);
    })?;
    println!("inference mode (running statistics):");
    println!("  training set accuracy: {:.1}%", 100.0 * report.train_accuracy);
    println!(
        "  held-out test set: loss {:.4}, accuracy {:.1}%",
        report.test_loss,
        100.0 * report.test_accuracy
    );
    Ok(())
}
