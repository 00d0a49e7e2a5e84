//! Scripted runs of the real event loop on the fake driver (`sys::fake`),
//! checked by an oracle: the deterministic seam the unit tests and the
//! `event_loop` fuzz target share.
//!
//! A [`Plan`] is decoded from bytes (a fuzzer's input, or a seeded
//! generator's output): the server's limits, the driver's quirks, then
//! steps — clients connect, write frames in arbitrary splits, half-close,
//! reset, read slowly or not at all, time passes; the host sends to them,
//! disconnects them, broadcasts, joins them to groups and publishes, dials
//! out, shuts down or breaks the driver. The handler echoes every message;
//! a message starting with `C` is echoed and then closes its connection,
//! one starting with `J` joins its connection to a group, one starting
//! with `B` is echoed and then bans its peer (`Conn::ban_peer`), one
//! starting with `P` panics (when panics are allowed). The host also bans
//! and unbans clients' addresses. The run ends with a shutdown.
//!
//! The oracle then checks, for every client: the messages delivered are a
//! prefix of the whole frames it wrote, byte for byte, and all of them if it
//! half-closed (the reason says otherwise); the echoes it read are exactly
//! the messages delivered, whenever the close flushes and nothing cut the
//! flush; `on_close` ran once, with a reason its script explains, and no
//! message came after it; an idle timeout never fired early; host sends
//! and broadcasts arrived in order and at most once; group messages too,
//! and only to clients that were asked to join; only a banned client is
//! closed as banned or refused at accept, and every refusal is counted.
//! And for the server: no id is still open, no connection is still
//! counted, no membership is left, and a loop whose driver failed refuses
//! sends with `LoopFailed`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::builder::Builder;
use crate::conn::Conn;
use crate::error::{CloseReason, SendError};
use crate::handle::Handle;
use crate::handler::Handler;
use crate::id::ConnId;
use crate::mailbox::Command;
use crate::sys::fake::{self, Clock, Op, Quirks, World};
use crate::Framing;

/// The panic message of a `P` message.
pub(crate) const PANIC: &str = "wharf scripted panic";

/// Wraps the process's panic hook, once, so that the handler's own panic
/// (`PANIC`) unwinds quietly into the loop that contains it; every other
/// panic goes to the hook as before (which, under libFuzzer, aborts).
pub(crate) fn let_handler_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if msg != Some(PANIC) {
                previous(info);
            }
        }));
    });
}

/// The server and driver settings of a run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) max_frame: usize,
    pub(crate) high_water: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) write_stall: Option<Duration>,
    pub(crate) linger: Duration,
    pub(crate) quirks: Quirks,
    pub(crate) panics: bool,
    /// Loops of the same server that have ended (see `Builder::scripted`).
    pub(crate) ended_siblings: usize,
}

/// One step of a plan (client numbers count `Connect`s).
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Connect,
    /// Queue whole frames on the client's side, to be written later.
    Frames {
        client: usize,
        bodies: Vec<Vec<u8>>,
    },
    /// Queue a header announcing more than the maximum.
    Oversized {
        client: usize,
        len: usize,
    },
    /// Write the next `n` queued bytes (all of them if `n` is 0).
    Write {
        client: usize,
        n: usize,
    },
    Eof {
        client: usize,
    },
    Reset {
        client: usize,
    },
    Read {
        client: usize,
        n: usize,
    },
    Sleep(Duration),
    Turn,
    HostSend {
        client: usize,
    },
    Disconnect {
        client: usize,
    },
    Broadcast,
    /// The host bans a client's address (for an hour), or lifts the ban.
    Ban {
        client: usize,
        lift: bool,
    },
    /// The host joins (or takes out) a client to group 0 or 1.
    Join {
        client: usize,
        group: u8,
        leave: bool,
    },
    /// The host publishes to group 0 or 1.
    Publish {
        group: u8,
    },
    Shutdown(Duration),
    Dial {
        ok: bool,
    },
    Fail,
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) settings: Settings,
    pub(crate) steps: Vec<Step>,
}

/// Reads bytes off the front of an input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
}

