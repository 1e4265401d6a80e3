//! A `--quick` run on a tiny custom shape writes one JSON record per row with every field, and
//! the SVG plot.

use bn_bench::cli::main_with_args;
use serde_json::Value;

#[test]
fn quick_run_writes_json_records_and_a_plot() {
    let dir = std::env::temp_dir().join(format!("bn-bench-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("rows.json");
    let svg = dir.join("rows.svg");
    let code = main_with_args([
        "--quick",
        "--shape",
        "4x8x3x3",
        "--layout",
        "nchw",
        "--threads",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let rows: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    let rows = rows.as_array().expect("a JSON array of records");
    // A custom shape: the runtime-generic layer, the naive baseline and the copy, in 3 modes.
    assert_eq!(rows.len(), 9);
    let fields = [
        "case",
        "dtype",
        "shape",
        "axes",
        "mode",
        "implementation",
        "threads",
        "backend",
        "median_ns",
        "min_ns",
        "max_ns",
        "gbps",
        "copy_ratio",
        "naive_speedup",
        "command",
        "cpu",
    ];
    let mut seen = Vec::new();
    for row in rows {
        let object = row.as_object().expect("each record is an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = fields.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected, "exactly the documented fields");
        assert_eq!(row["case"], "custom");
        assert_eq!(row["shape"], serde_json::json!([4, 8, 3, 3]));
        assert_eq!(row["axes"], serde_json::json!([0, 2, 3]));
        assert_eq!(row["threads"], 2);
        let command = row["command"].as_str().expect("command is a string");
        assert!(
            command.starts_with("bn-bench --shape 4x8x3x3 --axes 0,2,3 --threads 2 --quick --json "),
            "{command}"
        );
        assert!(!row["cpu"].as_str().expect("cpu is a string").is_empty());
        assert!(!row["backend"].as_str().expect("backend is a string").is_empty());
        let (min, median, max) = (
            row["min_ns"].as_u64().unwrap(),
            row["median_ns"].as_u64().unwrap(),
            row["max_ns"].as_u64().unwrap(),
        );
        assert!(min <= median && median <= max && median > 0, "{row}");
        for f in ["gbps", "copy_ratio", "naive_speedup"] {
            let v = row[f].as_f64().unwrap_or_else(|| panic!("{f} is a number in {row}"));
            assert!(v.is_finite() && v > 0.0, "{f} = {v}");
        }
        let implementation = row["implementation"].as_str().unwrap();
        if implementation == "copy" {
            assert!((row["copy_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        }
        if implementation == "naive" {
            assert!((row["naive_speedup"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        }
        seen.push((row["mode"].as_str().unwrap().to_string(), implementation.to_string()));
    }
    for mode in ["train", "eval", "backward"] {
        for implementation in ["runtime", "naive", "copy"] {
            assert!(
                seen.contains(&(mode.to_string(), implementation.to_string())),
                "{mode} {implementation}"
            );
        }
    }
    let read = bn_bench::report::read_json(&json).expect("the records read back");
    assert_eq!(read.len(), 9);
    let options = bn_bench::markdown::MarkdownOptions {
        from: json.clone(),
        torch: Some(json.clone()),
        layer: bn_bench::markdown::LayerChoice::Macro,
    };
    let markdown = bn_bench::markdown::run(&options).expect("a table of the records");
    assert!(markdown.starts_with("Measured with `bn-bench --shape 4x8x3x3"), "{markdown}");
    assert!(markdown.contains("| custom | 4x8x3x3, axes [0, 2, 3] | runtime |"), "{markdown}");
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg") && svg_text.contains("bandwidth ceiling"));
    std::fs::remove_dir_all(&dir).ok();
}
