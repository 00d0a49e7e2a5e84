//! `wharf files` and `wharf fetch` from outside: files fetched byte-exact
//! (one, several over several connections), and every way out of the
//! root refused (`..`, absolute paths, a symbolic link that leads out,
//! NUL, non-UTF-8) while the connection stays usable — on io_uring and
//! poll.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `wharf files` process, killed when dropped.
struct Files {
    child: Child,
    addr: String,
}

impl Files {
    fn start(backend: &str, root: &Path) -> Files {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["files", "--addr", "127.0.0.1:0", "--backend", backend])
            .args(["--duration", "120", "--root"])
            .arg(root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start wharf files");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_owned();
        Files { child, addr }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backends() -> Vec<&'static str> {
    if cfg!(target_os = "linux") {
        vec!["uring", "poll"]
    } else {
        vec!["poll"]
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Tree {
    base: PathBuf,
    root: PathBuf,
}

impl Tree {
    /// root/{a.bin, empty, sub/b.bin, inside -> a.bin, out -> ../secret},
    /// and base/secret beside the root.
    fn new(test: &str) -> Tree {
        let base = std::env::temp_dir().join(format!("wharf-files-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.bin"), bytes(1, 3 << 20)).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("sub/b.bin"), bytes(2, 70_000)).unwrap();
        std::fs::write(base.join("secret"), b"not for you").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("a.bin", root.join("inside")).unwrap();
            std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
            std::os::unix::fs::symlink(base.join("secret"), root.join("abs-out")).unwrap();
        }
        Tree { base, root }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// One request on `s`: the status byte and the rest of the answer.
fn ask(s: &mut TcpStream, request: &[u8]) -> (u8, Vec<u8>) {
    let mut wire = (request.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(request);
    s.write_all(&wire).unwrap();
    let mut header = [0u8; 4];
    s.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).unwrap();
    (body[0], body[1..].to_vec())
}

#[test]
fn fetch_gets_files_byte_exact() {
    let tree = Tree::new("fetch");
    for backend in backends() {
        let server = Files::start(backend, &tree.root);
        let one = tree.base.join(format!("one-{backend}"));
        let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["fetch", &server.addr, "a.bin", "--out"])
            .arg(&one)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{said} {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(said.contains("fetched 1 file(s), 3145728 bytes"), "{said}");
        assert!(said.contains("MB/s"), "{said}");
        assert!(
            std::fs::read(&one).unwrap() == bytes(1, 3 << 20),
            "{backend}: a.bin differs"
        );
        // Several, over several connections.
        let dir = tree.base.join(format!("many-{backend}"));
        let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args([
                "fetch",
                &server.addr,
                "a.bin",
                "sub/b.bin",
                "empty",
                "./a.bin",
            ])
            .args(["--connections", "3", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(std::fs::read(dir.join("a.bin")).unwrap() == bytes(1, 3 << 20));
        assert!(std::fs::read(dir.join("b.bin")).unwrap() == bytes(2, 70_000));
        assert!(std::fs::read(dir.join("empty")).unwrap().is_empty());
        // A refused path fails the command, saying why.
        let run = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["fetch", &server.addr, "../secret", "--out"])
            .arg(tree.base.join("nothing"))
            .output()
            .unwrap();
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.contains("../secret: refused: the path has a .. component"),
            "{err}"
        );
        assert!(!tree.base.join("nothing").exists());
    }
}

#[test]
fn every_way_out_of_the_root_is_refused_and_the_connection_stays_usable() {
    let tree = Tree::new("escape");
    let abs = tree.base.join("secret");
    let mut escapes: Vec<(Vec<u8>, &str)> = vec![
        (b"../secret".to_vec(), "the path has a .. component"),
        (b"sub/../../secret".to_vec(), "the path has a .. component"),
        (b"sub/..".to_vec(), "the path has a .. component"),
        (
            abs.to_str().unwrap().as_bytes().to_vec(),
            "the path is absolute",
        ),
        (b"/etc/passwd".to_vec(), "the path is absolute"),
        (b"a.bin\0.txt".to_vec(), "the path holds a NUL byte"),
        (b"a\xff\xfe.bin".to_vec(), "the path is not UTF-8"),
        (b"".to_vec(), "the path is empty"),
        (b"missing".to_vec(), "no such file"),
        (b"sub".to_vec(), "no such file"),
    ];
    if cfg!(unix) {
        escapes.push((b"out".to_vec(), "the path leads outside the root"));
        escapes.push((b"abs-out".to_vec(), "the path leads outside the root"));
    }
    for backend in backends() {
        let server = Files::start(backend, &tree.root);
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for (request, why) in &escapes {
            let (status, body) = ask(&mut s, request);
            assert_eq!(
                status,
                1,
                "{backend}: {:?} was not refused",
                String::from_utf8_lossy(request)
            );
            assert_eq!(
                String::from_utf8_lossy(&body),
                *why,
                "{:?}",
                String::from_utf8_lossy(request)
            );
            // Still usable: a good request on the same connection.
            let (status, body) = ask(&mut s, b"sub/b.bin");
            assert_eq!(status, 0);
            assert!(body == bytes(2, 70_000));
        }
        if cfg!(unix) {
            // A link that stays inside is followed.
            let (status, body) = ask(&mut s, b"inside");
            assert_eq!(status, 0);
            assert!(body == bytes(1, 3 << 20));
        }
        // A request over the limit is a framing error: the connection
        // closes (the limit is checked before anything is buffered).
        let mut wire = 5000u32.to_be_bytes().to_vec();
        wire.extend_from_slice(&[b'a'; 5000]);
        s.write_all(&wire).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "an answer to an oversized request");
    }
}
