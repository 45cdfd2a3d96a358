//! The benchmark's results: rows of figures, each maybe with a target; rendered as a
//! Markdown table, JSON and an SVG chart of how far each figure is from its target.

use serde::Serialize;

/// Which way a target points.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// What a target is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum On {
    /// ours / direct.
    Ratio,
    /// Our figure itself.
    Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Target {
    pub bound: Bound,
    pub on: On,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub test: String,
    pub unit: String,
    /// The same figure on the direct path, measured in the same run.
    pub direct: Option<f64>,
    pub ours: f64,
    pub target: Option<Target>,
}

impl Row {
    pub fn new(test: &str, unit: &str, direct: Option<f64>, ours: f64) -> Row {
        Row {
            test: test.into(),
            unit: unit.into(),
            direct,
            ours,
            target: None,
        }
    }

    pub fn target(mut self, bound: Bound, on: On) -> Row {
        self.target = Some(Target { bound, on });
        self
    }

    /// ours / direct.
    pub fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0).map(|d| self.ours / d)
    }

    /// The figure the target is about.
    fn checked(&self) -> Option<f64> {
        match self.target?.on {
            On::Ratio => self.ratio(),
            On::Value => Some(self.ours),
        }
    }

    /// How far from the target: ≤ 1 is met (figure/bound for "at most", bound/figure
    /// for "at least").
    pub fn score(&self) -> Option<f64> {
        let v = self.checked()?;
        Some(match self.target?.bound {
            Bound::AtMost(0.0) => {
                if v <= 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            }
            Bound::AtMost(b) => v / b,
            Bound::AtLeast(_) if v <= 0.0 => f64::INFINITY,
            Bound::AtLeast(b) => b / v,
        })
    }

    pub fn met(&self) -> Option<bool> {
        let v = self.checked()?;
        Some(match self.target?.bound {
            Bound::AtLeast(b) => v >= b,
            Bound::AtMost(b) => v <= b,
        })
    }

    fn target_text(&self) -> String {
        let Some(t) = self.target else {
            return String::new();
        };
        let (sign, b) = match t.bound {
            Bound::AtLeast(b) => ("≥", b),
            Bound::AtMost(b) => ("≤", b),
        };
        match t.on {
            On::Ratio => format!("{sign} {}× direct", num(b)),
            On::Value => format!("{sign} {} {}", num(b), self.unit),
        }
    }
}

