//! Integration tests: a real sipwarden on loopback with in-process phones and PBX.

mod durability;
mod fraud;
mod harness;
mod protection;
mod proxy_core;
mod rfc4475;
mod routing;
mod tls;
mod websocket;
