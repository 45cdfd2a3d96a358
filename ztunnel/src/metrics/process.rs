//! The standard process metrics (`process_open_fds`, `process_max_fds`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_cpu_seconds_total`, `process_start_time_seconds`), read from `/proc/self`
//! at each scrape. A value that cannot be read is left out, never made up.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector {
    ticks_per_second: f64,
    page_size: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        use nix::unistd::{sysconf, SysconfVar};
        let get = |v, default: i64| sysconf(v).ok().flatten().unwrap_or(default) as f64;
        ProcessCollector {
            ticks_per_second: get(SysconfVar::CLK_TCK, 100),
            page_size: get(SysconfVar::PAGE_SIZE, 4096),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// The fields of `/proc/self/stat` after the command name, which may itself hold
/// spaces and parentheses.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// What `/proc/self/stat` gives: (cpu seconds, start ticks since boot, virtual bytes,
/// resident pages).
fn parse_stat(stat: &str, ticks_per_second: f64) -> Option<(f64, f64, f64, f64)> {
    let f = stat_fields(stat);
    // After the name, field 3 (state) is at index 0.
    let num = |field: usize| -> Option<f64> { f.get(field - 3)?.parse::<f64>().ok() };
    let cpu = (num(14)? + num(15)?) / ticks_per_second;
    Some((cpu, num(22)?, num(23)?, num(24)?))
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn max_fds(limits: &str) -> Option<f64> {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some((cpu, start_ticks, vsize, rss_pages)) =
                parse_stat(&stat, self.ticks_per_second)
            {
                let c = ConstCounter::new(cpu);
                c.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds",
                    None,
                    c.metric_type(),
                )?)?;
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    vsize,
                )?;
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    rss_pages * self.page_size,
                )?;
                if let Some(boot) = boot_time() {
                    gauge(
                        &mut encoder,
                        "process_start_time_seconds",
                        "Start time of the process since the epoch, in seconds",
                        boot + start_ticks / self.ticks_per_second,
                    )?;
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .as_deref()
            .and_then(max_fds)
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_limits_are_read_past_odd_command_names() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 1000 123456789 2000 18446744073709551615";
        let (cpu, start, vsize, rss) = parse_stat(stat, 100.0).unwrap();
        assert_eq!((cpu, start, vsize, rss), (3.0, 1000.0, 123456789.0, 2000.0));
        assert_eq!(parse_stat("garbage", 100.0), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024.0));
    }
}
