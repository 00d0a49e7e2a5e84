//! `wharf chat` from outside, as people use it: the line protocol with
//! nc-style clients (raw sockets) on every backend, the terminal client
//! (`--connect`), and three chat processes through a real Redis
//! (`--cluster`), where every member of a room on every node gets every
//! line once, in order per sender.

#[allow(dead_code)]
#[path = "../../wharf/tests/util/redis.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_server::RedisServer;

/// A `wharf chat` process, killed when dropped.
struct ChatServer {
    child: Child,
    addr: String,
}

impl ChatServer {
    fn start(args: &[&str]) -> ChatServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args([
                "chat",
                "--addr",
                "127.0.0.1:0",
                "--threads",
                "2",
                "--duration",
                "120",
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start wharf chat");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        ChatServer { child, addr }
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `nc` does: write what is typed, print the lines that come.
struct Nc {
    out: TcpStream,
    lines: BufReader<TcpStream>,
}

impl Nc {
    fn connect(addr: &str) -> Nc {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Nc {
            lines: BufReader::new(s.try_clone().unwrap()),
            out: s,
        }
    }

    fn say(&mut self, text: &str) {
        self.out.write_all(text.as_bytes()).unwrap();
        self.out.write_all(b"\r\n").unwrap();
    }

    /// The next line, without its CRLF (the chat ends lines as telnet does).
    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.lines.read_line(&mut l).unwrap();
        assert!(n > 0, "the server closed the connection");
        assert!(l.ends_with("\r\n"), "{l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn expect(&mut self, want: &str) {
        assert_eq!(self.line(), want);
    }

    /// Skips lines until one that `pred` takes; that one.
    fn until(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let l = self.line();
            if pred(&l) {
                return l;
            }
        }
    }

    /// The welcome: the guest nick given.
    fn welcome(&mut self) -> String {
        let l = self.line();
        let nick = l
            .strip_prefix("* welcome, ")
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("no welcome: {l:?}"))
            .to_string();
        assert!(nick.starts_with("guest-"), "{nick}");
        self.expect(&format!("* {nick} joined [lobby]"));
        nick
    }
}

fn backends() -> Vec<&'static str> {
    if cfg!(target_os = "linux") {
        vec!["uring", "poll"]
    } else {
        vec!["auto"]
    }
}

#[test]
fn the_line_protocol_from_nc() {
    for backend in backends() {
        eprintln!("-- backend {backend}");
        let server = ChatServer::start(&["--framing", "lines", "--backend", backend]);
        let mut a = Nc::connect(&server.addr);
        let guest_a = a.welcome();
        let mut b = Nc::connect(&server.addr);
        let guest_b = b.welcome();
        a.expect(&format!("* {guest_b} joined [lobby]"));
        // A line said in the lobby reaches both, sender too.
        a.say("hello, lobby");
        for c in [&mut a, &mut b] {
            c.expect(&format!("[lobby] {guest_a}: hello, lobby"));
        }
        a.say("/nick alice");
        for c in [&mut a, &mut b] {
            c.expect(&format!("* {guest_a} is now known as alice"));
        }
        a.say("/join rust");
        b.expect("* alice left [lobby]");
        a.expect("* alice left [lobby]");
        a.expect("* alice joined [rust]");
        // Nicks are unique on a node.
        b.say("/nick alice");
        b.expect("* alice is taken on this node");
        b.say("/nick bob");
        b.expect(&format!("* {guest_b} is now known as bob"));
        b.say("/join rust");
        b.expect("* bob left [lobby]");
        for c in [&mut a, &mut b] {
            c.expect("* bob joined [rust]");
        }
        b.say("hi from bob");
        for c in [&mut a, &mut b] {
            c.expect("[rust] bob: hi from bob");
        }
        a.say("/who");
        a.expect("* in [rust] on this node: alice, bob");
        a.say("/rooms");
        a.expect("* rooms on this node: rust (2)");
        // Errors are notices, and the connection goes on.
        a.say("/frobnicate");
        a.expect("* unknown command /frobnicate: /help lists the commands");
        a.say("/nick ");
        assert!(a.line().starts_with("* usage: /nick NAME"));
        a.say(&"x".repeat(2500));
        a.expect("* line too long (2500 bytes; at most 2000): not sent");
        a.say("/join rust");
        a.expect("* you are in [rust] already");
        // A terminal's escape sequences are not passed on.
        a.say("\x1b[2Jgotcha");
        for c in [&mut a, &mut b] {
            c.expect("[rust] alice: ?[2Jgotcha");
        }
        // /leave goes back to the lobby; there it is an error.
        a.say("/leave");
        b.expect("* alice left [rust]");
        a.expect("* alice left [rust]");
        a.expect("* alice joined [lobby]");
        a.say("/leave");
        a.expect("* you are in [lobby], where everyone starts: /join another room");
        // Bob is alone in rust now: what he says does not reach the lobby.
        b.say("anyone?");
        b.expect("[rust] bob: anyone?");
        a.say("/help");
        assert!(a.line().starts_with("* commands: /nick NAME, /join ROOM"));
        // A peer that vanishes is announced to its room.
        let mut c = Nc::connect(&server.addr);
        let guest_c = c.welcome();
        a.expect(&format!("* {guest_c} joined [lobby]"));
        drop(c);
        a.expect(&format!("* {guest_c} left [lobby]"));
        // /quit says bye and closes.
        a.say("/quit");
        a.expect("* bye");
        let mut rest = Vec::new();
        a.lines.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        // A line past the codec's maximum (64 KiB) closes the connection.
        b.out.write_all(&vec![b'y'; 70 * 1024]).unwrap();
        let mut rest = String::new();
        let _ = b.lines.read_to_string(&mut rest);
        assert!(rest.is_empty(), "{rest:?}");
    }
}