/// A figure with about three significant digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub title: String,
    /// What the run was: machine, mode, parameters.
    pub context: Vec<(String, String)>,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        for (k, v) in &self.context {
            out.push_str(&format!("- {k}: {v}\n"));
        }
        out.push_str("\n| test | direct | ours | ours / direct | target | met |\n");
        out.push_str("|---|---:|---:|---:|---|:-:|\n");
        for r in &self.rows {
            let unit = |v: f64| format!("{} {}", num(v), r.unit).trim_end().to_string();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.test,
                r.direct.map(unit).unwrap_or_default(),
                unit(r.ours),
                r.ratio()
                    .map(|x| format!("{}×", num(x)))
                    .unwrap_or_default(),
                r.target_text(),
                match r.met() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                }
            ));
        }
        let targeted: Vec<&Row> = self.rows.iter().filter(|r| r.target.is_some()).collect();
        let met = targeted.iter().filter(|r| r.met() == Some(true)).count();
        out.push_str(&format!("\n{met} of {} targets met.\n", targeted.len()));
        out
    }

    pub fn json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["ratio"] = serde_json::json!(r.ratio());
                v["met"] = serde_json::json!(r.met());
                v
            })
            .collect();
        let context: serde_json::Map<String, serde_json::Value> = self
            .context
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "title": self.title,
            "context": context,
            "rows": rows,
        }))
        .unwrap_or_default()
    }

    /// A bar per targeted row: its distance to the target (figure/target for "at
    /// most", target/figure for "at least"), the line at 1 being the target; green
    /// bars are met.
    pub fn svg(&self) -> String {
        let rows: Vec<(&Row, f64)> = self
            .rows
            .iter()
            .filter_map(|r| Some((r, r.score()?)))
            .collect();
        let (label_w, bar_w, row_h, top) = (330.0, 420.0, 24.0, 48.0);
        let max = rows
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| s.is_finite())
            .fold(2.0f64, f64::max)
            .min(10.0);
        let x = |s: f64| label_w + bar_w * (s.min(max) / max);
        let height = top + row_h * rows.len() as f64 + 30.0;
        let width = label_w + bar_w + 200.0;
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
             <text x=\"10\" y=\"38\" fill=\"#555\">bar: figure against its target (left of the line: met)</text>\n",
            escape(&self.title)
        );
        for (i, (r, s)) in rows.iter().enumerate() {
            let y = top + row_h * i as f64;
            let color = if r.met() == Some(true) {
                "#3a9d5d"
            } else {
                "#d0503c"
            };
            let figure = match r.target.map(|t| t.on) {
                Some(On::Ratio) => r.ratio().map(|v| format!("{}×", num(v))),
                _ => Some(format!("{} {}", num(r.ours), r.unit).trim_end().to_string()),
            }
            .unwrap_or_default();
            out.push_str(&format!(
                "<text x=\"10\" y=\"{ty}\">{label}</text>\n\
                 <rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{color}\"/>\n\
                 <text x=\"{tx:.1}\" y=\"{ty}\">{figure} (target {target})</text>\n",
                ty = y + 15.0,
                label = escape(&r.test),
                w = (x(*s) - label_w).max(1.0),
                h = row_h - 6.0,
                tx = x(*s) + 6.0,
                figure = escape(&figure),
                target = escape(&r.target_text()),
            ));
        }
        let line = x(1.0);
        out.push_str(&format!(
            "<line x1=\"{line:.1}\" y1=\"{}\" x2=\"{line:.1}\" y2=\"{}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">target</text>\n</svg>\n",
            top - 4.0,
            top + row_h * rows.len() as f64,
            line - 18.0,
            top + row_h * rows.len() as f64 + 16.0,
        ));
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            title: "t".into(),
            context: vec![("cpus".into(), "2".into())],
            rows: vec![
                Row::new("iperf3, 1 stream", "Gbit/s", Some(10.0), 4.5)
                    .target(Bound::AtLeast(0.40), On::Ratio),
                Row::new("rr p50", "µs", Some(20.0), 60.0).target(Bound::AtMost(2.5), On::Ratio),
                Row::new("per pod", "kB", None, 4.0).target(Bound::AtMost(20.0), On::Value),
                Row::new("threads per pod", "", None, 0.0).target(Bound::AtMost(0.0), On::Value),
                Row::new("idle RSS", "MB", None, 7.5),
            ],
        }
    }

    #[test]
    fn targets_are_checked_on_the_right_figure() {
        let r = report();
        assert_eq!(r.rows[0].met(), Some(true));
        assert!((r.rows[0].score().unwrap() - 0.40 / 0.45).abs() < 1e-9);
        assert_eq!(r.rows[1].met(), Some(false), "3x is over 2.5x");
        assert!((r.rows[1].score().unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(r.rows[2].met(), Some(true));
        assert_eq!(r.rows[3].met(), Some(true));
        assert_eq!(r.rows[3].score(), Some(0.0));
        assert_eq!(r.rows[4].met(), None);
    }

    #[test]
    fn renders_table_json_and_chart() {
        let r = report();
        let md = r.markdown();
        assert!(md.contains(
            "| iperf3, 1 stream | 10.0 Gbit/s | 4.50 Gbit/s | 0.450× | ≥ 0.400× direct | yes |"
        ));
        assert!(md.contains("| rr p50 | 20.0 µs | 60.0 µs | 3.00× | ≤ 2.50× direct | **no** |"));
        assert!(md.contains("3 of 4 targets met."));
        let json: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(json["rows"][1]["met"], false);
        assert_eq!(json["rows"][0]["ratio"], 0.45);
        assert_eq!(json["context"]["cpus"], "2");
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 4, "one bar per target");
        assert!(svg.contains("#d0503c"), "the unmet target is red");
    }
}