impl Plan {
    /// Decodes a plan; every input is a valid plan.
    pub(crate) fn from_bytes(data: &[u8], panics: bool) -> Plan {
        let mut input = Input(data);
        let max_frame = 16 + input.byte() as usize * 16;
        let high_water = 64 + input.byte() as usize * 64;
        let idle = input.byte();
        let stall = input.byte();
        let quirk = input.byte();
        let settings = Settings {
            max_frame,
            high_water,
            idle_timeout: (idle >= 160).then(|| Duration::from_millis(50 * (idle as u64 - 159))),
            write_stall: (stall >= 192).then(|| Duration::from_millis(100 * (stall as u64 - 191))),
            linger: Duration::from_millis(input.pick(&[0, 100, 700, 2000])),
            quirks: Quirks {
                chunk: input.pick(&[1, 7, 64, 512, 4096, 16384]),
                max_write: input.pick(&[1, 5, 100, 4096, usize::MAX]),
                late_data: quirk & 1 == 1,
                after_pause: (quirk as usize >> 1) % 3,
            },
            panics,
            ended_siblings: (quirk >> 3) as usize % 2,
        };
        let mut steps = Vec::new();
        let mut clients = 0usize;
        let mut messages = 0usize;
        while !input.0.is_empty() && steps.len() < 512 {
            let op = input.byte() % 20;
            if op == 0 || clients == 0 {
                if clients < 32 {
                    clients += 1;
                    steps.push(Step::Connect);
                }
                continue;
            }
            let client = input.byte() as usize % clients;
            // Rare steps take a second byte, so that most runs go on.
            let rare = |input: &mut Input<'_>| input.byte() % 4 == 0;
            steps.push(match op {
                1..=3 => {
                    let count = 1 + input.byte() as usize % 8;
                    let len = match input.byte() {
                        l @ 0..=199 => l as usize,
                        l => (l as usize - 199) * 64,
                    }
                    .min(max_frame);
                    let kind = input.pick(b"eeeeeeeeeeeeeeeeeeeeeeeeeCCJJPPB");
                    let bodies = (0..count)
                        .map(|_| {
                            messages += 1;
                            body(kind, messages, len)
                        })
                        .collect();
                    Step::Frames { client, bodies }
                }
                4..=7 => Step::Write {
                    client,
                    n: input.byte() as usize * input.pick(&[0, 1, 16, 256]),
                },
                8 if rare(&mut input) => Step::Oversized {
                    client,
                    len: max_frame + 1 + input.byte() as usize,
                },
                8 => Step::Eof { client },
                9 if rare(&mut input) => Step::Reset { client },
                10 | 19 => Step::Read {
                    client,
                    n: input.byte() as usize * 64,
                },
                11 => Step::Sleep(Duration::from_millis(input.byte() as u64 * 20)),
                14 => Step::HostSend { client },
                15 if rare(&mut input) => Step::Disconnect { client },
                15 => match input.byte() % 8 {
                    0 => Step::Ban {
                        client,
                        lift: false,
                    },
                    1 => Step::Ban { client, lift: true },
                    _ => Step::Turn,
                },
                16 => Step::Broadcast,
                12 => {
                    let b = input.byte();
                    Step::Join {
                        client,
                        group: b & 1,
                        leave: b & 6 == 6,
                    }
                }
                13 => Step::Publish {
                    group: input.byte() & 1,
                },
                17 if rare(&mut input) => {
                    Step::Shutdown(Duration::from_millis(input.byte() as u64 * 10))
                }
                18 => match input.byte() {
                    255 => Step::Fail,
                    b => Step::Dial { ok: b & 1 == 0 },
                },
                _ => Step::Turn,
            });
        }
        Plan { settings, steps }
    }

    /// A plan from a seeded generator (for tests without a fuzzer).
    #[cfg(test)]
    pub(crate) fn random(seed: u64, panics: bool) -> Plan {
        let mut x = seed | 1;
        let len = 8 + (seed % 400) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Plan::from_bytes(&bytes, panics)
    }
}

/// The groups of the scripted runs.
const GROUPS: [&str; 2] = ["g0", "g1"];

