//! A small CNN with batch norm trained on the 8x8 handwritten digits (1,797 images, shipped in
//! `examples/data/digits.csv`; see `examples/data/NOTICE.md` for their source and licence).
//!
//! The model is written against candle-nn; the only bn-candle line is the `batch_norm` import.
//! The first 1,500 images train it, the other 297 test it in eval mode (running statistics).
//!
//! ```text
//! cargo run --release -p bn-candle --example digits
//! ```

use bn_candle::batch_norm;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{conv2d, linear, loss, ModuleT, Optimizer, VarBuilder, VarMap};

const DIGITS: &str = include_str!("data/digits.csv");
const TRAIN: usize = 1500;

/// The images, scaled to [0, 1], as (N, 1, 8, 8), and their digits.
fn dataset(device: &Device) -> Result<(Tensor, Tensor)> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (line_number, line) in DIGITS.lines().enumerate() {
        let values: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| candle_core::Error::msg(format!("digits.csv line {}: {e}", line_number + 1)))?;
        if values.len() != 65 {
            candle_core::bail!("digits.csv line {}: {} values, expected 65", line_number + 1, values.len());
        }
        pixels.extend(values[..64].iter().map(|&v| v as f32 / 16.0));
        labels.push(values[64]);
    }
    let count = labels.len();
    Ok((Tensor::from_vec(pixels, (count, 1, 8, 8), device)?, Tensor::from_vec(labels, count, device)?))
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
            head: linear(32 * 4 * 4, 10, vb.pp("head"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_t(&x.apply(&self.conv1)?, train)?.relu()?;
        let x = self.bn2.forward_t(&x.apply(&self.conv2)?, train)?.relu()?;
        x.flatten_from(1)?.apply(&self.head)
    }
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let (images, labels) = dataset(&device)?;
    let (train_x, train_y) = (images.narrow(0, 0, TRAIN)?, labels.narrow(0, 0, TRAIN)?);
    let test = images.dim(0)? - TRAIN;
    let (test_x, test_y) = (images.narrow(0, TRAIN, test)?, labels.narrow(0, TRAIN, test)?);
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let mut optimizer = candle_nn::AdamW::new_lr(varmap.all_vars(), 5e-3)?;
    let batch = 50;
    for epoch in 0..8 {
        let mut total = 0.0;
        for start in (0..TRAIN).step_by(batch) {
            let x = train_x.narrow(0, start, batch)?;
            let y = train_y.narrow(0, start, batch)?;
            let loss = loss::cross_entropy(&model.forward_t(&x, true)?, &y)?;
            optimizer.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()?;
        }
        let test_logits = model.forward_t(&test_x, false)?;
        println!(
            "epoch {epoch}: train loss {:.4}, test loss {:.4}, test accuracy {:.1}%",
            total / (TRAIN / batch) as f32,
            loss::cross_entropy(&test_logits, &test_y)?.to_scalar::<f32>()?,
            100.0 * accuracy(&test_logits, &test_y)?,
        );
    }
    println!("bn1 running mean after training: {}", model.bn1.running_mean());
    Ok(())
}
