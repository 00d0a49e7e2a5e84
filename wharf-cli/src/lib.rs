//! The library half of the `wharf` command: what other programs (and the
//! command's own tests) may call directly.
#![deny(missing_docs, rust_2018_idioms)]

pub mod bench;
pub mod files;
pub mod load;
pub mod peers;
