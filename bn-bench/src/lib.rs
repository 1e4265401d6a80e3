//! `bn-bench`: the measuring instrument of the `batchnorm` workspace.
//!
//! - [`naive`]: the naive baseline, the NumPy reference `BatchNormalization` ported operation by
//!   operation to ndarray; the speedups the project quotes are over it.
//! - [`cli`]: the `bn-bench` command (`cargo run --release -p bn-bench -- --help`): every mode of
//!   the standard shapes S1..S6 (or a custom shape) with the `#[batch_norm]` layer, the
//!   runtime-generic layer, the naive baseline and a copy of the same bytes, interleaved in one
//!   process; a table, `--json` records and a `--plot` SVG. `--suite resnet50` measures the
//!   batch-norm layers of ResNet-50 instead ([`suite`]), with the time of one training step.
//! - `bn-bench markdown --from run.json [--torch torch.json]` ([`markdown`]): the Markdown
//!   performance table of a `--json` run, with PyTorch's figures beside ours.
//! - [`bench`](mod@bench): the measuring loop; [`report`]: the derived figures, the table and the JSON;
//!   [`plot`]: the SVG; [`layers`]: the layers under test; [`case`]: shapes, modes,
//!   implementations.
//!
//! The criterion benches (`cargo bench -p bn-bench`) compare the same implementations.
#![deny(missing_docs)]

pub mod backend;
pub mod bench;
pub mod case;
pub mod cli;
pub mod layers;
pub mod markdown;
pub mod naive;
pub mod plot;
pub mod report;
pub mod suite;
