//! The checks made so far, each printed with its evidence as it is made.

use std::time::{Duration, Instant};

pub struct Report {
    results: Vec<(String, bool)>,
    start: Instant,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            results: Vec::new(),
            start: Instant::now(),
        }
    }
}

impl Report {
    /// Records and prints one check; `Ok` carries its evidence.
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        let at = self.start.elapsed().as_secs();
        let (ok, text) = match &result {
            Ok(evidence) => (true, evidence.as_str()),
            Err(why) => (false, why.as_str()),
        };
        println!("[{at:>4}s] {} {name}", if ok { "ok  " } else { "FAIL" });
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            println!("          {line}");
        }
        self.results.push((name.to_string(), ok));
        ok
    }

    /// A heading for the checks that follow.
    pub fn part(&self, title: &str) {
        println!("[{:>4}s] ---- {title}", self.start.elapsed().as_secs());
    }

    pub fn passed(&self) -> usize {
        self.results.len() - self.failed()
    }

    pub fn failed(&self) -> usize {
        self.results.iter().filter(|(_, ok)| !ok).count()
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Retries `f` every two seconds for up to `within`.
pub fn eventually<T>(
    within: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}
