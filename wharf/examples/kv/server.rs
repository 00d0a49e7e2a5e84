//! The handler: one RESP request per message, executed against the shared
//! store, its reply queued at once. Replies to the requests of one read
//! go out together in one gathered write (wharf sends what a turn queued
//! in one go), in request order.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wharf::{Conn, Handler, Tick};

use super::resp::{self, reply};
use super::store::{Condition, Store};

/// The largest request (and so the largest value) accepted.
pub const MAX_REQUEST: usize = 64 * 1024 * 1024;

/// How often the loops remove expired keys.
pub const EXPIRE_EVERY: Duration = Duration::from_millis(100);

/// A Redis-protocol key-value server over one shared [`Store`].
pub struct Kv {
    pub store: Arc<Store>,
    /// The codec's maximum (`RespCodec::new`), to name what is wrong with
    /// a request it handed over as malformed.
    pub max_request: usize,
}

thread_local! {
    /// A loop's reply buffer, reused from message to message.
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(4096));
}

impl Handler for Kv {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        OUT.with(|out| {
            let mut out = out.borrow_mut();
            out.clear();
            let close = match resp::parse(msg, self.max_request) {
                Ok(args) if args.is_empty() => false,
                Ok(args) => execute(&self.store, &args, &mut out),
                Err(why) => {
                    reply::error(&mut out, &format!("ERR Protocol error: {why}"));
                    true
                }
            };
            if !out.is_empty() && conn.send(&out).is_err() {
                // Over its high-water mark: a client that pipelines
                // without reading its replies.
                conn.close();
                return;
            }
            if close {
                conn.close();
            }
        });
    }

    fn on_tick(&self, tick: &mut Tick<'_, Self>) {
        // Loop 0 expires; one pass is plenty for the others' keys too.
        if tick.loop_index() == 0 {
            self.store.expire_due(1000);
        }
    }
}

fn arity(out: &mut Vec<u8>, name: &[u8]) {
    let name = String::from_utf8_lossy(name).to_lowercase();
    reply::error(
        out,
        &format!("ERR wrong number of arguments for '{name}' command"),
    );
}

/// A command or option name in capitals, on the stack (names longer than
/// 16 bytes match nothing, so they need no room).
struct Upper {
    buf: [u8; 16],
    len: usize,
}

