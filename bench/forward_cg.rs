//! In-process clean-forwarding harness for callgrind: `Shared::handle` on a real loopback UDP
//! socket, one call flow per iteration, with nothing else in the process (no admin server, no
//! state task), so the instruction count of the measured phase is the forward path's own.
//!
//! Phases, in the order a call takes them: REGISTER (phone -> PBX), INVITE (phone -> PBX),
//! 200 OK (PBX -> phone, through our Via), ACK (phone -> PBX, in-dialog through our
//! Record-Route). Every phase handles `FWD_PACKETS` distinct messages; only the phase named on
//! the command line runs inside [`measured`], which callgrind collects alone
//! (`--toggle-collect=*forward_cg::measured*`): instructions / packet = total Ir / packets.
//! The harness checks that every packet of the phase was forwarded (not dropped, not answered).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use sipwarden::config::{Config, IncomingMode, NatDetection};
use sipwarden::net::handler::{Scratch, Shared};
use sipwarden::net::{Conns, Transports};
use sipwarden::node::Node;
use sipwarden::proxy::{Action, Advertised, Flow, Inbound, Keys, Router, RouterConfig};
use sipwarden::stats::Transport;
use sipwarden::wire::{parse, Edits, Framing};

/// Messages per phase (distinct Call-IDs and branches, so none is a retransmission).
pub const FWD_PACKETS: usize = 2_000;

pub const KINDS: [&str; 4] = ["register", "invite", "200", "ack"];

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 10.1.1.2\r\ns=-\r\nc=IN IP4 10.1.1.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n";

fn register(i: usize, me: SocketAddr) -> Vec<u8> {
    format!(
        "REGISTER sip:pbx.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.2:5060;branch=z9hG4bKr{i:x};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:1001@pbx.test>;tag=r{i}\r\n\
To: <sip:1001@pbx.test>\r\n\
Call-ID: reg{i:x}@10.1.1.2\r\n\
CSeq: {} REGISTER\r\n\
Contact: <sip:1001@{me}>;expires=3600\r\n\
User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY\r\n\
Expires: 3600\r\n\
Content-Length: 0\r\n\r\n",
        i + 1
    )
    .into_bytes()
}

