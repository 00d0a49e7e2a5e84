//! A server under test as a child process: `wharf peer KIND`, started from
//! the bench's own executable, so that its CPU time and memory are its own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::os;
use crate::peers::ServerKind;

/// How long a server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit once its standard input closes.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A running server. Dropping it stops it.
pub(crate) struct Server {
    child: Child,
    /// Closing it tells the server to exit.
    stdin: Option<ChildStdin>,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Whether its connections are descriptors it holds (uring-best's are
    /// direct descriptors, in its ring).
    counted_by_fds: bool,
}

impl Server {
    /// Starts `kind` on a free loopback port, pinned to `cpu` if given,
    /// with `extra` options of `wharf peer` (`--broadcast`, `--group`,
    /// `--cluster URL`).
    pub(crate) fn start(
        exe: &Path,
        kind: ServerKind,
        cpu: Option<usize>,
        extra: &[String],
    ) -> Result<Server, String> {
        let mut cmd = Command::new(exe);
        cmd.arg("peer")
            .arg(kind.name())
            .args(["--addr", "127.0.0.1:0"]);
        if let Some(cpu) = cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        cmd.args(extra);
        if kind == ServerKind::WharfUringBasic {
            cmd.env("WHARF_URING_DISABLE", wharf::URING_OPTIONAL_FEATURES);
        }
        // The name says the backend; the variable would override it.
        cmd.env_remove("WHARF_BACKEND")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        // Read the first line on a thread, so a silent child cannot hang us.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep reading (and dropping) so the child never blocks on stdout.
            let mut sink = String::new();
            while matches!(reader.read_line(&mut sink), Ok(n) if n > 0) {
                sink.clear();
            }
        });
        let mut server = Server {
            child,
            stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            counted_by_fds: kind != ServerKind::UringBest,
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(format!("{}: cannot read its address: {e}", kind.name())),
            Err(_) => return Err(format!("{} printed no address", kind.name())),
        };
        server.addr = line.trim().parse().map_err(|_| {
            let status = server.child.try_wait().ok().flatten();
            match status {
                Some(st) => format!("{} exited at start ({st})", kind.name()),
                None => format!("{} printed {:?}, not an address", kind.name(), line.trim()),
            }
        })?;
        Ok(server)
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) so far.
    pub(crate) fn cpu_secs(&self) -> Option<f64> {
        os::cpu_secs(self.pid())
    }

    /// Resident memory (VmRSS) in KiB.
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        os::rss_kib(self.pid()).map(|(rss, _)| rss)
    }

    /// Open descriptors; none where its connections hold none.
    pub(crate) fn open_fds(&self) -> Option<usize> {
        if !self.counted_by_fds {
            return None;
        }
        os::open_fds(self.pid())
    }

    /// Waits until the server holds `n` more descriptors than `before`
    /// (its accepted connections), up to `timeout`. True when it does;
    /// also true, after a pause, where descriptors cannot be counted (not
    /// Linux, or uring-best).
    pub(crate) fn wait_for_fds(&self, before: Option<usize>, n: usize, timeout: Duration) -> bool {
        let Some(before) = before else {
            thread::sleep(Duration::from_millis(500));
            return true;
        };
        let until = Instant::now() + timeout;
        loop {
            match self.open_fds() {
                Some(now) if now >= before + n => return true,
                None => return false,
                _ => {}
            }
            if Instant::now() >= until {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it: closes its standard input, then kills it if it lingers.
    pub(crate) fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < until {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.stop_now();
        }
    }
}
