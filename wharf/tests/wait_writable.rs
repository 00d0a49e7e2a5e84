//! Back-pressure seen from other threads: `Handle::send` refuses once the
//! connection (or what is in transit to it) is over the mark, and
//! `Handle::wait_writable` tells the thread when it drained.

mod util;

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{Bytes, Conn, ConnId, Handler, SendError};

#[derive(Default, Clone)]
struct Ids(Arc<Mutex<Vec<ConnId>>>);

impl Handler for Ids {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.0.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }
    fn on_message(&self, _conn: &mut Conn<'_, ()>, _msg: &[u8]) {}
}

#[test]
fn other_threads_are_held_to_the_mark_and_told_when_it_drains() {
    each_backend(|b| {
        let ids = Ids::default();
        let high = 32 * 1024;
        let server = b
            .threads(1)
            .send_water_marks(high, high / 2)
            .socket_send_buffer(8 * 1024)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(ids.clone())
            .unwrap();
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&server.local_addr().into()).unwrap();
        let mut client: TcpStream = sock.into();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        wait_until(5, "open", || ids.0.lock().unwrap().len() == 1);
        let id = ids.0.lock().unwrap()[0];
        let handle = server.handle();
        // The peer reads nothing: sends are refused soon, and what was
        // accepted is bounded (queue and transit: about twice the mark plus
        // two messages, and what the kernel's buffers took).
        let msg = Bytes::from(vec![7u8; 4096]);
        let accepted = fill_until_held(&handle, id, &msg, 4 << 20);
        eprintln!("accepted {accepted} bytes before back-pressure held");
        assert_eq!(handle.send(id, msg.clone()), Err(SendError::Backpressure));
        // The peer reads everything: the connection drains.
        let reader = std::thread::spawn(move || {
            let mut total = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while total < accepted {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            (client, total)
        });
        assert_eq!(handle.wait_writable(id, Duration::from_secs(10)), Ok(true));
        handle.send(id, Bytes::from_static(b"again")).unwrap();
        let (client, _) = reader.join().unwrap();
        // Closed: waiting fails like a send.
        drop(client);
        wait_until(10, "closed", || !handle.is_open(id));
        assert_eq!(
            handle.wait_writable(id, Duration::from_secs(1)),
            Err(SendError::Closed)
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