/// A message body: its kind, then a pattern unique to the message.
fn body(kind: u8, n: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| if i == 0 { kind } else { (n * 31 + i * 7) as u8 })
        .collect()
}

/// What the handler saw of one connection.
#[derive(Debug)]
struct ConnRecord {
    id: ConnId,
    delivered: Vec<Vec<u8>>,
    closes: u32,
    /// The reason, and the driver's turn and the time it came in.
    close: Option<(CloseReason, u64, Instant)>,
    /// Sequence numbers of host sends `Handle::send` accepted.
    sends_ok: Vec<u32>,
}

#[derive(Default, Debug)]
struct Records {
    conns: HashMap<SocketAddr, ConnRecord>,
    connect_failed: Vec<SocketAddr>,
    violations: Vec<String>,
}

struct Echo {
    records: Arc<Mutex<Records>>,
    clock: Clock,
    panics: bool,
}

impl Handler for Echo {
    type State = ();

    fn on_open(&self, conn: &mut Conn<'_, ()>) -> crate::Accept {
        let mut r = self.records.lock().unwrap();
        let record = ConnRecord {
            id: conn.id(),
            delivered: Vec::new(),
            closes: 0,
            close: None,
            sends_ok: Vec::new(),
        };
        if r.conns.insert(conn.peer_addr(), record).is_some() {
            r.violations
                .push(format!("{}: opened twice", conn.peer_addr()));
        }
        crate::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        {
            let mut r = self.records.lock().unwrap();
            let c = r.conns.get_mut(&conn.peer_addr()).expect("opened");
            c.delivered.push(msg.to_vec());
            if c.closes > 0 {
                let v = format!("{}: a message after on_close", conn.peer_addr());
                r.violations.push(v);
            }
        }
        if msg.first() == Some(&b'P') && self.panics {
            panic!("{PANIC}");
        }
        if let Err(e) = conn.send(msg) {
            let v = format!("{}: the echo was refused: {e}", conn.peer_addr());
            self.records.lock().unwrap().violations.push(v);
        }
        if msg.first() == Some(&b'C') {
            conn.close();
        }
        if msg.first() == Some(&b'J') {
            conn.join(GROUPS[0]);
        }
        if msg.first() == Some(&b'B') {
            conn.ban_peer(Duration::from_secs(3600));
        }
    }

    fn on_close(&self, conn: &mut Conn<'_, ()>, reason: CloseReason) {
        let turn = self.clock.turn();
        let mut r = self.records.lock().unwrap();
        let c = r.conns.get_mut(&conn.peer_addr()).expect("opened");
        c.closes += 1;
        c.close = Some((reason, turn, self.clock.now()));
    }

    fn on_connect_failed(&self, failure: crate::ConnectFailure) {
        let addr = failure.addr.expect("a scripted connect has its address");
        self.records.lock().unwrap().connect_failed.push(addr);
    }
}

/// What a plan's client did, as the oracle needs it.
#[derive(Default, Clone)]
struct Client {
    /// Queued frames not yet written.
    pending: Vec<u8>,
    /// Everything written.
    written: Vec<u8>,
    closed: bool,
    reset: bool,
    /// A `Disconnect` step named it.
    disconnected: bool,
    /// It was ever asked to join group 0 or 1 (by the host, or by a `J`
    /// message it wrote).
    joined: [bool; 2],
    /// The host banned its address, or it wrote a `B` message (a ban may
    /// have been lifted since).
    banned: bool,
    /// The host's last ban step for it banned (and did not lift).
    ban_in_force: bool,
}

/// What a run did, for [`check`].
pub(crate) struct Run {
    plan: Plan,
    clients: Vec<Client>,
    world: Rc<RefCell<World>>,
    records: Records,
    handle: Handle,
    failed: bool,
    /// A shutdown step ran: its deadline may pass while a client is not
    /// reading (virtual time passes in the script's sleeps), cutting
    /// flushes. The run's own final shutdown allows an hour, more than any
    /// script sleeps.
    shut_in_script: bool,
    started: Instant,
}

