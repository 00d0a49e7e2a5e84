//! Who may connect: allow and deny lists, bans and accept rate limits,
//! checked in that order when a connection is accepted, before any
//! callback and before it gets a slot or counts against a cap. A refused
//! connection is closed with a reset (no FIN exchange, no TIME_WAIT left on
//! either side), so that a flood of them costs the server an accept and a
//! close each and nothing more.

mod bans;
mod rate;
mod rules;

use std::net::IpAddr;
use std::time::Instant;

pub use bans::Ban;
pub use rate::AcceptRate;
pub use rules::{BadNetwork, IpRules};

pub(crate) use bans::Bans;
pub(crate) use rate::{AcceptLimiter, Over};
pub(crate) use rules::{parse as parse_network, LoopRules, SharedRules};

/// What every loop checks at accept.
pub(crate) struct Access {
    pub(crate) rules: SharedRules,
    pub(crate) bans: Bans,
    pub(crate) rate: AcceptLimiter,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Denied,
    Banned,
    RateLimited(Over),
}

impl Refused {
    pub(crate) fn cause(self) -> &'static str {
        match self {
            Refused::Denied => "denied",
            Refused::Banned => "banned",
            Refused::RateLimited(Over::PerIp) => "rate_limited_per_ip",
            Refused::RateLimited(Over::Global) => "rate_limited",
        }
    }
}

impl Access {
    /// Whether a peer at `ip`, accepted at `now`, may connect; `rules` is
    /// the calling loop's copy of the lists.
    pub(crate) fn check(
        &self,
        rules: &mut LoopRules,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), Refused> {
        if !rules.permits(&self.rules, ip) {
            return Err(Refused::Denied);
        }
        if self.bans.is_banned(ip, now) {
            return Err(Refused::Banned);
        }
        self.rate.admit(ip, now).map_err(Refused::RateLimited)
    }
}
