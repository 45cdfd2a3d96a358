//! Logging: `tracing` to stdout (plain or JSON lines), with levels that can be changed
//! while ztunnel runs (admin `/logging`, as Istio's): `RUST_LOG` at startup, then
//! directives merged in (`<level>` for the default, `<target>=<level>` or
//! `<target>:<level>` for one target), or reset to the startup levels.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The live log levels.
pub struct LogLevels {
    handle: reload::Handle<EnvFilter, Registry>,
    initial: String,
    current: Mutex<String>,
}

/// Installs the global subscriber (`json`: one JSON object per line) and returns the
/// handle on its levels.
pub fn init(json: bool) -> Arc<LogLevels> {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&initial));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(protocol::logging::colours_here()))
            .init();
    }
    Arc::new(LogLevels {
        handle,
        current: Mutex::new(initial.clone()),
        initial,
    })
}

/// One directive in `target=level` form (or a bare level); an error names what is
/// wrong with it.
fn directive(clause: &str) -> Result<String, String> {
    let clause = clause.trim();
    if LEVELS.contains(&clause) {
        return Ok(clause.to_string());
    }
    let (target, level) = clause
        .rsplit_once('=')
        .or_else(|| clause.rsplit_once(':'))
        .filter(|(t, _)| !t.is_empty() && !t.ends_with(':'))
        .ok_or_else(|| format!("{clause:?} is neither a level nor <target>:<level>"))?;
    if !LEVELS.contains(&level) {
        return Err(format!(
            "{level:?} in {clause:?} is not a level (one of {})",
            LEVELS.join(", ")
        ));
    }
    Ok(format!("{target}={level}"))
}

fn target_of(directive: &str) -> Option<&str> {
    directive.split_once('=').map(|(t, _)| t)
}

/// `current` with the directives of `change` merged in: a bare level replaces the
/// default level, a target's directive replaces that target's.
pub fn merge(current: &str, change: &str) -> Result<String, String> {
    let mut out: Vec<String> = current
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    for clause in change.split(',').filter(|c| !c.trim().is_empty()) {
        let d = directive(clause)?;
        match target_of(&d) {
            None => out.retain(|x| target_of(x).is_some()),
            Some(t) => out.retain(|x| target_of(x) != Some(t)),
        }
        out.push(d);
    }
    let merged = out.join(",");
    EnvFilter::try_new(&merged).map_err(|e| format!("{merged:?}: {e}"))?;
    Ok(merged)
}

impl LogLevels {
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies `change` (after going back to the startup levels, with `reset`);
    /// returns the levels now in force.
    pub fn set(&self, reset: bool, change: &str) -> Result<String, String> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let base = if reset {
            self.initial.clone()
        } else {
            current.clone()
        };
        let merged = merge(&base, change)?;
        self.handle
            .reload(EnvFilter::new(&merged))
            .map_err(|e| format!("reloading the log filter: {e}"))?;
        tracing::info!(levels = %merged, "log levels changed");
        *current = merged.clone();
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn directives_merge_by_target_and_bad_ones_are_refused() {
        assert_eq!(
            merge("info", "ztunnel::inpod=debug").unwrap(),
            "info,ztunnel::inpod=debug"
        );
        assert_eq!(
            merge("info", "ztunnel::inpod:debug").unwrap(),
            "info,ztunnel::inpod=debug"
        );
        assert_eq!(
            merge("info,ztunnel::inpod=debug", "ztunnel::inpod=warn,trace").unwrap(),
            "ztunnel::inpod=warn,trace"
        );
        assert_eq!(merge("warn,access=info", "").unwrap(), "warn,access=info");
        for bad in ["loud", "ztunnel::inpod=loud", "=debug", "ztunnel::inpod"] {
            assert!(merge("info", bad).is_err(), "{bad}");
        }
    }
}
