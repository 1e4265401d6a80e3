//! Suites of a real network's batch-norm layers (`--suite`): each layer's shape and how often it
//! occurs in the network, and from a run's rows the batch-norm time of one pass over the network.
//!
//! The standard shapes S1..S6 are chosen to cover layouts and sizes; a suite weighs the shapes a
//! network actually runs by how often it runs them, so its total is what a user of that network
//! pays for batch normalization per training step or inference pass.

use std::fmt::Write as _;

use crate::case::{Case, Dtype, Mode};
use crate::report::{format_ns, Row};

/// A suite of layers (`--suite NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// The batch-norm layers of ResNet-50 at batch 50, NCHW (53 layers of 9 shapes)
    #[value(name = "resnet50")]
    Resnet50,
}

/// One distinct batch-norm layer of a suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuiteLayer {
    /// The case name of the layer in tables and JSON (`R1`..).
    pub name: &'static str,
    /// The NCHW shape (statistics over N, H, W).
    pub shape: [usize; 4],
    /// How many layers of the network have this shape.
    pub count: usize,
}

/// The batch-norm layers of ResNet-50 at batch 50 as oneDNN's benchdnn lists them
/// (`inputs/bnorm/bnorm_resnet_50`), with how often each shape occurs in the network: 53 layers.
pub const RESNET50: [SuiteLayer; 9] = [
    SuiteLayer { name: "R1", shape: [50, 64, 112, 112], count: 1 },
    SuiteLayer { name: "R2", shape: [50, 256, 56, 56], count: 4 },
    SuiteLayer { name: "R3", shape: [50, 64, 56, 56], count: 6 },
    SuiteLayer { name: "R4", shape: [50, 512, 28, 28], count: 5 },
    SuiteLayer { name: "R5", shape: [50, 128, 28, 28], count: 8 },
    SuiteLayer { name: "R6", shape: [50, 1024, 14, 14], count: 7 },
    SuiteLayer { name: "R7", shape: [50, 256, 14, 14], count: 12 },
    SuiteLayer { name: "R8", shape: [50, 2048, 7, 7], count: 4 },
    SuiteLayer { name: "R9", shape: [50, 512, 7, 7], count: 6 },
];

/// The reduced axes of every suite layer (NCHW).
pub const SUITE_AXES: [usize; 3] = [0, 2, 3];

impl Suite {
    /// Every suite.
    pub const ALL: [Suite; 1] = [Suite::Resnet50];

    /// The name `--suite` takes.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Resnet50 => "resnet50",
        }
    }

    /// The network's name as prose writes it.
    pub fn title(self) -> &'static str {
        match self {
            Suite::Resnet50 => "ResNet-50",
        }
    }

    /// The distinct layers, in the network's order.
    pub fn layers(self) -> &'static [SuiteLayer] {
        match self {
            Suite::Resnet50 => &RESNET50,
        }
    }

    /// Number of batch-norm layers in the network (the counts summed).
    pub fn total_layers(self) -> usize {
        self.layers().iter().map(|l| l.count).sum()
    }

    /// The cases to measure, one per distinct layer (f32).
    pub fn cases(self) -> Vec<Case> {
        self.layers()
            .iter()
            .map(|l| Case {
                name: l.name.to_string(),
                shape: l.shape.to_vec(),
                axes: SUITE_AXES.to_vec(),
                dtype: Dtype::F32,
            })
            .collect()
    }
}

/// The suite layer a case is (same name and shape), if any.
pub fn layer_of(name: &str, shape: &[usize]) -> Option<(Suite, &'static SuiteLayer)> {
    Suite::ALL.into_iter().find_map(|suite| {
        suite.layers().iter().find(|l| l.name == name && l.shape == shape).map(|l| (suite, l))
    })
}

/// The suite whose every layer has rows in `rows`, if any.
pub fn suite_of(rows: &[Row]) -> Option<Suite> {
    Suite::ALL
        .into_iter()
        .find(|suite| suite.layers().iter().all(|l| rows.iter().any(|r| r.shape == l.shape)))
}

/// The batch-norm time of one pass over a suite's network by one implementation, each layer's
/// median weighted by its count; `None` where a layer's row is missing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassTimes {
    /// One training step: training forward and backward of every layer, in nanoseconds.
    pub train_step_ns: Option<f64>,
    /// One inference pass: inference forward of every layer, in nanoseconds.
    pub inference_ns: Option<f64>,
}

/// The pass times of the rows `pick` selects (one implementation; for a layer and mode the
/// first matching row counts), matched to the suite's layers by shape.
pub fn pass_times(suite: Suite, rows: &[Row], pick: impl Fn(&Row) -> bool) -> PassTimes {
    let total = |modes: &[Mode]| -> Option<f64> {
        let mut sum = 0.0;
        for layer in suite.layers() {
            for mode in modes {
                let row = rows.iter().find(|r| {
                    r.shape == layer.shape && r.axes == SUITE_AXES && r.mode == mode.name() && pick(r)
                })?;
                sum += layer.count as f64 * row.median_ns as f64;
            }
        }
        Some(sum)
    };
    PassTimes { train_step_ns: total(&[Mode::Train, Mode::Backward]), inference_ns: total(&[Mode::Eval]) }
}

