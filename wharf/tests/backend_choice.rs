//! `Backend::Auto` falls back to poll where io_uring is blocked, as a
//! container's seccomp profile blocks it, and serves correctly there.

mod util;

use std::time::Duration;

use util::*;
use wharf::{Backend, Server};

/// Blocks `io_uring_setup` for this thread and the threads it starts, the
/// way Docker's default seccomp profile does (EPERM).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn block_io_uring() {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let ld_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| libc::sock_filter {
        code: jeq,
        jt,
        jf,
        k,
    };
    let filter = [
        stmt(ld_abs, 4), // seccomp_data.arch
        jump(AUDIT_ARCH_X86_64, 0, 3),
        stmt(ld_abs, 0), // seccomp_data.nr
        jump(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls; `prog` and `filter` outlive them (the kernel
    // copies the program).
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _
            ),
            0,
            "installing the seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs inside the child process started by the test below (ignored in an
/// ordinary run: it changes the process for good).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
#[ignore = "runs only as the child of auto_falls_back_to_poll_when_io_uring_is_blocked"]
fn child_with_io_uring_blocked() {
    block_io_uring();
    // io_uring really is gone.
    let err = Server::builder()
        .backend(Backend::Uring)
        .start(Echo::default())
        .expect_err("io_uring must be refused under the filter");
    eprintln!("explicit uring under seccomp: {err}");
    let server = Server::builder()
        .backend(Backend::Auto)
        .threads(2)
        .bind("127.0.0.1:0")
        .unwrap()
        .start(Echo::default())
        .unwrap();
    assert_eq!(server.backend(), Backend::Poll);
    let mut s = connect(server.local_addr());
    for i in 0..100 {
        let body = pattern(i, i * 37);
        write_frame(&mut s, &body);
        assert_eq!(read_frame(&mut s).unwrap(), body);
    }
    drop(s);
    server.shutdown(Duration::from_secs(2)).unwrap();
    println!("CHILD OK: Auto chose {:?}", Backend::Poll);
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn auto_falls_back_to_poll_when_io_uring_is_blocked() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_with_io_uring_blocked",
            "--nocapture",
        ])
        .env_remove("WHARF_BACKEND")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD OK"),
        "child did not run:\n{stdout}\n{stderr}"
    );
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
#[test]
fn auto_falls_back_to_poll_when_io_uring_is_blocked() {
    eprintln!(
        "SKIPPED: auto_falls_back_to_poll_when_io_uring_is_blocked: io_uring and the \
         seccomp filter that blocks it exist only on Linux (x86_64 here)"
    );
}

#[test]
fn auto_picks_the_platform_default_and_env_overrides() {
    let server = Server::builder().start(Echo::default()).unwrap();
    let expected = match std::env::var("WHARF_BACKEND").as_deref() {
        Ok("poll") => Backend::Poll,
        _ if cfg!(target_os = "linux") => Backend::Uring,
        _ if cfg!(windows) => Backend::Iocp,
        _ => Backend::Poll,
    };
    assert_eq!(server.backend(), expected);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Runs inside the child process started below, with `WHARF_URING_DISABLE`
/// naming one io_uring feature the probe must treat as missing.
#[test]
#[ignore = "runs only as the child of auto_falls_back_when_an_io_uring_feature_is_missing"]
fn child_with_an_io_uring_feature_missing() {
    let feature = std::env::var("WHARF_URING_DISABLE").expect("set by the parent");
    let server = Server::builder()
        .bind("127.0.0.1:0")
        .unwrap()
        .start(Echo::default())
        .unwrap();
    assert_eq!(
        server.backend(),
        Backend::Poll,
        "Auto chose io_uring without {feature}"
    );
    let mut s = connect(server.local_addr());
    write_frame(&mut s, b"served");
    assert_eq!(read_frame(&mut s).unwrap(), b"served");
    server.shutdown(Duration::from_secs(1)).unwrap();
    // Asked for by name, io_uring fails to start with a clear error.
    let e = Server::builder()
        .backend(Backend::Uring)
        .start(Echo::default())
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
    println!("CHILD OK: {e}");
}

/// A kernel of 5.10 to 5.18 has the opcode numbers but not buffer rings,
/// multishot accept or cancel-by-descriptor: `Auto` must see that (the
/// probe tries each for real) and fall back to poll. Each missing feature
/// is injected in turn.
#[cfg(target_os = "linux")]
#[test]
fn auto_falls_back_when_an_io_uring_feature_is_missing() {
    for feature in ["buf_ring", "multishot_accept", "cancel_fd"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_with_an_io_uring_feature_missing",
                "--nocapture",
            ])
            .env_remove("WHARF_BACKEND")
            .env("WHARF_URING_DISABLE", feature)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{feature}: child failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("CHILD OK"),
            "{feature}: child did not run:\n{stdout}\n{stderr}"
        );
    }
}
