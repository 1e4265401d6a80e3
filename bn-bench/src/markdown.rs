//! `bn-bench markdown`: the Markdown performance table of a `--json` run (and of a
//! `torch_bench.py --json` run beside it), so that a table in the docs is printed, never typed.
//!
//! One line per case in the order of the run: our layer's median per mode, its ratio to the copy
//! of the same run, and PyTorch's median over ours where PyTorch's records are given. A header
//! line names the commands and the machine that produced the records; a suite run
//! (`--suite`) also gets each layer's count and the suite's summary line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::case::{Implementation, Mode, STANDARD_SHAPES};
use crate::report::{cpu_model, format_ns, read_json, Row};
use crate::suite;

/// Which of our layers the table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LayerChoice {
    /// The `#[batch_norm]` layer where the run has it (standard shapes), else the runtime layer.
    #[default]
    Macro,
    /// The runtime-generic `batchnorm::BatchNorm` everywhere.
    Runtime,
}

/// What `bn-bench markdown` prints the table of.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MarkdownOptions {
    /// Our records: a `bn-bench --json` run
    #[arg(long, value_name = "OURS.json")]
    pub from: PathBuf,
    /// PyTorch's records of the same cases (`torch_bench.py --json`), for a PyTorch / ours column
    #[arg(long, value_name = "TORCH.json")]
    pub torch: Option<PathBuf>,
    /// Which of our layers each line shows: macro (the #[batch_norm] layer where the run has it,
    /// else the runtime layer) or runtime
    #[arg(long, value_enum, default_value_t = LayerChoice::Macro)]
    pub layer: LayerChoice,
}

/// Reads the records the options name and returns the table.
pub fn run(options: &MarkdownOptions) -> Result<String, String> {
    let read = |path: &Path| read_json(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let ours = read(&options.from)?;
    if ours.is_empty() {
        return Err(format!("{} has no records", options.from.display()));
    }
    let torch = options.torch.as_deref().map(read).transpose()?;
    Ok(table(&ours, torch.as_deref(), options.layer))
}

/// The cases of `rows` in the order of their first row, with their shape and axes.
fn cases(rows: &[Row]) -> Vec<(&str, &[usize], &[usize])> {
    let mut out: Vec<(&str, &[usize], &[usize])> = Vec::new();
    for r in rows {
        if !out.iter().any(|(_, s, a)| *s == r.shape.as_slice() && *a == r.axes.as_slice()) {
            out.push((r.case.as_str(), &r.shape, &r.axes));
        }
    }
    out
}

fn find<'a>(rows: &'a [Row], shape: &[usize], axes: &[usize], mode: Mode, imp: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.shape == shape && r.axes == axes && r.mode == mode.name() && r.implementation == imp)
}

/// `32x64x56x56`, with the layout's name for a standard shape or a suite layer.
fn shape_cell(name: &str, shape: &[usize], axes: &[usize]) -> String {
    let dims = shape.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("x");
    let layout = STANDARD_SHAPES
        .iter()
        .find(|s| s.shape == shape && s.axes == axes)
        .map(|s| s.layout)
        .or_else(|| suite::layer_of(name, shape).map(|_| "NCHW"));
    match layout {
        Some(layout) => format!("{layout} {dims}"),
        None => format!("{dims}, axes {axes:?}"),
    }
}

