//! Rows with their derived figures, the printed table and the JSON records.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::bench::Measurement;
use crate::case::{Case, Implementation, Mode};

/// One row of the report: the JSON record of `--json` (these fields exactly) and the table line.
/// `torch_bench.py --json` writes the same records for PyTorch; reading them back
/// ([`read_json`]) takes a `null` figure as NaN and a missing `command` or `cpu` as empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `S1`..`S6`, or `custom`.
    pub case: String,
    /// The tensor shape.
    pub shape: Vec<usize>,
    /// The reduced axes.
    pub axes: Vec<usize>,
    /// The element type of the data: `f32`, `bf16`, `f16` or `f64`.
    pub dtype: String,
    /// `train`, `eval` or `backward`.
    pub mode: String,
    /// `macro`, `runtime`, `naive` or `copy`.
    pub implementation: String,
    /// Threads of the Rayon pool the row ran on.
    pub threads: usize,
    /// The SIMD backend of the layers.
    pub backend: String,
    /// Median time of one call, in nanoseconds.
    pub median_ns: u64,
    /// Fastest call, in nanoseconds.
    pub min_ns: u64,
    /// Slowest call, in nanoseconds.
    pub max_ns: u64,
    /// Effective bandwidth: the bytes the mode must move at least (2x the tensor forward, 3x
    /// backward) over the median time, in GB/s (1e9 bytes per second).
    #[serde(deserialize_with = "nan_if_null")]
    pub gbps: f64,
    /// Throughput as a fraction of the copy's: copy median / this median (1.0 = as fast as
    /// copying the same number of bytes, the memory-bandwidth limit).
    #[serde(deserialize_with = "nan_if_null")]
    pub copy_ratio: f64,
    /// Speedup over the naive baseline: naive median / this median.
    #[serde(deserialize_with = "nan_if_null")]
    pub naive_speedup: f64,
    /// The command line that measured the row, so that a table made from the records can say
    /// how to reproduce it.
    #[serde(default)]
    pub command: String,
    /// The model name of the CPU that ran it (`/proc/cpuinfo`, as `lscpu` shows it).
    #[serde(default)]
    pub cpu: String,
    /// Speedup of the macro layer over the runtime-generic one (macro rows only; not in JSON).
    #[serde(skip)]
    pub macro_speedup: Option<f64>,
    /// A fused epilogue's cost: its median / the plain runtime layer's (relu and add-relu rows
    /// only; not in JSON).
    #[serde(skip)]
    pub plain_ratio: Option<f64>,
}

#[cfg(test)]
impl Row {
    /// A row for unit tests: one call of `median_ns` (min and max alike), `f32` on 2 threads of
    /// AVX2, the ratios neutral (copy 1, naive NaN, none of the in-memory ones), no command or
    /// CPU; a test sets what it checks on top.
    pub(crate) fn for_test(
        case: &str,
        shape: &[usize],
        axes: &[usize],
        mode: &str,
        implementation: &str,
        median_ns: u64,
    ) -> Row {
        Row {
            case: case.into(),
            shape: shape.to_vec(),
            axes: axes.to_vec(),
            dtype: "f32".into(),
            mode: mode.into(),
            implementation: implementation.into(),
            threads: 2,
            backend: "avx2".into(),
            median_ns,
            min_ns: median_ns,
            max_ns: median_ns,
            gbps: 1.0,
            copy_ratio: 1.0,
            naive_speedup: f64::NAN,
            command: String::new(),
            cpu: String::new(),
            macro_speedup: None,
            plain_ratio: None,
        }
    }
}

/// JSON has no NaN: serde_json writes a NaN figure (a ratio without its reference row) as
/// `null`, and `torch_bench.py` writes `null` for the figures it has none of.
fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// The model name of this machine's CPU as `lscpu` shows it (the first `model name` of
/// `/proc/cpuinfo`), or `unknown CPU`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// Bytes a mode moves at least on a case.
pub fn traffic_bytes(case: &Case, mode: Mode) -> u64 {
    (case.len() * case.dtype.bytes() * mode.traffic_factor()) as u64
}

