//! The chat server's handler: nicks, rooms and the line protocol (see
//! `chat`). Rooms are wharf groups: a line said in a room is published to
//! its group once, and reaches its members on every loop and, with a
//! cluster, on every node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wharf::cluster::Redis;
use wharf::{CloseReason, Conn, ConnId, Handler};

/// The longest line said in a room, in bytes: a longer one gets a notice.
pub(crate) const MAX_TEXT: usize = 2000;
/// The longest nick or room name.
const MAX_NAME: usize = 32;
const LOBBY: &str = "lobby";

/// One connection: who it is and where.
#[derive(Default)]
pub(crate) struct Member {
    nick: String,
    room: String,
}

/// The chat server.
#[derive(Default)]
pub(crate) struct Chat {
    guests: AtomicU64,
    /// Follows the guest number in a new connection's nick: empty on one
    /// node, `@` and the node's short id in a cluster (so that guests on
    /// different nodes are told apart).
    node_tag: String,
    /// The cluster, if any: `/rooms` and `/who` count every node's members.
    cluster: Option<Arc<Redis>>,
    /// The nicks in each room on this node, for `/who`.
    here: Mutex<HashMap<String, BTreeMap<ConnId, String>>>,
    /// The nicks in use on this node: no two connections here share one.
    nicks: Mutex<HashSet<String>>,
}

impl Chat {
    /// A chat whose guests are `guest-N` followed by `node_tag`, on one
    /// node or in `cluster`.
    pub(crate) fn new(node_tag: String, cluster: Option<Arc<Redis>>) -> Chat {
        Chat {
            node_tag,
            cluster,
            ..Chat::default()
        }
    }

    /// Sends the notice `answer` makes of the cluster's member counts per
    /// room, asked of the broker on the worker pool (a loop never waits
    /// for the network); on one node, the notice of `None` at once.
    fn with_cluster_counts(
        &self,
        conn: &mut Conn<'_, Member>,
        answer: impl FnOnce(Option<Result<Vec<(String, u64)>, String>>) -> String + Send + 'static,
    ) {
        let Some(cluster) = self.cluster.clone() else {
            return notice(conn, &answer(None));
        };
        let asked = conn.submit(move || {
            let text = answer(Some(cluster.cluster_groups().map_err(|e| e.to_string())));
            move |conn: &mut Conn<'_, Member>| notice(conn, &text)
        });
        if let Err(e) = asked {
            notice(
                conn,
                &format!("the server is too busy to ask the cluster: {e}"),
            );
        }
    }

