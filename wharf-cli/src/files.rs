//! Files over wharf: the server behind `wharf files` and the client behind
//! `wharf fetch`.
//!
//! The protocol, over length-prefixed framing (4-byte big-endian length):
//! a request is one message holding a path relative to the server's root
//! (UTF-8); the answer is one message whose first byte says what follows:
//! [`FOUND`] and the file's bytes, or [`REFUSED`] and why (UTF-8). Requests
//! may be pipelined; answers come in their order.
//!
//! The server sends each file with `Conn::send_file` (no copy through user
//! space where the backend allows), raw with its own header: requests are
//! held to [`MAX_REQUEST`] bytes while an answer may be as large as the
//! header can say (a file just under 4 GiB). Paths are resolved on the
//! worker pool (the file system may block), in order per connection.

use std::error::Error;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wharf::{Conn, FileRange, Framing, Handler};

/// The answer's first byte: the file follows.
pub const FOUND: u8 = 0;
/// The answer's first byte: a refusal follows (UTF-8).
pub const REFUSED: u8 = 1;
/// The largest request (a path) the server reads.
pub const MAX_REQUEST: usize = 4096;

/// The framing of requests (answers are sent raw, with their own header).
pub fn framing() -> Framing {
    Framing::length_prefixed().max_frame(MAX_REQUEST).into()
}

/// Why a path is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request is not UTF-8.
    NotUtf8,
    /// The path holds a NUL byte.
    Nul,
    /// The path is empty.
    Empty,
    /// The path is absolute (or has a root or a drive).
    Absolute,
    /// The path has a `..` component.
    Parent,
    /// The path leads outside the root (through a symbolic link).
    Outside,
    /// Nothing there, or not a regular file.
    NotAFile,
    /// Larger than an answer can carry.
    TooLarge,
    /// The file system said no.
    Io(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotUtf8 => f.write_str("the path is not UTF-8"),
            Refusal::Nul => f.write_str("the path holds a NUL byte"),
            Refusal::Empty => f.write_str("the path is empty"),
            Refusal::Absolute => f.write_str("the path is absolute"),
            Refusal::Parent => f.write_str("the path has a .. component"),
            Refusal::Outside => f.write_str("the path leads outside the root"),
            Refusal::NotAFile => f.write_str("no such file"),
            Refusal::TooLarge => f.write_str("the file is too large for one answer"),
            Refusal::Io(e) => write!(f, "cannot read the file: {e}"),
        }
    }
}

/// The file a request names, under `root` (canonical): checked by its
/// words first (UTF-8, no NUL, relative, no `..`), then by where it
/// really is once symbolic links are followed.
pub fn resolve(root: &Path, request: &[u8]) -> Result<PathBuf, Refusal> {
    let text = std::str::from_utf8(request).map_err(|_| Refusal::NotUtf8)?;
    if text.contains('\0') {
        return Err(Refusal::Nul);
    }
    if text.is_empty() {
        return Err(Refusal::Empty);
    }
    let path = Path::new(text);
    // A leading slash or backslash is a root on every platform we serve.
    if path.is_absolute() || path.has_root() || text.starts_with(['/', '\\']) {
        return Err(Refusal::Absolute);
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::Parent),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
        }
    }
    if cfg!(windows) && text.split(['/', '\\']).any(|c| c == "..") {
        return Err(Refusal::Parent);
    }
    let real = root
        .join(path)
        .canonicalize()
        .map_err(|_| Refusal::NotAFile)?;
    if !real.starts_with(root) {
        return Err(Refusal::Outside);
    }
    if !real.is_file() {
        return Err(Refusal::NotAFile);
    }
    Ok(real)
}

/// The answer to one request: the file (its header and status byte as
/// the prefix), or a refusal.
fn answer(root: &Path, request: &[u8]) -> Result<FileRange, Refusal> {
    let path = resolve(root, request)?;
    let file = File::open(&path).map_err(|e| Refusal::Io(e.to_string()))?;
    let range = FileRange::new(file).map_err(|e| Refusal::Io(e.to_string()))?;
    let len = u32::try_from(range.len() + 1).map_err(|_| Refusal::TooLarge)?;
    if len == u32::MAX {
        return Err(Refusal::TooLarge);
    }
    let mut prefix = len.to_be_bytes().to_vec();
    prefix.push(FOUND);
    Ok(range.prefix(prefix).raw())
}

/// The server of `wharf files`: serves the files under its root.
pub struct FileServer {
    root: Arc<PathBuf>,
    /// Requests refused so far.
    pub refused: Arc<AtomicU64>,
}

impl FileServer {
    /// Serves what is under `root`.
    pub fn new(root: &Path) -> io::Result<FileServer> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(FileServer {
            root: Arc::new(root),
            refused: Arc::default(),
        })
    }
}

impl Handler for FileServer {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        let root = self.root.clone();
        let refused = self.refused.clone();
        let request = msg.to_vec();
        let submitted = conn.submit(move || {
            let answer = answer(&root, &request);
            move |conn: &mut Conn<'_, ()>| {
                let sent = match answer {
                    Ok(file) => conn.send_file(file),
                    Err(why) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(conn = %conn.id(), %why, "refused a request");
                        let mut msg = vec![REFUSED];
                        msg.extend_from_slice(why.to_string().as_bytes());
                        conn.send(&msg)
                    }
                };
                if let Err(e) = sent {
                    // Back-pressure: the peer pipelines past what it reads.
                    // Dropping an answer would break the protocol; close.
                    tracing::debug!(conn = %conn.id(), error = %e, "closing");
                    conn.close();
                }
            }
        });
        if let Err(e) = submitted {
            tracing::debug!(conn = %conn.id(), error = %e, "closing");
            conn.close();
        }
    }
}

