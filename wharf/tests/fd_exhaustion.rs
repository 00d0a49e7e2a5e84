//! Running out of descriptors (EMFILE): the server neither spins nor stops
//! serving, and accepts again soon after descriptors are freed. The server
//! runs in a child process with a low RLIMIT_NOFILE.
// Windows has no RLIMIT_NOFILE (and no /proc): the tests skip there.
#![cfg_attr(windows, allow(dead_code, unused_imports))]

mod util;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// The child: a server limited to 64 descriptors, until stdin closes.
#[cfg(unix)]
#[test]
#[ignore = "runs only as the child of fd_exhaustion_backs_off_serves_and_recovers"]
fn child_server_with_64_descriptors() {
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: setrlimit reads the struct we pass; nothing else is involved.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let server = wharf::Server::builder()
        .threads(1)
        .bind("127.0.0.1:0")
        .unwrap()
        .start(Echo::default())
        .unwrap();
    println!("ADDR {}", server.local_addr());
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    let stats = server.handle().stats();
    println!("PAUSES {} REFUSED {}", stats.accept_pauses, stats.refused);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Sends one frame and waits up to `wait` for its echo.
fn echoes(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    if std::io::Write::write_all(s, &frame(b"ping")).is_err() {
        return false;
    }
    matches!(read_frame(s), Ok(m) if m == b"ping")
}

#[cfg(windows)]
#[test]
fn fd_exhaustion_backs_off_serves_and_recovers() {
    eprintln!(
        "SKIPPED: fd_exhaustion_backs_off_serves_and_recovers: Windows has no \
         RLIMIT_NOFILE to run a server out of handles, nor /proc to read its CPU time"
    );
}

#[cfg(unix)]
#[test]
fn fd_exhaustion_backs_off_serves_and_recovers() {
    each_backend_kind(|backend| {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_server_with_64_descriptors",
                "--nocapture",
            ])
            .env("WHARF_BACKEND", format!("{backend:?}").to_lowercase())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let addr: SocketAddr = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
            if let Some(a) = line.trim().strip_prefix("ADDR ") {
                break a.parse().unwrap();
            }
        };
        // More clients than the child has descriptors.
        let mut clients: Vec<TcpStream> = (0..120).map(|_| connect(addr)).collect();
        std::thread::sleep(Duration::from_millis(500));
        let served: Vec<usize> = (0..clients.len())
            .filter(|&i| echoes(&mut clients[i], Duration::from_millis(300)))
            .collect();
        eprintln!(
            "{backend:?}: {} of {} clients served while exhausted",
            served.len(),
            clients.len()
        );
        assert!(served.len() >= 20 && served.len() < clients.len());
        // Exhausted: the server must not spin.
        let (t0, c0) = (Instant::now(), cpu_ticks(child.id()));
        std::thread::sleep(Duration::from_secs(2));
        let ticks = cpu_ticks(child.id()) - c0;
        // SAFETY: sysconf takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64();
        eprintln!(
            "{backend:?}: CPU while exhausted {:.1}% of a core",
            cpu * 100.0
        );
        assert!(
            cpu < 0.05,
            "{:.1}% of a core while out of descriptors",
            cpu * 100.0
        );
        // Existing connections keep working.
        for &i in served.iter().take(5) {
            assert!(
                echoes(&mut clients[i], Duration::from_secs(2)),
                "client {i} stopped being served"
            );
        }
        // Free some descriptors: a new client is served within a second.
        for i in served.iter().rev().take(10) {
            let _ = clients[*i].shutdown(std::net::Shutdown::Both);
        }
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let mut late = connect(addr);
        assert!(
            echoes(&mut late, Duration::from_secs(1)),
            "not accepting 1 s after descriptors were freed"
        );
        eprintln!("{backend:?}: accepted again after {:?}", t.elapsed());
        drop(clients);
        drop(late);
        drop(child.stdin.take());
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "child failed: {rest}");
        let pauses: u64 = rest
            .split_whitespace()
            .skip_while(|w| *w != "PAUSES")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(pauses > 0, "accepting never paused: {rest}");
    });
}
