//! The trust rule and the own-socket rule, on a router as the shipped layout builds it
//! (listening on 0.0.0.0:5060, the PBX on 127.0.0.1:5080).

use std::net::SocketAddr;

use super::*;

fn router(upstream: Transport) -> Router {
    let me = Advertised::new("192.0.2.10", 5060);
    let any: SocketAddr = "0.0.0.0:5060".parse().unwrap();
    let cfg = RouterConfig {
        tls: None,
        udp: Some(me.clone()),
        tcp: Some(me.clone()),
        ws: None,
        wss: None,
        aliases: vec![me],
        incoming: IncomingMode::Path,
        nat: NatDetection::Auto,
        keys: Keys::new([3; 16], None),
        sockets: vec![(Transport::Udp, any), (Transport::Tcp, any)],
    };
    Router::new(
        cfg,
        Flow {
            transport: upstream,
            addr: "127.0.0.1:5080".parse().unwrap(),
        },
    )
}

fn inb(t: Transport, a: &str) -> Inbound {
    Inbound {
        transport: t,
        src: a.parse().unwrap(),
    }
}

#[test]
fn upstream_trust_is_bound_to_the_flow() {
    let r = router(Transport::Udp);
    assert!(r.is_upstream(&inb(Transport::Udp, "127.0.0.1:5080")));
    assert!(
        !r.is_upstream(&inb(Transport::Udp, "127.0.0.1:5081")),
        "other port"
    );
    assert!(
        !r.is_upstream(&inb(Transport::Udp, "127.0.0.2:5080")),
        "other address"
    );
    assert!(
        !r.is_upstream(&inb(Transport::Tcp, "127.0.0.1:40000")),
        "TCP from the PBX's IP is a phone when the upstream is UDP"
    );
    assert!(
        !r.is_upstream(&inb(Transport::Udp, "127.0.0.1:5060")),
        "never our own socket"
    );
    let r = router(Transport::Tcp);
    assert!(r.is_upstream(&inb(Transport::Tcp, "127.0.0.1:40000")));
    assert!(!r.is_upstream(&inb(Transport::Udp, "127.0.0.1:5080")));
    assert!(!r.is_upstream(&inb(Transport::Tcp, "127.0.0.3:40000")));
}

#[test]
fn our_own_sockets_are_recognised() {
    let r = router(Transport::Udp);
    for own in ["127.0.0.1:5060", "127.0.0.9:5060", "192.0.2.10:5060"] {
        assert!(r.is_own_socket(&inb(Transport::Udp, own)), "{own}");
    }
    for other in ["127.0.0.1:5061", "203.0.113.1:5060", "[::1]:5060"] {
        assert!(!r.is_own_socket(&inb(Transport::Udp, other)), "{other}");
    }
    assert!(r.is_self(Flow {
        transport: Transport::Tcp,
        addr: "127.0.0.1:5060".parse().unwrap()
    }));
}