/// Runs `plan` on the real loop and the scripted driver.
pub(crate) fn run(plan: &Plan) -> Run {
    let s = plan.settings;
    let clock = Clock::new();
    let records = Arc::new(Mutex::new(Records::default()));
    let world = Rc::new(RefCell::new(World::default()));
    let mut builder = Builder::default()
        .framing(Framing::length_prefixed().max_frame(s.max_frame))
        .send_water_marks(s.high_water, s.high_water / 2)
        .write_stall_timeout(s.write_stall)
        .close_linger(s.linger)
        .max_connections(64)
        .recv_buffers(4, s.quirks.chunk.min(u32::MAX as usize) as u32);
    if let Some(d) = s.idle_timeout {
        builder = builder.idle_timeout(d);
    }
    // The handle exists once the loop does; host steps reach it here.
    let handle_cell: Arc<Mutex<Option<Handle>>> = Arc::default();
    let mut clients: Vec<Client> = Vec::new();
    let mut ops = Vec::new();
    let mut host_seq = 0u32;
    let mut dials = 0u16;
    let mut shut = false;
    for step in &plan.steps {
        match step {
            Step::Connect => {
                clients.push(Client::default());
                ops.push(Op::Connect);
            }
            Step::Frames { client, bodies } => {
                for b in bodies {
                    let c = &mut clients[*client];
                    c.joined[0] |= b.first() == Some(&b'J');
                    c.banned |= b.first() == Some(&b'B');
                    c.pending.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    c.pending.extend_from_slice(b);
                }
            }
            Step::Oversized { client, len } => {
                let c = &mut clients[*client];
                c.pending.extend_from_slice(&(*len as u32).to_be_bytes());
            }
            Step::Write { client, n } => {
                let c = &mut clients[*client];
                let n = if *n == 0 {
                    c.pending.len()
                } else {
                    (*n).min(c.pending.len())
                };
                let bytes: Vec<u8> = c.pending.drain(..n).collect();
                if !c.closed && !c.reset {
                    c.written.extend_from_slice(&bytes);
                }
                ops.push(Op::Write {
                    peer: *client,
                    bytes,
                });
            }
            Step::Eof { client } => {
                clients[*client].closed = true;
                ops.push(Op::Eof { peer: *client });
            }
            Step::Reset { client } => {
                clients[*client].reset = true;
                ops.push(Op::Reset { peer: *client });
            }
            Step::Read { client, n } => ops.push(Op::Read {
                peer: *client,
                bytes: *n,
            }),
            Step::Sleep(d) => ops.push(Op::Sleep(*d)),
            Step::Turn => ops.push(Op::Turn),
            Step::HostSend { client } => {
                host_seq += 1;
                let seq = host_seq;
                let (h, r) = (handle_cell.clone(), records.clone());
                let addr = fake::client_addr(*client);
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let mut r = r.lock().unwrap();
                    if let Some(c) = r.conns.get_mut(&addr) {
                        let msg = [&[0xFF, 1][..], &seq.to_be_bytes()].concat();
                        if handle.send(c.id, Bytes::from(msg)).is_ok() {
                            c.sends_ok.push(seq);
                        }
                    }
                })));
            }
            Step::Disconnect { client } => {
                clients[*client].disconnected = true;
                let (h, r) = (handle_cell.clone(), records.clone());
                let addr = fake::client_addr(*client);
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let id = r.lock().unwrap().conns.get(&addr).map(|c| c.id);
                    if let Some(id) = id {
                        let _ = handle.disconnect(id);
                    }
                })));
            }
            Step::Broadcast => {
                host_seq += 1;
                let msg = [&[0xFF, 2][..], &host_seq.to_be_bytes()].concat();
                let h = handle_cell.clone();
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let _ = handle.broadcast(Bytes::from(msg));
                })));
            }
            Step::Ban { client, lift } => {
                // Whether it is still banned at the end (a later ban of
                // its address may follow a lift).
                clients[*client].banned |= !lift;
                clients[*client].ban_in_force = !lift;
                let h = handle_cell.clone();
                let (ip, lift) = (fake::client_addr(*client).ip(), *lift);
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    if lift {
                        let _ = handle.unban(&ip.to_string());
                    } else {
                        handle.ban_ip(ip, Duration::from_secs(3600));
                    }
                })));
            }
            Step::Join {
                client,
                group,
                leave,
            } => {
                clients[*client].joined[*group as usize] = true;
                let (h, r) = (handle_cell.clone(), records.clone());
                let addr = fake::client_addr(*client);
                let (group, leave) = (GROUPS[*group as usize], *leave);
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let id = r.lock().unwrap().conns.get(&addr).map(|c| c.id);
                    if let Some(id) = id {
                        let _ = if leave {
                            handle.leave(id, group)
                        } else {
                            handle.join(id, group)
                        };
                    }
                })));
            }
            Step::Publish { group } => {
                host_seq += 1;
                let msg = [&[0xFF, 3, *group][..], &host_seq.to_be_bytes()].concat();
                let h = handle_cell.clone();
                let group = GROUPS[*group as usize];
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let _ = handle.publish(group, &msg);
                })));
            }
            Step::Shutdown(d) => {
                shut = true;
                ops.push(shutdown_op(&handle_cell, &clock, *d));
            }
            Step::Dial { ok } => {
                dials += 1;
                let port = 20_000 + dials * 2 + !ok as u16;
                let h = handle_cell.clone();
                ops.push(Op::Host(Box::new(move || {
                    let handle = h.lock().unwrap().clone().expect("handle");
                    let _ = handle.connect(SocketAddr::from(([192, 168, 0, 1], port)));
                })));
            }
            Step::Fail => ops.push(Op::Fail),
        }
    }
    let end = shutdown_op(&handle_cell, &clock, Duration::from_secs(3600));
    let Op::Host(end) = end else { unreachable!() };
    let driver = fake::Driver::new(clock.clone(), s.quirks, ops, end, world.clone());
    let handler = Echo {
        records: records.clone(),
        clock: clock.clone(),
        panics: s.panics,
    };
    let (event_loop, handle) = builder.scripted(handler, driver, clock.now(), s.ended_siblings);
    *handle_cell.lock().unwrap() = Some(handle.clone());
    let c = clock.clone();
    event_loop.run_with(move || c.now());
    let records = std::mem::take(&mut *records.lock().unwrap());
    let failed = world.borrow_mut().failed;
    Run {
        plan: plan.clone(),
        clients,
        world,
        records,
        handle,
        failed,
        shut_in_script: shut,
        started: clock.base(),
    }
}

