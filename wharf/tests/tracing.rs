//! Connection events go through `tracing` with the connection's id as the
//! field `conn`, and what a handler logs in its callbacks runs inside a
//! `conn` span with the same id: a subscriber can follow one connection.
//! The subscriber here is the test's own, minimal and global (the events
//! come from the loops' threads).

mod util;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use util::*;
use wharf::{Conn, Handler};

/// One event: its fields, and the `conn` of the span it happened in.
#[derive(Debug, Clone, Default)]
struct Seen {
    fields: HashMap<String, String>,
    span_conn: Option<String>,
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

thread_local! {
    static STACK: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, Option<String>>>,
    events: Arc<Mutex<Vec<Seen>>>,
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut f = Fields::default();
        attrs.record(&mut f);
        self.spans
            .lock()
            .unwrap()
            .insert(id, f.0.get("conn").cloned());
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let span = STACK.with(|s| s.borrow().last().copied());
        let span_conn = span.and_then(|id| self.spans.lock().unwrap().get(&id).cloned().flatten());
        self.events.lock().unwrap().push(Seen {
            fields: f.0,
            span_conn,
        });
    }
    fn enter(&self, span: &Id) {
        STACK.with(|s| s.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, _: &Id) {
        STACK.with(|s| s.borrow_mut().pop());
    }
}

/// Echoes, logging each message, and keeps the ids it saw.
#[derive(Clone, Default)]
struct Logged {
    ids: Arc<Mutex<Vec<String>>>,
}

impl Handler for Logged {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.ids.lock().unwrap().push(conn.id().to_string());
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        tracing::info!(len = msg.len(), "handled");
        conn.send(msg).unwrap();
    }
}

#[test]
fn a_connection_can_be_followed_by_its_id() {
    let recorder = Recorder::default();
    let events = recorder.events.clone();
    tracing::subscriber::set_global_default(recorder).unwrap();
    each_backend(|b| {
        events.lock().unwrap().clear();
        let h = Logged::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        for _ in 0..2 {
            let mut s = connect(server.local_addr());
            write_frame(&mut s, b"hi");
            assert_eq!(read_frame(&mut s).unwrap(), b"hi");
        }
        wait_until(10, "both closed", || handle.stats().closed == 2);
        server.shutdown(Duration::from_secs(2)).unwrap();
        let events = events.lock().unwrap().clone();
        let ids = h.ids.lock().unwrap().clone();
        assert_eq!(ids.len(), 2);
        for id in &ids {
            let mine = |msg: &str| {
                events
                    .iter()
                    .filter(|e| e.fields.get("message").map(String::as_str) == Some(msg))
                    .filter(|e| {
                        e.fields.get("conn") == Some(id) || e.span_conn.as_ref() == Some(id)
                    })
                    .count()
            };
            assert_eq!(mine("connection opened"), 1, "{id}: {events:#?}");
            assert_eq!(
                mine("handled"),
                1,
                "{id}: the handler's event is in its span"
            );
            assert_eq!(mine("connection closed"), 1, "{id}");
            let closed = events
                .iter()
                .find(|e| {
                    e.fields.get("message").map(String::as_str) == Some("connection closed")
                        && e.fields.get("conn") == Some(id)
                })
                .unwrap();
            assert_eq!(closed.fields["reason"], "peer_closed");
        }
        // The handler's events name no other connection.
        let handled: Vec<_> = events
            .iter()
            .filter(|e| e.fields.get("message").map(String::as_str) == Some("handled"))
            .collect();
        assert_eq!(handled.len(), 2);
        assert!(handled
            .iter()
            .all(|e| ids.contains(e.span_conn.as_ref().unwrap())));
    });
}