fn ns(v: f64) -> String {
    format_ns(v.round() as u64)
}

/// The summary line of a suite: the batch-norm time of one training step (training forward and
/// backward of every layer, weighted by the counts) and of one inference pass, for `ours` (an
/// implementation name, e.g. `runtime`) against the copy of the same rows weighted the same
/// way, and against PyTorch's `pytorch` rows of `torch` when given.
pub fn summary(suite: Suite, rows: &[Row], ours: &str, torch: Option<&[Row]>) -> String {
    let dtype = rows.first().map_or("f32", |r| r.dtype.as_str());
    let threads = rows.first().map_or(0, |r| r.threads);
    let ours_times = pass_times(suite, rows, |r| r.implementation == ours);
    let copy = pass_times(suite, rows, |r| r.implementation == "copy");
    let torch_times =
        torch.map(|t| pass_times(suite, t, |r| r.implementation == "pytorch" && r.dtype == dtype));
    let mut s = format!(
        "{} batch norm, {} layers at batch {}, {dtype}, {threads} thread(s), {ours} layer:",
        suite.title(),
        suite.total_layers(),
        suite.layers()[0].shape[0],
    );
    let parts = [
        ("training step (forward + backward)", ours_times.train_step_ns, copy.train_step_ns, {
            torch_times.map(|t| t.train_step_ns)
        }),
        ("inference pass", ours_times.inference_ns, copy.inference_ns, torch_times.map(|t| t.inference_ns)),
    ];
    for (i, (what, ours_ns, copy_ns, torch_ns)) in parts.into_iter().enumerate() {
        let separator = if i == 0 { " " } else { "; " };
        let Some(ours_ns) = ours_ns else {
            let _ = write!(s, "{separator}{what} not measured");
            continue;
        };
        let _ = write!(s, "{separator}{what} {}", ns(ours_ns));
        if let Some(copy_ns) = copy_ns {
            let _ = write!(s, " = {:.2}x copy ({})", ours_ns / copy_ns, ns(copy_ns));
        }
        match torch_ns {
            Some(Some(t)) => {
                let _ = write!(s, ", PyTorch {} = {:.2}x ours", ns(t), t / ours_ns);
            }
            Some(None) => s.push_str(", PyTorch: not in its JSON"),
            None => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(shape: [usize; 4], mode: Mode, implementation: &str, median_ns: u64) -> Row {
        Row::for_test("", &shape, &SUITE_AXES, mode.name(), implementation, median_ns)
    }

    #[test]
    fn resnet50_has_53_layers_at_batch_50() {
        assert_eq!(Suite::Resnet50.total_layers(), 53);
        assert!(RESNET50.iter().all(|l| l.shape[0] == 50));
        let cases = Suite::Resnet50.cases();
        assert_eq!(cases.len(), 9);
        assert_eq!(layer_of(&cases[6].name, &cases[6].shape).map(|(_, l)| l.count), Some(12));
    }

    #[test]
    fn pass_times_weigh_each_layer_by_its_count() {
        let mut rows = Vec::new();
        for (i, layer) in RESNET50.iter().enumerate() {
            let t = 1000 * (i as u64 + 1);
            rows.push(row(layer.shape, Mode::Train, "runtime", t));
            rows.push(row(layer.shape, Mode::Backward, "runtime", 2 * t));
            rows.push(row(layer.shape, Mode::Eval, "runtime", t));
            rows.push(row(layer.shape, Mode::Train, "copy", 500));
            rows.push(row(layer.shape, Mode::Backward, "copy", 500));
        }
        let weighted: f64 = RESNET50.iter().enumerate().map(|(i, l)| (l.count * 1000 * (i + 1)) as f64).sum();
        let ours = pass_times(Suite::Resnet50, &rows, |r| r.implementation == "runtime");
        assert_eq!(ours.train_step_ns, Some(3.0 * weighted));
        assert_eq!(ours.inference_ns, Some(weighted));
        let copy = pass_times(Suite::Resnet50, &rows, |r| r.implementation == "copy");
        assert_eq!(copy.train_step_ns, Some(53.0 * 1000.0));
        assert_eq!(copy.inference_ns, None, "no eval copy rows");
        assert_eq!(suite_of(&rows), Some(Suite::Resnet50));
        assert_eq!(suite_of(&rows[..10]), None);
        let line = summary(Suite::Resnet50, &rows, "runtime", Some(&rows[..0]));
        assert!(line.starts_with("ResNet-50 batch norm, 53 layers at batch 50"), "{line}");
        assert!(line.contains("PyTorch: not in its JSON"), "{line}");
    }
}
