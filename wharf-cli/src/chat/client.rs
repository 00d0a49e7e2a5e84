//! `wharf chat --connect ADDR`: a terminal client on wharf's client mode.
//! Lines typed on standard input go to the server; what arrives is
//! printed, one line per message. Ends when the server closes the
//! connection: at the end of input (Ctrl-D) the client says `/quit` and
//! waits for that.

use std::error::Error;
use std::io::{BufRead, Write};
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::time::Duration;

use wharf::{Bytes, CloseReason, Conn, ConnId, ConnectFailure, Handler, Server};

use super::FramingArg;

/// What the connection tells the main thread.
enum Event {
    Open(ConnId),
    Closed(String),
}

struct Terminal {
    events: Mutex<Sender<Event>>,
}

impl Terminal {
    fn tell(&self, e: Event) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(e);
    }
}

impl Handler for Terminal {
    type State = ();

    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.tell(Event::Open(conn.id()));
        wharf::Accept::Yes
    }

    fn on_message(&self, _conn: &mut Conn<'_, ()>, msg: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(msg);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }

    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        self.tell(Event::Closed(format!("{reason:?}")));
    }

    fn on_connect_failed(&self, failure: ConnectFailure) {
        self.tell(Event::Closed(format!("cannot connect: {}", failure.error)));
    }
}

pub(crate) fn run(addr: &str, framing: FramingArg) -> Result<(), Box<dyn Error>> {
    let (tx, rx) = mpsc::channel();
    let client = Server::builder()
        .threads(1)
        .framing(framing.framing())
        .start(Terminal {
            events: Mutex::new(tx.clone()),
        })?;
    let handle = client.handle();
    handle.connect(addr)?;
    let id = match rx.recv()? {
        Event::Open(id) => id,
        Event::Closed(why) => return Err(format!("{addr}: {why}").into()),
    };
    eprintln!("* connected to {addr}; type lines, Ctrl-D to end");
    // Standard input on a thread of its own, so that a close by the server
    // ends the client even while nobody types.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_owned();
            let msg = Bytes::from(line);
            // Sends wait while the connection is over its high-water mark
            // rather than dropping what was typed.
            loop {
                match handle.send(id, msg.clone()) {
                    Ok(()) => break,
                    Err(wharf::SendError::Backpressure) => {
                        let _ = handle.wait_writable(id, Duration::from_secs(1));
                    }
                    Err(e) => {
                        eprintln!("* not sent: {e}");
                        return;
                    }
                }
            }
        }
        // The end of input: ask the server to end, so that the answers to
        // what was sent still arrive; cut the connection if it does not.
        if handle.send(id, Bytes::from_static(b"/quit")).is_ok() {
            std::thread::sleep(Duration::from_secs(5));
        }
        let _ = handle.disconnect(id);
    });
    let why = loop {
        if let Event::Closed(why) = rx.recv()? {
            break why;
        }
    };
    drop(tx);
    eprintln!("* connection closed ({why})");
    client.shutdown(Duration::from_secs(2))?;
    Ok(())
}
