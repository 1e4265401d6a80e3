//! The training example as a test: the MLP of `examples/train_mlp.rs`, whose batch norms are
//! `#[batch_norm]` layers, learns two interleaved spirals with SGD. Its training loss must fall
//! and, in inference mode (running statistics), it must classify a held-out test set.
//!
//! Deterministic: the data, the initial weights and the shuffling all come from the fixed seed
//! of `TrainConfig::default()`.

#[allow(dead_code)] // `main` and the data set's accessors are for the example.
#[path = "../../examples/train_mlp.rs"]
mod example;

use example::{train, TrainConfig};

#[test]
fn mlp_with_batch_norm_learns_two_spirals() {
    let config = TrainConfig::default();
    let report = train(&config).expect("a valid configuration trains without a batch-norm error");

    assert_eq!(report.epochs.len(), config.epochs);
    let first = report.epochs.first().expect("at least one epoch").loss;
    let last = report.epochs.last().expect("at least one epoch").loss;
    for e in &report.epochs {
        assert!(e.loss.is_finite(), "epoch {}: loss {}", e.epoch, e.loss);
    }

    // The loss falls: a 2-class cross-entropy starts near ln 2 = 0.69.
    assert!(last < 0.5 * first, "loss did not halve: first epoch {first}, last epoch {last}");
    assert!(last < 0.15, "final training loss {last} is not low");
    let best_early = report.epochs[..3].iter().map(|e| e.loss).fold(f32::INFINITY, f32::min);
    assert!(last < best_early, "last epoch {last} is not below the first three ({best_early})");

    // Inference mode, with the running statistics.
    assert!(report.test_loss < 0.15, "held-out loss {}", report.test_loss);
    assert!(report.test_accuracy >= 0.95, "held-out accuracy {}", report.test_accuracy);
    assert!(
        report.train_accuracy >= 0.95,
        "training-set accuracy (inference mode) {}",
        report.train_accuracy
    );
}

#[test]
fn training_is_deterministic() {
    // A short run is enough to compare two runs bit for bit.
    let config = TrainConfig { epochs: 2, ..TrainConfig::default() };
    let a = train(&config).expect("trains");
    let b = train(&config).expect("trains");
    let bits = |r: &example::Report| {
        let mut v: Vec<u32> =
            r.epochs.iter().flat_map(|e| [e.loss.to_bits(), e.accuracy.to_bits()]).collect();
        v.extend([r.train_accuracy.to_bits(), r.test_loss.to_bits(), r.test_accuracy.to_bits()]);
        v
    };
    assert_eq!(bits(&a), bits(&b));
}
