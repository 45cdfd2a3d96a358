//! A packet capture on an interface with tcpdump, for tests that must show what crosses
//! the wire (and what does not).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestPod;

pub struct Capture {
    child: Child,
    file: PathBuf,
}

/// What was captured.
pub struct Captured {
    /// One line per packet: `tcpdump -nn` summaries.
    pub packets: String,
    /// Packet contents as ASCII (`tcpdump -A`).
    pub ascii: String,
}

impl Capture {
    /// Starts capturing `filter` on `pod`'s `eth0`, the wire between it and the other
    /// pods (a capture on the bridge device itself would not see switched frames);
    /// returns once tcpdump listens.
    pub fn on_pod(pod: &TestPod, filter: &str, dir: &std::path::Path) -> Capture {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns_name, "tcpdump", "-i", "eth0"]);
        Self::start(cmd, &pod.netns_name, filter, dir)
    }

    /// Starts capturing `filter` on the host side of `pod`'s veth: what leaves the pod,
    /// seen from the node, whatever the pod's own netns does.
    pub fn on_host_veth(pod: &TestPod, filter: &str, dir: &std::path::Path) -> Capture {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", &pod.host_veth()]);
        Self::start(cmd, &format!("{}-host", pod.netns_name), filter, dir)
    }

    /// Starts capturing `filter` with `cmd` (a tcpdump command naming its interface),
    /// into `<dir>/<name>.pcap`; returns once tcpdump listens.
    pub fn start(mut cmd: Command, name: &str, filter: &str, dir: &std::path::Path) -> Capture {
        let file = dir.join(format!("{name}.pcap"));
        let log = dir.join(format!("{name}.tcpdump.log"));
        let child = cmd
            .args(["--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("tcpdump log"))
            .spawn()
            .expect("tcpdump (install the tcpdump package)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { child, file }
    }

    /// Stops the capture and reads it back.
    pub fn stop(mut self) -> Captured {
        // On SIGINT tcpdump breaks out of its loop and drops what is still in its ring
        // buffer: first wait until the capture file stops growing.
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = size();
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = size();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let read = |extra: &[&str]| {
            let out = Command::new("tcpdump")
                .args(["-nn", "-r"])
                .arg(&self.file)
                .args(extra)
                .stderr(Stdio::null())
                .output()
                .expect("tcpdump -r");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        Captured {
            packets: read(&[]),
            ascii: read(&["-A"]),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
