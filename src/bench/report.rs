//! One scenario's figures, printed as `scenario key=value ...` or JSON.

use std::time::Duration;

pub struct Report {
    scenario: &'static str,
    figures: Vec<(String, String)>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            figures: Vec::new(),
        }
    }

    pub fn add(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Report {
        self.figures.push((key.to_owned(), value.to_string()));
        self
    }

    /// Adds `KEY_p50_ms`, `KEY_p90_ms`, `KEY_p99_ms` (keys `p50_ms`... when
    /// `prefix` is empty).
    pub fn percentiles(&mut self, prefix: &str, samples: &mut [Duration]) -> &mut Report {
        samples.sort_unstable();
        for p in [50, 90, 99] {
            let key = if prefix.is_empty() {
                format!("p{p}_ms")
            } else {
                format!("{prefix}_p{p}_ms")
            };
            self.add(&key, format!("{:.2}", ms(percentile(samples, p))));
        }
        self
    }

    pub fn line(&self) -> String {
        let mut line = self.scenario.to_owned();
        for (k, v) in &self.figures {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }

    pub fn json(&self) -> String {
        let mut out = format!("{{\"scenario\":\"{}\"", self.scenario);
        for (k, v) in &self.figures {
            if v.parse::<f64>().is_ok() {
                out.push_str(&format!(",\"{k}\":{v}"));
            } else {
                out.push_str(&format!(",\"{k}\":\"{}\"", v.replace('"', "\\\"")));
            }
        }
        out.push('}');
        out
    }
}

pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (sorted.len() * p)
        .div_ceil(100)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    sorted[i]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, took: Duration) -> String {
    format!("{:.1}", bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_output() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        samples.reverse();
        let mut r = Report::new("x");
        r.add("n", 100).percentiles("", &mut samples);
        assert_eq!(r.line(), "x n=100 p50_ms=50.00 p90_ms=90.00 p99_ms=99.00");
        assert_eq!(
            r.json(),
            "{\"scenario\":\"x\",\"n\":100,\"p50_ms\":50.00,\"p90_ms\":90.00,\"p99_ms\":99.00}"
        );
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }
}