/// Derives the rows of the report from the measurements; `command` is the command line that
/// made them (see [`Row::command`]).
pub fn rows(measurements: &[Measurement], threads: usize, backend: &str, command: &str) -> Vec<Row> {
    let cpu = cpu_model();
    let median = |m: &Measurement, imp: Implementation| {
        measurements
            .iter()
            .find(|o| o.case == m.case && o.mode == m.mode && o.implementation == imp)
            .map(|o| o.timing.median_ns as f64)
    };
    measurements
        .iter()
        .map(|m| {
            let t = m.timing.median_ns as f64;
            let ratio = |imp| median(m, imp).map_or(f64::NAN, |other| other / t);
            let macro_speedup = (m.implementation == Implementation::Macro)
                .then(|| ratio(Implementation::Runtime))
                .filter(|r| r.is_finite());
            let plain_ratio = matches!(m.implementation, Implementation::Relu | Implementation::AddRelu)
                .then(|| median(m, Implementation::Runtime).map_or(f64::NAN, |rt| t / rt))
                .filter(|r| r.is_finite());
            Row {
                case: m.case.name.clone(),
                shape: m.case.shape.clone(),
                axes: m.case.axes.clone(),
                dtype: m.case.dtype.name().to_string(),
                mode: m.mode.name().to_string(),
                implementation: m.implementation.name().to_string(),
                threads,
                backend: backend.to_string(),
                median_ns: m.timing.median_ns,
                min_ns: m.timing.min_ns,
                max_ns: m.timing.max_ns,
                gbps: traffic_bytes(&m.case, m.mode) as f64 / t,
                // Our time over the copy's: 1.10x is 10% slower than moving the bytes.
                copy_ratio: median(m, Implementation::Copy).map_or(f64::NAN, |copy| t / copy),
                naive_speedup: ratio(Implementation::Naive),
                command: command.to_string(),
                cpu: cpu.clone(),
                macro_speedup,
                plain_ratio,
            }
        })
        .collect()
}

/// A duration in nanoseconds, written with a unit that keeps 3 significant digits.
pub fn format_ns(ns: u64) -> String {
    let v = ns as f64;
    if v < 1e3 {
        format!("{ns} ns")
    } else if v < 1e6 {
        format!("{:.3} µs", v / 1e3)
    } else if v < 1e9 {
        format!("{:.3} ms", v / 1e6)
    } else {
        format!("{:.3} s", v / 1e9)
    }
}

fn format_ratio(r: f64) -> String {
    if !r.is_finite() {
        "-".to_string()
    } else if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The table as printed: a header with the cases, threads and backend, then one line per row,
/// a blank line between (case, mode) groups.
pub fn table(rows: &[Row], cases: &[Case], threads: usize, backend: &str) -> String {
    let mut s = String::new();
    let dtype = cases.first().map_or("f32", |c| c.dtype.name());
    let _ = writeln!(s, "bn-bench: {dtype}, {threads} thread(s), backend {backend}");
    for case in cases {
        let _ = writeln!(s, "  {}", case.describe());
    }
    let _ = writeln!(s);
    let epilogues = rows.iter().any(|r| r.plain_ratio.is_some());
    let mut header =
        vec!["case", "mode", "impl", "median", "min .. max", "GB/s", "x copy", "vs naive", "macro/rt"];
    if epilogues {
        header.push("x plain");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.case.clone(),
                r.mode.clone(),
                r.implementation.clone(),
                format_ns(r.median_ns),
                format!("{} .. {}", format_ns(r.min_ns), format_ns(r.max_ns)),
                format!("{:.2}", r.gbps),
                format_ratio(r.copy_ratio),
                format_ratio(r.naive_speedup),
                r.macro_speedup.map_or_else(String::new, format_ratio),
            ];
            if epilogues {
                cells.push(r.plain_ratio.map_or_else(String::new, format_ratio));
            }
            cells
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Text columns left-aligned, figures right-aligned.
    let line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cols.iter().zip(&widths).enumerate() {
            let pad = w - c.chars().count();
            if i > 0 {
                l.push_str("  ");
            }
            if i < 3 {
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            } else {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(s, "{}", line(&header));
    let mut last_group: Option<(&str, &str)> = None;
    for (r, c) in rows.iter().zip(&cells) {
        let group = (r.case.as_str(), r.mode.as_str());
        if last_group.is_some_and(|g| g != group) {
            let _ = writeln!(s);
        }
        last_group = Some(group);
        let cols: Vec<&str> = c.iter().map(String::as_str).collect();
        let _ = writeln!(s, "{}", line(&cols));
    }
    let _ = writeln!(
        s,
        "\nGB/s: bytes the mode must move (2x tensor forward, 3x backward) / median. \
         x copy: median / copy median (1.00x = at the memory-bandwidth limit).\nvs naive: naive median / median. \
         macro/rt: runtime-generic median / macro median."
    );
    if epilogues {
        let _ = writeln!(
            s,
            "x plain: a fused epilogue's median / the plain runtime layer's (relu = activation relu, \
             add-relu = relu(bn(x) + residual))."
        );
    }
    s
}

/// Writes the rows as a JSON array of records.
pub fn write_json(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(rows).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// Reads the records [`write_json`] (or `torch_bench.py --json`) wrote.
pub fn read_json(path: &Path) -> std::io::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}
