//! `--plot PATH.svg`: GB/s per case, one panel per mode, one bar per implementation, the copy of
//! the same bytes drawn as the ceiling over each group.
//!
//! plotters with its SVG backend only: no system font library (the text is SVG `<text>`).

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::case::Implementation;
use crate::report::Row;

/// Bar colours of the implementations drawn as bars.
const BARS: [(Implementation, RGBColor); 3] = [
    (Implementation::Macro, RGBColor(0x1f, 0x77, 0xb4)),
    (Implementation::Runtime, RGBColor(0x2c, 0xa0, 0x2c)),
    (Implementation::Naive, RGBColor(0xd6, 0x27, 0x28)),
];

fn unique(values: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// One legend for all panels, centred in a strip under the title: the implementations that have
/// rows, then the copy.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let font = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut entries: Vec<(String, Option<RGBColor>)> = BARS
        .iter()
        .filter(|(imp, _)| rows.iter().any(|r| r.implementation == imp.name()))
        .map(|(imp, color)| (imp.name().to_string(), Some(*color)))
        .collect();
    if rows.iter().any(|r| r.implementation == Implementation::Copy.name()) {
        entries.push(("copy of the same bytes (bandwidth ceiling)".to_string(), None));
    }
    let widths: Vec<i32> = entries.iter().map(|(label, _)| 26 + 8 * label.len() as i32 + 24).collect();
    let (w, h) = area.dim_in_pixel();
    let mut x = (w as i32 - widths.iter().sum::<i32>()).max(0) / 2;
    let y = h as i32 / 2;
    for ((label, color), width) in entries.iter().zip(&widths) {
        match color {
            Some(c) => area.draw(&Rectangle::new([(x, y - 7), (x + 18, y + 7)], c.filled()))?,
            None => area.draw(&PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(3)))?,
        }
        area.draw(&Text::new(label.clone(), (x + 26, y), font.clone()))?;
        x += width;
    }
    Ok(())
}

/// Draws the rows into an SVG file at `path`.
pub fn write_svg(path: &Path, rows: &[Row], title: &str) -> Result<(), Box<dyn Error>> {
    let modes = unique(rows.iter().map(|r| r.mode.clone()));
    let cases = unique(rows.iter().map(|r| r.case.clone()));
    if modes.is_empty() {
        return Err("nothing to plot".into());
    }
    let n = cases.len();
    let width = (330 + 150 * n as u32).max(900);
    let panel_height = 330;
    let root = SVGBackend::new(path, (width, 80 + panel_height * modes.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (legend, root) = root.split_vertically(34);
    draw_legend(&legend, rows)?;
    let find = |case: &str, mode: &str, imp: Implementation| {
        rows.iter().find(|r| r.case == case && r.mode == mode && r.implementation == imp.name())
    };
    // The x axis runs in integer units, GROUP per case, ticks at the group centres (an f64 axis
    // with chosen key points has no label formatter in plotters 0.3).
    const GROUP: i32 = 100;
    let case_label = |v: &i32| {
        let i = (v / GROUP) as usize;
        if v % GROUP == GROUP / 2 && i < n {
            cases[i].clone()
        } else {
            String::new()
        }
    };
    let bar_width = 80 / BARS.len() as i32;
    for (panel, mode) in root.split_evenly((modes.len(), 1)).iter().zip(&modes) {
        // A logarithmic GB/s axis: the naive baseline, the layers and a cache-resident copy of
        // a tiny tensor span three orders of magnitude.
        let values: Vec<f64> = rows
            .iter()
            .filter(|r| &r.mode == mode)
            .map(|r| r.gbps)
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let (vmin, vmax) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (ymin, ymax) =
            if vmax > 0.0 { (10f64.powf((vmin / 1.5).log10().floor()), vmax * 2.5) } else { (0.1, 10.0) };
        let x_range =
            (0..GROUP * n as i32).with_key_points((0..n as i32).map(|i| i * GROUP + GROUP / 2).collect());
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{mode}: GB/s, log scale (higher is better)"), ("sans-serif", 17))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range, (ymin..ymax).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&case_label)
            .x_label_style(("sans-serif", 15))
            .y_desc("GB/s")
            .y_label_formatter(&|v| format!("{v}"))
            .light_line_style(WHITE)
            .draw()?;
        let value_style =
            TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        // The left edge of the bar of `imp` in group `i`: the bars present are centred.
        let bar_x = |i: usize, case: &str, imp: Implementation| {
            let present: Vec<Implementation> =
                BARS.iter().map(|b| b.0).filter(|&b| find(case, mode, b).is_some()).collect();
            let k = present.iter().position(|&b| b == imp)? as i32;
            Some(i as i32 * GROUP + (GROUP - present.len() as i32 * bar_width) / 2 + k * bar_width)
        };
        for (imp, color) in BARS.iter() {
            let bars: Vec<(i32, f64)> = cases
                .iter()
                .enumerate()
                .filter_map(|(i, case)| Some((bar_x(i, case, *imp)?, find(case, mode, *imp)?.gbps)))
                .collect();
            if bars.is_empty() {
                continue;
            }
            let color = *color;
            chart.draw_series(
                bars.iter()
                    .map(|&(x0, v)| Rectangle::new([(x0, ymin), (x0 + bar_width - 2, v)], color.filled())),
            )?;
            chart.draw_series(bars.iter().map(|&(x0, v)| {
                Text::new(format!("{v:.1}"), (x0 + bar_width / 2 - 1, v), value_style.clone())
            }))?;
        }
        let ceilings: Vec<(i32, f64)> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, case)| {
                find(case, mode, Implementation::Copy).map(|r| (i as i32 * GROUP, r.gbps))
            })
            .collect();
        if !ceilings.is_empty() {
            chart.draw_series(ceilings.iter().map(|&(x, v)| {
                PathElement::new(vec![(x + 5, v), (x + GROUP - 5, v)], BLACK.stroke_width(3))
            }))?;
            let copy_style =
                TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Right, VPos::Bottom));
            chart.draw_series(
                ceilings
                    .iter()
                    .map(|&(x, v)| Text::new(format!("copy {v:.1}"), (x + GROUP - 5, v), copy_style.clone())),
            )?;
        }
    }
    root.present()?;
    Ok(())
}
