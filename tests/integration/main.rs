//! Integration tests: a real sipwarden on loopback with in-process phones and PBX.

mod harness;
mod protection;
mod proxy_core;