#[cfg(test)]
impl Run {
    /// Adds this run's close reasons (by kind) and message counts to `t`.
    pub(crate) fn tally(&self, t: &mut std::collections::BTreeMap<String, u64>) {
        for c in self.records.conns.values() {
            if let Some((reason, ..)) = &c.close {
                let kind = format!("{reason:?}");
                let kind = kind
                    .split([' ', '('])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                *t.entry(kind).or_default() += 1;
            }
            *t.entry("messages".into()).or_default() += c.delivered.len() as u64;
        }
        let world = self.world.borrow_mut();
        let read: usize = world.peers.iter().map(|p| p.received.len()).sum();
        *t.entry("bytes read back".into()).or_default() += read as u64;
        let published: usize = world
            .peers
            .iter()
            .map(|p| {
                let (out, _) = frames(&p.received, usize::MAX);
                out.iter()
                    .filter(|m| m.len() == 7 && m[..2] == [0xFF, 3])
                    .count()
            })
            .sum();
        *t.entry("group messages read".into()).or_default() += published as u64;
        *t.entry("failed loops".into()).or_default() += world.failed as u64;
    }
}

fn shutdown_op(handle: &Arc<Mutex<Option<Handle>>>, clock: &Clock, d: Duration) -> Op {
    let (h, clock) = (handle.clone(), clock.clone());
    Op::Host(Box::new(move || {
        let handle = h.lock().unwrap().clone().expect("handle");
        let _ = handle.shared.loops[0]
            .mailbox
            .post(Command::Shutdown(clock.now() + d));
    }))
}

mod oracle;
#[cfg(test)]
mod tests;

pub(crate) use oracle::check;
#[cfg(test)]
use oracle::frames;