fn invite(i: usize, me: SocketAddr) -> Vec<u8> {
    format!(
        "INVITE sip:1002@pbx.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.2:5060;branch=z9hG4bKi{i:x};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:1001@pbx.test>;tag=a{i}\r\n\
To: <sip:1002@pbx.test>\r\n\
Call-ID: inv{i:x}@10.1.1.2\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:1001@{me}>\r\n\
User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY\r\n\
Supported: replaces, timer\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    )
    .into_bytes()
}

/// The lines of `msg` whose header name is `name` (as we wrote them: full names).
fn lines_named<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .take_while(|l| !l.is_empty())
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// The PBX's 200 OK to the INVITE as we forwarded it (`fwd`): its Via lines and Record-Route.
fn ok_for(i: usize, fwd: &str, pbx: SocketAddr) -> Vec<u8> {
    let mut m = String::from("SIP/2.0 200 OK\r\n");
    for l in lines_named(fwd, "Via")
        .into_iter()
        .chain(lines_named(fwd, "Record-Route"))
    {
        m.push_str(l);
        m.push_str("\r\n");
    }
    m.push_str(&format!(
        "From: \"Alice\" <sip:1001@pbx.test>;tag=a{i}\r\n\
To: <sip:1002@pbx.test>;tag=b{i}\r\n\
Call-ID: inv{i:x}@10.1.1.2\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:1002@{pbx}>\r\n\
Server: PBX\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    ));
    m.into_bytes()
}

/// The phone's ACK for that 200, in the dialog: Route from the Record-Route we added.
fn ack_for(i: usize, fwd: &str, pbx: SocketAddr) -> Vec<u8> {
    let route: Vec<String> = lines_named(fwd, "Record-Route")
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(_, v)| format!("Route:{v}\r\n"))
        .collect();
    format!(
        "ACK sip:1002@{pbx} SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.2:5060;branch=z9hG4bKk{i:x};rport\r\n\
Max-Forwards: 70\r\n\
{}From: \"Alice\" <sip:1001@pbx.test>;tag=a{i}\r\n\
To: <sip:1002@pbx.test>;tag=b{i}\r\n\
Call-ID: inv{i:x}@10.1.1.2\r\n\
CSeq: 1 ACK\r\n\
Content-Length: 0\r\n\r\n",
        route.concat()
    )
    .into_bytes()
}

/// Handle every message of a phase from `src`.
async fn run(shared: &Arc<Shared>, src: SocketAddr, msgs: &[Vec<u8>], scratch: &mut Scratch) {
    let inb = Inbound {
        transport: Transport::Udp,
        src,
    };
    for m in msgs {
        shared.handle(inb, m, scratch).await;
    }
    shared.end_batch(scratch);
}

/// The phase callgrind collects (`--toggle-collect`); never inlined so that it has a name.
#[inline(never)]
fn measured(
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    src: SocketAddr,
    msgs: &[Vec<u8>],
    scratch: &mut Scratch,
) {
    rt.block_on(run(shared, src, msgs, scratch));
}

/// A phase outside the collected window.
#[inline(never)]
fn unmeasured(
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    src: SocketAddr,
    msgs: &[Vec<u8>],
    scratch: &mut Scratch,
) {
    rt.block_on(run(shared, src, msgs, scratch));
}

/// Run the four phases, measuring `kind` (one of [`KINDS`], or "none"). Prints the packets
/// forwarded in each phase; exits non-zero when one was not fully forwarded.
pub fn main(kind: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pbx = UdpSocket::bind("127.0.0.1:0").expect("bind pbx");
    let phone = UdpSocket::bind("127.0.0.2:0").expect("bind phone");
    let (pbx_addr, phone_addr) = (
        pbx.local_addr().expect("pbx addr"),
        phone.local_addr().expect("phone addr"),
    );
    let sock = rt
        .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
        .expect("bind proxy");
    let me = sock.local_addr().expect("proxy addr");
    let sock = Arc::new(sock);

    let mut cfg = Config::default();
    cfg.flood.packets_per_second = 100_000_000;
    cfg.invite.rate_limit = 100_000_000;
    cfg.invite.burst = 100_000_000;
    let cfg = cfg.validate().expect("config");
    let (node, _events) = Node::new(cfg);
    let adv = Advertised::new("127.0.0.1", me.port());
    let rcfg = RouterConfig {
        udp: Some(adv.clone()),
        tcp: None,
        ws: None,
        wss: None,
        tls: None,
        aliases: vec![adv],
        incoming: IncomingMode::Path,
        nat: NatDetection::Auto,
        keys: Keys::new([7; 16], None),
        sockets: vec![(Transport::Udp, me)],
    };
    let upstream = Flow {
        transport: Transport::Udp,
        addr: pbx_addr,
    };
    let router = Router::new(rcfg, upstream);

    // The messages, built before anything is measured. The 200s and ACKs need the INVITE as
    // we forward it (our Via and Record-Route): route each through a copy of the router.
    let regs: Vec<Vec<u8>> = (0..FWD_PACKETS).map(|i| register(i, phone_addr)).collect();
    let invs: Vec<Vec<u8>> = (0..FWD_PACKETS).map(|i| invite(i, phone_addr)).collect();
    let (mut edits, mut out) = (Edits::default(), Vec::new());
    let inb = Inbound {
        transport: Transport::Udp,
        src: phone_addr,
    };
    let mut oks = Vec::with_capacity(FWD_PACKETS);
    let mut acks = Vec::with_capacity(FWD_PACKETS);
    for (i, m) in invs.iter().enumerate() {
        let msg = parse(m, Framing::Datagram).expect("invite parses");
        let a = router.route_request(&inb, &msg, false, &mut edits, &mut out);
        assert!(matches!(a, Action::Forward { .. }), "invite routed: {a:?}");
        let fwd = String::from_utf8_lossy(&out).into_owned();
        oks.push(ok_for(i, &fwd, pbx_addr));
        acks.push(ack_for(i, &fwd, pbx_addr));
    }

    let shared = Arc::new(Shared {
        node: node.clone(),
        router: arc_swap::ArcSwap::from_pointee(router),
        transports: Transports {
            udp4: Some(sock.clone()),
            udp6: None,
            conns: Arc::new(Conns::default()),
        },
        max_message_bytes: 16384,
        tls_upstream: None,
        upstream_retry_at: Default::default(),
    });
    let mut scratch = Scratch::for_socket(sock);
    // Warm up: first-packet allocations, lazy statics, scratch buffers grown.
    let warm: Vec<Vec<u8>> = (0..50)
        .map(|i| register(FWD_PACKETS + i, phone_addr))
        .collect();
    unmeasured(&rt, &shared, phone_addr, &warm, &mut scratch);

    let stats = &node.stats;
    let phases: [(&str, SocketAddr, &[Vec<u8>]); 4] = [
        ("register", phone_addr, &regs),
        ("invite", phone_addr, &invs),
        ("200", pbx_addr, &oks),
        ("ack", phone_addr, &acks),
    ];
    let mut ok = true;
    for (name, src, msgs) in phases {
        let before = stats.requests_forwarded.get() + stats.responses_forwarded.get();
        if name == kind {
            measured(&rt, &shared, src, msgs, &mut scratch);
        } else {
            unmeasured(&rt, &shared, src, msgs, &mut scratch);
        }
        let fwd = stats.requests_forwarded.get() + stats.responses_forwarded.get() - before;
        println!("forward {name}: {fwd}/{} forwarded", msgs.len());
        ok &= fwd == msgs.len() as u64;
    }
    if !ok {
        std::process::exit(1);
    }
}
