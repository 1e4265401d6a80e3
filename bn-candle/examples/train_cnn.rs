//! A small CNN with batch norm trained on generated 8x8 images of four patterns (a horizontal
//! bar, a vertical bar, a diagonal, a square outline, each at a random place, under strong uniform noise).
//!
//! The model is written against candle-nn; the only bn-candle line is the `batch_norm` import.
//!
//! ```text
//! cargo run --release -p bn-candle --example train_cnn
//! ```

use bn_candle::batch_norm;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{conv2d, linear, loss, ModuleT, Optimizer, VarBuilder, VarMap};

const CLASSES: usize = 4;
const SIDE: usize = 8;

/// `count` images of the four patterns and their labels, from a small deterministic generator.
fn dataset(count: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut state = seed;
    let mut next = move || {
        // xorshift64*: reproducible without a dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut pixels = vec![0f32; count * SIDE * SIDE];
    let mut labels = Vec::with_capacity(count);
    for (i, image) in pixels.chunks_mut(SIDE * SIDE).enumerate() {
        let class = i % CLASSES;
        let (r, c) = (1 + (next() * 3.0) as usize, 1 + (next() * 3.0) as usize);
        for k in 0..4 {
            let on = match class {
                0 => [(r, c + k)].to_vec(),
                1 => [(r + k, c)].to_vec(),
                2 => [(r + k, c + k)].to_vec(),
                _ => [(r, c + k), (r + 3, c + k), (r + k, c), (r + k, c + 3)].to_vec(),
            };
            for (y, x) in on {
                image[y * SIDE + x] = 1.0;
            }
        }
        for p in image.iter_mut() {
            *p += 1.5 * (next() as f32 - 0.5);
        }
        labels.push(class as u32);
    }
    Ok((Tensor::from_vec(pixels, (count, 1, SIDE, SIDE), device)?, Tensor::from_vec(labels, count, device)?))
}

struct Model {
    conv1: candle_nn::Conv2d,
    bn1: bn_candle::BatchNorm,
    conv2: candle_nn::Conv2d,
    bn2: bn_candle::BatchNorm,
    head: candle_nn::Linear,
}

impl Model {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Model {
            conv1: conv2d(1, 16, 3, Default::default(), vb.pp("conv1"))?,
            bn1: batch_norm(16, 1e-5, vb.pp("bn1"))?,
            conv2: conv2d(16, 32, 3, Default::default(), vb.pp("conv2"))?,
            bn2: batch_norm(32, 1e-5, vb.pp("bn2"))?,
            head: linear(32 * 4 * 4, CLASSES, vb.pp("head"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_t(&x.apply(&self.conv1)?, train)?.relu()?;
        let x = self.bn2.forward_t(&x.apply(&self.conv2)?, train)?.relu()?;
        x.flatten_from(1)?.apply(&self.head)
    }
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?.mean_all()?;
    hits.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let (train_x, train_y) = dataset(2048, 7, &device)?;
    let (test_x, test_y) = dataset(512, 11, &device)?;
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let mut optimizer = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
    let batch = 64;
    for epoch in 0..5 {
        let mut total = 0.0;
        for start in (0..train_x.dim(0)?).step_by(batch) {
            let x = train_x.narrow(0, start, batch)?;
            let y = train_y.narrow(0, start, batch)?;
            let loss = loss::cross_entropy(&model.forward_t(&x, true)?, &y)?;
            optimizer.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()?;
        }
        let test_logits = model.forward_t(&test_x, false)?;
        println!(
            "epoch {epoch}: train loss {:.4}, test loss {:.4}, test accuracy {:.1}% (eval mode: running statistics)",
            total / (train_x.dim(0)? / batch) as f32,
            loss::cross_entropy(&test_logits, &test_y)?.to_scalar::<f32>()?,
            100.0 * accuracy(&test_logits, &test_y)?,
        );
    }
    println!("running mean of bn1 after training: {}", model.bn1.running_mean());
    Ok(())
}