impl Upper {
    fn of(name: &[u8]) -> Upper {
        let mut buf = [0u8; 16];
        let len = if name.len() <= 16 { name.len() } else { 0 };
        for (d, s) in buf.iter_mut().zip(&name[..len]) {
            *d = s.to_ascii_uppercase();
        }
        Upper { buf, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn int_arg(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Runs one command; whether the connection closes after its reply.
fn execute(store: &Store, args: &[&[u8]], out: &mut Vec<u8>) -> bool {
    let name = args[0];
    let cmd = Upper::of(name);
    let rest = &args[1..];
    match (cmd.as_slice(), rest.len()) {
        (b"PING", 0) => reply::simple(out, "PONG"),
        (b"PING", 1) => reply::bulk(out, Some(rest[0])),
        (b"ECHO", 1) => reply::bulk(out, Some(rest[0])),
        (b"GET", 1) => reply::bulk(out, store.get(rest[0]).as_deref()),
        (b"SET", n) if n >= 2 => set(store, rest, out),
        (b"DEL", n) if n >= 1 => {
            let n = rest.iter().filter(|k| store.del(k)).count();
            reply::int(out, n as i64);
        }
        (b"EXISTS", n) if n >= 1 => {
            let n = rest.iter().filter(|k| store.exists(k)).count();
            reply::int(out, n as i64);
        }
        (b"INCR", 1) | (b"DECR", 1) | (b"INCRBY", 2) | (b"DECRBY", 2) => {
            let by = match rest.get(1) {
                Some(b) => match int_arg(b) {
                    Some(n) => n,
                    None => {
                        reply::error(out, "ERR value is not an integer or out of range");
                        return false;
                    }
                },
                None => 1,
            };
            let by = if cmd.as_slice().starts_with(b"DECR") {
                by.checked_neg()
            } else {
                Some(by)
            };
            match by
                .ok_or("increment or decrement would overflow")
                .and_then(|by| store.incr(rest[0], by))
            {
                Ok(n) => reply::int(out, n),
                Err(why) => reply::error(out, &format!("ERR {why}")),
            }
        }
        (b"MGET", n) if n >= 1 => {
            reply::array(out, rest.len());
            for k in rest {
                reply::bulk(out, store.get(k).as_deref());
            }
        }
        (b"MSET", n) if n >= 2 && n % 2 == 0 => {
            for kv in rest.chunks(2) {
                store.set(
                    kv[0],
                    Bytes::copy_from_slice(kv[1]),
                    None,
                    Condition::Always,
                );
            }
            reply::simple(out, "OK");
        }
        (b"EXPIRE", 2) => match int_arg(rest[1]) {
            Some(secs) => reply::int(out, i64::from(store.expire(rest[0], secs))),
            None => reply::error(out, "ERR value is not an integer or out of range"),
        },
        (b"TTL", 1) => reply::int(out, store.ttl(rest[0])),
        (b"DBSIZE", 0) => reply::int(out, store.len() as i64),
        (b"FLUSHALL", _) | (b"FLUSHDB", _) => {
            store.flush();
            reply::simple(out, "OK");
        }
        (b"SELECT", 1) if rest[0] == b"0" => reply::simple(out, "OK"),
        (b"SELECT", 1) => reply::error(out, "ERR DB index is out of range"),
        (b"QUIT", _) => {
            reply::simple(out, "OK");
            return true;
        }
        // Enough of CONFIG, CLIENT, COMMAND and INFO for redis-benchmark
        // and redis-cli, which ask at start.
        (b"CONFIG", n) if n >= 1 => config(rest, out),
        (b"CLIENT", n) if n >= 1 => client(rest, out),
        (b"COMMAND", _) => reply::array(out, 0),
        (b"INFO", _) => {
            let info = "# Server\r\nredis_version:7.0.0\r\nwharf_kv:1\r\n";
            reply::bulk(out, Some(info.as_bytes()));
        }
        (
            b"PING" | b"ECHO" | b"GET" | b"SET" | b"DEL" | b"EXISTS" | b"INCR" | b"DECR"
            | b"INCRBY" | b"DECRBY" | b"MGET" | b"MSET" | b"EXPIRE" | b"TTL" | b"DBSIZE"
            | b"SELECT" | b"CONFIG" | b"CLIENT",
            _,
        ) => arity(out, name),
        _ => {
            let shown = String::from_utf8_lossy(&name[..name.len().min(128)]).into_owned();
            let args: Vec<String> = rest
                .iter()
                .take(8)
                .map(|a| format!("'{}'", String::from_utf8_lossy(&a[..a.len().min(64)])))
                .collect();
            reply::error(
                out,
                &format!(
                    "ERR unknown command '{shown}', with args beginning with: {}",
                    args.join(" ")
                ),
            );
        }
    }
    false
}

/// SET key value [EX s | PX ms] [NX | XX]
fn set(store: &Store, args: &[&[u8]], out: &mut Vec<u8>) {
    let (key, value) = (args[0], args[1]);
    let mut ttl = None;
    let mut when = Condition::Always;
    let mut i = 2;
    while i < args.len() {
        let opt = Upper::of(args[i]);
        match opt.as_slice() {
            b"NX" if when == Condition::Always => when = Condition::Absent,
            b"XX" if when == Condition::Always => when = Condition::Present,
            b"EX" | b"PX" if ttl.is_none() && i + 1 < args.len() => {
                let n = match int_arg(args[i + 1]) {
                    Some(n) if n > 0 => n as u64,
                    _ => return reply::error(out, "ERR invalid expire time in 'set' command"),
                };
                ttl = Some(if opt.as_slice() == b"EX" {
                    Duration::from_secs(n)
                } else {
                    Duration::from_millis(n)
                });
                i += 1;
            }
            _ => return reply::error(out, "ERR syntax error"),
        }
        i += 1;
    }
    if store.set(key, Bytes::copy_from_slice(value), ttl, when) {
        reply::simple(out, "OK");
    } else {
        reply::bulk(out, None);
    }
}

fn config(args: &[&[u8]], out: &mut Vec<u8>) {
    let sub = Upper::of(args[0]);
    match (sub.as_slice(), args.len()) {
        (b"GET", 2) => {
            let known: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];
            let param = String::from_utf8_lossy(args[1]).to_lowercase();
            let found: Vec<_> = known.iter().filter(|(k, _)| glob(&param, k)).collect();
            reply::array(out, found.len() * 2);
            for (k, v) in found {
                reply::bulk(out, Some(k.as_bytes()));
                reply::bulk(out, Some(v.as_bytes()));
            }
        }
        (b"SET", 3) | (b"RESETSTAT", 1) => reply::simple(out, "OK"),
        _ => reply::error(
            out,
            "ERR unknown CONFIG subcommand or wrong number of arguments",
        ),
    }
}

/// `*` matches anything; otherwise the names must be equal.
fn glob(pattern: &str, name: &str) -> bool {
    pattern == "*" || pattern == name
}

fn client(args: &[&[u8]], out: &mut Vec<u8>) {
    let sub = Upper::of(args[0]);
    match sub.as_slice() {
        b"SETNAME" | b"SETINFO" | b"REPLY" | b"NO-EVICT" | b"NO-TOUCH" => reply::simple(out, "OK"),
        b"GETNAME" => reply::bulk(out, None),
        b"ID" => reply::int(out, 1),
        _ => reply::error(out, "ERR unknown CLIENT subcommand"),
    }
}
