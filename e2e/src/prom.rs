//! Reading Prometheus text exposition in tests: samples with their labels, and sums
//! over the samples that match some labels.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample in `text` (comments skipped). Panics on a line that is not a sample:
/// a scrape a Prometheus server would reject is a test failure.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("not a Prometheus sample: {l:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        // name="value",… with \" \\ \n escapes in values, up to the closing brace.
        loop {
            inner = inner.trim_start_matches(',');
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_eq) = inner.split_once('=')?;
            let mut value = String::new();
            let mut chars = after_eq.strip_prefix('"')?.char_indices();
            let consumed = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i + 1,
                    other => value.push(other),
                }
            };
            labels.insert(key.to_string(), value);
            inner = &after_eq[1 + consumed..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The sum of `name`'s samples whose labels include every pair of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# TYPE a counter\na_total 3\nb{x=\"1\",y=\"q\\\"uote\"} 2.5\nb{x=\"2\"} 1\n";
        let s = samples(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[1].labels["y"], "q\"uote");
        assert_eq!(sum(text, "b", &[]), 3.5);
        assert_eq!(sum(text, "b", &[("x", "2")]), 1.0);
        assert_eq!(sum(text, "b", &[("x", "3")]), 0.0);
    }
}
