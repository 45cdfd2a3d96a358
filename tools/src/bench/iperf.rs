//! iperf3 between two pods: a server kept running in one pod's netns, clients run in
//! the other's, results read from iperf3's JSON.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What one client run moved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transfer {
    /// Bytes the server received.
    pub bytes: f64,
    pub seconds: f64,
}

impl Transfer {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes * 8.0 / self.seconds / 1e9
    }
}

/// Reads a client's `--json` output: what the receiving side counted.
pub fn parse_client_json(text: &str) -> anyhow::Result<Transfer> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 output is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().context("no end.sum_received.bytes")?;
    let seconds = sum["seconds"]
        .as_f64()
        .context("no end.sum_received.seconds")?;
    if seconds <= 0.0 {
        bail!("iperf3 reported a run of {seconds} s");
    }
    Ok(Transfer { bytes, seconds })
}

/// An iperf3 server in a pod's netns; killed on drop.
pub struct Server {
    child: Child,
    netns: String,
    pub port: u16,
}

impl Server {
    pub fn start(netns: &str, port: u16) -> anyhow::Result<Server> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "--server", "--port"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (is it installed? `cargo xtask setup`)")?;
        let mut server = Server {
            child,
            netns: netns.into(),
            port,
        };
        server.wait_listening()?;
        Ok(server)
    }

    /// Looks at the pod's sockets rather than connecting: a test connection would go
    /// through ztunnel and count in its figures.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{}", self.port);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("iperf3 server exited: {status}");
            }
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "ss", "-Hltn", &filter])
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("iperf3 server in {} is not listening", self.netns)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client in `netns` against `server`:`port` for `seconds` with `streams`
/// parallel streams.
pub fn client(
    netns: &str,
    server: IpAddr,
    port: u16,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<Transfer> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iperf3", "--json", "--client"])
        .arg(server.to_string())
        .args(["--port", &port.to_string()])
        .args(["--parallel", &streams.to_string()])
        .args(["--time", &seconds.to_string()])
        .output()
        .context("running iperf3")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_client_json(&text).with_context(|| {
        format!(
            "iperf3 client in {netns} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_receivers_sum() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bytes":2000,"seconds":1.0},
            "sum_received":{"bytes":1250000000,"seconds":2.0,"bits_per_second":5e9}}}"#;
        let t = parse_client_json(json).unwrap();
        assert_eq!(t.bytes, 1.25e9);
        assert!((t.gbit_per_s() - 5.0).abs() < 1e-9);
        let err = parse_client_json(r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(err.to_string().contains("unable to connect"));
        assert!(parse_client_json("not json").is_err());
        assert!(parse_client_json(r#"{"end":{}}"#).is_err());
    }
}