    fn here(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<ConnId, String>>> {
        self.here.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn nicks(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.nicks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the connection in `room` and tells the room.
    fn enter(&self, conn: &mut Conn<'_, Member>, room: &str) {
        conn.join(room);
        let id = conn.id();
        let member = conn.state();
        member.room = room.to_owned();
        let nick = member.nick.clone();
        self.here()
            .entry(room.to_owned())
            .or_default()
            .insert(id, nick.clone());
        publish(conn, room, &format!("* {nick} joined [{room}]"));
    }

    /// Takes the connection out of its room and tells the room.
    fn exit(&self, conn: &mut Conn<'_, Member>) {
        let id = conn.id();
        let room = std::mem::take(&mut conn.state().room);
        let nick = conn.state().nick.clone();
        if room.is_empty() {
            return;
        }
        publish(conn, &room, &format!("* {nick} left [{room}]"));
        conn.leave(&room);
        let mut here = self.here();
        if let Some(nicks) = here.get_mut(&room) {
            nicks.remove(&id);
            if nicks.is_empty() {
                here.remove(&room);
            }
        }
    }

    fn command(&self, conn: &mut Conn<'_, Member>, line: &str) {
        let (cmd, arg) = match line.split_once(char::is_whitespace) {
            Some((c, a)) => (c, a.trim()),
            None => (line, ""),
        };
        match cmd {
            "/nick" => {
                let Some(new) = name(conn, arg, "/nick NAME") else {
                    return;
                };
                if conn.state().nick == new {
                    return notice(conn, &format!("you are {new} already"));
                }
                if !self.nicks().insert(new.clone()) {
                    return notice(conn, &format!("{new} is taken on this node"));
                }
                let Member { nick, room } = conn.state();
                self.nicks().remove(nick.as_str());
                let (old, room) = (std::mem::replace(nick, new.clone()), room.clone());
                let id = conn.id();
                if let Some(nicks) = self.here().get_mut(&room) {
                    nicks.insert(id, new.clone());
                }
                publish(conn, &room, &format!("* {old} is now known as {new}"));
            }
            "/join" => {
                let Some(room) = name(conn, arg, "/join ROOM") else {
                    return;
                };
                if conn.state().room == room {
                    return notice(conn, &format!("you are in [{room}] already"));
                }
                self.exit(conn);
                self.enter(conn, &room);
            }
            "/leave" => {
                let room = conn.state().room.clone();
                if room == LOBBY {
                    return notice(
                        conn,
                        "you are in [lobby], where everyone starts: /join another room",
                    );
                }
                self.exit(conn);
                self.enter(conn, LOBBY);
            }
            "/rooms" => {
                let here: Vec<(String, u64)> = conn
                    .handle()
                    .groups()
                    .into_iter()
                    .map(|(room, n)| (room, n as u64))
                    .collect();
                self.with_cluster_counts(conn, move |all| match all {
                    Some(Ok(all)) => format!("rooms on all nodes: {}", list(&all)),
                    Some(Err(e)) => format!(
                        "rooms on this node: {} (the cluster's broker did not answer: {e})",
                        list(&here)
                    ),
                    None => format!("rooms on this node: {}", list(&here)),
                });
            }
            "/who" => {
                let room = conn.state().room.clone();
                let mut nicks: Vec<String> = self
                    .here()
                    .get(&room)
                    .map(|n| n.values().cloned().collect())
                    .unwrap_or_default();
                nicks.sort();
                let here = format!("in [{room}] on this node: {}", nicks.join(", "));
                self.with_cluster_counts(conn, move |all| match all {
                    Some(Ok(all)) => {
                        let n = all.iter().find(|(r, _)| *r == room).map_or(0, |(_, n)| *n);
                        format!("{here}; {n} on all nodes")
                    }
                    Some(Err(e)) => format!("{here} (the cluster's broker did not answer: {e})"),
                    None => here,
                });
            }
            "/help" => notice(
                conn,
                "commands: /nick NAME, /join ROOM, /leave, /rooms, /who, /quit; \
                 any other line is said in your room",
            ),
            "/quit" => {
                notice(conn, "bye");
                conn.close();
            }
            other => notice(
                conn,
                &format!("unknown command {other}: /help lists the commands"),
            ),
        }
    }
}

impl Handler for Chat {
    type State = Member;

    fn on_open(&self, conn: &mut Conn<'_, Member>) -> wharf::Accept {
        // The next guest number whose nick nobody has taken.
        let nick = loop {
            let n = self.guests.fetch_add(1, Ordering::Relaxed) + 1;
            let nick = format!("guest-{n}{}", self.node_tag);
            if self.nicks().insert(nick.clone()) {
                break nick;
            }
        };
        tracing::info!("{} joined from {} as {nick}", conn.id(), conn.peer_addr());
        notice(
            conn,
            &format!("welcome, {nick}: you are in [{LOBBY}]; /help lists the commands"),
        );
        conn.state().nick = nick;
        self.enter(conn, LOBBY);
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, Member>, msg: &[u8]) {
        if msg.len() > MAX_TEXT {
            return notice(
                conn,
                &format!(
                    "line too long ({} bytes; at most {MAX_TEXT}): not sent",
                    msg.len()
                ),
            );
        }
        let line = clean(msg);
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        if line.starts_with('/') {
            return self.command(conn, line);
        }
        let Member { nick, room } = conn.state();
        let said = format!("[{room}] {nick}: {line}");
        let room = room.clone();
        publish(conn, &room, &said);
    }

    fn on_close(&self, conn: &mut Conn<'_, Member>, reason: CloseReason) {
        tracing::info!("{} ({}) left: {reason:?}", conn.id(), conn.state().nick);
        self.exit(conn);
        self.nicks().remove(conn.state().nick.as_str());
    }
}

/// The text of a line, with control characters (a terminal's escape
/// sequences among them) shown as `?`.
fn clean(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg)
        .chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// A valid nick or room name in `arg`, or a notice saying why not.
fn name(conn: &mut Conn<'_, Member>, arg: &str, usage: &str) -> Option<String> {
    let ok = !arg.is_empty()
        && arg.len() <= MAX_NAME
        && arg
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Some(arg.to_owned())
    } else {
        notice(
            conn,
            &format!("usage: {usage} (1 to {MAX_NAME} letters, digits, '-', '_', '.' or '@')"),
        );
        None
    }
}

/// "lobby (3), rust (1)".
fn list(rooms: &[(String, u64)]) -> String {
    let v: Vec<String> = rooms.iter().map(|(r, n)| format!("{r} ({n})")).collect();
    v.join(", ")
}

/// A notice to this connection only.
fn notice(conn: &mut Conn<'_, Member>, text: &str) {
    if let Err(e) = conn.send(format!("* {text}").as_bytes()) {
        tracing::debug!("a notice to {} was not sent: {e}", conn.id());
    }
}

fn publish(conn: &mut Conn<'_, Member>, room: &str, line: &str) {
    if let Err(e) = conn.publish(room, line.as_bytes()) {
        tracing::warn!("a line in [{room}] was not sent: {e}");
    }
}