/// One answer as the client reads it.
#[derive(Debug)]
pub enum Answer {
    /// The file came: its length.
    Found(u64),
    /// The server refused, saying why.
    Refused(String),
}

/// Asks for `path` on `s` and writes the file it answers into `out`;
/// `progress` counts the bytes as they come.
pub fn fetch_one(
    s: &mut TcpStream,
    path: &str,
    out: &mut impl Write,
    progress: &AtomicU64,
) -> io::Result<Answer> {
    let mut request = (path.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(path.as_bytes());
    s.write_all(&request)?;
    let mut header = [0u8; 5];
    s.read_exact(&mut header)?;
    let len = u32::from_be_bytes(header[..4].try_into().expect("four bytes")) as u64;
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an empty answer",
        ));
    }
    let mut left = len - 1;
    if header[4] == REFUSED {
        let mut why = vec![0u8; left as usize];
        s.read_exact(&mut why)?;
        return Ok(Answer::Refused(String::from_utf8_lossy(&why).into_owned()));
    }
    if header[4] != FOUND {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an unknown answer",
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the answer ended {left} bytes short"),
            ));
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(Answer::Found(len - 1))
}

/// What a fetch did.
#[derive(Debug)]
pub struct Fetched {
    /// Files written, with their lengths.
    pub files: Vec<(String, u64)>,
    /// Paths refused, with the server's reason.
    pub refused: Vec<(String, String)>,
    /// Wall time of the whole fetch.
    pub elapsed: Duration,
}

impl Fetched {
    /// Bytes of the files written.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }
}

/// Fetches `paths` from `addr` over `connections` connections (each takes
/// the next path when it is done with one), writing each to `out_for(path)`;
/// `progress` counts the bytes as they come.
pub fn fetch(
    addr: SocketAddr,
    paths: &[String],
    connections: usize,
    out_for: &(dyn Fn(&str) -> PathBuf + Sync),
    progress: &AtomicU64,
) -> Result<Fetched, Box<dyn Error + Send + Sync>> {
    let start = Instant::now();
    let next = Mutex::new(paths.iter());
    let files = Mutex::new(Vec::new());
    let refused = Mutex::new(Vec::new());
    let parts = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections.clamp(1, paths.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> Result<(), Box<dyn Error + Send + Sync>> {
                    let mut s = TcpStream::connect(addr)
                        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                    s.set_nodelay(true)?;
                    // A server that stops sending fails the fetch, not hangs it.
                    s.set_read_timeout(Some(Duration::from_secs(60)))?;
                    loop {
                        let Some(path) = next.lock().unwrap().next().cloned() else {
                            return Ok(());
                        };
                        let target = out_for(&path);
                        // Its own name while it comes: two paths may land
                        // on one target (`a` and `./a`).
                        let n = parts.fetch_add(1, Ordering::Relaxed);
                        let mut temp = target.clone().into_os_string();
                        temp.push(format!(".{n}.part"));
                        let temp = PathBuf::from(temp);
                        let mut out = File::create(&temp)
                            .map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
                        match fetch_one(&mut s, &path, &mut out, progress)
                            .map_err(|e| format!("{path}: {e}"))?
                        {
                            Answer::Found(n) => {
                                drop(out);
                                std::fs::rename(&temp, &target).map_err(|e| {
                                    format!("cannot write {}: {e}", target.display())
                                })?;
                                files.lock().unwrap().push((path, n));
                            }
                            Answer::Refused(why) => {
                                drop(out);
                                let _ = std::fs::remove_file(&temp);
                                refused.lock().unwrap().push((path, why));
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a fetch thread panicked"))
    })?;
    Ok(Fetched {
        files: files.into_inner().unwrap(),
        refused: refused.into_inner().unwrap(),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_by_their_words_before_the_file_system() {
        let root = std::env::temp_dir().join(format!("wharf-resolve-{}", std::process::id()));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"x").unwrap();
        let root = root.canonicalize().unwrap();
        let r = |p: &[u8]| resolve(&root, p);
        assert_eq!(r(b"d/f"), Ok(root.join("d/f")));
        assert_eq!(r(b"./d/./f"), Ok(root.join("d/f")));
        assert_eq!(r(b"d//f"), Ok(root.join("d/f")));
        assert_eq!(r(b"../x"), Err(Refusal::Parent));
        assert_eq!(r(b"d/../d/f"), Err(Refusal::Parent), "no .. at all");
        assert_eq!(r(b"/etc/passwd"), Err(Refusal::Absolute));
        assert_eq!(r(b"\\server\\share"), Err(Refusal::Absolute));
        assert_eq!(r(b"d/f\0"), Err(Refusal::Nul));
        assert_eq!(r(b"\xc3\x28"), Err(Refusal::NotUtf8));
        assert_eq!(r(b""), Err(Refusal::Empty));
        assert_eq!(r(b"d"), Err(Refusal::NotAFile));
        assert_eq!(r(b"d/missing"), Err(Refusal::NotAFile));
        if cfg!(windows) {
            assert_eq!(r(b"C:\\Windows\\win.ini"), Err(Refusal::Absolute));
            assert_eq!(r(b"C:d\\f"), Err(Refusal::Absolute));
            assert_eq!(r(b"d\\..\\..\\x"), Err(Refusal::Parent));
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