#[test]
fn the_terminal_client() {
    let server = ChatServer::start(&["--framing", "lines"]);
    let mut watcher = Nc::connect(&server.addr);
    watcher.welcome();
    let mut client = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["chat", "--connect", &server.addr, "--framing", "lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"/nick term\nfrom the terminal\n")
        .unwrap();
    // Its stdin is closed now: it says /quit, gets bye, and ends.
    let started = Instant::now();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "it waited for the cut-off"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for want in [
        " is now known as term",
        "[lobby] term: from the terminal",
        "* bye",
    ] {
        assert!(
            stdout.lines().any(|l| l.ends_with(want)),
            "{want:?} not in {stdout:?}"
        );
    }
    assert!(stdout.starts_with("* welcome, guest-"), "{stdout:?}");
    watcher.until(|l| l == "[lobby] term: from the terminal");
    watcher.expect("* term left [lobby]");
}

#[test]
fn length_prefixed_is_the_default() {
    let server = ChatServer::start(&[]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = |s: &mut TcpStream| {
        let mut h = [0u8; 4];
        s.read_exact(&mut h).unwrap();
        let mut b = vec![0; u32::from_be_bytes(h) as usize];
        s.read_exact(&mut b).unwrap();
        String::from_utf8(b).unwrap()
    };
    assert!(read(&mut s).starts_with("* welcome, guest-"));
    assert!(read(&mut s).ends_with(" joined [lobby]"));
    let body = b"/nick framed";
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    assert!(read(&mut s).ends_with(" is now known as framed"));
}

#[test]
fn three_nodes_through_redis() {
    let broker = RedisServer::start();
    let nodes: Vec<ChatServer> = (0..3)
        .map(|_| ChatServer::start(&["--framing", "lines", "--cluster", &broker.url()]))
        .collect();
    // Two people on each node, each with a nick of their own.
    let mut people: Vec<(String, Nc)> = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..2 {
            let mut c = Nc::connect(&node.addr);
            let guest = c.welcome();
            assert!(
                guest.contains('@'),
                "a cluster guest carries its node: {guest}"
            );
            let nick = format!("p{n}{i}");
            c.say(&format!("/nick {nick}"));
            c.until(|l| l == format!("* {guest} is now known as {nick}"));
            people.push((nick, c));
        }
    }
    // Every node subscribed to the lobby on the broker.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, subscribers): (String, i64) = broker
            .query(&["PUBSUB", "NUMSUB", "wharf-chat:g:lobby"])
            .unwrap();
        if subscribers == 3 {
            break;
        }
        assert!(Instant::now() < end, "{subscribers} of 3 nodes subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    const EACH: usize = 20;
    for (nick, c) in &mut people {
        let mut burst = String::new();
        for k in 0..EACH {
            burst.push_str(&format!("{nick} says {k}\r\n"));
        }
        c.out.write_all(burst.as_bytes()).unwrap();
    }
    let nicks: Vec<String> = people.iter().map(|(n, _)| n.clone()).collect();
    for (me, c) in &mut people {
        let mut next = vec![0; nicks.len()];
        while next.iter().any(|&k| k < EACH) {
            let l = c.line();
            let Some(said) = l.strip_prefix("[lobby] ") else {
                assert!(l.starts_with("* "), "{me}: {l:?}");
                continue;
            };
            let (who, text) = said.split_once(": ").unwrap();
            let p = nicks.iter().position(|n| n == who).unwrap();
            assert_eq!(
                text,
                format!("{who} says {}", next[p]),
                "{me}: out of order or twice"
            );
            next[p] += 1;
        }
    }
    // Nothing more: no line came twice.
    for (me, c) in &mut people {
        c.out
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut l = String::new();
        if c.lines.read_line(&mut l).is_ok_and(|n| n > 0) {
            assert!(l.starts_with("* "), "{me} got an extra line {l:?}");
        }
        c.out
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    // /rooms and /who count every node's members (asked of the broker).
    rooms_become(&mut people[2].1, "* rooms on all nodes: lobby (6)");
    people[2].1.say("/who");
    let who = people[2].1.until(|l| l.starts_with("* in [lobby]"));
    assert_eq!(who, "* in [lobby] on this node: p10, p11; 6 on all nodes");
    // A node that dies without a goodbye (SIGKILL) leaves no subscription
    // behind on the broker, its members drop out of the counts within the
    // presence TTL (10 s), and the others go on.
    let mut nodes = nodes;
    let mut dead = nodes.remove(0);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, subscribers): (String, i64) = broker
            .query(&["PUBSUB", "NUMSUB", "wharf-chat:g:lobby"])
            .unwrap();
        if subscribers == 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "{subscribers} subscribers after a node died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rooms_become(&mut people[2].1, "* rooms on all nodes: lobby (4)");
    people[2].1.say("after the fall");
    for (me, c) in &mut people[2..] {
        let l = c.until(|l| !l.starts_with("* "));
        assert_eq!(l, "[lobby] p10: after the fall", "{me}");
    }
}

/// Asks `/rooms` until the answer is `want` (the cluster's counts are
/// refreshed every few seconds), for up to 20 s.
fn rooms_become(c: &mut Nc, want: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        c.say("/rooms");
        let got = c.until(|l| l.starts_with("* rooms on"));
        if got == want {
            return;
        }
        assert!(Instant::now() < end, "rooms: {got:?}, never {want:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
