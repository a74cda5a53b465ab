//! TFTP provisioning guard: phones fetch their configuration (SIP passwords included) over TFTP
//! at boot, and attackers guess those file names. [`codec`] is the wire format, [`guard`] the
//! sans-I/O limiter and guessing detector; the relay that applies them is `net::tftp`.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

pub mod codec;
pub mod guard;

pub use codec::{DecodeError, Mode, Options, Packet, Request};
pub use guard::{Admit, Guard, Outcome, Settings};
