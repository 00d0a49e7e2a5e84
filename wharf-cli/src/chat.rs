//! `wharf chat`: a chat room. Every message is relayed, as it is, to every
//! connection (its sender too), with length-prefixed framing.

use std::error::Error;
use std::time::Duration;

use wharf::{Bytes, CloseReason, Conn, Handler, Server};

use crate::serve::{self, ServeArgs, Stop};

/// Options of `wharf chat`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

struct Chat;

impl Handler for Chat {
    type State = ();

    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        tracing::info!("{} joined from {}", conn.id(), conn.peer_addr());
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        if let Err(e) = conn.handle().broadcast(Bytes::copy_from_slice(msg)) {
            tracing::warn!("message from {} not relayed: {e}", conn.id());
        }
    }

    fn on_close(&self, conn: &mut Conn<'_, ()>, reason: CloseReason) {
        tracing::info!("{} left ({reason:?})", conn.id());
    }
}

pub(crate) fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let stop = Stop::install(args.serve.duration)?;
    let server = args.serve.bind(Server::builder())?.start(Chat)?;
    serve::announce("chat", &server);
    while !stop.wait(Duration::from_secs(1)) {}
    serve::shutdown(server)
}
