//! A loop with a timer armed sleeps until the timer is due. In a file of
//! its own: it counts the context switches of the one loop thread this
//! process runs (tests in one file share the process).

mod util;

use std::time::Duration;

use util::*;

/// Voluntary plus involuntary context switches of this process's thread
/// named `name`.
fn switches_of(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        let count = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        return Some(count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:"));
    }
    None
}

/// With `idle_timeout(60 s)` and one idle connection, the loop sleeps
/// until the timer is due (it used to wake 20 times a second).
#[test]
fn a_loop_with_a_timer_armed_sleeps_until_it_is_due() {
    if cfg!(not(target_os = "linux")) {
        eprintln!("SKIPPED: counts context switches from /proc (Linux only)");
        return;
    }
    each_backend(|b| {
        let server = b
            .threads(1)
            .idle_timeout(Duration::from_secs(60))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let mut s = connect(server.local_addr());
        write_frame(&mut s, b"hi");
        assert_eq!(read_frame(&mut s).unwrap(), b"hi");
        std::thread::sleep(Duration::from_millis(100));
        let before = switches_of("wharf-loop-0").expect("the loop thread");
        std::thread::sleep(Duration::from_secs(2));
        let after = switches_of("wharf-loop-0").expect("the loop thread");
        eprintln!(
            "loop wake-ups in 2 s with one idle connection: {}",
            after - before
        );
        assert!(
            after - before <= 4,
            "the loop woke {} times in 2 s with nothing due",
            after - before
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