fn ratios(values: &[Option<f64>]) -> String {
    values
        .iter()
        .map(|v| v.filter(|r| r.is_finite()).map_or("-".to_string(), |r| format!("{r:.2}")))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Where the records came from: their command (or a note that they do not say).
fn command_of(rows: &[Row], fallback: &str) -> String {
    match rows.iter().map(|r| r.command.as_str()).find(|c| !c.is_empty()) {
        Some(c) => format!("`{c}`"),
        None => format!("{fallback} (the records do not name their command)"),
    }
}

/// The machine of the records: their `cpu`, or this machine's where they do not say.
fn cpu_of(rows: &[Row]) -> String {
    match rows.iter().map(|r| r.cpu.as_str()).find(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => format!("{} (read where this table was printed: the records do not say)", cpu_model()),
    }
}

/// The Markdown table of our rows `ours` (a `bn-bench --json` run), with PyTorch's ratios when
/// `torch` (a `torch_bench.py --json` run) is given. `layer` picks which of our layers a line
/// shows; the line says which it shows.
pub fn table(ours: &[Row], torch: Option<&[Row]>, layer: LayerChoice) -> String {
    let mut s = String::new();
    let first = ours.first();
    let (dtype, threads, backend) =
        first.map_or(("f32", 0, ""), |r| (r.dtype.as_str(), r.threads, r.backend.as_str()));
    let _ = write!(
        s,
        "Measured with {} ({dtype}, {threads} thread(s), backend {backend})",
        command_of(ours, "bn-bench")
    );
    if let Some(torch) = torch {
        let (t_threads, t_backend) = torch.first().map_or((0, ""), |r| (r.threads, r.backend.as_str()));
        let _ =
            write!(s, " and {} ({t_threads} thread(s), {t_backend})", command_of(torch, "torch_bench.py"));
    }
    let _ = write!(s, " on {}", cpu_of(ours));
    if let Some(torch_cpu) = torch.and_then(|t| t.iter().map(|r| r.cpu.as_str()).find(|c| !c.is_empty())) {
        if torch_cpu != cpu_of(ours) {
            let _ = write!(s, " (PyTorch's records: {torch_cpu})");
        }
    }
    s.push_str(".\n\n");

    let suite = suite::suite_of(ours);
    let mut header = vec!["case", "shape"];
    if suite.is_some() {
        header.push("layers");
    }
    header.extend(["layer", "train", "eval", "backward", "x copy (train / eval / backward)"]);
    if torch.is_some() {
        header.push("PyTorch / ours (train / eval / backward)");
    }
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let align: Vec<&str> = header
        .iter()
        .map(|h| if ["train", "eval", "backward"].contains(h) { "--:" } else { "---" })
        .collect();
    let _ = writeln!(s, "|{}|", align.join("|"));

    for (name, shape, axes) in cases(ours) {
        let has_macro = Mode::ALL.iter().any(|&m| find(ours, shape, axes, m, "macro").is_some());
        let imp = match layer {
            LayerChoice::Macro if has_macro => Implementation::Macro,
            _ => Implementation::Runtime,
        };
        let rows: Vec<Option<&Row>> =
            Mode::ALL.iter().map(|&m| find(ours, shape, axes, m, imp.name())).collect();
        let mut cells = vec![name.to_string(), shape_cell(name, shape, axes)];
        if suite.is_some() {
            cells.push(suite::layer_of(name, shape).map_or(String::new(), |(_, l)| l.count.to_string()));
        }
        cells.push(imp.name().to_string());
        for r in &rows {
            cells.push(r.map_or("-".to_string(), |r| format_ns(r.median_ns)));
        }
        cells.push(ratios(&rows.iter().map(|r| r.map(|r| r.copy_ratio)).collect::<Vec<_>>()));
        if let Some(torch) = torch {
            let vs: Vec<Option<f64>> = Mode::ALL
                .iter()
                .zip(&rows)
                .map(|(&m, r)| {
                    let t = find(torch, shape, axes, m, "pytorch").filter(|t| t.dtype == dtype)?;
                    Some(t.median_ns as f64 / r.as_ref()?.median_ns as f64)
                })
                .collect();
            cells.push(ratios(&vs));
        }
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    if let Some(suite) = suite {
        let _ = writeln!(s, "\n{}", suite::summary(suite, ours, Implementation::Runtime.name(), torch));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(case: &str, shape: &[usize], axes: &[usize], mode: Mode, imp: &str, median_ns: u64) -> Row {
        Row {
            copy_ratio: median_ns as f64 / 1000.0,
            command: "bn-bench --case S1 --json ours.json".into(),
            cpu: "Test CPU".into(),
            ..Row::for_test(case, shape, axes, mode.name(), imp, median_ns)
        }
    }

    #[test]
    fn one_line_per_case_with_copy_and_pytorch_ratios() {
        let (s1, a1) = (&[256, 1024][..], &[0][..]);
        let mut ours = Vec::new();
        for m in Mode::ALL {
            ours.push(row("S1", s1, a1, m, "macro", 2000));
            ours.push(row("S1", s1, a1, m, "runtime", 2500));
            ours.push(row("S1", s1, a1, m, "copy", 1000));
        }
        let torch = vec![row("S1", s1, a1, Mode::Train, "pytorch", 8000)];
        let text = table(&ours, Some(&torch), LayerChoice::Macro);
        assert!(
            text.starts_with("Measured with `bn-bench --case S1 --json ours.json` (f32, 2 thread(s)"),
            "{text}"
        );
        assert!(text.contains("on Test CPU."), "{text}");
        assert!(
            text.contains("| S1 | NC 256x1024 | macro | 2.000 µs | 2.000 µs | 2.000 µs | 2.00 / 2.00 / 2.00 | 4.00 / - / - |"),
            "{text}"
        );
        let runtime = table(&ours, None, LayerChoice::Runtime);
        assert!(runtime.contains("| S1 | NC 256x1024 | runtime | 2.500 µs |"), "{runtime}");
        assert!(!runtime.contains("PyTorch"), "{runtime}");
    }
}
