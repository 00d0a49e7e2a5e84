//! Groups across servers (nodes) through a broker every node reaches:
//! [`Redis`] carries what one node publishes to the nodes whose members
//! are in the group, over Redis pub/sub.
//!
//! ```no_run
//! # #[cfg(not(feature = "redis"))] fn main() {} // the example needs the feature
//! # #[cfg(feature = "redis")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # struct Chat;
//! # impl wharf::Handler for Chat {
//! #     type State = ();
//! #     fn on_message(&self, _: &mut wharf::Conn<'_, ()>, _: &[u8]) {}
//! # }
//! use std::sync::Arc;
//! let cluster = Arc::new(wharf::cluster::Redis::new("redis://10.0.0.9:6379")?);
//! let server = wharf::Server::builder()
//!     .backplane(cluster.clone())
//!     .bind("0.0.0.0:7000")?
//!     .start(Chat)?;
//! // conn.join("lobby") and conn.publish("lobby", ..) now span every node.
//! # Ok(())
//! # }
//! ```
//!
//! # What is promised
//!
//! While the broker is up and both of a node's links to it are, a message
//! published on any node reaches every member on every node exactly once,
//! in the order its publisher published. Members on the publishing node get
//! it straight from their loops, never through the broker, so local
//! delivery goes on while the broker is away.
//!
//! Past that, delivery between nodes is **at most once**, as with Redis
//! pub/sub itself (and Socket.IO's Redis adapter, Centrifugo's Redis
//! engine): what is published while a link is down is dropped, not
//! replayed. Nothing is lost silently. A publisher counts what it could
//! not hand to the broker ([`ClusterStats::publish_lost`]), and each
//! message carries its publisher's sequence number per group, so a
//! receiver counts the messages it missed ([`ClusterStats::gaps`]) and
//! drops a repeat or a late one ([`ClusterStats::stale`]). A node whose
//! link fails reconnects with back-off and subscribes again to every group
//! it has members in.
//!
//! A group's subscription on the broker follows its members here: the
//! first member joining subscribes, the last leaving unsubscribes, within
//! one round trip to the broker. A member hears what other nodes publish
//! once its node's subscription is in place ([`Redis::wait_subscribed`]).
//!
//! Member counts across the cluster ([`Redis::cluster_groups`]): each node
//! keeps its own counts in Redis, in a hash that expires unless refreshed
//! (every third of [`Redis::presence_ttl`], 10 s by default), and in a set
//! of nodes scored by expiry that every node prunes as it refreshes.
//!
//! A node that dies leaves nothing that grows: Redis drops its
//! subscriptions with its connection, its counts expire within the TTL,
//! its entry in the set of nodes is pruned a TTL later, and what other
//! nodes kept of it (its sequence numbers) is forgotten after two minutes
//! without a message from it. A node that stops takes its counts out at
//! once.

#[cfg(feature = "redis")]
mod redis;
#[cfg(any(feature = "redis", test))]
mod wire;

#[cfg(feature = "redis")]
pub use self::redis::Redis;

/// A node's counters of its link to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Both links to the broker are up now (publishing and subscribed).
    pub linked: bool,
    /// Messages handed to the broker.
    pub published: u64,
    /// Messages published here that did not reach the broker: the link was
    /// down, the queue to it was full, or the write failed.
    pub publish_lost: u64,
    /// Messages from other nodes delivered to the members here.
    pub received: u64,
    /// Messages of other nodes this node missed, seen as gaps in their
    /// sequence numbers (a link that was down, here or there).
    pub gaps: u64,
    /// Messages from other nodes dropped as repeats or out of order.
    pub stale: u64,
    /// Times a link to the broker was opened again after failing.
    pub reconnects: u64,
    /// Groups subscribed to on the broker now.
    pub subscriptions: u64,
}
