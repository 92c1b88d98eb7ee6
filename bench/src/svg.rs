//! Horizontal grouped bar charts as standalone SVG: one group per row label, one bar
//! per series, the value printed at the end of each bar.

use std::fmt::Write as _;

pub struct Chart {
    pub title: String,
    pub unit: String,
    pub series: Vec<String>,
    /// Row label, then one value per series (`None`: not measured).
    pub rows: Vec<(String, Vec<Option<f64>>)>,
}

const COLORS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];
const LABEL_WIDTH: f64 = 250.0;
const PLOT_WIDTH: f64 = 560.0;
const BAR: f64 = 14.0;
const GAP: f64 = 10.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    pub fn render(&self) -> String {
        let max = self
            .rows
            .iter()
            .flat_map(|(_, v)| v.iter().flatten())
            .fold(0.0f64, |a, &b| a.max(b))
            .max(f64::MIN_POSITIVE);
        let group = BAR * self.series.len() as f64 + GAP;
        let top = 50.0 + 18.0 * self.series.len().div_ceil(3) as f64;
        let height = top + group * self.rows.len() as f64 + 20.0;
        let width = LABEL_WIDTH + PLOT_WIDTH + 90.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
            escape(&self.title)
        );
        for (i, name) in self.series.iter().enumerate() {
            let x = 10.0 + (i % 3) as f64 * 260.0;
            let y = 38.0 + (i / 3) as f64 * 18.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                y - 10.0,
                COLORS[i % COLORS.len()],
                x + 16.0,
                y,
                escape(name)
            );
        }
        for (r, (label, values)) in self.rows.iter().enumerate() {
            let y0 = top + r as f64 * group;
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_WIDTH - 8.0,
                y0 + BAR * self.series.len() as f64 / 2.0 + 4.0,
                escape(label)
            );
            for (i, value) in values.iter().enumerate() {
                let y = y0 + i as f64 * BAR;
                let Some(v) = value else { continue };
                let w = (v / max * PLOT_WIDTH).max(1.0);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{LABEL_WIDTH}" y="{y}" width="{w:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{}" font-size="10">{} {}</text>"#,
                    BAR - 2.0,
                    COLORS[i % COLORS.len()],
                    LABEL_WIDTH + w + 4.0,
                    y + BAR - 4.0,
                    format_value(*v),
                    escape(&self.unit)
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_bar_and_escapes_labels() {
        let chart = Chart {
            title: "a < b".into(),
            unit: "ns".into(),
            series: vec!["x".into(), "y".into()],
            rows: vec![
                ("r1".into(), vec![Some(10.0), Some(20.0)]),
                ("r2".into(), vec![None, Some(5.0)]),
            ],
        };
        let svg = chart.render();
        assert_eq!(svg.matches("<rect x=\"250\"").count(), 3);
        assert!(svg.contains("a &lt; b"));
        assert!(svg.contains(">20.0 ns<"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
