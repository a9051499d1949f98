//! Reading a Prometheus text exposition (what `/metrics` answers).

use std::collections::BTreeMap;

/// Value of one series (exact name with labels, e.g. `x_total{result="success"}`).
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sums a counter over several expositions, by the value of one of its labels.
pub fn sum_by_label(expositions: &[String], metric: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let needle = format!("{label}=\"");
    for text in expositions {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(metric) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('{') else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Some(v) = labels
                .split_once(&needle)
                .and_then(|(_, after)| after.split_once('"'))
                .map(|(v, _)| v)
            else {
                continue;
            };
            let n = value.trim().parse::<f64>().unwrap_or(0.0);
            *out.entry(v.to_string()).or_default() += n as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total x\n\
        x_total{result=\"success\",mode=\"a\"} 3\n\
        x_total{result=\"failed\",mode=\"a\"} 1\n\
        x_total{result=\"success\",mode=\"b\"} 2\n\
        y 7\n";

    #[test]
    fn a_series_is_found_by_its_exact_name() {
        assert_eq!(metric(TEXT, "y"), Some(7.0));
        assert_eq!(
            metric(TEXT, "x_total{result=\"failed\",mode=\"a\"}"),
            Some(1.0)
        );
        assert_eq!(metric(TEXT, "x"), None);
    }

    #[test]
    fn a_counter_is_summed_by_label_over_expositions() {
        let sums = sum_by_label(&[TEXT.to_string(), TEXT.to_string()], "x_total", "result");
        assert_eq!(sums.get("success"), Some(&10));
        assert_eq!(sums.get("failed"), Some(&2));
    }
}
